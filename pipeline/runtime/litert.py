"""Stage 4: run a TFLite model on LiteRT's real kernels.

Inputs arrive as normalised float32 NCHW (the preprocessing record's output); this module
moves them to the TFLite input layout, quantizes them with the input tensor's scale and
zero point when the input is an integer tensor (int8, or int16 for int16x8 models; float
inputs of the fp32/fp16/dynamic rungs are passed as float32), runs batched where the model
has a dynamic batch dimension, and returns the dequantized outputs. ``measure_latency``
times batch-1 ``invoke()`` on this host, labelled as a host measurement.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConversionError, RuntimeStageError

KERNELS = ("xnnpack", "builtin", "ref")


def _resolver(kernels: str):
    from ai_edge_litert.interpreter import OpResolverType
    return {
        "xnnpack": OpResolverType.BUILTIN,  # built-in kernels with the default XNNPACK delegate
        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        "ref": OpResolverType.BUILTIN_REF,
    }[kernels]


@dataclass(frozen=True)
class RunResult:
    outputs: np.ndarray  # dequantized float32 [N, K]
    raw_outputs: np.ndarray  # the integer outputs as the device sees them
    seconds: float
    images_per_s: float
    batch_size: int
    kernels: str
    threads: int
    batch_fallback: str | None = None  # why a dynamic-batch model ran one image at a time (None: it did not)

    def describe(self) -> dict:
        return {"runtime": "ai-edge-litert", "kernels": self.kernels, "threads": self.threads,
                "batch_size": self.batch_size, "images": int(len(self.outputs)),
                "seconds": round(self.seconds, 4), "images_per_s": round(self.images_per_s, 1),
                "measured_on": host_description(),
                **({"batch_fallback": self.batch_fallback} if self.batch_fallback else {})}


def host_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"this host ({cpu}, {os.cpu_count()} logical cores)"


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    q = np.round(x / np.float32(scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


MISCONVERTED_HINT = ("onnx2tf 1.28 mis-converts some ops whose parameters PyTorch exports as computed subgraphs "
                     "(e.g. reflect or replicate padding); use zero padding, or constant-fold the ONNX yourself "
                     "(onnxruntime SessionOptions: graph_optimization_level ORT_ENABLE_BASIC, "
                     "optimized_model_filepath) and pass the folded .onnx as --model")


class TfliteRunner:
    """One LiteRT interpreter; batched when the model's batch dimension is dynamic."""

    def __init__(self, model_path: Path, kernels: str = "xnnpack", threads: int = 1, batch_size: int = 256,
                 input_layout: str = "NHWC"):
        if kernels not in KERNELS:
            raise RuntimeStageError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
        self.model_path = Path(model_path)
        self.kernels, self.threads, self.input_layout = kernels, int(threads), input_layout
        self.interp = self._load()
        self.batch_fallback: str | None = None
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        sig = self.inp.get("shape_signature", self.inp["shape"])
        self.dynamic = len(sig) > 0 and int(sig[0]) == -1
        self.batch_size = int(batch_size) if self.dynamic else int(self.inp["shape"][0])
        self._allocated = None
        self.in_scale, self.in_zp = self.inp["quantization"]
        self.out_scale, self.out_zp = self.out["quantization"]

    def _load(self):
        from ai_edge_litert.interpreter import Interpreter
        try:
            return Interpreter(model_path=str(self.model_path), num_threads=self.threads,
                               experimental_op_resolver_type=_resolver(self.kernels))
        except Exception as e:
            raise RuntimeStageError(f"LiteRT cannot load {self.model_path}: {str(e).strip()[:200]}") from None

    def _prepare(self) -> None:
        """Allocate for ``batch_size``. A dynamic-batch model that the kernels refuse to prepare at that batch
        (XNNPACK refused some models at 256 that it runs one at a time) runs one image at a time in a fresh
        interpreter instead; ``batch_fallback`` says why. A model that cannot be prepared at batch 1 either is
        an error."""
        try:
            self._allocate(self.batch_size)
        except ConversionError as e:
            if not self.dynamic or self.batch_size == 1:
                raise
            self.batch_fallback = f"{e}; ran one image at a time instead"
            self.interp, self._allocated, self.batch_size = self._load(), None, 1
            self._allocate(1)

    def _allocate(self, batch: int) -> None:
        if self._allocated == batch:
            return
        from pipeline.quiet import captured
        try:
            with captured(verbose=False):  # LiteRT prints "Created TensorFlow Lite XNNPACK delegate" natively
                if self.dynamic:
                    shape = [batch, *[int(v) for v in self.inp["shape"][1:]]]
                    self.interp.resize_tensor_input(self.inp["index"], shape, strict=True)
                self.interp.allocate_tensors()
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConversionError(f"LiteRT cannot prepare the model for a batch of {batch}: {first}") from None
        self._allocated = batch

    def to_model_input(self, x_nchw: np.ndarray) -> np.ndarray:
        x = np.transpose(x_nchw, (0, 2, 3, 1)) if self.input_layout == "NHWC" else x_nchw
        if np.issubdtype(self.inp["dtype"], np.integer):
            return quantize(x, self.in_scale, self.in_zp, self.inp["dtype"])
        return np.ascontiguousarray(x, dtype=self.inp["dtype"])

    def run(self, x_nchw: np.ndarray, progress=None) -> RunResult:
        n = len(x_nchw)
        self._prepare()
        bs = self.batch_size
        raw = None
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            chunk = self.to_model_input(x_nchw[i:i + bs])
            m = len(chunk)
            if m < bs:  # pad the last batch instead of re-allocating
                chunk = np.concatenate([chunk, np.zeros((bs - m, *chunk.shape[1:]), chunk.dtype)])
            self._allocate(bs)
            try:
                self.interp.set_tensor(self.inp["index"], chunk)
                self.interp.invoke()
            except Exception as e:
                raise RuntimeStageError(f"LiteRT failed to run the model: {str(e).strip()[:200]}") from None
            y = self.interp.get_tensor(self.out["index"])
            if y.ndim >= 2 and y.shape[0] != bs:
                raise ConversionError(
                    f"the converted model returns {y.shape[0]} output rows for a batch of {bs} images: its batch "
                    f"axis was mixed up in conversion, so its outputs are wrong, not just imprecise; "
                    f"{MISCONVERTED_HINT}")
            y = y[:m]
            if raw is None:
                raw = np.empty((n, *y.shape[1:]), y.dtype)
            raw[i:i + m] = y
            if progress:
                progress(m)
        seconds = time.perf_counter() - t0
        if np.issubdtype(raw.dtype, np.integer):
            deq = dequantize(raw, self.out_scale, self.out_zp)
        else:
            deq = raw.astype(np.float32)
        return RunResult(outputs=deq.reshape(n, -1), raw_outputs=raw, seconds=seconds,
                         images_per_s=n / seconds if seconds > 0 else float("inf"), batch_size=bs,
                         kernels=self.kernels, threads=self.threads, batch_fallback=self.batch_fallback)


