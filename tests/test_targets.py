"""Every registered target exports a tiny model and meets its contract on real kernels.

- the precision contract of each rung (fp32, fp16, dynamic, int16x8, int8), checked on the
  flatbuffer and on a fresh LiteRT interpreter;
- microcontroller targets on TFLite-Micro: loads and runs, arena_bytes matches an independent
  TFLite-Micro run within 2%, outputs match LiteRT's, budgets checked, over-budget and
  unsupported-op failures are clear;
- LiteRT targets: batch-1 host latency on the target's kernels and the reference kernels,
  labelled as host measurements.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import targets
from pipeline.runtime import micro
from pipeline.export import ExportConfig, export, main
from pipeline.tflite.inspect import PRECISION_RULES, check_precision, inspect

ALL_TARGETS = targets.list_targets()
MICRO_TARGETS = [n for n in ALL_TARGETS if targets.get_target(n).is_micro]
LADDER = {targets.get_target(n).precision: n for n in ALL_TARGETS if n.startswith("tflite-")}


def _export_args(tinynet_dir: Path, tiny_npz: Path) -> dict:
    return dict(model="tinynet:tinynet", weights=str(tinynet_dir / "tinynet.pt"), data=str(tiny_npz), calib_size=100)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tinynet_dir, tiny_npz):
    """export(target) -> (status, out folder, report dict); each target converted once per module."""
    cache: dict[str, tuple[int, Path, dict]] = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(name) / "out"
            cwd = os.getcwd()
            os.chdir(tinynet_dir)
            try:
                status, out, _ = export(ExportConfig(**_export_args(tinynet_dir, tiny_npz), target=name, out=str(out)),
                                        log=lambda *a, **k: None)
            finally:
                os.chdir(cwd)
            cache[name] = (status, out, json.loads((out / "report.json").read_text()))
        return cache[name]
    return get


def _inputs(report: dict, tiny_npz: Path, n: int) -> np.ndarray:
    """The first n test inputs in the TFLite input layout, normalised as the report says."""
    pre = report["preprocessing"]
    x = np.load(tiny_npz)["x_test"][:n].astype(np.float32) * pre["scale"]
    x = (x - pre["mean"][0]) / pre["std"][0]
    return x[:, :, :, None] if pre["tflite_input_layout"] == "NHWC" else x[:, None]


def _capture_fd2(fn):
    """Run fn with the process's native stderr (fd 2) sent to a temp file; return (result, text)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode(errors="replace")


# --------------------------------------------------------------------------- the registry

def test_registry_holds_the_ladder_and_the_devices():
    assert set(ALL_TARGETS) >= {"tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int16x8", "tflite-int8",
                                "rpi4", "rpi5", "android-arm64", "cortex-m4", "cortex-m7"}
    assert set(LADDER) == set(targets.PRECISIONS)
    for name in ALL_TARGETS:
        t = targets.get_target(name)
        assert t.references, f"{name} cites no source"
        if t.is_micro:
            assert t.ram_bytes and t.flash_bytes and t.clock_mhz and t.published
            assert t.arena_margin > 0 and t.flash_margin > 0
            assert any("margin" in r for r in t.references), f"{name} does not say why its margin is what it is"


def test_unknown_target_suggests_a_name():
    with pytest.raises(targets.TargetError, match="did you mean cortex-m4"):
        targets.get_target("cortex-m44")


def test_list_targets_prints_every_entry_with_its_budgets(capsys):
    assert main(["--list-targets"]) == 0
    out = capsys.readouterr().out
    for name in ALL_TARGETS:
        t = targets.get_target(name)
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert t.precision in line and t.kernels in line and t.device in line
    assert "640 KiB" in out and "2 MiB" in out  # the STM32L4R5 budgets


# --------------------------------------------------------------------------- every target, end to end

