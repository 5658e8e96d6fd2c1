"""Calibration sources drawn from the real training split."""
from __future__ import annotations

import numpy as np

from pipeline.errors import CalibrationError
from pipeline.inputs.preprocessing import apply

from pipeline.calib_data import ArraySource, CalibContext, register_source, resolve_size


def _resolve_size(ctx: CalibContext, size: int | None) -> int:
    return resolve_size(f"the {ctx.dataset_name} training split", size, len(ctx.x_train))


def _no_arg(name: str, arg: str | None) -> None:
    if arg:
        raise CalibrationError(f"--calib {name} takes no argument (got {name}:{arg}); pass --calib {name}")


def _source(name: str, ctx: CalibContext, idx: np.ndarray, seed: int | None, **extra) -> ArraySource:
    samples = apply(ctx.x_train[np.sort(idx)], ctx.preprocessing)
    classes = np.bincount(ctx.y_train[idx], minlength=int(ctx.y_train.max()) + 1)
    return ArraySource(name=name, samples=samples, seed=seed, preprocessing=ctx.preprocessing,
                       origin=f"{ctx.dataset_name} training split", extra={"split": "train",
                                                                           "per_class": classes.tolist(), **extra})


def balanced_indices(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Class-stratified random indices: as equal a share per class as the labels allow."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    pools = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    take = {c: 0 for c in classes}
    remaining = size
    # Round-robin so every class gets floor(size/K) or one more, capped by what it holds.
    while remaining:
        progressed = False
        for c in rng.permutation(classes):
            if remaining and take[c] < len(pools[c]):
                take[c] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    return np.concatenate([pools[c][:take[c]] for c in classes])


@register_source("balanced")
def balanced(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """Class-stratified random training images: as equal a share per class as the split allows."""
    _no_arg("balanced", arg)
    size = _resolve_size(ctx, size)
    return _source("balanced", ctx, balanced_indices(ctx.y_train, size, seed), seed)


@register_source("real")
def real(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """Plain random training images."""
    _no_arg("real", arg)
    size = _resolve_size(ctx, size)
    idx = np.random.default_rng(seed).choice(len(ctx.x_train), size=size, replace=False)
    return _source("real", ctx, idx, seed)


@register_source("first")
def first(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """The first N training images (the naive baseline some papers use)."""
    _no_arg("first", arg)
    size = _resolve_size(ctx, size)
    return _source("first", ctx, np.arange(size), None)
