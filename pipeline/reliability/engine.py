"""Run the FP32 model and the deployed TFLite model on many (shifted) inputs, batched and across cores.

The unit of work is a ``Job``: a block of images from one split (``test`` or ``val``), optionally
corrupted. The worker that takes a job generates the block's inputs once (corrupt the raw pixels, then the
preprocessing record's normalisation) and feeds that one array to both models, so FP32 and int8 always see
exactly the same inputs. Blocks are corrupted with a seed derived from (seed, block index), so the
shifted sets do not depend on the number of workers.

Workers are processes (``spawn``), each holding its own LiteRT interpreter (1 thread, the target's
kernels, batched) and its own FP32 model (PyTorch with 1 intra-op thread, or onnxruntime). LiteRT's
``invoke()`` holds the GIL in this build, so threads would not run interpreters in parallel. With
``workers=1`` everything runs in this process (no start-up cost; what the tests use). The pool is a
``concurrent.futures.ProcessPoolExecutor``: a worker that dies (killed, out of memory, a crash in native
code) breaks the pool and the run fails with a clear error instead of waiting forever, as a
``multiprocessing.Pool`` would.

int8 outputs do not depend on the interpreter's thread count (integer kernels), so the per-worker
interpreters reproduce the target's outputs exactly; ``tests/test_reliability.py`` checks this.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.inputs.preprocessing import Preprocessing

BLOCK = 1000  # images per job; part of the shifted sets' definition (the per-block seed)


@dataclass(frozen=True)
class ModelPair:
    """What a worker needs to rebuild both models on its own."""

    model_spec: str
    weights: str | None
    tflite_path: str
    input_layout: str
    kernels: str
    preprocessing: Preprocessing
    batch_size: int = 256
    fp32_onnx: str | None = None  # run FP32 from this ONNX file on onnxruntime instead of model_spec

    @property
    def fp32_runtime(self) -> str:
        if self.fp32_onnx or self.model_spec.lower().endswith(".onnx"):
            return "onnxruntime"
        return "pytorch"


@dataclass(frozen=True)
class Job:
    split: str  # key into the arrays handed to the engine ("test", "val")
    start: int
    stop: int
    corruption: str | None = None
    severity: int = 0
    seed: int = 0
    fp32: bool = True  # False: run the TFLite model only (benchmarks)

    @property
    def key(self) -> tuple:
        return (self.split, self.corruption, self.severity)


def block_seed(seed: int, start: int) -> int:
    return zlib.crc32(f"{int(seed)}:{int(start) // BLOCK}".encode())


def shift_jobs(split: str, n: int, corruptions, severities, seed: int) -> list[Job]:
    return [Job(split, s, min(s + BLOCK, n), c, sev, seed)
            for c in corruptions for sev in severities for s in range(0, n, BLOCK)]


def clean_jobs(split: str, n: int) -> list[Job]:
    return [Job(split, s, min(s + BLOCK, n)) for s in range(0, n, BLOCK)]


def make_inputs(raw: np.ndarray, job: Job, pre: Preprocessing) -> np.ndarray:
    """Raw images of one block -> (corrupted) -> normalised float32 NCHW model input."""
    from pipeline.reliability import corruptions
    from pipeline.inputs.preprocessing import apply
    x = raw[job.start:job.stop]
    if job.corruption is None:
        return apply(x, pre)
    lo, hi = pre.raw_range
    # Corruptions work on pixels in [0, 1]; map the raw range there and back so the preprocessing
    # record is applied exactly as for clean data (uint8 data is rounded back to uint8, as a camera
    # or a JPEG decoder would deliver it).
    unit = ((x.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)).clip(0, 1)
    c = corruptions.corrupt(unit, job.corruption, job.severity, seed=block_seed(job.seed, job.start))
    back = c * np.float32(hi - lo) + np.float32(lo)
    if x.dtype == np.uint8:
        back = np.rint(back).astype(np.uint8)
    return apply(back, pre)


class _Worker:
    """Both models in one process; ``loaded_model`` reuses an in-process model instead of reloading."""

    def __init__(self, pair: ModelPair, arrays: dict, loaded_model=None, threads: int = 1):
        from pipeline.inputs import models
        from pipeline.runtime.litert import TfliteRunner
        self.pair, self.arrays = pair, arrays
        if pair.fp32_onnx:
            self.model = models.load(pair.fp32_onnx)
        else:
            self.model = loaded_model if loaded_model is not None else models.load(pair.model_spec, pair.weights)
        if self.model.kind == "onnx":  # an onnxruntime session of its own, on this worker's thread budget
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            self.model.extra["_session"] = ort.InferenceSession(str(self.model.onnx_path), so,
                                                                providers=["CPUExecutionProvider"])
        self.runner = TfliteRunner(Path(pair.tflite_path), kernels=pair.kernels, threads=threads,
                                   batch_size=pair.batch_size, input_layout=pair.input_layout)

    def __call__(self, job: Job):
        from pipeline.inputs import models
        x = make_inputs(self.arrays[job.split], job, self.pair.preprocessing)
        fp32 = models.run_fp32(self.model, x, batch_size=self.pair.batch_size).astype(np.float32) if job.fp32 else None
        r = self.runner.run(x)
        return job, fp32, r.outputs, r.raw_outputs


_WORKER: _Worker | None = None
_INIT_ERROR: BaseException | None = None


def _init_worker(pair: ModelPair, arrays: dict) -> None:
    """Pool initializer. It must never raise: a pool whose initializer raises respawns the worker forever
    (the parent never hears of it). A failure is kept and raised by ``_run_job``, so the parent gets it
    as the first job's exception."""
    global _WORKER, _INIT_ERROR
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops the workers
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from pipeline import quiet
        quiet.configure(False)
        import torch
        torch.set_num_threads(1)
        _WORKER = _Worker(pair, arrays)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - reported through _run_job
        _INIT_ERROR = _as_pipeline_error(e)


