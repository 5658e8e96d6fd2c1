"""What the choice of representative dataset costs: int8 top-1, drop vs FP32 and agreement per source and size.

For every zoo model with shipped weights (or the ``--models`` given), exports with each calibration
source at each size through the pipeline itself (``pipeline.export.export`` with an ``ExportConfig``):
the int8 model runs on LiteRT kernels over the whole test split and is compared with the FP32 model on
the same inputs. "build s" is the time to build the representative dataset in that export (measured
here, with an empty cache so generated sets are really generated); "build/convert" puts it against the
int8 conversion of the same export.

    python benchmarks/calibration_sources.py [--models zoo:refcnn] [--sizes 10,100,500,2000]
        [--sources balanced,real,first,fractal,noise,shifted:gaussian_noise:3,shifted:contrast:3]
        [--seeds 0] [--eval-limit N] [--weights STATE_DICT] [--json calibration_sources.json]

The synthetic-calibration check is printed at the end: fractal at 500 images within 1.0 pp of
balanced real data at 500 images (int8 top-1, same seed).
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

DEFAULT_SOURCES = ("balanced", "real", "first", "fractal", "noise:gaussian", "noise:uniform",
                   "shifted:gaussian_noise:3", "shifted:contrast:3")
DEFAULT_SIZES = (10, 100, 500, 2000)
BOUND_PP = 1.0


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def zoo_models_with_weights() -> list[str]:
    from pipeline import zoo
    return [f"zoo:{n}" for n in zoo.list_models() if zoo.get_entry(n).weights_path.is_file()]


def run_one(model: str, source: str, size: int, seed: int, eval_limit: int | None, work: Path,
            weights: str | None = None) -> dict:
    from pipeline.export import ExportConfig, export
    cache = Path(tempfile.mkdtemp(prefix="calib-cache-", dir=work))  # empty: generated sets are generated
    out = work / "out"
    t0 = time.perf_counter()
    try:
        status, _, rep = export(ExportConfig(model=model, weights=weights, calib=source, calib_size=size, seed=seed,
                                             calib_cache=str(cache), eval_limit=eval_limit, out=str(out)),
                                log=lambda *a, **k: None)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    a, c = rep.accuracy, rep.calibration
    return {
        "model": model, "source": source, "size": size, "seed": seed,
        "fp32_top1": a["fp32_top1"], "int8_top1": a["int8_top1"], "drop_pp": a["drop_pp"],
        "agreement": a["agreement"], "flips": a["flips"], "evaluated": a["n"],
        "build_s": c["build_s"], "convert_s": rep.timings_s.get("convert"),
        "input_quantization": rep.quantization["inputs"][0] if rep.quantization.get("inputs") else None,
        "calibration_statistics": c["statistics"], "origin": c["origin"],
        "gates_passed": rep.passed, "export_s": round(time.perf_counter() - t0, 2),
    }


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def print_table(model: str, rows: list[dict], seeds: list[int]) -> None:
    fp32 = rows[0]["fp32_top1"]
    n = rows[0]["evaluated"]
    print(f"\n{model}: FP32 top-1 {fp32 * 100:.2f}% on {n} test images; int8 on LiteRT (target tflite-int8); "
          f"seeds {','.join(map(str, seeds))}" + (" (mean over seeds)" if len(seeds) > 1 else ""))
    head = f"{'source':<26} {'size':>5} {'int8 top-1':>10} {'drop pp':>8} {'agreement':>9} {'build s':>8} {'build/convert':>13}"
    print(head)
    print("-" * len(head))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["size"]), []).append(r)
    for (src, size), g in groups.items():
        ratio = _mean(g, "build_s") / _mean(g, "convert_s") if _mean(g, "convert_s") else float("nan")
        print(f"{src:<26} {size:>5} {_mean(g, 'int8_top1') * 100:>9.2f}% {_mean(g, 'drop_pp'):>+8.2f} "
              f"{_mean(g, 'agreement') * 100:>8.2f}% {_mean(g, 'build_s'):>8.2f} {ratio:>12.3f}x")


def done_when(rows: list[dict]) -> list[dict]:
    checks = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {(r["source"], r["size"], r["seed"]): r for r in rows if r["model"] == model}
        for seed in dict.fromkeys(r["seed"] for r in rows):
            f, b = by.get(("fractal", 500, seed)), by.get(("balanced", 500, seed))
            if f and b:
                gap = round((b["int8_top1"] - f["int8_top1"]) * 100, 4)
                checks.append({"model": model, "seed": seed, "balanced_500_int8_top1": b["int8_top1"],
                               "fractal_500_int8_top1": f["int8_top1"], "gap_pp": gap, "bound_pp": BOUND_PP,
                               "passed": gap <= BOUND_PP})
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated model specs (default: every zoo model with shipped weights)")
    p.add_argument("--weights", help="state_dict for the one model in --models (instead of its shipped weights)")
    p.add_argument("--sources", default=",".join(DEFAULT_SOURCES))
    p.add_argument("--sizes", type=_ints, default=list(DEFAULT_SIZES))
    p.add_argument("--seeds", type=_ints, default=[0])
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N test images only (default: all)")
    p.add_argument("--json", help="write the figures here (a benchmark report)")
    args = p.parse_args(argv)

    from pipeline import quiet
    quiet.configure(False)
    from pipeline.errors import PipelineError
    from pipeline.report import Report
    from pipeline.runtime.litert import host_description

    models = args.models.split(",") if args.models else zoo_models_with_weights()
    if not models:
        print("error: no zoo model has shipped weights; train one (python -m pipeline.train zoo:refcnn) "
              "or pass --models", file=sys.stderr)
        return 2
    if args.weights and len(models) != 1:
        print("error: --weights needs exactly one model in --models", file=sys.stderr)
        return 2
    sources = [s for s in args.sources.split(",") if s]
    jobs = [(m, s, n, seed) for m in models for s in sources for n in args.sizes for seed in args.seeds]
    print(f"{len(jobs)} exports: {len(models)} model(s) x {len(sources)} sources x {len(args.sizes)} sizes x "
          f"{len(args.seeds)} seed(s); measured on {host_description()}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-calib-"))
    rows, errors = [], []
    try:
        for i, (m, s, n, seed) in enumerate(jobs, 1):
            try:
                r = run_one(m, s, n, seed, args.eval_limit, work, args.weights)
            except PipelineError as e:
                errors.append({"model": m, "source": s, "size": n, "seed": seed, "error": str(e)})
                print(f"[{i}/{len(jobs)}] {m} {s} {n} seed {seed}: error: {e}", file=sys.stderr)
                continue
            rows.append(r)
            print(f"[{i}/{len(jobs)}] {m} {s:<24} {n:>5} seed {seed}: int8 {r['int8_top1'] * 100:.2f}% "
                  f"drop {r['drop_pp']:+.2f} pp  build {r['build_s']:.2f}s  ({r['export_s']:.0f}s)", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"Calibration sources, measured on {host_description()}; build s = time to build the representative "
          "dataset (empty cache); build/convert = that time over the int8 conversion of the same export")
    for m in models:
        mr = [r for r in rows if r["model"] == m]
        if mr:
            print_table(m, mr, args.seeds)
    checks = done_when(rows)
    for c in checks:
        print(f"\n{c['model']} seed {c['seed']}: fractal@500 {c['fractal_500_int8_top1'] * 100:.2f}% vs balanced@500 "
              f"{c['balanced_500_int8_top1'] * 100:.2f}%: gap {c['gap_pp']:+.2f} pp (bound {BOUND_PP} pp) -> "
              f"{'PASS' if c['passed'] else 'FAIL'}")
    for e in errors:
        print(f"not measured: {e['model']} {e['source']} {e['size']}: {e['error']}")
    if args.json:
        Report(kind="benchmark", model={"specs": models}, runtime={"measured_on": host_description()},
               sections={"calibration_sources": {
                   "method": "pipeline.export.export per (model, source, size, seed); int8 on LiteRT kernels of the "
                             "tflite-int8 target over the test split; build_s with an empty calibration cache",
                   "rows": rows, "errors": errors, "done_when": checks}}).write_json(Path(args.json))
    return 0 if not errors and all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
