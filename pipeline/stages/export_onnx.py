"""Stage ``export_onnx``: PyTorch -> ONNX with a dynamic batch, onnx.checker, onnxruntime vs PyTorch on real
inputs (the exporter itself: :mod:`pipeline.conversion.onnx_export`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.conversion.onnx_export import OnnxArtifact
from pipeline.stages.reuse import Reuse


def export_onnx(model, calib: np.ndarray, x_test: np.ndarray, work: Path, reuse: Reuse | None) -> OnnxArtifact:
    """``calib``/``x_test``: preprocessed inputs; the export is checked on 128 of each (train and test split)."""
    from pipeline.conversion.onnx_export import export_onnx as export
    dest = work / "model.onnx"
    if reuse is not None and (art := reuse.get("onnx", dest)) is not None:
        return art
    art = export(model, np.concatenate([calib[:128], x_test[:128]]), dest)
    if reuse is not None:
        reuse.put("onnx", art)
    return art
