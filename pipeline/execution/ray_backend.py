"""The Ray backend: cells as Ray tasks on a local Ray instance (``--ray auto``) or an existing cluster
(``--ray ADDRESS``). Ray is an optional dependency (``pip install .[ray]``), imported only here and only when asked.

- One task per cell, one CPU each. A task is never retried by Ray itself (``max_retries=0``): the runner retries a
  cell whose worker died (``WorkerCrashedError``, ``NodeDiedError``, ``OutOfMemoryError``, a lost object), bounded,
  and records the attempts; a cell that fails for a real reason comes back as a ``failed`` record, not an error.
- Artifact files travel by content hash. By default through Ray's object store: each distinct file is put once,
  the worker writes it into ``$TMPDIR/edge-int8-cells/SHA256/NAME`` (reused by later cells on that node) and checks
  its hash. With ``shared_dir`` (a folder every node mounts, e.g. NFS), the file is copied there once as
  ``SHA256/NAME`` and workers read it in place, after checking the hash.
- The cell's function reaches the workers by reference (module and name), so the ``pipeline`` package must be
  installed on every node (on a local instance it is: the workers run this interpreter).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.execution.cells import Cell, execute, sha256_file
from pipeline.execution.local import WorkerLost

OBJECT_STORE_BYTES = 256 * 1024 * 1024  # a local instance's object store: artifacts and small records only


def _materialize(files: dict) -> dict[str, str]:
    """Worker side: {role: (sha256, name, ObjectRef | shared path)} -> {role: local path}, hashes checked."""
    out = {}
    for role, (sha, name, where) in files.items():
        if isinstance(where, str):  # a shared folder
            if sha256_file(where) != sha:
                raise UsageError(f"artifact {where} changed during the run (content hash differs); rerun the study")
            out[role] = where
            continue
        folder = Path(tempfile.gettempdir()) / "edge-int8-cells" / sha
        path = folder / name
        if not (path.is_file() and sha256_file(path) == sha):
            import ray
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.{os.getpid()}.part"
            tmp.write_bytes(ray.get(where))
            os.replace(tmp, path)
            if sha256_file(path) != sha:
                raise UsageError(f"artifact {name} arrived damaged (content hash differs); rerun the study")
        out[role] = str(path)
    return out


def run_remote(cell: Cell, files: list) -> dict:
    """The task body on a Ray worker. ``files`` is a one-element list so Ray passes the refs inside unresolved."""
    from pipeline.execution.local import quiet_worker_init
    quiet_worker_init()
    try:
        paths = _materialize(files[0])
    except Exception as e:  # noqa: BLE001 - an artifact that cannot be placed fails this cell only
        return {"key": cell.key, "status": "failed", "error": f"artifact not available on this worker: {e}",
                "error_kind": "artifact", "seconds": 0.0}
    return execute(cell, paths)


class RayBackend:
    name = "ray"

    def __init__(self, address: str = "auto", workers: int | None = None, shared_dir: str | None = None,
                 verbose: bool = False):
        self.address, self.shared_dir, self.verbose = address, shared_dir, verbose
        self.workers = workers
        self.slots = workers or 1
        self._connected = False
        self._remote = None
        self._refs: dict[str, object] = {}  # sha256 -> ObjectRef of the file's bytes
        self._cluster: dict = {}

    def start(self) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError("--ray needs Ray, which is not installed; pip install '.[ray]' (ray==2.60.0), or leave "
                             "out --ray to use the local process pool") from None
        if ray.is_initialized():
            ray.shutdown()
        kwargs = dict(include_dashboard=False, log_to_driver=self.verbose, configure_logging=True,
                      logging_level="ERROR" if not self.verbose else "INFO")
        try:
            if self.address == "auto":  # a new local instance, sized by --workers
                n = self.workers or len(os.sched_getaffinity(0))
                ray.init(num_cpus=n, object_store_memory=OBJECT_STORE_BYTES, **kwargs)
            else:
                ray.init(address=self.address, **kwargs)
        except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ...
            where = "start a local Ray instance" if self.address == "auto" else f"join the Ray cluster at {self.address}"
            raise UsageError(f"could not {where}: {' '.join(str(e).split())[:300]}; check the address (ray status "
                             "on the head node prints it), or leave out --ray") from None
        self._connected = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        self.slots = min(self.workers, cpus) if self.workers else cpus
        self.workers = self.slots
        self._cluster = {"cpus": cpus, "nodes": nodes}
        self._remote = ray.remote(num_cpus=1, max_retries=0)(run_remote)

    def describe(self) -> dict:
        where = "a local Ray instance started for this run" if self.address == "auto" else f"Ray cluster {self.address}"
        return {"backend": "ray", "workers": self.workers, "where": where, **self._cluster,
                "artifacts": f"shared folder {self.shared_dir}" if self.shared_dir else "Ray object store"}

    def _ship(self, path: str, sha: str):
        if self.shared_dir:
            dest = Path(self.shared_dir) / sha / Path(path).name
            if not (dest.is_file() and sha256_file(dest) == sha):
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
                shutil.copyfile(path, tmp)
                os.replace(tmp, dest)
            return str(dest)
        if sha not in self._refs:
            import ray
            self._refs[sha] = ray.put(Path(path).read_bytes())
        return self._refs[sha]

    def submit(self, cell: Cell, files: dict[str, tuple[str, str]], slot: int):
        shipped = {role: (sha, Path(path).name, self._ship(path, sha)) for role, (path, sha) in files.items()}
        return self._remote.remote(cell, [shipped])

    def wait(self, handles: list, timeout: float) -> list[tuple[object, dict | WorkerLost]]:
        import ray
        from ray import exceptions as rx
        lost = tuple(getattr(rx, n) for n in ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError",
                                              "ObjectLostError", "LocalRayletDiedError", "RaySystemError")
                     if hasattr(rx, n))
        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            try:
                out.append((ref, ray.get(ref)))
            except lost as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                out.append((ref, WorkerLost(f"its Ray worker died ({type(e).__name__}: {first[:200]})")))
            except rx.RayTaskError as e:  # BaseException inside the task (SystemExit ...): the cell's own failure
                out.append((ref, {"key": "?", "status": "failed", "error_kind": "unexpected",
                                  "error": " ".join(str(e.cause if e.cause else e).split())[:300]}))
        return out

    def cancel(self, handles: list) -> None:
        import ray
        for ref in handles:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass

    def close(self) -> None:
        if self._connected:
            import ray
            self._refs.clear()
            ray.shutdown()
            self._connected = False
