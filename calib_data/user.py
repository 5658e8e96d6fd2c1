"""The user's own calibration data: ``--calib folder:PATH`` and ``--calib npz:PATH``.

``folder:PATH``
    Every image file under PATH (recursively; .png .jpg .jpeg .bmp .gif .webp .tif .tiff .ppm .pgm),
    read with Pillow (EXIF orientation applied), converted to the model's channel count (1: "L",
    2: "LA", 3: "RGB", 4: "RGBA"), resized to the model's H x W (bilinear, antialiased) and mapped from
    0..255 onto the training data's raw value range. With more files than the calibration size, a seeded
    random subset is used. Without ``--calib-size``, a folder of fewer than 500 images is used whole (under
    100 gives the usual warning); an explicit ``--calib-size`` larger than the folder is an error.

``npz:PATH``
    A NumPy ``.npz`` archive (read with ``allow_pickle=False``) holding the images under the key
    ``x_calib``, ``x`` or ``x_train`` (the first present wins), or a plain ``.npy`` array. Images are
    N x H x W, N x C x H x W or N x H x W x C, raw like the training data (uint8 0..255, or float in the
    data's raw range) - not normalised: the preprocessing record normalises them once. Channels and
    H x W must match the model (arrays are not resized). A seeded random subset is used when the
    archive holds more images than the calibration size; without ``--calib-size``, an archive of fewer than
    500 images is used whole, as a folder is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CalibrationError, DataError

from pipeline.calib_data import ArraySource, CalibContext, finish_raw, raw_bounds, register_source, resolve_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
NPZ_KEYS = ("x_calib", "x", "x_train")
_PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# Images larger than this are refused before decoding (Pillow's own decompression-bomb threshold).
MAX_IMAGE_PIXELS = 89_478_485


def _subset(n: int, size: int, seed: int) -> np.ndarray:
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 3]).choice(n, size=size, replace=False))


# --------------------------------------------------------------------------- folder

def read_image(path: Path, channels: int, hw: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """One image file -> uint8 C x H x W at the model's channels and size; also whether it was resized.

    The declared size is checked before anything is decoded (``Image.open`` only reads the header): an image
    over ``MAX_IMAGE_PIXELS`` (a decompression bomb, or a needlessly huge file) is refused."""
    import warnings
    from PIL import Image, ImageOps
    if channels not in _PIL_MODES:
        raise CalibrationError(f"folder images can be converted to 1-4 channels; the model takes {channels}")
    fix = "remove it from the folder or convert it to PNG/JPEG"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own limit is checked below; damaged-file notes
            with Image.open(path) as im:
                w, h = im.size
                if w <= 0 or h <= 0:
                    raise CalibrationError(f"calibration image {path} declares {w}x{h} pixels, an empty image; {fix}")
                if w * h > MAX_IMAGE_PIXELS:
                    raise CalibrationError(_too_large(path, w, h))
                im = ImageOps.exif_transpose(im)
                if im.mode.startswith("I;16") or im.mode == "I":
                    a = np.asarray(im, dtype=np.float64)
                    im = Image.fromarray(np.clip(a / 257.0, 0, 255).astype(np.uint8), "L")
                im = im.convert(_PIL_MODES[channels])
                resized = im.size != (hw[1], hw[0])
                if resized:
                    im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
    except CalibrationError:
        raise
    except Image.DecompressionBombError as e:
        import re
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise CalibrationError(_too_large(path, None, None, int(m.group(1)) if m else None)) from None
    except MemoryError:
        raise CalibrationError(f"calibration image {path} is too large to decode in the memory available; "
                               f"{fix} at a smaller size") from None
    except Exception as e:  # Pillow raises many types on damaged files (OSError, SyntaxError, struct.error, ...)
        detail = " ".join(str(e).split())[:100]
        raise CalibrationError(f"cannot read calibration image {path} ({type(e).__name__}"
                               f"{': ' + detail if detail else ''}); {fix}") from None
    if a.ndim not in (2, 3):
        raise CalibrationError(f"cannot read calibration image {path} (decoded to shape {a.shape}); {fix}")
    a = a[None] if a.ndim == 2 else np.transpose(a, (2, 0, 1))
    return a, resized


def _too_large(path: Path, w: int | None, h: int | None, pixels: int | None = None) -> str:
    size = f"{w}x{h} pixels" if w is not None else f"{pixels} pixels" if pixels else "too many pixels"
    return (f"calibration image {path} declares {size}, over the limit of {MAX_IMAGE_PIXELS} pixels (a decompression "
            "bomb, or far larger than calibration needs); remove it from the folder or downscale it")


@register_source("folder")
def folder(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """Images from a folder, converted to the model's channels and resized to its H x W."""
    if not arg:
        raise CalibrationError("--calib folder needs a path: --calib folder:path/to/images")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise CalibrationError(f"calibration folder {root} does not exist or is not a folder; pass --calib folder:DIR")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"calibration folder {root} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                               "add images or pick another --calib")
    size = resolve_size(f"the calibration folder {root}", size, len(files))
    pre = ctx.preprocessing
    c, h, w = pre.input_shape
    chosen = [files[i] for i in _subset(len(files), size, seed)]
    imgs, n_resized = [], 0
    for p in chosen:
        a, resized = read_image(p, c, (h, w))
        imgs.append(a)
        n_resized += resized
    lo, hi = raw_bounds(pre)
    raw = lo + np.stack(imgs).astype(np.float64) / 255.0 * (hi - lo)
    return ArraySource(
        name="folder", samples=finish_raw(raw, pre), seed=seed if size < len(files) else None, preprocessing=pre,
        origin=f"user images from {root}", extra={
            "split": None, "path": str(root), "files_found": len(files),
            "selection": "seeded random subset" if size < len(files) else "all files",
            "converted_to": _PIL_MODES[c], "resized": n_resized, "resized_to_hw": [h, w],
            "value_mapping": f"0..255 -> {lo:g}..{hi:g} (raw range), then the preprocessing record"})


