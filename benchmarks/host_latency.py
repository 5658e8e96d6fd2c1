"""Batch-1 inference latency of one model on this host: PyTorch FP32, ONNX Runtime FP32 and int8
(quantize_static, the peer int8 path), TFLite FP32 and this pipeline's TFLite int8 on LiteRT's
XNNPACK, built-in and reference kernels - all measured in one run, interleaved.

    python benchmarks/host_latency.py [--model zoo:refcnn] [--threads 1] [--json host_latency.json]

Every engine gets the same preprocessed test image at batch 1 and the same number of threads.
A timed call is what an application calls per image: PyTorch ``module(x)``, ONNX Runtime
``session.run``, LiteRT ``set_tensor`` + ``invoke`` + ``get_tensor`` (int8 input already quantized).
Engines are timed in rounds, each round in a shuffled order, so drift and background load hit
all of them alike. Ratios are p50 against p50 of a peer in the same run (>1 = faster than it).
These are host (x86) figures: XNNPACK's int8 advantage over the built-in kernels is far larger on
x86 than on Arm, so they say nothing about a Raspberry Pi; run bundle/pi_benchmark.py there.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import peers  # noqa: E402

KERNELS = ("xnnpack", "builtin", "ref")


def build_engines(model_spec: str, weights: str | None, out: Path, report, x1, calibration, pre, threads: int,
                  work: Path) -> tuple[list, dict]:
    import numpy as np
    import torch
    from pipeline.inputs import models
    from pipeline.runtime.litert import TfliteRunner

    engines: list[peers.Engine] = []
    notes = {}
    m = models.load(model_spec, weights)
    if m.module is not None:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        mod, xt = m.module.eval(), torch.from_numpy(np.ascontiguousarray(x1))
        engines.append(peers.Engine("PyTorch FP32", "fp32", f"torch {torch.__version__}", "eager CPU", 0,
                                    lambda: mod(xt).numpy()))
    onnx_fp32 = out / "model.onnx"
    ort_int8 = peers.ort_quantize_static(onnx_fp32, calibration, work / "model_ort_int8.onnx")
    for label, path, prec in (("ONNX Runtime FP32", onnx_fp32, "fp32"), ("ONNX Runtime int8 (quantize_static)", ort_int8, "int8")):
        sess = peers.ort_session(path, threads)
        name = sess.get_inputs()[0].name
        engines.append(peers.Engine(label, prec, "onnxruntime", "CPU EP", path.stat().st_size,
                                    (lambda s=sess, n=name: s.run(None, {n: x1})[0])))
    t0 = time.perf_counter()
    fp32 = peers.float_tflite(onnx_fp32, calibration, pre, work / "model_fp32.tflite")
    notes["tflite_fp32"] = {"converter": fp32.converter, "precision": "fp32", "bytes": fp32.bytes,
                            "made_by": "pipeline.conversion.onnx2tf_tflite (precision='fp32') on the same model.onnx",
                            "seconds": round(time.perf_counter() - t0, 2)}
    int8_path = out / report.artifacts["tflite"]["path"] if "tflite" in report.artifacts else out / "model_int8.tflite"
    layout = report.preprocessing["tflite_input_layout"]
    for label, path, prec, lay in (("TFLite FP32", fp32.path, "fp32", fp32.input_layout),
                                   ("TFLite int8 (this pipeline)", int8_path, "int8", layout)):
        for k in KERNELS:
            runner = TfliteRunner(path, kernels=k, threads=threads, batch_size=1, input_layout=lay)
            runner._allocate(1)
            xq = runner.to_model_input(x1)
            it, i_idx, o_idx = runner.interp, runner.inp["index"], runner.out["index"]

            def call(it=it, i_idx=i_idx, o_idx=o_idx, xq=xq):
                it.set_tensor(i_idx, xq)
                it.invoke()
                return it.get_tensor(o_idx)
            engines.append(peers.Engine(f"{label}", prec, "ai-edge-litert", k, Path(path).stat().st_size, call))
    return engines, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:refcnn")
    p.add_argument("--weights", help="state_dict for a package.module:factory model")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--threads", type=int, default=1, help="threads for every engine (default 1)")
    p.add_argument("--calib-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--runs", type=int, default=20, help="minimum calls per engine per round (default 20)")
    p.add_argument("--min-secs", type=float, default=5.0, help="minimum timed seconds per engine in total (default 5)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", default="host_latency.json", help="write the figures here (default host_latency.json)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.runs < 1:
        print("error: --threads, --rounds and --runs must be at least 1", file=sys.stderr)
        return 2

    import numpy as np
    from pipeline.report import Report
    from pipeline.runtime.litert import host_description

    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    try:
        t0 = time.perf_counter()
        status, out, report = peers.run_export(args.model, work / "export", calib_size=args.calib_size,
                                               seed=args.seed, eval_limit=256, data=args.data, weights=args.weights)
        print(f"export {args.model}: status {status} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        ds, pre, x, y = peers.load_inputs(report)
        calibration = peers.same_calibration(report, ds, pre)
        x1 = np.ascontiguousarray(x[:1])
        engines, notes = build_engines(args.model, args.weights, out, report, x1, calibration, pre, args.threads, work)
        load_before = peers.load_average()
        peers.time_engines(engines, args.rounds, args.runs, args.min_secs, args.warmup, seed=args.seed)
        load_after = peers.load_average()

        by = {(e.name, e.kernels): e for e in engines}
        base = by.get(("PyTorch FP32", "eager CPU"))
        peer = by[("ONNX Runtime int8 (quantize_static)", "CPU EP")]
        rows = []
        for e in engines:
            s = peers.stats(e.times_us)
            row = {"engine": e.name, "precision": e.precision, "runtime": e.runtime, "kernels": e.kernels,
                   "threads": args.threads, "batch": 1, "model_bytes": e.model_bytes or None, "top1_on_sample": e.top1,
                   **s}
            row["speedup_vs_pytorch_fp32"] = (round(peers.stats(base.times_us)["p50_us"] / s["p50_us"], 3)
                                              if base else None)
            row["speedup_vs_ort_int8"] = round(peers.stats(peer.times_us)["p50_us"] / s["p50_us"], 3)
            # min over all calls: the figure least touched by other load on the machine
            row["speedup_vs_pytorch_fp32_min"] = (round(peers.stats(base.times_us)["min_us"] / s["min_us"], 3)
                                                  if base else None)
            row["speedup_vs_ort_int8_min"] = round(peers.stats(peer.times_us)["min_us"] / s["min_us"], 3)
            rows.append(row)

        print(f"Batch-1 latency of {args.model} on {host_description()}, {args.threads} thread(s), "
              f"measured in one run ({args.rounds} interleaved rounds; load average {load_before} -> {load_after})")
        print(peers.table(
            [[r["engine"], r["kernels"], f"{r['model_bytes'] / 1024:.1f}" if r["model_bytes"] else "-",
              f"{r['p50_us']:.1f}", f"{r['mean_us']:.1f}", f"{r['p90_us']:.1f}", f"{r['min_us']:.1f}", str(r["count"]),
              f"{r['speedup_vs_pytorch_fp32']:.2f}x" if r["speedup_vs_pytorch_fp32"] else "-",
              f"{r['speedup_vs_ort_int8']:.2f}x",
              f"{r['speedup_vs_pytorch_fp32_min']:.2f}x" if r["speedup_vs_pytorch_fp32_min"] else "-",
              f"{r['speedup_vs_ort_int8_min']:.2f}x"] for r in rows],
            ["engine", "kernels", "KiB", "p50 us", "mean us", "p90 us", "min us", "runs", "vs PyTorch FP32",
             "vs ORT int8", "min: vs PyTorch", "min: vs ORT int8"]))
        print("Timed call: PyTorch module(x); ONNX Runtime session.run; LiteRT set_tensor+invoke+get_tensor. "
              "Ratios: p50 (or min) of the peer / p50 (or min) of the row (>1 = faster); min is the figure "
              "least touched by other load on the machine.")
        tops = {}
        for r in rows:
            tops.setdefault(r["top1_on_sample"], []).append(f"{r['engine']} {r['kernels']}")
        if len(tops) == 1:
            print(f"Every engine gives top-1 class {next(iter(tops))} on the timed image.")
        else:
            print("Engines disagree on the timed image's top-1: " + "; ".join(f"class {c}: {', '.join(v)}"
                                                                          for c, v in sorted(tops.items())))
        rep = Report(
            kind="benchmark", model=report.model, data={"input": f"{report.data.get('name', 'test')} test image 0, "
                                                                 "preprocessed by the export's record", "batch": 1},
            preprocessing=report.preprocessing, calibration=report.calibration,
            runtime={"measured_on": host_description(), "threads": args.threads, "batch": 1,
                     "timed": "per call: PyTorch module(x); onnxruntime session.run; LiteRT set_tensor+invoke+get_tensor",
                     "load_average_before": load_before, "load_average_after": load_after,
                     "note": "host (x86) measurements, not device latency"},
            artifacts={"ort_int8": {"quantization": peers.ORT_QUANT,
                                    "bytes": peer.model_bytes}, **notes,
                       "tflite_int8": {"bytes": report.artifacts["tflite"]["bytes"]}},
            config=vars(args),
            sections={"latency": {"rows": rows, "method": f"{args.rounds} rounds x >= {args.runs} calls and >= "
                                  f"{args.min_secs / args.rounds:.2f}s per engine per round, shuffled order, after "
                                  f"{args.warmup} warm-up calls", "ratio": "p50(peer) / p50(row); *_min: min(peer) / min(row)"}})
        rep.write_json(Path(args.json))
        print(f"wrote {args.json}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
