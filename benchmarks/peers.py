"""What the host benchmarks share: this pipeline's export, the peers built from the same ONNX file
and the same calibration images, and one timing harness.

- ours: :func:`pipeline.export.export` (PyTorch -> ONNX -> fully-int8 TFLite, verified);
- the peer int8 path: ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, int8
  activations, MinMax calibration) on the same ``model.onnx``, calibrated on exactly the export's
  representative dataset (rebuilt with ``calib_data.build`` from the same source, size and seed,
  and checked to be identical);
- a float32 TFLite of the same ONNX file through the pipeline's own converter (``precision="fp32"``).
"""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ORT_QUANT = ("onnxruntime.quantization.quantize_static: QDQ format, per_channel=True, int8 weights (QInt8), "
             "int8 activations (QInt8), CalibrationMethod.MinMax, after quant_pre_process")


def run_export(model: str, out: Path, calib: str = "balanced", calib_size: int = 500, seed: int = 0,
               eval_limit: int | None = None, target: str = "tflite-int8", data: str = "fashion-mnist",
               weights: str | None = None):
    """This pipeline's whole export (quietly); returns (status, folder, report)."""
    from pipeline import quiet
    quiet.configure(False)
    from pipeline.export import ExportConfig, export
    cfg = ExportConfig(model=model, weights=weights, data=data, calib=calib, calib_size=calib_size, seed=seed,
                       out=str(out), eval_limit=eval_limit, target=target, calib_cache=None)
    return export(cfg, log=lambda *a, **k: None)


def load_inputs(report) -> tuple[object, object, np.ndarray, np.ndarray]:
    """(dataset, preprocessing record, x_test float32 NCHW, y_test) exactly as the export saw them."""
    from pipeline.inputs import data as data_mod
    from pipeline.inputs import preprocessing
    cfg = report.config
    pre = preprocessing.Preprocessing.from_dict(report.preprocessing)
    ds = data_mod.load(cfg["data"], cfg.get("data_dir"), tuple(pre.input_shape))
    n = report.data["evaluated"]
    return ds, pre, preprocessing.apply(ds.x_test[:n], pre), ds.y_test[:n]


def same_calibration(report, ds, pre) -> np.ndarray:
    """The export's representative dataset, rebuilt from its source/size/seed and checked to be the same."""
    from pipeline.calib_data import CalibContext, build
    cfg = report.config
    ctx = CalibContext(x_train=ds.x_train, y_train=ds.y_train, preprocessing=pre, dataset_name=ds.name)
    src = build(cfg["calib"], ctx, cfg["calib_size"], cfg["seed"])
    got, want = src.describe(), report.calibration
    for k in ("source", "size", "seed", "per_class"):
        if k in want and got.get(k) != want[k]:
            raise RuntimeError(f"rebuilt calibration set differs from the export's in {k}: {got.get(k)} != {want[k]}")
    ws, gs = want.get("statistics", {}), got.get("statistics", {})
    for k in ("min", "max", "mean", "std"):  # float64 statistics of all values: equal only for the same samples
        if k in ws and gs.get(k) != ws[k]:
            raise RuntimeError(f"rebuilt calibration set differs from the export's ({k} {gs.get(k)} != {ws[k]})")
    return src.array()


def ort_quantize_static(onnx_path: Path, calibration: np.ndarray, out_path: Path) -> Path:
    """The peer int8 path: ONNX Runtime static quantization of the same ONNX on the same calibration images."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            s = next(self._it, None)
            return None if s is None else {name: s[None].astype(np.float32)}

    pre_path = out_path.with_name(out_path.stem + "_pre.onnx")
    quant_pre_process(str(onnx_path), str(pre_path))
    quantize_static(str(pre_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    pre_path.unlink(missing_ok=True)
    return out_path


def float_tflite(onnx_path: Path, calibration: np.ndarray, pre, out_path: Path):
    """Float32 TFLite of the same ONNX file, through the pipeline's converter (its precision ladder)."""
    from pipeline.conversion import get_converter
    from pipeline.conversion.onnx_export import OnnxArtifact
    art = OnnxArtifact(path=onnx_path, bytes=onnx_path.stat().st_size, opset=None, input_name="input",
                       output_name="logits", dynamic_batch=True, max_abs_error=None, tolerance=None, samples=0,
                       source="given")
    return get_converter("onnx2tf").convert(art, calibration, pre, per_channel=True, out_path=out_path,
                                            precision="fp32")


def ort_session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_logits(path: Path, x: np.ndarray, threads: int, batch_size: int = 256) -> np.ndarray:
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


# --------------------------------------------------------------------------- timing

@dataclass
class Engine:
    """One way to run the model at batch 1: ``call()`` sets the input, runs, and fetches the output."""

    name: str
    precision: str
    runtime: str
    kernels: str
    model_bytes: int
    call: Callable[[], np.ndarray]
    times_us: list = field(default_factory=list)
    top1: int | None = None


def time_engines(engines: list[Engine], rounds: int, runs: int, min_secs: float, warmup: int, seed: int = 0,
                 progress=None) -> None:
    """Interleaved timing: every round runs each engine (in a shuffled order) for at least ``runs``
    calls and ``min_secs / rounds`` seconds, so drift and other load hit all engines alike."""
    for e in engines:
        out = e.call()
        e.top1 = int(np.argmax(out.reshape(-1)))
        for _ in range(warmup):
            e.call()
    rng = random.Random(seed)
    per_round = min_secs / rounds
    for r in range(rounds):
        order = engines[:]
        rng.shuffle(order)
        for e in order:
            start = time.perf_counter()
            n = 0
            while n < runs or time.perf_counter() - start < per_round:
                t0 = time.perf_counter_ns()
                e.call()
                e.times_us.append((time.perf_counter_ns() - t0) / 1e3)
                n += 1
            if progress:
                progress(1)


def stats(times_us: list) -> dict:
    a = np.asarray(times_us, np.float64)
    return {"count": int(a.size), "mean_us": round(float(a.mean()), 1), "std_us": round(float(a.std()), 1),
            "min_us": round(float(a.min()), 1), "p50_us": round(float(np.percentile(a, 50)), 1),
            "p90_us": round(float(np.percentile(a, 90)), 1), "p99_us": round(float(np.percentile(a, 99)), 1),
            "max_us": round(float(a.max()), 1)}


def load_average() -> list | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def table(rows: list[list[str]], head: list[str]) -> str:
    cells = [head] + rows
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(head))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
