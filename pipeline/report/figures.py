"""Figures for ``report.html`` that need the arrays, not only the metrics: the FP32-vs-int8 confusion and
thumbnails of the most confident flips. Computed where the arrays live (the export's run stage outputs, or
pipeline.evaluate's clean-test outputs) and stored in ``report.json`` as ``fp32_vs_int8``.

``confusion``: with ``K`` classes, ``fp32`` and ``int8`` are K x K counts (row = true class, column = predicted
class) and ``delta`` = int8 - FP32 per cell: off the diagonal a positive cell is a mistake the int8 model makes
more often, on the diagonal a negative cell is a class it gets right less often. ``flips`` (row = FP32 class,
column = int8 class) counts the images whose top-1 changed. Above ``max_classes`` classes the matrices are
left out and only the largest cells are listed (``top_delta``, ``top_flips``).

``flip_examples``: up to ``k`` flipped images, the most confident int8 predictions first (a confident flip is
the one a device would act on), each with the true class, both predictions and their softmax confidences, and
a small PNG (nearest-neighbour upscaled to about 56 px; larger images are box-downscaled to at most 64 px) as
base64.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from pipeline.reliability.confidence import softmax

THUMB_TARGET_PX = 56
THUMB_MAX_PX = 64


def _names(class_names, k: int) -> list[str]:
    if class_names is not None and len(class_names) >= k:
        return [str(c) for c in list(class_names)[:k]]
    return [str(i) for i in range(k)]


def _counts(rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (rows, cols), 1)
    return m


def _top_cells(m: np.ndarray, n: int, off_diagonal: bool, by_abs: bool) -> list[dict]:
    v = m.astype(np.int64).copy()
    key = np.abs(v) if by_abs else v.copy()
    if off_diagonal:
        np.fill_diagonal(key, 0)
    flat = np.argsort(-key, axis=None, kind="stable")[:n]
    out = []
    for f in flat:
        i, j = divmod(int(f), m.shape[1])
        if key[i, j] <= 0:
            break
        out.append({"row": i, "col": j, "count": int(v[i, j])})
    return out


def thumbnail_png(image_chw: np.ndarray, raw_range: tuple[float, float] | None = None) -> bytes:
    """One raw image (C,H,W or H,W; uint8 or float) as a small PNG: grey for 1 channel, RGB for 3."""
    from PIL import Image
    x = np.asarray(image_chw)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected one C,H,W image, got shape {x.shape}")
    if x.dtype != np.uint8:
        x = x.astype(np.float64)
        lo, hi = raw_range if raw_range else (float(np.nanmin(x)), float(np.nanmax(x)))
        if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
            lo, hi = 0.0, 1.0 if hi <= 1.0 else 255.0
        x = np.clip(np.nan_to_num((x - lo) / (hi - lo)), 0, 1) * 255.0
        x = np.round(x).astype(np.uint8)
    img = (Image.fromarray(x[:3].transpose(1, 2, 0), "RGB") if x.shape[0] >= 3
           else Image.fromarray(x[0], "L"))
    w, h = img.size
    side = max(w, h)
    if side < THUMB_TARGET_PX:
        f = max(1, round(THUMB_TARGET_PX / side))
        img = img.resize((w * f, h * f), Image.NEAREST)
    elif side > THUMB_MAX_PX:
        s = THUMB_MAX_PX / side
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BOX)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def confusion_and_flip_examples(raw_test_images_nchw, labels, fp32_logits, int8_logits, class_names=None,
                                k: int = 8, max_classes: int = 32, raw_range=None) -> dict:
    """``{"confusion": {...}, "flip_examples": [...]}`` for the first ``len(labels)`` test images.

    ``raw_test_images_nchw``: the raw test images (before preprocessing), N x C x H x W (or N x H x W);
    ``fp32_logits``/``int8_logits``: N x K outputs of the two models (int8 dequantized)."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    f = np.asarray(fp32_logits, dtype=np.float64)
    q = np.asarray(int8_logits, dtype=np.float64)
    n = len(y)
    if f.ndim != 2 or q.shape != f.shape or len(f) != n:
        raise ValueError(f"logits {f.shape} / {q.shape} do not match {n} labels")
    k_classes = int(max(f.shape[1], (y.max() + 1) if n else 0))
    pf, pq = softmax(f), softmax(q)
    af, aq = f.argmax(1), q.argmax(1)
    names = _names(class_names, k_classes)
    m_f, m_q = _counts(y, af, k_classes), _counts(y, aq, k_classes)
    delta = m_q - m_f
    flips_m = _counts(af, aq, k_classes)
    np.fill_diagonal(flips_m, 0)  # only the images whose top-1 changed
    flipped = np.flatnonzero(af != aq)
    conf = {"classes": k_classes, "names": names, "n": int(n), "flips": int(len(flipped)),
            "rows": "true class", "columns": "predicted class",
            "how": "counts of the first n test images: fp32/int8 are true class (row) x predicted class (column); "
                   "delta = int8 - fp32; flips is FP32 class (row) x int8 class (column) for images whose top-1 "
                   "changed",
            "changed_cells": int(np.count_nonzero(delta)),
            "top_delta": _top_cells(delta, 12, off_diagonal=False, by_abs=True),
            "top_flips": _top_cells(flips_m, 12, off_diagonal=True, by_abs=False)}
    if k_classes <= max_classes:
        conf.update(fp32=m_f.tolist(), int8=m_q.tolist(), delta=delta.tolist(), flips_matrix=flips_m.tolist())
    else:
        conf["matrices_omitted"] = f"{k_classes} classes > {max_classes}: only the largest cells are listed"
    order = sorted(flipped.tolist(), key=lambda i: (-pq[i, aq[i]], -pf[i, af[i]], i))[: max(0, int(k))]
    x = np.asarray(raw_test_images_nchw)
    examples = []
    for i in order:
        ex = {"index": int(i), "label": int(y[i]), "label_name": names[y[i]] if 0 <= y[i] < k_classes else str(y[i]),
              "fp32": {"class": int(af[i]), "name": names[af[i]], "confidence": round(float(pf[i, af[i]]), 4)},
              "int8": {"class": int(aq[i]), "name": names[aq[i]], "confidence": round(float(pq[i, aq[i]]), 4)}}
        if i < len(x):
            ex["png"] = base64.b64encode(thumbnail_png(x[i], raw_range)).decode("ascii")
        examples.append(ex)
    return {"confusion": conf, "flip_examples": examples,
            "flip_examples_order": "flipped test images, highest int8 confidence first (then FP32 confidence)"}
