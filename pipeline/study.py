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
from pipeline.execution import add_execution_arguments
from pipeline.errors import UsageError
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


STUDY_FIELDS = ("model", "weights", "data", "data_dir", "calib", "calib_size", "eval_limit")
FILE_ROLES = ("model", "weights", "data", "calib")  # config fields that may name a file: shipped by content hash


def model_slug(spec: str) -> str:
    """The folder of a model in a several-model study: zoo:refcnn -> refcnn, path/net.onnx -> net."""
    if spec.startswith("zoo:"):
        name = spec[4:]
    elif spec.lower().endswith((".onnx", ".pt", ".pth", ".ptl", ".torchscript")):
        name = Path(spec).stem
    else:  # package.module:factory
        name = spec.replace(":", "-")
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name) or "model"


def precision_cell(config: dict, files: dict, seed: int) -> dict:
    """One rung of one model: export ``config`` (its files as shipped to this worker) and return the row's figures.

    A study cell (pipeline/execution): pure, its record depends on the config, the files and the seed only."""
    import numpy as np
    from pipeline import targets
    cfg = ExportConfig(**{**config, **files}, seed=seed, overwrite=True, verbose=False)
    t = targets.get_target(cfg.target)
    status, folder, report = export(cfg, log=lambda *a, **k: None)
    r = report.to_dict()
    z = np.load(folder / "predictions.npz", allow_pickle=False)
    labels, fp32 = z["labels"], z["fp32_logits"]
    logits = z[f"{t.precision}_logits"]
    lat = r["runtime"]["latency"]["kernels"]
    acc = r["accuracy"]
    return {
        "evaluated": int(labels.shape[0]),
        # the size used (--calib-size not given: 500 or all a smaller source holds)
        "calibration": {"source": config["calib"], "size": r["calibration"]["size"], "seed": seed},
        "fp32_reference": {"top1": float(np.mean(fp32.argmax(1) == labels)), "ece": ece_of(fp32, labels),
                           "runtime": r["model"]["fp32_reference"]},
        "row": {
            "target": cfg.target, "precision": t.precision, "status": status,
            "failed_gates": [k for k, g in r["gates"].items() if not g["passed"]],
            "bytes": r["artifacts"]["tflite"]["bytes"],
            "top1": acc["tflite_top1"], "drop_pp": acc["drop_pp"], "agreement": acc["agreement"],
            "flips": acc["flips"], "ece": ece_of(logits, labels),
            "latency_ms": {k: v["median_ms"] for k, v in lat.items()},
            "latency_label": {k: v["label"] for k, v in lat.items()},
            "xnnpack_applied": lat.get("xnnpack", {}).get("xnnpack_applied"),
            "threads": t.threads, "kernels": t.kernels,
            "weights": r["quantization"]["precision"]["weights"],
            "folder": str(folder),
        },
    }


def precision_cells(bases: list[ExportConfig], out: Path, names: list[str], nested: bool) -> list:
    """One cell per model x rung, models outermost; ``nested``: each model's exports in ``out/<model>/``."""
    from pipeline.execution import Cell
    cells = []
    for base in bases:
        folder = out / model_slug(base.model) if nested else out
        for name in names:
            config = {k: getattr(base, k) for k in STUDY_FIELDS}
            config.update(target=name, out=str(folder / name))
            files = tuple((role, config[role]) for role in FILE_ROLES
                          if isinstance(config[role], str) and Path(config[role]).is_file())
            cells.append(Cell(key=f"{base.model}/{name}", fn=precision_cell, config=config, seed=base.seed,
                              files=files))
    return cells