@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_TARGETS)
def test_target_exports_and_meets_its_contract(name, exported, tiny_npz):
    from ai_edge_litert.interpreter import Interpreter
    t = targets.get_target(name)
    status, out, r = exported(name)
    assert status == 0, [(k, g) for k, g in r["gates"].items() if not g["passed"]]
    assert r["passed"] and r["target"]["name"] == name

    # the precision contract, on the flatbuffer and as a fresh LiteRT interpreter sees it
    model = out / r["artifacts"]["tflite"]["path"]
    assert model.name == f"model_{t.precision}.tflite" and model.stat().st_size == r["artifacts"]["tflite"]["bytes"]
    q = r["quantization"]
    assert q["precision"]["precision_ok"] is True and r["gates"]["precision_ok"]["passed"]
    assert q["input_dtype"] == t.input_dtype and q["output_dtype"] == t.output_dtype
    if t.allow_float_fallback:  # the tiny model has an int8 kernel for every op: fully int8, but not required
        assert q["fully_int8"] is True and r["gates"]["fully_int8"]["required"] is False
        assert q["float_ops"] == [] and q["float_nodes"] == [] and "float fallback" in q["precision"]["rule"]
    elif t.precision == "int8":
        assert q["fully_int8"] is True and r["gates"]["fully_int8"]["required"] is True
    else:
        assert q["fully_int8"] is False and r["gates"]["fully_int8"]["applies"] is False
    it = Interpreter(model_path=str(model), num_threads=1)
    it.allocate_tensors()
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    assert np.dtype(inp["dtype"]).name == t.input_dtype and np.dtype(outp["dtype"]).name == t.output_dtype

    # the saved outputs are what a fresh interpreter gives (quantizing only integer inputs, with their scale)
    z = np.load(out / "predictions.npz", allow_pickle=False)
    raw = z[f"{t.precision}_raw"]
    x = _inputs(r, tiny_npz, 5)
    it.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]])
    it.allocate_tensors()
    for i in range(5):
        xi = x[i:i + 1]
        if np.issubdtype(inp["dtype"], np.integer):
            s, zp = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            xi = np.clip(np.round(xi / s) + zp, info.min, info.max).astype(inp["dtype"])
        it.set_tensor(inp["index"], xi.astype(inp["dtype"]))
        it.invoke()
        got = it.get_tensor(outp["index"])[0]
        if np.issubdtype(outp["dtype"], np.integer):
            # reference vs the target's kernels: at most one rounding step apart
            assert np.abs(got.astype(np.int64) - raw[i].astype(np.int64)).max() <= 1
        else:
            # float outputs: within 8 float32 rounding steps of the largest logit (batch and thread
            # count may change the summation order; on this host they are bit-identical)
            step = np.finfo(np.float32).eps * float(np.abs(raw[i]).max())
            assert np.abs(got - raw[i]).max() <= 8 * step

    assert r["accuracy"]["agreement"] >= 0.98  # the toy task: every rung keeps the FP32 decisions
    assert r["runtime"]["int8"]["kernels"] == t.run_kernels and r["runtime"]["int8"]["threads"] == t.threads

    if t.is_micro:
        m = r["device"]["tflite_micro"]
        assert m["arena_bytes"] > 0 and m["flash_bytes"] == model.stat().st_size and m["arena_verified"]
        for gate in ("arena_fits_ram", "model_fits_flash", "tflm_matches_litert"):
            assert r["gates"][gate]["passed"], r["gates"][gate]
        assert m["ram_check"]["required_bytes"] == int(np.ceil(m["arena_bytes"] * (1 + t.arena_margin)))
        c = m["compared_with_litert"]
        assert c["images"] == len(z["tflm_raw"]) == 200 and c["litert_kernels"] == t.run_kernels
        assert c["max_diff_steps"] == int(np.abs(z["tflm_raw"].astype(int) - raw[:200].astype(int)).max())
        assert r["runtime"]["latency"]["measured"] is False
    else:
        lat = r["runtime"]["latency"]
        assert lat["measured"] is True and set(lat["kernels"]) == {t.kernels, "ref"}
        for k, v in lat["kernels"].items():
            assert v["batch_size"] == 1 and v["threads"] == t.threads and v["runs"] >= 50 and v["median_ms"] > 0
            assert "host measurement" in v["label"] and "not a device latency" in v["label"]
        assert "tflite_micro" not in r["device"]


@pytest.mark.slow
def test_each_rung_meets_only_its_own_precision_contract(exported):
    """The contracts tell the rungs apart: a model meets its own precision's rule and no other."""
    models = {p: inspect(exported(n)[1] / f"model_{p}.tflite") for p, n in LADDER.items()}
    for p, insp in models.items():
        for rule in PRECISION_RULES:
            chk = check_precision(insp, rule)
            assert chk.precision_ok is (rule == p), f"{p} model judged as {rule}: {chk.reason}"
            if rule != p:
                assert chk.offending and chk.reason.startswith(f"not {rule}:")
    assert check_precision(models["dynamic"], "dynamic").weights.get("int8", 0) >= 1
    assert set(check_precision(models["fp16"], "fp16").weights) == {"float16"}


