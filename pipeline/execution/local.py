"""The local backend: cells in this process (``workers=1``) or in a pool of worker processes on this machine.

No Ray is needed or imported. With ``workers > 1`` each worker slot is a process pool of one ``spawn`` process,
reused from cell to cell (imports and caches stay warm). One slot per process, not one pool of N, so a worker that
dies (killed, out of memory, a crash in native code) is tied to the one cell it was running: that cell is retried
in a fresh process, the others are not disturbed. Artifact files are read where they lie (same machine).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker

from pipeline.execution.cells import Cell, execute

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def stop_signals_deferred():
    """Hold SIGINT and SIGTERM while worker processes are started, then act on them.

    A Ctrl-C (sent to the whole process group) or a SIGTERM that comes while a worker is being started would
    otherwise interrupt ``Process.start`` half-way (a worker nobody knows of, reading from a closed pipe) or the
    worker's own start-up (a traceback). So: the signals are blocked in this thread, which the workers inherit
    across fork and exec (their initializer then ignores SIGINT, handled here, and unblocks both), and a signal
    that reaches this process meanwhile, through another thread, is only recorded; once every worker is started,
    the recorded signal is raised here as it would have been (KeyboardInterrupt or ``Terminated``)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # CPython's resource tracker, started with the first pool's queues, unblocks SIGINT and SIGTERM in this thread
    # once it has spawned (its own start-up is protected, the next worker's would not be): start it first.
    resource_tracker.ensure_running()
    got: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending signal is delivered now, and recorded
        for s, h in previous.items():
            signal.signal(s, h)
    if got:
        handler = previous[got[0]]
        if callable(handler):
            handler(got[0], None)  # KeyboardInterrupt, or errors.Terminated from raise_on_sigterm
        elif handler == signal.SIG_DFL:
            signal.raise_signal(got[0])


def quiet_worker_init() -> None:
    """Initializer of every local worker process: Ctrl-C is the parent's (it stops the workers), the stop signals
    the parent blocked while starting us are unblocked, and TensorFlow/absl are quiet."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        from pipeline import quiet
        quiet.configure(False)
    except Exception:  # noqa: BLE001 - an initializer must never raise (the pool would respawn it forever)
        pass


class WorkerLost(Exception):
    """The process running a cell died; the cell itself may be fine (retried by the runner)."""


class LocalBackend:
    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self.slots = self.workers
        self._pools: list[ProcessPoolExecutor | None] = [None] * self.workers
        self._procs: dict[int, list] = {}
        self._inline: list = []

    def describe(self) -> dict:
        kind = "this process" if self.workers == 1 else f"{self.workers} local worker processes (spawn)"
        return {"backend": "local", "workers": self.workers, "where": kind}

    def start(self) -> None:
        pass

    def submit(self, cell: Cell, files: dict[str, tuple[str, str]], slot: int):
        files = {role: path for role, (path, _sha) in files.items()}  # same machine: read where they lie
        if self.workers == 1:
            self._inline.append((cell, files))  # run in wait(): Ctrl-C there stops it like any other work
            return ("inline", cell.key)
        if self._pools[slot] is None:
            with stop_signals_deferred():
                pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=quiet_worker_init)
                future = pool.submit(execute, cell, files)
            self._pools[slot] = pool
        else:
            future = self._pools[slot].submit(execute, cell, files)
        self._procs[slot] = list((getattr(self._pools[slot], "_processes", None) or {}).values())
        future.slot = slot
        return future

    def wait(self, handles: list, timeout: float) -> list[tuple[object, dict | WorkerLost]]:
        """Handles that finished: (handle, record) or (handle, WorkerLost(reason))."""
        if self.workers == 1:
            cell, files = self._inline.pop(0)
            return [(handles[0], execute(cell, files))]
        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            try:
                out.append((f, f.result()))
            except BrokenProcessPool:
                out.append((f, WorkerLost(self._death(f.slot))))
                self._drop(f.slot)
        return out

    def _death(self, slot: int) -> str:
        procs = self._procs.get(slot, [])
        codes: list[int] = []
        deadline = time.monotonic() + 5
        while procs and not codes and time.monotonic() < deadline:
            # the pool's own thread may be reaping the same process right now (its waitpid wins, ours sees ECHILD
            # and reads no code): the code it stores on the Process object shows up a moment later
            for p in procs:
                p.join(timeout=0.2)
            codes = [p.exitcode for p in procs if p.exitcode is not None]
        code = codes[0] if codes else None
        if code is not None and code < 0:
            try:
                return f"its worker process was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"its worker process was killed by signal {-code}"
        return f"its worker process exited (status {code})" if code is not None else "its worker process died"

    def _drop(self, slot: int) -> None:
        pool, self._pools[slot] = self._pools[slot], None
        procs = self._procs.pop(slot, [])
        # Workers first, then the pool: shutting the pool down releases its queues' semaphores, and a worker still
        # starting up (a SIGTERM right after it was spawned) would fail to open them and print a traceback.
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop every worker at once (the end of a run, an error, Ctrl-C or SIGTERM); they hold nothing to save:
        finished cells are already in the store."""
        for slot in range(len(self._pools)):
            self._drop(slot)
