"""Each reliability metric on small hand-made logits whose answers are worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.reliability import confidence as cm
from pipeline.reliability.flips import auroc, average_precision, flips_section, tnr_at_tpr, uncertainty_scores
from pipeline.reliability.suite import ReliabilityConfig, calibration_drift, gates, per_class, parse_corruptions, validation_indices
from pipeline.reliability.shifts import RECORD_KEYS, shifts_section
from pipeline.reliability.temperature import fit_temperature
from pipeline.errors import UsageError


def logits_of(probs) -> np.ndarray:
    """Logits whose softmax is exactly ``probs`` (up to float rounding)."""
    return np.log(np.asarray(probs, dtype=np.float64))


# Six 3-class predictions. Confidences 0.92 fall in equal-width bin 13 of 15 ((0.8667, 0.9333]);
# 0.62 falls in bin 9 ((0.6, 0.6667]).
P = np.array([
    [0.92, 0.05, 0.03],  # label 0: correct
    [0.92, 0.05, 0.03],  # label 1: wrong
    [0.20, 0.62, 0.18],  # label 1: correct
    [0.20, 0.62, 0.18],  # label 1: correct
    [0.10, 0.28, 0.62],  # label 2: correct
    [0.10, 0.28, 0.62],  # label 0: wrong
])
Y = np.array([0, 1, 1, 1, 2, 0])


def test_softmax_of_hand_logits():
    np.testing.assert_allclose(cm.softmax(logits_of(P)), P, atol=1e-12)


def test_ece_by_hand():
    # bin 13: 2 samples, accuracy 1/2, confidence 0.92 -> gap 0.42
    # bin 9:  4 samples, accuracy 3/4, confidence 0.62 -> gap 0.13
    # ECE = 2/6 * 0.42 + 4/6 * 0.13
    assert cm.ece(P, Y) == pytest.approx(2 / 6 * 0.42 + 4 / 6 * 0.13, abs=1e-12)


def test_mce_by_hand():
    assert cm.mce(P, Y) == pytest.approx(0.42, abs=1e-12)


def test_ace_by_hand():
    # Equal-mass bins over the sorted confidences [0.62 x4 (idx 2,3,4,5), 0.92 x2 (idx 0,1)], but a run of equal
    # confidences stays in one bin: with 2 bins the cut (after 3 samples) moves back to the start of the 0.62 run.
    # bin 1 = idx 2,3,4,5: 3 correct, confidence sum 2.48 -> |3 - 2.48| = 0.52
    # bin 2 = idx 0,1:     1 correct, confidence sum 1.84 -> |1 - 1.84| = 0.84
    assert cm.ace(P, Y, n_bins=2) == pytest.approx((0.52 + 0.84) / 6, abs=1e-12)
    assert cm.ace(P, Y) == pytest.approx((0.52 + 0.84) / 6, abs=1e-12)  # 15 bins: the same two runs
    # Distinct confidences, 15 bins, 6 samples: every sample is its own bin, so ACE = mean |correct - confidence|.
    Q = np.array([[0.91, 0.05, 0.04], [0.93, 0.04, 0.03], [0.20, 0.61, 0.19],
                  [0.20, 0.62, 0.18], [0.10, 0.27, 0.63], [0.10, 0.26, 0.64]])
    per_sample = [0.09, 0.93, 0.39, 0.38, 0.37, 0.64]
    assert cm.ace(Q, Y) == pytest.approx(np.mean(per_sample), abs=1e-12)


def test_ace_does_not_depend_on_how_ties_are_ordered():
    # A constant model: every confidence 0.25 (4 classes), 30% correct. Splitting the tie into equal-mass bins
    # would make ACE depend on the sample order; kept together, ACE = |0.30 - 0.25| = ECE.
    probs = np.full((1000, 4), 0.25)
    labels = np.zeros(1000, int)
    labels[300:] = 1 + np.arange(700) % 3  # argmax is class 0 (first of the ties): 300 correct
    assert cm.ace(probs, labels) == pytest.approx(0.05, abs=1e-12)
    assert cm.ace(probs, labels[::-1]) == pytest.approx(0.05, abs=1e-12)
    assert cm.ece(probs, labels) == pytest.approx(0.05, abs=1e-12)


def test_nll_by_hand():
    expected = -np.mean(np.log([0.92, 0.05, 0.62, 0.62, 0.62, 0.10]))
    assert cm.nll(logits_of(P), Y) == pytest.approx(expected, abs=1e-12)


def test_brier_by_hand():
    # (0.08^2+0.05^2+0.03^2), (0.92^2+0.95^2+0.03^2), 2x(0.2^2+0.38^2+0.18^2), (0.1^2+0.28^2+0.38^2), (0.9^2+0.28^2+0.62^2)
    rows = [0.08**2 + 0.05**2 + 0.03**2, 0.92**2 + 0.95**2 + 0.03**2, 0.2**2 + 0.38**2 + 0.18**2,
            0.2**2 + 0.38**2 + 0.18**2, 0.1**2 + 0.28**2 + 0.38**2, 0.9**2 + 0.28**2 + 0.62**2]
    assert cm.brier(P, Y) == pytest.approx(np.mean(rows), abs=1e-12)


def test_summary_and_bins_agree():
    s = cm.summary(logits_of(P), Y)
    assert s["top1"] == pytest.approx(4 / 6)
    assert s["ece"] == pytest.approx(cm.ece(P, Y), abs=1e-9)
    bins = cm.reliability_bins(P, Y)
    assert bins["count"][13] == 2 and bins["count"][9] == 4 and sum(bins["count"]) == 6
    assert bins["accuracy"][13] == pytest.approx(0.5) and bins["confidence"][9] == pytest.approx(0.62)
    assert bins["accuracy"][0] is None
    assert cm.confidence_histogram(P) == bins["count"]


def test_bin_edges_are_right_closed():
    # 1/3 of the way (confidence 1/3 exactly 5/15) belongs to bin 4, (4/15, 5/15]; 1.0 to bin 14; 0 to bin 0.
    conf = np.array([5 / 15, 1.0, 0.0, 5 / 15 + 1e-9])
    assert cm.equal_width_bins(conf).tolist() == [4, 14, 0, 5]


def test_temperature_changes_nll_not_top1():
    z = logits_of(P)
    assert cm.summary(z, Y, 3.0)["top1"] == cm.summary(z, Y)["top1"]
    assert cm.nll(z, Y, 3.0) != pytest.approx(cm.nll(z, Y))


def test_probability_outputs_detected():
    assert cm.outputs_are_probabilities(P)
    assert not cm.outputs_are_probabilities(logits_of(P))
    np.testing.assert_allclose(cm.softmax(cm.as_logits(P, True)), P, atol=1e-12)


# --------------------------------------------------------------------------- temperature scaling

def _sample_labels(z: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """Labels drawn from softmax(z / T): a model whose logits are off by exactly T."""
    rng = np.random.default_rng(seed)
    p = cm.softmax(z, temperature)
    return (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.0, 4.0])
def test_temperature_fit_recovers_known_temperature(t_true):
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 3.0, (40000, 10))
    y = _sample_labels(z, t_true, seed=2)
    fit = fit_temperature(z, y)
    # 40k samples pin T down to about 1-2 %; allow 5 %.
    assert fit.temperature == pytest.approx(t_true, rel=0.05)
    assert fit.converged and not fit.at_bound
    assert fit.nll_after <= fit.nll_before + 1e-12
    # The fitted T is the NLL minimum: nudging it either way does not lower NLL.
    for f in (0.97, 1.03):
        assert cm.nll(z, y, fit.temperature * f) >= fit.nll_after - 1e-12


def test_temperature_fit_softens_overconfident_model():
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 3.0, (20000, 5))
    y = _sample_labels(z, 2.5, seed=4)
    fit = fit_temperature(z, y)
    before, after = cm.summary(z, y), cm.summary(z, y, fit.temperature)
    assert fit.temperature > 1.0
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]


# --------------------------------------------------------------------------- flip detectors

def test_auroc_and_average_precision_known_values():
    # The scikit-learn documentation example: roc_auc_score = 0.75, average_precision_score = 0.8333...
    s, y = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)
    assert auroc(s, y) == pytest.approx(0.75)
    assert average_precision(s, y) == pytest.approx(5 / 6)


def test_auroc_extremes_and_ties():
    y = np.array([1, 1, 0, 0, 0], bool)
    assert auroc(np.array([5, 4, 3, 2, 1.0]), y) == 1.0
    assert auroc(np.array([1, 2, 3, 4, 5.0]), y) == 0.0
    assert auroc(np.ones(5), y) == 0.5  # all tied: chance
    assert average_precision(np.ones(5), y) == pytest.approx(2 / 5)  # all tied: the positive rate
    assert auroc(np.ones(3), np.zeros(3, bool)) is None
    assert average_precision(np.ones(3), np.zeros(3, bool)) is None


def test_auroc_counts_pairs():
    # Positives 0.3 and 0.9 against negatives 0.1, 0.5, 0.9 (one tie): pairs won 1 + 2.5 of 6.
    s = np.array([0.3, 0.9, 0.1, 0.5, 0.9])
    y = np.array([1, 1, 0, 0, 0], bool)
    assert auroc(s, y) == pytest.approx(3.5 / 6)


def test_tnr_at_tpr95():
    s = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.75])
    y = np.array([1, 1, 1, 0, 0, 0], bool)
    # Flagging every positive needs threshold 0.7; negatives below it: 0.1 and 0.2 -> 2/3.
    assert tnr_at_tpr(s, y) == pytest.approx(2 / 3)


def test_uncertainty_scores_by_hand():
    p = np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    s = uncertainty_scores(p)
    np.testing.assert_allclose(s["margin"], [1 - 0.2, 0.0])
    np.testing.assert_allclose(s["entropy"], [-(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)), 0.0])
    np.testing.assert_allclose(s["deepgini"], [1 - (0.25 + 0.09 + 0.04), 0.0])
    np.testing.assert_allclose(s["least_confidence"], [0.5, 0.0])


def test_flips_section_margin_separates_low_margin_flips():
    # Int8 probabilities: the two flipped inputs have a small top-1/top-2 margin, the rest a large one;
    # entropy cannot tell input 3 (flat tail, unflipped) from the flips.
    q = np.array([
        [0.48, 0.47, 0.05],   # flipped (FP32 says class 1)
        [0.05, 0.49, 0.46],   # flipped (FP32 says class 2)
        [0.90, 0.05, 0.05],
        [0.60, 0.20, 0.20],   # high entropy, large margin
        [0.05, 0.90, 0.05],
    ])
    fp32 = logits_of([[0.4, 0.5, 0.1], [0.1, 0.4, 0.5], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    sec = flips_section(fp32, logits_of(q))
    assert sec["count"] == 2 and sec["rate"] == pytest.approx(0.4) and sec["indices"] == [0, 1]
    assert sec["detectors"]["margin"]["auroc"] == 1.0
    assert sec["detectors"]["margin"]["aupr"] == pytest.approx(1.0)
    assert sec["best_detector"] == "margin"
    assert sec["aupr_random"] == pytest.approx(0.4)


def test_flips_section_without_flips():
    z = logits_of(P)
    sec = flips_section(z, z)
    assert sec["count"] == 0 and sec["detectors"]["margin"]["auroc"] is None and sec["best_detector"] is None


# --------------------------------------------------------------------------- per class, shifts, gates

def test_per_class_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    fp32 = np.eye(3)[[0, 0, 1, 1, 2, 2]]
    int8 = np.eye(3)[[0, 0, 1, 0, 2, 2]]  # class 1 loses one of two
    sec = per_class(fp32, int8, labels, class_names=("a", "b", "c"))
    rows = {r["name"]: r for r in sec["classes"]}
    assert rows["b"]["fp32_top1"] == 1.0 and rows["b"]["int8_top1"] == 0.5 and rows["b"]["drop_pp"] == 50.0
    assert rows["a"]["drop_pp"] == 0.0 and rows["b"]["flips"] == 1
    assert sec["worst_class"]["name"] == "b"


def test_shifts_section_worst_groups_and_mean():
    labels = np.array([0, 1, 2, 0])
    clean = np.eye(3)[[0, 1, 2, 0]] * 5
    results = {
        ("test", "fog", 1): {"fp32": clean, "int8": clean},
        ("test", "fog", 2): {"fp32": clean, "int8": np.eye(3)[[0, 1, 2, 1]] * 5},  # one flip, -25 pp
        ("test", "zoom", 1): {"fp32": np.eye(3)[[1, 1, 2, 0]] * 5, "int8": np.eye(3)[[0, 2, 2, 0]] * 5},
        ("test", "zoom", 2): {"fp32": clean, "int8": clean},
    }
    sec = shifts_section(results, labels, ["fog", "zoom"], [1, 2])
    assert [tuple(r) for r in sec["records"]] == [RECORD_KEYS] * 4
    fog2 = sec["records"][1]
    assert fog2["drop_pp"] == pytest.approx(25.0) and fog2["agreement"] == pytest.approx(0.75)
    zoom1 = sec["records"][2]  # FP32 3/4, int8 3/4 -> no drop, but 2 of 4 flips
    assert zoom1["drop_pp"] == pytest.approx(0.0) and zoom1["agreement"] == pytest.approx(0.5)
    assert (sec["worst_by_int8_drop"]["corruption"], sec["worst_by_int8_drop"]["severity"]) == ("fog", 2)
    assert (sec["worst_by_flip_rate"]["corruption"], sec["worst_by_flip_rate"]["severity"]) == ("zoom", 1)
    assert sec["mean"]["drop_pp"] == pytest.approx(25.0 / 4)
    assert sec["mean"]["agreement"] == pytest.approx((1 + 0.75 + 0.5 + 1) / 4)


def test_gates_take_the_worst_group():
    labels = np.array([0, 0, 1, 1])
    z = np.eye(2)[[0, 0, 1, 1]] * 4
    q = np.eye(2)[[0, 0, 1, 0]] * 4
    sections = {"calibration_drift": calibration_drift(z, q, labels), "per_class": per_class(z, q, labels),
                "shifts": {"records": []}}
    g = gates(sections, ReliabilityConfig(max_ece_increase=1.0, max_worst_drop_pp=10.0))
    assert g["max_worst_drop_pp"].value == pytest.approx(50.0) and not g["max_worst_drop_pp"].passed
    assert g["max_worst_drop_pp"].details["group"] == "class 1"
    assert g["max_ece_increase"].passed
    assert g["max_ece_increase"].value == pytest.approx(sections["calibration_drift"]["delta"]["ece"])


def test_validation_indices_come_from_train_and_are_balanced():
    y = np.repeat(np.arange(4), 100)
    idx = validation_indices(y, 40, seed=0)
    assert len(set(idx.tolist())) == 40 and np.bincount(y[idx]).tolist() == [10, 10, 10, 10]
    np.testing.assert_array_equal(idx, validation_indices(y, 40, seed=0))
    with pytest.raises(UsageError):
        validation_indices(y, 401, seed=0)


def test_parse_corruptions():
    assert len(parse_corruptions("all")) >= 15
    assert parse_corruptions("none") == ()
    assert parse_corruptions("fog, zoom") == ("fog", "zoom")
    with pytest.raises(UsageError, match="did you mean fog"):
        parse_corruptions("fgo")


@pytest.mark.parametrize("sev, text", [((1, 2, 3, 4, 5), "severities 1 to 5"), ((1, 3, 5), "severities 1, 3 and 5"),
                                       ((2, 3), "severities 2 and 3"), ((4,), "severity 4")])
def test_the_page_names_the_severities_that_ran(sev, text):
    from pipeline.report.html import _severity_list
    assert _severity_list(sev) == text
