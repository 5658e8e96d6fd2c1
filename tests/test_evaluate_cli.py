"""``python -m pipeline.evaluate`` on bad input: one ``error:`` line, exit 2, no traceback, no output folder left
behind; the worker pool never hangs on a model it cannot load; the export's relative paths resolve from another
folder; the validation split's size adapts to small datasets. Real LiteRT kernels and real worker processes."""
from __future__ import annotations

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


def _main(args, capsys):
    from pipeline.evaluate import main
    status = main([str(a) for a in args])
    err = capsys.readouterr().err
    return status, err


def _one_error_line(err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def _cli(args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


# --------------------------------------------------------------------------- defect 1: no endless worker respawn


def _bad_pair(exported: Path, tflite_path):
    from pipeline.parallel_eval import ModelPair
    from pipeline.preprocessing import Preprocessing
    rep = _report(exported)
    return ModelPair(model_spec=str(exported / "model.onnx"), weights=None, tflite_path=tflite_path,
                     input_layout=rep["preprocessing"]["tflite_input_layout"], kernels="xnnpack",
                     preprocessing=Preprocessing.from_dict(rep["preprocessing"]))


@pytest.fixture()
def reset_worker_state():
    from pipeline import parallel_eval
    yield
    parallel_eval._WORKER = None
    parallel_eval._INIT_ERROR = None


def test_init_worker_keeps_its_error_for_run_job(exported, tmp_path, reset_worker_state):
    """The pool initializer never raises; the first job raises what went wrong (a PipelineError keeps its
    class and message, anything else becomes a RuntimeStageError that names it)."""
    from pipeline.parallel_eval import Job, _init_worker, _run_job
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"garbage\n")
    arrays = {"test": np.zeros((4, 12, 12), np.uint8)}
    _init_worker(_bad_pair(exported, str(garbage)), arrays)  # must not raise
    with pytest.raises(RuntimeStageError, match="LiteRT cannot load"):
        _run_job(Job("test", 0, 4))
    _init_worker(_bad_pair(exported, None), arrays)  # Path(None): a TypeError inside the worker
    with pytest.raises(RuntimeStageError, match="a worker process could not build the models: TypeError"):
        _run_job(Job("test", 0, 4))


def test_pool_reports_a_failed_initializer_instead_of_respawning(exported, tmp_path):
    """Real spawn workers whose models cannot load: the parent gets the error from the first job."""
    import multiprocessing as mp
    from pipeline.parallel_eval import Job, _init_worker, _run_job
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"garbage\n")
    arrays = {"test": np.zeros((4, 12, 12), np.uint8)}
    pool = mp.get_context("spawn").Pool(2, initializer=_init_worker,
                                        initargs=(_bad_pair(exported, str(garbage)), arrays))
    try:
        res = pool.map_async(_run_job, [Job("test", 0, 2), Job("test", 2, 4)], chunksize=1)
        with pytest.raises(RuntimeStageError, match="LiteRT cannot load"):
            res.get(timeout=90)  # a multiprocessing.TimeoutError here means the old endless respawn
    finally:
        pool.terminate()
        pool.join()


def test_engine_with_two_workers_checks_models_in_the_parent(exported, tmp_path):
    from pipeline.parallel_eval import Engine, clean_jobs
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"garbage\n")
    arrays = {"test": np.zeros((4, 12, 12), np.uint8)}
    def hung(signum, frame):
        raise TimeoutError("Engine.run hung: the pool respawns workers whose models cannot load")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(90)
    try:
        with Engine(_bad_pair(exported, str(garbage)), arrays, workers=2) as engine:
            with pytest.raises(RuntimeStageError, match="LiteRT cannot load"):
                engine.run(clean_jobs("test", 4))
            assert engine._pool is None  # failed before starting any worker
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- defect 6: --corruptions ""

@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_empty_corruptions_is_an_error(export_copy, tmp_path, capsys, value):
    from pipeline.reliability import parse_corruptions
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


