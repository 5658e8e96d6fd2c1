"""Stage ``run``: the converted model on the target's LiteRT kernels and threads, and the FP32 reference on the
same inputs (onnxruntime on model.onnx by default, or the model's own runtime)."""
from __future__ import annotations

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


def run(tflite, onnx, model, x_test: np.ndarray, target, *, batch_size: int, fp32_runtime: str,
        progress: bool) -> RunOutputs:
    """``tflite``: TfliteArtifact; ``onnx``: OnnxArtifact; ``model``: models.LoadedModel."""
    from pipeline.inputs import models
    from pipeline.runtime.litert import TfliteRunner
    runner = TfliteRunner(tflite.path, kernels=target.run_kernels, threads=target.threads, batch_size=batch_size,
                          input_layout=tflite.input_layout)
    with _progress(2 * len(x_test), f"run {target.precision} + FP32", progress) as bar:
        out = runner.run(x_test, progress=bar)
        t0 = time.perf_counter()
        fp32_model = model
        if fp32_runtime == "onnxruntime" and model.kind != "onnx":
            fp32_model = models.onnx_reference(onnx.path)
        fp32 = models.run_fp32(fp32_model, x_test, batch_size=batch_size, progress=bar)
        fp32_s = time.perf_counter() - t0
    if fp32_model is model:
        label = model.reference_runtime
    else:
        label = (f"onnxruntime on model.onnx (matches PyTorch within {onnx.max_abs_error:.2g} on {onnx.samples} "
                 f"real inputs, tolerance {onnx.tolerance:.2g})")
    return RunOutputs(tflite=out, fp32=fp32, fp32_seconds=fp32_s, fp32_runtime=label, fp32_model=fp32_model)