def _as_pipeline_error(e: BaseException) -> Exception:
    from pipeline.errors import PipelineError, RuntimeStageError
    if isinstance(e, PipelineError):
        return e
    return RuntimeStageError(f"a worker process could not build the models: {type(e).__name__}: {e}; "
                             "run with --workers 1 to see the failure in this process")


def _describe_job(job: Job) -> str:
    shift = f"{job.corruption} severity {job.severity}" if job.corruption else "clean"
    return f"{job.split} images {job.start}-{job.stop - 1} ({shift})"


def _job_error(job: Job, e: Exception) -> Exception:
    """A PipelineError as it is; anything else as a RuntimeStageError naming the job and the failure."""
    from pipeline.errors import PipelineError, RuntimeStageError
    if isinstance(e, PipelineError):
        return e
    return RuntimeStageError(f"evaluating {_describe_job(job)} failed: {type(e).__name__}: {e}")


def _run_job(job: Job):
    if _WORKER is None:
        from pipeline.errors import RuntimeStageError
        raise _INIT_ERROR or RuntimeStageError("a worker process has no models (its initializer did not run)")
    try:
        return _WORKER(job)
    except Exception as e:  # noqa: BLE001 - sent to the parent as one picklable, readable error
        raise _job_error(job, e) from None


from pipeline.execution.local import STOP_SIGNALS as _STOP_SIGNALS  # noqa: E402
from pipeline.execution.local import stop_signals_deferred as _stop_signals_deferred  # noqa: E402


# --------------------------------------------------------------------------- jobs as cells (Ray)

_CELL_WORKERS: dict = {}  # on a Ray worker: models built for earlier jobs, by the content of their files


