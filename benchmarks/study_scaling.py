"""Scaling of ``pipeline.study`` over its execution backends, measured in one run on this host.

Part 1, real cells: the same precision study (default: every zoo model at tflite-int8 on the first 2,000 test
images, so 6 exports) through ``python -m pipeline.study precision`` as a fresh process per configuration:

- the local backend with 1 worker (in the study's own process: the baseline) and with 2 worker processes;
- Ray (``--ray auto``: a local instance started by the run) with 1, 2 and 4 workers.

Each row: wall time of the whole command (start-up, Ray's start included), speed-up against the local 1-worker
run, and efficiency against the ceiling this host allows (min(workers, cores): on 2 cores, 4 workers cannot beat
2x; and an export that already keeps more than one core busy, converting and evaluating, lowers that ceiling to
cores / the cores one export keeps busy, measured in the 1-worker run). Every run's study.json figures are compared with the baseline's (latency and execution details aside):
the script says whether they are identical.

Part 2, overhead: ``--probe-cells`` CPU-bound probe cells (``pipeline.execution.probes.compute_cell`` busy for
``--probe-seconds`` each) on the local pool and on Ray at the same worker count, in this process: the per-cell
overhead of Ray against the local pool is (wall_ray - wall_local) / cells * workers.

    python benchmarks/study_scaling.py [--models all] [--targets tflite-int8] [--eval-limit 2000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.study import study_figures as _figures  # noqa: E402

CONFIGS = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2), ("ray", 4)]




def run_study(args, backend: str, workers: int, work: Path) -> dict:
    out = work / f"{backend}-{workers}"
    cmd = [sys.executable, "-m", "pipeline.study", "precision", "--models", args.models, "--targets", args.targets,
           "--eval-limit", str(args.eval_limit), "--out", str(out), "--workers", str(workers)]
    if backend == "ray":
        cmd += ["--ray", "auto"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1) or not (out / "study.json").is_file():
        raise SystemExit(f"{backend} x{workers} failed: {proc.stderr[-2000:]}")
    ex = json.loads((out / "study.json").read_text())["execution"]
    cell_s = sum(c["seconds"] or 0 for c in ex["cells"])
    cpu_s = sum(c["cpu_seconds"] or 0 for c in ex["cells"])
    return {"backend": backend, "workers": workers, "wall_s": round(wall, 1), "cells": len(ex["cells"]),
            "cell_s_sum": round(cell_s, 1), "cell_cpu_s_sum": round(cpu_s, 1),
            "cores_busy_per_cell": round(cpu_s / cell_s, 2) if cell_s else None, "out": out}


def probe_overhead(cells: int, seconds: float, workers: int) -> dict:
    from pipeline.execution import Cell, run_cells
    from pipeline.execution.local import LocalBackend
    from pipeline.execution.probes import compute_cell
    from pipeline.execution.ray_backend import RayBackend
    batch = [Cell(f"p{i}", compute_cell, {"n": 64, "busy_seconds": seconds}, seed=i) for i in range(cells)]
    out = {}
    for name, backend in (("local", LocalBackend(workers)), ("ray", RayBackend("auto", workers))):
        t0 = time.perf_counter()
        records = run_cells(batch, backend, progress=False)
        out[name] = time.perf_counter() - t0
        assert all(r["status"] == "done" for r in records)
    ideal = cells * seconds / workers
    return {"cells": cells, "busy_s": seconds, "workers": workers, "ideal_s": round(ideal, 2),
            "local_s": round(out["local"], 2), "ray_s": round(out["ray"], 2),
            "ray_overhead_per_cell_s": round((out["ray"] - out["local"]) / cells * workers, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="all")
    p.add_argument("--targets", default="tflite-int8")
    p.add_argument("--eval-limit", type=int, default=2000)
    p.add_argument("--probe-cells", type=int, default=40)
    p.add_argument("--probe-seconds", type=float, default=0.5)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    from pipeline.runtime.litert import host_description
    print(f"host: {host_description()}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="study-scaling-") as tmp:
        for backend, workers in CONFIGS:
            r = run_study(args, backend, workers, Path(tmp))
            rows.append(r)
            print(f"  {backend} x{workers}: {r['wall_s']} s", flush=True)
        base = rows[0]
        same = {f"{r['backend']} x{r['workers']}": _figures(r["out"]) == _figures(base["out"]) for r in rows[1:]}
        for r in rows:
            r.pop("out")
    probe = probe_overhead(args.probe_cells, args.probe_seconds, min(2, cores))
    print(f"\nStudy: precision, --models {args.models} --targets {args.targets} --eval-limit {args.eval_limit} "
          f"({base['cells']} exports); {cores} cores; wall time of the whole command, measured here\n")
    busy = base["cores_busy_per_cell"] or 1.0
    print(f"One export alone kept {busy:.2f} cores busy on average (CPU time of the cell and its conversion process "
          f"over its wall time, local x1), so {cores} cores allow about {max(1.0, cores / busy):.2f}x for exports; "
          f"the ceiling column is min(workers, cores / {busy:.2f}).\n")
    print("| backend | workers | wall (s) | speed-up vs local x1 | ceiling | efficiency vs ceiling |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ceiling = round(max(1.0, min(r["workers"], cores / busy)), 2)
        speedup = base["wall_s"] / r["wall_s"]
        r.update(speedup=round(speedup, 2), ceiling=ceiling, efficiency=round(speedup / ceiling, 2))
        print(f"| {r['backend']} | {r['workers']} | {r['wall_s']:.1f} | {speedup:.2f}x | {ceiling:.2f}x | "
              f"{speedup / ceiling:.0%} |")
    print("\nfigures identical to local x1 (study.json without latency and execution): "
          + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in same.items()))
    print(f"\nRay overhead against the local pool, {probe['cells']} probe cells of {probe['busy_s']} s CPU each, "
          f"{probe['workers']} workers: local {probe['local_s']} s, Ray {probe['ray_s']} s (ideal {probe['ideal_s']} s); "
          f"{probe['ray_overhead_per_cell_s'] * 1000:.0f} ms per cell (Ray's start-up included)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "identical": same, "probe": probe, "cores": cores,
                                               "host": host_description()}, indent=2) + "\n")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
