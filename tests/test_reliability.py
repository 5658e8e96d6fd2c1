"""The reliability report end to end on the tiny seeded model: engine, shifts, CLIs, HTML in Chromium."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.reliability import confidence as cm
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("calibration_drift", "temperature_scaling", "flips", "per_class", "shifts", "reliability")
SMALL_SUITE = ["--corruptions", "gaussian_noise,contrast,rotate", "--severities", "1,5", "--val-size", "200",
               "--workers", "1"]


def _pair_and_data(out: Path):
    from pipeline.inputs import data as data_mod
    from pipeline.reliability.engine import ModelPair
    from pipeline.inputs.preprocessing import Preprocessing
    rep = json.loads((out / "report.json").read_text())
    pre = Preprocessing.from_dict(rep["preprocessing"])
    pair = ModelPair(model_spec=rep["model"]["spec"], weights=rep["config"]["weights"],
                     tflite_path=str(out / rep["artifacts"]["tflite"]["path"]),
                     input_layout=rep["preprocessing"]["tflite_input_layout"], kernels="xnnpack", preprocessing=pre)
    ds = data_mod.load(rep["config"]["data"], None, pre.input_shape)
    return rep, pair, ds


@pytest.fixture(scope="module")
def exported(tiny_export):
    status, out = tiny_export
    assert status == 0
    return out


def test_engine_reproduces_the_export_run_stage(exported):
    """The engine's per-worker interpreters (1 thread) give the run stage's int8 outputs (4 threads) exactly."""
    from pipeline.reliability.engine import Engine, clean_jobs
    rep, pair, ds = _pair_and_data(exported)
    n = len(ds.x_test)
    with Engine(pair, {"test": ds.x_test}, workers=1) as engine:
        got = engine.run(clean_jobs("test", n))[("test", None, 0)]
    with np.load(exported / "predictions.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(got["int8_raw"], z["int8_raw"])
        np.testing.assert_array_equal(got["int8"], z["int8_logits"])
        np.testing.assert_array_equal(np.argmax(got["fp32"], 1), np.argmax(z["fp32_logits"], 1))
        # Same PyTorch model, same inputs: FP32 differences stay far below one int8 output step.
        step = rep["quantization"]["outputs"][0]["quantization"]["scale"][0]
        assert np.abs(got["fp32"] - z["fp32_logits"]).max() < 0.01 * step


def test_shift_records_match_an_independent_run(exported):
    """Each shifted set is generated once and fed to both models: re-running each model alone on the
    same generated inputs gives the record's numbers."""
    from pipeline.inputs import models
    from pipeline.reliability.engine import Job, make_inputs
    from pipeline.reliability.suite import ReliabilityConfig, evaluate
    from pipeline.runtime.litert import TfliteRunner
    rep, pair, ds = _pair_and_data(exported)
    cfg = ReliabilityConfig(corruptions=("gaussian_noise", "rotate"), severities=(2, 5), val_size=100, workers=1)
    res = evaluate(pair, ds, len(ds.x_test), cfg)
    recs = res.sections["shifts"]["records"]
    assert [(r["corruption"], r["severity"]) for r in recs] == [("gaussian_noise", 2), ("gaussian_noise", 5),
                                                              ("rotate", 2), ("rotate", 5)]
    model = models.load(pair.model_spec, pair.weights)
    runner = TfliteRunner(Path(pair.tflite_path), kernels="xnnpack", threads=2, input_layout=pair.input_layout)
    y = ds.y_test
    for r in recs:
        x = np.concatenate([make_inputs(ds.x_test, Job("test", s, min(s + 1000, len(y)), r["corruption"], r["severity"]),
                                        pair.preprocessing) for s in range(0, len(y), 1000)])
        f = models.run_fp32(model, x)
        q = runner.run(x).outputs
        assert r["fp32_top1"] == pytest.approx(cm.top1(f, y), abs=0)
        assert r["int8_top1"] == pytest.approx(cm.top1(q, y), abs=0)
        assert r["agreement"] == pytest.approx(float(np.mean(f.argmax(1) == q.argmax(1))), abs=0)
        assert r["int8_ece"] == pytest.approx(cm.ece(cm.softmax(q), y), abs=1e-12)
    # Severity 5 rotations move the images: the shifted set is not the clean one.
    clean = res.sections["shifts"]["clean"]
    rot5 = recs[3]
    assert rot5["fp32_top1"] < clean["fp32_top1"]
    for key in ("calibration_drift", "temperature_scaling", "flips", "per_class"):
        assert key in res.sections
    assert set(res.gates) == {"max_ece_increase", "max_worst_drop_pp"}


