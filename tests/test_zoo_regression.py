"""Regression suite over every registered zoo model (a new entry is tested by being registered).

For each model, one ``tflite-int8`` export through :func:`pipeline.export.export` (the function
behind ``python -m pipeline.export``) is shared by its tests:

- the export is fully int8 (int8 input and output, no float op);
- on fixed inputs (two Fashion-MNIST test images per class, stored in ``tests/golden/<model>/``)
  the int8 outputs on the target's kernels are within the entry's ``int8_max_steps`` output
  quantization steps of PyTorch FP32;
- golden: ``tests/golden/<model>/`` also holds the ``.tflite`` the goldens were written with and
  its raw int8 outputs on those inputs, on LiteRT's reference kernels and on the target's kernels
  (XNNPACK, the target's thread count). Two outputs, because the kernel families round
  differently (XNNPACK requantizes with float multipliers, the reference kernels with fixed-point
  ones; measured here: up to 2 steps apart on the same model). The stored model must reproduce
  them exactly, on any host (integer kernels are deterministic): a LiteRT change fails this;
- a fresh conversion must come within ``CONVERSION_DRIFT_STEPS`` of the goldens on both kernel
  families. Not exactly: the converter calibrates with float kernels whose code path depends on
  the CPU, so the same pins give byte-different ``.tflite`` files on different hosts (measured:
  goldens from an Intel Xeon, conversion on an AMD EPYC: every zoo model's bytes differ, raw
  outputs at most 2 steps apart). A converter upgrade that moves outputs further fails this;
- slow: on the whole test split the top-1 drop and the agreement meet the export gates.

Regenerate the goldens (after retraining a model or an intended upgrade) with
``python tests/test_zoo_regression.py --regenerate [NAME ...]``.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline import zoo  # noqa: E402

GOLDEN_DIR = Path(__file__).parent / "golden"
PER_CLASS = 2  # fixed inputs: the first PER_CLASS test images of each class
CONVERSION_DRIFT_STEPS = 3  # fresh conversion vs goldens written on another host (measured at most 2)
FAST_EVAL = 256  # the shared export evaluates this many test images; the slow test runs the whole split
MODELS = zoo.list_models()


def fixed_inputs(entry) -> np.ndarray:
    """The first PER_CLASS test images of each class, preprocessed as the model takes them (float32 NCHW)."""
    from pipeline.inputs import data
    from pipeline.inputs import preprocessing
    ds = data.load(entry.dataset, None, entry.input_shape)
    idx = np.concatenate([np.flatnonzero(ds.y_test == c)[:PER_CLASS] for c in range(entry.num_classes)])
    pre = preprocessing.Preprocessing(input_shape=entry.input_shape, source_layout=ds.source_layout,
                                      source_dtype=ds.source_dtype, scale=ds.scale, mean=entry.mean, std=entry.std)
    return preprocessing.apply(ds.x_test[idx], pre)


def export_zoo_model(name: str, out: Path, eval_limit: int | None = FAST_EVAL):
    """One export exactly as the CLI runs it (default calibration, target tflite-int8)."""
    from pipeline.export import ExportConfig, export
    return export(ExportConfig(model=f"zoo:{name}", target="tflite-int8", out=str(out), eval_limit=eval_limit),
                  log=lambda *a, **k: None)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("tensorflow", "onnx2tf", "ai-edge-litert", "torch", "onnx")}


@dataclass
class ZooExport:
    name: str
    entry: object
    module: object  # the PyTorch model with its shipped weights, eval mode
    tflite: Path
    report: object
    target: object


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory) -> ZooExport:
    from pipeline import targets
    from pipeline.inputs import models
    name = request.param
    _, out, report = export_zoo_model(name, tmp_path_factory.mktemp(name) / "out")
    return ZooExport(name=name, entry=zoo.get_entry(name), module=models.load(f"zoo:{name}").module,
                     tflite=out / report.artifacts["tflite"]["path"], report=report,
                     target=targets.get_target("tflite-int8"))


def _golden_folder(z: ZooExport) -> Path:
    import json
    folder = GOLDEN_DIR / z.name
    if not (folder / "meta.json").is_file():
        pytest.fail(f"no golden outputs for zoo:{z.name} in {folder}; write them with "
                    f"python tests/test_zoo_regression.py --regenerate {z.name}")
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("weights_sha256") != sha256(z.entry.weights_path):
        pytest.fail(f"the golden outputs in {folder} were written for other zoo:{z.name} weights; after retraining, "
                    f"regenerate them with python tests/test_zoo_regression.py --regenerate {z.name}")
    return folder


def test_export_is_fully_int8(exported):
    q = exported.report.quantization
    assert q["fully_int8"], q["offending_ops"]
    assert (q["input_dtype"], q["output_dtype"]) == ("int8", "int8")
    assert exported.report.gates["fully_int8"].passed


def test_int8_within_steps_of_pytorch_on_fixed_inputs(exported):
    from pipeline.testing import assert_tflite_matches_torch
    x, _, _ = _load(exported)
    if exported.entry.int8_max_steps is None:
        pytest.fail(f"zoo:{exported.name} declares no int8_max_steps; register it with the bound its int8 outputs "
                    "must keep to (measured value with headroom)")
    assert_tflite_matches_torch(exported.module, exported.tflite, x, max_steps=exported.entry.int8_max_steps,
                                kernels=exported.target.run_kernels, threads=exported.target.threads)


@pytest.mark.parametrize("kernels", ["ref", "target"])
def test_stored_golden_model_reproduces_its_outputs_exactly(exported, kernels):
    from pipeline.testing import assert_tflite_matches_golden, golden_model
    folder = _golden_folder(exported)
    name = exported.target.run_kernels if kernels == "target" else "ref"
    assert_tflite_matches_golden(golden_model(folder), folder, kernels=name, max_steps=0)


@pytest.mark.parametrize("kernels", ["ref", "target"])
def test_fresh_conversion_is_near_the_goldens(exported, kernels):
    from pipeline.testing import assert_tflite_matches_golden, golden_model
    folder = _golden_folder(exported)
    name = exported.target.run_kernels if kernels == "target" else "ref"
    same_bytes = sha256(exported.tflite) == sha256(golden_model(folder))
    # the same bytes must give the same outputs; another host's conversion may differ by a few steps
    assert_tflite_matches_golden(exported.tflite, folder, kernels=name,
                                 max_steps=0 if same_bytes else CONVERSION_DRIFT_STEPS, output_scale_rtol=1e-2)


def test_golden_inputs_are_the_fixed_inputs(exported):
    x, outputs, meta = _load(exported)
    np.testing.assert_array_equal(x, fixed_inputs(exported.entry))
    assert meta["outputs"][exported.target.run_kernels]["threads"] == exported.target.threads


def test_zoo_table_row_reads_the_export(exported):
    from pipeline.zoo_table import markdown, row_from_report
    row = row_from_report(exported.name, exported.report)
    assert row["int8_bytes"] == exported.tflite.stat().st_size
    assert row["parameters"] == sum(p.numel() for p in exported.module.parameters())
    assert row["fully_int8"] and row["images"] == FAST_EVAL
    line = markdown([row]).splitlines()[-1]
    assert line.startswith(f"| `zoo:{exported.name}` |") and f"{row['int8_bytes'] / 1024:.1f} KiB" in line


def test_zoo_table_cli_refuses_unknown_models(capsys):
    from pipeline.zoo_table import main
    assert main(["--models", "resnt8"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown zoo model 'resnt8'; did you mean zoo:resnet8 or "
                                               "zoo:refcnn?")


@pytest.mark.slow
def test_full_test_split_drop_and_agreement(exported):
    """The export's gates on all 10,000 test images, with the shared conversion (no second conversion)."""
    from pipeline.inputs import data
    from pipeline.reliability import metrics
    from pipeline.inputs import models
    from pipeline.inputs import preprocessing
    from pipeline.export import ExportConfig
    from pipeline.runtime.litert import TfliteRunner
    rep, t = exported.report, exported.target
    pre = preprocessing.Preprocessing.from_dict(rep.preprocessing)
    ds = data.load(exported.entry.dataset, None, exported.entry.input_shape)
    x = preprocessing.apply(ds.x_test, pre)
    int8 = TfliteRunner(exported.tflite, kernels=t.run_kernels, threads=t.threads,
                        input_layout=rep.preprocessing["tflite_input_layout"]).run(x)
    fp32 = models.run_fp32(models.load(f"zoo:{exported.name}"), x)
    cmp = metrics.compare(fp32, int8.outputs, ds.y_test, output_scale=rep.quantization["outputs"][0]
                          ["quantization"]["scale"][0])
    gates = ExportConfig()
    assert cmp.n == 10_000
    assert cmp.drop_pp <= gates.max_drop_pp and cmp.agreement >= gates.min_agreement, (
        f"zoo:{exported.name}: FP32 {cmp.fp32_top1:.4f}, int8 {cmp.int8_top1:.4f}, drop {cmp.drop_pp:.2f} pp "
        f"(limit {gates.max_drop_pp}), agreement {cmp.agreement:.4f} (limit {gates.min_agreement})")
    record = exported.entry.training_record()
    assert cmp.fp32_top1 == pytest.approx(record["fp32_test_top1"], abs=1e-4)  # the shipped weights' own figure