# --------------------------------------------------------------------------- TFLite-Micro

@pytest.mark.slow
@pytest.mark.parametrize("name", MICRO_TARGETS)
def test_arena_bytes_match_an_independent_tflite_micro_run(name, exported, tiny_npz):
    from tflite_micro import runtime
    _, out, r = exported(name)
    model = out / "model_int8.tflite"
    reported = r["device"]["tflite_micro"]["arena_bytes"]
    itp, _ = _capture_fd2(lambda: runtime.Interpreter.from_file(
        str(model), arena_size=1 << 20, intrepreter_config=runtime.InterpreterConfig.kAllocationRecording))
    d = itp.get_input_details(0)
    s, zp = float(d["quantization_parameters"]["scales"][0]), int(d["quantization_parameters"]["zero_points"][0])
    x = _inputs(r, tiny_npz, 3)
    tflm = []
    for i in range(3):
        itp.set_input(np.clip(np.round(x[i:i + 1] / s) + zp, -128, 127).astype(np.int8), 0)
        itp.invoke()
        tflm.append(np.array(itp.get_output(0))[0])
    _, text = _capture_fd2(itp.print_allocations)
    independent = int(re.search(r"Arena allocation total (\d+) bytes", text).group(1))
    assert abs(reported - independent) <= 0.02 * independent, (reported, independent)
    # the saved TFLite-Micro outputs are what TFLite-Micro gives
    np.testing.assert_array_equal(np.load(out / "predictions.npz")["tflm_raw"][:3], np.stack(tflm))


