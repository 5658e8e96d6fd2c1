"""The FP32 sanity gate and the preprocessing probe, on a trained zoo model and on real Fashion-MNIST images."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.inputs import models

from pipeline.inputs import preprocessing

from pipeline.reliability import sanity
def test_near_chance_limit_follows_the_documented_rule():
    assert sanity.near_chance_limit(0.1) == pytest.approx(0.2)  # 10 balanced classes: twice chance
    assert sanity.near_chance_limit(0.5) == pytest.approx(0.625)  # 2 classes: a quarter of the way to 100%
    assert sanity.near_chance_limit(0.001) == pytest.approx(0.002)
    assert sanity.chance_level(np.array([0, 0, 0, 1])) == 0.75  # the majority class, not 1/classes


@pytest.fixture(scope="module")
def refcnn_setup(fmnist):
    model = models.load("zoo:refcnn")
    pre = preprocessing.Preprocessing(input_shape=(1, 28, 28), source_layout="NHW", source_dtype="uint8",
                                      scale=1 / 255, mean=tuple(model.mean), std=tuple(model.std))
    return model, pre, fmnist


def _run(model):
    return lambda x: models.run_fp32(model, x, batch_size=256)


def test_probe_finds_the_models_own_normalisation_when_the_one_in_use_is_wrong(refcnn_setup):
    model, pre, ds = refcnn_setup
    wrong = dataclasses.replace(pre, mean=(0.9,), std=(0.05,))
    rec = sanity.probe(_run(model), ds.x_test, ds.y_test, wrong, model.mean, model.std, n=400)
    by = {r["name"]: r for r in rec["candidates"]}
    assert by["in use"]["top1"] < 0.3 and by["the model's own record"]["top1"] > 0.85
    assert rec["better"]["name"] == "the model's own record" and rec["better"]["gain_pp"] > 50
    gate = sanity.fp32_gate(by["in use"]["top1"], ds.y_test[:400], rec, weights_missing=False)
    assert not gate.passed and "--mean 0.286 --std 0.353" in gate.reason


def test_probe_is_silent_and_the_gate_passes_for_a_correct_record(refcnn_setup):
    model, pre, ds = refcnn_setup
    rec = sanity.probe(_run(model), ds.x_test, ds.y_test, pre, model.mean, model.std,
                       train_stats=sanity.train_statistics(ds.x_train, pre.scale), n=400)
    assert rec["better"] is None  # the training split's own statistics are the model's record, within 5 pp
    top1 = rec["candidates"][0]["top1"]
    assert sanity.fp32_gate(top1, ds.y_test[:400], rec, weights_missing=False).passed


def test_an_untrained_model_fails_the_gate_naming_the_missing_weights(fmnist):
    import torch

    from pipeline.zoo import get_entry
    torch.manual_seed(0)
    untrained = models.LoadedModel(spec="x:y", kind="factory", module=get_entry("refcnn").factory().eval())
    pre = preprocessing.Preprocessing(input_shape=(1, 28, 28), source_layout="NHW", source_dtype="uint8",
                                      scale=1 / 255, mean=(0.0,), std=(1.0,))
    x = preprocessing.apply(fmnist.x_test[:1000], pre)
    top1 = float(np.mean(np.argmax(models.run_fp32(untrained, x), 1) == fmnist.y_test[:1000]))
    gate = sanity.fp32_gate(top1, fmnist.y_test[:1000], None, weights_missing=True)
    assert not gate.passed and "without --weights" in gate.reason


def test_an_export_without_weights_fails_the_sanity_gate_and_says_why(tmp_path):
    """A factory built without --weights: the zoo's reference CNN architecture, randomly initialised (seeded, so
    the untrained model is the same on every host), on Fashion-MNIST."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    (tmp_path / "untrained.py").write_text("import torch\n\ndef refcnn():\n    from pipeline.zoo import get_entry\n"
                                           "    torch.manual_seed(0)\n    return get_entry('refcnn').factory()\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "pipeline.export", "--model", "untrained:refcnn", "--eval-limit", "500",
                        "--calib-size", "100", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 1, p.stderr
    assert "FAIL (fp32_above_chance)" in p.stdout and "built without --weights" in p.stdout
    assert "WARNING    the factory was built without --weights" in p.stdout
    rep = json.loads((out / "report.json").read_text())
    gate = rep["gates"]["fp32_above_chance"]
    assert not gate["passed"] and gate["value"] <= gate["limit"] and list(rep["gates"])[0] == "fp32_above_chance"
    assert rep["model"]["weights_missing"] is True and rep["passed"] is False


def test_a_wrong_normalisation_fails_and_the_probe_names_the_right_one(tmp_path):
    """zoo:refcnn was trained with mean 0.286 / std 0.353; fed raw [0,1] inputs it is near chance on Fashion-MNIST."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "pipeline.export", "--mean", "0", "--std", "1", "--eval-limit", "500",
                        "--calib-size", "100", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 1, p.stderr
    assert "FAIL (fp32_above_chance)" in p.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["preprocessing_probe"]["better"]["name"] == "the model's own record"
    assert "try --mean 0.286 --std 0.353" in rep["gates"]["fp32_above_chance"]["reason"]
    assert rep["model"]["weights_missing"] is False


def test_a_correct_export_passes_the_sanity_gate(tiny_export):
    import json
    status, out = tiny_export
    rep = json.loads((out / "report.json").read_text())
    assert status == 0 and rep["gates"]["fp32_above_chance"]["passed"] and rep["preprocessing_probe"]["better"] is None
    assert rep["warnings"] == []


def test_train_statistics_in_chunks_equal_the_whole_sets():
    """Summed over chunks of 64 images (memory), the per-channel mean and std are numpy's over the whole set."""
    x = np.random.default_rng(0).integers(0, 256, (300, 3, 20, 20)).astype(np.uint8)
    m, s = sanity.train_statistics(x, 1 / 255, limit=250)
    whole = x[:250].astype(np.float64) / 255
    np.testing.assert_allclose(m, whole.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(s, whole.std(axis=(0, 2, 3)), rtol=1e-9)


def test_the_probe_runs_fewer_images_for_large_inputs():
    assert sanity.probe_images(28 * 28) == sanity.probe_images(3 * 64 * 64) == sanity.PROBE_IMAGES
    assert sanity.probe_images(3 * 224 * 224) == sanity.PROBE_IMAGES_LARGE < sanity.probe_images(3 * 96 * 96)
