"""``python -m pipeline.evaluate`` on bad input: one ``error:`` line, exit 2, no traceback, no output folder left
behind; the worker pool never hangs on a model it cannot load; the export's relative paths resolve from another
folder; the validation split's size adapts to small datasets. Real LiteRT kernels and real worker processes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import RuntimeStageError, UsageError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--corruptions", "none", "--workers", "1"]


@pytest.fixture(scope="module")
def exported(tiny_export):
    status, out = tiny_export
    assert status == 0
    return out


@pytest.fixture()
def export_copy(exported, tmp_path):
    """A private copy of the session export (tests may break its files)."""
    dst = tmp_path / "export"
    shutil.copytree(exported, dst)
    return dst


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _write_report(folder: Path, rep) -> None:
    (folder / "report.json").write_text(json.dumps(rep))


# A received folder's factory, weights and data are never followed: every evaluate of the tiny export
# names the model, weights and data it was made from, as its user would. Set by the autouse fixture below.
OWN: dict[str, str] = {}


@pytest.fixture(autouse=True, scope="module")
def _own_flags(tinynet_dir, tiny_npz):
    OWN.update({"--model": "tinynet:tinynet", "--weights": str(tinynet_dir / "tinynet.pt"), "--data": str(tiny_npz)})


def with_own(args) -> list[str]:
    """``args`` plus the tiny export's --model/--weights/--data where they are not given."""
    args = [str(a) for a in args]
    return args + [a for flag, v in OWN.items() if flag not in args for a in (flag, v)]


def _main(args, capsys, own=True):
    from pipeline.evaluate import main
    status = main(with_own(args) if own else [str(a) for a in args])
    err = capsys.readouterr().err
    return status, err


