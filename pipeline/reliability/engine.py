"""Run the FP32 model and the deployed TFLite model on many (shifted) inputs, batched and across cores.

The unit of work is a ``Job``: a block of images from one split (``test`` or ``val``), optionally
corrupted. The worker that takes a job generates the block's inputs once (corrupt the raw pixels, then the
preprocessing record's normalisation) and feeds that one array to both models, so FP32 and int8 always see
exactly the same inputs. Blocks are corrupted with a seed derived from (seed, block index), so the
shifted sets do not depend on the number of workers.

With ``workers=1`` everything runs in this process (no start-up cost; what the tests use). Otherwise every job
is a cell of the execution layer (``pipeline/execution``): on local ``spawn`` worker processes or on Ray
(``--ray``), each worker holding its own LiteRT interpreter (1 thread, the target's kernels, batched) and its own
FP32 model (PyTorch with 1 intra-op thread, or onnxruntime), built once from the files and kept for its next
jobs. LiteRT's ``invoke()`` holds the GIL in this build, so threads would not run interpreters in parallel. A
worker that dies (killed, out of memory, a crash in native code) is replaced and its job run again, at most
twice more; then the evaluation fails with the reason, instead of waiting forever as a ``multiprocessing.Pool``
would.

int8 outputs do not depend on the interpreter's thread count (integer kernels), so the per-worker
interpreters reproduce the target's outputs exactly; ``tests/test_reliability.py`` checks this.
"""
from __future__ import annotations

import os
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


def _describe_job(job: Job) -> str:
    shift = f"{job.corruption} severity {job.severity}" if job.corruption else "clean"
    return f"{job.split} images {job.start}-{job.stop - 1} ({shift})"


def _job_error(job: Job, e: Exception) -> Exception:
    """A PipelineError as it is; anything else as a RuntimeStageError naming the job and the failure."""
    from pipeline.errors import PipelineError, RuntimeStageError
    if isinstance(e, PipelineError):
        return e
    return RuntimeStageError(f"evaluating {_describe_job(job)} failed: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------- jobs as cells

_CELL_WORKERS: dict = {}  # in a worker process: the models built for earlier jobs, by the files they came from


def job_cell(config: dict, files: dict, seed: int) -> dict:
    """One job as a cell of the execution layer (pipeline/execution): the worker process (a local spawn process or
    a Ray worker) builds both models from the files (the .tflite, the FP32 ONNX or the model file and weights, the
    raw images as an .npz) once per distinct set of files, keeps them for its next jobs, and returns the job's
    outputs as arrays (jobs are not stored for resuming, so their records need not be JSON)."""
    import dataclasses
    pair, job = config["pair"], config["job"]
    swap = {"tflite_path": files["tflite"]}
    for role, field_name in (("fp32_onnx", "fp32_onnx"), ("model", "model_spec"), ("weights", "weights")):
        if role in files:
            swap[field_name] = files[role]
    pair = dataclasses.replace(pair, **swap)
    key = (pair, files["arrays"])
    worker = _CELL_WORKERS.get(key)
    try:
        if worker is None:
            import torch
            torch.set_num_threads(1)
            with np.load(files["arrays"], allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            _CELL_WORKERS.clear()  # one model pair at a time per worker process
            worker = _CELL_WORKERS[key] = _Worker(pair, arrays)
        _, fp32, int8, raw = worker(job)
    except Exception as e:  # noqa: BLE001 - a readable one-line error naming the job
        raise _job_error(job, e) from None
    return {"fp32": fp32, "int8": int8, "int8_raw": raw}


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


class Engine:
    """Evaluate jobs on both models; results are gathered per (split, corruption, severity).

    ``workers=1`` without ``ray``: every job in this process, on the models built (or given) here. Otherwise every
    job is a cell of the execution layer: on ``workers`` local spawn processes, or on Ray (``ray``: "auto" or a
    cluster address). A worker that dies under a job is replaced and the job run again (at most twice more); a job
    that fails for a real reason fails the evaluation with its error."""

    def __init__(self, pair: ModelPair, arrays: dict[str, np.ndarray], workers: int = 1, loaded_model=None,
                 ray: str | None = None):
        self.pair, self.arrays, self.workers = pair, arrays, max(1, int(workers)) if ray is None else int(workers)
        self.ray = ray
        self._loaded_model = loaded_model
        self._inline: _Worker | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        self._inline = None  # the worker processes, if any, were stopped when their run ended

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
        if self.ray is not None or self.workers > 1:
            return self._gather(self._run_cells(jobs, progress))
        if self._inline is None:
            self._inline = _Worker(self.pair, self.arrays, self._loaded_model)
        parts: dict[tuple, list] = {}
        for j in jobs:
            try:
                job, fp32, int8, raw = self._inline(j)
            except Exception as e:  # noqa: BLE001 - a PipelineError passes as it is
                err = _job_error(j, e)
                if err is e:
                    raise
                raise err from e
            parts.setdefault(job.key, []).append((job.start, fp32, int8, raw))
            if progress:
                progress(job.stop - job.start)
        return self._gather(parts)

    def _run_cells(self, jobs: list[Job], progress=None) -> dict[tuple, list]:
        """Every job a cell (pipeline/execution) on local worker processes or Ray; the model files and the raw
        images go to the workers as files (by content hash on Ray)."""
        import tempfile
        from pipeline.errors import RuntimeStageError
        from pipeline.execution import Cell, run_cells
        if self.ray is None:
            from pipeline.execution.local import LocalBackend
            self._preflight()
            backend = LocalBackend(self.workers)
        else:
            from pipeline.execution.ray_backend import RayBackend
            backend = RayBackend(self.ray, self.workers if self.workers > 0 else None)
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

            def done(cell, rec):
                if rec["status"] != "done":  # stop at the first failure, as the in-process run does
                    raise RuntimeStageError(f"{rec['error']}" if rec.get("error_kind") != "worker_lost" else
                                            f"reliability job {cell.key}: {rec['error']}")
                if progress:
                    progress(cell.config["job"].stop - cell.config["job"].start)

            records = run_cells(cells, backend, progress=False, on_record=done)
            self.workers = backend.workers
        for cell, rec in zip(cells, records):
            j, r = cell.config["job"], rec["result"]
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