def test_shifted_inputs_are_deterministic_and_block_seeded(exported):
    from pipeline.reliability.engine import Job, make_inputs
    _, pair, ds = _pair_and_data(exported)
    a = make_inputs(ds.x_test, Job("test", 0, 100, "gaussian_noise", 3, seed=0), pair.preprocessing)
    b = make_inputs(ds.x_test, Job("test", 0, 100, "gaussian_noise", 3, seed=0), pair.preprocessing)
    c = make_inputs(ds.x_test, Job("test", 0, 100, "gaussian_noise", 3, seed=1), pair.preprocessing)
    clean = make_inputs(ds.x_test, Job("test", 0, 100), pair.preprocessing)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, clean)
    assert a.shape == clean.shape and a.dtype == np.float32


@pytest.mark.slow
def test_engine_workers_agree(exported):
    """Two worker processes give exactly what one in-process worker gives, on shifted sets."""
    from pipeline.reliability.engine import Engine, shift_jobs
    _, pair, ds = _pair_and_data(exported)
    jobs = shift_jobs("test", len(ds.x_test), ["fog", "jpeg"], [1, 4], seed=0)
    with Engine(pair, {"test": ds.x_test}, workers=1) as e1:
        one = e1.run(jobs)
    with Engine(pair, {"test": ds.x_test}, workers=2) as e2:
        two = e2.run(jobs)
    assert set(one) == set(two)
    for k in one:
        np.testing.assert_array_equal(one[k]["int8_raw"], two[k]["int8_raw"])
        np.testing.assert_array_equal(one[k]["fp32"], two[k]["fp32"])


# --------------------------------------------------------------------------- pipeline.evaluate CLI

def _cli(args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def own_model(tinynet_dir, tiny_npz):
    """The tiny export's factory is named on the command line: evaluate never imports what a report names."""
    return ["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz)]


@pytest.fixture(scope="module")
def evaluated(exported, tinynet_dir, tmp_path_factory, own_model):
    out = tmp_path_factory.mktemp("evaluated")
    before = (exported / "report.json").read_bytes()
    proc = _cli([str(exported), "--out", str(out), *own_model, *SMALL_SUITE], cwd=tinynet_dir)
    assert proc.returncode in (0, 1), proc.stderr
    assert (exported / "report.json").read_bytes() == before, "--out must leave the export folder untouched"
    return proc, out


def test_evaluate_cli_writes_every_section(evaluated):
    proc, out = evaluated
    rep = json.loads((out / "report.json").read_text())
    for key in SECTIONS:
        assert key in rep, key
    cd = rep["calibration_drift"]
    assert set(cd["fp32"]) == {"top1", "ece", "ace", "mce", "nll", "brier"}
    assert cd["delta"]["ece"] == pytest.approx(cd["int8"]["ece"] - cd["fp32"]["ece"])
    sh = rep["shifts"]
    assert len(sh["records"]) == 3 * 2
    assert all(set(r) == {"corruption", "severity", "fp32_top1", "int8_top1", "drop_pp", "agreement", "fp32_ece",
                          "int8_ece"} for r in sh["records"])
    assert {"worst_by_int8_drop", "worst_by_flip_rate", "mean"} <= set(sh)
    ts = rep["temperature_scaling"]
    assert ts["validation"]["split"] == "train" and ts["validation"]["size"] == 200
    assert ts["fp32"]["temperature"] > 0 and ts["int8"]["temperature"] > 0
    assert {"max_ece_increase", "max_worst_drop_pp", "max_drop_pp", "min_agreement"} <= set(rep["gates"])
    assert rep["passed"] == all(g["passed"] for g in rep["gates"].values())
    assert proc.returncode == (0 if rep["passed"] else 1)
    assert "report.html" in proc.stdout and "Traceback" not in proc.stderr
    # The clean-test logits come from the export's predictions.npz, so the sections agree with it.
    assert "predictions.npz" in rep["reliability"]["clean_outputs"]
    assert rep["calibration_drift"]["int8"]["top1"] == pytest.approx(rep["accuracy"]["int8_top1"])


def test_evaluate_gate_failure_exits_1(exported, tinynet_dir, tmp_path, own_model):
    proc = _cli([str(exported), "--out", str(tmp_path), *own_model, "--corruptions", "none", "--val-size", "100",
                 "--workers", "1", "--max-worst-drop-pp", "-1"], cwd=tinynet_dir)
    assert proc.returncode == 1, proc.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["gates"]["max_worst_drop_pp"]["passed"] is False and rep["passed"] is False
    assert rep["shifts"]["records"] == []
    assert "FAIL (max_worst_drop_pp)" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/export"], "is not a folder"),
    (["{export}", "--corruptions", "gausian_noise"], "did you mean gaussian_noise"),
    (["{export}", "--severities", "0,6"], "severities must be"),
    (["{export}", "--val-size", "0"], "--val-size"),
    (["{export}", "--tflite", "/nonexistent/model.tflite"], "does not exist"),
    (["{empty}"], "report.json does not exist"),
])
def test_evaluate_cli_bad_input(exported, tmp_path, args, message, own_model, tinynet_dir):
    args = [a.replace("{export}", str(exported)).replace("{empty}", str(tmp_path)) for a in args]
    proc = _cli(args + own_model + ["--out", str(tmp_path / "o")], cwd=tinynet_dir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "o" / "report.json").exists()


