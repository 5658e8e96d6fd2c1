"""Stage ``compare``: top-1, drop, agreement and output errors in quantization steps (:mod:`pipeline.reliability.metrics`)."""
from __future__ import annotations

import numpy as np


def compare(ran, insp, labels: np.ndarray):
    """``ran``: RunOutputs; ``insp``: the inspect stage's TfliteInspection (for the output scale)."""
    from pipeline.reliability.metrics import compare as measure
    out = insp.outputs[0]
    return measure(ran.fp32, ran.tflite.outputs, labels, output_scale=out.scale[0] if out.scale else 0.0)
