"""Small cells that exercise the execution layer itself (its tests, and the Ray overhead benchmark).

They live in the package, not in the tests, because every backend must import a cell's function by module and
name on its workers, and the package is what every worker (a spawn process, a Ray worker) can import.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import numpy as np

from pipeline.errors import DataError


def compute_cell(config: dict, files: dict, seed: int) -> dict:
    """A deterministic result from the config, the seed and the artifact files' bytes: a seeded matrix product
    (``config["n"]`` square, default 64) and each file's sha256 and size as the worker saw it."""
    t_end = time.perf_counter() + float(config.get("busy_seconds", 0.0))
    rng = np.random.default_rng(seed)
    n = int(config.get("n", 64))
    a = rng.standard_normal((n, n), dtype=np.float32)
    value = float(np.linalg.norm(a @ a.T).round(3))
    while time.perf_counter() < t_end:  # CPU work of a known length (overhead measurements)
        np.tanh(a)
    seen = {role: {"sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest(), "bytes": Path(p).stat().st_size}
            for role, p in sorted(files.items())}
    return {"value": value, "files": seen, "echo": config.get("echo")}


def failing_cell(config: dict, files: dict, seed: int) -> dict:
    """Fails for a real reason, as a cell whose input is bad does."""
    raise DataError(config.get("message", "this cell's input is bad"))


def crash_once_cell(config: dict, files: dict, seed: int) -> dict:
    """Kills its own worker process with SIGKILL the first time it runs (it leaves ``config["marker"]`` behind), and
    computes like ``compute_cell`` afterwards: a worker that dies under a cell, then a retry that succeeds. With
    ``config["always"]`` it kills its worker every time (a cell that needs more memory than a worker has)."""
    marker = Path(config["marker"])
    if config.get("always") or not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return compute_cell(config, files, seed)


def sleep_cell(config: dict, files: dict, seed: int) -> dict:
    """Sleeps ``config["seconds"]`` then records its pid (for stopping a run while cells are running)."""
    time.sleep(float(config.get("seconds", 1.0)))
    return {"slept": float(config.get("seconds", 1.0)), "seed": seed}
