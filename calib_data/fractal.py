"""``--calib fractal``: FractalDB-style IFS fractals generated on the fly (no downloads, no colouriser).

The generator follows Datumaro's ``FractalImageGenerator`` (the one the GSoC 2022 OpenVINO work
calibrated with; Kataoka et al., ACCV 2020, "Pre-training without Natural Images"):

1. **Categories.** A category is one random iterated function system: 2-7 affine maps
   ``(x, y) -> (a x + b y + e, c x + d y + f)`` with every parameter drawn from U(-1, 1), each map picked
   with probability proportional to ``|ad - bc|``. A system is redrawn until its attractor fills at
   least :data:`FILL_THRESHOLD` of a 64x64 canvas (degenerate lines and points are rejected).
2. **25 weight variants** per system: the all-ones vector and each of the 6 parameters scaled by
   1 +- 0.4 and 1 +- 0.8.
3. **Sizing** as Datumaro: ``instances = ceil(sqrt(ceil(N / 25)))``, ``categories = ceil(ceil(N / 25) /
   instances)``; images are categories x 25 weights x instances, truncated to N (500 -> 4 x 25 x 5).
4. **Render** with the chaos game, vectorised over a batch of images and many parallel chains, at a
   supersampled canvas, as a log point density (instead of Datumaro's binary 3x3 stamps), then
   area-downsampled to the model's H x W.
5. **Augment**: horizontal and vertical flips (p = 0.5 each) and rotation U(-30, 30) degrees applied
   to the point cloud, Gaussian blur with p = 0.7, a random margin.
6. **Intensities** (instead of Datumaro's pretrained colouriser and background palette): for C > 1
   channels each image gets a random colour; then each image's pixel ranks are mapped through the
   training split's pixel quantiles (per channel), with a random exposure, so background, contrast and
   value range follow the data's value statistics. This yields raw images in the data's raw range,
   which are normalised once with :func:`pipeline.inputs.preprocessing.apply`.

Seeded: the same seed, size and input shape give the identical set.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.errors import CalibrationError

from pipeline.calib_data import ArraySource, CalibContext, finish_raw, generated_size, pixel_sample, register_source
from pipeline.calib_data.cache import cached

VERSION = 1  # bump when the generator's output changes (invalidates cached sets)
N_PARAMS = 6
MIN_MAPS, MAX_MAPS = 2, 7
FILL_THRESHOLD = 0.2
MAX_SYSTEM_TRIES = 5000
WEIGHT_INTERVAL = 0.4
ROTATION_DEG = 30.0
BLUR_PROB = 0.7
MIN_SIDE = 8


def weight_vectors() -> np.ndarray:
    """The 25 FractalDB weight vectors: ones, and each parameter scaled by 1 +- 0.4 and 1 +- 0.8."""
    vecs = [np.ones(N_PARAMS)]
    for j in range(N_PARAMS):
        for m in (-2, -1, 1, 2):
            w = np.ones(N_PARAMS)
            w[j] += m * WEIGHT_INTERVAL
            vecs.append(w)
    return np.array(vecs)


def sizing(count: int, n_weights: int = 25) -> tuple[int, int, int]:
    """(categories, weight variants, instances) for ``count`` images, as Datumaro sizes them."""
    w = min(n_weights, count)
    per_weight = math.ceil(count / w)
    instances = math.ceil(math.sqrt(per_weight))
    categories = math.ceil(per_weight / instances)
    return categories, w, instances


# --------------------------------------------------------------------------- the chaos game

def chaos_game(params: np.ndarray, cumprob: np.ndarray, rng: np.random.Generator, chains: int, steps: int,
               warmup: int = 12) -> np.ndarray:
    """Iterate B systems at once with ``chains`` parallel chains each.

    params: B x K x 6 (a, b, c, d, e, f per map, padded); cumprob: B x K cumulative map probabilities
    (padded with 1). Returns B x (steps*chains) x 2 float32 points (NaN where a chain diverged).
    """
    b, kmax, _ = params.shape
    coef = np.ascontiguousarray(params.reshape(b * kmax, N_PARAMS).T)  # 6 x (B*K), one row per parameter
    base = (np.arange(b) * kmax)[:, None]
    pts = np.empty((b, steps, chains, 2), np.float32)
    x = rng.uniform(-1.0, 1.0, (b, chains))
    y = rng.uniform(-1.0, 1.0, (b, chains))
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(warmup + steps):
            u = rng.random((b, chains))
            idx = base + np.zeros((b, chains), np.intp)
            for j in range(kmax - 1):  # the last cumulative probability is 1: never needed
                idx += u > cumprob[:, j:j + 1]
            a_, b_, c_, d_, e_, f_ = (np.take(coef[i], idx) for i in range(N_PARAMS))
            x, y = a_ * x + b_ * y + e_, c_ * x + d_ * y + f_
            if t % 8 == 7:  # diverging chains: mark them NaN (NaN stays NaN)
                bad = ~(np.abs(x) < 1e6) | ~(np.abs(y) < 1e6)
                x[bad] = np.nan
                y[bad] = np.nan
            if t >= warmup:
                pts[:, t - warmup, :, 0] = x
                pts[:, t - warmup, :, 1] = y
    bad = ~(np.abs(pts) < 1e6).all(axis=-1)
    pts[bad] = np.nan
    return pts.reshape(b, steps * chains, 2)


def _row_quantiles(v: np.ndarray, qs: tuple[float, ...], sample: int = 4096) -> list[np.ndarray]:
    """Per-row quantiles ignoring NaN, from an evenly strided subsample of each row (lower order statistic)."""
    stride = max(1, v.shape[1] // sample)
    sv = np.sort(v[:, ::stride], axis=1)  # NaN sorts last
    n = np.maximum((~np.isnan(sv)).sum(axis=1), 1)
    return [np.take_along_axis(sv, np.floor(q * (n - 1)).astype(np.intp)[:, None], axis=1)[:, 0] for q in qs]


def rasterise(pts: np.ndarray, h: int, w: int, margin: np.ndarray | float = 0.0) -> np.ndarray:
    """Point counts on an h x w canvas per image, each cloud stretched to fill the canvas (less margin)."""
    b, n, _ = pts.shape
    xs, ys = pts[..., 0], pts[..., 1]
    lo_x, hi_x = _row_quantiles(xs, (0.001, 0.999))
    lo_y, hi_y = _row_quantiles(ys, (0.001, 0.999))
    margin = np.broadcast_to(np.asarray(margin, np.float64), (b,))
    span_w, span_h = (w - 1) * (1 - 2 * margin), (h - 1) * (1 - 2 * margin)
    with np.errstate(invalid="ignore"):
        ix = np.rint((xs - lo_x[:, None]) * (span_w / np.maximum(hi_x - lo_x, 1e-9))[:, None] + ((w - 1) * margin)[:, None])
        iy = np.rint((ys - lo_y[:, None]) * (span_h / np.maximum(hi_y - lo_y, 1e-9))[:, None] + ((h - 1) * margin)[:, None])
        keep = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)  # False for NaN
    flat = ((np.arange(b)[:, None] * h + iy) * w + ix)[keep].astype(np.int64)
    return np.bincount(flat, minlength=b * h * w).reshape(b, h, w)


def _pad_systems(systems: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    b = len(systems)
    params = np.zeros((b, MAX_MAPS, N_PARAMS))
    cum = np.ones((b, MAX_MAPS))
    for i, (p, prob) in enumerate(systems):
        params[i, :len(p)] = p
        params[i, len(p):] = p[-1]  # never picked: the cumulative probability is already 1
        cum[i, :len(p)] = np.cumsum(prob)
        cum[i, len(p) - 1:] = 1.0
    return params, cum


def random_system(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(MIN_MAPS, MAX_MAPS + 1))
    p = rng.uniform(-1.0, 1.0, (n, N_PARAMS))
    det = np.abs(p[:, 0] * p[:, 3] - p[:, 1] * p[:, 2])
    prob = (det + 1e-12) / (det.sum() + 1e-12 * n)
    return p, prob


def search_category(rng: np.random.Generator, batch: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """Draw systems until one fills at least FILL_THRESHOLD of a 64x64 canvas. Returns (params, prob, tries)."""
    tries = 0
    while tries < MAX_SYSTEM_TRIES:
        cands = [random_system(rng) for _ in range(batch)]
        params, cum = _pad_systems(cands)
        pts = chaos_game(params, cum, rng, chains=256, steps=48)
        counts = rasterise(pts, 64, 64)
        fill = (counts > 0).mean(axis=(1, 2))
        ok = np.flatnonzero(fill >= FILL_THRESHOLD)
        if len(ok):
            return cands[ok[0]][0], cands[ok[0]][1], tries + int(ok[0]) + 1
        tries += batch
    raise CalibrationError(f"no IFS system reached a {FILL_THRESHOLD:.0%} fill rate in {MAX_SYSTEM_TRIES} tries; "
                           "pick another --seed")


# --------------------------------------------------------------------------- image post-processing

def _gaussian_kernels(sigmas: np.ndarray) -> np.ndarray:
    r = max(1, int(math.ceil(3 * float(sigmas.max()))))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t[None, :] / np.maximum(sigmas, 1e-6)[:, None]) ** 2)
    k[sigmas <= 0] = (t == 0)
    return k / k.sum(axis=1, keepdims=True)


def blur(x: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of B x C x H x W images with one sigma (pixels) per image; reflect padding."""
    if not np.any(sigmas > 0):
        return x
    k = _gaussian_kernels(sigmas)
    r = k.shape[1] // 2
    h, w = x.shape[2:]
    out = x
    for axis, n in ((2, h), (3, w)):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        xp = np.pad(out, pad, mode="reflect" if n > r else "edge")
        acc = np.zeros_like(out)
        for i in range(2 * r + 1):
            sl = [slice(None)] * 4
            sl[axis] = slice(i, i + n)
            acc += k[:, i][:, None, None, None] * xp[tuple(sl)]
        out = acc
    return out


