"""Synthetic distribution shifts for small images: a corruption suite in the spirit of CIFAR-10-C and MNIST-C.

``corrupt(images, name, severity, seed)`` takes float32 images in [0, 1] shaped N x C x H x W
(C = 1 or 3, H, W >= 8) and returns a corrupted copy of the same shape and dtype, clipped to [0, 1].

- Severity runs 1..5. Each corruption has a table of strengths that grows with severity. The values
  follow Hendrycks & Dietterich's CIFAR-10-C (``hendrycks/robustness``) where those make sense at 28-32
  pixels, and Mu & Gilmer's MNIST-C (``google-research/mnist-c``) for the geometric ones. Blur and
  geometry are expressed in pixels or fractions of the image size, so 28 x 28 and 32 x 32 behave alike.
- Deterministic by ``seed``. The random draws depend on the seed and the corruption name, not on the
  severity: every image gets the same noise field, angle or direction at every severity, only scaled.
  So a higher severity is a stronger version of the same corruption of the same image.
- Vectorised numpy (Pillow only for JPEG). On 10k 28 x 28 images most corruptions take well under a
  second on one core.

These are generated on the fly; they are not the published CIFAR-10-C / MNIST-C files, and numbers
measured on them are not comparable with numbers published on those files.

Suites. ``CORRUPTIONS`` is the default suite (``--corruptions all``), listed by name so that registering a
corruption never changes it. ``PRESETS`` holds named sets; ``mnist-c`` is the 15 corruption types of MNIST-C
mapped onto this registry. Five corruptions were added for that preset and are not in the default suite:
stripe, zigzag, dotted_line, canny_edges and spatter. They are this project's own re-implementations, written
from what each corruption does, not MNIST-C's code or files, and they have five severities where MNIST-C has one
(tables and units with the strength tables below):

- ``stripe``: one white stripe, vertical or horizontal, across the middle of the image; severity widens it.
- ``zigzag``: white zig-zag lines (a triangle wave of random direction, period, amplitude and offset);
  severity adds lines and thickens them.
- ``dotted_line``: white lines of round dots at random direction, offset and spacing; severity adds lines and
  grows the dots.
- ``spatter``: light grey droplets where a smoothed random field is above its own quantile; severity raises the
  share of the image they touch, so drops grow and more appear (a superset of the weaker severities' drops).
- ``canny_edges``: the image's edge map (Gaussian smoothing, Sobel gradient, non-maximum suppression across the
  edge, hysteresis between two thresholds), white edges on black; severity blends it over the image, from 20%
  to the edge map alone at 5. Colour images are reduced to their channel mean first.

Lines and dots are drawn anti-aliased: ink falls from full to none over the pixel across their border.
"""
from __future__ import annotations

import difflib
import io
import zlib

import numpy as np

from pipeline.errors import DataError

SEVERITIES = (1, 2, 3, 4, 5)

