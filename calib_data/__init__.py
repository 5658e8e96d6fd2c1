"""Representative datasets for full-int8 calibration.

One interface (modelled on onnxruntime's ``CalibrationDataReader``): a source yields
float32 samples in the model's input layout (C×H×W, already normalised with the
preprocessing record), knows its length, and describes itself for the report.
Builders are registered by name with ``@register_source``; ``--calib NAME[:ARG]`` picks one.

Sources (one builder module each):

- ``balanced``, ``real``, ``first`` (:mod:`calib_data.real`): training images, class-stratified,
  random, or the first N;
- ``fractal`` (:mod:`calib_data.fractal`): FractalDB-style IFS fractals generated on the fly;
- ``noise[:gaussian|uniform]`` (:mod:`calib_data.noise`): noise matched to the data's value range;
- ``shifted:CORRUPTION[:SEVERITY]`` (:mod:`calib_data.shifted`): training images with a corruption
  from :mod:`pipeline.reliability.corruptions` applied;
- ``folder:PATH`` and ``npz:PATH`` (:mod:`calib_data.user`): the user's own images or arrays.

Every builder produces *raw* images (the value range of the training data, e.g. 0..255) and
normalises them exactly once with :func:`pipeline.inputs.preprocessing.apply`. Generated sets are cached
on disk (:mod:`calib_data.cache`).
"""
from __future__ import annotations

import difflib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from pipeline.errors import CalibrationError
from pipeline.inputs.preprocessing import Preprocessing

# Where generated sets are kept between exports (``--calib-cache DIR``; ``off`` disables it).
DEFAULT_CACHE_DIR = "~/.cache/edge-int8-pipeline/calib"
# Below this many samples the set is probably too small to find activation ranges.
WARN_BELOW = 100
# ``--calib-size`` when it is not given. A source holding fewer samples (a folder, an .npz, a small training
# split) then gives all it holds; an explicit ``--calib-size`` larger than the source stays an error.
DEFAULT_SIZE = 500


@runtime_checkable
class CalibrationSource(Protocol):
    def __iter__(self) -> Iterator[np.ndarray]: ...
    def __len__(self) -> int: ...
    def describe(self) -> dict: ...


def value_statistics(samples: np.ndarray, pre: Preprocessing | None = None) -> dict:
    """Value statistics of normalised N×C×H×W samples (the tensor the converter calibrates on)."""
    if not len(samples):
        return {}
    s = samples.astype(np.float64, copy=False)
    d = {
        "space": "model input after preprocessing",
        "min": float(s.min()), "max": float(s.max()),
        "mean": float(s.mean()), "std": float(s.std()),
        "per_channel_mean": [round(float(v), 6) for v in s.mean(axis=(0, 2, 3))],
        "per_channel_std": [round(float(v), 6) for v in s.std(axis=(0, 2, 3))],
    }
    if pre is not None:
        lo, hi = pre.value_range()
        d["input_range"] = [lo, hi]
        d["fraction_of_input_range"] = round((d["max"] - d["min"]) / (hi - lo), 4) if hi > lo else None
    return d


@dataclass
class ArraySource:
    """A calibration set held in memory as normalised float32 N×C×H×W samples."""

    name: str
    samples: np.ndarray
    seed: int | None
    origin: str
    extra: dict = field(default_factory=dict)
    preprocessing: Preprocessing | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        for s in self.samples:
            yield s

    def __len__(self) -> int:
        return int(len(self.samples))

    def array(self) -> np.ndarray:
        return self.samples

    def describe(self) -> dict:
        d = {
            "source": self.name,
            "size": len(self),
            "seed": self.seed,
            "origin": self.origin,
            "statistics": value_statistics(self.samples, self.preprocessing),
        }
        d.update(self.extra)
        return d


