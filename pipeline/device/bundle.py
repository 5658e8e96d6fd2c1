"""The device bundle: what a Raspberry Pi (or any Linux board) needs to benchmark and check the model.

Written by the export after its stages, into the work folder, so it is published with the
rest or not at all:

    bundle/
      model_int8.tflite       the exported model
      preprocessing.json      the preprocessing record (the report's section) + input quantization
      samples.npz             raw test images (as read, before preprocessing), the same images as
                              int8 model inputs, and their labels
      expected_outputs.npz    the int8 outputs recorded on this host with LiteRT, one array per kernel
      bundle.json             manifest: files, sha256 of every file the script reads, tensors, how the
                              outputs were recorded, the class names (when known)
      pi_benchmark.py         the standalone benchmark and check script (numpy + ai-edge-litert only)
      requirements.txt        what the device needs
      README.txt              the commands to run there
    bundle.tar.gz             the same folder, to copy with scp
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.errors import OutputError
from pipeline.jsonio import sha256_file

BUNDLE_DIR = "bundle"
BUNDLE_TAR = "bundle.tar.gz"
SCHEMA_VERSION = "1.0"
SAMPLES = 64
# Expected outputs are recorded on every kernel family so the device can be compared like with like
# (XNNPACK is bit-identical across x86 and aarch64; the optimized built-in kernels may differ by a step).
# Reference kernels are slow, so they are recorded on the first REF_SAMPLES only.
RECORDED_KERNELS = ("xnnpack", "builtin", "ref")
REF_SAMPLES = 8
CHECK_TOLERANCE_STEPS = 1
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pi_benchmark.py"

REQUIREMENTS = """\
# The Pi benchmark needs only numpy and a TFLite interpreter package (no torch, no tensorflow).
# Raspberry Pi OS 64-bit (aarch64) or any Linux/macOS machine, Python 3.10-3.13:
ai-edge-litert==2.3.0
numpy==2.4.6; python_version >= "3.11"
numpy==2.2.6; python_version < "3.11"
# Python 3.9 or a 32-bit OS has no ai-edge-litert 2.3.0 wheel: pip install "numpy<2" tflite-runtime==2.14.0
# instead (Python 3.9-3.11; tflite-runtime needs numpy 1.x); pi_benchmark.py falls back to it.
"""

README = """\
Device bundle for {model_spec} (target {target}), made by python -m pipeline.export.
{where}:

    tar xzf bundle.tar.gz && cd bundle
    python3 -m venv .venv && . .venv/bin/activate
    pip install -r requirements.txt
    python3 pi_benchmark.py --check-only
    python3 pi_benchmark.py --check --threads 1,2,4 --kernels xnnpack,builtin,ref --json pi_benchmark.json

