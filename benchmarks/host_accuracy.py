"""Int8 accuracy of this pipeline against the peer int8 path (ONNX Runtime quantize_static) on the
same ONNX model, the same calibration images and the whole test split - measured in one run.

    python benchmarks/host_accuracy.py [--model zoo:refcnn] [--json host_accuracy.json]

- FP32 reference: the PyTorch model (what the export compares with), plus ONNX Runtime FP32 of the
  exported ``model.onnx`` as a sanity row;
- this pipeline: the export's fully-int8 TFLite on LiteRT (the target's kernels and threads), its
  logits straight from the export's ``predictions.npz``;
- the peer: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, int8
  activations, MinMax) of the same ``model.onnx``, calibrated on exactly the export's
  representative dataset (rebuilt from the same source, size and seed and checked to be identical),
  run with ONNX Runtime's CPU execution provider.

Drop = FP32 top-1 minus int8 top-1, in percentage points; agreement = share of test images whose
int8 top-1 equals the FP32 top-1. The two int8 models are also compared with each other, and the
images exactly one of them gets right are counted (with an exact two-sided sign test on them).
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import peers  # noqa: E402


def sign_test_p(a: int, b: int) -> float:
    """Exact two-sided binomial test of a vs b discordant pairs (McNemar's exact test)."""
    n = a + b
    if n == 0:
        return 1.0
    k = min(a, b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:refcnn")
    p.add_argument("--weights", help="state_dict for a package.module:factory model")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--calib", default="balanced")
    p.add_argument("--calib-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    p.add_argument("--json", default="host_accuracy.json", help="write the figures here (default host_accuracy.json)")
    args = p.parse_args(argv)

    import numpy as np
    from pipeline.reliability.metrics import agreement, top1
    from pipeline.report import Report
    from pipeline.runtime.litert import host_description

    work = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    try:
        t0 = time.perf_counter()
        status, out, report = peers.run_export(args.model, work / "export", calib=args.calib,
                                               calib_size=args.calib_size, seed=args.seed, data=args.data,
                                               weights=args.weights)
        print(f"export {args.model}: status {status} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        ds, pre, x, y = peers.load_inputs(report)
        z = np.load(out / "predictions.npz", allow_pickle=False)
        if not np.array_equal(z["labels"], y):
            raise RuntimeError("the export's labels differ from the reloaded test split")
        fp32, ours = z["fp32_logits"], z["int8_logits"]
        calibration = peers.same_calibration(report, ds, pre)
        t0 = time.perf_counter()
        ort_int8_path = peers.ort_quantize_static(out / "model.onnx", calibration, work / "model_ort_int8.onnx")
        quant_s = time.perf_counter() - t0
        ort_fp32 = peers.ort_logits(out / "model.onnx", x, args.threads)
        ort_int8 = peers.ort_logits(ort_int8_path, x, args.threads)

        n = len(y)
        f_top1 = top1(fp32, y)
        ok_ours, ok_ort = ours.argmax(1) == y, ort_int8.argmax(1) == y
        only_ours, only_ort = int(np.sum(ok_ours & ~ok_ort)), int(np.sum(ok_ort & ~ok_ours))
        rt = report.runtime["int8"]
        rows = [
            {"model": f"FP32 reference ({report.model['fp32_reference']})", "precision": "fp32",
             "runtime": report.model["fp32_reference"], "top1": f_top1, "drop_pp": 0.0, "agreement_vs_fp32": 1.0,
             "bytes": report.artifacts["onnx"]["bytes"]},
            {"model": "ONNX Runtime FP32 (model.onnx)", "precision": "fp32", "runtime": "onnxruntime CPU EP",
             "top1": top1(ort_fp32, y), "drop_pp": round((f_top1 - top1(ort_fp32, y)) * 100, 4),
             "agreement_vs_fp32": agreement(ort_fp32, fp32), "bytes": report.artifacts["onnx"]["bytes"],
             "max_abs_logit_error_vs_fp32": float(np.abs(ort_fp32 - fp32).max())},
            {"model": "this pipeline: fully-int8 TFLite", "precision": "int8",
             "runtime": f"ai-edge-litert {rt['kernels']} kernels, {rt['threads']} threads",
             "top1": top1(ours, y), "drop_pp": round((f_top1 - top1(ours, y)) * 100, 4),
             "agreement_vs_fp32": agreement(ours, fp32), "bytes": report.artifacts["tflite"]["bytes"],
             "fully_int8": report.quantization["fully_int8"],
             "max_abs_logit_error_vs_fp32": float(np.abs(ours - fp32).max())},
            {"model": "peer: ONNX Runtime quantize_static (QDQ)", "precision": "int8",
             "runtime": "onnxruntime CPU EP", "top1": top1(ort_int8, y),
             "drop_pp": round((f_top1 - top1(ort_int8, y)) * 100, 4), "agreement_vs_fp32": agreement(ort_int8, fp32),
             "bytes": ort_int8_path.stat().st_size, "fully_int8": None,
             "max_abs_logit_error_vs_fp32": float(np.abs(ort_int8 - fp32).max()), "quantize_s": round(quant_s, 2)},
        ]
        out_scale = report.quantization["outputs"][0]["quantization"]["scale"][0]
        diff_steps = np.abs(ours.astype(np.float64) - ort_int8.astype(np.float64)) / out_scale
        between = {"agreement_ours_vs_ort_int8": agreement(ours, ort_int8), "only_ours_correct": only_ours,
                   "only_ort_int8_correct": only_ort, "sign_test_p": round(sign_test_p(only_ours, only_ort), 4),
                   "logits_max_diff_steps": round(float(diff_steps.max()), 3),
                   "logits_mean_diff_steps": round(float(diff_steps.mean()), 5),
                   "logits_identical_fraction": round(float(np.mean(diff_steps < 1e-3)), 6),
                   "steps_of": f"this pipeline's int8 output scale {out_scale:.6g}"}

        print(f"Int8 accuracy of {args.model} on the {ds.name} test split ({n} images), calibration: "
              f"{report.calibration['source']} x{report.calibration['size']} (seed {report.calibration['seed']}), "
              f"the same images for both int8 paths; measured in one run on {host_description()}")
        print(peers.table(
            [[r["model"], r["precision"], f"{r['bytes'] / 1024:.1f}", f"{r['top1'] * 100:.2f}%",
              f"{r['drop_pp']:+.2f}", f"{r['agreement_vs_fp32'] * 100:.2f}%"] for r in rows],
            ["model", "precision", "KiB", "top-1", "drop pp", "agreement vs FP32"]))
        print(f"this pipeline vs ONNX Runtime int8: top-1 agreement {between['agreement_ours_vs_ort_int8'] * 100:.2f}%; "
              f"images only ours gets right {only_ours}, only ORT int8 gets right {only_ort} "
              f"(exact sign test p = {between['sign_test_p']}); logits differ by at most "
              f"{between['logits_max_diff_steps']} output steps, {between['logits_identical_fraction'] * 100:.2f}% identical")
        print(f"ours: {rows[2]['runtime']}; peer: {peers.ORT_QUANT}")
        Report(
            kind="benchmark", model=report.model,
            data={**report.data, "evaluated": n, "split": "test"},
            preprocessing=report.preprocessing, calibration=report.calibration,
            quantization={"ours": {"fully_int8": report.quantization["fully_int8"],
                                   "converter": report.conversion.get("converter")},
                          "ort_int8": peers.ORT_QUANT},
            runtime={"measured_on": host_description(), "ours": rt, "onnxruntime_threads": args.threads},
            accuracy={"rows": rows, "between_int8": between,
                      "definitions": {"drop_pp": "FP32 top-1 minus this row's top-1, percentage points",
                                      "agreement_vs_fp32": "share of images whose top-1 equals the FP32 reference's"}},
            config=vars(args),
        ).write_json(Path(args.json))
        print(f"wrote {args.json}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
