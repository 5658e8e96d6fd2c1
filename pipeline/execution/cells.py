"""A cell: one independent piece of a study or a large evaluation, and what running it produces.

A cell is pure. Its inputs are a module-level function, a JSON-able config, a seed and the artifact files it reads
(named by role, shipped by content hash: :mod:`pipeline.execution.shipping`); its output is a small JSON-able
record. Nothing else flows in or out, so a cell gives the same record wherever it runs (this process, a local
worker process, a Ray worker on another machine) and in whatever order the cells finish.

``execute`` is what every backend runs on the worker side. A cell that fails for a real reason (a
``PipelineError``: a model that does not convert, a bad input; or any other exception) becomes a ``failed``
record carrying its one-line error; it does not stop the other cells. A worker that dies under a cell (killed,
out of memory, a crash in native code) is the backend's business: it retries the cell (bounded).

``Store`` keeps each finished cell's record in ``OUT/cells/`` as it finishes, so a run that was stopped
(Ctrl-C, a lost cluster) resumes with the cells already done. A stored record is reused only when its digest
(function, config, seed and the artifact files' content hashes) matches the cell's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.errors import PipelineError

CellFn = Callable[[dict, dict, int], dict]  # fn(config, files {role: local path}, seed) -> record


@dataclass(frozen=True)
class Cell:
    """One independent unit of work: ``fn(config, files, seed)``."""

    key: str  # unique within a run and readable: "refcnn/tflite-int8"
    fn: CellFn  # a module-level function (sent to workers by reference, never as code)
    config: dict = field(default_factory=dict)
    seed: int = 0
    files: tuple[tuple[str, str], ...] = ()  # (role, path on this machine): shipped to the worker by content hash

    @property
    def fn_name(self) -> str:
        return f"{self.fn.__module__}:{self.fn.__qualname__}"

    def digest(self, file_hashes: dict[str, str]) -> str:
        """What the cell's record depends on: reused on resume only when this matches."""
        body = {"fn": self.fn_name, "config": self.config, "seed": self.seed,
                "files": {role: file_hashes[path] for role, path in self.files}}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def execute(cell: Cell, files: dict[str, str]) -> dict:
    """Run one cell here (in whatever process this is) and return its record; never raises for the cell's own
    failure. ``files`` maps each role to the artifact's path on this machine."""
    import resource
    t0 = time.perf_counter()
    cpu0 = time.process_time() + _children_cpu(resource)
    record = {"key": cell.key, "host": socket.gethostname(), "pid": os.getpid()}
    try:
        result = cell.fn(dict(cell.config), dict(files), cell.seed)
    except PipelineError as e:
        record.update(status="failed", error=str(e), error_kind=type(e).__name__)
    except Exception as e:  # noqa: BLE001 - a cell's bug is that cell's failure, not the run's
        record.update(status="failed", error=f"{type(e).__name__}: {' '.join(str(e).split())}",
                      error_kind="unexpected")
    else:
        record.update(status="done", result=result)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    # CPU time of this process and of the child processes it waited for (the export's conversion worker): over
    # ``seconds``, how many cores the cell kept busy on average, which bounds what running cells side by side gains
    record["cpu_seconds"] = round(time.process_time() + _children_cpu(resource) - cpu0, 3)
    return record


def _children_cpu(resource) -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Store:
    """Finished cells' records, one JSON file each under ``folder`` (``OUT/cells``), for resuming."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80]
        return self.folder / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.json"

    def load(self, key: str, digest: str) -> dict | None:
        """The stored record of a finished cell with this digest, or None (never stored, another config, or a
        file that does not read as one of ours: that cell simply runs again)."""
        p = self._path(key)
        try:
            stored = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("digest") != digest or stored.get("key") != key:
            return None
        record = stored.get("record")
        return record if isinstance(record, dict) and record.get("status") == "done" else None

    def save(self, key: str, digest: str, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        p = self._path(key)
        tmp = p.with_name(p.name + ".part")
        tmp.write_text(json.dumps({"key": key, "digest": digest, "record": record}, indent=1) + "\n")
        os.replace(tmp, p)
