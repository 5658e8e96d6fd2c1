"""``python -m pipeline.study precision``: the precision ladder of one model.

Exports the same model at each rung of the ladder (the ``tflite-*`` format targets:
fp32, fp16, dynamic, int16x8, int8) with :func:`pipeline.export.export` - the whole
pipeline, nothing duplicated - and prints one table: model size, top-1, agreement with the
FP32 reference, ECE, and batch-1 host latency. Each export keeps its own folder and report
under ``--out``; the table is also written as ``study.json`` and ``study.md`` there.

Definitions (stated in the table's footer too):
- agreement: share of test images where the TFLite model's top-1 equals the FP32 reference's
  (PyTorch, or onnxruntime for an ONNX model) on the same preprocessed inputs;
- ECE: expected calibration error, top-label, 15 equal-width bins (pipeline.reliability.confidence);
- latency: median of >= 50 timed batch-1 invokes on this host's CPU with the target's kernels
  and threads, and on LiteRT's reference kernels; host measurements, not device latency.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipeline.cli import Parser, run_main, seed_int
from pipeline.errors import PipelineError, UsageError
from pipeline.export import DEFAULT_MODEL, ExportConfig, export

ECE_DEFINITION = "top-label ECE, 15 equal-width confidence bins on the softmax of the logits"


def ece_of(logits, labels) -> float:
    """The ladder's ECE; one function so the definition lives in pipeline.reliability.confidence."""
    from pipeline.reliability.confidence import ece, softmax
    return float(ece(softmax(logits), labels, n_bins=15))


def ladder_targets() -> list[str]:
    """The format targets, one per precision, in ladder order (widest first)."""
    from pipeline import targets
    by_precision = {}
    for name in targets.list_targets():
        t = targets.get_target(name)
        if name.startswith("tflite-") and t.runtime == "litert" and t.precision not in by_precision:
            by_precision[t.precision] = name
    return [by_precision[p] for p in targets.PRECISIONS if p in by_precision]


