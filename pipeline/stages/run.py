"""Stage ``run``: the converted model on the target's LiteRT kernels and threads, and the FP32 reference on the
same inputs (onnxruntime on model.onnx by default, or the model's own runtime)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.quiet import progress as _progress


@dataclass(frozen=True)
class RunOutputs:
    tflite: object  # runtime.RunResult of the converted model, at the target's precision
    fp32: np.ndarray  # FP32 logits on the same inputs
    fp32_seconds: float
    fp32_runtime: str = "pytorch"  # what ran the FP32 side, in words
    fp32_model: object = field(default=None, repr=False, compare=False)  # what ran it (the sanity stage reuses it)
    fp32_beside: str = ""  # what shared the CPU while the FP32 side ran ("" when nothing did)


class Fp32Reference:
    """The FP32 reference on the test split, computed in a thread of this process while the conversion runs in
    its own worker process (export.line starts it after export_onnx): the FP32 side needs only model.onnx or the
    model, so it need not wait for the TFLite file. ``result()`` joins it and re-raises what it raised."""

    beside = "the conversion (in its worker process)"

    def __init__(self, onnx, model, x_test: np.ndarray, *, batch_size: int, fp32_runtime: str):
        self._args = (onnx, model, x_test, batch_size, fp32_runtime)
        self._out: tuple | None = None
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._work, name="fp32-reference", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            self._out = _fp32(*self._args, bar=self._between_batches)
        except BaseException as e:  # noqa: BLE001 - handed to the run stage, which raises it
            self._error = e

    def _between_batches(self, n: int) -> None:
        if self._cancelled.is_set():
            raise _Cancelled()

    def cancel(self) -> None:
        """Stop after the batch running now and wait for that: the export failed before the run stage. (A thread
        still inside onnxruntime or PyTorch when the interpreter exits aborts the process: "terminate called
        without an active exception".)"""
        self._cancelled.set()
        self._thread.join()

    def result(self) -> tuple:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


class _Cancelled(Exception):
    pass


def _fp32(onnx, model, x_test: np.ndarray, batch_size: int, fp32_runtime: str, bar) -> tuple:
    """(FP32 logits, seconds, the model that ran them)."""
    from pipeline.inputs import models
    t0 = time.perf_counter()
    fp32_model = model
    if fp32_runtime == "onnxruntime" and model.kind != "onnx":
        fp32_model = models.onnx_reference(onnx.path)
    fp32 = models.run_fp32(fp32_model, x_test, batch_size=batch_size, progress=bar)
    return fp32, time.perf_counter() - t0, fp32_model


def run(tflite, onnx, model, x_test: np.ndarray, target, *, batch_size: int, fp32_runtime: str,
        progress: bool, fp32_ready: Fp32Reference | None = None) -> RunOutputs:
    """``tflite``: TfliteArtifact; ``onnx``: OnnxArtifact; ``model``: models.LoadedModel; ``fp32_ready``: the
    FP32 reference already under way (computed while the conversion ran), else it is computed here."""
    from pipeline.runtime.litert import TfliteRunner
    runner = TfliteRunner(tflite.path, kernels=target.run_kernels, threads=target.threads, batch_size=batch_size,
                          input_layout=tflite.input_layout)
    what = f"run {target.precision}" + (" + FP32" if fp32_ready is None else "")
    with _progress((1 if fp32_ready is not None else 2) * len(x_test), what, progress) as bar:
        out = runner.run(x_test, progress=bar)
        if fp32_ready is None:
            fp32, fp32_s, fp32_model = _fp32(onnx, model, x_test, batch_size, fp32_runtime, bar)
    if fp32_ready is not None:
        fp32, fp32_s, fp32_model = fp32_ready.result()
    if fp32_model is model:
        label = model.reference_runtime
    else:
        label = (f"onnxruntime on model.onnx (matches PyTorch within {onnx.max_abs_error:.2g} on {onnx.samples} "
                 f"real inputs, tolerance {onnx.tolerance:.2g})")
    return RunOutputs(tflite=out, fp32=fp32, fp32_seconds=fp32_s, fp32_runtime=label, fp32_model=fp32_model,
                      fp32_beside=fp32_ready.beside if fp32_ready is not None else "")
