"""Evaluation throughput: the project's evaluation engine vs a plain one-image-at-a-time interpreter loop.

Same model, same images, same run. The peers, each timed over the same N test images:

- ``plain int8 loop``: ``Interpreter(model_path)`` with default options (LiteRT's default XNNPACK
  delegate), one image at a time: quantize, ``set_tensor``, ``invoke``, ``get_tensor``. This is how the
  papers' evaluators and most tutorials run a TFLite model.
- ``plain FP32 + int8 loop``: the same, plus the FP32 model on each image one at a time, on the same FP32
  runtime as the engine (what a plain loop needs to do the job the reliability report does).
- ``engine int8``: the project's evaluation (pipeline/reliability/engine.py) running only the TFLite model:
  batched, one interpreter per worker process, all cores.
- ``engine FP32 + int8``: the project's evaluation as the reliability report runs it: each block of
  images through both models, batched, all cores.

The FP32 runtime is the one the export used (onnxruntime on its checked ``model.onnx`` by default, or
PyTorch with ``--fp32-runtime reference``); both FP32 peers use it, with one intra-op thread per process.

Rounds alternate between the peers and the median per peer is reported, so load from other processes
hits all of them alike. Figures are images per second on this host, and their ratios.

    python benchmarks/eval_throughput.py EXPORT_DIR [--images 4000] [--rounds 3] [--workers 0]
        [--fp32-runtime onnxruntime|reference] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_loop(tflite: Path, x_nchw, layout: str, fp32_model=None) -> float:
    """Seconds for the plain loop over ``x_nchw`` (int8 model, optionally FP32 too)."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.inputs import models
    from pipeline.quiet import captured
    with captured(verbose=False):
        it = Interpreter(model_path=str(tflite))
        it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    scale, zp = inp["quantization"]
    integer = np.issubdtype(inp["dtype"], np.integer)
    t0 = time.perf_counter()
    for i in range(len(x_nchw)):
        x = x_nchw[i:i + 1]
        if layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        if integer:
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale) + zp, info.min, info.max).astype(inp["dtype"])
        it.set_tensor(inp["index"], np.ascontiguousarray(x))
        it.invoke()
        it.get_tensor(out["index"])
        if fp32_model is not None:
            models.run_fp32(fp32_model, x_nchw[i:i + 1], batch_size=1)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", help="an export folder (report.json + the .tflite model)")
    p.add_argument("--images", type=int, default=4000, help="test images per peer and round (default 4000)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="engine worker processes (default: one per core)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--fp32-runtime", choices=("onnxruntime", "reference"),
                   help="FP32 side of both FP32 peers (default: what the export's report used)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    import numpy as np

    from pipeline import quiet
    quiet.configure(False)
    import torch

    from pipeline.inputs import data as data_mod
    from pipeline.inputs import models
    from pipeline.inputs import preprocessing
    from pipeline.reliability.engine import BLOCK, Engine, Job, ModelPair, default_workers
    from pipeline.runtime.litert import TfliteRunner, host_description

    export_dir = Path(args.export_dir)
    rep = json.loads((export_dir / "report.json").read_text())
    cfg = rep["config"]
    pre = preprocessing.Preprocessing.from_dict(rep["preprocessing"])
    tflite = export_dir / rep["artifacts"]["tflite"]["path"]
    layout = rep["preprocessing"].get("tflite_input_layout", "NHWC")
    kernels = rep["target"].get("litert_kernels") or rep["target"]["kernels"]
    ds = data_mod.load(cfg.get("data") or "fashion-mnist", cfg.get("data_dir"), pre.input_shape)
    n = min(args.images, len(ds.x_test))
    raw = np.ascontiguousarray(ds.x_test[:n])
    x = preprocessing.apply(raw, pre)
    onnx_file = export_dir / rep.get("artifacts", {}).get("onnx", {}).get("path", "model.onnx")
    fp32_runtime = args.fp32_runtime or (
        "onnxruntime" if str(rep.get("runtime", {}).get("fp32", {}).get("runtime", "")).startswith("onnxruntime")
        and onnx_file.is_file() else "reference")
    if fp32_runtime == "onnxruntime" and not onnx_file.is_file():
        print(f"error: --fp32-runtime onnxruntime needs the export's {onnx_file.name}; re-run the export",
              file=sys.stderr)
        return 2
    fp32_onnx = str(onnx_file.resolve()) if fp32_runtime == "onnxruntime" else None
    if fp32_onnx:  # the plain loop's FP32 model: the same ONNX file on a 1-thread onnxruntime session
        import onnxruntime as ort
        model = models.onnx_reference(Path(fp32_onnx))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        model.extra["_session"] = ort.InferenceSession(fp32_onnx, so, providers=["CPUExecutionProvider"])
    else:
        model = models.load(rep["model"]["spec"], cfg.get("weights"))
    workers = args.workers or default_workers()
    pair = ModelPair(model_spec=rep["model"]["spec"], weights=cfg.get("weights"), tflite_path=str(tflite.resolve()),
                     input_layout=layout, kernels=kernels, preprocessing=pre, batch_size=args.batch_size,
                     fp32_onnx=fp32_onnx)

    # Both peers must compute the same int8 outputs: check on the first images before timing anything.
    ref = TfliteRunner(tflite, kernels=kernels, threads=1, batch_size=args.batch_size, input_layout=layout).run(x[:256])

    jobs_int8 = [Job("test", s, min(s + BLOCK, n), fp32=False) for s in range(0, n, BLOCK)]
    jobs_both = [Job("test", s, min(s + BLOCK, n)) for s in range(0, n, BLOCK)]
    times: dict[str, list[float]] = {"plain int8 loop": [], "plain FP32 + int8 loop": [], "engine int8": [],
                                     "engine FP32 + int8": [], "batched single interpreter": []}
    # Where the plain loop's time goes: per-image compute (the batched single-interpreter rate, timed in the
    # same rounds) vs the per-invoke overhead batching removes. The engine cannot beat cores x (plain / batched).
    one = TfliteRunner(tflite, kernels=kernels, threads=1, batch_size=args.batch_size, input_layout=layout)
    one.run(x[:args.batch_size])
    torch.set_num_threads(1)  # the plain loop: one image at a time on one thread, as such loops run
    with Engine(pair, {"test": raw}, workers=workers) as engine:
        warm = engine.run(jobs_int8[:max(1, workers)])  # start the workers (not timed)
        got = warm[("test", None, 0)]["int8_raw"][:256]
        if not np.array_equal(got, ref.raw_outputs[:len(got)]):
            print("error: the engine's int8 outputs differ from a plain interpreter's", file=sys.stderr)
            return 1
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
            times["plain int8 loop"].append(plain_loop(tflite, x, layout))
            t0 = time.perf_counter()
            engine.run(jobs_int8)
            times["engine int8"].append(time.perf_counter() - t0)
            times["plain FP32 + int8 loop"].append(plain_loop(tflite, x[: n // 4], layout, fp32_model=model) * 4)
            t0 = time.perf_counter()
            engine.run(jobs_both)
            times["engine FP32 + int8"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            one.run(x)
            times["batched single interpreter"].append(time.perf_counter() - t0)
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    batched_1 = ips.pop("batched single interpreter")
    ratios = {
        "engine int8 / plain int8 loop": ips["engine int8"] / ips["plain int8 loop"],
        "engine FP32 + int8 / plain FP32 + int8 loop": ips["engine FP32 + int8"] / ips["plain FP32 + int8 loop"],
        "engine FP32 + int8 / plain int8 loop": ips["engine FP32 + int8"] / ips["plain int8 loop"],
    }
    ceiling = workers * batched_1 / ips["plain int8 loop"]
    batching_gain = batched_1 / ips["plain int8 loop"]
    cores_for_5x = int(np.ceil(5.0 / max(batching_gain, 1e-9)))
    print(f"model       {rep['model']['spec']} ({tflite.name}, LiteRT {kernels} kernels; FP32 on {pair.fp32_runtime})")
    print(f"host        {host_description()}; {workers} engine workers; {n} Fashion-MNIST test images per peer, "
          f"median of {args.rounds} alternating rounds")
    for k, v in ips.items():
        print(f"{k:<26} {v:9.0f} images/s")
    for k, v in ratios.items():
        print(f"{k:<44} {v:5.2f}x")
    print(f"batched single interpreter (1 thread)  {batched_1:9.0f} images/s -> per-invoke overhead is "
          f"{max(0.0, 1 - ips['plain int8 loop'] / batched_1):.0%} of the plain loop's time per image; "
          f"ceiling for the engine on {workers} cores: {ceiling:.2f}x the plain int8 loop")
    print(f"5x the plain int8 loop needs about {cores_for_5x} cores at this batching gain ({batching_gain:.2f}x per core)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "eval_throughput", "model": rep["model"]["spec"], "tflite": tflite.name, "kernels": kernels,
            "host": host_description(), "workers": workers, "images": n, "rounds": args.rounds,
            "images_per_s": ips, "ratios": ratios, "batched_single_interpreter_images_per_s": batched_1,
            "engine_ceiling_vs_plain_int8": ceiling, "batching_gain_per_core": batching_gain,
            "cores_for_5x": cores_for_5x, "fp32_runtime": pair.fp32_runtime, "seconds": times,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