# Strength tables, one value (or tuple) per severity 1..5. Units are in the comment.
_GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.10, 0.12)        # std, in [0, 1] intensity (CIFAR-C: .04-.10)
_SHOT_NOISE = (500.0, 250.0, 100.0, 75.0, 50.0)          # Poisson photons at full intensity (CIFAR-C)
_IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)          # fraction of pixels set to 0 or 1 (CIFAR-C)
_SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)          # std of multiplicative noise (CIFAR-C)
_GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)               # sigma in pixels (CIFAR-C)
_DEFOCUS_BLUR = (0.6, 0.8, 1.0, 1.4, 1.8)                # disk radius in pixels (CIFAR-C: 0.3-1.5 + alias blur)
_MOTION_BLUR = (1.0, 1.5, 2.0, 2.5, 3.0)                 # sigma in pixels of a one-sided line, length 3 sigma (CIFAR-C)
_GLASS_BLUR = ((0.4, 1, 0.3), (0.45, 1, 0.55), (0.5, 1, 0.8), (0.55, 2, 0.8), (0.6, 2, 1.0))  # (sigma, max px displacement, fraction displaced)
_ZOOM_BLUR = (1.06, 1.11, 1.16, 1.21, 1.26)              # largest zoom factor averaged (CIFAR-C)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)                   # factor towards the image mean (CIFAR-C)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)                  # added to HSV value (CIFAR-C)
_FOG = (0.2, 0.5, 0.75, 1.0, 1.5)                        # fog amplitude (CIFAR-C first parameter)
_PIXELATE = (0.85, 0.7, 0.6, 0.5, 0.4)                   # resolution factor (CIFAR-C: .95-.65)
_JPEG = (80, 65, 58, 50, 40)                             # JPEG quality (CIFAR-C)
_ROTATE = (10.0, 20.0, 30.0, 40.0, 50.0)                 # max degrees (MNIST-C: up to 57)
_SHEAR = (0.1, 0.2, 0.3, 0.4, 0.5)                       # max shear factor (MNIST-C: up to 1.0)
_TRANSLATE = (0.04, 0.08, 0.12, 0.16, 0.20)              # max shift as a fraction of the size (MNIST-C: 1-5 px of 28)
_ZOOM = (1.1, 1.2, 1.3, 1.45, 1.6)                       # zoom-in factor about the centre
# For the mnist-c preset (our own re-implementations, see the module docstring). Positions and lengths of lines
# are fractions of the image side; widths and dot radii are pixels, like the blur sigmas.
_STRIPE = (0.06, 0.09, 0.12, 0.15, 0.18)                 # width, fraction of the side across it (1.7-5 px at 28)
_ZIGZAG = ((1, 0.5), (1, 0.8), (2, 0.8), (2, 1.1), (3, 1.1))        # (lines, half-width in px): 1-2.2 px wide
_DOTTED_LINE = ((1, 0.6), (1, 0.9), (2, 0.9), (2, 1.2), (3, 1.2))   # (lines, dot radius in px); dots 4-5.5 px apart
_SPATTER = (0.02, 0.04, 0.06, 0.09, 0.12)               # fraction of each image's pixels the drops touch
_CANNY_EDGES = (0.2, 0.4, 0.6, 0.8, 1.0)                 # weight of the edge map blended over the image (1: edges only)
_CANNY_SIGMA = 1.0                                       # Gaussian smoothing before the gradient, px
_CANNY_LOW, _CANNY_HIGH = 0.1, 0.2                       # hysteresis thresholds on the gradient, intensity per px
_MAX_LINES = 3                                           # lines drawn for zigzag / dotted_line at most


# ---------------------------------------------------------------------------------------------
# helpers


def _pad(x: np.ndarray, r: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="symmetric") if r else x


def _conv_taps(x: np.ndarray, taps: list[tuple[int, int, float]]) -> np.ndarray:
    """Correlate each image with a small kernel given as (dy, dx, weight) taps, symmetric borders."""
    r = max(max(abs(dy), abs(dx)) for dy, dx, _ in taps)
    p = _pad(x, r)
    h, w = x.shape[2], x.shape[3]
    out = np.zeros_like(x)
    for dy, dx, wgt in taps:
        out += np.float32(wgt) * p[:, :, r + dy:r + dy + h, r + dx:r + dx + w]
    return out


def _kernel_taps(k: np.ndarray) -> list[tuple[int, int, float]]:
    k = k / k.sum()
    r = k.shape[0] // 2
    return [(int(i - r), int(j - r), float(k[i, j])) for i, j in zip(*np.nonzero(k > 1e-6))]


