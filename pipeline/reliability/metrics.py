"""Stage 5: compare the int8 model with the FP32 reference on the same inputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    n: int
    fp32_top1: float
    int8_top1: float
    drop_pp: float
    agreement: float
    flips: int
    max_abs_error: float
    mean_abs_error: float
    output_scale: float
    max_error_steps: float
    mean_error_steps: float

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy_gates(cmp: Comparison, max_drop_pp: float, min_agreement: float) -> dict:
    """The export's two accuracy gates on a comparison: top-1 drop (points) and top-1 agreement."""
    from pipeline.report import Gate
    return {
        "max_drop_pp": Gate(passed=cmp.drop_pp <= max_drop_pp, value=cmp.drop_pp, limit=max_drop_pp),
        "min_agreement": Gate(passed=cmp.agreement >= min_agreement, value=cmp.agreement, limit=min_agreement),
    }


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def compare(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, output_scale: float) -> Comparison:
    """``int8`` holds dequantized int8 outputs; errors are also given in output quantization steps."""
    if fp32.shape != int8.shape:
        raise ValueError(f"FP32 outputs {fp32.shape} and int8 outputs {int8.shape} differ in shape")
    err = np.abs(fp32.astype(np.float64) - int8.astype(np.float64))
    f, q = top1(fp32, labels), top1(int8, labels)
    agree = agreement(fp32, int8)
    scale = float(output_scale) if output_scale else 0.0
    return Comparison(
        n=int(len(labels)), fp32_top1=f, int8_top1=q, drop_pp=round((f - q) * 100.0, 4),
        agreement=agree, flips=int(round((1.0 - agree) * len(labels))),
        max_abs_error=float(err.max()), mean_abs_error=float(err.mean()), output_scale=scale,
        max_error_steps=float(err.max() / scale) if scale else float("nan"),
        mean_error_steps=float(err.mean() / scale) if scale else float("nan"),
    )
