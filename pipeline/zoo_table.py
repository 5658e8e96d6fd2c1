"""``python -m pipeline.zoo_table``: export every zoo model and print the zoo table.

Each model goes through :func:`pipeline.export.export` exactly as ``python -m pipeline.export
--model zoo:NAME --target TARGET`` runs it (same defaults: 500 class-balanced calibration
images, seed 0, the whole test split), and the table is read from the reports:
parameters, FP32 top-1, int8 top-1, drop, agreement, int8 size, fully_int8 and the verdict.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import OutputError, UsageError

COLUMNS = ("model", "parameters", "FP32 top-1", "int8 top-1", "drop (pp)", "agreement", "int8 size", "fully int8",
           "gates")


def row_from_report(name: str, report) -> dict:
    a, q = report.accuracy, report.quantization
    return {
        "model": name,
        "parameters": report.model.get("parameters"),
        "fp32_top1": a["fp32_top1"],
        "int8_top1": a["int8_top1"],
        "drop_pp": a["drop_pp"],
        "agreement": a["agreement"],
        "int8_bytes": report.artifacts["tflite"]["bytes"],
        "fully_int8": bool(q["fully_int8"]),
        "passed": bool(report.passed),
        "failed_gates": report.failed(),
        "images": a["n"],
        "evaluated_on": a["evaluated_on"],
        "max_error_steps": a.get("max_error_steps"),
        "onnx_max_abs_error_vs_pytorch": report.onnx.get("max_abs_error_vs_pytorch"),
        "export_seconds": report.timings_s.get("total"),
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 3) + [":---:"] * 2) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            f"`zoo:{r['model']}`", f"{r['parameters']:,}", f"{r['fp32_top1'] * 100:.2f}%", f"{r['int8_top1'] * 100:.2f}%",
            f"{r['drop_pp']:+.2f}", f"{r['agreement'] * 100:.2f}%", f"{r['int8_bytes'] / 1024:.1f} KiB",
            "yes" if r["fully_int8"] else "**no**",
            "pass" if r["passed"] else "**fail** (" + ", ".join(r["failed_gates"]) + ")",
        ]) + " |")
    return "\n".join(lines)


def provenance(rows: list[dict], target) -> str:
    import ai_edge_litert
    from pipeline.export import ExportConfig
    import onnx2tf
    import tensorflow as tf
    import torch
    from pipeline.runtime.litert import host_description
    # The per-model part of evaluated_on ("(matches PyTorch within ...)") belongs to each row, not the table.
    evaluated = rows[0]["evaluated_on"].split(" (matches PyTorch")[0] if rows else ""
    if any(r["evaluated_on"].startswith(evaluated) and "(matches PyTorch" in r["evaluated_on"] for r in rows):
        evaluated += " (the FP32 ONNX model was checked against PyTorch for each model; the figures are in --json)"
    from pipeline.calib_data import DEFAULT_SIZE
    cfg = ExportConfig()
    try:
        litert = ai_edge_litert.__version__
    except AttributeError:
        from importlib.metadata import version
        litert = version("ai-edge-litert")
    return (f"Measured by `python -m pipeline.zoo_table` on {host_description()}: {evaluated}. "
            f"Drop = FP32 top-1 minus int8 top-1; agreement = share of test images where int8 and FP32 "
            f"predict the same class. Target {target.name}; calibration: {cfg.calib_size or DEFAULT_SIZE} training images from "
            f"the '{cfg.calib}' source (seed {cfg.seed}); onnx2tf {onnx2tf.__version__} + TFLiteConverter (TensorFlow {tf.__version__}), "
            f"ai-edge-litert {litert}, torch {torch.__version__}. int8 size = the .tflite file.")


def build(models: list[str], target_name: str, out: Path | None, log=print) -> tuple[list[dict], str]:
    from pipeline import targets
    from pipeline.export import ExportConfig, export
    target = targets.get_target(target_name)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="zoo_table-")) if out is None else out
    try:
        for i, name in enumerate(models, 1):
            t0 = time.perf_counter()
            cfg = ExportConfig(model=f"zoo:{name}", target=target_name, out=str(work / f"{name}-{target_name}"))
            _, _, report = export(cfg, log=lambda *a, **k: None)
            rows.append(row_from_report(name, report))
            r = rows[-1]
            log(f"[{i}/{len(models)}] zoo:{name}: FP32 {r['fp32_top1']:.4f} int8 {r['int8_top1']:.4f} "
                f"agreement {r['agreement']:.4f} {'pass' if r['passed'] else 'FAIL'} ({time.perf_counter() - t0:.0f}s)",
                file=sys.stderr)
    finally:
        if out is None:
            shutil.rmtree(work, ignore_errors=True)
    return rows, provenance(rows, target)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import Parser
    p = Parser(prog="python -m pipeline.zoo_table",
               description="Export every zoo model and print the zoo table (Markdown).")
    p.add_argument("--models", help="comma-separated zoo names (default: all)")
    p.add_argument("--target", default="tflite-int8", help="target profile (default tflite-int8)")
    p.add_argument("--json", help="also write the rows and their provenance to this JSON file")
    p.add_argument("--out", help="keep each model's export folder under this folder (default: discard)")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline import zoo
    from pipeline.cli import run_main

    def work():
        args = build_parser().parse_args(argv)
        names = zoo.list_models()
        if args.models:
            wanted = [m.strip().removeprefix("zoo:") for m in args.models.split(",") if m.strip()]
            for m in wanted:
                zoo.get_entry(m)  # unknown names: ModelError with a suggestion
            names = wanted
        if not names:
            raise UsageError("--models names no model; pass zoo names separated by commas")
        out = Path(args.out) if args.out else None
        if out is not None:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create --out {out} ({e.strerror or e}); pass a writable folder") from None
        rows, note = build(names, args.target, out)
        if args.json:
            dst = Path(args.json)
            tmp = dst.with_name(dst.name + ".part")
            try:
                tmp.write_text(json.dumps({"kind": "zoo_table", "schema_version": "1.0", "target": args.target,
                                           "provenance": note, "rows": rows}, indent=2) + "\n")
                os.replace(tmp, dst)
            except OSError as e:
                raise OutputError(f"cannot write --json {dst} ({e.strerror or e}); pass a writable path") from None
        return rows, note

    def show(result) -> int:
        rows, note = result
        print(markdown(rows))
        print()
        print(note)
        return 0 if all(r["passed"] for r in rows) else 1

    return run_main(work, then=show)


if __name__ == "__main__":
    raise SystemExit(main())