@dataclass(frozen=True)
class CalibContext:
    """What a builder may draw from: the training split (raw NCHW), the preprocessing record and
    the cache folder for generated sets (``None``: do not cache)."""

    x_train: np.ndarray
    y_train: np.ndarray
    preprocessing: Preprocessing
    dataset_name: str
    cache_dir: Path | None = None


# (context, size, seed, argument): ``size`` None means "not given": DEFAULT_SIZE, or all a smaller source holds
# (builders resolve it with :func:`resolve_size` or :func:`generated_size`).
Builder = Callable[[CalibContext, int | None, int, str | None], ArraySource]
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
    from pipeline.calib_data import fractal, fractal_raw, gan, noise, real, shifted, user  # noqa: F401


def did_you_mean(what: str, name: str, choices) -> str:
    """``unknown WHAT 'x'; did you mean y?`` (or the list of choices)."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(sorted(choices))}"
    return f"unknown {what} {name!r}; {hint}"


def build(spec: str, ctx: CalibContext, size: int | None, seed: int) -> ArraySource:
    """Build the source named by ``spec`` (``NAME`` or ``NAME:ARG``) and check it fits the model.

    ``size`` None (``--calib-size`` not given): :data:`DEFAULT_SIZE` samples, or all a smaller source holds.
    """
    _load()
    name, _, arg = spec.partition(":")
    if name not in _REGISTRY:
        raise CalibrationError(did_you_mean("calibration source", name, _REGISTRY))
    if size is not None and size <= 0:
        raise CalibrationError(f"--calib-size {size} gives an empty representative dataset; pass at least 1 (100-500 recommended)")
    t0 = time.perf_counter()
    src = _REGISTRY[name](ctx, size, seed, arg or None)
    build_s = time.perf_counter() - t0
    if src.preprocessing is None:
        src.preprocessing = ctx.preprocessing
    src.extra = {"spec": spec, **src.extra, "build_s": round(build_s, 4)}
    check_source(src, ctx.preprocessing)
    _check_coverage(src, ctx)
    return src


def _check_coverage(src: ArraySource, ctx: CalibContext, warn_below: float = 0.9) -> None:
    """Warn when the set spans much less than the training data's value range.

    The converter calibrates the int8 *input* from the set too: a set that misses part of the range
    makes the deployed model clip real inputs there (e.g. a low-contrast set).
    """
    if not len(ctx.x_train):
        return
    from pipeline.inputs.preprocessing import apply
    pre = ctx.preprocessing
    raw = np.array([[ctx.x_train.min(axis=(0, 2, 3)), ctx.x_train.max(axis=(0, 2, 3))]], np.float64)  # 1x2xC
    d = apply(np.moveaxis(raw, 2, 1)[..., None], pre)[0]  # C x 2 x 1 (normalised min, max per channel)
    lo, hi = float(d[:, 0].min()), float(d[:, 1].max())
    s = src.array()
    smin, smax = float(s.min()), float(s.max())
    cover = (min(smax, hi) - max(smin, lo)) / (hi - lo) if hi > lo else 1.0
    src.extra["coverage_of_training_range"] = round(cover, 4)
    if cover < warn_below:
        warnings.warn(f"calibration samples span [{smin:.3g}, {smax:.3g}], only {cover:.0%} of the training data's "
                      f"range [{lo:.3g}, {hi:.3g}]; the int8 input quantization will clip real inputs outside it - "
                      "calibrate on data covering the full range", stacklevel=3)


def _chw(shape) -> str:
    return "x".join(map(str, shape))


def check_source(src: ArraySource, pre: Preprocessing, warn_below: int = WARN_BELOW) -> None:
    """Fail loudly on an empty source or samples whose shape or value range do not fit the model."""
    n = len(src)
    if n == 0:
        raise CalibrationError(f"calibration source {src.name!r} yielded no samples; give it data or pick another --calib")
    s = src.array()
    if s.dtype != np.float32:
        raise CalibrationError(f"calibration source {src.name!r} yields {s.dtype} samples; sources must yield float32")
    if s.ndim != 4:
        raise CalibrationError(
            f"calibration source {src.name!r} yields samples shaped {_chw(s.shape[1:])}; they must be C×H×W "
            f"({_chw(pre.input_shape)} for this model)")
    if s.shape[1] != pre.channels and tuple(s.shape[2:]) == tuple(pre.input_shape[1:]):
        raise CalibrationError(
            f"calibration samples have {s.shape[1]} channels but the model takes {pre.channels}; convert the "
            f"images to {'grayscale' if pre.channels == 1 else f'{pre.channels} channels'} before calibrating")
    if tuple(s.shape[1:]) != tuple(pre.input_shape):
        raise CalibrationError(
            f"calibration samples are {_chw(s.shape[1:])} but the model takes "
            f"{_chw(pre.input_shape)} (C×H×W); build the source at the model's input size and channels"
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
    if n > 1 and (smax - smin) < 0.02 * (hi - lo):
        raise CalibrationError(
            f"calibration samples span only [{smin:.3g}, {smax:.3g}], under 2% of the input range [{lo:.3g}, {hi:.3g}]; "
            "the images are probably scaled twice (e.g. divided by 255 twice) or constant - feed raw images"
        )
    if n < warn_below:
        warnings.warn(f"only {n} calibration samples; 100-500 are recommended for full-int8 calibration", stacklevel=2)


# --------------------------------------------------------------------------- helpers for builders

def raw_bounds(pre: Preprocessing) -> tuple[float, float]:
    """The raw value range of the data (e.g. 0..255 for uint8 images)."""
    lo, hi = (float(v) for v in pre.raw_range)
    if not hi > lo:
        raise CalibrationError(f"the data's raw value range [{lo}, {hi}] is empty; the training images are constant")
    return lo, hi


def finish_raw(raw: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Raw float images (N×C×H×W, raw value range) -> normalised float32 model input, exactly once.

    Values are clipped to the raw range and, for uint8 data, rounded to whole grey levels like the data.
    """
    from pipeline.inputs.preprocessing import apply
    lo, hi = raw_bounds(pre)
    raw = np.clip(raw, lo, hi)
    if pre.source_dtype == "uint8":
        raw = np.rint(raw)
    return apply(raw.astype(np.float32, copy=False), pre)


