"""Stage ``convert``: ONNX -> TFLite at the target's precision, calibrated on the representative dataset, by
the chosen conversion route (:mod:`pipeline.conversion`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..convert import TfliteArtifact
from ..onnx_export import OnnxArtifact
from ..preprocessing import Preprocessing
from .reuse import Reuse, conversion_key


def convert(onnx: OnnxArtifact, representative: np.ndarray, pre: Preprocessing, target, *, converter: str,
            worker=None, work: Path, reuse: Reuse | None, verbose: bool = False) -> TfliteArtifact:
    """``worker``: a ConverterProcess started early by the export (its imports overlap the stages before), or
    None to convert in this process."""
    from ..convert import get_converter
    dest = work / f"model_{target.precision}.tflite"
    key = conversion_key(converter, target)
    if reuse is not None and (art := reuse.get(key, dest)) is not None:
        return art
    route = worker or get_converter(converter)
    art = route.convert(onnx, representative, pre, per_channel=target.per_channel_weights, out_path=dest,
                        verbose=verbose, precision=target.precision)
    art = with_record(art, pre)
    if reuse is not None:
        reuse.put(key, art)
    return art


def with_record(art: TfliteArtifact, pre: Preprocessing) -> TfliteArtifact:
    """The deployment record (preprocessing + the model's input layout and quantization) embedded in the .tflite
    as metadata ``preprocessing.METADATA_NAME``, so the file itself says how to feed it."""
    import dataclasses

    from ..inspect_tflite import inspect as read
    from ..preprocessing import METADATA_NAME, InputQuantization
    from ..tflite_metadata import embed_file
    t = read(art.path).inputs[0]
    quant = InputQuantization(dtype=t.dtype, scale=float(t.scale[0]) if t.scale else 0.0,
                              zero_point=int(t.zero_point[0]) if t.zero_point else 0)
    deployed = pre.deployed(art.input_layout, quant)
    embed_file(art.path, METADATA_NAME, deployed.to_dict())
    return dataclasses.replace(art, bytes=art.path.stat().st_size, preprocessing=deployed)
