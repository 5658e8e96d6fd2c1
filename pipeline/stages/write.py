"""Step ``write``: predictions.npz, report.json and report.html into the export's staging folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def prediction_arrays(inputs, ran, micro, precision: str) -> dict:
    """predictions.npz: int8 keeps int8_logits/int8_raw; other precisions name theirs (fp16_logits, ...)."""
    arrays = {"labels": inputs.labels, "fp32_logits": ran.fp32, f"{precision}_logits": ran.tflite.outputs,
              f"{precision}_raw": ran.tflite.raw_outputs}
    if micro is not None:
        arrays["tflm_raw"] = micro.raw_outputs  # TFLite-Micro on the first micro.images inputs
    return arrays


def write(work: Path, report, arrays: dict, writing) -> Path:
    """``writing``: the output folder's context manager that turns a full disk into one OutputError line."""
    from pipeline.jsonio import sha256_file
    with writing("predictions.npz"):
        np.savez_compressed(work / "predictions.npz", **arrays)
    report.artifacts["predictions"] = {"path": "predictions.npz", "arrays": list(arrays),
                                       "sha256": sha256_file(work / "predictions.npz")}
    with writing("report.json and report.html"):
        report.write(work)
    return work / "report.json"