def precision_ladder(base: ExportConfig, out: Path, names: list[str] | None = None, log=print,
                     models: list[str] | None = None, execution=None, resume: bool = False,
                     progress: bool = True) -> dict:
    """Export ``base`` (or each of ``models``) once per ladder target; return the study record.

    One model: its exports in ``out/<target>``; several (``models``): in ``out/<model>/<target>``. Every export is
    an independent cell (pipeline/execution) run by ``execution`` (an ``ExecutionOptions``; default: one at a time
    in this process); the study assembled from the cells' records does not depend on how they ran."""
    from pipeline import targets
    from pipeline.execution import ExecutionOptions, Store, make_backend, run_cells
    from pipeline.runtime.litert import host_description
    names = names or ladder_targets()
    execution = execution or ExecutionOptions()
    bases = [replace(base, model=m, weights=None) for m in models] if models else [base]
    cells = precision_cells(bases, out, names, nested=bool(models))
    backend = make_backend(execution)
    log(f"{len(cells)} exports ({len(bases)} model(s) x {len(names)} precision(s)) on {execution.describe()}",
        file=sys.stderr)
    t0 = time.perf_counter()
    records = run_cells(cells, backend, store=Store(out / "cells"), resume=resume, retries=execution.retries,
                        progress=progress)
    wall = time.perf_counter() - t0
    studies = []
    for base in bases:
        mine = [(c, r) for c, r in zip(cells, records) if c.key.startswith(f"{base.model}/")]
        done = [r["result"] for _, r in mine if r["status"] == "done"]
        failures = [{"target": c.config["target"], "precision": targets.get_target(c.config["target"]).precision,
                     "error": r["error"]} for c, r in mine if r["status"] != "done"]
        studies.append({
            "model": base.model,
            "evaluated": done[0]["evaluated"] if done else 0,
            "calibration": done[0]["calibration"] if done else
            {"source": base.calib, "size": base.calib_size, "seed": base.seed},
            "fp32_reference": done[0]["fp32_reference"] if done else None,
            "rows": [d["row"] for d in done], "failures": failures,
        })
    info = backend.describe()
    return {
        "kind": "study.precision", "schema_version": "2.0", "data": base.data, "models": studies,
        "definitions": {
            "agreement": "share of test images whose top-1 equals the FP32 reference's on the same inputs",
            "ece": ECE_DEFINITION,
            "latency": f"median of >= 50 timed batch-1 invoke() calls after warmup on {host_description()}; "
                       "LiteRT kernels and threads as named; host measurements, not device latency",
            "size": "bytes of the .tflite file",
        },
        # how the cells ran: none of the figures above depend on it (latency aside, which is a measurement)
        "execution": {
            **info, "cells_at_once": backend.slots, "wall_seconds": round(wall, 1), "retries": execution.retries,
            "cells": [{k: r.get(k) for k in ("key", "status", "attempts", "seconds", "cpu_seconds", "wall_seconds",
                                             "host", "pid", "resumed", "lost")} for r in records],
        },
    }