@pytest.mark.slow
def test_over_budget_fails_with_the_reason(monkeypatch, tmp_path, tinynet_dir, tiny_npz, in_dir, capsys):
    tiny = dataclasses.replace(targets.get_target("cortex-m4"), name="tiny-mcu", ram_bytes=1024, flash_bytes=2048,
                               device="a 1 KiB board")
    monkeypatch.setitem(targets._REGISTRY, "tiny-mcu", tiny)
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    a = _export_args(tinynet_dir, tiny_npz)
    status = main(["--model", a["model"], "--weights", a["weights"], "--data", a["data"], "--calib-size", "100",
                   "--target", "tiny-mcu", "--micro-limit", "20", "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 1
    assert "FAIL (arena_fits_ram, model_fits_flash)" in text
    assert "does not fit the 1,024 B RAM budget of a 1 KiB board" in text
    assert "does not fit the 2,048 B flash budget" in text
    r = json.loads((out / "report.json").read_text())
    m = r["device"]["tflite_micro"]
    assert r["passed"] is False and r["gates"]["tflm_matches_litert"]["passed"]
    assert m["ram_check"]["required_bytes"] > 1024 and m["compared_with_litert"]["images"] == 20


@pytest.mark.slow
def test_model_tflite_micro_cannot_run_fails_naming_the_op(tmp_path, tiny_npz, capsys):
    """An ONNX Gelu becomes a TFLite GELU, which has no TFLite-Micro kernel: exit 1, op named, nothing written."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 1, 3, 3)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array(np.zeros(4, np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "FW"),
             numpy_helper.from_array(np.zeros(4, np.float32), "FB")]
    nodes = [helper.make_node("Conv", ["input", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Gelu", ["c"], ["g"]),
             helper.make_node("GlobalAveragePool", ["g"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "FW", "FB"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 9
    path = tmp_path / "gelu.onnx"
    onnx.save(m, path)
    out = tmp_path / "o"
    status = main(["--model", str(path), "--data", str(tiny_npz), "--calib-size", "100", "--target", "cortex-m7",
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1
    assert "error: TFLite-Micro has no kernel for GELU" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_hybrid_model_is_refused_by_tflite_micro_with_the_node_named(exported):
    _, out, _ = exported("tflite-dynamic")
    with pytest.raises(micro.MicroUnsupportedError, match=r"rejects CONV_2D \(node \d+\) in prepare: Hybrid models"):
        micro.load(out / "model_dynamic.tflite", 1 << 20)


def test_allocation_log_parsing_needs_the_total_line():
    text = ("[RecordingMicroAllocator] Arena allocation total 3744 bytes\n"
            "[RecordingMicroAllocator] Arena allocation head 1440 bytes\n"
            "[RecordingMicroAllocator] Arena allocation tail 2304 bytes\n"
            "[RecordingMicroAllocator] 'TfLiteEvalTensor data' used 408 bytes with alignment overhead "
            "(requested 408 bytes for 17 allocations)\n")
    a = micro.parse_allocations(text)
    assert (a.total_bytes, a.head_bytes, a.tail_bytes) == (3744, 1440, 2304)
    assert a.categories == {"TfLiteEvalTensor data": 408}
    with pytest.raises(Exception, match="no 'Arena allocation total' line"):
        micro.parse_allocations("nothing here")


def test_budget_check_applies_the_margin():
    fits = micro.check_budget("RAM", 800, 0.25, 1000, "arena_bytes", "board")
    over = micro.check_budget("RAM", 801, 0.25, 1000, "arena_bytes", "board")
    assert fits.fits and fits.required_bytes == 1000
    assert not over.fits and over.required_bytes == 1002 and "does not fit the 1,000 B RAM budget" in over.reason


# --------------------------------------------------------------------------- the precision ladder

@pytest.mark.slow
def test_precision_study_prints_one_row_per_rung(tmp_path, tinynet_dir, tiny_npz, in_dir, capsys):
    from pipeline import study
    from pipeline.reliability.confidence import ece, softmax
    in_dir(tinynet_dir)
    out = tmp_path / "ladder"
    a = _export_args(tinynet_dir, tiny_npz)
    status = study.main(["precision", "--model", a["model"], "--weights", a["weights"], "--data", a["data"],
                         "--calib-size", "100", "--targets", "tflite-fp32,tflite-int8", "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[1] for ln in rows[1:]] == ["-", "tflite-fp32", "tflite-int8"]  # FP32 reference + 2 rungs
    assert "not device latency" in text
    s = json.loads((out / "study.json").read_text())
    assert [m["model"] for m in s["models"]] == [a["model"]]
    assert s["execution"]["backend"] == "local" and s["execution"]["workers"] == 1  # in this process
    for row in s["models"][0]["rows"]:
        assert Path(row["folder"]).parent == out  # one model: OUT/<target>
        z = np.load(Path(row["folder"]) / "predictions.npz")
        logits = z[f"{row['precision']}_logits"]
        assert row["ece"] == pytest.approx(ece(softmax(logits), z["labels"]))
        assert row["agreement"] == pytest.approx(np.mean(logits.argmax(1) == z["fp32_logits"].argmax(1)))
        assert row["bytes"] == (Path(row["folder"]) / f"model_{row['precision']}.tflite").stat().st_size
        assert row["latency_ms"]["ref"] > 0 and "host measurement" in row["latency_label"]["ref"]
    assert (out / "study.md").read_text().strip() in text


def test_precision_study_refuses_an_unknown_target(capsys):
    from pipeline import study
    assert study.main(["precision", "--targets", "tflite-fp33"]) == 2
    assert "did you mean tflite-fp32" in capsys.readouterr().err


def test_per_tensor_flag_gives_one_weight_scale_per_tensor(tmp_path, tinynet_dir, tiny_npz, in_dir, exported):
    """--per-tensor: the file itself holds one scale per weight tensor (read back from the .tflite, not from the
    config), the report says so, and the default folder name says so too."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.export import build_parser, config_from_args, export_target, out_path
    in_dir(tinynet_dir)
    a = _export_args(tinynet_dir, tiny_npz)
    args = ["--model", a["model"], "--weights", a["weights"], "--data", a["data"], "--calib-size", "100"]
    cfg = config_from_args(build_parser().parse_args([*args, "--per-tensor"]))
    assert cfg.per_tensor and out_path(cfg, export_target(cfg)).name == "tinynet-tinynet-tinynet-tflite-int8-per-tensor"
    out = tmp_path / "pt"
    assert main([*args, "--per-tensor", "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["quantization"]["weights_per_channel"] is False and r["target"]["per_channel_weights"] is False

    def weight_scales(path):
        det = Interpreter(model_path=str(path)).get_tensor_details()
        return [len(d["quantization_parameters"]["scales"]) for d in det
                if d["dtype"] == np.int8 and len(d["shape"]) == 4 and d["shape"][0] > 1]
    assert weight_scales(out / "model_int8.tflite") and max(weight_scales(out / "model_int8.tflite")) == 1
    _, pc_out, pc = exported("tflite-int8")  # the same model per channel: several scales per conv weight
    assert pc["quantization"]["weights_per_channel"] is True and max(weight_scales(pc_out / "model_int8.tflite")) > 1
