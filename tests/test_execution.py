"""The execution layer (pipeline/execution): cells on the local pool and on Ray give the same records; faults.

The Ray tests start a local Ray instance with 2 CPUs (as ``--ray auto --workers 2`` does); the study tests run
real exports of zoo models on Fashion-MNIST through ``python -m pipeline.study precision``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.execution import Cell, Store, run_cells
from pipeline.execution.local import LocalBackend
from pipeline.execution.probes import compute_cell, crash_once_cell, failing_cell
from pipeline.study import study_figures as _figures

ROOT = Path(__file__).resolve().parents[1]


def _cells(files=()):
    return [Cell(key=f"c{i}", fn=compute_cell, config={"n": 16 + 8 * i, "echo": i}, seed=i, files=files)
            for i in range(5)]


def _results(records):
    return [(r["key"], r["status"], r.get("result")) for r in records]


# --------------------------------------------------------------------------- local backend

def test_records_come_back_in_cell_order_whatever_the_number_of_workers(tmp_path):
    art = tmp_path / "artifact.bin"
    art.write_bytes(os.urandom(5000))
    cells = _cells(files=(("blob", str(art)),))
    one = run_cells(cells, LocalBackend(1), progress=False)
    two = run_cells(list(reversed(cells)), LocalBackend(2), progress=False)
    assert [r["key"] for r in one] == [c.key for c in cells]
    assert _results(one) == _results(list(reversed(two)))
    import hashlib
    assert {r["result"]["files"]["blob"]["sha256"] for r in one} == {hashlib.sha256(art.read_bytes()).hexdigest()}
    assert len({r["pid"] for r in two}) == 2 and all(r["pid"] != os.getpid() for r in two)
    assert all(r["pid"] == os.getpid() for r in one)  # workers=1: this process


def test_a_cell_that_fails_is_reported_and_the_others_finish():
    cells = _cells()[:2] + [Cell("bad", failing_cell, {"message": "image 3 is empty; remove it"})] + _cells()[2:]
    records = run_cells(cells, LocalBackend(2), progress=False)
    bad = records[2]
    assert bad["status"] == "failed" and bad["error"] == "image 3 is empty; remove it" and bad["attempts"] == 1
    assert [r["status"] for r in records] == ["done", "done", "failed", "done", "done", "done"]


def test_a_worker_killed_under_a_cell_is_retried_and_the_result_is_the_same(tmp_path):
    clean = run_cells([Cell("k", compute_cell, {"n": 32, "marker": str(tmp_path / "m")}, seed=3)], LocalBackend(1),
                      progress=False)[0]
    records = run_cells([Cell("k", crash_once_cell, {"n": 32, "marker": str(tmp_path / "m")}, seed=3)] + _cells(),
                        LocalBackend(2), progress=False)
    r = records[0]
    assert (tmp_path / "m").exists()  # it did kill its worker once
    assert r["status"] == "done" and r["attempts"] == 2 and "killed by SIGKILL" in r["lost"][0]
    assert r["result"] == clean["result"]
    assert all(x["status"] == "done" and x["attempts"] == 1 for x in records[1:])


def test_retries_are_bounded(tmp_path):
    cell = Cell("k", crash_once_cell, {"marker": str(tmp_path / "m"), "always": True})
    r = run_cells([cell, *_cells()[:2]], LocalBackend(2), retries=1, progress=False)
    assert r[0]["status"] == "failed" and r[0]["attempts"] == 2 and r[0]["error_kind"] == "worker_lost"
    assert "killed by SIGKILL, 2 times" in r[0]["error"]
    assert [x["status"] for x in r[1:]] == ["done", "done"]


def test_resume_keeps_cells_done_and_reruns_what_changed(tmp_path):
    store = Store(tmp_path / "cells")
    art = tmp_path / "a.bin"
    art.write_bytes(b"one")
    cells = _cells(files=(("blob", str(art)),))[:3]
    first = run_cells(cells, LocalBackend(1), store=store, progress=False)
    again = run_cells(cells, LocalBackend(1), store=store, resume=True, progress=False)
    assert all(r["resumed"] for r in again) and _results(again) == _results(first)
    changed = [cells[0], Cell("c1", compute_cell, {"n": 99}, seed=1, files=cells[1].files), cells[2]]
    mixed = run_cells(changed, LocalBackend(1), store=store, resume=True, progress=False)
    assert [r["resumed"] for r in mixed] == [True, False, True]
    art.write_bytes(b"two")  # an artifact's content is part of the cell: every cell reading it runs again
    assert not any(r["resumed"] for r in run_cells(changed, LocalBackend(1), store=store, resume=True,
                                                    progress=False))


def test_progress_counts_cells_with_an_eta(tmp_path):
    import io
    stream = io.StringIO()
    run_cells(_cells(), LocalBackend(2), progress=True, stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("cells 5/5 done, 0 running, 0 failed")
    assert any("ETA" in ln for ln in lines) and any(", 2 running" in ln for ln in lines)


def test_progress_says_why_a_cell_failed_not_only_how_many():
    import io
    stream = io.StringIO()
    run_cells([Cell("bad", failing_cell, {"message": "image 3 is empty; remove it"})] + _cells()[:1],
              LocalBackend(1), progress=True, stream=stream)
    lines = stream.getvalue().splitlines()
    assert "cell bad failed: image 3 is empty; remove it" in lines
    assert lines[-1].startswith("cells 1/2 done, 0 running, 1 failed")


_INTERRUPTIBLE = """
import sys
from pipeline.cli import run_main
from pipeline.execution import Cell, Store, run_cells, make_backend, ExecutionOptions
from pipeline.execution.probes import sleep_cell
if __name__ == "__main__":  # spawn workers import this file again
    cells = [Cell(f"s{i}", sleep_cell, {"seconds": 0.2 if i == 0 else 30}, seed=i) for i in range(4)]
    backend = make_backend(ExecutionOptions(workers=2, ray=sys.argv[1] if len(sys.argv) > 1 else None))
    sys.exit(run_main(lambda: run_cells(cells, backend, store=Store(sys.argv[0] + ".cells")) and 0,
                      interrupted_note="; finished cells are kept"))
