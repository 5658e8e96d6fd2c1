"""``python -m pipeline.study flips`` (Hu et al. 2022 RQ1/RQ3): the metrics against hand computations, the preset
resolution, and the quick preset end to end on LiteRT kernels through ``pipeline.study.main``, then resumed."""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest

from pipeline.errors import UsageError
from pipeline.studies import flips as fl


def _onehot_logits(classes, k=3):
    z = np.zeros((len(classes), k))
    z[np.arange(len(classes)), classes] = 5.0
    return z


# --------------------------------------------------------------------------- RQ1 metrics

def test_set_stats_counts_flips_and_scales_to_per_10k():
    labels = np.array([0, 1, 2, 0, 1])
    fp32 = _onehot_logits([0, 1, 2, 1, 1])  # 4 of 5 right
    int8 = _onehot_logits([0, 2, 2, 1, 0])  # 2 of 5 right; differs from FP32 on images 1 and 4
    s = fl.set_stats(fp32, int8, labels)
    assert s["n"] == 5 and s["flips"] == 2
    assert s["flips_per_10k"] == pytest.approx(2 / 5 * 10_000)
    assert s["fp32_top1"] == pytest.approx(0.8) and s["int8_top1"] == pytest.approx(0.4)
    assert s["drop_pp"] == pytest.approx(40.0)
    assert fl.per_10k(3, 1000) == pytest.approx(30.0) and fl.per_10k(0, 0) is None


def test_rq1_summary_mean_max_worst_set_and_ratio():
    clean = {"flips_per_10k": 20.0}
    shifted = [{"corruption": "fog", "severity": 1, "flips_per_10k": 40.0, "drop_pp": 0.1, "fp32_top1": .8, "int8_top1": .7},
               {"corruption": "fog", "severity": 5, "flips_per_10k": 200.0, "drop_pp": 2.0, "fp32_top1": .5, "int8_top1": .4},
               {"corruption": "rotate", "severity": 3, "flips_per_10k": 60.0, "drop_pp": 0.0, "fp32_top1": .6, "int8_top1": .6}]
    q = fl.rq1_summary(clean, shifted)
    assert q["shifted_mean_per_10k"] == pytest.approx(100.0)
    assert q["shifted_max_per_10k"] == 200.0 and q["worst_set"] == "fog s5"
    assert q["ratio"] == pytest.approx(5.0) and q["shifted_sets"] == 3
    assert q["shifted_mean_int8_top1"] == pytest.approx(1.7 / 3)
    assert fl.rq1_summary({"flips_per_10k": 0.0}, shifted)["ratio"] is None  # no clean flips: no ratio
    assert fl.rq1_summary(clean, [])["worst_set"] is None


# --------------------------------------------------------------------------- RQ3 metrics, by hand

def _auroc_by_pairs(s, y):
    """P(score of a positive > score of a negative) + 0.5 P(tie), counted over every pair."""
    pos, neg = s[y], s[~y]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_detector_metrics_match_a_hand_computation():
    # 3 flips among 8 inputs; margin ranks: flips at scores 0.9, 0.6 (tied with a non-flip) and 0.2
    y = np.array([1, 0, 1, 0, 0, 1, 0, 0], dtype=bool)
    s = np.array([0.9, 0.8, 0.6, 0.6, 0.3, 0.2, 0.1, 0.05])
    scores = {k: s for k in fl.SCORES}
    d = fl.detector_metrics(scores, y)["margin"]
    assert d["auroc"] == pytest.approx(_auroc_by_pairs(s, y))
    # by hand over the 3 x 5 pairs: the flip at 0.9 beats all 5 non-flips; the one at 0.6 beats 0.3, 0.1, 0.05
    # and ties 0.6 (3.5); the one at 0.2 beats 0.1 and 0.05 (2) -> (5 + 3.5 + 2) / 15
    assert d["auroc"] == pytest.approx(10.5 / 15)
    # average precision by hand over distinct thresholds: 0.9 -> P 1, R 1/3; 0.8 -> no recall gain;
    # 0.6 (two inputs, one flip) -> P 2/4, R 2/3; 0.3 -> none; 0.2 -> P 3/6, R 1
    assert d["aupr"] == pytest.approx(1 / 3 * 1 + 1 / 3 * 0.5 + 1 / 3 * 0.5)
    # 95% TPR needs all three flips: threshold 0.2; non-flips below 0.2: 0.1, 0.05 -> 2 of 5
    assert d["tnr_at_tpr95"] == pytest.approx(2 / 5)


def test_detector_metrics_random_score_has_the_flip_rate_as_aupr():
    rng = np.random.default_rng(0)
    y = rng.random(20_000) < 0.05
    d = fl.detector_metrics({k: rng.random(20_000) for k in fl.SCORES}, y)
    for k in fl.SCORES:
        assert d[k]["auroc"] == pytest.approx(0.5, abs=0.02)
        assert d[k]["aupr"] == pytest.approx(y.mean(), abs=0.01)  # the baseline the study prints