def _gaussian_1d(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    g = _gaussian_1d(sigma)
    r = len(g) // 2
    out = _conv_taps(x, [(d - r, 0, float(g[d])) for d in range(len(g))])
    return _conv_taps(out, [(0, d - r, float(g[d])) for d in range(len(g))])


def _disk_kernel(radius: float) -> np.ndarray:
    """Anti-aliased disk: each weight is the fraction of the pixel inside the circle (8 x 8 supersampled)."""
    r = int(np.ceil(radius))
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    c = np.arange(-r, r + 1)
    yy = (c[:, None, None, None] + sub[None, None, :, None])
    xx = (c[None, :, None, None] + sub[None, None, None, :])
    inside = (yy ** 2 + xx ** 2) <= radius ** 2
    return inside.mean(axis=(2, 3))


def _line_kernel(sigma: float, angle: float) -> np.ndarray:
    """One-sided motion-blur line (as ImageMagick's motion_blur in CIFAR-C), Gaussian weights, bilinear splat."""
    length = 3.0 * sigma
    r = int(np.ceil(length)) + 1
    k = np.zeros((2 * r + 1, 2 * r + 1))
    for t in np.linspace(0.0, length, int(np.ceil(length * 4)) + 1):
        wgt = np.exp(-0.5 * (t / sigma) ** 2)
        y, x = r + t * np.sin(angle), r + t * np.cos(angle)
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        fy, fx = y - y0, x - x0
        k[y0, x0] += wgt * (1 - fy) * (1 - fx)
        k[y0 + 1, x0] += wgt * fy * (1 - fx)
        k[y0, x0 + 1] += wgt * (1 - fy) * fx
        k[y0 + 1, x0 + 1] += wgt * fy * fx
    return k


def _resample_matrix(n_out: int, n_in: int, scale: float) -> np.ndarray:
    """Bilinear resampling about the centre: output pixel i reads input coordinate c + (i - c) / scale."""
    c_out, c_in = (n_out - 1) / 2.0, (n_in - 1) / 2.0
    src = c_in + (np.arange(n_out) - c_out) / scale
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = src - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1 - f
    m[np.arange(n_out), i1] += f
    return m.astype(np.float32)


def _separable(x: np.ndarray, my: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """Apply row matrix ``my`` (H_out x H) and column matrix ``mx`` (W_out x W) to every image."""
    return np.matmul(np.matmul(my, x), mx.T)


def _affine(x: np.ndarray, mats: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Per-image affine warp about the centre with bilinear sampling.

    Output pixel p reads input at ``mats[n] @ (p - c) + c + shifts[n]`` (coordinates as (y, x)).
    Outside the image it reads the image's own border mean, so black-background digits stay black.
    """
    n, ch, h, w = x.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32) - cy, np.arange(w, dtype=np.float32) - cx, indexing="ij")
    m = mats.astype(np.float32)
    t = shifts.astype(np.float32)
    # Source coordinates in a frame padded by 2 pixels of the fill value; clipping them into the
    # padded frame makes every out-of-image read land on fill pixels, with no masks needed.
    sy = m[:, 0, 0, None, None] * yy + m[:, 0, 1, None, None] * xx + (cy + 2) + t[:, 0, None, None]
    sx = m[:, 1, 0, None, None] * yy + m[:, 1, 1, None, None] * xx + (cx + 2) + t[:, 1, None, None]
    hp, wp = h + 4, w + 4
    np.clip(sy, 0.5, hp - 1.5, out=sy)
    np.clip(sx, 0.5, wp - 1.5, out=sx)
    border = np.concatenate([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], axis=2).mean(axis=2)
    padded = np.empty((n, ch, hp, wp), dtype=np.float32)
    padded[...] = border[:, :, None, None]
    padded[:, :, 2:-2, 2:-2] = x
    return _bilinear_gather(padded, sy, sx)


def _bilinear_gather(padded: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """Sample each image of ``padded`` (N x C x Hp x Wp) at in-range float coordinates (N x H x W)."""
    n, ch, hp, wp = padded.shape
    h, w = sy.shape[1:]
    y0 = np.floor(sy)
    x0 = np.floor(sx)
    fy = (sy - y0)[:, None]
    fx = (sx - x0)[:, None]
    base = (y0.astype(np.int64) * wp + x0.astype(np.int64))[:, None] \
        + (np.arange(n * ch, dtype=np.int64) * (hp * wp)).reshape(n, ch, 1, 1)
    flat = padded.reshape(-1)
    top = flat.take(base) * (1 - fx) + flat.take(base + 1) * fx
    bottom = flat.take(base + wp) * (1 - fx) + flat.take(base + wp + 1) * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32, copy=False)


def _value_noise(rng: np.random.Generator, n: int, h: int, w: int, decay: float = 2.0) -> np.ndarray:
    """Low-frequency fractal noise in [0, 1] per image: octaves of bilinearly upsampled random grids
    (a vectorised stand-in for CIFAR-C's diamond-square plasma fractal)."""
    out = np.zeros((n, h, w), dtype=np.float32)
    amp, g = 1.0, 2
    while g <= max(h, w):
        grid = rng.random((n, g + 1, g + 1), dtype=np.float32)
        my = _grid_matrix(h, g + 1)
        mx = _grid_matrix(w, g + 1)
        out += amp * np.matmul(np.matmul(my, grid), mx.T)
        amp /= decay
        g *= 2
    lo = out.min(axis=(1, 2), keepdims=True)
    hi = out.max(axis=(1, 2), keepdims=True)
    return (out - lo) / np.maximum(hi - lo, 1e-6)


def _grid_matrix(n_out: int, n_grid: int) -> np.ndarray:
    src = np.linspace(0, n_grid - 1, n_out)
    i0 = np.minimum(np.floor(src).astype(int), n_grid - 2)
    f = src - i0
    m = np.zeros((n_out, n_grid), dtype=np.float32)
    m[np.arange(n_out), i0] = 1 - f
    m[np.arange(n_out), i0 + 1] = f
    return m


# ---------------------------------------------------------------------------------------------
# the corruptions: f(x, level, rng) with x float32 N x C x H x W


def _gaussian_noise(x, s, rng):
    return x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(_GAUSSIAN_NOISE[s])


def _shot_noise(x, s, rng):
    lam = _SHOT_NOISE[s]
    return (rng.poisson(x.astype(np.float64) * lam) / lam).astype(np.float32)


def _impulse_noise(x, s, rng):
    amount = np.float32(_IMPULSE_NOISE[s])
    u = rng.random(x.shape, dtype=np.float32)
    out = np.where(u < amount / 2, np.float32(0.0), x)
    return np.where(u > 1 - amount / 2, np.float32(1.0), out)


def _speckle_noise(x, s, rng):
    return x + x * rng.standard_normal(x.shape, dtype=np.float32) * np.float32(_SPECKLE_NOISE[s])


def _gaussian_blur_c(x, s, rng):
    return _gaussian_blur(x, _GAUSSIAN_BLUR[s])


def _defocus_blur(x, s, rng):
    return _conv_taps(x, _kernel_taps(_disk_kernel(_DEFOCUS_BLUR[s])))


def _motion_blur(x, s, rng):
    # A random direction per image, quantised to 16 angles so each group shares one kernel.
    bins = rng.integers(0, 16, len(x))
    out = np.empty_like(x)
    for b in np.unique(bins):
        sel = bins == b
        angle = np.deg2rad(-45.0 + 90.0 * b / 15.0 + (180.0 if b % 2 else 0.0))
        out[sel] = _conv_taps(x[sel], _kernel_taps(_line_kernel(_MOTION_BLUR[s], angle)))
    return out


def _glass_blur(x, s, rng):
    # CIFAR-C: blur, swap pixels with near neighbours, blur again. Here each pixel (of a growing
    # fraction) reads a random neighbour up to ``delta`` pixels away, all at once.
    sigma, delta, fraction = _GLASS_BLUR[s]
    n, ch, h, w = x.shape
    u = rng.uniform(-1.0, 1.0, (2, n, h, w))
    moved = rng.random((n, h, w)) < fraction
    dy = np.where(moved, np.rint(u[0] * delta), 0.0)
    dx = np.where(moved, np.rint(u[1] * delta), 0.0)
    sy = np.clip(np.arange(h)[:, None] + dy, 0, h - 1)
    sx = np.clip(np.arange(w)[None, :] + dx, 0, w - 1)
    idx = (sy * w + sx).astype(np.int64)[:, None] + (np.arange(n * ch, dtype=np.int64) * (h * w)).reshape(n, ch, 1, 1)
    shuffled = _gaussian_blur(x, sigma).reshape(-1).take(idx)
    return _gaussian_blur(shuffled, sigma)


def _zoom_blur(x, s, rng):
    h, w = x.shape[2:]
    zooms = np.linspace(1.0, _ZOOM_BLUR[s], 6)
    out = np.zeros_like(x)
    for z in zooms:
        out += _separable(x, _resample_matrix(h, h, z), _resample_matrix(w, w, z))
    return out / np.float32(len(zooms))


def _contrast(x, s, rng):
    c = np.float32(_CONTRAST[s])
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * c + mean


def _brightness(x, s, rng):
    # Add c to the HSV value channel keeping hue and saturation: scale RGB by (V + c) / V.
    # For one channel this is x + c.
    c = np.float32(_BRIGHTNESS[s])
    v = x.max(axis=1, keepdims=True)
    new_v = np.minimum(v + c, np.float32(1.0))
    scale = new_v / np.maximum(v, np.float32(1e-6))
    return np.where(v > 1e-6, x * scale, new_v)


def _fog(x, s, rng):
    c = np.float32(_FOG[s])
    n, ch, h, w = x.shape
    fog = _value_noise(rng, n, h, w)[:, None]
    mx = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + c * fog) * mx / (mx + c)


def _pixelate(x, s, rng):
    h, w = x.shape[2:]
    f = _PIXELATE[s]
    hs, ws = max(2, int(round(h * f))), max(2, int(round(w * f)))
    down_y, down_x = _box_matrix(hs, h), _box_matrix(ws, w)
    # Up-sample with area weights too: nearest up-sampling at non-integer factors aliases and makes
    # the change non-monotone in severity.
    up_y, up_x = _box_matrix(h, hs), _box_matrix(w, ws)
    return _separable(_separable(x, down_y, down_x), up_y, up_x)


def _box_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Area averaging (PIL's BOX filter) from n_in to n_out samples."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        lo, hi = edges[i], edges[i + 1]
        for j in range(int(np.floor(lo)), int(np.ceil(hi))):
            m[i, j] = min(hi, j + 1) - max(lo, j)
        m[i] /= m[i].sum()
    return m


def _jpeg(x, s, rng):
    # JPEG codes 8 x 8 blocks (16 x 16 MCUs with 4:2:0 chroma) independently apart from lossless DC
    # prediction, so many images are coded as one mosaic of tiles, 10-50x faster than one image at a
    # time. Each tile is the image padded by edge replication (as the encoder pads partial blocks) to
    # whole MCUs. Grayscale output is bit-identical to coding each image alone. For RGB the decoder's
    # chroma up-sampling reads one chroma sample past each edge, so colour tiles get a margin of one
    # MCU before and >= 2 pixels after: an image's result never depends on its neighbours in the
    # batch, and differs from coding it alone only at its edges (by about 0.2/255 on average).
    from PIL import Image

    quality = _JPEG[s]
    n, ch, h, w = x.shape
    lead, tail = (16, 2) if ch == 3 else (0, 0)
    hb, wb = -(-(lead + h + tail) // 16) * 16, -(-(lead + w + tail) // 16) * 16
    u8 = np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)
    u8 = np.pad(u8, ((0, 0), (0, 0), (lead, hb - h - lead), (lead, wb - w - lead)), mode="edge")
    cols = max(1, min(n, 4096 // wb))
    out = np.empty_like(x)
    mode = "RGB" if ch == 3 else "L"
    for start in range(0, n, cols * max(1, 4096 // hb)):
        chunk = u8[start:start + cols * max(1, 4096 // hb)]
        k = len(chunk)
        rows = -(-k // cols)
        tiles = np.zeros((rows * cols, ch, hb, wb), dtype=np.uint8)
        tiles[:k] = chunk
        mosaic = tiles.reshape(rows, cols, ch, hb, wb).transpose(0, 3, 1, 4, 2).reshape(rows * hb, cols * wb, ch)
        buf = io.BytesIO()
        Image.fromarray(mosaic if ch == 3 else mosaic[:, :, 0], mode).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert(mode), dtype=np.uint8).reshape(rows * hb, cols * wb, ch)
        dec = dec.reshape(rows, hb, cols, wb, ch).transpose(0, 2, 4, 1, 3).reshape(rows * cols, ch, hb, wb)
        out[start:start + k] = dec[:k, :, lead:lead + h, lead:lead + w]
    return out.astype(np.float32) / np.float32(255.0)


def _signed_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-image strength in +-[0.5, 1]: a random sign and a magnitude never near zero."""
    return rng.choice(np.array([-1.0, 1.0]), n) * rng.uniform(0.5, 1.0, n)


def _rotate(x, s, rng):
    a = np.deg2rad(_ROTATE[s] * _signed_unit(rng, len(x)))
    c, sn = np.cos(a), np.sin(a)
    mats = np.stack([np.stack([c, -sn], 1), np.stack([sn, c], 1)], 1)
    return _affine(x, mats, np.zeros((len(x), 2), np.float32))


def _shear(x, s, rng):
    k = _SHEAR[s] * _signed_unit(rng, len(x))
    horizontal = rng.random(len(x)) < 0.5
    mats = np.tile(np.eye(2), (len(x), 1, 1))
    mats[horizontal, 1, 0] = k[horizontal]       # x' = x + k * y
    mats[~horizontal, 0, 1] = k[~horizontal]     # y' = y + k * x
    return _affine(x, mats, np.zeros((len(x), 2), np.float32))


def _translate(x, s, rng):
    h, w = x.shape[2:]
    angle = rng.uniform(0, 2 * np.pi, len(x))
    mag = _TRANSLATE[s] * rng.uniform(0.75, 1.0, len(x))
    shifts = np.stack([np.sin(angle) * mag * h, np.cos(angle) * mag * w], 1).astype(np.float32)
    return _affine(x, np.tile(np.eye(2), (len(x), 1, 1)), shifts)


def _zoom(x, s, rng):
    h, w = x.shape[2:]
    z = _ZOOM[s]
    return _separable(x, _resample_matrix(h, h, z), _resample_matrix(w, w, z))


def _line_frame(angle: np.ndarray, offset: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's coordinates (N x H x W, in pixels) along and across a line per image: the line runs at
    ``angle`` (radians) through the image centre moved ``offset`` pixels sideways."""
    yy = np.arange(h, dtype=np.float32)[None, :, None] - np.float32((h - 1) / 2.0)
    xx = np.arange(w, dtype=np.float32)[None, None, :] - np.float32((w - 1) / 2.0)
    c = np.cos(angle).astype(np.float32)[:, None, None]
    s = np.sin(angle).astype(np.float32)[:, None, None]
    return xx * c + yy * s, yy * c - xx * s - offset.astype(np.float32)[:, None, None]


def _coverage(distance: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased ink: half at ``radius`` pixels from the shape, full half a pixel nearer, none half a pixel
    farther. Widths, radii and half-widths in the tables are therefore measured at half ink."""
    return np.clip(np.float32(radius + 0.5) - distance, 0.0, 1.0)


def _paint(x: np.ndarray, cover: np.ndarray, colour) -> np.ndarray:
    """Blend ``colour`` (scalar or per image) over every channel where ``cover`` (N x H x W in [0, 1]) is ink."""
    colour = np.asarray(colour, dtype=np.float32).reshape(-1, 1, 1, 1)
    return x + (colour - x) * cover[:, None]


def _stripe(x, s, rng):
    n, ch, h, w = x.shape
    vertical = rng.random(n) < 0.5
    centre = rng.uniform(0.3, 0.7, n)               # fraction of the side across the stripe
    side = np.where(vertical, w, h).astype(np.float32)[:, None, None]
    across = np.where(vertical[:, None, None], np.arange(w, dtype=np.float32)[None, None, :],
                      np.arange(h, dtype=np.float32)[None, :, None])
    distance = np.abs(across - (centre.astype(np.float32)[:, None, None] * (side - 1)))
    half = np.float32(_STRIPE[s] / 2.0) * side
    return _paint(x, np.clip(half + np.float32(0.5) - distance, 0.0, 1.0), 1.0)


def _line_draws(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform [0, 1) draws for _MAX_LINES lines per image, rows (angle, offset, phase, period or dot spacing,
    amplitude). Always the same count, so how many lines a severity shows never changes the lines themselves."""
    return rng.random((5, _MAX_LINES, n))


def _zigzag(x, s, rng):
    # A triangle wave around a straight axis. Folding the coordinate along the axis into half a period (the
    # wave is symmetric about each vertex) leaves one segment, from (0, -A) to (P / 2, A), whose distance is
    # the distance to the whole wave.
    n, ch, h, w = x.shape
    lines, half_width = _ZIGZAG[s]
    u = _line_draws(rng, n)
    size = min(h, w)
    cover = np.zeros((n, h, w), dtype=np.float32)
    for k in range(lines):
        # Any direction; axis within a quarter side of the centre; period 0.25-0.45 and amplitude 0.06-0.12 sides.
        t, e = _line_frame(u[0, k] * np.pi, (u[1, k] - 0.5) * 0.5 * size, h, w)
        period = ((0.25 + 0.2 * u[3, k]) * size).astype(np.float32)[:, None, None]
        amp = ((0.06 + 0.06 * u[4, k]) * size).astype(np.float32)[:, None, None]
        a = np.mod(t + u[2, k].astype(np.float32)[:, None, None] * period, period)
        a = np.minimum(a, period - a)                       # fold into [0, P / 2]
        dx, dy = period / 2, 2 * amp
        f = np.clip((a * dx + (e + amp) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        np.maximum(cover, _coverage(np.hypot(a - f * dx, e + amp - f * dy), half_width), out=cover)
    return _paint(x, cover, 1.0)


def _dotted_line(x, s, rng):
    # The nearest dot to a pixel is the one at its coordinate along the line rounded to the dot spacing.
    n, ch, h, w = x.shape
    lines, radius = _DOTTED_LINE[s]
    u = _line_draws(rng, n)
    cover = np.zeros((n, h, w), dtype=np.float32)
    for k in range(lines):
        # Any direction, within 0.3 sides of the centre.
        t, e = _line_frame(u[0, k] * np.pi, (u[1, k] - 0.5) * 0.6 * min(h, w), h, w)
        spacing = (4.0 + 1.5 * u[3, k]).astype(np.float32)[:, None, None]   # px between dot centres
        t = t + u[2, k].astype(np.float32)[:, None, None] * spacing
        along = t - spacing * np.rint(t / spacing)
        np.maximum(cover, _coverage(np.hypot(along, e), radius), out=cover)
    return _paint(x, cover, 1.0)


def _band_matrix(kernel: np.ndarray, n_out: int) -> np.ndarray:
    """n_out x (n_out + len(kernel) - 1): output i is ``kernel`` applied to inputs i .. i + len(kernel) - 1."""
    m = np.zeros((n_out, n_out + len(kernel) - 1), dtype=np.float32)
    for i in range(n_out):
        m[i, i:i + len(kernel)] = kernel
    return m


def _spatter(x, s, rng):
    # Drops where smoothed white noise (sigma 1.2 px) is above its own quantile, so every image gets the same share
    # of drops; the drops' edges are soft over a quarter of the field's standard deviation. A larger share lowers
    # the threshold: the drops of every lower severity stay and grow. The noise is drawn a kernel radius larger on
    # each side, so the blur needs no mirrored borders (which would raise its variance, and the drops, there).
    n, ch, h, w = x.shape
    g = _gaussian_1d(1.2).astype(np.float32)
    r = len(g) // 2
    noise = rng.standard_normal((n, h + 2 * r, w + 2 * r), dtype=np.float32)
    field = _separable(noise, _band_matrix(g, h), _band_matrix(g, w)).reshape(n, h * w)
    colour = rng.uniform(0.6, 1.0, n)                   # grey level of the drops, per image
    threshold = np.quantile(field, 1.0 - _SPATTER[s], axis=1, keepdims=True).astype(np.float32)
    soft = np.float32(0.25) * field.std(axis=1, keepdims=True)
    cover = np.clip((field - threshold) / np.maximum(soft, np.float32(1e-6)), 0.0, 1.0)
    return _paint(x, cover.reshape(n, h, w), colour)


def _dilate8(m: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation of N x H x W masks (separable: rows, then columns)."""
    r = m.copy()
    r[:, 1:] |= m[:, :-1]
    r[:, :-1] |= m[:, 1:]
    out = r.copy()
    out[:, :, 1:] |= r[:, :, :-1]
    out[:, :, :-1] |= r[:, :, 1:]
    return out


def _canny_edge_map(x: np.ndarray, sigma: float = _CANNY_SIGMA, low: float = _CANNY_LOW,
                   high: float = _CANNY_HIGH) -> np.ndarray:
    """Binary edge maps (float32 N x H x W, 1 on edges) of float32 N x C x H x W images, by Canny's method.

    The channel mean is smoothed with a Gaussian of ``sigma`` px; Sobel kernels, scaled so a ramp of slope 1 per
    pixel gives 1, give the gradient. A pixel stays an edge candidate when its gradient magnitude is a maximum
    across the edge: along the gradient direction rounded to 0, 45, 90 or 135 degrees, above the neighbour ahead
    and at least the one behind, equal meaning within 1e-5 (so a two-pixel ridge keeps one pixel). Candidates at
    or above ``high`` are edges; candidates at or above ``low`` join them when 8-connected to one (hysteresis).
    """
    g = _gaussian_blur(x.mean(axis=1, keepdims=True, dtype=np.float32), sigma)
    side = [(-1, 0.125), (0, 0.25), (1, 0.125)]
    gx = _conv_taps(g, [(d, 1, c) for d, c in side] + [(d, -1, -c) for d, c in side])[:, 0]
    gy = _conv_taps(g, [(1, d, c) for d, c in side] + [(-1, d, -c) for d, c in side])[:, 0]
    mag = np.hypot(gx, gy)
    ax, ay = np.abs(gx), np.abs(gy)
    tan22 = np.float32(np.tan(np.pi / 8))
    horizontal = ay <= tan22 * ax
    vertical = ~horizontal & (ax <= tan22 * ay)
    diagonal = ~horizontal & ~vertical
    down_right = diagonal & ((gx > 0) == (gy > 0))
    # Each direction's step (dy, dx) along the gradient; compare with the neighbours ahead and behind.
    h, w = mag.shape[1:]
    p = np.pad(mag, ((0, 0), (1, 1), (1, 1)), mode="edge")
    tie = np.float32(1e-5)  # magnitudes this close are equal: float rounding must not pick the ridge pixel
    keep = np.zeros(mag.shape, dtype=bool)
    for sel, (dy, dx) in ((horizontal, (0, 1)), (vertical, (1, 0)), (down_right, (1, 1)),
                          (diagonal & ~down_right, (1, -1))):
        ahead = p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        behind = p[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        keep |= sel & (mag > ahead + tie) & (mag >= behind - tie)
    weak = keep & (mag >= np.float32(low))
    edges = weak & (mag >= np.float32(high))
    # Grow the strong edges along connected weak ones until nothing changes, on the images still changing only
    # (a few long weak chains would otherwise keep the whole batch in the loop).
    active = np.flatnonzero((weak & ~edges).any(axis=(1, 2)))
    while active.size:
        before = edges[active]
        grown = _dilate8(before) & weak[active]
        edges[active] = grown
        active = active[(grown != before).any(axis=(1, 2))]
    return edges.astype(np.float32)


def _canny_edges(x, s, rng):
    a = np.float32(_CANNY_EDGES[s])
    return x * (np.float32(1.0) - a) + a * _canny_edge_map(x)[:, None]


_FUNCS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur_c,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "glass_blur": _glass_blur,
    "zoom_blur": _zoom_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "fog": _fog,
    "pixelate": _pixelate,
    "jpeg": _jpeg,
    "rotate": _rotate,
    "shear": _shear,
    "translate": _translate,
    "zoom": _zoom,
    "stripe": _stripe,
    "zigzag": _zigzag,
    "dotted_line": _dotted_line,
    "canny_edges": _canny_edges,
    "spatter": _spatter,
}

REGISTERED: tuple[str, ...] = tuple(_FUNCS)  # every name corrupt() takes

# The default suite (``--corruptions all``, ReliabilityConfig's default), listed by name and not taken from the
# registry: the reported numbers were measured on these 18, and registering a corruption must not change them.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur", "motion_blur",
    "glass_blur", "zoom_blur", "contrast", "brightness", "fog", "pixelate", "jpeg", "rotate", "shear", "translate",
    "zoom",
)

# MNIST-C's 15 corruption types (Mu & Gilmer 2019, in the paper's order) mapped onto this registry. Every entry is
# an approximation: MNIST-C runs each corruption at one fixed strength, these at severities 1..5, and none of them
# reproduces MNIST-C's images. stripe, zigzag, dotted_line, canny_edges and spatter are our own versions of the same
# kind of corruption (see the module docstring); shot_noise, impulse_noise, glass_blur, motion_blur, fog and
# brightness keep the CIFAR-10-C strength tables above; MNIST-C's "scale" is our "zoom", which only zooms in about
# the centre; shear, rotate and translate use this module's own ranges (_SHEAR, _ROTATE, _TRANSLATE), with the
# border filled by the image's border mean.
MNIST_C: tuple[str, ...] = (
    "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "zoom", "rotate", "brightness",
    "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges",
)

# Named sets for ``--corruptions NAME``; "all" (the default suite) and "none" are handled by the suite's parser.
PRESETS: dict[str, tuple[str, ...]] = {"mnist-c": MNIST_C}


def check_corruptible(sample_chw) -> None:
    """Fail before any work when the corruption suite cannot run on images of this C x H x W."""
    c, h, w = (int(v) for v in sample_chw)
    if c not in (1, 3) or h < 8 or w < 8:
        raise DataError(f"the corruption suite needs images with 1 or 3 channels of at least 8x8 pixels, not "
                        f"{c}x{h}x{w} (C×H×W); pass --corruptions none for a report without shifted sets")


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Return ``images`` (float32 N x C x H x W in [0, 1]) corrupted by ``name`` at ``severity`` 1..5.

    Same shape and dtype, clipped to [0, 1], deterministic by ``seed``.
    """
    if name not in _FUNCS:
        close = difflib.get_close_matches(name, REGISTERED, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(REGISTERED)}"
        raise DataError(f"unknown corruption {name!r}; {hint}")
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
        raise DataError(f"corruption severity {severity!r} is out of range; pass an integer from 1 to 5")
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] < 8 or x.shape[3] < 8:
        raise DataError(f"images of shape {x.shape} cannot be corrupted; pass N x C x H x W with C = 1 or 3 and H, W >= 8")
    if x.dtype != np.float32:
        raise DataError(f"images have dtype {x.dtype}; pass float32 in [0, 1] (divide uint8 images by 255)")
    if x.size and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise DataError(f"images range over [{float(x.min()):.3g}, {float(x.max()):.3g}]; pass raw pixels scaled to [0, 1], before normalisation")
    if len(x) == 0:
        return x.copy()
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    out = _FUNCS[name](np.ascontiguousarray(x), int(severity) - 1, rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