def render_model(study: dict, m: dict) -> list[str]:
    """One model's ladder as a Markdown table."""
    fp = m["fp32_reference"] or {}
    cal = m["calibration"]
    lines = [
        f"Precision ladder: {m['model']} on {study['data']} test ({m['evaluated']:,} images), "
        f"calibration {cal['source']} x{cal['size']} (seed {cal['seed']})",
        "",
        "| precision | target | size (KiB) | top-1 | drop vs FP32 (pp) | agreement with FP32 | flips | ECE "
        "| host latency, target kernels (ms) | host latency, reference kernels (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if fp:
        lines.append(f"| FP32 reference ({fp['runtime']}) | - | - | {fp['top1']:.2%} | - | - | - | {fp['ece']:.4f} | - | - |")
    for r in m["rows"]:
        lat = r["latency_ms"]
        own = next((k for k in lat if k != "ref"), "ref")
        note = "" if own != "xnnpack" or r["xnnpack_applied"] else " (XNNPACK took no node)"
        gate = "" if not r["failed_gates"] else f" (fails {', '.join(r['failed_gates'])})"
        lines.append(
            f"| {r['precision']}{gate} | {r['target']} | {r['bytes'] / 1024:.1f} | {r['top1']:.2%} | {r['drop_pp']:+.2f} "
            f"| {r['agreement']:.2%} | {r['flips']} | {r['ece']:.4f} | {lat[own]:.3f} ({own}, {r['threads']} thr){note} "
            f"| {lat.get('ref', float('nan')):.3f} |")
    for f in m["failures"]:
        lines.append(f"| {f['precision']} | {f['target']} | export failed: {f['error']} | | | | | | | |")
    return lines


def study_figures(out: Path) -> dict:
    """A precision study's figures: its study.json without how it ran (execution), the latency measurements and
    the folder prefix, which is what must not depend on the backend or the number of workers."""
    s = json.loads((Path(out) / "study.json").read_text())
    s.pop("execution")
    for m in s["models"]:
        for row in m["rows"]:
            row.pop("latency_ms")
            row["folder"] = str(Path(row["folder"]).relative_to(out))
    return s


def html_sections(study: dict) -> list:
    """The same tables and footer as ``render``, as sections of study.html (pipeline.studies.html)."""
    from pipeline.studies import Section
    out = []
    for m in study["models"]:
        lines = render_model(study, m)
        table = [ln for ln in lines if ln.startswith("|")]
        cells = [tuple(c.strip() for c in ln.strip().strip("|").split(" | ")) for ln in table]
        out.append(Section(title=m["model"], intro=lines[0], header=cells[0], rows=tuple(cells[2:])))
    out.append(Section("Definitions", notes=tuple(ln[2:] for ln in render(study).splitlines() if ln.startswith("- "))))
    return out


def render(study: dict) -> str:
    """Each model's ladder as one Markdown table, then one footer."""
    lines = []
    for m in study["models"]:
        lines += render_model(study, m) + [""]
    d, ex = study["definitions"], study["execution"]
    lines += [f"- agreement: {d['agreement']}.", f"- ECE: {d['ece']}.", f"- latency: {d['latency']}.",
              f"- size: {d['size']}."]
    if any("oversubscribed" in lab for m in study["models"] for r in m["rows"] for lab in r["latency_label"].values()):
        lines.append(f"- this host has {os.cpu_count()} logical cores: runs with more threads than cores are "
                     "oversubscribed, so thread counts above that do not speed anything up here.")
    if ex["cells_at_once"] > 1:
        lines.append(f"- {ex['cells_at_once']} exports ran at once ({ex['where']}): each latency was measured while "
                     "the others ran, so it is contended; run with --workers 1 (without --ray) for latency. The "
                     "other figures do not depend on this.")
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
    which = q.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help=f"as for pipeline.export (default {DEFAULT_MODEL}); its exports "
                                                     "go to OUT/<target>")
    which.add_argument("--models", help="several models, comma-separated (zoo:NAME, .onnx or .pt files), or 'all' "
                                        "for every zoo model; each model's exports go to OUT/<model>/<target>")
    q.add_argument("--weights", help="state_dict file for a factory --model")
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
    q.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output with --ray")
    add_execution_arguments(q)
    for module in study_modules():
        r = sub.add_parser(module.NAME, help=module.HELP)
        r.add_argument("--models", default="all", help="comma-separated zoo:NAME models, or all (default)")
        r.add_argument("--out", default=f"study-{module.NAME}",
                       help=f"output folder (default study-{module.NAME}), as for precision")
        r.add_argument("--overwrite", action="store_true", help="replace an earlier study in --out")
        r.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output with --ray")
        module.add_arguments(r)
        add_execution_arguments(r)
    return p


def study_modules() -> list:
    """The studies of pipeline/studies: every module there that defines ``NAME`` (imported when the parser is
    built, so their top level stays light), in name order."""
    import importlib
    import pkgutil
    from pipeline import studies
    mods = [importlib.import_module(f"pipeline.studies.{m.name}") for m in pkgutil.iter_modules(studies.__path__)
            if not m.name.startswith("_")]
    return sorted((m for m in mods if hasattr(m, "NAME")), key=lambda m: m.NAME)


def parse_models(text: str) -> list[str]:
    from pipeline import zoo
    if text.strip() == "all":
        return [f"zoo:{n}" for n in zoo.list_models()]
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise UsageError("--models is empty; pass model specs separated by commas, or all")
    if len(set(models)) != len(models):
        raise UsageError(f"--models names {next(m for m in models if models.count(m) > 1)} twice; name each once")
    slugs = [model_slug(m) for m in models]
    if len(set(slugs)) != len(slugs):
        dup = next(x for x in slugs if slugs.count(x) > 1)
        raise UsageError(f"two of --models would share the folder {dup!r}; rename one of the files")
    return models