def test_balanced_indices_take_every_flip_and_as_many_seeded_non_flips():
    rng = np.random.default_rng(1)
    flipped = rng.random(500) < 0.04
    idx = fl.balanced_indices(flipped, seed=3)
    k = int(flipped.sum())
    assert set(np.flatnonzero(flipped)) <= set(idx.tolist())
    assert len(idx) == 2 * k and len(set(idx.tolist())) == 2 * k and flipped[idx].mean() == 0.5
    assert np.array_equal(idx, fl.balanced_indices(flipped, seed=3))  # seeded
    assert not np.array_equal(idx, fl.balanced_indices(flipped, seed=4))
    # more flips than non-flips: every input
    many = np.ones(10, dtype=bool)
    many[:3] = False
    assert fl.balanced_indices(many, 0).tolist() == list(range(10))
    assert fl.balanced_indices(np.zeros(5, dtype=bool), 0).tolist() == []


# --------------------------------------------------------------------------- presets and flags

def _args(**kw):
    base = dict(models="all", quick=False, shifts="mnist-c", severities=None, eval_limit=None, target="tflite-int8",
                calib="balanced", calib_size=None, seed=0, balanced=False)
    return argparse.Namespace(**{**base, **kw})


def test_settings_full_and_quick_presets():
    from pipeline.reliability.corruptions import CORRUPTIONS, PRESETS
    full = fl.settings(_args())
    assert full["corruptions"] == list(PRESETS["mnist-c"]) and full["severities"] == list(fl.DEFAULT_SEVERITIES)
    assert full["eval_limit"] is None
    quick = fl.settings(_args(quick=True))
    assert quick["corruptions"] == fl.QUICK_SHIFTS.split(",") and quick["severities"] == [3]
    assert quick["eval_limit"] == fl.QUICK_EVAL_LIMIT
    assert fl.settings(_args(shifts="default"))["corruptions"] == list(CORRUPTIONS)
    assert fl.settings(_args(severities="1,2"))["severities"] == [1, 2]
    for bad in ("0", "6", "1,1", "a"):
        with pytest.raises(UsageError):
            fl.settings(_args(severities=bad))
    with pytest.raises(UsageError):
        fl.settings(_args(shifts="fgo"))


def test_quick_cells_are_two_models_unless_named(tmp_path):
    cells = fl.cells(_args(quick=True), tmp_path)
    assert [c.key for c in cells] == fl.QUICK_MODELS.split(",")
    assert all(c.fn is fl.flips_cell and c.config["eval_limit"] == 1000 for c in cells)
    assert [c.key for c in fl.cells(_args(quick=True, models="zoo:mobileone"), tmp_path)] == ["zoo:mobileone"]


# --------------------------------------------------------------------------- the quick preset, end to end

@pytest.mark.slow
def test_quick_preset_end_to_end_on_litert(tmp_path):
    from pipeline.study import main
    out = tmp_path / "flips"
    assert main(["flips", "--quick", "--balanced", "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert [m["model"] for m in study["models"]] == ["zoo:refcnn", "zoo:resnet8"] and not study["failures"]
    for m in study["models"]:
        assert m["test_images"] == 1000 and m["kernels"] == "xnnpack"
        assert [(x["corruption"], x["severity"]) for x in m["shifted"]] == [("fog", 3), ("rotate", 3)]
        # the clean flips recount independently from the export's own run stage (4 threads; ours 1 thread)
        z = np.load(f"{m['folder']}/predictions.npz", allow_pickle=False)
        recount = int(np.sum(z["fp32_logits"].argmax(1) != z["int8_logits"].argmax(1)))
        assert m["clean"]["flips"] == recount == m["export_accuracy"]["flips"]
        assert m["clean"]["flips_per_10k"] == pytest.approx(recount * 10)
        p = m["pooled"]
        assert p["inputs"] == 3000 and p["flips"] == sum(x["flips"] for x in [m["clean"]] + m["shifted"])
        assert p["flips"] > 0 and p["aupr_baseline"] == pytest.approx(p["flips"] / 3000)
        # real behaviour: margin flags flips far better than chance on both sides (measured 0.98-0.99)
        for side in ("int8", "fp32"):
            assert p[side]["margin"]["auroc"] > 0.9 and p[side]["margin"]["aupr"] > 5 * p["aupr_baseline"]
        b = m["balanced"]
        assert b["inputs"] == 2 * p["flips"] and b["aupr_baseline"] == 0.5
        q = m["rq1"]
        assert q["shifted_mean_per_10k"] == pytest.approx(np.mean([x["flips_per_10k"] for x in m["shifted"]]))
    assert study["paper"]["rq3_auroc"]["LeNet-1"]["margin"] == 95.70 and study["differences"]
    page = (out / "study.html").read_text()
    assert page.count("<svg") == 3 and "Differences from the paper" in page and "LeNet-1" in page
    md = (out / "study.md").read_text()
    assert "balanced protocol" in md and "baseline = flip rate" in md
    # resumed: every cell comes from OUT/cells, the same study
    assert main(["flips", "--quick", "--balanced", "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "study.json").read_text())
    assert all(c["resumed"] for c in again["execution"]["cells"]) and again["models"] == study["models"]