# --------------------------------------------------------------------------- export --reliability

@pytest.mark.slow
def test_export_reliability_flag(tinynet_dir, tiny_npz, tmp_path, in_dir):
    from pipeline.export import main
    in_dir(tinynet_dir)
    out = tmp_path / "out"
    status = main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz),
                   "--calib-size", "100", "--out", str(out), "--reliability", *SMALL_SUITE])
    rep = json.loads((out / "report.json").read_text())
    assert status == (0 if rep["passed"] else 1)
    for key in SECTIONS:
        assert key in rep, key
    assert {"max_ece_increase", "max_worst_drop_pp"} <= set(rep["gates"])
    assert (out / "report.html").is_file() and rep["artifacts"]["report_html"]["path"] == "report.html"
    assert "report.html" not in [p.name for p in tmp_path.iterdir()]  # nothing outside the output folder
    with np.load(out / "predictions.npz", allow_pickle=False) as z:
        assert rep["flips"]["count"] == int(np.sum(z["fp32_logits"].argmax(1) != z["int8_logits"].argmax(1)))


def test_export_reliability_bad_corruption_fails_before_converting(tmp_path):
    from pipeline.export import main
    out = tmp_path / "out"
    assert main(["--reliability", "--corruptions", "fgo", "--out", str(out)]) == 2
    assert not out.exists()


# --------------------------------------------------------------------------- report.html in Chromium

from conftest import chromium_run as _chromium_run  # noqa: E402


