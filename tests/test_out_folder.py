"""--out of ``python -m pipeline.export``: what it does with existing folders, the lock, leftovers, a full disk.

Every case runs the real CLI in a subprocess. Refusals happen before any stage, so they take a fraction of a
second; the few full exports use the tiny factory model on the toy data.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline import outdir
ROOT = Path(__file__).resolve().parents[1]
NON_UTF8 = os.fsdecode(b"out\xff")  # a name with a byte that is not UTF-8 (what --out $'out\xff' passes)
EXPORT_FILES = ["bundle", "bundle.tar.gz", "model.onnx", "model_int8.tflite", "predictions.npz", "report.html",
                "report.json"]


def _base(tinynet_dir: Path, tiny_npz: Path) -> list[str]:
    return ["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz),
            "--calib-size", "50", "--eval-limit", "50", "--calib-cache", "off"]


def _env(tinynet_dir: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tinynet_dir)]), **extra}


def _cli(args, cwd, env, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.export", *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


def _popen(args, cwd, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.export", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _one_error_line(p: subprocess.CompletedProcess | tuple, needle: str = "") -> str:
    rc, err = (p.returncode, p.stderr) if isinstance(p, subprocess.CompletedProcess) else p
    err = err.decode(errors="backslashreplace")
    # the stage progress lines ([1/8] export_onnx ...) are there when the error comes after the stages
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")
             and not re.match(r"\[\d+/\d+\] ", ln)]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (folders and symlinks marked), to compare before/after."""
    snap = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = os.fsencode(p.relative_to(folder))
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir",)
            else:
                snap[rel] = ("file", p.read_bytes())
    return snap


def _copy_export(src: Path, dest: Path, marker: str | None = None) -> Path:
    shutil.copytree(src, dest)
    if marker:
        r = json.loads((dest / "report.json").read_text())
        r["test_marker"] = marker
        (dest / "report.json").write_text(json.dumps(r))
    return dest


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((f".{name}.tmp-", f".{name}.lock")))


# --------------------------------------------------------------------------- one real export, shared

@pytest.fixture(scope="module")
def first_export(tmp_path_factory, tinynet_dir, tiny_npz):
    """An export into a new --out named with a non-UTF-8 byte, with TMPDIR an empty folder."""
    base = tmp_path_factory.mktemp("first")
    tmpdir = base / "tmpdir"
    tmpdir.mkdir()
    out = base / NON_UTF8
    p = _cli([*_base(tinynet_dir, tiny_npz), "--out", out], base, _env(tinynet_dir, TMPDIR=str(tmpdir)))
    return p, out, tmpdir


def test_export_into_a_non_utf8_out_leaves_nothing_else(first_export):
    p, out, tmpdir = first_export
    assert p.returncode in (0, 1), p.stderr.decode(errors="replace")  # 1: a gate failed; the files are written
    assert sorted(os.listdir(out)) == EXPORT_FILES
    assert outdir.is_export_folder(out)
    assert b"/out\\xff/ (model.onnx" in p.stdout  # shown escaped, not a UnicodeEncodeError
    # no lock file, no staging folder; TMPDIR (onnxruntime's .ses, onnx2tf-*, autograph files) untouched
    assert sorted(os.listdir(out.parent)) == sorted([tmpdir.name, out.name])
    assert os.listdir(tmpdir) == []


def test_every_file_an_export_writes_is_recognised(first_export):
    """outdir.BUNDLE_FILES and EXPORT_ARTIFACTS against a real export: a real export is replaceable."""
    _, out, _ = first_export
    assert outdir.foreign_entries(out) == []
    assert sorted(os.listdir(out / "bundle")) == sorted([*outdir.BUNDLE_FILES, "model_int8.tflite"])


# --------------------------------------------------------------------------- refusals, before any stage

