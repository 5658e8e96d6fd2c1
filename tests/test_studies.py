"""Every study of pipeline/studies keeps the framework's contract, and gives the same study.json on Ray.

Parametrized over the discovered study modules (a new study is tested by being added). The Ray test runs each
study's ``--quick`` preset twice, in this process and on a local Ray instance with 2 CPUs, and compares the
figures: study.json without its ``execution`` section, without measured durations (keys naming seconds, timings or
latency, or ending in ``_s``) and cache records (the second run finds the first's cached calibration set), and
with paths made relative to each run's folder.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.study import build_parser, study_modules

ROOT = Path(__file__).resolve().parents[1]
NAMES = [m.NAME for m in study_modules()]
MEASURED = ("seconds", "timing", "latency", "wall", "elapsed", "duration")
# provenance, not figures: whether a cached calibration set or GAN was found (the second run finds the first's)
PROVENANCE = ("execution", "cache")


def _measured(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in MEASURED) or k.endswith("_s")


def test_the_studies_are_registered_with_their_contract():
    assert {"flips", "calibration", "ptq", "synthetic"} <= set(NAMES)
    for m in study_modules():
        for attr in ("NAME", "HELP", "add_arguments", "cells", "assemble", "render"):
            assert hasattr(m, attr), f"pipeline.studies.{m.__name__} lacks {attr}"
        args = build_parser().parse_args([m.NAME, "--quick"])
        assert args.study == m.NAME and args.out == f"study-{m.NAME}"


def _figures(value, root: str):
    if isinstance(value, dict):
        return {k: _figures(v, root) for k, v in value.items()
                if k not in PROVENANCE and not _measured(k)}
    if isinstance(value, list):
        return [_figures(v, root) for v in value]
    if isinstance(value, str) and root in value:
        return value.replace(root, "<out>")
    return value


def _run(name: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pipeline.study", name, "--quick", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    for f in ("study.json", "study.md", "study.html"):
        assert (out / f).is_file(), f
    return json.loads((out / "study.json").read_text())


# Every study's quick preset, on 2 Ray workers and in this process (the Ray half took 17-57 s per study in CI).
# Training inside a cell pins its thread count, so a Ray worker (OMP_NUM_THREADS=1) trains exactly as a local one.
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_each_study_gives_the_same_figures_on_ray(name, tmp_path):
    local = _run(name, tmp_path / "local")
    ray = _run(name, tmp_path / "ray", "--ray", "auto", "--workers", "2")
    assert ray["execution"]["backend"] == "ray" and local["execution"]["backend"] == "local"
    assert all(c["status"] == "done" for c in ray["execution"]["cells"]), ray["execution"]["cells"]
    assert _figures(ray, str(tmp_path / "ray")) == _figures(local, str(tmp_path / "local"))