def _one_error_line(err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def _env() -> dict:
    """The tiny factory's folder importable in a subprocess too (as the user's module would be)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(OWN["--weights"]).parent)])}


def _cli(args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *with_own(args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_env())


# --------------------------------------------------------------------------- no endless worker respawn

def test_garbage_tflite_with_two_workers_fails_fast(export_copy, tmp_path):
    """workers=2: the models are built once in this process before the pool starts, so a .tflite LiteRT cannot
    load gives the same clean error as --workers 1 (it used to respawn pool workers forever)."""
    (tmp_path / "garbage.tflite").write_bytes(b"garbage\n")  # --tflite: the export's own file is sha256-checked
    out = tmp_path / "o"
    t0 = time.perf_counter()
    proc = _cli([export_copy, "--tflite", tmp_path / "garbage.tflite", "--val-size", "100", "--corruptions", "fog", "--severities", "1", "--workers", "2",
                 "--out", out], cwd=tmp_path)
    assert time.perf_counter() - t0 < 60
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, "LiteRT cannot load")
    assert not out.exists()


def _bad_pair(exported: Path, tflite_path):
    from pipeline.reliability.engine import ModelPair
    from pipeline.inputs.preprocessing import Preprocessing
    rep = _report(exported)
    return ModelPair(model_spec=str(exported / "model.onnx"), weights=None, tflite_path=tflite_path,
                     input_layout=rep["preprocessing"]["tflite_input_layout"], kernels="xnnpack",
                     preprocessing=Preprocessing.from_dict(rep["preprocessing"]))


def test_a_job_whose_models_cannot_load_fails_with_one_line(exported, tmp_path):
    """In a worker (a job cell), models that cannot load are one readable error: a PipelineError keeps its class
    and message, anything else becomes a RuntimeStageError that names the job; as a record, the cell is failed
    with that line."""
    from pipeline.execution import Cell, execute
    from pipeline.reliability.engine import Job, job_cell
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"garbage\n")
    arrays = tmp_path / "arrays.npz"
    np.savez(arrays, test=np.zeros((4, 12, 12), np.uint8))
    pair = _bad_pair(exported, str(garbage))
    files = {"tflite": str(garbage), "arrays": str(arrays), "model": str(exported / "model.onnx")}
    with pytest.raises(RuntimeStageError, match="LiteRT cannot load"):
        job_cell({"pair": pair, "job": Job("test", 0, 4)}, files, 0)
    rec = execute(Cell("j", job_cell, {"pair": pair, "job": Job("test", 0, 4)}), files)
    assert rec["status"] == "failed" and "LiteRT cannot load" in rec["error"] and "\n" not in rec["error"]


def test_engine_with_two_workers_checks_models_in_the_parent(exported, tmp_path):
    from pipeline.reliability.engine import Engine, clean_jobs
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"garbage\n")
    arrays = {"test": np.zeros((4, 12, 12), np.uint8)}
    def hung(signum, frame):
        raise TimeoutError("Engine.run hung: the pool respawns workers whose models cannot load")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(90)
    try:
        import psutil
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with Engine(_bad_pair(exported, str(garbage)), arrays, workers=2) as engine:
            with pytest.raises(RuntimeStageError, match="LiteRT cannot load"):
                engine.run(clean_jobs("test", 4))
        started = {p.pid for p in psutil.Process().children(recursive=True)} - before
        assert not started  # failed before starting any worker
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- no empty --out left behind

@pytest.mark.parametrize("bad", ["garbage", "missing", "val_size"])
def test_failed_run_leaves_no_out_folder(export_copy, tmp_path, capsys, bad):
    out = tmp_path / "new" / "nested"
    args = [export_copy, "--out", out, *FAST]
    if bad == "garbage":
        (tmp_path / "g.tflite").write_bytes(b"\x00" * 64)
        args += ["--tflite", tmp_path / "g.tflite", "--val-size", "50"]
        needle = "LiteRT cannot load"
    elif bad == "missing":
        args += ["--tflite", tmp_path / "nope.tflite"]
        needle = "does not exist"
    else:
        args += ["--val-size", "100000"]
        needle = "exceeds the 400 training images"
    status, err = _main(args, capsys)
    assert status == 2
    _one_error_line(err, needle)
    assert not (tmp_path / "new").exists()


def test_out_that_is_a_file_or_under_a_file(export_copy, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    status, err = _main([export_copy, "--out", f, *FAST], capsys)
    assert status == 2
    _one_error_line(err, "is not a folder")
    status, err = _main([export_copy, "--out", f / "sub", *FAST], capsys)
    assert status == 2
    _one_error_line(err, "is not a folder")
    assert f.read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_out_fails_before_any_work(export_copy, capsys):
    """/proc refuses new entries even for root: refused up front, not after the models ran."""
    t0 = time.perf_counter()
    status, err = _main([export_copy, "--out", "/proc/evaluate-test/x", *FAST], capsys)
    assert status == 2
    _one_error_line(err, "cannot create /proc/evaluate-test/x: cannot write in /proc")
    assert time.perf_counter() - t0 < 5


def test_report_write_removes_what_it_created_on_failure(default_run, tmp_path):
    """A write that fails leaves neither temp files nor the folders this call created."""
    from pipeline.errors import OutputError
    from pipeline.report import Report
    rep, _ = default_run
    out = tmp_path / "a" / "b"
    with pytest.raises(TypeError):
        Report.from_dict({**rep, "unserialisable": object()}).write(out)  # fails while rendering, before anything is written
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "existing"
    (existing / "report.json").mkdir(parents=True)  # renaming onto a folder fails
    with pytest.raises(OutputError, match="cannot write the report"):
        Report.from_dict(rep).write(existing)
    assert not [p.name for p in existing.iterdir() if p.name.endswith(".part")]
    Report.from_dict(rep).write(out)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]
    assert _report(out)["temperature_scaling"]["validation"]["size"] == rep["temperature_scaling"]["validation"]["size"]


# --------------------------------------------------------------------------- report.json not a report

@pytest.mark.parametrize("content, needle", [
    ([], "holds a JSON list, not an export report"),
    ("a string", "holds a JSON str"),
    (42, "holds a JSON int"),
    (None, "holds a JSON NoneType"),
    ({"hello": 1}, "lacks the 'preprocessing' section"),
    ({"preprocessing": {}, "model": {}, "config": {}, "target": {}}, "preprocessing.input_shape is missing"),
    ({"preprocessing": [], "model": {}, "config": {}, "target": {}}, "lacks the 'preprocessing' section"),
])
def test_report_json_that_is_not_an_export_report(tmp_path, capsys, content, needle):
    folder = tmp_path / "x"
    folder.mkdir()
    _write_report(folder, content)
    status, err = _main([folder, "--out", tmp_path / "o", *FAST], capsys)
    assert status == 2
    _one_error_line(err, needle)
    assert not (tmp_path / "o").exists()


def test_report_with_malformed_fields(export_copy, tmp_path, capsys):
    rep = _report(export_copy)
    rep["preprocessing"]["input_shape"] = "abc"
    _write_report(export_copy, rep)
    status, err = _main([export_copy, "--out", tmp_path / "o", *FAST], capsys)
    assert status == 2
    _one_error_line(err, "preprocessing")
    rep = _report(export_copy)
    rep["preprocessing"]["input_shape"] = [1, 12, 12]
    rep["artifacts"] = ["model_int8.tflite"]
    _write_report(export_copy, rep)
    status, err = _main([export_copy, "--out", tmp_path / "o", *FAST], capsys)
    assert status == 2
    _one_error_line(err, "'artifacts' is not an object")
    rep["artifacts"] = {"tflite": {"path": "model_int8.tflite"}}
    rep["config"]["model"] = 5
    rep["model"].pop("spec", None)
    _write_report(export_copy, rep)
    status, err = _main([export_copy, "--out", tmp_path / "o", *FAST], capsys)
    assert status == 2
    _one_error_line(err, "config.model is 5, not a string")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- relative paths, other cwd

@pytest.fixture()
def relative_export(exported, tinynet_dir, tiny_npz, tmp_path, monkeypatch):
    """The session export rewritten as if it had been run in ``proj/`` with relative --model/--weights/--data
    (a factory module no other test imports), and a current folder elsewhere."""
    proj = tmp_path / "proj"
    proj.mkdir()
    mod = f"relnet_{os.getpid()}_{time.monotonic_ns()}"
    shutil.copy(tinynet_dir / "tinynet.py", proj / f"{mod}.py")
    shutil.copy(tinynet_dir / "tinynet.pt", proj / "w.pt")
    shutil.copy(tiny_npz, proj / "d.npz")
    shutil.copy(exported / "model.onnx", proj / "m.onnx")
    exp = tmp_path / "export"
    shutil.copytree(exported, exp)
    rep = _report(exp)
    rep["config"].update(model=f"{mod}:tinynet", weights="w.pt", data="d.npz", data_dir=None, cwd=str(proj))
    rep["model"]["spec"] = f"{mod}:tinynet"
    _write_report(exp, rep)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test
    monkeypatch.chdir(elsewhere)
    yield exp, proj, mod
    sys.modules.pop(mod, None)


def test_a_relative_factory_is_never_imported_from_the_export_cwd(relative_export, tmp_path, capsys):
    """Issue #11 replaced the old config.cwd resolution: the report's factory is not imported (exit 2 naming the
    spec), config.cwd is never put on sys.path, and the recorded relative paths are not guessed; the user's own
    flags are used as given."""
    exp, proj, mod = relative_export
    status, err = _main([exp, "--out", tmp_path / "o", *FAST], capsys, own=False)
    assert status == 2
    _one_error_line(err, f"pass --model {mod}:tinynet")
    status, err = _main([exp, "--model", f"{mod}:tinynet", "--out", tmp_path / "o", *FAST], capsys, own=False)
    assert status == 2
    _one_error_line(err, "config.weights records --weights w.pt, a path outside the export folder")
    status, err = _main([exp, "--model", f"{mod}:tinynet", "--weights", proj / "w.pt", "--out", tmp_path / "o",
                         *FAST], capsys, own=False)
    assert status == 2
    _one_error_line(err, "config.data records --data d.npz, a path outside the export folder")
    status, err = _main([exp, "--model", f"{mod}:tinynet", "--weights", proj / "w.pt", "--data", proj / "d.npz",
                         "--out", tmp_path / "o", *FAST], capsys, own=False)
    assert status == 2
    _one_error_line(err, f"cannot import module {mod!r}")  # config.cwd (proj/) is not importable
    assert mod not in sys.modules and str(proj) not in sys.path
    assert not (tmp_path / "o").exists()
    sys.path.insert(0, str(proj))  # the user makes their module importable (monkeypatched sys.path: restored)
    status, err = _main([exp, "--model", f"{mod}:tinynet", "--weights", proj / "w.pt", "--data", proj / "d.npz",
                         "--out", tmp_path / "o", "--val-size", "50", *FAST], capsys, own=False)
    assert status in (0, 1), err
    rep = _report(tmp_path / "o")
    assert rep["model"]["spec"] == f"{mod}:tinynet" and rep["calibration_drift"]["fp32"]["top1"] > 0.9


def test_a_relative_onnx_model_outside_the_folder_needs_model(relative_export, tmp_path, capsys):
    exp, proj, _ = relative_export
    rep = _report(exp)
    rep["config"].update(model="m.onnx", weights=None)
    rep["model"]["spec"] = "m.onnx"
    _write_report(exp, rep)
    status, err = _main([exp, "--out", tmp_path / "o", *FAST], capsys, own=False)
    assert status == 2
    _one_error_line(err, "model.spec records the model file 'm.onnx', outside the export folder")
    status, err = _main([exp, "--model", proj / "m.onnx", "--data", proj / "d.npz", "--out", tmp_path / "o",
                         "--val-size", "50", *FAST], capsys, own=False)
    assert status in (0, 1), err
    assert _report(tmp_path / "o")["calibration_drift"]["fp32"]["top1"] > 0.9


def test_recorded_relative_paths_are_not_guessed_from_here(relative_export, tmp_path, capsys):
    """A recorded relative --data that happens to exist from the current folder is not used either."""
    exp, proj, mod = relative_export
    np.savez(Path("d.npz"), x_train=np.zeros((10, 5, 5), np.uint8), y_train=np.zeros(10, np.int64),
             x_test=np.zeros((4, 5, 5), np.uint8), y_test=np.zeros(4, np.int64))
    status, err = _main([exp, "--model", f"{mod}:tinynet", "--weights", proj / "w.pt", "--out", tmp_path / "o",
                         *FAST], capsys, own=False)
    assert status == 2
    _one_error_line(err, "config.data records --data d.npz")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- --val-size

def test_resolve_val_size():
    from pipeline.reliability.suite import resolve_val_size
    assert resolve_val_size(None, 400) == 80
    assert resolve_val_size(None, 60000) == 5000
    assert resolve_val_size(None, 3) == 1
    assert resolve_val_size(400, 400) == 400
    assert resolve_val_size(7, 400) == 7
    with pytest.raises(UsageError, match="exceeds the 400 training images"):
        resolve_val_size(401, 400)
    with pytest.raises(UsageError, match="--val-size 0"):
        resolve_val_size(0, 400)
    with pytest.raises(UsageError, match="no training images"):
        resolve_val_size(None, 0)


@pytest.fixture(scope="module")
def default_run(exported, tinynet_dir, tmp_path_factory):
    """One in-process evaluate of the session export without --val-size (no shifted sets, one worker)."""
    from pipeline.evaluate import main
    out = tmp_path_factory.mktemp("default_run") / "o"
    with contextlib.chdir(tinynet_dir):
        status = main(with_own([str(exported), "--out", str(out), *FAST]))
    assert status in (0, 1)
    return _report(out), out


def test_default_val_size_adapts_to_a_small_training_split(default_run):
    rep, out = default_run
    v = rep["temperature_scaling"]["validation"]
    assert v["size"] == 80  # min(5000, 400 // 5)
    assert "default min(5000, training images // 5)" in v["size_chosen"] and "80 of the 400" in v["size_chosen"]
    assert "--val-size not given" in v["note"]  # the page shows the note next to the split
    assert "--val-size not given" in (out / "report.html").read_text()
    assert rep["reliability"]["validation_images"] == 80
    assert rep["reliability"]["config"]["val_size"] is None


def test_explicit_val_size_too_large_fails_before_any_model_is_loaded(export_copy, tmp_path, capsys):
    # The model named here does not exist: the --val-size error comes first, so no model was loaded or run.
    t0 = time.perf_counter()
    status, err = _main([export_copy, "--out", tmp_path / "o", "--val-size", "401", "--model",
                         tmp_path / "nope.onnx", *FAST], capsys)
    assert status == 2
    _one_error_line(err, "--val-size 401 exceeds the 400 training images")
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- --corruptions ""

@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_empty_corruptions_is_an_error(export_copy, tmp_path, capsys, value):
    from pipeline.reliability.suite import parse_corruptions
    with pytest.raises(UsageError, match="pass all, none or a comma-separated list"):
        parse_corruptions(value)
    status, err = _main([export_copy, "--out", tmp_path / "o", "--corruptions", value, "--workers", "1"], capsys)
    assert status == 2
    _one_error_line(err, "pass all, none or a comma-separated list of names")
    assert not (tmp_path / "o").exists()


def test_export_reliability_empty_corruptions_fails_before_converting(tmp_path):
    from pipeline.export import main
    out = tmp_path / "out"
    assert main(["--reliability", "--corruptions", "", "--out", str(out)]) == 2
    assert not out.exists()


def test_export_cli_still_parses_its_reliability_flags(tmp_path):
    """add_reliability_arguments is shared with the export CLI: its default --val-size must stay usable there."""
    from pipeline import export
    args = export.build_parser().parse_args(["--reliability", "--out", str(tmp_path / "o")])
    cfg = export.config_from_args(args)
    assert cfg.reliability is not None and cfg.reliability.val_size is None
    assert not (tmp_path / "o").exists()


def test_val_size_defaults_to_the_adaptive_size_in_both_parsers():
    import argparse
    from pipeline.evaluate import add_reliability_arguments
    for in_export in (True, False):
        p = argparse.ArgumentParser()
        add_reliability_arguments(p, in_export=in_export)
        assert p.parse_args([]).val_size is None
        assert p.parse_args(["--val-size", "7"]).val_size == 7


# --------------------------------------------------------------------------- a worker that dies

def test_a_worker_killed_mid_run_is_replaced_and_the_results_are_unchanged(exported):
    """SIGKILL one of two real worker processes after the first result (what the OOM killer does): its job runs
    again in a fresh process, the run completes within seconds with exactly the outputs of the in-process run, and
    no worker is left behind."""
    import psutil
    from pipeline.reliability.engine import Engine, shift_jobs
    from tests.test_reliability import _pair_and_data
    _, pair, ds = _pair_and_data(exported)
    jobs = shift_jobs("test", len(ds.x_test), ["fog", "rotate"], [1, 3], seed=0)
    with Engine(pair, {"test": ds.x_test}, workers=1) as engine:
        want = engine.run(jobs)

    def hung(signum, frame):
        raise TimeoutError("Engine.run hung after a worker died")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(180)
    killed = []
    try:
        with Engine(pair, {"test": ds.x_test}, workers=2) as engine:
            def progress(n):
                if not killed:
                    worker = next(p for p in psutil.Process().children(recursive=True)
                                  if "spawn_main" in " ".join(p.cmdline()))
                    worker.kill()
                    killed.append(worker)
            got = engine.run(jobs, progress=progress)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert killed and not killed[0].is_running()
    assert got.keys() == want.keys()
    for key in want:
        for part in ("fp32", "int8", "int8_raw"):
            np.testing.assert_array_equal(got[key][part], want[key][part])
    left = [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left


def test_an_unexpected_error_in_a_job_names_the_job(exported, monkeypatch):
    """Not a PipelineError (a bug, or a model that fails on some input): one readable RuntimeStageError."""
    from pipeline.reliability.engine import Engine, Job, _Worker
    from tests.test_reliability import _pair_and_data
    _, pair, ds = _pair_and_data(exported)

    def boom(self, job):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(_Worker, "__call__", boom)
    with Engine(pair, {"test": ds.x_test}, workers=1) as engine:
        with pytest.raises(RuntimeStageError, match=r"evaluating test images 0-99 \(fog severity 3\) failed: "
                                                    r"ValueError: operands could not be broadcast together"):
            engine.run([Job("test", 0, 100, "fog", 3)])


# --------------------------------------------------------------------------- overrides restate what was evaluated

def _float_tflite(path: Path, classes: int, size: int = 12) -> Path:
    """A float32 .tflite taking 1 x size x size x 1 (NHWC) and giving ``classes`` outputs, made with TensorFlow."""
    import tensorflow as tf
    w = tf.constant(np.linspace(-1, 1, size * size * classes, dtype=np.float32).reshape(size * size, classes))

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32)])
    def f(x):
        return tf.matmul(tf.reshape(x, [-1, size * size]), w)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    path.write_bytes(conv.convert())
    return path


def test_a_model_override_recomputes_accuracy_and_the_export_gates(export_copy, tinynet_dir, tmp_path, capsys):
    """--weights of another (untrained) model: the accuracy section and the drop/agreement gates describe the
    models evaluated here, not the export's, so the gates now fail (it used to print PASS with the export's
    figures)."""
    import torch
    torch.manual_seed(123)
    sys.path.insert(0, str(tinynet_dir))
    try:
        import tinynet as tn
        torch.save(tn.tinynet().state_dict(), tmp_path / "random.pt")
    finally:
        sys.path.remove(str(tinynet_dir))
    before = _report(export_copy)
    out = tmp_path / "o"
    with contextlib.chdir(tinynet_dir):
        status, err = _main([export_copy, "--weights", tmp_path / "random.pt", "--out", out, *FAST,
                             "--max-ece-increase", "10", "--max-worst-drop-pp", "100"], capsys)
    rep = _report(out)
    acc, flips = rep["accuracy"], rep["flips"]
    assert acc["n"] == flips["n"] == before["accuracy"]["n"]
    assert acc["flips"] == flips["count"] and acc["agreement"] == pytest.approx(1 - flips["rate"])
    assert acc["fp32_top1"] == pytest.approx(rep["calibration_drift"]["fp32"]["top1"])
    assert acc["agreement"] < before["accuracy"]["agreement"]  # an untrained FP32 model disagrees with the int8
    g = rep["gates"]["min_agreement"]
    assert g["value"] == acc["agreement"] and g["limit"] == before["gates"]["min_agreement"]["limit"]
    assert g["passed"] is False and status == 1 and rep["passed"] is False
    assert rep["evaluate_overrides"]["flags"] == ["--weights"]
    assert str(rep["model"]["weights"]).endswith("random.pt")


def test_an_eval_limit_override_restates_the_image_count(export_copy, tmp_path, capsys):
    out = tmp_path / "o"
    status, err = _main([export_copy, "--eval-limit", "37", "--out", out, *FAST], capsys)
    rep = _report(out)
    assert status in (0, 1), err
    assert rep["accuracy"]["n"] == rep["flips"]["n"] == rep["data"]["evaluated"] == 37


def test_a_tflite_with_another_class_count_is_refused(export_copy, tmp_path, capsys):
    path = _float_tflite(tmp_path / "seven.tflite", classes=7)
    out = tmp_path / "o"
    status, err = _main([export_copy, "--tflite", path, "--out", out, *FAST], capsys)
    assert status == 2 and not out.exists()
    assert err.strip().splitlines() == [f"error: --tflite {path} gives 7 outputs per image but the FP32 model 4; pass "
                                        "the .tflite converted from this FP32 model (or --model for the model it was "
                                        "converted from)"]


def test_a_float_tflite_is_refused_on_an_int8_export(export_copy, tmp_path, capsys):
    path = _float_tflite(tmp_path / "float.tflite", classes=4)
    out = tmp_path / "o"
    status, err = _main([export_copy, "--tflite", path, "--out", out, *FAST], capsys)
    assert status == 2 and not out.exists()
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: --tflite {path} is not a int8 model as target tflite-int8 requires (not int8:")
    assert "pass the int8 .tflite of this export" in line


@pytest.mark.parametrize("args, needle", [(("--seed", "-1"), "seed -1 is out of range"),
                                          (("--max-ece-increase", "nan"), "'nan' is not a finite number")])
def test_evaluate_refuses_a_negative_seed_and_nan_limits(export_copy, tmp_path, capsys, args, needle):
    out = tmp_path / "o"
    status, err = _main([export_copy, *args, "--out", out, *FAST], capsys)
    assert status == 2 and not out.exists()
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and needle in line


# --------------------------------------------------------------------------- signals while workers start

@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_a_signal_while_workers_start_stops_everything_cleanly(export_copy, tmp_path, procs, how):
    """SIGTERM to the process (timeout, docker stop), or SIGINT to its whole process group (a terminal's Ctrl-C),
    as soon as the two worker processes exist: one line, exit 143 / 130, no traceback from any process, nothing
    written, and no process left behind (SIGTERM used to orphan the workers)."""
    before = sorted(p.name for p in export_copy.iterdir())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # else the CLI would inherit SIG_IGN
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.evaluate",
                             *with_own([export_copy, "--corruptions", "all", "--workers", "2"])], cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True, env=_env())
    deadline = time.monotonic() + 120
    kids: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None and len(kids) < 2:
        time.sleep(0.02)
        kids = procs.children(proc.pid)
    assert len(kids) >= 2 and proc.poll() is None, "the worker processes should be starting by now"
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    code, word = (143, "terminated (SIGTERM)") if how == "sigterm" else (130, "interrupted")
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"error: {word}; report.json and report.html were not changed"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert sorted(p.name for p in export_copy.iterdir()) == before
    t_end = time.monotonic() + 10
    while procs.alive(kids) and time.monotonic() < t_end:
        time.sleep(0.1)
    assert not procs.alive(kids), "worker processes outlived the run"


def test_a_tflite_for_another_input_shape_is_refused(export_copy, tmp_path, capsys):
    path = _float_tflite(tmp_path / "big.tflite", classes=4, size=16)
    status, err = _main([export_copy, "--tflite", path, "--out", tmp_path / "o", *FAST], capsys)
    assert status == 2
    assert err.strip() == (f"error: --tflite {path} takes inputs of shape 16x16x1 but this export's preprocessing "
                           "makes 1x12x12 (C×H×W) images; pass the .tflite converted with this export's input shape")


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r["artifacts"].pop("tflite"), "names no TFLite model (artifacts.tflite.path); pass --tflite"),
    (lambda r: r["preprocessing"].update(mean=[0.0, 0.0, 0.0]), "preprocessing.mean has 3 values for 1-channel inputs"),
    (lambda r: r["preprocessing"].update(std=[0.0]), "preprocessing.std [0.0] must be positive"),
])
def test_an_edited_report_gets_a_message_that_names_the_key(export_copy, tmp_path, capsys, edit, needle):
    rep = _report(export_copy)
    edit(rep)
    _write_report(export_copy, rep)
    status, err = _main([export_copy, "--out", tmp_path / "o", *FAST], capsys)
    assert status == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and needle in line


def test_a_temperature_fitted_on_few_images_is_flagged(export_copy, tmp_path, capsys):
    out = tmp_path / "o"
    status, err = _main([export_copy, "--val-size", "20", "--out", out, *FAST], capsys)
    assert status in (0, 1)
    v = _report(out)["temperature_scaling"]["validation"]
    assert v["size"] == 20 and v["warning"].startswith("only 20 validation images: temperatures fitted on fewer than 100")
    assert f"warning: {v['warning']}" in err.splitlines()
    assert "only 20 validation images" in (out / "report.html").read_text()
    status, err = _main([export_copy, "--val-size", "100", "--out", tmp_path / "o2", *FAST], capsys)
    assert "warning" not in _report(tmp_path / "o2")["temperature_scaling"]["validation"] and "warning:" not in err


# --------------------------------------------------------------------------- FP32 runtime default, progress

def test_evaluate_defaults_to_onnxruntime_on_the_exports_model_onnx(default_run):
    """No --fp32-runtime: onnxruntime on the export's checked model.onnx, as the export does, said in report.json;
    the export ran that runtime too, so its clean-test logits (predictions.npz) serve."""
    rep, _ = default_run
    rel = rep["reliability"]
    assert rel["fp32_runtime"] == "onnxruntime"
    assert rel["fp32_runtime_choice"].startswith("onnxruntime: the export's model.onnx") and "default" in \
        rel["fp32_runtime_choice"]
    assert "model.onnx" in rel["how"]
    assert "predictions.npz" in rel["clean_outputs"]


def test_another_fp32_model_falls_back_to_the_reference_runtime_with_a_note(export_copy, tmp_path, capsys):
    other = tmp_path / "other.pt"  # the same weights under another name: an override all the same
    shutil.copyfile(OWN["--weights"], other)
    status, err = _main([export_copy, "--out", tmp_path / "o", "--weights", other, *FAST], capsys)
    assert status in (0, 1), err
    notes = [ln for ln in err.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and "reference runtime (pytorch)" in notes[0] and "--weights" in notes[0], err
    rel = _report(tmp_path / "o")["reliability"]
    assert rel["fp32_runtime"] == "pytorch" and rel["fp32_runtime_choice"].startswith("reference: ")
    # Asking for onnxruntime with another FP32 model: one line, exit 2, nothing written.
    status, err = _main([export_copy, "--out", tmp_path / "o2", "--weights", other, "--fp32-runtime", "onnxruntime",
                         *FAST], capsys)
    assert status == 2
    _one_error_line(err, "does not describe the FP32 model --weights names")
    assert not (tmp_path / "o2").exists()


def test_fp32_runtime_reference_is_still_there(export_copy, tmp_path, capsys):
    status, err = _main([export_copy, "--out", tmp_path / "o", "--fp32-runtime", "reference", *FAST], capsys)
    assert status in (0, 1), err
    rel = _report(tmp_path / "o")["reliability"]
    assert rel["fp32_runtime"] == "pytorch" and "as --fp32-runtime reference asks" in rel["fp32_runtime_choice"]
    assert "note:" not in err


def test_fp32_runtime_default_is_documented_in_the_help(capsys):
    from pipeline.evaluate import main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: onnxruntime, as in the export, unless --model or --weights names another FP32 model" in text


def test_evaluate_reports_its_steps_on_stderr(export_copy, tmp_path, capsys):
    """Like the export's stage lines: one line per step on stderr; no bar when stderr is not a terminal."""
    status, err = _main([export_copy, "--out", tmp_path / "o", *FAST], capsys)
    assert status in (0, 1)
    steps = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert [s.split()[0] + " " + s.split()[1] for s in steps] == ["[1/3] checks", "[2/3] engine", "[3/3] report"]
    assert "FP32 model (onnxruntime)" in steps[0] and "images through both models" in steps[1]
    assert "reliability: FP32" not in err and "\r" not in err


def test_evaluate_shows_a_progress_bar_with_an_eta_on_a_terminal(export_copy, tmp_path):
    import fcntl
    import struct
    import termios
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal 160 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.evaluate",
                             *with_own([export_copy, "--out", tmp_path / "o", "--corruptions", "gaussian_noise",
                                        "--workers", "1"])],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=slave, env=_env())
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not b:
                break
            chunks.append(b)
        proc.wait(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode in (0, 1), text
    total = 80 + 5 * 200  # the validation split and five shifted test sets (the clean logits are the export's)
    assert f"reliability: FP32 (onnxruntime) + int8, 1 worker" in text and f"/{total} [" in text, text
    assert "<" in text.split(f"/{total} [", 1)[1][:20]  # elapsed<remaining: the ETA field
    assert "[1/3] checks" in text and "[3/3] report" in text