# --------------------------------------------------------------------------- npz

def _load_array(path: Path) -> tuple[np.ndarray, str]:
    from pipeline.inputs.safe_arrays import load_array
    if not path.exists():
        raise CalibrationError(f"calibration file {path} does not exist; pass --calib npz:path/to/file.npz")
    return load_array(path, NPZ_KEYS, what=str(path), error=CalibrationError)


@register_source("npz")
def npz(ctx: CalibContext, size: int | None, seed: int, arg: str | None) -> ArraySource:
    """Raw image arrays from an .npz archive (key x_calib, x or x_train) or an .npy file."""
    if not arg:
        raise CalibrationError("--calib npz needs a path: --calib npz:path/to/file.npz")
    from pipeline.inputs.data import _to_nchw, detect_layout
    path = Path(arg).expanduser()
    x, key = _load_array(path)
    pre = ctx.preprocessing
    c, h, w = pre.input_shape
    where = f"{path} [{key}]"
    if x.dtype.kind not in "biuf":
        raise CalibrationError(f"{where} has dtype {x.dtype}; store numeric image arrays (uint8 or float32)")
    if x.ndim not in (3, 4):
        raise CalibrationError(f"{where} has shape {x.shape}; store images as N×H×W, N×C×H×W or N×H×W×C")
    try:
        layout = detect_layout(x.shape, pre.input_shape)
    except DataError as e:
        raise CalibrationError(f"{where}: {e}") from None
    x = _to_nchw(x, layout)
    if x.shape[1] != c:
        raise CalibrationError(f"{where} holds {x.shape[1]}-channel images but the model takes {c} channels; "
                               f"convert the arrays to {c} channel(s)")
    if tuple(x.shape[2:]) != (h, w):
        raise CalibrationError(f"{where} holds {x.shape[2]}x{x.shape[3]} images but the model takes {h}x{w}; "
                               "resize the arrays (or use --calib folder:DIR, which resizes)")
    size = resolve_size(where, size, len(x))
    held = len(x)
    x = x[_subset(held, size, seed)]
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise CalibrationError(f"{where} holds NaN or inf; clean the images")
    lo, hi = raw_bounds(pre)
    xmin, xmax = float(x.min()), float(x.max())
    tol = 0.005 * (hi - lo)
    if xmin < lo - tol or xmax > hi + tol:
        raise CalibrationError(
            f"{where} values span [{xmin:.3g}, {xmax:.3g}] but the training images' raw range is [{lo:g}, {hi:g}]; "
            "store raw images like the training data (not normalised) - the preprocessing record normalises once")
    if hi - lo > 2.0 and x.dtype.kind == "f" and xmax <= 1.0 and xmax > xmin:
        raise CalibrationError(
            f"{where} values span [{xmin:.3g}, {xmax:.3g}], i.e. already scaled to [0, 1], but the training images "
            f"are raw {lo:g}..{hi:g}; store raw images (e.g. uint8 0..255) - the preprocessing record scales them once")
    return ArraySource(
        name="npz", samples=finish_raw(x.astype(np.float64), pre), seed=seed if size < held else None,
        preprocessing=pre, origin=f"user arrays from {path}",
        extra={"split": None, "path": str(path), "key": key, "layout": layout, "dtype": str(x.dtype),
               "arrays_found": held, "selection": "seeded random subset" if size < held else "all arrays"})
