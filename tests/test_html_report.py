"""report.html: the reliability diagram's colours, round axis ticks, the FP32-vs-int8 confusion and flip
thumbnails, and both pages (export only; export + reliability) rendered in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from pipeline.report import html as hr
from pipeline.report.figures import confusion_and_flip_examples

SVG = "{http://www.w3.org/2000/svg}"


# --------------------------------------------------------------------------- reliability diagram

def test_reliability_diagram_colours_under_and_over_confident_bins_apart():
    # Bin 0.27-0.33 of the issue: accuracy 0.636 above mean confidence 0.307 is under-confident.
    bins = {"edges": [0.0, 0.27, 0.33, 0.8, 1.0], "count": [0, 11, 40, 200],
            "accuracy": [None, 0.636, 0.55, 0.97], "confidence": [None, 0.307, 0.70, 0.90]}
    root = ET.fromstring(hr.svg_reliability(bins, "FP32", hr.FP32_COLOR))
    gaps = [r for r in root.iter(f"{SVG}rect") if "gap" in r.get("class", "").split()]
    assert len(gaps) == 3  # the empty bin draws nothing
    for r in gaps:
        acc, conf = float(r.get("data-accuracy")), float(r.get("data-confidence"))
        under = acc > conf
        assert r.get("fill") == (hr.UNDER_COLOR if under else hr.OVER_COLOR)
        assert ("under" if under else "over") in r.get("class").split()
    assert hr.UNDER_COLOR != hr.OVER_COLOR
    first = next(r for r in gaps if float(r.get("data-accuracy")) == pytest.approx(0.636))
    assert first.get("fill") == hr.UNDER_COLOR
    # The legend names both colours, as the caption does.
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "under-confident" in texts and "over-confident" in texts


# --------------------------------------------------------------------------- ticks

@pytest.mark.parametrize("lo, hi, max_ticks", [
    (0, 0.493, 6), (0, 0.028, 5), (0.986, 1.0, 5), (-0.3, 0.55, 5), (0, 1, 6), (0, 1234, 6), (-0.0021, 0.004, 5),
    (0.5, 0.5, 5), (12.3, 987.6, 4),
])
def test_nice_ticks_are_round_1_2_5_steps_covering_the_range(lo, hi, max_ticks):
    t = hr.nice_ticks(lo, hi, max_ticks)
    assert 2 <= len(t) <= max_ticks
    assert t[0] <= lo + 1e-12 and t[-1] >= hi - 1e-12
    steps = np.diff(t)
    assert np.allclose(steps, steps[0], rtol=1e-9)
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6, (t, mantissa)
    for v in t:  # each tick is a whole multiple of the step
        assert abs(v / steps[0] - round(v / steps[0])) < 1e-6


def test_tick_labels_have_no_stray_digits():
    t = hr.nice_ticks(0, 0.028, 5)
    assert [hr.tick_label(v, t[1] - t[0], percent=True) for v in t] == ["0%", "1%", "2%", "3%"]
    t = hr.nice_ticks(0, 0.493, 6)
    assert [hr.tick_label(v, t[1] - t[0]) for v in t] == ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5"]
    t = hr.nice_ticks(0.986, 1.0, 5)
    assert [hr.tick_label(v, t[1] - t[0], percent=True) for v in t] == ["98.5%", "99.0%", "99.5%", "100.0%"]
    assert hr.tick_label(-0.0, 0.5, suffix=" pp") == "0.0 pp"


# --------------------------------------------------------------------------- confusion and flip thumbnails

def _logits(classes, conf, k=3):
    """Logits whose softmax puts probability ``conf`` on ``classes[i]`` and the rest evenly on the others."""
    out = np.zeros((len(classes), k))
    for i, (c, p) in enumerate(zip(classes, conf)):
        probs = np.full(k, (1 - p) / (k - 1))
        probs[c] = p
        out[i] = np.log(probs)
    return out


def test_confusion_and_flip_examples_hand_computed():
    labels = np.array([0, 1, 2, 1, 0])
    fp32 = _logits([0, 1, 2, 2, 0], [0.9, 0.6, 0.8, 0.5, 0.7])
    int8 = _logits([0, 2, 2, 1, 1], [0.9, 0.55, 0.8, 0.75, 0.4])
    x = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 1, 4, 4) * 3
    r = confusion_and_flip_examples(x, labels, fp32, int8, class_names=["cat", "dog", "eel"], k=2)
    c = r["confusion"]
    assert c["classes"] == 3 and c["names"] == ["cat", "dog", "eel"] and c["n"] == 5 and c["flips"] == 3
    assert c["fp32"] == [[2, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert c["int8"] == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert c["delta"] == [[-1, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert c["flips_matrix"] == [[0, 1, 0], [0, 0, 1], [0, 1, 0]]
    assert c["changed_cells"] == 2
    assert sorted((d["row"], d["col"], d["count"]) for d in c["top_delta"]) == [(0, 0, -1), (0, 1, 1)]
    # Flips: image 1 (dog -> eel, int8 0.55), 3 (eel -> dog, 0.75), 4 (cat -> dog, 0.4); the k=2 most confident.
    ex = r["flip_examples"]
    assert [e["index"] for e in ex] == [3, 1]
    assert ex[0]["label_name"] == "dog" and ex[0]["fp32"]["name"] == "eel" and ex[0]["int8"]["name"] == "dog"
    assert ex[0]["int8"]["confidence"] == pytest.approx(0.75, abs=1e-4)
    assert ex[0]["fp32"]["confidence"] == pytest.approx(0.5, abs=1e-4)
    from PIL import Image
    img = Image.open(io.BytesIO(base64.b64decode(ex[0]["png"])))
    assert img.format == "PNG" and img.size == (56, 56) and img.mode == "L"
    a = np.asarray(img)
    np.testing.assert_array_equal(a[::14, ::14], x[3, 0])  # nearest-neighbour upscale by 14
    # Without names: indices; float RGB images become RGB thumbnails.
    xf = np.random.default_rng(0).random((5, 3, 8, 8)).astype(np.float32)
    r = confusion_and_flip_examples(xf, labels, fp32, int8)
    assert r["confusion"]["names"] == ["0", "1", "2"] and len(r["flip_examples"]) == 3
    assert Image.open(io.BytesIO(base64.b64decode(r["flip_examples"][0]["png"]))).mode == "RGB"


def test_many_classes_keep_only_the_largest_cells():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 50, 300)
    f = rng.normal(size=(300, 50))
    q = f + rng.normal(scale=0.5, size=f.shape)
    r = confusion_and_flip_examples(np.zeros((300, 1, 4, 4), np.uint8), y, f, q, max_classes=32)
    c = r["confusion"]
    assert "delta" not in c and c["top_delta"] and c["matrices_omitted"]
    assert c["flips"] == int(np.sum(f.argmax(1) != q.argmax(1))) and len(r["flip_examples"]) == 8
    html = hr._confusion_html({}, c)
    assert "int8 − FP32" in html


# --------------------------------------------------------------------------- the page from a report dict

def _export_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_weights_missing_box_hostile_thumbnail_and_malformed_section(tiny_export):
    _, out = tiny_export
    rep = _export_report(out)
    rep["model"]["weights_missing"] = True
    rep["fp32_vs_int8"]["flip_examples"] = [{"index": 0, "png": "javascript:alert(1)", "fp32": {}, "int8": {}}]
    rep["quantization"]["ops"] = "not a dict"  # ignored
    rep["quantization"]["inputs"] = [{"quantization": {"scale": ["x"]}}]  # cannot be formatted
    page = hr.render(rep)
    assert "Built without --weights: random initialisation" in page
    assert "javascript:" not in page and "<script" not in page
    assert "could not be drawn" in page  # the malformed section is one line, not a crash
    assert 'id="gates"' in page or "id='gates'" in page


# --------------------------------------------------------------------------- pages in Chromium

from conftest import chromium_run as _chromium_run  # noqa: E402


def _check_page(html: Path, tmp: Path, ids: list[str], needles: list[str]) -> str:
    text = html.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert "<script" not in text and "<link" not in text
    dom = _chromium_run(html, tmp, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    for i in ids:
        assert re.search(rf"id=\"{re.escape(i)}\"", page), i
    for n in needles:
        assert n in page, n
    shot = tmp / "shot.png"
    r = _chromium_run(html, tmp, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}")
    assert r.returncode == 0 and shot.is_file()
    from PIL import Image
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "a blank or near-blank page"
    a = np.asarray(img)
    assert (a.min(axis=2) < 200).mean() > 0.03
    verdict_green = (a[..., 1] > 100) & (a[..., 0] < 80) & (a[..., 2] < 80)
    verdict_red = (a[..., 0] > 150) & (a[..., 1] < 90)
    assert max(verdict_green.sum(), verdict_red.sum()) > 20000  # the verdict banner is drawn
    return page


EXPORT_IDS = ["gates", "accuracy", "model", "quantization", "preprocessing", "calibration-set", "latency"]


def test_export_page_renders_in_chromium(tiny_export, tmp_path):
    status, out = tiny_export
    rep = _export_report(out)
    html = out / "report.html"
    assert html.is_file(), "every export writes report.html"
    assert rep["artifacts"]["report_html"]["path"] == "report.html"
    c = rep["fp32_vs_int8"]["confusion"]
    assert c["n"] == rep["accuracy"]["n"] and c["flips"] == rep["accuracy"]["flips"]
    a = rep["accuracy"]
    page = _check_page(html, tmp_path, EXPORT_IDS, [
        "PASS" if rep["passed"] else "FAIL", hr.pct(a["fp32_top1"]), hr.pct(a["int8_top1"]),
        "not device latency", "fp32_above_chance", "Preprocessing probe", "zero point", "CONV_2D"])
    assert page.index("PASS" if rep["passed"] else "FAIL") < page.index("Gates")
    for k in rep["gates"]:
        assert f"<code>{k}</code>" in page, k
    assert "calibration_drift" not in rep and 'id="shifts"' not in page
    assert page.count("data:image/png;base64,") == min(8, c["flips"])


@pytest.fixture(scope="module")
def reliability_page(tiny_export, tmp_path_factory):
    """The tiny export's report plus reliability sections computed in-process (one small corruption suite)."""
    from pipeline.inputs import data as data_mod
    from pipeline.reliability.engine import ModelPair
    from pipeline.inputs.preprocessing import Preprocessing
    from pipeline.reliability.suite import ReliabilityConfig, evaluate
    _, out = tiny_export
    rep = _export_report(out)
    pre = Preprocessing.from_dict(rep["preprocessing"])
    pair = ModelPair(model_spec=rep["model"]["spec"], weights=rep["config"]["weights"],
                     tflite_path=str(out / rep["artifacts"]["tflite"]["path"]),
                     input_layout=rep["preprocessing"]["tflite_input_layout"], kernels="xnnpack", preprocessing=pre)
    ds = data_mod.load(rep["config"]["data"], None, pre.input_shape)
    res = evaluate(pair, ds, len(ds.x_test), ReliabilityConfig(corruptions=("fog", "gaussian_noise"),
                                                                severities=(1, 3), val_size=100, workers=1))
    rep.update(res.sections)
    rep["gates"].update({k: g.to_dict() for k, g in res.gates.items()})
    rep["passed"] = all(g["passed"] for g in rep["gates"].values())
    html = tmp_path_factory.mktemp("reliability_page") / "report.html"
    hr.write(rep, html)
    return rep, html


