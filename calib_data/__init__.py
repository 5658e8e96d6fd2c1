"""Representative datasets for full-int8 calibration.

One interface (modelled on onnxruntime's ``CalibrationDataReader``): a source yields
float32 samples in the model's input layout (C×H×W, already normalised with the
preprocessing record), knows its length, and describes itself for the report.
Builders are registered by name with ``@register_source``; ``--calib NAME[:ARG]`` picks one.
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from pipeline.errors import CalibrationError
from pipeline.preprocessing import Preprocessing


@runtime_checkable
class CalibrationSource(Protocol):
    def __iter__(self) -> Iterator[np.ndarray]: ...
    def __len__(self) -> int: ...
    def describe(self) -> dict: ...


@dataclass
class ArraySource:
    """A calibration set held in memory as normalised float32 N×C×H×W samples."""

    name: str
    samples: np.ndarray
    seed: int | None
    origin: str
    extra: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[np.ndarray]:
        for s in self.samples:
            yield s

    def __len__(self) -> int:
        return int(len(self.samples))

    def array(self) -> np.ndarray:
        return self.samples

    def describe(self) -> dict:
        s = self.samples
        d = {
            "source": self.name,
            "size": len(self),
            "seed": self.seed,
            "origin": self.origin,
            "statistics": {
                "min": float(s.min()), "max": float(s.max()),
                "mean": float(s.mean()), "std": float(s.std()),
            } if len(s) else {},
        }
        d.update(self.extra)
        return d


@dataclass(frozen=True)
class CalibContext:
    """What a builder may draw from: the training split (raw NCHW) and the preprocessing record."""

    x_train: np.ndarray
    y_train: np.ndarray
    preprocessing: Preprocessing
    dataset_name: str


Builder = Callable[[CalibContext, int, int, str | None], ArraySource]
_REGISTRY: dict[str, Builder] = {}


def register_source(name: str):
    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"calibration source {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn
    return deco


def list_sources() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def _load() -> None:
    from . import real  # noqa: F401


def build(spec: str, ctx: CalibContext, size: int, seed: int) -> ArraySource:
    """Build the source named by ``spec`` (``NAME`` or ``NAME:ARG``) and check it fits the model."""
    _load()
    name, _, arg = spec.partition(":")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(sorted(_REGISTRY))}"
        raise CalibrationError(f"unknown calibration source {name!r}; {hint}")
    if size <= 0:
        raise CalibrationError(f"--calib-size {size} gives an empty representative dataset; pass at least 1 (100-500 recommended)")
    src = _REGISTRY[name](ctx, size, seed, arg or None)
    check_source(src, ctx.preprocessing)
    return src


def check_source(src: ArraySource, pre: Preprocessing, warn_below: int = 100) -> None:
    """Fail loudly on an empty source or samples whose shape or value range do not fit the model."""
    n = len(src)
    if n == 0:
        raise CalibrationError(f"calibration source {src.name!r} yielded no samples; give it data or pick another --calib")
    s = src.array()
    if s.dtype != np.float32:
        raise CalibrationError(f"calibration source {src.name!r} yields {s.dtype} samples; sources must yield float32")
    if tuple(s.shape[1:]) != tuple(pre.input_shape):
        raise CalibrationError(
            f"calibration samples are {'x'.join(map(str, s.shape[1:]))} but the model takes "
            f"{'x'.join(map(str, pre.input_shape))} (C×H×W); build the source at the model's input size and channels"
        )
    if not np.all(np.isfinite(s)):
        raise CalibrationError(f"calibration source {src.name!r} holds NaN or inf; clean the samples")
    lo, hi = pre.value_range()
    margin = 0.05 * (hi - lo)
    smin, smax = float(s.min()), float(s.max())
    if smin < lo - margin or smax > hi + margin:
        raise CalibrationError(
            f"calibration samples span [{smin:.3g}, {smax:.3g}] but preprocessed inputs span [{lo:.3g}, {hi:.3g}]; "
            "the samples are probably normalised twice or not at all - feed raw images and let the preprocessing "
            "record (--mean/--std) normalise them once"
        )
    if n < warn_below:
        warnings.warn(f"only {n} calibration samples; 100-500 are recommended for full-int8 calibration", stacklevel=2)
