"""Studies of the zoo, one command per question (``python -m pipeline.study NAME``), on the execution layer.

A study is a module with five things (see :mod:`pipeline.studies.flips` for one):

- ``NAME`` and ``HELP``: the subcommand and its one-line help;
- ``add_arguments(parser)``: its own flags (the shared ones, ``--models``, ``--out``, ``--overwrite`` and the
  execution flags, are added here);
- ``cells(args, out) -> list[Cell]``: every model x setting as an independent cell (pipeline/execution), so the
  same study runs in this process, on local worker processes or on Ray, and resumes from ``OUT/cells``;
- ``assemble(args, cells, records) -> dict``: the study record written as ``study.json``; it holds ``paper``
  (the paper's published figures, where it has any, shown in a column beside ours) and ``differences`` (what
  differs from the paper's setting: data set, model size, toolchain), so nobody compares absolute numbers blindly;
- ``render(study) -> list[Section]``: the tables, figures (inline SVG) and notes of ``study.md`` and ``study.html``.

``run_study(module, args)`` does the rest, identically for every study: checks ``--out`` (new, or an earlier study
with ``--overwrite``, or a stopped one with ``--resume``), runs the cells, adds the ``execution`` section (backend,
per-cell timings) and writes the three files atomically.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Section:
    """One part of a study page: a heading, an optional Markdown table (header row + rows of cell strings), inline
    SVG figures (HTML only; the Markdown names them) and notes (one paragraph or bullet each)."""

    title: str
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    figures: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    intro: str = ""


def markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.intro:
            lines += [s.intro, ""]
        if s.header:
            lines.append("| " + " | ".join(s.header) + " |")
            lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(s.header))) + "|")
            lines += ["| " + " | ".join(r) + " |" for r in s.rows]
            lines.append("")
        if s.figures:
            lines += [f"({len(s.figures)} figure(s) in study.html)", ""]
        lines += [f"- {n}" for n in s.notes]
        if s.notes:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def html(title: str, sections: list[Section]) -> str:
    """A self-contained page (no scripts, no external resources); every text is escaped, the figures are the
    studies' own SVG strings."""
    from html import escape as e
    from pipeline.report.html import CSS
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head>"
           f"<body><main><h1>{e(title)}</h1>"]
    for s in sections:
        out.append(f"<h2>{e(s.title)}</h2>")
        if s.intro:
            out.append(f"<p>{e(s.intro)}</p>")
        if s.header:
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in s.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in s.rows]
            out.append("</table>")
        out += [f"<div class='fig'>{f}</div>" for f in s.figures]
        if s.notes:
            out.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in s.notes) + "</ul>")
    out.append("</main></body></html>")
    return "\n".join(out)


def models_of(args) -> list[str]:
    """``--models`` as model specs: ``all`` is every zoo model (pipeline.study.parse_models)."""
    from pipeline.study import parse_models
    return parse_models(args.models)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class StudyRun:
    study: dict
    out: Path
    sections: list[Section] = field(default_factory=list)


def run_study(module, args) -> StudyRun:
    """Check ``--out``, run the study's cells on the chosen backend, assemble and write study.json/.md/.html."""
    from pipeline.execution import Store, execution_options, make_backend, run_cells
    from pipeline.errors import UsageError
    from pipeline.study import check_out
    if args.resume and args.overwrite:
        raise UsageError("--resume keeps the cells already done and --overwrite replaces them; pass one")
    execution = execution_options(args)
    out = Path(args.out)
    check_out(out, args.overwrite, args.resume)
    cells = module.cells(args, out)
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite and (out / "cells").is_dir():
        import shutil
        shutil.rmtree(out / "cells")
    backend = make_backend(execution)
    t0 = time.perf_counter()
    records = run_cells(cells, backend, store=Store(out / "cells"), resume=args.resume, retries=execution.retries)
    study = module.assemble(args, cells, records)
    study["execution"] = {
        **backend.describe(), "cells_at_once": backend.slots, "wall_seconds": round(time.perf_counter() - t0, 1),
        "retries": execution.retries,
        "cells": [{k: r.get(k) for k in ("key", "status", "attempts", "seconds", "cpu_seconds", "wall_seconds",
                                         "host", "pid", "resumed", "lost", "error")} for r in records],
    }
    sections = module.render(study)
    title = study.get("title", module.NAME)
    _write(out / "study.json", json.dumps(study, indent=2) + "\n")
    _write(out / "study.md", markdown(title, sections))
    _write(out / "study.html", html(title, sections))
    return StudyRun(study, out, sections)