def _load(z: ZooExport):
    from pipeline.testing import load_golden
    return load_golden(_golden_folder(z))


# --------------------------------------------------------------------------- regeneration

def regenerate(names: list[str]) -> None:
    import tempfile

    from pipeline import targets
    from pipeline import quiet
    from pipeline.testing import write_golden
    quiet.configure(False)
    for name in names:
        entry = zoo.get_entry(name)
        with tempfile.TemporaryDirectory() as tmp:
            _, out, report = export_zoo_model(name, Path(tmp) / "out")
            tflite = out / report.artifacts["tflite"]["path"]
            target = targets.get_target("tflite-int8")
            kernels = (("ref", 1), (target.run_kernels, target.threads))
            folder = write_golden(GOLDEN_DIR / name, tflite, fixed_inputs(entry), kernels=kernels, meta={
                "model": f"zoo:{name}", "weights_sha256": sha256(entry.weights_path),
                "inputs_description": f"first {PER_CLASS} test images per class, preprocessed",
                "fully_int8": report.quantization["fully_int8"], "versions": versions(),
                "converter": report.conversion.get("converter")})
        print(f"zoo:{name}: golden outputs written to {folder}")


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Regenerate the zoo golden int8 outputs (tests/golden/<model>/).")
    p.add_argument("--regenerate", nargs="*", metavar="NAME", required=True,
                   help="zoo models to regenerate (default: all registered)")
    args = p.parse_args()
    regenerate(args.regenerate or MODELS)
