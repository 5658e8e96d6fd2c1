"""``--calib noise[:gaussian|uniform]``: a data-free baseline of i.i.d. pixel noise.

- ``noise:gaussian`` (the default): every pixel drawn from N(mean_c, std_c), the per-channel mean and
  standard deviation of the training split's raw pixels, clipped to the data's raw value range;
- ``noise:uniform``: every pixel drawn from U(lo, hi), the data's raw value range.

Images are drawn in the raw value range (e.g. 0..255, rounded to whole grey levels for uint8 data) and
normalised once with :func:`pipeline.inputs.preprocessing.apply`. Seeded; cached like every generated set.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import CalibrationError

from pipeline.calib_data import (ArraySource, CalibContext, did_you_mean, finish_raw, generated_size, pixel_sample, raw_bounds,
               register_source)
from pipeline.calib_data.cache import cached

VERSION = 1
KINDS = ("gaussian", "uniform")


@register_source("noise")
def noise(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """Gaussian or uniform noise matched to the data's value range and statistics."""
    size = generated_size(size)
    kind = arg or "gaussian"
    if kind not in KINDS:
        raise CalibrationError(did_you_mean("noise kind", kind, KINDS) + " (--calib noise:gaussian or noise:uniform)")
    pre = ctx.preprocessing

    def make() -> ArraySource:
        lo, hi = raw_bounds(pre)
        c, h, w = pre.input_shape
        rng = np.random.default_rng([seed, 2])
        if kind == "gaussian":
            px = pixel_sample(ctx, seed)
            mean, std = px.mean(axis=(0, 2, 3)), px.std(axis=(0, 2, 3))
            raw = rng.normal(mean[None, :, None, None], std[None, :, None, None], (size, c, h, w))
            params = {"distribution": "gaussian", "raw_mean": [round(float(v), 4) for v in mean],
                      "raw_std": [round(float(v), 4) for v in std], "clipped_to": [lo, hi]}
            how = f"N(mean, std) of the {ctx.dataset_name} training split's pixels per channel, clipped to [{lo:g}, {hi:g}]"
        else:
            raw = rng.uniform(lo, hi, (size, c, h, w))
            params = {"distribution": "uniform", "low": lo, "high": hi}
            how = f"U({lo:g}, {hi:g}), the {ctx.dataset_name} data's raw value range"
        return ArraySource(name=f"noise:{kind}", samples=finish_raw(raw, pre), seed=seed, preprocessing=pre,
                           origin=f"generated: i.i.d. pixel noise, {how}",
                           extra={"split": None, "generator": {"version": VERSION, **params}})

    return cached(ctx, f"noise:{kind}", size, seed, VERSION, make)
