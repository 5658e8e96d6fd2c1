"""Conversion routes: ONNX or the PyTorch model -> TFLite at a target's precision, each behind the
:class:`Converter` interface and registered in :func:`routes` (the order ``--converter auto`` tries them).

    onnx_export         PyTorch -> ONNX (the export_onnx stage's exporter)
    direct              route "direct": this project's own ONNX -> int8 TFLite writer for plain CNN ops
    onnx2tf_tflite      route "onnx2tf": onnx2tf 1.28 in memory + TFLiteConverter
    litert_torch        route "litert-torch": litert-torch + ai-edge-quantizer, from the nn.Module
    onnx2tf_flatbuffer  route "onnx2tf-flatbuffer": onnx2tf 2.x flatbuffer_direct, in an isolated install
    worker              one conversion in a worker process (crash isolation, overlapped imports)
    rewrites            ONNX graph rewrites for known converter blockers
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.errors import ConversionError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from pipeline.conversion.onnx_export import OnnxArtifact
    from pipeline.inputs.preprocessing import Preprocessing


@dataclass(frozen=True)
class TfliteArtifact:
    path: Path
    bytes: int
    converter: str
    input_layout: str  # layout of the TFLite input tensor: "NHWC" or "NCHW"
    calibration_samples: int
    timings_s: dict = field(default_factory=dict)
    constant_folded: bool = False  # converted again from a constant-folded graph (the first try broke the batch axis)
    reused: bool = False  # copied from an earlier target of the same multi-target call (stages/reuse.py)
    rewrites: tuple = ()  # ONNX graph rewrites applied before the conversion (conversion/rewrites.py), as dicts
    routes_tried: tuple = ()  # --converter auto: one record per route tried, in order (stages/convert.py)
    float_nodes: tuple = ()  # float-fallback targets: op outputs kept in float on purpose (stages/recover.py)
    preprocessing: Preprocessing | None = None  # the deployment record embedded in the file (stages/convert.py)

    def describe(self) -> dict:
        d = {"path": self.path.name, "bytes": self.bytes, "converter": self.converter,
             "input_layout": self.input_layout, "calibration_samples": self.calibration_samples,
             "timings_s": dict(self.timings_s)}
        if self.constant_folded:
            d["constant_folded"] = ("the first conversion applied a computed pad or reshape to the batch axis; "
                                    "the model was converted again from the ONNX graph with its constant "
                                    "subgraphs folded by onnxruntime's basic optimizer")
        if self.rewrites:
            d["rewrites"] = [dict(r) for r in self.rewrites]
        if self.routes_tried:
            d["routes_tried"] = [dict(r) for r in self.routes_tried]
        if self.float_nodes:
            d["float_nodes"] = list(self.float_nodes)
        if self.reused:
            from pipeline.stages.reuse import Reuse
            d["reused"] = Reuse.NOTE
        return d


class Converter(Protocol):
    name: str

    def preload(self, verbose: bool = False) -> None:
        """Import what ``convert`` needs (the export starts this early, in a worker process)."""

    def convert(self, onnx: OnnxArtifact, representative: np.ndarray, pre: Preprocessing, *,
                per_channel: bool, out_path: Path, verbose: bool = False,
                precision: str = "int8") -> TfliteArtifact: ...


FALLBACK_ROUTE = "onnx2tf"  # the one route that keeps named layers in float (TFLiteConverter's deny list)


def refuse_float_nodes(route: str, float_nodes) -> None:
    """Only the onnx2tf + TFLiteConverter route keeps named layers in float (the MLIR quantizer's deny list)."""
    if float_nodes:
        raise ConversionError(f"route {route} cannot keep named layers in float; use --converter onnx2tf for float "
                              "fallback of named layers")


@functools.cache
def routes() -> dict[str, Converter]:
    """The conversion routes, in the order ``--converter auto`` tries them (README "Conversion routes"): the direct
    writer first (no TensorFlow: it declines at once any op it does not write), then onnx2tf +
    TFLiteConverter (the closest to FP32 on the zoo), then litert-torch + ai-edge-quantizer (no ONNX: takes GELU,
    LayerNorm and attention fully int8), then onnx2tf 2.x flatbuffer_direct (no TensorFlow)."""
    from pipeline.conversion.direct import DirectConverter
    from pipeline.conversion.litert_torch import LiteRtTorchConverter
    from pipeline.conversion.onnx2tf_tflite import Onnx2TfConverter
    from pipeline.conversion.onnx2tf_flatbuffer import Onnx2TfFlatbufferConverter
    return {"direct": DirectConverter(), "onnx2tf": Onnx2TfConverter(), "litert-torch": LiteRtTorchConverter(),
            "onnx2tf-flatbuffer": Onnx2TfFlatbufferConverter()}


def early_routes(converter: str) -> list[str]:
    """The routes whose workers the export starts before anything else (their imports overlap the first stages):
    for ``auto`` the first route and the first route that imports TensorFlow (when the first is the direct writer,
    which imports little, that is the next one: started niced, it is wanted only when the first route fails);
    for a named route, that route."""
    names = list(routes())
    if converter != AUTO:
        return [converter]
    return names[:2] if getattr(routes()[names[0]], "light", False) else names[:1]


AUTO = "auto"


def get_converter(name: str) -> Converter:
    if name not in routes():
        raise UsageError(f"unknown converter {name!r}; choose {AUTO} or one of {', '.join(routes())}")
    return routes()[name]
