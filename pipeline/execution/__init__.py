"""One execution layer for independent cells (a study cell: one export + its evaluation), with two backends.

    cells ─► run_cells ─► backend ─► execute(cell, files) on a worker ─► small record ─► back, in cell order
                 │            local: this process, or N spawn processes (default; Ray not needed nor imported)
                 │            ray:   a local Ray instance (--ray auto) or a cluster (--ray ADDRESS)
                 └─ Store (OUT/cells/): finished records, so a stopped run resumes (--resume)

Guarantees, whatever the backend, the number of workers or the order cells finish in:
- the records come back in the order of the cells given, and a cell's record depends only on the cell (its
  function, config, seed and artifact files), so a study assembled from them is identical to the one-worker run;
- a worker that dies under a cell (killed, out of memory, a crash in native code) costs that cell one attempt: it
  is run again, at most ``retries`` more times, then reported as failed with the reason; a cell that fails for a
  real reason is reported with its error and the others go on;
- Ctrl-C or SIGTERM stops every worker at once and re-raises (the CLI prints one line, exit 130/143); finished
  cells are in the store already, so the same command with ``--resume`` skips them;
- progress on stderr: cells done / running / failed, with an ETA; each record carries its timings.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import cli
from pipeline.errors import UsageError
from pipeline.execution.cells import Cell, Store, execute, sha256_file

__all__ = ["Cell", "Store", "execute", "run_cells", "ExecutionOptions", "add_execution_arguments", "make_backend"]

DEFAULT_RETRIES = 2


@dataclass(frozen=True)
class ExecutionOptions:
    """How cells run: ``--workers``, ``--ray``, ``--shared-dir``, ``--retries`` (from ``add_execution_arguments``)."""

    workers: int | None = None  # None: 1 locally; all the Ray instance's / cluster's CPUs with --ray
    ray: str | None = None  # None: the local backend; "auto": start a local Ray instance; else a cluster address
    shared_dir: str | None = None
    retries: int = DEFAULT_RETRIES
    verbose: bool = False

    def describe(self) -> str:
        if self.ray is None:
            return "this process" if (self.workers or 1) == 1 else f"{self.workers} local worker processes"
        return f"Ray ({'a local instance' if self.ray == 'auto' else self.ray})"


def add_execution_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution (every cell is independent: the figures do not depend on these)")
    g.add_argument("--workers", type=cli.positive_int, default=None,
                   help="cells run at once (default 1 without --ray: in this process; with --ray: every CPU of the "
                        "Ray instance or cluster). Latency is measured while the others run: for latency, use 1")
    g.add_argument("--ray", type=cli.ray_address, metavar="auto|ADDRESS", default=None,
                   help="run the cells on Ray: auto starts a local Ray instance for this run, HOST:PORT or "
                        "ray://HOST:PORT joins a running cluster (pip install '.[ray]')")
    g.add_argument("--shared-dir", metavar="FOLDER",
                   help="with --ray: a folder every node mounts; artifact files go there by content hash instead of "
                        "through Ray's object store")
    g.add_argument("--retries", type=cli.retries, default=DEFAULT_RETRIES,
                   help="times a cell whose worker died (killed, out of memory, crashed) is run again")
    g.add_argument("--resume", action="store_true",
                   help="continue a stopped run in the same --out: cells already done (same config and artifact "
                        "files) are kept, the others run")


def execution_options(args) -> ExecutionOptions:
    if args.shared_dir is not None:
        if args.ray is None:
            raise UsageError("--shared-dir only applies with --ray; add --ray auto|ADDRESS or drop --shared-dir")
        if not Path(args.shared_dir).is_dir():
            raise UsageError(f"--shared-dir {args.shared_dir} is not a folder; pass a folder every node mounts")
    return ExecutionOptions(workers=args.workers, ray=args.ray, shared_dir=args.shared_dir, retries=args.retries,
                            verbose=getattr(args, "verbose", False))


def make_backend(opts: ExecutionOptions):
    if opts.ray is None:
        from pipeline.execution.local import LocalBackend
        return LocalBackend(opts.workers or 1)
    from pipeline.execution.ray_backend import RayBackend
    return RayBackend(opts.ray, opts.workers, opts.shared_dir, opts.verbose)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """A live count on stderr: ``cells 7/30 done, 2 running, 1 failed (3 resumed) | 1m40s, ETA 5m10s``."""

    def __init__(self, total: int, resumed: int, stream=None, enabled: bool = True):
        self.total, self.resumed = total, resumed
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.done = self.failed = self.running = self.retried = 0
        self._last = ""
        self._state = None

    def eta(self) -> float | None:
        finished = self.done + self.failed
        if not finished:
            return None
        left = self.total - self.resumed - finished
        return (time.perf_counter() - self.t0) / finished * left

    def line(self) -> str:
        eta = self.eta()
        parts = [f"cells {self.done + self.resumed}/{self.total} done, {self.running} running, {self.failed} failed"]
        if self.resumed:
            parts[0] += f" ({self.resumed} resumed)"
        if self.retried:
            parts[0] += f", {self.retried} retried"
        tail = f" | {_clock(time.perf_counter() - self.t0)}" + (f", ETA {_clock(eta)}" if eta is not None else "")
        return parts[0] + tail

    def note(self, text: str) -> None:
        """A line of its own (a cell's failure, with its reason), so a log says why and not only how many."""
        if not self.enabled:
            return
        if self.tty and self._last:
            print("\r" + " " * len(self._last) + "\r", end="", file=self.stream)
        print(text, file=self.stream, flush=True)
        self._last = ""

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            print("\r" + text.ljust(len(self._last)), end="\n" if final else "", file=self.stream, flush=True)
        else:  # a log: one line when a cell finishes or is retried
            state = (self.done, self.failed, self.retried)
            if state != self._state or final:
                print(text, file=self.stream, flush=True)
            self._state = state
        self._last = text


def run_cells(cells: list[Cell], backend, store: Store | None = None, resume: bool = False,
              retries: int = DEFAULT_RETRIES, progress: bool = True, stream=None, on_record=None) -> list[dict]:
    """Run every cell on ``backend``; return one record per cell, in the order of ``cells``.

    Each record: key, status (done / failed), result or error, attempts, seconds (inside the worker), wall_seconds
    (submitted to finished, as the driver saw it), host, pid, resumed, lost (why earlier attempts' workers died).
    ``on_record(cell, record)`` is called as each cell finishes (a caller's own progress bar)."""
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise UsageError(f"two cells share the key {dup!r}; each cell of a run needs its own")
    hashes: dict[str, str] = {}
    for c in cells:
        for role, path in c.files:
            if path not in hashes:
                try:
                    hashes[path] = sha256_file(path)
                except OSError as e:
                    raise UsageError(f"cannot read {role} file {path}: {e.strerror or e}; pass a readable file") from None
    digests = {c.key: c.digest(hashes) for c in cells}
    records: dict[str, dict] = {}
    if resume and store is not None:
        for c in cells:
            r = store.load(c.key, digests[c.key])
            if r is not None:
                records[c.key] = dict(r, resumed=True)
    todo = [c for c in cells if c.key not in records]
    prog = Progress(len(cells), len(records), stream, enabled=progress)
    attempts = {c.key: 0 for c in todo}
    lost: dict[str, list[str]] = {c.key: [] for c in todo}
    queue = list(todo)
    inflight: dict[object, tuple[Cell, int, float]] = {}  # handle -> (cell, slot, submitted at)
    free_slots = list(range(getattr(backend, "slots", 1)))
    if todo:
        backend.start()
        free_slots = list(range(backend.slots))
    try:
        while queue or inflight:
            while queue and free_slots:
                cell = queue.pop(0)
                slot = free_slots.pop(0)
                files = {role: (path, hashes[path]) for role, path in cell.files}
                attempts[cell.key] += 1
                inflight[backend.submit(cell, files, slot)] = (cell, slot, time.perf_counter())
            prog.running = len(inflight)
            prog.show()
            for handle, outcome in backend.wait(list(inflight), timeout=1.0):
                cell, slot, t_sub = inflight.pop(handle)
                free_slots.append(slot)
                if isinstance(outcome, Exception):  # the worker died: the cell may be fine
                    lost[cell.key].append(str(outcome))
                    if attempts[cell.key] <= retries:
                        prog.retried += 1
                        queue.insert(0, cell)
                        continue
                    outcome = {"status": "failed", "error_kind": "worker_lost", "seconds": None,
                               "error": f"{outcome}, {attempts[cell.key]} times; not retried further (--retries "
                                        f"{retries}); a cell that kills its worker every time may need more memory"}
                rec = dict(outcome, key=cell.key, attempts=attempts[cell.key], lost=lost[cell.key], resumed=False,
                           wall_seconds=round(time.perf_counter() - t_sub, 3))
                records[cell.key] = rec
                if on_record is not None:
                    on_record(cell, rec)
                if rec["status"] == "done":
                    prog.done += 1
                    if store is not None:
                        store.save(cell.key, digests[cell.key], rec)
                else:
                    prog.failed += 1
                    prog.note(f"cell {cell.key} failed: {rec.get('error') or 'no reason given'}")
            free_slots.sort()
    except BaseException:
        cancel = getattr(backend, "cancel", None)
        if cancel is not None:
            cancel(list(inflight))
        raise
    finally:
        if todo:
            backend.close()
    prog.running = 0
    prog.show(final=True)
    return [records[c.key] for c in cells]
