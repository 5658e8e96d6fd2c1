"""Every ```bash block of README.md runs as pasted.

Each block is checked with ``bash -n`` and for the classic paste trap: an indented option line (or a line starting
with ``-``) that does not follow a line ending in ``\\``, e.g. a comment after a continued line, which turns the
rest of the command into separate commands. The short, local blocks then really run, with ``bash -e``, from a
temporary folder holding a ``.venv`` link to this checkout's venv (so ``.venv/bin/python`` resolves and nothing is
written into the repository), the venv's ``bin`` first on PATH and this checkout first on PYTHONPATH.

Blocks that are not run are listed in ``NOT_RUN`` with the reason: each key must match exactly one block, so the
list stays explicit and cannot go stale.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The venv running the tests (normally this checkout's .venv), else the checkout's .venv.
VENV = Path(sys.prefix) if sys.prefix != sys.base_prefix else ROOT / ".venv"

# A substring of the block -> why it is not run (syntax and the paste-trap lint still apply).
NOT_RUN = {
    "./setup.sh": "installs the venv and the Debian dataset package, then runs the whole test suite (minutes)",
    "scp refcnn-int8/bundle.tar.gz pi@": "copies the bundle to a Raspberry Pi over ssh (needs the device)",
    "ssh pi@raspberrypi.local": "runs on the Raspberry Pi itself (needs the device)",
    "pipeline.evaluate refcnn-int8 --corruptions": "the full corruption suite over the test split, twice (minutes)",
    "pipeline.study precision --model zoo:refcnn": "five exports of zoo:refcnn, one per precision (minutes)",
    "--out s-local": "six exports twice, then the whole reliability suite (minutes); tests/test_execution.py runs "
                     "the same commands on a quick preset",
    "pipeline.device_check refcnn-tflite-int8 --emulate rpi4": "needs the export ./setup.sh writes and builds the "
                                                                "aarch64 root; tests/test_emulate.py runs the same "
                                                                "commands on a small export",
    "zoo:mobilenetv2-deadch --per-tensor --recover auto": "the first export of each hard case fails its gates on "
                                                          "purpose (exit 1); tests/test_when_int8_hurts.py runs "
                                                          "them all",
    "benchmarks/architectures.py --archs resnet18,mobilenet_v2,efficientnet_b0,mnasnet0_5": "fifteen architectures "
                                                                "fine-tuned 500 steps, then exported by two routes "
                                                                "(about 70 minutes)",
    "benchmarks/architectures.py --archs resnet18,mobilenet_v2,efficientnet_b0,googlenet": "five architectures at "
                                                                "3x224x224 through auto (about 20 minutes)",
    "benchmarks/architectures.py --archs all --converters auto": "39 architectures fine-tuned and exported (hours)",
    "benchmarks/architectures.py --archs all --converters direct": "39 architectures exported by the direct writer "
                                                                   "(about 10 minutes)",
    "benchmarks/architectures.py --archs resnet18,googlenet": "two architectures fine-tuned, then exported through "
                                                             "each route and the onnx2tf CLIs (tens of minutes)",
    "benchmarks/architectures.py --archs efficientvit_b0,resnet18": "seven architectures fine-tuned 500 steps, then "
                                                                    "exported and given to both onnx2tf CLIs (about "
                                                                    "45 minutes)",
}
# Blocks that run but take more than 10 s: marked slow.
SLOW = {
    "--calib balanced --calib-size 500 --seed 0": "a full zoo:refcnn export over the 10k test split (~10-30 s)",
    "--target-file myboard.toml": "a zoo:refcnn export to a board file, 500 test images (~10-40 s)",
}


def bash_blocks(text: str | None = None) -> list[str]:
    text = README.read_text() if text is None else text
    return [m.group(1) for m in re.finditer(r"^```bash\n(.*?)^```\s*$", text, re.S | re.M)]


def paste_traps(block: str) -> list[str]:
    """Lines that a shell would run as a command of their own although they read as options of the line above."""
    bad, continued = [], False
    for line in block.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not continued and (
                line[:1].isspace() or stripped.startswith("-")):
            bad.append(line)
        continued = line.rstrip().endswith("\\") and not stripped.startswith("#")
    return bad


def _key(block: str, table: dict) -> str | None:
    keys = [k for k in table if k in block]
    assert len(keys) <= 1, f"block matches several keys {keys}"
    return keys[0] if keys else None


def _ids():
    return [b.strip().splitlines()[-1][:60] for b in bash_blocks()]


def test_readme_has_bash_blocks_and_the_lists_match_them():
    blocks = bash_blocks()
    assert len(blocks) >= 6
    for table in (NOT_RUN, SLOW):
        for key in table:
            assert sum(key in b for b in blocks) == 1, f"{key!r} must match exactly one README bash block"


def test_paste_trap_lint_catches_a_comment_after_a_continued_line():
    old = ("python -m pipeline.export --target tflite-int8 \\\n"
           "    --model zoo:refcnn            # or path/to/model.onnx\n"
           "    --data fashion-mnist\n")
    assert paste_traps(old) == ["    --data fashion-mnist"]
    assert paste_traps("a \\\n    --b \\\n    --c\nd   # note\n") == []


@pytest.mark.parametrize("block", bash_blocks(), ids=_ids())
def test_block_parses_and_pastes(block):
    p = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
    assert p.returncode == 0, p.stderr
    assert paste_traps(block) == [], "lines run as commands of their own (a comment or a missing \\ above them)"


def _run_params():
    params = []
    for block, bid in zip(bash_blocks(), _ids()):
        reason = _key(block, NOT_RUN)
        marks = [pytest.mark.skip(reason=f"not run: {NOT_RUN[reason]}")] if reason else []
        if _key(block, SLOW):
            marks.append(pytest.mark.slow)
        params.append(pytest.param(block, marks=marks, id=bid))
    return params


@pytest.mark.parametrize("block", _run_params())
def test_block_runs(block, tmp_path):
    if not (VENV / "bin" / "python").exists():
        pytest.fail(f"no venv at {VENV}: run ./setup.sh")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(VENV)  # `.venv/bin/python` resolves as in the checkout
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TMPDIR": str(tmp_path)}
    before = {p.name for p in ROOT.iterdir()}
    p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=work, env=env, text=True,
                       capture_output=True, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr
    new = {p.name for p in ROOT.iterdir()} - before
    assert not [n for n in new if n in block], f"the block wrote {new} into the repository"