--check runs the {n} bundled samples and compares the outputs with the ones recorded on the host
({host}), kernel by kernel; it exits 1 when they differ beyond {tol} quantization step(s).
"""
WHERE_PI = "\nOn the device (Raspberry Pi OS 64-bit, Python 3.10-3.13)"
WHERE_MICRO = """
{target} is a microcontroller: what goes on the board is the firmware package, {firmware}/ and {firmware}.zip
beside this bundle (its README.txt says how to build it into a TFLite-Micro project). This bundle checks the
same model with LiteRT on a Linux machine (a Raspberry Pi or any 64-bit Linux host, Python 3.10-3.13)"""


@dataclass(frozen=True)
class BundleArtifact:
    folder: Path
    tarball: Path
    files: dict
    samples: int
    expected: dict
    seconds: float
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"path": f"{self.folder.name}/", "tar": self.tarball.name,
                "tar_bytes": self.tarball.stat().st_size if self.tarball.exists() else None,
                "files": dict(self.files), "samples": self.samples, "expected_outputs": dict(self.expected),
                "seconds": round(self.seconds, 3), **self.extra}


def _host_description() -> str:
    from pipeline.runtime.litert import host_description
    return host_description()


def _litert_version() -> str | None:
    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return None


def _tensor(d: dict) -> dict:
    scale, zp = d["quantization"]
    return {"name": d.get("name"), "shape": [int(v) for v in d["shape"]],
            "shape_signature": [int(v) for v in d.get("shape_signature", d["shape"])],
            "dtype": np.dtype(d["dtype"]).name, "scale": float(scale), "zero_point": int(zp)}


def write_bundle(work: Path, tflite_path: Path, input_layout: str, preprocessing: dict, raw: np.ndarray,
                 x: np.ndarray, labels: np.ndarray, *, model_spec: str, target: str,
                 n_samples: int = SAMPLES, ref_samples: int = REF_SAMPLES,
                 class_names=None, firmware: str | None = None) -> BundleArtifact:
    """Write ``work/bundle/`` and ``work/bundle.tar.gz``.

    ``raw`` are the images as read (N×C×H×W, before preprocessing), ``x`` the same images as
    normalised float32 model input (the preprocessing record applied), ``labels`` their classes.
    ``class_names`` (one per model output, index order; None: unknown) go into bundle.json, where the Pi
    script reads them to print a label next to each class index. They live in the manifest itself, so no
    file is added to its ``sha256`` map (which covers every file the script reads besides bundle.json).
    ``firmware``: the firmware package's folder name when the target is a microcontroller (the README then sends
    the reader there for the board, and keeps this bundle for a Linux check).
    """
    from pipeline.runtime.litert import TfliteRunner
    t0 = time.perf_counter()
    n = min(int(n_samples), len(x), len(raw), len(labels))
    if n <= 0:
        raise OutputError("the device bundle needs at least one test image; pass a larger --eval-limit")
    if not SCRIPT.is_file():
        raise OutputError(f"the Pi benchmark script {SCRIPT} is missing; run the export from the source tree "
                          "(or reinstall it with benchmarks/)")
    folder = work / BUNDLE_DIR
    tar_path = work / BUNDLE_TAR
    folder.mkdir()
    try:
        model_name = tflite_path.name
        shutil.copyfile(tflite_path, folder / model_name)
        shutil.copyfile(SCRIPT, folder / SCRIPT.name)

        expected: dict[str, np.ndarray] = {}
        recorded: dict[str, dict] = {}
        input_int8 = None
        for k in RECORDED_KERNELS:
            m = min(n, ref_samples) if k == "ref" else n
            runner = TfliteRunner(tflite_path, kernels=k, threads=1, batch_size=1, input_layout=input_layout)
            if input_int8 is None:
                input_int8 = runner.to_model_input(x[:n])
                in_t, out_t = _tensor(runner.inp), _tensor(runner.out)
                names = _class_names(class_names, out_t)
            res = runner.run(x[:m])
            expected[k] = np.ascontiguousarray(res.raw_outputs.reshape(m, -1))
            recorded[k] = {"samples": m, "op_resolver": _RESOLVERS[k], "threads": 1, "batch": 1}

        pre = dict(preprocessing)  # the deployment record (preprocessing.Preprocessing.to_dict of the deployed model)
        q = {"dtype": in_t["dtype"], "scale": in_t["scale"], "zero_point": in_t["zero_point"]}
        if pre.get("input_quantization", q) != q or pre.get("tflite_input_layout", input_layout) != input_layout:
            raise OutputError(f"the preprocessing record ({pre.get('input_quantization')}, "
                              f"{pre.get('tflite_input_layout')}) does not describe {tflite_path.name} ({q}, "
                              f"{input_layout}); re-run the export")
        pre.update(input_quantization=q, tflite_input_layout=input_layout)
        _write_json(folder / "preprocessing.json", pre)
        np.savez_compressed(folder / "samples.npz", raw=np.ascontiguousarray(raw[:n]), input_int8=input_int8,
                            labels=np.asarray(labels[:n], np.int64))
        np.savez_compressed(folder / "expected_outputs.npz", **expected)
        (folder / "requirements.txt").write_text(REQUIREMENTS, encoding="utf-8")
        host = _host_description()
        where = WHERE_MICRO.format(target=target, firmware=firmware) if firmware else WHERE_PI
        (folder / "README.txt").write_text(README.format(model_spec=model_spec, target=target, n=n, host=host,
                                                         tol=CHECK_TOLERANCE_STEPS, where=where), encoding="utf-8")
        manifest = {
            "kind": "device_bundle",
            "schema_version": SCHEMA_VERSION,
            "created_by": "python -m pipeline.export",
            "model_spec": model_spec,
            "target": target,
            "model": {"path": model_name, "bytes": (folder / model_name).stat().st_size,
                      "sha256": sha256_file(folder / model_name)},
            "input": {**in_t, "layout": input_layout},
            "output": out_t,
            "preprocessing": "preprocessing.json",
            "samples": {"path": "samples.npz", "count": n,
                        "arrays": {"raw": f"{raw.dtype.name} N×C×H×W images as read, before preprocessing",
                                   "input_int8": f"{input_int8.dtype.name} {'×'.join(map(str, input_int8.shape))} "
                                                 "model inputs (preprocessing record + input quantization)",
                                   "labels": "int64 class indices"},
                        "source": f"the first {n} images of the evaluated test split"},
            "expected_outputs": {"path": "expected_outputs.npz", "kernels": recorded,
                                 "recorded_with": {"runtime": "ai-edge-litert", "version": _litert_version(),
                                                   "host": host, "threads": 1, "batch": 1},
                                 "unit": "raw output tensor values (int8 quantization steps)"},
            "check_tolerance_steps": CHECK_TOLERANCE_STEPS,
            **({"class_names": names} if names is not None else {}),
            "benchmark": {"script": SCRIPT.name, "requirements": "requirements.txt", "readme": "README.txt"},
            # every file pi_benchmark.py reads besides this manifest: it refuses one whose digest differs
            "sha256": {name: sha256_file(folder / name) for name in
                       (model_name, "preprocessing.json", "samples.npz", "expected_outputs.npz")},
        }
        _write_json(folder / "bundle.json", manifest)
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
        tmp = tar_path.with_name(tar_path.name + ".part")
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            tar.add(folder, arcname=BUNDLE_DIR)
        os.replace(tmp, tar_path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        for p in (tar_path, tar_path.with_name(tar_path.name + ".part")):
            p.unlink(missing_ok=True)
        raise
    return BundleArtifact(folder=folder, tarball=tar_path, files=files, samples=n, expected=recorded,
                          seconds=time.perf_counter() - t0,
                          extra={"recorded_on": host, "check_tolerance_steps": CHECK_TOLERANCE_STEPS})


def _class_names(class_names, out_t: dict) -> list[str] | None:
    """The names as a JSON list, one per output of the model (OutputError otherwise: the export checked the count
    against the FP32 model, so a mismatch here is a bug, never silently shipped)."""
    if class_names is None:
        return None
    names = [str(v) for v in class_names]
    k = int(np.prod(out_t["shape"][1:])) if len(out_t["shape"]) > 1 else int(np.prod(out_t["shape"]))
    if len(names) != k:
        raise OutputError(f"the device bundle got {len(names)} class names for a model with {k} outputs; give one "
                          "name per class (--class-names)")
    return names


_RESOLVERS = {"xnnpack": "BUILTIN", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "ref": "BUILTIN_REF"}


def _write_json(path: Path, obj: dict) -> None:
    from pipeline.report import _clean
    path.write_text(json.dumps(_clean(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

