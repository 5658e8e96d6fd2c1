"""On-disk cache of generated calibration sets.

A generated set (fractal, noise, shifted) is stored as ``<name>-<size>-s<seed>-<CxHxW>-<key>.npy``
(normalised float32 N×C×H×W, read back with ``allow_pickle=False``) plus a ``.json`` sidecar holding
its description. The key hashes everything the set depends on: the source spec, size, seed, input
shape, the preprocessing record, the generator version and a fingerprint of the training split
(sources matched to the data's statistics depend on it). Files are written to a temporary name in the
cache folder and renamed into place, so a crash never leaves a half-written entry. A cache folder that
cannot be written is skipped with a warning: caching never fails an export.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.calib_data import ArraySource, CalibContext

_FINGERPRINTS: dict[int, tuple[weakref.ref, str]] = {}


def data_fingerprint(x: np.ndarray) -> str:
    """SHA-1 of the training images (remembered while that very array is alive)."""
    hit = _FINGERPRINTS.get(id(x))
    if hit is not None and hit[0]() is x:
        return hit[1]
    h = hashlib.sha1()
    h.update(f"{x.shape}{x.dtype}".encode())
    h.update(np.ascontiguousarray(x).data)
    digest = h.hexdigest()
    try:
        _FINGERPRINTS[id(x)] = (weakref.ref(x), digest)
    except TypeError:  # not weak-referenceable: just do not remember it
        pass
    return digest


def cache_key(ctx: CalibContext, spec: str, size: int, seed: int, version: int | str) -> dict:
    return {
        "spec": spec, "size": int(size), "seed": int(seed), "version": version,
        "input_shape": list(ctx.preprocessing.input_shape), "preprocessing": ctx.preprocessing.to_dict(),
        "data": {"name": ctx.dataset_name, "sha1": data_fingerprint(ctx.x_train)},
    }


def entry_paths(cache_dir: Path, key: dict) -> tuple[Path, Path]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in key["spec"].split(":", 1)[0])
    stem = f"{name}-{key['size']}-s{key['seed']}-{'x'.join(map(str, key['input_shape']))}-{digest}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def cached(ctx: CalibContext, spec: str, size: int, seed: int, version: int | str,
           make: Callable[[], ArraySource]) -> ArraySource:
    """Return the set for this key from ``ctx.cache_dir`` or build it with ``make()`` and store it."""
    if ctx.cache_dir is None:
        src = make()
        src.extra["cache"] = {"used": False}
        return src
    cache_dir = Path(ctx.cache_dir).expanduser()
    key = cache_key(ctx, spec, size, seed, version)
    npy, meta_path = entry_paths(cache_dir, key)
    hit = _read(npy, meta_path, key, ctx)
    if hit is not None:
        return hit
    t0 = time.perf_counter()
    src = make()
    generation_s = round(time.perf_counter() - t0, 4)
    src.extra["cache"] = {"used": True, "hit": False, "path": str(npy)}
    meta = {"key": key, "name": src.name, "seed": src.seed, "origin": src.origin,
            "extra": {k: v for k, v in src.extra.items() if k != "cache"}, "generation_s": generation_s}
    _write(cache_dir, npy, meta_path, src.samples, meta)
    return src


def _read(npy: Path, meta_path: Path, key: dict, ctx: CalibContext) -> ArraySource | None:
    """The cached set, or None (then it is regenerated and rewritten) when the entry is missing, stale,
    unreadable or tampered with: the sidecar must describe this key, and the array must be float32 of the
    expected shape (checked from its header before it is read), finite, and within the input range."""
    from pipeline.errors import PipelineError
    from pipeline.inputs.safe_arrays import load_npy
    if not (npy.is_file() and meta_path.is_file()):
        return None
    expected = (key["size"], *key["input_shape"])

    def unusable(why: str) -> None:
        warnings.warn(f"ignoring unreadable calibration cache entry {npy} ({why}); regenerating", stacklevel=4)

    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return unusable(type(e).__name__)
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None  # another key's entry (or not a sidecar at all): build and overwrite
    extra = meta.get("extra", {})
    if not (isinstance(meta.get("name"), str) and isinstance(meta.get("origin"), str) and isinstance(extra, dict)
            and (meta.get("seed") is None or isinstance(meta.get("seed"), int))):
        return unusable("malformed sidecar")
    try:
        # A set of the expected shape, in float32: nothing larger is ever read.
        samples = load_npy(npy, f"calibration cache entry {npy}", memory=4 * int(np.prod(expected)) + 1)
    except PipelineError as e:
        return unusable(e.message)
    if samples.dtype != np.float32 or tuple(samples.shape) != expected:
        return unusable(f"holds {samples.dtype} {tuple(samples.shape)}, expected float32 {expected}")
    if not np.all(np.isfinite(samples)):
        return unusable("holds NaN or inf")
    lo, hi = ctx.preprocessing.value_range()
    margin = 0.05 * (hi - lo)
    if samples.size and (float(samples.min()) < lo - margin or float(samples.max()) > hi + margin):
        return unusable("values outside the model's input range")
    if not samples.flags.c_contiguous:
        samples = np.ascontiguousarray(samples)
    extra = dict(extra)
    extra["cache"] = {"used": True, "hit": True, "path": str(npy), "generation_s": meta.get("generation_s")}
    return ArraySource(name=meta["name"], samples=samples, seed=meta.get("seed"), origin=meta["origin"],
                       extra=extra, preprocessing=ctx.preprocessing)


def _write(cache_dir: Path, npy: Path, meta_path: Path, samples: np.ndarray, meta: dict) -> None:
    tmp_paths = []
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, write in ((meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode())),
                            (npy, lambda f: np.save(f, samples, allow_pickle=False))):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=cache_dir)
            tmp_paths.append(tmp)
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
            tmp_paths.remove(tmp)
    except OSError as e:
        warnings.warn(f"cannot write the calibration cache in {cache_dir} ({e.strerror or e}); the set was built "
                      "but not cached - pass a writable --calib-cache DIR or --calib-cache off", stacklevel=3)
    finally:
        for tmp in tmp_paths:
            try:
                os.unlink(tmp)
            except OSError:
                pass