def check_size(what: str, size: int, holds: int) -> None:
    """Error when more samples are asked for than the source holds."""
    if holds == 0:
        raise CalibrationError(f"{what} holds no samples; give it data or pick another --calib")
    if size > holds:
        raise CalibrationError(f"--calib-size {size} is larger than {what} ({holds} samples); pass --calib-size {holds} or fewer")


def resolve_size(what: str, size: int | None, holds: int) -> int:
    """How many samples to take from a source holding ``holds``: an explicit ``size`` must fit (else an error);
    ``None`` (``--calib-size`` not given) takes :data:`DEFAULT_SIZE`, or all the source holds when that is fewer."""
    if size is None:
        check_size(what, 1, holds)  # an empty source is an error either way
        return min(DEFAULT_SIZE, holds)
    check_size(what, size, holds)
    return size


def generated_size(size: int | None) -> int:
    """How many samples a generated source (fractal, noise) makes: ``size``, or :data:`DEFAULT_SIZE` when not given."""
    return DEFAULT_SIZE if size is None else size


def pixel_sample(ctx: CalibContext, seed: int, max_images: int = 1000) -> np.ndarray:
    """Up to ``max_images`` random training images (raw, float64, N×C×H×W) for value statistics."""
    n = len(ctx.x_train)
    if n == 0:
        raise CalibrationError("the training split is empty; its value statistics cannot be matched")
    idx = np.sort(np.random.default_rng([seed, 7]).choice(n, size=min(n, max_images), replace=False))
    return ctx.x_train[idx].astype(np.float64)
