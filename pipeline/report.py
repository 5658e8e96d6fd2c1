"""The one Report: a versioned JSON document every command and benchmark writes."""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = "1.0"
_PACKAGES = ("torch", "tensorflow", "tf-keras", "onnx", "onnx2tf", "onnxruntime", "ai-edge-litert", "numpy")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@dataclass
class Report:
    kind: str  # "export", "evaluate", "benchmark"
    target: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    versions: dict = field(default_factory=versions)
    preprocessing: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    onnx: dict = field(default_factory=dict)
    conversion: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)
    passed: bool = False
    warnings: list = field(default_factory=list)  # what a reader must not miss even when every gate passes
    config: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)  # later capabilities add named sections here
    schema_version: str = SCHEMA_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("sections")
        d.update(extra)
        return _clean(d)

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _clean(v):
    """JSON-safe: Paths to str, tuples to lists, NaN/inf to None."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and callable(v.item):  # numpy scalar
        return _clean(v.item())
    return v