def _avg_ranks(v: np.ndarray) -> np.ndarray:
    """Rank of every value within its row, in (0, 1), ties sharing their average rank."""
    rows, n = v.shape
    order = np.argsort(v, axis=1, kind="stable")
    sv = np.take_along_axis(v, order, axis=1)
    new = np.ones_like(sv, dtype=bool)
    new[:, 1:] = sv[:, 1:] != sv[:, :-1]  # a new group starts at every change and at every row start
    gid = np.cumsum(new.ravel()).reshape(rows, n) - 1
    pos = np.broadcast_to(np.arange(n, dtype=np.float64), (rows, n))
    mean_pos = np.bincount(gid.ravel(), weights=pos.ravel()) / np.bincount(gid.ravel())
    ranks = np.empty_like(v, dtype=np.float64)
    np.put_along_axis(ranks, order, mean_pos[gid], axis=1)
    return (ranks + 0.5) / n


def match_histogram(x: np.ndarray, quantiles: np.ndarray, exposure: np.ndarray) -> np.ndarray:
    """Map each image's pixel ranks (per channel) through the data's quantile function.

    x: B x C x H x W; quantiles: C x L raw-value quantiles at evenly spaced levels; exposure: B factors
    (u -> u ** exposure) so images vary in brightness around the data's marginal distribution.
    """
    b, c, h, w = x.shape
    u = _avg_ranks(x.reshape(b * c, h * w)).reshape(b, c, h * w)
    u = u ** exposure[:, None, None]
    levels = np.linspace(0.0, 1.0, quantiles.shape[1])
    out = np.empty_like(u)
    for ch in range(c):
        out[:, ch] = np.interp(u[:, ch], levels, quantiles[ch])
    return out.reshape(b, c, h, w)