def _case(name, tmp_path: Path, earlier: Path):
    """Set up one refused --out; returns (out, extra args, needle, extra env)."""
    out = tmp_path / "out"
    if name in ("user folder", "user folder --overwrite"):
        (out / "sub").mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
        (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
        flags = ["--overwrite"] if "--overwrite" in name else []
        return out, flags, "holds no earlier export (notes.txt and 1 more)", {}
    if name == "earlier export":
        _copy_export(earlier, out)
        return out, [], "holds an earlier export (report.json); pass --overwrite", {}
    if name == "earlier export + user file in bundle/ --overwrite":
        _copy_export(earlier, out)
        (out / "bundle" / "my_data.txt").write_text("mine")
        return out, ["--overwrite"], "also bundle/my_data.txt, which no export writes", {}
    if name == "earlier export + user folder deep --overwrite":
        _copy_export(earlier, out)
        (out / "bundle" / "extra").mkdir()
        return out, ["--overwrite"], "also bundle/extra/, which no export writes", {}
    if name == "earlier export + symlink --overwrite":
        _copy_export(earlier, out)
        (tmp_path / "elsewhere.txt").write_text("mine")
        (out / "model.onnx").unlink()
        (out / "model.onnx").symlink_to(tmp_path / "elsewhere.txt")
        return out, ["--overwrite"], "also model.onnx, which no export writes", {}
    if name == "report.json of another kind":
        out.mkdir()
        (out / "report.json").write_text(json.dumps({"kind": "benchmark"}))
        return out, ["--overwrite"], "holds no earlier export (report.json)", {}
    if name == "dangling symlink":
        out.symlink_to(tmp_path / "gone")
        return out, [], "is a symlink to", {}
    if name == "symlink to a user folder":
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "a.txt").write_text("mine")
        out.symlink_to(tmp_path / "real")
        return out, ["--overwrite"], "holds no earlier export (a.txt)", {}
    if name == "file":
        out.write_text("x")
        return out, [], "exists and is not a folder", {}
    if name == "C locale, unicode user folder":
        out = tmp_path / "ünï"
        out.mkdir()
        (out / "ß.txt").write_text("mine")
        return out, [], "holds no earlier export", {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    if name == "non-UTF-8 folder holding --out":
        d = tmp_path / NON_UTF8
        d.mkdir()
        return d / "out", [], "not valid UTF-8", {}
    raise AssertionError(name)


CASES = ["user folder", "user folder --overwrite", "earlier export",
         "earlier export + user file in bundle/ --overwrite",
         "earlier export + user folder deep --overwrite", "earlier export + symlink --overwrite",
         "report.json of another kind", "dangling symlink", "symlink to a user folder", "file",
         "C locale, unicode user folder", "non-UTF-8 folder holding --out"]


@pytest.mark.parametrize("case", CASES)
def test_refused_before_any_stage_and_nothing_changes(case, tmp_path, first_export, tinynet_dir, tiny_npz):
    out, extra, needle, env = _case(case, tmp_path, first_export[1])
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    p = _cli([*_base(tinynet_dir, tiny_npz), "--out", out, *extra], tmp_path, _env(tinynet_dir, **env))
    _one_error_line(p, needle)
    assert time.monotonic() - t0 < 20  # before the model, the data and the stages
    assert snapshot(tmp_path) == before  # nothing written (no lock file, no staging folder), nothing deleted


def test_a_missing_parent_made_for_a_failed_run_is_removed(tmp_path, tinynet_dir, tiny_npz):
    p = _cli([*_base(tinynet_dir, tiny_npz), "--out", tmp_path / "a" / "b" / "out", "--calib-size", "0"],
             tmp_path, _env(tinynet_dir))
    _one_error_line(p, "--calib-size 0")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- --overwrite and the lock

def test_overwrite_replaces_an_earlier_export_whole_and_a_second_run_is_locked_out(tmp_path, first_export,
                                                                                 tinynet_dir, tiny_npz):
    """Under LC_ALL=C with a unicode --out: the earlier export (with a report.html and a model_fp16.tflite of
    earlier runs) is replaced as a whole; a second export to the same --out meanwhile exits 2 naming the PID."""
    out = _copy_export(first_export[1], tmp_path / "ünï", marker="earlier")
    (out / "report.html").write_text("<html>an earlier --reliability run</html>")
    (out / "model_fp16.tflite").write_bytes(b"an earlier fp16 export")
    args = [*_base(tinynet_dir, tiny_npz), "--out", out, "--overwrite"]
    env = _env(tinynet_dir, LC_ALL="C")
    first = _popen(args, tmp_path, env)
    lock = tmp_path / ".ünï.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.exists(), first.communicate()[1].decode(errors="replace")
    second = _cli(args, tmp_path, env)
    _one_error_line(second, f"another export (PID {first.pid}) is writing --out")
    _, err = first.communicate(timeout=180)
    assert first.returncode in (0, 1), err.decode(errors="replace")
    assert sorted(os.listdir(out)) == EXPORT_FILES  # the old report.html and model_fp16.tflite went with the old tree
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "export" and "test_marker" not in report
    assert sorted(os.listdir(tmp_path)) == ["ünï"]  # no lock, no staging folder, no old tree


# --------------------------------------------------------------------------- leftovers of a killed run

def test_sigkill_kills_the_worker_and_the_next_run_sweeps_its_temp_folder(tmp_path, tinynet_dir, tiny_npz):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = tmp_path / "out"
    args = [*_base(tinynet_dir, tiny_npz), "--out", out]
    proc = _popen(args, tmp_path, _env(tinynet_dir, TMPDIR=str(tmpdir)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it in the convert stage, while the worker converts
        line = proc.stderr.readline()
        if line.startswith(b"[1/") or not line:
            break
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the conversion worker should be running by now"
    proc.kill()
    proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"still running after their parent was SIGKILLed: {alive}"
    stale = _leftovers(tmp_path, "out")
    assert [s for s in stale if ".tmp-" in s], "the killed run should have left its staging folder"
    assert os.listdir(tmpdir) == []  # onnx2tf's temp folder lived in the staging folder, not in TMPDIR
    # a live run's staging folder (this test process) must survive the sweep
    me = psutil.Process()
    live = tmp_path / f".out.tmp-{me.pid}-{outdir._start_time(me.pid)}-live"
    live.mkdir()

    # the next run to the same --out; it fails once it holds the folder (more calibration images than the data has)
    p = _cli([*args, "--calib-size", "100000"], tmp_path, _env(tinynet_dir))
    _one_error_line(p, "100000")
    assert _leftovers(tmp_path, "out") == [live.name]
    assert not out.exists()


# --------------------------------------------------------------------------- a full disk

@pytest.mark.parametrize("size", ["64k", "12k"])  # 64k: the bundle does not fit; 12k: model.onnx does not
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tinynet_dir, tiny_npz, size):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # 64 KiB: room for the stages' files (model.onnx, the .tflite, onnx2tf's temp files), not for the bundle
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {m.stderr.strip()}")
    try:
        p = _cli([*_base(tinynet_dir, tiny_npz), "--out", mnt / "out"], tmp_path, _env(tinynet_dir))
        line = _one_error_line(p, "no space left on the disk of --out")
        assert "free some space or pass an --out on another disk" in line
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --------------------------------------------------------------------------- the module, in this process

def test_claim_and_publish_into_an_empty_folder_and_the_lock_is_exclusive(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with outdir.OutputFolder.claim(out) as folder:
        with pytest.raises(outdir.OutputError, match=f"another export \\(PID {os.getpid()}\\)"):
            outdir.OutputFolder.claim(out)
        (folder.work / "model.onnx").write_bytes(b"onnx")
        folder.publish()
    assert os.listdir(out) == ["model.onnx"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_parent_folder_another_export_makes_at_the_same_time_is_shared(tmp_path, monkeypatch):
    """A study runs two exports at once into out/<model>/<target>: both find out/<model> missing, one makes it
    first. The other uses it (no 'File exists' failure) and, not having made it, never removes it."""
    parent, real_mkdir = tmp_path / "model", Path.mkdir

    def other_export_first(self, *args, **kwargs):
        if self == parent and not parent.exists():
            real_mkdir(parent)  # the concurrent export wins the race between our exists() and mkdir()
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_export_first)
    with outdir.OutputFolder.claim(parent / "tflite-int8") as folder:
        assert folder.work.is_dir()
    monkeypatch.undo()
    assert parent.is_dir() and os.listdir(parent) == []  # not published, but the folder is the other export's


def test_publish_swaps_an_earlier_export_atomically(tmp_path):
    out = tmp_path / "out"
    (out / "bundle").mkdir(parents=True)
    (out / "report.json").write_text(json.dumps({"kind": "export", "n": 1}))
    (out / "bundle" / "bundle.json").write_text("{}")
    inode = out.stat().st_ino
    with outdir.OutputFolder.claim(out, overwrite=True) as folder:
        (folder.work / "report.json").write_text(json.dumps({"kind": "export", "n": 2}))
        (out / "bundle" / "my_data.txt").write_text("mine")  # appeared while the export ran: checked again
        with pytest.raises(outdir.OutputError, match="bundle/my_data.txt"):
            folder.publish()
        (out / "bundle" / "my_data.txt").unlink()
        folder.publish()
    assert os.listdir(out) == ["report.json"] and json.loads((out / "report.json").read_text())["n"] == 2
    assert out.stat().st_ino != inode
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_symlink_to_an_earlier_export_is_followed_and_kept(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "report.json").write_text(json.dumps({"kind": "export"}))
    link = tmp_path / "link"
    link.symlink_to(real)
    with outdir.OutputFolder.claim(link, overwrite=True) as folder:
        assert folder.staging.parent == tmp_path and (tmp_path / ".real.lock").exists()
        (folder.work / "model.onnx").write_bytes(b"onnx")
        folder.publish()
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert os.listdir(real) == ["model.onnx"]
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