def job_cell(config: dict, files: dict, seed: int) -> dict:
    """One job as a cell of the execution layer (``--ray``): the worker rebuilds both models from the shipped
    files (the .tflite, the FP32 ONNX or the model file and weights, the raw images as an .npz) once per distinct
    set of files and keeps them for the next jobs; the job's outputs come back as arrays."""
    import dataclasses
    pair = config["pair"]
    swap = {"tflite_path": files["tflite"]}
    if "fp32_onnx" in files:
        swap["fp32_onnx"] = files["fp32_onnx"]
    if "model" in files:
        swap["model_spec"] = files["model"]
    if "weights" in files:
        swap["weights"] = files["weights"]
    pair = dataclasses.replace(pair, **swap)
    key = (pair, files["arrays"])
    worker = _CELL_WORKERS.get(key)
    if worker is None:
        import torch
        torch.set_num_threads(1)
        with np.load(files["arrays"], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        _CELL_WORKERS.clear()  # one model pair at a time per worker process
        worker = _CELL_WORKERS[key] = _Worker(pair, arrays)
    job, fp32, int8, raw = worker(config["job"])
    return {"fp32": fp32, "int8": int8, "int8_raw": raw}


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


class Engine:
    """Evaluate jobs on both models; results are gathered per (split, corruption, severity)."""

    def __init__(self, pair: ModelPair, arrays: dict[str, np.ndarray], workers: int = 1, loaded_model=None,
                 ray: str | None = None):
        self.pair, self.arrays, self.workers = pair, arrays, max(1, int(workers))
        self.ray = ray  # "auto" or a cluster address: every job a cell on Ray (pipeline/execution)
        self._loaded_model = loaded_model
        self._pool = None
        self._inline: _Worker | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # stop at once (an error, Ctrl-C or SIGTERM in the parent): queued jobs are dropped and running
            # workers killed; concurrent.futures has no public terminate before Python 3.14
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                if proc.is_alive():
                    proc.kill()  # SIGKILL: a worker still starting has SIGTERM blocked; workers hold nothing to save
            for proc in procs:
                proc.join(timeout=10)

    def _ensure(self):
        if self.workers == 1:
            if self._inline is None:
                self._inline = _Worker(self.pair, self.arrays, self._loaded_model)
            return None
        if self._pool is None:
            self._preflight()
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.pair, self.arrays))
        return self._pool

    def _preflight(self) -> None:
        """Build both models once here, and run one image through them, before starting the workers: a model
        that cannot load fails now with its own error, exactly as with ``workers=1``, instead of in every
        worker process."""
        w = _Worker(self.pair, self.arrays, self._loaded_model)
        split = next((k for k, a in self.arrays.items() if len(a)), None)
        if split is not None:
            w(Job(split, 0, 1))
        del w

    def run(self, jobs: list[Job], progress=None) -> dict[tuple, dict[str, np.ndarray]]:
        """Run every job; returns {job.key: {"fp32": [N,K], "int8": [N,K] dequantized, "int8_raw": ...}}."""
        if self.ray is not None:
            return self._gather(self._run_on_ray(jobs, progress))
        pool = self._ensure()
        parts: dict[tuple, list] = {}

        def take(result):
            job, fp32, int8, raw = result
            parts.setdefault(job.key, []).append((job.start, fp32, int8, raw))
            if progress:
                progress(job.stop - job.start)

        if pool is None:
            for j in jobs:
                try:
                    result = self._inline(j)
                except Exception as e:  # noqa: BLE001 - a PipelineError passes as it is
                    err = _job_error(j, e)
                    if err is e:
                        raise
                    raise err from e
                take(result)
        else:
            with _stop_signals_deferred():  # the workers start here
                pending = {pool.submit(_run_job, j) for j in jobs}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        take(f.result())
            except BrokenProcessPool:
                from pipeline.errors import RuntimeStageError
                self.close()
                raise RuntimeStageError(
                    f"a worker process died during the evaluation (killed, out of memory, or a crash in native "
                    f"code) with {len(pending)} of {len(jobs)} jobs left; rerun with fewer --workers (1 runs "
                    "everything in this process and shows the failure)") from None
            except BaseException:
                self.close()
                raise
        return self._gather(parts)

    def _run_on_ray(self, jobs: list[Job], progress=None) -> dict[tuple, list]:
        """Every job a cell on Ray (``--ray``): the model files and the raw images are shipped by content hash."""
        import tempfile
        from pipeline.errors import RuntimeStageError
        from pipeline.execution import Cell, run_cells
        from pipeline.execution.ray_backend import RayBackend
        parts: dict[tuple, list] = {}
        with tempfile.TemporaryDirectory(prefix="reliability-cells-") as tmp:
            arrays_file = Path(tmp) / "arrays.npz"
            np.savez(arrays_file, **self.arrays)
            files = [("tflite", self.pair.tflite_path), ("arrays", str(arrays_file))]
            if self.pair.fp32_onnx:
                files.append(("fp32_onnx", self.pair.fp32_onnx))
            elif Path(self.pair.model_spec).is_file():
                files.append(("model", self.pair.model_spec))
            if self.pair.weights and Path(self.pair.weights).is_file():
                files.append(("weights", self.pair.weights))
            cells = [Cell(key=f"{j.split}/{j.corruption or 'clean'}/{j.severity}/{j.start}", fn=job_cell,
                          config={"pair": self.pair, "job": j}, seed=j.seed, files=tuple(files)) for j in jobs]
            backend = RayBackend(self.ray, None if self.workers <= 0 else self.workers)
            records = run_cells(cells, backend, progress=False, on_record=lambda cell, rec: (
                progress(cell.config["job"].stop - cell.config["job"].start) if progress and
                rec["status"] == "done" else None))
            self.workers = backend.workers
        for cell, rec in zip(cells, records):
            if rec["status"] != "done":
                raise RuntimeStageError(f"reliability job {cell.key} failed on Ray: {rec['error']}")
            j = cell.config["job"]
            r = rec["result"]
            parts.setdefault(j.key, []).append((j.start, r["fp32"], r["int8"], r["int8_raw"]))
        return parts

    @staticmethod
    def _gather(parts: dict[tuple, list]) -> dict[tuple, dict[str, np.ndarray]]:
        out = {}
        for key, items in parts.items():
            items.sort(key=lambda t: t[0])
            out[key] = {"fp32": np.concatenate([t[1] for t in items]) if items[0][1] is not None else None,
                        "int8": np.concatenate([t[2] for t in items]),
                        "int8_raw": np.concatenate([t[3] for t in items])}
        return out