def data_quantiles(ctx: CalibContext, seed: int, levels: int = 1025) -> np.ndarray:
    """C x levels quantiles of the training split's raw pixel values (from up to 1000 random images)."""
    px = pixel_sample(ctx, seed)
    c = px.shape[1]
    return np.quantile(np.moveaxis(px, 1, 0).reshape(c, -1), np.linspace(0, 1, levels), axis=1).T


# --------------------------------------------------------------------------- the generator

def generate(count: int, shape: tuple[int, int, int], quantiles: np.ndarray, seed: int,
             progress=None) -> tuple[np.ndarray, dict]:
    """``count`` raw fractal images (float64, C x H x W each, in the quantiles' value range) and a summary."""
    c, h, w = shape
    if min(h, w) < MIN_SIDE:
        raise CalibrationError(f"fractal images need H and W of at least {MIN_SIDE} pixels; the model takes {h}x{w}")
    n_cat, n_w, n_inst = sizing(count)
    weights = weight_vectors()[:n_w]
    systems, tries = [], []
    for i in range(n_cat):
        p, prob, t = search_category(np.random.default_rng([seed, 0, i]))
        systems.append((p, prob))
        tries.append(t)
    # Image order as Datumaro: category-major, then weight, then instance.
    cat_of = np.repeat(np.arange(n_cat), n_w * n_inst)[:count]
    w_of = np.tile(np.repeat(np.arange(n_w), n_inst), n_cat)[:count]

    ss = max(1, min(4, math.ceil(96 / max(h, w))))  # supersampling factor
    sh, sw = h * ss, w * ss
    chains = 512
    steps = max(16, min(200, math.ceil(1.0 * sh * sw / chains)))
    batch = max(1, min(64, 2_000_000 // (chains * steps)))
    out = np.empty((count, c, h, w))
    diverged = 0
    for start in range(0, count, batch):
        idx = np.arange(start, min(count, start + batch))
        rng = np.random.default_rng([seed, 1, start])
        b = len(idx)
        params, cum = _pad_systems([systems[k] for k in cat_of[idx]])
        params = params * weights[w_of[idx]][:, None, :]
        # Augmentations on the point cloud: flips and a rotation.
        flip = np.where(rng.random((b, 2)) < 0.5, -1.0, 1.0)
        ang = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, b))
        margin = rng.uniform(0.0, 0.15, b)
        gamma = rng.uniform(0.5, 1.5, b)
        blur_on = rng.random(b) < BLUR_PROB
        sigma = np.where(blur_on, rng.uniform(0.3, 1.2, b) * max(h, w) / 28.0, 0.0)
        exposure = np.exp(rng.uniform(np.log(0.6), np.log(1.6), b))
        colour = rng.uniform(0.2, 1.0, (b, c)) if c > 1 else np.ones((b, 1))
        colour /= colour.max(axis=1, keepdims=True)

        pts = chaos_game(params, cum, rng, chains=chains, steps=steps).astype(np.float64)
        # A weight variant can make a system diverge; fall back to its unweighted form.
        dead = np.isnan(pts[..., 0]).mean(axis=1) > 0.9
        if dead.any():
            diverged += int(dead.sum())
            p0, c0 = _pad_systems([systems[k] for k in cat_of[idx[dead]]])
            pts[dead] = chaos_game(p0, c0, rng, chains=chains, steps=steps)
        pts = pts * flip[:, None, :]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        pts = np.stack([cos * pts[..., 0] - sin * pts[..., 1], sin * pts[..., 0] + cos * pts[..., 1]], -1)
        counts = rasterise(pts, sh, sw, margin).astype(np.float64)
        # Log point density scaled by each image's 99th percentile of non-empty pixels, then a gamma.
        dens = np.log1p(counts)
        nz = dens.reshape(b, -1)
        (top,) = _row_quantiles(np.where(nz > 0, nz, np.nan), (0.99,))
        top = np.where(np.isfinite(top) & (top > 0), top, 1.0)
        v = np.clip(dens / top[:, None, None], 0.0, 1.0) ** gamma[:, None, None]
        v = v.reshape(b, h, ss, w, ss).mean(axis=(2, 4))  # area downsampling to H x W
        img = v[:, None] * colour[:, :, None, None]
        img = blur(img, sigma)
        out[idx] = match_histogram(img, quantiles, exposure)
        if progress:
            progress(b)
    summary = {"categories": n_cat, "weight_variants": n_w, "instances": n_inst,
               "maps_per_category": [len(p) for p, _ in systems], "system_tries": tries,
               "weight_variants_diverged": diverged, "supersampling": ss, "points_per_image": chains * steps}
    return out, summary


@register_source("fractal")
def fractal(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """FractalDB-style IFS fractals rendered at the model's input size and channel count."""
    size = generated_size(size)
    if arg:
        raise CalibrationError(f"--calib fractal takes no argument (got fractal:{arg}); pass --calib fractal")
    pre = ctx.preprocessing

    def make() -> ArraySource:
        q = data_quantiles(ctx, seed)
        raw, summary = generate(size, pre.input_shape, q, seed)
        return ArraySource(
            name="fractal", samples=finish_raw(raw, pre), seed=seed, preprocessing=pre,
            origin=(f"generated: FractalDB-style IFS fractals ({summary['categories']} systems x "
                    f"{summary['weight_variants']} weights x {summary['instances']} instances), pixel values "
                    f"matched to the {ctx.dataset_name} training split's pixel quantiles"),
            extra={"split": None, "generator": {"version": VERSION, **summary}},
        )

    return cached(ctx, "fractal", size, seed, VERSION, make)