def test_reliability_page_renders_in_chromium(reliability_page, tmp_path):
    rep, html = reliability_page
    cd, sh = rep["calibration_drift"], rep["shifts"]
    page = _check_page(html, tmp_path, EXPORT_IDS + ["calibration", "temperature", "flips", "shifts", "per-class"], [
        hr.num(cd["fp32"]["ece"]), hr.num(cd["int8"]["ece"]), "int8 top-1 drop (pp)", "agreement",
        "under-confident", "over-confident", sh["worst_by_int8_drop"]["corruption"]])
    # 2 reliability diagrams + histogram + 3 charts per corruption, plus the file-size chart.
    assert page.count("<svg") >= 3 + 3 * len(sh["corruptions"]) + 1
    # The shift charts plot differences, not the two accuracies: no "top-1 accuracy" panel is left.
    assert "top-1 accuracy</text>" not in page
    # Every gap box of the two diagrams is coloured by its side of the diagonal.
    for m in re.finditer(r'<rect class="gap (under|over)" data-accuracy="([\d.]+)" data-confidence="([\d.]+)"[^>]*'
                         r'fill="(#[0-9a-f]{6})"', page):
        kind, acc, conf, fill = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)
        assert (kind == "under") == (acc > conf)
        assert fill == (hr.UNDER_COLOR if kind == "under" else hr.OVER_COLOR)
