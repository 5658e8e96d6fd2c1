"""Prediction flips between FP32 and int8, and how well cheap uncertainty scores flag them.

A flip is an input whose top-1 class differs between the FP32 model and the deployed int8 model.
Following Hu et al. (arXiv 2204.04220, RQ3), four scores computed on the deployed int8 outputs alone are
judged as flip detectors; each is oriented so that a higher score means "more likely flipped":

- ``margin``: top-1 minus top-2 probability; the detector score is ``1 - margin``;
- ``entropy``: ``-sum p log p`` (nats);
- ``deepgini``: ``1 - sum p^2`` (Feng et al., DeepGini);
- ``least_confidence``: ``1 - max p``.

AUROC is the Mann-Whitney statistic (ranks, ties averaged); AUPR is average precision
(``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds, as scikit-learn computes it). Both are computed
on every test input (flipped = positive), not on the balanced subsample plus logistic regression the paper
used; the AUPR of a random score equals the flip rate, reported as ``aupr_random``.
"""
from __future__ import annotations

import numpy as np

from pipeline.reliability.confidence import softmax

SCORES = ("margin", "entropy", "deepgini", "least_confidence")


def uncertainty_scores(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Flip-detector scores (higher = more uncertain) for each row of ``probs``."""
    p = np.asarray(probs, dtype=np.float64)
    top2 = -np.partition(-p, 1, axis=1)[:, :2] if p.shape[1] > 1 else np.concatenate([p, np.zeros_like(p)], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return {
        "margin": 1.0 - (top2[:, 0] - top2[:, 1]),
        "entropy": -plogp.sum(axis=1),
        "deepgini": 1.0 - (p * p).sum(axis=1),
        "least_confidence": 1.0 - p.max(axis=1),
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(xs)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for separating ``positives``; None if a class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    r = _average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Average precision (area under the precision-recall curve, step-wise); None without positives."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.concatenate([np.flatnonzero(np.diff(s)), [len(s) - 1]])  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    prev = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - prev) * precision))


def tnr_at_tpr(scores: np.ndarray, positives: np.ndarray, tpr: float = 0.95) -> float | None:
    """True-negative rate at the highest threshold flagging at least ``tpr`` of the positives."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=bool)
    if y.sum() == 0 or (~y).sum() == 0:
        return None
    thr = np.quantile(s[y], 1.0 - tpr, method="lower")
    return float(np.mean(s[~y] < thr))


def flips_section(fp32_logits: np.ndarray, int8_logits: np.ndarray) -> dict:
    """Count and rate of top-1 flips, and each score's AUROC/AUPR at flagging them from int8 outputs."""
    f = np.argmax(fp32_logits, axis=1)
    q = np.argmax(int8_logits, axis=1)
    flipped = f != q
    n = len(flipped)
    scores = uncertainty_scores(softmax(int8_logits))
    detectors = {}
    for name in SCORES:
        s = scores[name]
        detectors[name] = {
            "auroc": auroc(s, flipped),
            "aupr": average_precision(s, flipped),
            "tnr_at_tpr95": tnr_at_tpr(s, flipped),
            "mean_flipped": float(s[flipped].mean()) if flipped.any() else None,
            "mean_unflipped": float(s[~flipped].mean()) if (~flipped).any() else None,
        }
    ranked = [k for k in SCORES if detectors[k]["auroc"] is not None]
    best = max(ranked, key=lambda k: detectors[k]["auroc"]) if ranked else None
    return {
        "count": int(flipped.sum()),
        "rate": float(flipped.mean()) if n else float("nan"),
        "n": int(n),
        "indices": np.flatnonzero(flipped)[:200].astype(int).tolist(),
        "indices_note": "test-split indices of the first (up to) 200 flipped inputs",
        "detectors": detectors,
        "best_detector": best,
        "aupr_random": float(flipped.mean()) if n else None,
        "scores_on": "deployed int8 outputs (dequantized), softmax; higher score = more likely flipped",
        "note": None if flipped.any() else "no flips on this split: AUROC/AUPR are undefined (None)",
    }
