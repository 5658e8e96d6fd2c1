"""Calibration of a classifier's confidence: ECE, ACE, MCE, NLL, Brier, and the data of reliability diagrams.

All metrics take logits ``[N, K]`` (int8 models: the dequantized outputs) and integer labels ``[N]`` and
work on the softmax. Definitions, fixed so numbers are comparable with the literature:

- ``ece``: expected calibration error, top-label, 15 equal-width confidence bins on [0, 1] (bin b holds
  confidences in ((b-1)/15, b/15], the first bin also holds 0), weighted by bin size:
  ``sum_b n_b / N * |acc_b - conf_b|`` (Guo et al. 2017; torchmetrics and gpleiss use the same 15 bins).
- ``ace``: the same with 15 adaptive, equal-mass bins (samples sorted by confidence, split into 15 groups
  of equal size, the first ``N mod 15`` groups one larger).
- ``mce``: the largest ``|acc_b - conf_b|`` over the non-empty equal-width bins.
- ``nll``: mean negative log-likelihood of the true class, natural log.
- ``brier``: mean over samples of ``sum_k (p_k - [y = k])^2`` (Brier 1950, the multi-class form; ranges 0..2).
"""
from __future__ import annotations

import numpy as np

N_BINS = 15


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits, temperature))


def _top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    return conf, correct


def equal_width_bins(conf: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin index 0..n_bins-1 of each confidence; bin b is ((b)/n, (b+1)/n], with 0 in bin 0."""
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per equal-width bin: edges, count, accuracy and mean confidence (None for empty bins)."""
    conf, correct = _top_label(probs, labels)
    idx = equal_width_bins(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
    return {
        "edges": [round(float(e), 6) for e in np.linspace(0.0, 1.0, n_bins + 1)],
        "count": count.astype(int).tolist(),
        "accuracy": [None if np.isnan(v) else float(v) for v in acc],
        "confidence": [None if np.isnan(v) else float(v) for v in mean_conf],
    }


def _equal_width_gaps(probs: np.ndarray, labels: np.ndarray, n_bins: int):
    """Per equal-width bin: sample count and |sum(correct) - sum(confidence)|; None when there are no samples."""
    conf, correct = _top_label(probs, labels)
    if len(conf) == 0:
        return None
    idx = equal_width_bins(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    gap = np.abs(np.bincount(idx, weights=correct, minlength=n_bins) - np.bincount(idx, weights=conf, minlength=n_bins))
    return count, gap


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    binned = _equal_width_gaps(probs, labels, n_bins)
    if binned is None:
        return float("nan")
    count, gap = binned
    # sum_b n_b/N * |acc_b - conf_b| = sum_b |sum(correct) - sum(conf)| / N
    return float(gap.sum() / count.sum())


def mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    binned = _equal_width_gaps(probs, labels, n_bins)
    if binned is None:
        return float("nan")
    count, gap = binned
    nonempty = count > 0
    return float((gap[nonempty] / count[nonempty]).max())


def ace(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    conf, correct = _top_label(probs, labels)
    n = len(conf)
    if n == 0:
        return float("nan")
    order = np.argsort(conf, kind="stable")
    s = conf[order]
    cuts = np.cumsum([len(g) for g in np.array_split(order, min(n_bins, n))])[:-1]
    # equal-mass bins, except that a run of equal confidences (int8 outputs have many) stays in one bin:
    # a cut inside a run moves to the nearer end of the run, so no bin depends on how ties were ordered
    lo, hi = np.searchsorted(s, s[cuts], side="left"), np.searchsorted(s, s[cuts], side="right")
    cuts = np.where(cuts - lo < hi - cuts, lo, hi)
    edges = np.unique(np.concatenate([[0], cuts, [n]]))
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        group = order[a:b]
        total += abs(float(correct[group].sum()) - float(conf[group].sum()))
    return total / n


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    lp = log_softmax(logits, temperature)
    return float(-lp[np.arange(len(lp)), np.asarray(labels)].mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(probs)), np.asarray(labels)] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def summary(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict:
    """top1, ece, ace, mce, nll and brier of one model's logits (after dividing by ``temperature``)."""
    p = softmax(logits, temperature)
    return {
        "top1": top1(logits, labels),
        "ece": ece(p, labels),
        "ace": ace(p, labels),
        "mce": mce(p, labels),
        "nll": nll(logits, labels, temperature),
        "brier": brier(p, labels),
    }


def confidence_histogram(probs: np.ndarray, n_bins: int = N_BINS) -> list[int]:
    conf = probs.max(axis=1)
    return np.bincount(equal_width_bins(conf, n_bins), minlength=n_bins).astype(int).tolist()


def as_logits(outputs: np.ndarray, probabilities: bool) -> np.ndarray:
    """Models whose last op is a softmax give probabilities: use log p as logits (softmax(log p) = p)."""
    if not probabilities:
        return np.asarray(outputs, dtype=np.float64)
    return np.log(np.clip(np.asarray(outputs, dtype=np.float64), 1e-12, None))


def outputs_are_probabilities(outputs: np.ndarray) -> bool:
    """True when every row is non-negative and sums to 1 (the model ends in a softmax)."""
    o = np.asarray(outputs, dtype=np.float64)
    return bool(len(o) and o.min() >= 0.0 and np.allclose(o.sum(axis=1), 1.0, atol=1e-3))