"""


def test_stop_signals_stay_held_while_the_first_worker_starts():
    """A Ctrl-C that reaches a worker still starting up (``import site``) killed it with a traceback: CPython's
    resource tracker, started with the first pool's queues, unblocks SIGINT and SIGTERM in the calling thread once it
    has spawned, so the first worker used to be spawned unprotected. Run in a fresh interpreter, where no tracker
    runs yet: the mask must still hold both signals after the worker is spawned."""
    probe = (
        "import multiprocessing as mp, os, signal\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from pipeline.execution.local import stop_signals_deferred\n"
        "with stop_signals_deferred():\n"
        "    pool = ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'))\n"
        "    future = pool.submit(os.getpid)\n"
        "    held = signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
        "future.result(timeout=60); pool.shutdown()\n"
        "print(sorted(s.name for s in held & {signal.SIGINT, signal.SIGTERM}))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['SIGINT',", "'SIGTERM']"]


@pytest.mark.parametrize("ray", [None, "auto"])
def test_ctrl_c_stops_every_worker_and_keeps_the_cells_done(tmp_path, ray):
    script = tmp_path / "run.py"
    script.write_text(_INTERRUPTIBLE)
    proc = subprocess.Popen([sys.executable, str(script), *([ray] if ray else [])], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = ""
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the first cell is done and the next ones are running
        line = proc.stderr.readline()
        err += line
        if line.startswith("cells 1/4 done"):
            break
    else:
        proc.kill()
        pytest.fail(f"the first cell did not finish: {err[-2000:]}")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=120)
    err += rest
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted; finished cells are kept" and "Traceback" not in err
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], alive
    assert len(list((tmp_path / "run.py.cells").glob("*.json"))) == 1  # the finished cell, ready for --resume


# --------------------------------------------------------------------------- Ray backend

def test_ray_gives_the_same_records_as_the_local_pool_and_ships_files_by_hash(tmp_path):
    from pipeline.execution.ray_backend import RayBackend
    art = tmp_path / "model.bin"
    art.write_bytes(os.urandom(300_000))
    cells = _cells(files=(("model", str(art)),)) + [Cell("bad", failing_cell, {"message": "bad input"})]
    local = run_cells(cells, LocalBackend(1), progress=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    for backend in (RayBackend("auto", workers=2), RayBackend("auto", workers=2, shared_dir=str(shared))):
        on_ray = run_cells(cells, backend, progress=False)
        assert _results(on_ray) == _results(local)
        assert all(r["pid"] != os.getpid() for r in on_ray if r["status"] == "done")
        assert backend.describe()["cpus"] == 2
    import hashlib
    sha = hashlib.sha256(art.read_bytes()).hexdigest()
    assert (shared / sha / "model.bin").read_bytes() == art.read_bytes()  # the shared folder, by content hash


def test_ray_retries_a_cell_whose_worker_died(tmp_path):
    from pipeline.execution.ray_backend import RayBackend
    cell = Cell("k", crash_once_cell, {"n": 32, "marker": str(tmp_path / "m")}, seed=3)
    clean = run_cells([Cell("k", compute_cell, dict(cell.config), seed=3)], LocalBackend(1), progress=False)[0]
    r = run_cells([cell, *_cells()[:3]], RayBackend("auto", workers=2), progress=False)
    assert r[0]["status"] == "done" and r[0]["attempts"] == 2 and "WorkerCrashedError" in r[0]["lost"][0]
    assert r[0]["result"] == clean["result"] and [x["status"] for x in r[1:]] == ["done"] * 3


def test_ray_is_not_imported_without_ray():
    code = ("import sys; from pipeline.execution import run_cells; from pipeline.execution.local import LocalBackend;"
            "from pipeline.execution.probes import compute_cell; from pipeline.execution import Cell;"
            "run_cells([Cell('a', compute_cell, {})], LocalBackend(1), progress=False);"
            "from pipeline import study; assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-1500:]


@pytest.mark.parametrize("argv, message", [
    (["--ray", "nowhere"], "is not a Ray address"),
    (["--workers", "0"], "must be at least 1"),
    (["--shared-dir", "/tmp"], "--shared-dir only applies with --ray"),
    (["--ray", "auto", "--shared-dir", "/no/such/folder"], "is not a folder"),
    (["--retries", "11"], "out of range"),
    (["--resume", "--overwrite"], "pass one"),
    (["--models", "zoo:refcnn", "--weights", "w.pt"], "--weights applies to one --model"),
    (["--models", "zoo:refcnn,zoo:refcnn"], "twice"),
    (["--model", "zoo:refcnn", "--models", "all"], "not allowed with argument"),
])
def test_execution_flags_refuse_bad_values_in_one_line(tmp_path, capsys, argv, message):
    from pipeline import study
    assert study.main(["precision", "--out", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s").exists()


def test_resume_needs_a_study_and_a_stopped_study_is_not_replaced_without_a_flag(tmp_path, capsys):
    from pipeline import study
    assert study.main(["precision", "--resume", "--out", str(tmp_path / "new")]) == 2
    assert "holds no study to continue" in capsys.readouterr().err
    (tmp_path / "stopped" / "cells").mkdir(parents=True)
    assert study.main(["precision", "--out", str(tmp_path / "stopped")]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


# --------------------------------------------------------------------------- the study on Ray (real exports)

QUICK = ["--models", "zoo:refcnn,zoo:resnet8", "--targets", "tflite-int8,tflite-dynamic", "--eval-limit", "300"]




def _study(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.study", "precision", *QUICK, "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def local_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "local"
    proc = _study(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_study_on_ray_equals_the_local_run(local_study, tmp_path):
    proc = _study(tmp_path / "ray", "--ray", "auto", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _figures(tmp_path / "ray") == _figures(local_study)
    ex = json.loads((tmp_path / "ray" / "study.json").read_text())["execution"]
    assert ex["backend"] == "ray" and ex["cells_at_once"] == 2 and len(ex["cells"]) == 4
    assert all(c["seconds"] > 0 and c["attempts"] == 1 for c in ex["cells"])
    assert "2 exports ran at once" in proc.stdout  # latency is labelled as contended
    page = (tmp_path / "ray" / "study.html").read_text()
    assert page.count("<table>") == 2 and "zoo:resnet8" in page and "<script" not in page
    # as a run stopped before its last cell leaves it: --resume (here on the local pool) runs that cell only
    stored = sorted((tmp_path / "ray" / "cells").glob("*.json"))
    victim = json.loads(stored[-1].read_text())["key"]
    stored[-1].unlink()
    (tmp_path / "ray" / "study.json").unlink()
    proc = _study(tmp_path / "ray", "--resume", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ex = json.loads((tmp_path / "ray" / "study.json").read_text())["execution"]
    assert [c["key"] for c in ex["cells"] if not c["resumed"]] == [victim] and "(3 resumed)" in proc.stderr
    assert _figures(tmp_path / "ray") == _figures(local_study)


@pytest.mark.slow
def test_a_ray_worker_killed_during_the_study_changes_nothing(local_study, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.study", "precision", *QUICK, "--out", str(out),
                             "--ray", "auto", "--workers", "2"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = p.info["cmdline"] or []
            if cmd and cmd[0].startswith("ray::run_remote"):  # a Ray worker running a cell right now
                time.sleep(2.0)  # well inside the export
                try:
                    p.kill()
                    killed = p.info["pid"]
                except psutil.NoSuchProcess:
                    continue
                break
        time.sleep(0.2)
    out_text, err = proc.communicate(timeout=900)
    assert killed is not None, f"no Ray worker was seen running a cell: {err[-2000:]}"
    assert proc.returncode == 0, err[-3000:]
    assert _figures(out) == _figures(local_study)
    cells = json.loads((out / "study.json").read_text())["execution"]["cells"]
    retried = [c for c in cells if c["attempts"] == 2]
    assert len(retried) == 1 and "Ray worker died" in retried[0]["lost"][0], cells


# --------------------------------------------------------------------------- the reliability jobs on Ray

def test_export_refuses_ray_without_reliability(tmp_path, capsys):
    from pipeline import export
    assert export.main(["--ray", "auto", "--out", str(tmp_path / "o")]) == 2
    assert "add --reliability" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_reliability_report_on_ray_equals_the_local_one(tmp_path):
    """pipeline.evaluate --ray auto: every job (1000 images of one shifted set) a Ray task, the models and images
    shipped by content hash; the report's figures are those of the local process pool."""
    import shutil
    exp = tmp_path / "exp"
    proc = subprocess.run([sys.executable, "-m", "pipeline.export", "--eval-limit", "2000", "--out", str(exp)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.copytree(exp, tmp_path / "exp_ray")
    args = ["--eval-limit", "2000", "--corruptions", "gaussian_noise,rotate", "--severities", "1,3",
            "--val-size", "1000", "--workers", "2"]
    for folder, extra in ((exp, []), (tmp_path / "exp_ray", ["--ray", "auto"])):
        proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", str(folder), *args, *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
    local, ray = (json.loads((f / "report.json").read_text()) for f in (exp, tmp_path / "exp_ray"))
    sections = ("calibration_drift", "temperature_scaling", "flips", "per_class", "shifts", "gates")
    assert {k: local[k] for k in sections} == {k: ray[k] for k in sections}
    assert local["shifts"]["sets"] == 4 and ray["reliability"]["backend"] == "ray (auto)"
    assert "2 Ray worker(s)" in ray["reliability"]["how"] and ray["reliability"]["workers"] == 2


def test_ray_joins_a_running_cluster_by_address(tmp_path):
    """--ray HOST:PORT: a Ray head started on its own (as `ray start --head` on a cluster's head node) is joined,
    the cells run there, and leaving it does not stop it."""
    import socket
    from pipeline.execution.ray_backend import RayBackend
    ray_bin = Path(sys.executable).parent / "ray"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    import tempfile
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    start = subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        backend = RayBackend(f"127.0.0.1:{port}", workers=None)
        records = run_cells(_cells(), backend, progress=False)
        assert _results(records) == _results(run_cells(_cells(), LocalBackend(1), progress=False))
        assert backend.describe()["cpus"] == 2 and backend.workers == 2  # every CPU of the cluster by default
        status = subprocess.run([str(ray_bin), "status", f"--address=127.0.0.1:{port}"], capture_output=True,
                                text=True, env=env, timeout=120)
        assert status.returncode == 0, status.stderr[-1000:]  # still up after the run left it
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)
        import shutil
        shutil.rmtree(temp, ignore_errors=True)