@pytest.mark.slow
def test_report_html_renders_in_chromium(evaluated, tmp_path):
    from pipeline.report.html import num, pct
    _, out = evaluated
    html = out / "report.html"
    rep = json.loads((out / "report.json").read_text())
    text = html.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert "<script" not in text and "<link" not in text
    dom = _chromium_run(html, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert page.count("<svg") >= 3 + 3 * 3  # 2 reliability diagrams + histogram + 3 charts per corruption
    cd, ts, sh = rep["calibration_drift"], rep["temperature_scaling"], rep["shifts"]
    verdict = "PASS" if rep["passed"] else "FAIL"
    assert page.index(verdict) < page.index("Calibration:")  # the verdict comes first
    for needle in (pct(cd["fp32"]["top1"]), pct(cd["int8"]["top1"]), num(cd["fp32"]["ece"]), num(cd["int8"]["ece"]),
                   num(ts["fp32"]["temperature"], 3), num(ts["int8"]["temperature"], 3),
                   f"{rep['flips']['count']} / {rep['flips']['n']}", sh["worst_by_int8_drop"]["corruption"],
                   rep["per_class"]["worst_class"]["name"], "Temperature scaling", "Per class"):
        assert needle in page, needle
    shot = tmp_path / "shot.png"
    r = _chromium_run(html, tmp_path, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}")
    assert r.returncode == 0 and shot.is_file()
    from PIL import Image
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    # Rendered content, not a blank page: the verdict banner's colour and plenty of non-background pixels.
    banner = (img[..., 0] > 150) & (img[..., 1] < 90) if verdict == "FAIL" else (img[..., 1] > 100) & (img[..., 0] < 80)
    assert banner.sum() > 20000
    assert (img.min(axis=2) < 200).mean() > 0.05


# --------------------------------------------------------------------------- wording

def test_temperature_reading_explains_both_directions():
    from pipeline.reliability.suite import TEMPERATURE_MEANING, temperature_reading
    over, under, one = temperature_reading(1.8), temperature_reading(0.65), temperature_reading(1.01)
    assert "> 1" in over and "over-confident" in over and "softens" in over
    assert "< 1" in under and "under-confident" in under and "sharpens" in under
    assert "close to 1" in one
    assert "T > 1" in TEMPERATURE_MEANING and "T < 1" in TEMPERATURE_MEANING and "sharpens" in TEMPERATURE_MEANING


def test_change_phrase_has_no_double_negative():
    from pipeline.reliability.suite import change_phrase
    assert change_phrase(0.38) == "the int8 model loses 0.38 pp"
    assert change_phrase(-0.38) == "the int8 model gains 0.38 pp"
    assert change_phrase(-0.001).endswith("matches FP32 (0.00 pp)")
    assert "-" not in change_phrase(-5.0)


def test_evaluate_report_carries_the_readings(evaluated):
    _, out = evaluated
    rep = json.loads((out / "report.json").read_text())
    ts, sh = rep["temperature_scaling"], rep["shifts"]
    for side in ("fp32", "int8"):
        t = ts[side]["temperature"]
        assert ts[side]["reading"].startswith(f"T = {t:.3g}")
        assert ("under-confident" in ts[side]["reading"]) == (t < 0.95)
    assert "T < 1" in ts["meaning"]
    assert ("gains" in sh["mean_change"]) == (sh["mean"]["drop_pp"] < -0.005)
    assert "-" not in sh["mean_change"].split("pp")[0]


# --------------------------------------------------------------------------- the temperature on held-out images

def _train_record(weights: Path, ds, indices, **over) -> Path:
    """A training record as pipeline.train writes it beside NAME.pt (the fields held_out_split reads)."""
    from pipeline.jsonio import sha256_file
    rec = {"dataset": ds.describe(), "holdout": {"n": len(indices), "seed": 0, "indices": list(indices)},
           "weights_sha256": sha256_file(weights), **over}
    path = weights.with_suffix(".json")
    path.write_text(json.dumps(rec))
    return path


def test_held_out_split_is_read_only_from_a_record_of_these_weights_and_this_data(tmp_path, tinynet_dir, tiny_npz):
    import shutil

    from pipeline.inputs import data as data_mod
    from pipeline.reliability.suite import held_out_split
    ds = data_mod.load(str(tiny_npz), None, (1, 12, 12))
    w = tmp_path / "tinynet.pt"
    shutil.copy(tinynet_dir / "tinynet.pt", w)
    assert held_out_split(str(w), ds) == (None, "")  # no record beside the weights: nothing to say
    _train_record(w, ds, [7, 3, 50])
    idx, why = held_out_split(str(w), ds)
    assert idx.tolist() == [3, 7, 50] and "3 training images tinynet.json records as held out" in why
    _train_record(w, ds, [7, 3, 50], weights_sha256="0" * 64)  # the weights were retrained after the record
    assert held_out_split(str(w), ds)[0] is None and "does not describe these weights" in held_out_split(str(w), ds)[1]
    _train_record(w, ds, [7, 3, len(ds.y_train)])  # an index outside the training split
    assert held_out_split(str(w), ds)[0] is None
    _train_record(w, ds, [7, 3], dataset={"name": "fashion-mnist", "train_size": 60000})
    assert "not this" in held_out_split(str(w), ds)[1]
    w.with_suffix(".json").write_text("{not json")
    assert held_out_split(str(w), ds)[0] is None


def test_evaluate_fits_the_temperature_on_the_held_out_images(exported, tinynet_dir, tiny_npz, tmp_path):
    """Weights with a pipeline.train record naming held-out images: the temperature split is those images, by
    default, and the report says the model never trained on them."""
    import shutil

    from pipeline.inputs import data as data_mod
    ds = data_mod.load(str(tiny_npz), None, (1, 12, 12))
    w = tmp_path / "w" / "tinynet.pt"
    w.parent.mkdir()
    shutil.copy(tinynet_dir / "tinynet.pt", w)
    held = list(range(0, 400, 3))  # 134 images
    _train_record(w, ds, held)
    proc = _cli([str(exported), "--out", str(tmp_path / "o"), "--model", "tinynet:tinynet", "--weights", str(w),
                 "--data", str(tiny_npz), "--corruptions", "none", "--workers", "1"], cwd=tinynet_dir)
    assert proc.returncode in (0, 1), proc.stderr
    v = json.loads((tmp_path / "o" / "report.json").read_text())["temperature_scaling"]["validation"]
    assert v["held_out_from_training"] is True and v["size"] == len(held), v
    assert "never trained on" in v["selection"] and "tinynet.json" in v["selection"]
