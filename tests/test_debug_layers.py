"""pipeline.debug.layers on real LiteRT kernels: the tiny factory model exported once to int8 and to fp32 from
one ONNX by the onnx2tf route (one multi-target export, converted in this process), compared layer by layer."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

SAMPLES = 64


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tinynet_dir, tiny_npz):
    """(int8 .tflite, fp32 .tflite, model.onnx, preprocessed test inputs N,C,H,W) from one export call."""
    from pipeline.export import build_parser, config_from_args, export_targets
    out = tmp_path_factory.mktemp("layers") / "out"
    argv = ["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz),
            "--calib-size", "100", "--target", "tflite-int8,tflite-fp32", "--converter", "onnx2tf",
            "--out", str(out)]
    with contextlib.chdir(tinynet_dir):
        cfg = dataclasses.replace(config_from_args(build_parser().parse_args(argv)), convert_in="process")
        status, root, rows = export_targets(cfg, ["tflite-int8", "tflite-fp32"], log=lambda *a, **k: None)
    assert status == 0, rows
    a, b = root / "tflite-int8", root / "tflite-fp32"
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    rec = json.loads((a / "bundle" / "preprocessing.json").read_text())
    raw = np.load(tiny_npz)["x_test"][:, None].astype(np.float32)
    x = ((raw * rec["scale"] - np.float32(rec["mean"][0])) / np.float32(rec["std"][0])).astype(np.float32)
    return a / "model_int8.tflite", b / "model_fp32.tflite", a / "model.onnx", x


@pytest.fixture(scope="module")
def result(pair):
    from pipeline.debug.layers import layer_errors
    return layer_errors(*pair, samples=SAMPLES)


def _interp(path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    return Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                       experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


def _tensor_after_invoke(path, x_nhwc, name):
    """A fresh interpreter at the batch of ``x_nhwc``; the named tensor after one invoke, and its details."""
    from pipeline.runtime.litert import quantize
    it = _interp(path)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x_nhwc.shape), strict=True)
    it.allocate_tensors()
    x = x_nhwc
    if inp["dtype"] == np.int8:
        x = quantize(x_nhwc, *inp["quantization"], np.int8)
    it.set_tensor(inp["index"], np.ascontiguousarray(x, dtype=inp["dtype"]))
    it.invoke()
    d = next(t for t in it.get_tensor_details() if t["name"] == name)
    return it.get_tensor(d["index"]), d


def test_every_activation_is_compared_and_named_by_onnx(result):
    d = result.describe()
    json.dumps(d, allow_nan=False)  # JSON-safe
    ops = [r["op"] for r in d["rows"]]
    assert ops[0] == "INPUT" and ops.count("CONV_2D") == 2 and "FULLY_CONNECTED" in ops
    assert [r["index"] for r in d["rows"]] == sorted(r["index"] for r in d["rows"])
    convs = [r for r in d["rows"] if r["op"] == "CONV_2D"]
    assert [(r["layer"], r["layer_op"]) for r in convs] == [("/0/Conv", "Conv"), ("/4/Conv", "Conv")]
    assert all(r["onnx_node"] for r in d["rows"]) and d["counts"]["not_onnx_named"] == 0
    assert d["counts"]["unmatched"]["constant"] > 0  # weights and biases, counted, not compared
    assert d["samples"] == SAMPLES and "preserve_all_tensors" in d["kernels"]
    assert "by name" in d["notes"]["unmatched"]
    for r in d["rows"]:
        assert -99 <= r["sqnr_db"] <= 99 and r["rmse_steps"] >= 0 and 0 <= r["clip_share"] <= 1
    assert d["rows"][0]["growth_db"] is None and all(r["growth_db"] is not None for r in d["rows"][1:])
    assert all(r["sqnr_db"] > 20 for r in d["rows"])  # a well-calibrated model


def test_numbers_equal_a_hand_computation_on_fresh_interpreters(pair, result):
    int8_path, fp32_path, _, x = pair
    row = [r for r in result.rows if r.op == "CONV_2D"][1]
    x_nhwc = np.transpose(x[:SAMPLES], (0, 2, 3, 1))
    q, dq = _tensor_after_invoke(int8_path, x_nhwc, row.tflite_name)
    f, _ = _tensor_after_invoke(fp32_path, x_nhwc, row.tflite_name)
    scale, zp = dq["quantization"]
    f = f.astype(np.float64)
    deq = (q.astype(np.float64) - zp) * np.float64(np.float32(scale))
    err = f - deq
    sqnr = 10 * math.log10(np.sum(f ** 2) / np.sum(err ** 2))
    rmse_steps = math.sqrt(np.mean(err ** 2)) / scale
    clip = np.mean((f < (-128 - zp) * scale) | (f > (127 - zp) * scale))
    assert (row.scale, row.zero_point) == (pytest.approx(scale), zp)
    assert row.sqnr_db == pytest.approx(sqnr, rel=1e-6)
    assert row.rmse_steps == pytest.approx(rmse_steps, rel=1e-6)
    assert row.clip_share == pytest.approx(clip, rel=1e-6, abs=1e-12)
    prev = next(r for r in result.rows if r.tflite_name == row.inputs[0])
    assert row.growth_db == pytest.approx(prev.sqnr_db - row.sqnr_db)
    # per channel (last axis, NHWC): the median live channel's range in steps, the largest magnitude over the median
    per_ch = f.reshape(-1, f.shape[-1])
    rng = per_ch.max(0) - per_ch.min(0)
    mag = np.abs(per_ch).max(0)[rng > 0]
    assert row.channel_steps == pytest.approx(np.median(rng[rng > 0]) / scale, rel=1e-5)
    assert row.channel_spread == pytest.approx(mag.max() / np.median(mag), rel=1e-5)


def test_channel_figures_name_a_few_massive_channels_that_tensor_sqnr_hides():
    from pipeline.debug.layers import _channels, _metrics
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 4, size=(2, 5, 5, 16)).astype(np.float32)
    x[..., :2] += 900.0  # two nearly constant, massive channels
    x[..., 5] = 0.0  # a dead channel is left out
    scale = float(x.max()) / 255
    q = np.clip(np.round(x / scale) - 128, -128, 127).astype(np.int8)
    sqnr, _, _ = _metrics(x, q, scale, -128, np.int8)
    steps, spread = _channels([x[:1], x[1:]], scale)
    assert sqnr > 45  # the tensor-wide figure looks fine: the massive channels dominate its power
    assert steps < 2 and spread > 200  # the typical channel spans about one int8 step
    assert _channels([x[..., 0]], scale) != (None, None) and _channels([x[0, 0, 0]], scale) == (None, None)
    pooled = x.mean((1, 2))  # [N, C], and as a layout TRANSPOSE leaves it, [N, C, 1, 1]: the same channels
    assert _channels([pooled[:, :, None, None]], scale) == _channels([pooled], scale)
    assert _channels([pooled[:, :, None, None]], scale)[0] < 1


def test_one_at_a_time_equals_one_batch(pair, result):
    from pipeline.debug.layers import layer_errors
    one = layer_errors(*pair, samples=SAMPLES, batch=1)
    assert one.batch == 1 and result.batch == SAMPLES
    assert [r.layer for r in one.rows] == [r.layer for r in result.rows]
    for a, b in zip(one.rows, result.rows):
        assert a.sqnr_db == pytest.approx(b.sqnr_db, abs=1e-3)


def test_a_damaged_conv_is_the_worst_layer(pair, result, tmp_path):
    from pipeline.debug.layers import layer_errors, summary_line
    int8_path, fp32_path, onnx_path, x = pair
    it = _interp(int8_path)
    it.allocate_tensors()
    conv = [o for o in it._get_ops_details() if o["op_name"] == "CONV_2D"][1]
    w = it.get_tensor(int(conv["inputs"][1]))
    assert w.dtype == np.int8
    data = bytearray(int8_path.read_bytes())
    at = bytes(data).find(w.tobytes())
    assert at >= 0 and bytes(data).find(w.tobytes(), at + 1) < 0
    noisy = np.random.default_rng(0).integers(-127, 128, w.size).astype(np.int8)
    data[at:at + w.size] = noisy.tobytes()  # the second conv's weights replaced by noise
    damaged = tmp_path / "damaged_int8.tflite"
    damaged.write_bytes(bytes(data))
    bad = layer_errors(damaged, fp32_path, onnx_path, x, samples=SAMPLES)
    w = bad.worst(3)
    assert w["lowest_sqnr"][0].layer == "/4/Conv" and w["largest_growth"][0].layer == "/4/Conv"
    assert w["largest_growth"][0].growth_db > 20 and w["lowest_sqnr"][0].sqnr_db < 10
    line = summary_line(bad.describe())
    assert line.startswith("layers     worst SQNR: /4/Conv (Conv)") and "; largest growth: /4/Conv (Conv) +" in line


def test_a_model_litert_cannot_load_is_one_line(pair, tmp_path):
    from pipeline.debug.layers import layer_errors
    from pipeline.errors import RuntimeStageError
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer" * 8)
    _, fp32_path, onnx_path, x = pair
    with pytest.raises(RuntimeStageError) as e:
        layer_errors(junk, fp32_path, onnx_path, x, samples=4)
    assert "\n" not in str(e.value) and "junk.tflite" in str(e.value)


def test_html_section(result, tmp_path):
    from pipeline.report.layers_html import layers_html
    assert layers_html({}) == "" and layers_html({"layer_errors": None}) == ""
    desc = result.describe()
    desc["rows"][1]["layer"] = "<script>alert(1)</script>"
    page = layers_html({"layer_errors": desc})
    assert page.startswith("<h2 id='layers'>Layer-wise error</h2>") and "<svg" in page and "</table>" in page
    assert "<script" not in page and "&lt;script&gt;" in page and "/4/Conv" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    broken = layers_html({"layer_errors": {"rows": 3}})
    assert "could not be drawn" in broken


def test_without_a_copy_of_the_float_model_it_says_so(pair, tmp_path):
    from pipeline.debug.layers import layer_errors
    from pipeline.errors import RuntimeStageError
    int8_path, _, onnx_path, x = pair
    shutil.copy(int8_path, tmp_path / "a.tflite")
    with pytest.raises(RuntimeStageError, match="does not exist"):
        layer_errors(tmp_path / "a.tflite", tmp_path / "missing.tflite", onnx_path, x)


def test_the_export_step_pairs_a_renaming_route_in_execution_order(tmp_path, tinynet_dir, tiny_npz):
    """onnx2tf-flatbuffer names tensors differently in its int8 (fixed batch 1) and float conversions: the export's
    debug_layers step pairs them in execution order by op and shape, and the ONNX names confirm each pair."""
    from pipeline.export import main
    out = tmp_path / "fb"
    with contextlib.chdir(tinynet_dir):
        status = main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data",
                       str(tiny_npz), "--calib-size", "100", "--converter", "onnx2tf-flatbuffer", "--debug-layers",
                       "--out", str(out)])
    assert status == 0
    le = json.loads((out / "report.json").read_text())["layer_errors"]
    assert "error" not in le, le.get("error")
    c = le["counts"]
    assert c["unmatched"]["paired_in_order"] >= 2 and c["unmatched"]["int8_only"] == 0
    assert c["compared"] >= 3 and c["not_onnx_named"] == 0
    assert {r["layer"] for r in le["rows"]} >= {"/0/Conv", "/4/Conv"}


def test_large_inputs_keep_the_tensors_of_fewer_images():
    from pipeline.stages import debug_layers as stage
    assert stage.samples(28 * 28) == stage.samples(3 * 64 * 64) == stage.SAMPLES
    assert stage.samples(3 * 224 * 224) == stage.SAMPLES_LARGE < stage.samples(3 * 96 * 96) < stage.SAMPLES
