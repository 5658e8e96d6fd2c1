"""``--help`` of every CLI documents every option: a help text for each, the defaults a user needs, the names a
choice takes. Parametrized over the parsers themselves, so a new option without help fails here."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from pipeline import evaluate, export, study
    sp = study.build_parser()
    sub = next(a for a in sp._actions if isinstance(a, argparse._SubParsersAction))
    return {"export": export.build_parser(), "evaluate": evaluate.build_parser(), "study": sp,
            "study precision": sub.choices["precision"]}


def _help(name: str) -> str:
    return " ".join(_parsers()[name].format_help().split())  # argparse wraps lines: compare on single spaces


@pytest.mark.parametrize("name", ["export", "evaluate", "study", "study precision"])
def test_every_option_has_help_text(name):
    p = _parsers()[name]
    text = _help(name)
    missing = [a.option_strings or [a.dest] for a in p._actions
               if a.help is None or a.help == argparse.SUPPRESS or not str(a.help).strip()]
    assert not missing, f"{name}: options without help text: {missing}"
    for a in p._actions:
        for opt in a.option_strings:
            assert opt in text, f"{name} --help does not mention {opt}"


@pytest.mark.parametrize("name", ["export", "study precision"])
def test_seed_and_calib_size_documented(name):
    text = _help(name)
    seed = next(a for a in _parsers()[name]._actions if "--seed" in a.option_strings)
    assert "calibration" in seed.help and "(default 0)" in seed.help
    size = next(a for a in _parsers()[name]._actions if "--calib-size" in a.option_strings)
    assert size.default is None and "default 500" in size.help and "fewer" in size.help
    assert "--seed SEED" in text


@pytest.mark.parametrize("name", ["export", "evaluate"])
def test_batch_size_default_and_corruption_names(name):
    from pipeline.reliability.corruptions import CORRUPTIONS
    acts = {o: a for a in _parsers()[name]._actions for o in a.option_strings}
    assert "(default 256" in acts["--batch-size"].help
    help_ = acts["--corruptions"].help
    missing = [c for c in CORRUPTIONS if c not in help_]
    assert not missing, f"{name} --corruptions help does not list {missing}"
    text = _help(name)
    assert all(c in text for c in CORRUPTIONS)


@pytest.mark.parametrize("module, argv", [("pipeline.export", ["--help"]), ("pipeline.evaluate", ["--help"]),
                                          ("pipeline.study", ["precision", "--help"])])
def test_help_exits_0_quickly_without_traceback(module, argv, tmp_path):
    p = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and p.stdout.startswith("usage:") and not p.stderr, p.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
