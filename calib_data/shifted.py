"""``--calib shifted:CORRUPTION[:SEVERITY]``: real training images with a corruption applied.

The training images are drawn class-balanced (as ``balanced``, same seed), scaled from the data's raw
range to [0, 1], corrupted with :func:`pipeline.reliability.corruptions.corrupt` (the same functions as the
evaluation's shift suite; names in :data:`pipeline.reliability.corruptions.REGISTERED`, severity 1..5, default
:data:`DEFAULT_SEVERITY`), mapped back to the raw range and normalised once with the preprocessing
record. Seeded and cached.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import CalibrationError, PipelineError

from pipeline.calib_data import ArraySource, CalibContext, did_you_mean, finish_raw, raw_bounds, register_source, resolve_size
from pipeline.calib_data.cache import cached

VERSION = 1
DEFAULT_SEVERITY = 3


def parse(arg: str | None) -> tuple[str, int]:
    from pipeline.reliability.corruptions import REGISTERED, SEVERITIES
    usage = "--calib shifted:CORRUPTION[:SEVERITY], e.g. shifted:gaussian_noise:3"
    if not arg:
        raise CalibrationError(f"--calib shifted needs a corruption: {usage}; corruptions: {', '.join(REGISTERED)}")
    name, _, sev = arg.partition(":")
    if name not in REGISTERED:
        raise CalibrationError(did_you_mean("corruption", name, REGISTERED) + f" ({usage})")
    if not sev:
        return name, DEFAULT_SEVERITY
    try:
        severity = int(sev)
    except ValueError:
        severity = None
    if severity not in SEVERITIES:
        raise CalibrationError(f"corruption severity {sev!r} is not one of {', '.join(map(str, SEVERITIES))}; {usage}")
    return name, severity


@register_source("shifted")
def shifted(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """Class-balanced training images with one corruption at one severity."""
    from pipeline.reliability.corruptions import corrupt
    from pipeline.calib_data.real import balanced_indices
    name, severity = parse(arg)
    size = resolve_size(f"the {ctx.dataset_name} training split", size, len(ctx.x_train))
    pre = ctx.preprocessing
    spec = f"shifted:{name}:{severity}"

    def make() -> ArraySource:
        lo, hi = raw_bounds(pre)
        idx = np.sort(balanced_indices(ctx.y_train, size, seed))
        x01 = np.clip((ctx.x_train[idx].astype(np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        try:
            y01 = corrupt(x01, name, severity, seed)
        except PipelineError as e:
            raise CalibrationError(f"--calib {spec}: {e}") from None
        raw = lo + y01.astype(np.float64) * (hi - lo)
        classes = np.bincount(ctx.y_train[idx], minlength=int(ctx.y_train.max()) + 1)
        return ArraySource(
            name=spec, samples=finish_raw(raw, pre), seed=seed, preprocessing=pre,
            origin=f"{ctx.dataset_name} training split, class-balanced, corrupted with {name} at severity {severity} "
                   "(pipeline.reliability.corruptions)",
            extra={"split": "train", "corruption": name, "severity": severity, "per_class": classes.tolist(),
                   "generator": {"version": VERSION}})

    return cached(ctx, spec, size, seed, _version(), make)


def _version() -> str:
    """This builder's version plus a hash of the corruption code, so a changed corruption regenerates."""
    import hashlib
    import inspect
    import pipeline.reliability.corruptions as mod
    return f"{VERSION}+{hashlib.sha1(inspect.getsource(mod).encode()).hexdigest()[:12]}"
