"""Is the FP32 reference itself sane? Checked before any drop or agreement gate is believed.

A quantization check compares int8 with FP32; when the FP32 model is broken (untrained weights, a forgotten
``--weights``, the wrong ``--mean/--std``, the wrong channel order) both are equally wrong, the drop is zero and
the agreement perfect. Two checks catch that:

- ``fp32_above_chance`` (a gate): FP32 top-1 on the evaluated test images must clear the *near-chance limit*
  ``min(2 * chance, chance + (1 - chance) / 4)``, where ``chance`` is the share of the most common label among
  those images (what always answering that class scores). For 10 balanced classes the limit is 20%; for 2
  classes 62.5%; for 1000 classes 0.2%. A real classifier clears it by far; a broken one does not.
- the *preprocessing probe*: FP32 top-1 on a few hundred test images under the preprocessing in use and under
  the usual alternatives (raw [0,1], [-1,1], ImageNet mean/std for 3 channels, the zoo model's own record, the
  training split's own statistics, reversed channel order). An alternative is *clearly better* when it is right
  on at least 5 points more of the images and the paired difference is significant (McNemar: the images only it
  gets right, ``b``, against those only the record in use gets right, ``c``, with ``(b - c) / sqrt(b + c) >= 3``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

PROBE_IMAGES = 512
PROBE_IMAGES_LARGE = 128  # the fewest, for large inputs (probe_images)


def probe_images(values_per_image: int) -> int:
    """How many test images the probe runs per candidate: PROBE_IMAGES up to 3x64x64 inputs, fewer above (the
    probe's five or so FP32 passes cost more than the evaluation itself at 3x224x224), at least
    PROBE_IMAGES_LARGE."""
    return int(np.clip(PROBE_IMAGES * (3 * 64 * 64) // max(values_per_image, 1), PROBE_IMAGES_LARGE, PROBE_IMAGES))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_GAIN_PP = 5.0
MIN_Z = 3.0


def chance_level(labels: np.ndarray) -> float:
    """Top-1 of always answering the most common label of ``labels``."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0.0
    return float(np.bincount(labels.astype(np.int64)).max() / labels.size)


def near_chance_limit(chance: float) -> float:
    return min(2.0 * chance, chance + (1.0 - chance) / 4.0)


def candidates(pre, model_mean=None, model_std=None, train_stats=None) -> list[tuple[str, tuple, tuple, bool]]:
    """(name, mean, std, reversed channels) for each preprocessing worth trying, the one in use first."""
    c = pre.channels
    out = [("in use", tuple(pre.mean), tuple(pre.std), False),
           ("raw [0,1] (mean 0, std 1)", (0.0,) * c, (1.0,) * c, False),
           ("[-1,1] (mean 0.5, std 0.5)", (0.5,) * c, (0.5,) * c, False)]
    if c == 3:
        out.append(("ImageNet mean/std", IMAGENET_MEAN, IMAGENET_STD, False))
    if model_mean is not None and model_std is not None and {len(model_mean), len(model_std)} <= {1, c}:
        out.append(("the model's own record", tuple(model_mean) * (c // len(model_mean)),
                    tuple(model_std) * (c // len(model_std)), False))
    if train_stats is not None:
        out.append(("the training split's mean/std", tuple(train_stats[0]), tuple(train_stats[1]), False))
    if c == 3:
        out.append(("in use, channels reversed (BGR<->RGB)", tuple(pre.mean), tuple(pre.std), True))
    seen, unique = set(), []
    for name, m, s, rev in out:
        key = (tuple(round(float(v), 4) for v in m), tuple(round(float(v), 4) for v in s), rev)
        if key not in seen and len(m) == c and len(s) == c and all(v > 0 for v in s):
            seen.add(key)
            unique.append((name, tuple(float(v) for v in m), tuple(float(v) for v in s), rev))
    return unique


def train_statistics(x_train_nchw: np.ndarray, scale: float, limit: int = 2000) -> tuple[tuple, tuple]:
    """Per-channel mean and std of the first ``limit`` training images after scaling, summed in float64 over
    chunks of 64 images (the whole set in float64 took 2.4 GB at 3x224x224, about 5 GB with the std's temporary)."""
    x_all = x_train_nchw[:limit]
    n = 0
    s1 = s2 = 0.0
    for i in range(0, len(x_all), 64):
        x = np.asarray(x_all[i:i + 64], dtype=np.float64) * scale
        s1 = s1 + x.sum(axis=(0, 2, 3))
        s2 = s2 + np.square(x).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    m = s1 / n
    s = np.sqrt(np.maximum(s2 / n - m * m, 0.0))
    return tuple(float(v) for v in m), tuple(float(max(v, 1e-6)) for v in s)


def probe(run_fp32, raw_test_nchw: np.ndarray, labels: np.ndarray, pre, model_mean=None, model_std=None,
          train_stats=None, n: int = PROBE_IMAGES, in_use_logits: np.ndarray | None = None) -> dict:
    """FP32 top-1 of the first ``n`` test images under each candidate preprocessing.

    ``run_fp32(x)`` returns FP32 logits for float32 NCHW inputs; ``in_use_logits``: logits already computed under
    the preprocessing in use (at least ``n`` rows), not computed again. Returns the record for report.json.
    """
    from pipeline.inputs.preprocessing import apply
    raw, y = raw_test_nchw[:n], np.asarray(labels[:n])
    rows, correct = [], {}
    for name, mean, std, rev in candidates(pre, model_mean, model_std, train_stats):
        p = dataclasses.replace(pre, mean=mean, std=std)
        if name == "in use" and in_use_logits is not None and len(in_use_logits) >= len(y):
            logits = in_use_logits[:len(y)]
        else:
            logits = run_fp32(apply(raw[:, ::-1] if rev else raw, p))
        hits = np.argmax(logits, axis=1) == y
        correct[name] = hits
        rows.append({"name": name, "mean": list(mean), "std": list(std), "channels_reversed": rev,
                     "top1": round(float(hits.mean()), 4)})
    in_use = correct["in use"]
    best = None
    for r in rows[1:]:
        hits = correct[r["name"]]
        b, c = int(np.sum(hits & ~in_use)), int(np.sum(~hits & in_use))
        gain_pp = (r["top1"] - rows[0]["top1"]) * 100
        z = (b - c) / math.sqrt(b + c) if b + c else 0.0
        r["clearly_better"] = bool(gain_pp >= MIN_GAIN_PP and z >= MIN_Z)
        # the first listed wins unless a later one is better by over a point (the model's own record before
        # the training split's statistics, which usually come within noise of it)
        if r["clearly_better"] and (best is None or r["top1"] > best["top1"] + 0.01):
            best = r
    return {"images": int(len(y)), "split": "test (first images)", "candidates": rows,
            "better": None if best is None else {"name": best["name"], "mean": best["mean"], "std": best["std"],
                                                 "channels_reversed": best["channels_reversed"],
                                                 "top1": best["top1"],
                                                 "gain_pp": round((best["top1"] - rows[0]["top1"]) * 100, 2)},
            "rule": f"an alternative is clearly better when it gains at least {MIN_GAIN_PP:g} points and the "
                    f"paired McNemar statistic (b - c)/sqrt(b + c) is at least {MIN_Z:g}"}


def suggestion(better: dict | None) -> str:
    """The flags that select the clearly better preprocessing, in words."""
    if not better:
        return ""
    if better["channels_reversed"]:
        return (f"the same images with their channels reversed score {better['top1']:.1%} (+{better['gain_pp']:.1f} "
                "pp): the model expects the other channel order (RGB vs BGR); convert the data")
    fmt = lambda v: ",".join(f"{x:.4g}" for x in v)  # noqa: E731
    return (f"{better['name']} scores {better['top1']:.1%} (+{better['gain_pp']:.1f} pp): try --mean "
            f"{fmt(better['mean'])} --std {fmt(better['std'])}")


def fp32_gate(fp32_top1: float, labels: np.ndarray, probe_record: dict | None, weights_missing: bool):
    """The ``fp32_above_chance`` gate (a report.Gate): FP32 top-1 must clear the near-chance limit."""
    from pipeline.report import Gate
    chance = chance_level(labels)
    limit = near_chance_limit(chance)
    passed = bool(fp32_top1 > limit)
    reason = None
    if not passed:
        causes = []
        if weights_missing:
            causes.append("the factory was built without --weights (random initialisation)")
        better = suggestion((probe_record or {}).get("better"))
        if better:
            causes.append(better)
        causes.append("untrained weights, a missing --weights, the wrong --mean/--std, or the wrong channel order "
                      "or layout of the data")
        reason = (f"FP32 top-1 {fp32_top1:.2%} is at or near chance ({chance:.2%}; limit {limit:.2%}), so "
                  "the int8 comparison means nothing; likely causes: " + "; ".join(causes))
    return Gate(passed=passed, value=round(float(fp32_top1), 4), limit=round(limit, 4), reason=reason,
                details={"chance": round(chance, 4),
                         "rule": "FP32 top-1 must exceed min(2 x chance, chance + (1 - chance) / 4); chance = share "
                                 "of the most common label among the evaluated images"})