# --------------------------------------------------------------------------- batch-1 latency on this host

@dataclass(frozen=True)
class Latency:
    """Batch-1 latency of one model on this host, benchmark_model style (init, first, warmup, timed runs)."""

    kernels: str
    threads: int
    runs: int
    warmup_runs: int
    init_ms: float  # interpreter construction + allocate_tensors
    first_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    xnnpack_applied: bool  # the interpreter's op list holds a DELEGATE node

    def describe(self) -> dict:
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        d.update({
            "batch_size": 1, "runtime": "ai-edge-litert",
            "measured_on": host_description(),
            "label": f"host measurement: {host_description()}, LiteRT {self.kernels} kernels"
                     f"{'' if self.kernels != 'xnnpack' or self.xnnpack_applied else ' (XNNPACK took no node)'}, "
                     f"{self.threads} threads{_oversubscribed(self.threads)}, batch 1; not a device latency",
        })
        return d


def _oversubscribed(threads: int) -> str:
    cores = os.cpu_count() or 0
    return f" on {cores} logical cores (oversubscribed)" if cores and threads > cores else ""


def measure_latency(model_path: Path, x_nchw: np.ndarray, kernels: str, threads: int, input_layout: str = "NHWC",
                    warmup_runs: int = 5, min_runs: int = 50, min_secs: float = 0.25,
                    max_secs: float = 5.0) -> Latency:
    """Time ``invoke()`` at batch 1 on one real input, as benchmark_model does: init, first, then at
    least ``warmup_runs`` warmup runs, then at least ``min_runs`` runs and ``min_secs`` seconds
    (capped at ``max_secs``). Inputs are set once; only ``invoke()`` is timed."""
    t0 = time.perf_counter()
    runner = TfliteRunner(model_path, kernels=kernels, threads=threads, batch_size=1, input_layout=input_layout)
    runner._allocate(1)
    init_s = time.perf_counter() - t0
    x = runner.to_model_input(np.asarray(x_nchw[:1]))
    it = runner.interp
    try:
        it.set_tensor(runner.inp["index"], x)
        t0 = time.perf_counter()
        it.invoke()
        first_s = time.perf_counter() - t0
        for _ in range(warmup_runs):
            it.invoke()
        times = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            it.invoke()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            elapsed = t1 - start
            if (len(times) >= min_runs and elapsed >= min_secs) or elapsed >= max_secs:
                break
    except Exception as e:
        raise RuntimeStageError(f"LiteRT failed to run the model at batch 1: {str(e).strip()[:200]}") from None
    try:
        delegated = any(o.get("op_name") == "DELEGATE" for o in it._get_ops_details())
    except Exception:  # a private API: unknown, not claimed
        delegated = False
    ms = np.asarray(times) * 1e3
    return Latency(kernels=kernels, threads=int(threads), runs=len(times), warmup_runs=warmup_runs,
                   init_ms=init_s * 1e3, first_ms=first_s * 1e3, mean_ms=float(ms.mean()),
                   median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)), min_ms=float(ms.min()),
                   max_ms=float(ms.max()), std_ms=float(ms.std()), xnnpack_applied=bool(delegated))