def precision_ladder(base: ExportConfig, out: Path, names: list[str] | None = None, log=print) -> dict:
    """Export ``base`` once per ladder target into ``out/<target>``; return the study record."""
    import numpy as np
    from pipeline import targets
    names = names or ladder_targets()
    rows, fp32_row, failures, calibration = [], None, [], None
    for i, name in enumerate(names, 1):
        t = targets.get_target(name)
        cfg = replace(base, target=name, out=str(out / name))
        log(f"[{i}/{len(names)}] {name} ({t.precision}) ...", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            status, folder, report = export(cfg, log=lambda *a, **k: None)
        except PipelineError as e:
            failures.append({"target": name, "precision": t.precision, "error": str(e)})
            log(f"      {name}: error: {e}", file=sys.stderr)
            continue
        r = report.to_dict()
        if calibration is None:  # the size used (--calib-size not given: 500 or all a smaller source holds)
            calibration = {"source": base.calib, "size": r["calibration"]["size"], "seed": base.seed}
        z = np.load(folder / "predictions.npz", allow_pickle=False)
        labels, fp32 = z["labels"], z["fp32_logits"]
        logits = z[f"{t.precision}_logits"]
        if fp32_row is None:
            fp32_row = {"top1": float(np.mean(fp32.argmax(1) == labels)), "ece": ece_of(fp32, labels),
                        "runtime": r["model"]["fp32_reference"]}
        lat = r["runtime"]["latency"]["kernels"]
        acc = r["accuracy"]
        rows.append({
            "target": name, "precision": t.precision, "status": status,
            "failed_gates": [k for k, g in r["gates"].items() if not g["passed"]],
            "bytes": r["artifacts"]["tflite"]["bytes"],
            "top1": acc["tflite_top1"], "drop_pp": acc["drop_pp"], "agreement": acc["agreement"],
            "flips": acc["flips"], "ece": ece_of(logits, labels),
            "latency_ms": {k: v["median_ms"] for k, v in lat.items()},
            "latency_label": {k: v["label"] for k, v in lat.items()},
            "xnnpack_applied": lat.get("xnnpack", {}).get("xnnpack_applied"),
            "threads": t.threads, "kernels": t.kernels,
            "weights": r["quantization"]["precision"]["weights"],
            "folder": str(folder), "seconds": round(time.perf_counter() - t0, 1),
        })
        log(f"      {name}: top-1 {acc['tflite_top1']:.2%}, agreement {acc['agreement']:.2%}, "
            f"{rows[-1]['bytes']:,} B", file=sys.stderr)
    first = rows[0] if rows else None
    n = int(np.load(Path(first["folder"]) / "predictions.npz", allow_pickle=False)["labels"].shape[0]) if first else 0
    from pipeline.runtime.litert import host_description
    return {
        "kind": "study.precision", "schema_version": "1.0",
        "model": base.model, "data": base.data, "evaluated": n,
        "calibration": calibration or {"source": base.calib, "size": base.calib_size, "seed": base.seed},
        "fp32_reference": fp32_row, "rows": rows, "failures": failures,
        "definitions": {
            "agreement": "share of test images whose top-1 equals the FP32 reference's on the same inputs",
            "ece": ECE_DEFINITION,
            "latency": f"median of >= 50 timed batch-1 invoke() calls after warmup on {host_description()}; "
                       "LiteRT kernels and threads as named; host measurements, not device latency",
            "size": "bytes of the .tflite file",
        },
    }


def render(study: dict) -> str:
    """The ladder as one Markdown table plus its footer."""
    fp = study["fp32_reference"] or {}
    lines = [
        f"Precision ladder: {study['model']} on {study['data']} test ({study['evaluated']:,} images), "
        f"calibration {study['calibration']['source']} x{study['calibration']['size']} (seed {study['calibration']['seed']})",
        "",
        "| precision | target | size (KiB) | top-1 | drop vs FP32 (pp) | agreement with FP32 | flips | ECE "
        "| host latency, target kernels (ms) | host latency, reference kernels (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if fp:
        lines.append(f"| FP32 reference ({fp['runtime']}) | - | - | {fp['top1']:.2%} | - | - | - | {fp['ece']:.4f} | - | - |")
    for r in study["rows"]:
        lat = r["latency_ms"]
        own = next((k for k in lat if k != "ref"), "ref")
        note = "" if own != "xnnpack" or r["xnnpack_applied"] else " (XNNPACK took no node)"
        gate = "" if not r["failed_gates"] else f" (fails {', '.join(r['failed_gates'])})"
        lines.append(
            f"| {r['precision']}{gate} | {r['target']} | {r['bytes'] / 1024:.1f} | {r['top1']:.2%} | {r['drop_pp']:+.2f} "
            f"| {r['agreement']:.2%} | {r['flips']} | {r['ece']:.4f} | {lat[own]:.3f} ({own}, {r['threads']} thr){note} "
            f"| {lat.get('ref', float('nan')):.3f} |")
    for f in study["failures"]:
        lines.append(f"| {f['precision']} | {f['target']} | export failed: {f['error']} | | | | | | | |")
    d = study["definitions"]
    lines += ["", f"- agreement: {d['agreement']}.", f"- ECE: {d['ece']}.", f"- latency: {d['latency']}.",
              f"- size: {d['size']}."]
    if any("oversubscribed" in lab for r in study["rows"] for lab in r["latency_label"].values()):
        lines.append(f"- this host has {os.cpu_count()} logical cores: runs with more threads than cores are "
                     "oversubscribed, so thread counts above that do not speed anything up here.")
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m pipeline.study",
               description="Studies over the export pipeline. 'precision': the same model at every rung of the "
                           "precision ladder (fp32, fp16, dynamic, int16x8, int8) in one table.")
    sub = p.add_subparsers(dest="study", required=True, metavar="STUDY", parser_class=Parser,
                           help="the study to run (python -m pipeline.study STUDY --help for its options)")
    q = sub.add_parser("precision", help="export at each precision and print one table")
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"as for pipeline.export (default {DEFAULT_MODEL})")
    q.add_argument("--weights", help="state_dict file for a factory model")
    q.add_argument("--data", default="fashion-mnist", help="fashion-mnist or path/to/data.npz")
    q.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    q.add_argument("--calib", default="balanced", help="representative dataset source, as for pipeline.export "
                                                      "(default balanced)")
    q.add_argument("--calib-size", type=int, default=None,
                   help="calibration samples (default 500, or all a folder, npz or training split holds when that "
                        "is fewer; given explicitly, a source holding fewer is an error)")
    q.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the calibration draw and generated sets, the same for every rung (default 0)")
    q.add_argument("--eval-limit", type=int, help="evaluate on the first N test images only (default: all)")
    q.add_argument("--targets", help="comma-separated targets (default: the ladder " + ",".join(ladder_targets()) + ")")
    q.add_argument("--out", default="study-precision", help="output folder (default study-precision): created when "
                                                            "new; an earlier study there is replaced only with "
                                                            "--overwrite; any other non-empty folder is refused")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier study in --out (each target's export "
                                                            "folder as a whole, as pipeline.export --overwrite)")
    q.add_argument("-v", "--verbose", action="store_true", help="show the tools' own output")
    return p


def main(argv: list[str] | None = None) -> int:
    def work():
        args = build_parser().parse_args(argv)
        from pipeline import targets
        names = [s.strip() for s in args.targets.split(",")] if args.targets else None
        for n in names or []:
            targets.get_target(n)  # unknown names fail here, with a suggestion
        if names is not None and not names:
            raise UsageError("--targets is empty; pass target names separated by commas")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder; pass a folder path")
        if out.is_dir() and any(out.iterdir()):
            if not (out / "study.json").is_file():
                raise UsageError(f"--out {out} is a non-empty folder that holds no study (no study.json); pass a new "
                                 "or empty folder: nothing of yours is replaced")
            if not args.overwrite:
                raise UsageError(f"--out {out} holds an earlier study; pass --overwrite to replace it, or another --out")
        if args.calib_size is not None and args.calib_size <= 0:
            raise UsageError(f"--calib-size {args.calib_size} gives an empty representative dataset; pass at least 1 "
                             "(100-500 recommended), or leave it out for 500")
        base = ExportConfig(model=args.model, weights=args.weights, data=args.data, data_dir=args.data_dir,
                            calib=args.calib, calib_size=args.calib_size, seed=args.seed, eval_limit=args.eval_limit,
                            verbose=args.verbose, overwrite=args.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        study = precision_ladder(base, out, names)
        return out, study

    def show(result) -> int:
        out, study = result
        table = render(study)
        _write(out / "study.json", json.dumps(study, indent=2) + "\n")
        _write(out / "study.md", table + "\n")
        print(table)
        print(f"\nfiles      {out}/ (study.json, study.md, one export folder per target)")
        return 0 if study["rows"] and not study["failures"] else 1

    return run_main(work, then=show)


if __name__ == "__main__":
    raise SystemExit(main())
