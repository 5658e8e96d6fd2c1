"""``python -m pipeline.study robust``: its metrics against hand computations, and the quick preset end to end on
real LiteRT kernels."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.studies import robust


def test_flips_per_10k_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.2, 0.1]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.3, 0.1]])
    assert robust.flips_per_10k(a, b) == 5000.0  # 2 of 4 top-1s differ
    assert robust.top1(a, np.array([0, 1, 1, 0])) == 0.75


def test_training_key_follows_the_training_config_only():
    c = {"model": "zoo:refcnn", "options": {"qat": True}, "epochs": 1, "train_limit": 10, "lr": 1e-3,
         "train_threads": 2, "eval_limit": 100, "out": "a"}
    k = robust.training_key(c, 0)
    assert robust.training_key({**c, "eval_limit": 5, "out": "b"}, 0) == k  # evaluation does not retrain
    assert robust.training_key({**c, "options": {"satnl": True}}, 0) != k
    assert robust.training_key(c, 1) != k
    assert robust.training_key({**c, "train_threads": 1}, 0) != k  # the thread count changes the sums


def _row(variant, int8_flips, shifted, w4a4_drop):
    return {"model": "zoo:m", "variant": variant, "precisions": {"int8": {"flips_per_10k": int8_flips}},
            "shifts": {"shifted_mean_flips_per_10k": shifted},
            "simulated": {"W8A8": {"drop_pp": 0.1}, "W4A4": {"drop_pp": w4a4_drop}}}


def test_claim_verdicts():
    rows = [_row("standard", 50, 80, 10.0), _row("qat", 20, 30, 2.0), _row("symreg", 60, 90, 12.0),
            _row("satnl", 40, 90, 5.0)]
    got = {c["variant"]: c for c in robust.checks(rows)}
    assert got["qat"]["verdict"] == "holds"
    assert got["symreg"]["verdict"] == "does not hold"
    assert got["satnl"]["verdict"] == "mixed"
    assert got["qat"]["evidence_standard_vs_variant"]["W4A4_drop_pp"] == [10.0, 2.0]  # the lowest bit width


def test_quick_options_and_unknown_variant():
    from pipeline.errors import UsageError
    args = SimpleNamespace(quick=True, variants=None, epochs=None, train_limit=None, eval_limit=None, precisions=None,
                           settings=None, shift_limit=None, corruptions=None, models=None)
    o = robust._options(args)
    assert o["variants"] == ["standard", "qat"] and o["settings"] == ["W8A8", "W4A4"] and o["eval_limit"] == 1000
    with pytest.raises(UsageError):
        robust._options(SimpleNamespace(**{**vars(args), "variants": "standard,adversarial"}))


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    from pipeline.study import main
    out = tmp_path / "robust"
    rc = main(["robust", "--quick", "--out", str(out), "--workers", "1"])
    assert rc == 0
    study = json.loads((out / "study.json").read_text())
    assert [(r["model"], r["variant"]) for r in study["rows"]] == [("zoo:refcnn", "standard"), ("zoo:refcnn", "qat")]
    for r in study["rows"]:
        assert r["evaluated"] == 1000 and r["training"]["trained_on"] == 1000
        assert r["training"]["fp32_test_top1"] > 0.85  # fine-tuned from the shipped 92.4%
        int8 = r["precisions"]["int8"]
        # an independent count from the export's own predictions
        z = np.load(out / "exports" / f"refcnn-{r['variant']}" / "tflite-int8" / "predictions.npz",
                    allow_pickle=False)
        flips = int(np.sum(z["fp32_logits"].argmax(1) != z["int8_logits"].argmax(1)))
        assert int8["flips_per_10k"] == pytest.approx(10.0 * flips)
        assert int8["top1"] == pytest.approx(float(np.mean(z["int8_logits"].argmax(1) == z["labels"])))
        # the simulator at W8A8 is the int8 model; W4A4 is far coarser
        assert r["simulated"]["W8A8"]["flips_per_10k"] < 200
        assert r["simulated"]["W4A4"]["flips_per_10k"] > r["simulated"]["W8A8"]["flips_per_10k"]
        sh = r["shifts"]
        assert sh["images"] == 300 and set(sh["corruptions"]) == {"gaussian_noise", "contrast", "rotate"}
        assert sh["shifted_mean_flips_per_10k"] == pytest.approx(
            np.mean([v["flips_per_10k"] for v in sh["corruptions"].values()]))
        assert list((out / "weights").glob(f"refcnn-{r['variant']}-*/refcnn.pt"))
    qat = study["rows"][1]
    assert qat["training"]["qat_points"] == 8
    assert study["paper"]["hu2022_rq2"]["rows"][0]["shifted_mean_flips"] == 7.7
    md = (out / "study.md").read_text()
    assert "Hu et al." in md and "Differences from the papers' settings" in md
    assert "<svg" in (out / "study.html").read_text()
