"""``--calib fractal-raw``: colourised IFS fractals in the paper's form, *without* matching the data's pixels.

``--calib fractal`` (:mod:`calib_data.fractal`) renders FractalDB-style fractals and then maps every image's pixel
ranks through the training split's pixel quantiles, so its value distribution (dark background, contrast, range)
follows the data. Datumaro's generator, which Masouris et al. (arXiv 2305.06052) calibrated with, does no such
thing: it colourises the fractal with a pretrained Caffe model and fills the black background with one of 1000
palette colours. This source keeps that raw form, with what we can run offline:

- the same categories, weight variants, sizing, chaos game, flips, rotation and blur as ``fractal``
  (its helpers are reused, and the same seed gives the same fractal shapes);
- **colour instead of matching**: each image gets a random foreground colour and a random background colour,
  each channel U(0, 1) (the stand-in for the colouriser and the palette, which need a download), blended by the
  rendered point density: ``pixel = bg + density * (fg - bg)``; for one-channel data the colours are made grey
  with the ITU-R BT.601 luma weights (0.299, 0.587, 0.114), as a greyscale conversion of colour images would;
- mapped linearly onto the data's raw range (0..255 for uint8 images) and normalised once with
  :func:`pipeline.inputs.preprocessing.apply`.

So background and contrast are whatever the colours give, not the data's: the comparison with ``fractal`` measures
what the pixel-distribution matching buys. Seeded and cached like every generated set.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.errors import CalibrationError

from pipeline.calib_data import ArraySource, CalibContext, finish_raw, generated_size, raw_bounds, register_source
from pipeline.calib_data import fractal as fr
from pipeline.calib_data.cache import cached

VERSION = 1
LUMA = np.array([0.299, 0.587, 0.114])


def colours(rng: np.random.Generator, b: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) colours, B x C in [0, 1]: RGB U(0, 1) per channel, made grey (BT.601) for C = 1;
    for C other than 1 or 3 every channel is drawn on its own."""
    fg = rng.uniform(0.0, 1.0, (b, 3 if c == 1 else c))
    bg = rng.uniform(0.0, 1.0, (b, 3 if c == 1 else c))
    if c == 1:
        fg, bg = fg @ LUMA[:, None], bg @ LUMA[:, None]
    return fg, bg


def generate_raw(count: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, dict]:
    """``count`` colourised fractal images (float64 C x H x W in [0, 1]) and a summary."""
    c, h, w = shape
    if min(h, w) < fr.MIN_SIDE:
        raise CalibrationError(f"fractal images need H and W of at least {fr.MIN_SIDE} pixels; the model takes {h}x{w}")
    n_cat, n_w, n_inst = fr.sizing(count)
    weights = fr.weight_vectors()[:n_w]
    systems = []
    for i in range(n_cat):  # the same systems as --calib fractal with this seed
        p, prob, _ = fr.search_category(np.random.default_rng([seed, 0, i]))
        systems.append((p, prob))
    cat_of = np.repeat(np.arange(n_cat), n_w * n_inst)[:count]
    w_of = np.tile(np.repeat(np.arange(n_w), n_inst), n_cat)[:count]
    ss = max(1, min(4, math.ceil(96 / max(h, w))))
    sh, sw = h * ss, w * ss
    chains = 512
    steps = max(16, min(200, math.ceil(1.0 * sh * sw / chains)))
    batch = max(1, min(64, 2_000_000 // (chains * steps)))
    out = np.empty((count, c, h, w))
    for start in range(0, count, batch):
        idx = np.arange(start, min(count, start + batch))
        rng = np.random.default_rng([seed, 5, start])
        b = len(idx)
        params, cum = fr._pad_systems([systems[k] for k in cat_of[idx]])
        params = params * weights[w_of[idx]][:, None, :]
        flip = np.where(rng.random((b, 2)) < 0.5, -1.0, 1.0)
        ang = np.deg2rad(rng.uniform(-fr.ROTATION_DEG, fr.ROTATION_DEG, b))
        margin = rng.uniform(0.0, 0.15, b)
        blur_on = rng.random(b) < fr.BLUR_PROB
        sigma = np.where(blur_on, rng.uniform(0.3, 1.2, b) * max(h, w) / 28.0, 0.0)
        fg, bg = colours(rng, b, c)
        pts = fr.chaos_game(params, cum, rng, chains=chains, steps=steps).astype(np.float64)
        dead = np.isnan(pts[..., 0]).mean(axis=1) > 0.9
        if dead.any():
            p0, c0 = fr._pad_systems([systems[k] for k in cat_of[idx[dead]]])
            pts[dead] = fr.chaos_game(p0, c0, rng, chains=chains, steps=steps)
        pts = pts * flip[:, None, :]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        pts = np.stack([cos * pts[..., 0] - sin * pts[..., 1], sin * pts[..., 0] + cos * pts[..., 1]], -1)
        counts = fr.rasterise(pts, sh, sw, margin).astype(np.float64)
        dens = np.log1p(counts)
        nz = dens.reshape(b, -1)
        (top,) = fr._row_quantiles(np.where(nz > 0, nz, np.nan), (0.99,))
        top = np.where(np.isfinite(top) & (top > 0), top, 1.0)
        v = np.clip(dens / top[:, None, None], 0.0, 1.0)
        v = v.reshape(b, h, ss, w, ss).mean(axis=(2, 4))[:, None]  # B x 1 x H x W density in [0, 1]
        v = fr.blur(v, sigma)
        out[idx] = bg[:, :, None, None] + v * (fg - bg)[:, :, None, None]
    summary = {"categories": n_cat, "weight_variants": n_w, "instances": n_inst,
               "colours": "foreground and background U(0,1) per RGB channel" + (", BT.601 grey" if c == 1 else "")}
    return np.clip(out, 0.0, 1.0), summary


@register_source("fractal-raw")
def fractal_raw(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """Colourised IFS fractals on random backgrounds, linearly in the raw range (no pixel matching)."""
    size = generated_size(size)
    if arg:
        raise CalibrationError(f"--calib fractal-raw takes no argument (got fractal-raw:{arg}); pass --calib fractal-raw")
    pre = ctx.preprocessing

    def make() -> ArraySource:
        lo, hi = raw_bounds(pre)
        unit, summary = generate_raw(size, pre.input_shape, seed)
        return ArraySource(
            name="fractal-raw", samples=finish_raw(lo + unit * (hi - lo), pre), seed=seed, preprocessing=pre,
            origin=(f"generated: FractalDB-style IFS fractals ({summary['categories']} systems x "
                    f"{summary['weight_variants']} weights x {summary['instances']} instances), random foreground "
                    "and background colours, linear in the raw range (not matched to the data's pixels)"),
            extra={"split": None, "generator": {"version": VERSION, "fractal_version": fr.VERSION, **summary}},
        )

    return cached(ctx, "fractal-raw", size, seed, f"{VERSION}-{fr.VERSION}", make)
