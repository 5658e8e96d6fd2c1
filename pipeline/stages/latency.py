"""Stage ``latency``: LiteRT targets only: batch-1 host latency on the target's kernels and on the reference
kernels (host figures, never device latency)."""
from __future__ import annotations

import numpy as np


def latency(tflite, x_test: np.ndarray, target) -> dict | None:
    if target.is_micro:
        return None
    from pipeline.runtime.litert import measure_latency
    kernels = [target.kernels] + (["ref"] if target.kernels != "ref" else [])
    return {k: measure_latency(tflite.path, x_test[:1], k, target.threads, tflite.input_layout) for k in kernels}