def check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """A study's --out: new or empty; an earlier study replaced only with --overwrite; a stopped one continued with
    --resume; anything else refused (nothing of the user's is replaced)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; pass a folder path")
    if not (out.is_dir() and any(out.iterdir())):
        if resume:
            raise UsageError(f"--resume: --out {out} holds no study to continue; drop --resume to start one")
        return
    ours = (out / "study.json").is_file() or (out / "cells").is_dir()
    if not ours:
        raise UsageError(f"--out {out} is a non-empty folder that holds no study (no study.json); pass a new "
                         "or empty folder: nothing of yours is replaced")
    if not (overwrite or resume):
        raise UsageError(f"--out {out} holds an earlier study; pass --resume to continue it (cells already done "
                         "are kept), --overwrite to replace it, or another --out")


def main(argv: list[str] | None = None) -> int:
    def work():
        args = build_parser().parse_args(argv)
        if args.study != "precision":
            from pipeline.studies import run_study
            module = next(m for m in study_modules() if m.NAME == args.study)
            return run_study(module, args)
        from pipeline import targets
        from pipeline.execution import execution_options
        names = [s.strip() for s in args.targets.split(",")] if args.targets else None
        for n in names or []:
            targets.get_target(n)  # unknown names fail here, with a suggestion
        if names is not None and not names:
            raise UsageError("--targets is empty; pass target names separated by commas")
        if names is not None and len(set(names)) != len(names):
            raise UsageError("--targets names a target twice; name each once")
        models = parse_models(args.models) if args.models is not None else None
        if models and args.weights:
            raise UsageError("--weights applies to one --model, not to --models; pass .pt/.onnx files or zoo names")
        if args.resume and args.overwrite:
            raise UsageError("--resume keeps the cells already done and --overwrite replaces them; pass one")
        execution = execution_options(args)
        out = Path(args.out)
        check_out(out, args.overwrite, args.resume)
        if args.calib_size is not None and args.calib_size <= 0:
            raise UsageError(f"--calib-size {args.calib_size} gives an empty representative dataset; pass at least 1 "
                             "(100-500 recommended), or leave it out for 500")
        base = ExportConfig(model=args.model or DEFAULT_MODEL, weights=args.weights, data=args.data,
                            data_dir=args.data_dir, calib=args.calib, calib_size=args.calib_size, seed=args.seed,
                            eval_limit=args.eval_limit)
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite and (out / "cells").is_dir():
            import shutil
            shutil.rmtree(out / "cells")  # the earlier study's records: replaced as a whole, like its exports
        study = precision_ladder(base, out, names, models=models, execution=execution, resume=args.resume)
        return out, study

    def show(result) -> int:
        if not isinstance(result, tuple):  # a study of pipeline/studies
            from pipeline.studies import markdown
            print(markdown(result.study.get("title", result.study["kind"]), result.sections))
            print(f"files      {result.out}/ (study.json, study.md, study.html, cells/)")
            failed = [c for c in result.study["execution"]["cells"] if c["status"] != "done"]
            return 1 if failed else 0
        out, study = result
        table = render(study)
        _write(out / "study.json", json.dumps(study, indent=2) + "\n")
        _write(out / "study.md", table + "\n")
        from pipeline.studies import html
        _write(out / "study.html", html("Precision ladder", html_sections(study)))
        print(table)
        print(f"\nfiles      {out}/ (study.json, study.md, study.html, one export folder per target, cells/)")
        ok = all(m["rows"] and not m["failures"] for m in study["models"])
        return 0 if ok else 1

    return run_main(work, then=show, interrupted_note="; cells already done are kept in OUT/cells: run the same "
                                                      "command with --resume to continue")


if __name__ == "__main__":
    raise SystemExit(main())
