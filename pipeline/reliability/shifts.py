"""The ``shifts`` section: FP32 vs int8 on every corruption x severity of the test split.

One record per shifted set: ``{corruption, severity, fp32_top1, int8_top1, drop_pp, agreement, fp32_ece,
int8_ece}``; then the worst group by int8 drop and by flip rate (1 - agreement), and the mean over the
suite. ``drop_pp`` is FP32 top-1 minus int8 top-1 in percentage points (positive = int8 is worse).
"""
from __future__ import annotations

import numpy as np

from pipeline.reliability import confidence as cm
RECORD_KEYS = ("corruption", "severity", "fp32_top1", "int8_top1", "drop_pp", "agreement", "fp32_ece", "int8_ece")
_NUMERIC = RECORD_KEYS[2:]


def record(corruption: str | None, severity: int, fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict:
    f, q = cm.top1(fp32, labels), cm.top1(int8, labels)
    return {
        "corruption": corruption,
        "severity": int(severity),
        "fp32_top1": f,
        "int8_top1": q,
        "drop_pp": (f - q) * 100.0,
        "agreement": float(np.mean(np.argmax(fp32, 1) == np.argmax(int8, 1))),
        "fp32_ece": cm.ece(cm.softmax(fp32), labels),
        "int8_ece": cm.ece(cm.softmax(int8), labels),
    }


def shifts_section(results: dict, labels: np.ndarray, corruptions, severities, clean: dict | None = None,
                   split: str = "test") -> dict:
    """``results[(split, corruption, severity)] = {"fp32": logits, "int8": logits}`` -> the section."""
    records = []
    for c in corruptions:
        for s in severities:
            r = results[(split, c, s)]
            records.append(record(c, s, r["fp32"], r["int8"], labels))
    if not records:
        return {"records": [], "note": "no corruptions were run"}
    worst_drop = max(records, key=lambda r: (r["drop_pp"], -r["agreement"]))
    worst_flip = min(records, key=lambda r: (r["agreement"], -r["drop_pp"]))
    mean = {k: float(np.mean([r[k] for r in records])) for k in _NUMERIC}
    mean["flip_rate"] = 1.0 - mean["agreement"]
    by_corruption = {}
    for c in corruptions:
        rs = [r for r in records if r["corruption"] == c]
        by_corruption[c] = {k: float(np.mean([r[k] for r in rs])) for k in _NUMERIC}
    out = {
        "records": records,
        "worst_by_int8_drop": {**worst_drop, "flip_rate": 1.0 - worst_drop["agreement"]},
        "worst_by_flip_rate": {**worst_flip, "flip_rate": 1.0 - worst_flip["agreement"]},
        "mean": mean,
        "mean_by_corruption": by_corruption,
        "corruptions": list(corruptions),
        "severities": [int(s) for s in severities],
        "images_per_set": int(len(labels)),
        "sets": len(records),
    }
    if clean is not None:
        out["clean"] = clean
        out["flip_rate_clean_vs_shifted"] = {
            "clean": 1.0 - clean["agreement"], "shifted_mean": mean["flip_rate"],
            "shifted_max": 1.0 - worst_flip["agreement"],
            "ratio": (mean["flip_rate"] / (1.0 - clean["agreement"])) if clean["agreement"] < 1.0 else None,
        }
    return out
