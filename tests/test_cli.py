"""The export CLI end to end on a tiny model, and every bad input it must refuse cleanly."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.export import main

REPORT_KEYS = {"target", "model", "versions", "preprocessing", "calibration", "quantization", "artifacts",
               "accuracy", "timings_s", "gates", "passed", "schema_version"}


def test_export_end_to_end(tiny_export, tiny_npz):
    status, out = tiny_export
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == ["bundle", "bundle.tar.gz", "model.onnx", "model_int8.tflite",
                                                    "predictions.npz", "report.html", "report.json"]
    r = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(r)
    assert r["target"]["name"] == "tflite-int8"
    for pkg in ("torch", "tensorflow", "onnx", "onnx2tf", "ai-edge-litert"):
        assert r["versions"][pkg]
    assert r["preprocessing"]["input_shape"] == [1, 12, 12] and r["preprocessing"]["source_layout"] == "NHW"
    assert r["preprocessing"]["scale"] == pytest.approx(1 / 255)
    assert r["calibration"]["source"] == "balanced" and r["calibration"]["size"] == 100
    assert r["calibration"]["split"] == "train" and r["calibration"]["seed"] == 0
    q = r["quantization"]
    assert q["fully_int8"] is True and q["input_dtype"] == "int8" and q["output_dtype"] == "int8"
    assert "CONV_2D" in q["ops"]
    a = r["accuracy"]
    assert a["n"] == 200 and 0 <= a["int8_top1"] <= 1 and 0 <= a["fp32_top1"] <= 1
    assert a["fp32_top1"] > 0.9  # the toy task is easy: the trained tiny model must really classify
    assert a["drop_pp"] == pytest.approx((a["fp32_top1"] - a["int8_top1"]) * 100, abs=1e-6)
    assert r["artifacts"]["tflite_int8"]["bytes"] == (out / "model_int8.tflite").stat().st_size
    assert set(r["timings_s"]) >= {"export_onnx", "convert", "inspect", "run", "compare", "total"}
    assert r["gates"]["max_drop_pp"]["limit"] == 1.0 and r["gates"]["min_agreement"]["limit"] == 0.98
    assert r["passed"] is all(g["passed"] for g in r["gates"].values())
    assert r["runtime"]["int8"]["kernels"] == "xnnpack" and r["runtime"]["int8"]["threads"] == 4

    z = np.load(out / "predictions.npz", allow_pickle=False)
    labels = np.load(tiny_npz)["y_test"]
    np.testing.assert_array_equal(z["labels"], labels)
    assert z["fp32_logits"].shape == z["int8_logits"].shape == (200, 4)
    assert np.mean(z["int8_logits"].argmax(1) == labels) == pytest.approx(a["int8_top1"])
    assert np.mean(z["int8_logits"].argmax(1) == z["fp32_logits"].argmax(1)) == pytest.approx(a["agreement"])


def test_predictions_are_the_deployed_model(tiny_export, tiny_npz):
    """The saved int8 logits are what a fresh LiteRT interpreter gives on the quantized test inputs."""
    from ai_edge_litert.interpreter import Interpreter
    _, out = tiny_export
    r = json.loads((out / "report.json").read_text())
    it = Interpreter(model_path=str(out / "model_int8.tflite"), num_threads=1)
    it.allocate_tensors()
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    x = np.load(tiny_npz)["x_test"][:5].astype(np.float32) / 255.0
    x = (x - r["preprocessing"]["mean"][0]) / r["preprocessing"]["std"][0]
    s, zp = inp["quantization"]
    z = np.load(out / "predictions.npz")
    for i in range(5):
        q = np.clip(np.round(x[i] / s) + zp, -128, 127).astype(np.int8)[None, :, :, None]
        it.set_tensor(inp["index"], q)
        it.invoke()
        os_, ozp = outp["quantization"]
        got = (it.get_tensor(outp["index"]).astype(np.float32) - ozp) * os_
        np.testing.assert_allclose(got[0], z["int8_logits"][i], atol=os_ * 1.01)


def test_gate_failure_exits_1_and_still_writes(tmp_path, tinynet_dir, tiny_npz, in_dir, capsys):
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data",
                   str(tiny_npz), "--calib-size", "100", "--max-drop-pp", "-100", "--out", str(out)])
    # a drop of at most -100 points (int8 100 points above FP32) cannot happen: the gate fails on any model
    assert status == 1
    r = json.loads((out / "report.json").read_text())
    assert r["passed"] is False and r["gates"]["max_drop_pp"]["passed"] is False
    assert r["gates"]["max_drop_pp"]["limit"] == -100
    assert (out / "model_int8.tflite").is_file()
    assert "FAIL (max_drop_pp)" in capsys.readouterr().out


def test_re_export_needs_overwrite_keeps_user_files_and_replaces_the_whole_folder(tmp_path, tinynet_dir, tiny_npz,
                                                                                 in_dir, tiny_export, capsys):
    import shutil
    in_dir(tinynet_dir)
    out = tmp_path / "out"
    shutil.copytree(tiny_export[1], out)  # an earlier export ...
    (out / "report.html").write_text("<html>from an earlier --reliability run</html>")  # ... with extras
    (out / "model_fp16.tflite").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    args = ["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz),
            "--calib-size", "50", "--eval-limit", "50", "--out", str(out)]
    assert main(args) == 2  # without --overwrite: refused before any stage
    assert "holds an earlier export (report.json); pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 2  # a file no export writes is never deleted
    assert "also notes.txt, which no export writes" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert main([*args, "--overwrite"]) in (0, 1)
    names = {p.name for p in out.iterdir()}
    assert "model_fp16.tflite" not in names  # the earlier export's page went with it; this is the new one
    assert "from an earlier --reliability run" not in (out / "report.html").read_text()
    assert {"report.json", "model_int8.tflite", "model.onnx", "bundle"} <= names
    assert json.loads((out / "report.json").read_text())["accuracy"]["n"] == 50


def test_list_targets(capsys):
    assert main(["--list-targets"]) == 0
    out = capsys.readouterr().out
    assert "tflite-int8" in out and "arena +25%, flash +25%" in out and "25%/25%" not in out


def test_summary_wording_has_no_plural_slip_or_double_sign(tiny_export):
    """'1 thread', not '1 threads'; margins named, not '+25%/25%'."""
    from pipeline.report.summary import _threads, summary
    assert (_threads(1), _threads(4)) == ("1 thread", "4 threads")
    from pipeline.report import Report
    status, out = tiny_export
    rep = Report.from_dict(json.loads((out / "report.json").read_text()))
    rep.runtime["int8"]["threads"] = 1
    text = summary(rep, out)
    assert "1 thread (host)" in text and "1 threads" not in text


# --------------------------------------------------------------------------- bad input

@pytest.fixture()
def bad(tmp_path, tinynet_dir, tiny_npz, in_dir, capsys):
    """Run the CLI with bad input; check exit 2, one clean line, no trace of an output folder."""
    in_dir(tinynet_dir)
    out = tmp_path / "out"

    def run(*argv, needle: str, base=True):
        args = list(argv)
        if base:
            defaults = {"--model": "tinynet:tinynet", "--data": str(tiny_npz), "--calib-size": "50"}
            for k, v in defaults.items():
                if k not in args:
                    args += [k, v]
        if "--out" not in args:
            args += ["--out", str(out)]
        status = main(args)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
        assert status == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "Traceback" not in err
        assert needle in lines[0], lines[0]
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        return lines[0]
    return run


def test_missing_model_file(bad):
    bad("--model", "nothere.onnx", needle="does not exist")


def test_model_path_is_a_folder(bad, tmp_path):
    d = tmp_path / "dir.onnx"
    d.mkdir()
    bad("--model", str(d), needle="does not exist")


def test_garbage_onnx(bad, tmp_path):
    p = tmp_path / "garbage.onnx"
    p.write_bytes(os.urandom(2000))
    bad("--model", str(p), needle="not a valid ONNX model")


def test_truncated_onnx(bad, tmp_path, tiny_export):
    _, out = tiny_export
    blob = (out / "model.onnx").read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(blob[: len(blob) // 2])
    bad("--model", str(p), needle="not a valid ONNX model")


def test_onnx_that_onnxruntime_cannot_load_names_the_reason(bad, tmp_path, tinynet_dir):
    import onnx
    p = tmp_path / "ir14.onnx"  # valid for onnx.checker, newer than onnxruntime reads
    torch.onnx.export(_tiny_module(tinynet_dir), (torch.zeros(1, 1, 12, 12),), str(p), dynamo=False)
    proto = onnx.load(str(p))
    proto.ir_version = 14
    onnx.save(proto, str(p))
    line = bad("--model", str(p), needle="onnxruntime cannot load")
    assert "IR version" in line and "input shape" not in line


def test_missing_factory(bad):
    bad("--model", "tinynet:nope", needle="has no attribute 'nope'")


def test_missing_module(bad):
    bad("--model", "no_such_module_xyz:factory", needle="cannot import module")


def test_factory_not_returning_module(bad):
    bad("--model", "tinynet:not_a_module", needle="not a torch.nn.Module")


def test_weights_that_do_not_fit(bad, tmp_path):
    import torch.nn as nn
    p = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 2).state_dict(), p)
    bad("--weights", str(p), needle="do not fit")


def test_weights_a_module_refuses_are_one_line(bad, tmp_path, tinynet_dir):
    """A module's own _load_from_state_dict may raise anything (torchvision's MNASNet: ValueError on a state dict
    whose _metadata was dropped by copying it into a plain dict)."""
    import tinynet  # the bad fixture runs in tinynet_dir, on sys.path
    p = tmp_path / "plain.pt"
    torch.save(dict(tinynet.versioned().state_dict()), p)  # a plain dict: no _metadata
    bad("--model", "tinynet:versioned", "--weights", str(p), needle="tinynet:versioned refused the weights")
    torch.save(tinynet.versioned().state_dict(), p)  # as saved normally: loads
    from pipeline.inputs.models import load
    assert load("tinynet:versioned", weights=str(p)).module.fc.weight.shape == (4, 144)


def test_weights_not_a_state_dict_are_never_unpickled(bad, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    bad("--weights", str(p), needle="not a plain state dict")
    assert not marker.exists()


@pytest.mark.parametrize("content,needle", [
    (b"hello world\n", "is not a file written by torch.save"),
    (b"\x80\x04garbage-after-a-pickle-header", "not a plain state dict (it is malformed"),
    (b"PK\x03\x04not-really-a-zip", "cannot read weights"),
], ids=["text", "broken-pickle", "broken-zip"])
def test_weights_that_are_not_a_torch_save_file(bad, tmp_path, content, needle):
    p = tmp_path / "w.pt"
    p.write_bytes(content)
    bad("--weights", str(p), needle=needle)


def test_onnx_passed_as_weights(bad, tmp_path, tinynet_dir):
    p = tmp_path / "m.onnx"
    torch.onnx.export(_tiny_module(tinynet_dir), (torch.zeros(1, 1, 12, 12),), str(p), dynamo=False)
    bad("--weights", str(p), needle="(it looks like an ONNX model); pass it as --model")


def test_weights_missing(bad, tmp_path):
    bad("--weights", str(tmp_path / "none.pt"), needle="does not exist")


def test_input_shape_that_does_not_fit(bad):
    bad("--input-shape", "3,12,12", needle="does not fit")


def test_input_shape_malformed(bad):
    bad("--input-shape", "1,x,12", needle="C,H,W")


def test_images_that_do_not_fit_model(bad, tmp_path):
    from conftest import make_tiny_npz
    p = make_tiny_npz(tmp_path / "big.npz", size=16)
    bad("--model", "tinynet:fixednet", "--data", str(p), needle="does not fit")


@pytest.mark.parametrize("shape,needle", [((28, 28, 3), "convert the images to 1 channel"),
                                          ((32, 32), "resize the images to 28x28")], ids=["channels", "size"])
def test_images_that_do_not_fit_a_model_with_a_known_shape(bad, tmp_path, shape, needle):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=rng.integers(0, 255, (60, *shape)).astype(np.uint8), y_train=np.arange(60) % 10,
             x_test=rng.integers(0, 255, (20, *shape)).astype(np.uint8), y_test=np.arange(20) % 10)
    bad("--model", "zoo:refcnn", "--data", str(p), needle=needle)


def test_images_that_do_not_fit_given_shape(bad):
    bad("--model", "tinynet:fixednet", "--input-shape", "1,12,12", "--data", "missing.npz",
        needle="does not exist")


def test_missing_data_file(bad):
    bad("--data", "missing.npz", needle="does not exist")


@pytest.mark.parametrize("what,needle", [("nokey", "lacks y_test"), ("object", "Python objects"),
                                         ("nan", "NaN or inf"), ("inf", "NaN or inf"),
                                         ("label", "labels go up to 9"), ("bool", "is a bool array")])
def test_bad_data_files(bad, tmp_path, what, needle):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 255, (120, 12, 12)).astype(np.uint8), y_train=np.arange(120) % 4,
                  x_test=rng.integers(0, 255, (20, 12, 12)).astype(np.uint8), y_test=np.arange(20) % 4)
    if what == "nokey":
        del arrays["y_test"]
    elif what == "object":
        arrays["y_test"] = np.array([None] * 20, dtype=object)
    elif what in ("nan", "inf"):
        x = arrays["x_test"].astype(np.float32) / 255
        x[0, 0, 0] = np.nan if what == "nan" else np.inf
        arrays["x_test"] = x
        arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
    elif what == "label":
        arrays["y_train"][5] = 9
    elif what == "bool":
        arrays["x_train"] = arrays["x_train"] > 127
        arrays["x_test"] = arrays["x_test"] > 127
    p = tmp_path / f"{what}.npz"
    np.savez(p, **arrays)
    bad("--data", str(p), needle=needle)


def test_calib_size_zero(bad):
    bad("--calib-size", "0", needle="--calib-size 0")


def test_calib_size_larger_than_train(bad):
    bad("--calib-size", "401", needle="is larger than the")


def test_unwritable_output_folder(bad, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    out = f / "sub"
    status = main(["--model", "tinynet:tinynet", "--data", "x.npz", "--out", str(out)])
    assert status == 2
    assert not out.exists()


def test_output_is_a_file(bad, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    bad("--out", str(f), needle="not a folder")
    assert f.read_text() == "x"


def test_unknown_target(bad):
    line = bad("--target", "tflite-in8", needle="unknown target")
    assert "did you mean tflite-int8" in line


def test_unknown_zoo_model(bad):
    bad("--model", "zoo:refcn", needle="did you mean zoo:refcnn")


def test_min_agreement_must_be_a_fraction(bad):
    bad("--min-agreement", "98", needle="--min-agreement 98.0 is not a fraction; pass a value from 0 to 1")


def test_unknown_corruption_fails_even_without_reliability(bad):
    bad("--corruptions", "fgo", needle="fgo")


def test_val_size_larger_than_the_training_split_fails_before_any_stage(bad):
    # bad() counts every non-warning line: a stage line ([1/8] ...) would fail it
    bad("--reliability", "--val-size", "99999", needle="--val-size 99999 exceeds the 400 training images")


def test_unknown_flag(bad):
    bad("--frobnicate", needle="unrecognized arguments")


def test_unknown_converter(bad):
    bad("--converter", "tflite-magic", needle="invalid choice: 'tflite-magic' (choose from 'auto', 'direct', 'onnx2tf', 'litert-torch'")


# --------------------------------------------------------------------------- other model sources

def _tiny_module(tinynet_dir):
    import importlib
    import sys
    sys.path.insert(0, str(tinynet_dir))
    mod = importlib.import_module("tinynet")
    m = mod.tinynet()
    m.load_state_dict(torch.load(tinynet_dir / "tinynet.pt", weights_only=True))
    return m.eval()


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "fixed-batch-1"])
def test_onnx_model_source_uses_onnxruntime_reference(tmp_path, tinynet_dir, tiny_npz, dynamic):
    m = _tiny_module(tinynet_dir)
    onnx_path = tmp_path / "user.onnx"
    kw = {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}} if dynamic else {}
    torch.onnx.export(m, (torch.zeros(1, 1, 12, 12),), str(onnx_path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, **kw)
    out = tmp_path / "o"
    assert main(["--model", str(onnx_path), "--data", str(tiny_npz), "--calib-size", "100", "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["model"]["kind"] == "onnx" and r["model"]["fp32_reference"] == "onnxruntime"
    assert r["onnx"]["source"] == "given" and r["onnx"]["dynamic_batch"] is dynamic
    assert r["quantization"]["fully_int8"] is True
    assert r["runtime"]["int8"]["batch_size"] == (256 if dynamic else 1)
    z = np.load(out / "predictions.npz")
    x = np.load(tiny_npz)["x_test"][:, None].astype(np.float32) / 255
    with torch.no_grad():
        np.testing.assert_allclose(z["fp32_logits"], m(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_model_returning_a_tuple_exports_its_first_output(tmp_path, tinynet_dir, tiny_npz, in_dir, capsys):
    import onnx
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:with_aux", "--data", str(tiny_npz), "--calib-size", "100", "--out", str(out)])
    err = capsys.readouterr().err
    assert status in (0, 1), err  # untrained: the gates may fail, the export must not
    assert "returns 2 outputs; the first is taken as the logits" in err
    graph = onnx.load(str(out / "model.onnx")).graph
    assert len(graph.output) == 1
    r = json.loads((out / "report.json").read_text())
    assert r["model"]["outputs_returned"] == 2
    z = np.load(out / "predictions.npz")
    x = np.load(tiny_npz)["x_test"][:, None].astype(np.float32) / 255
    assert z["fp32_logits"].shape == z["int8_logits"].shape == (len(x), 4)
    # The int8 side is the same (first) output: it tracks FP32 (a swapped output would not).
    assert r["accuracy"]["agreement"] >= 0.9
    assert np.abs(z["int8_logits"] - z["fp32_logits"]).max() < 0.25 * np.abs(z["fp32_logits"]).max() + 1e-3


def _without_retry_rewrites(monkeypatch):
    """Exports in this process with only the always-on rewrites and no fixed-batch retry: the onnx2tf route then
    fails on LayerNorm as onnx2tf 1.28 itself does (with the retry rewrites it converts: see the test after these;
    at a fixed batch of 1 it converts too)."""
    import dataclasses
    from pipeline import export as export_mod
    from pipeline.conversion import rewrites
    from pipeline.conversion.onnx2tf_tflite import Onnx2TfConverter
    parse = export_mod.config_from_args
    monkeypatch.setattr(export_mod, "config_from_args", lambda a: dataclasses.replace(parse(a), convert_in="process"))
    monkeypatch.setattr(rewrites, "DEFAULT_ORDER", rewrites.ALWAYS_REWRITES)

    def no_fixed_batch(self, *args):
        raise args[-1]  # the dynamic-batch failure, as before the fixed-batch retry
    monkeypatch.setattr(Onnx2TfConverter, "_fixed_batch", no_fixed_batch)


def test_onnx2tf_failure_names_the_node(tmp_path, tinynet_dir, tiny_npz, in_dir, capsys, monkeypatch):
    _without_retry_rewrites(monkeypatch)
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:tokennet", "--data", str(tiny_npz), "--calib-size", "50", "--out", str(out),
                   "--converter", "onnx2tf"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert status == 1 and len(err) == 1, err
    assert "onnx2tf cannot convert the ONNX node" in err[0] and "(LayerNormalization)" in err[0], err[0]
    assert not out.exists()


def _onnx2tf_export(model: str, out, tiny_npz) -> tuple[int, dict, dict]:
    """An export through the onnx2tf route: (exit status, report.json, its rewrites by name)."""
    status = main(["--model", model, "--data", str(tiny_npz), "--calib-size", "50", "--out", str(out),
                   "--converter", "onnx2tf"])
    r = json.loads((out / "report.json").read_text())
    return status, r, {x["name"]: x for x in r["conversion"]["rewrites"]}


def test_the_onnx2tf_route_converts_layernorm_after_the_retry_rewrites(tmp_path, tinynet_dir, tiny_npz, in_dir):
    """The same model with the rewrites: converted fully int8, and the report names each rewrite, its measured
    FP32 difference and the failure that called for it."""
    in_dir(tinynet_dir)
    status, r, rw = _onnx2tf_export("tinynet:tokennet", tmp_path / "o", tiny_npz)
    assert "layernorm" in rw and "(LayerNormalization)" in rw["layernorm"]["why"], rw
    assert rw["layernorm"]["max_abs_diff"] <= rw["layernorm"]["tolerance"]
    assert r["quantization"]["fully_int8"] and status in (0, 1) and r["accuracy"]["agreement"] >= 0.9, r["accuracy"]


def test_the_onnx2tf_route_converts_at_a_fixed_batch_when_the_dynamic_batch_fails(tmp_path, tinynet_dir, tiny_npz,
                                                                                  in_dir):
    """GroupNorm and ConvTranspose fail in onnx2tf 1.28 under the export's dynamic batch, with every rewrite; the
    route then converts the graph at a fixed batch of 1 (recorded as the rewrite fixed_batch, FP32 outputs
    measured unchanged), and the run stage feeds the model one image at a time."""
    from pipeline.tflite.inspect import inspect
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status, r, rw = _onnx2tf_export("tinynet:upnet", out, tiny_npz)
    assert "fixed_batch" in rw and "failed to convert" in rw["fixed_batch"]["why"], rw
    assert rw["fixed_batch"]["max_abs_diff"] <= rw["fixed_batch"]["tolerance"] and rw["fixed_batch"]["batch"] == 1
    assert r["quantization"]["fully_int8"] and status in (0, 1) and r["accuracy"]["agreement"] >= 0.9, r["accuracy"]
    assert inspect(out / "model_int8.tflite").inputs[0].shape[0] == 1
    assert "TRANSPOSE_CONV" in r["quantization"]["ops"]


def test_a_padded_maxpool_is_rewritten_and_the_report_says_so(tmp_path, tinynet_dir, tiny_npz, in_dir):
    """The exact maxpool_pad rewrite runs before every onnx2tf conversion: no PADV2 (whose -3.4e38 pad value got
    an int8 scale of ~1e36), and conversion.rewrites records it with its measured FP32 difference."""
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:stemnet", "--data", str(tiny_npz), "--calib-size", "50", "--out", str(out),
                   "--converter", "onnx2tf"])
    r = json.loads((out / "report.json").read_text())
    rw = r["conversion"]["rewrites"]
    assert [x["name"] for x in rw] == ["maxpool_pad"] and rw[0]["exact"] and rw[0]["max_abs_diff"] == 0.0, rw
    q = r["quantization"]
    assert q["fully_int8"] and "PADV2" not in q["ops"] and status in (0, 1), q["ops"]
    scales = [s for t in q["tensors"] for s in (t.get("quantization", {}).get("scale") or [])]
    assert max(scales) < 100, max(scales)


def test_auto_falls_back_to_the_next_route_and_records_why(tmp_path, tinynet_dir, tiny_npz, in_dir, monkeypatch):
    """The first route failing (the LayerNorm model without the onnx2tf route's retry rewrites): auto keeps the
    next route whose model is fully int8 and agrees with FP32 on the check sample, and says why the first failed."""
    _without_retry_rewrites(monkeypatch)
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:tokennet", "--data", str(tiny_npz), "--calib-size", "50", "--out", str(out)])
    r = json.loads((out / "report.json").read_text())
    tried = r["conversion"]["routes_tried"]
    # the direct writer declines the LayerNorm graph's ops at once, then the onnx2tf route fails on LayerNormalization
    assert tried[0]["route"] == "direct" and not tried[0]["kept"] and "no int8 writer for op" in tried[0]["reason"]
    assert tried[1]["route"] == "onnx2tf" and not tried[1]["kept"] and "(LayerNormalization)" in tried[1]["reason"]
    assert tried[-1]["kept"] and r["conversion"]["converter"] == tried[-1]["route"] != "onnx2tf"
    assert r["quantization"]["fully_int8"] and status in (0, 1)


def test_a_conversion_that_breaks_the_batch_axis_is_redone_from_a_folded_graph(tmp_path, tinynet_dir, tiny_npz,
                                                                                in_dir, capsys):
    """Reflect padding: onnx2tf applies PyTorch's computed pads to the batch axis (more output rows than inputs).
    The converter sees it on LiteRT and converts again from the constant-folded graph, which is right."""
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:reflectnet", "--data", str(tiny_npz), "--calib-size", "50", "--out", str(out)])
    r = json.loads((out / "report.json").read_text())
    assert "constant_folded" in r["conversion"], r["conversion"]
    assert r["quantization"]["fully_int8"] and r["accuracy"]["n"] == 200
    assert r["accuracy"]["max_error_steps"] <= 8 and status in (0, 1), r["accuracy"]
    assert "convert    converted twice: the first model broke the batch axis" in capsys.readouterr().out


def test_a_model_whose_batch_axis_stays_broken_is_an_error_not_a_quantization_drop(tmp_path, tinynet_dir, tiny_npz,
                                                                                   in_dir, capsys, monkeypatch):
    """Without the folded retry, the run stage sees more output rows than inputs and stops with the fixes."""
    from pipeline.conversion import onnx2tf_tflite as convert
    def no_folding(src, dst):
        raise RuntimeError("folding disabled for this test")
    monkeypatch.setattr(convert, "fold_constants", no_folding)
    import dataclasses
    from pipeline import export as export_mod
    parse = export_mod.config_from_args  # the patched converter runs in this process
    monkeypatch.setattr(export_mod, "config_from_args", lambda a: dataclasses.replace(parse(a), convert_in="process"))
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:reflectnet", "--data", str(tiny_npz), "--calib-size", "50", "--out", str(out),
                   "--converter", "onnx2tf"])  # auto would keep another route's model (its check run sees the rows)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert status == 1 and len(err) == 1, err
    assert "output rows for a batch of 256 images: its batch axis was mixed up in conversion" in err[0]
    assert "use zero padding, or constant-fold the ONNX yourself" in err[0]
    assert not out.exists()


def test_torchscript_model_source(tmp_path, tinynet_dir, tiny_npz):
    m = _tiny_module(tinynet_dir)
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(m, torch.zeros(1, 1, 12, 12)), str(p))
    out = tmp_path / "o"
    assert main(["--model", str(p), "--data", str(tiny_npz), "--calib-size", "100", "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["model"]["kind"] == "torchscript" and r["quantization"]["fully_int8"] is True
    assert r["accuracy"]["agreement"] >= 0.95


def test_state_dict_is_not_torchscript(bad, tinynet_dir):
    bad("--model", str(tinynet_dir / "tinynet.pt"), needle="not a TorchScript archive")


def test_fashion_mnist_data_dir_missing_files(bad, tmp_path):
    bad("--data", "fashion-mnist", "--data-dir", str(tmp_path), needle="dataset-fashion-mnist")


def test_sigterm_mid_export_cleans_up(tmp_path, tinynet_dir, tiny_npz, procs):
    """timeout/CI/docker stop send SIGTERM: exit 143, one line, no output folder, no temp folder, no worker left."""
    import signal
    import subprocess
    import sys
    import time
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tinynet_dir)])}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.export", "--model", "tinynet:tinynet", "--weights",
                             str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz), "--calib-size", "50",
                             "--out", str(out)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # stop it in the convert stage, while the conversion worker runs
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("[2/") or not line:
            break
    workers = procs.children(proc.pid)
    assert workers, "the conversion worker process should be running by now"
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[1]
    err = "".join(lines) + rest
    assert proc.returncode == 143, err
    assert "error: terminated (SIGTERM); nothing was written" in err and "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    time.sleep(0.5)
    assert not procs.alive(workers)


def test_ctrl_c_while_the_conversion_worker_starts_stops_everything_cleanly(tmp_path, tinynet_dir, tiny_npz, procs):
    """A terminal's Ctrl-C goes to the whole process group, the conversion worker included, which is still starting
    up (importing its converter) at the moment the export begins: exit 130, one line, no traceback from any process,
    no output folder, no worker left."""
    import signal
    import subprocess
    import sys
    import time
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tinynet_dir)])}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.export", "--model", "tinynet:tinynet", "--weights",
                             str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz), "--calib-size", "50",
                             "--out", str(out)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    workers: list[int] = []
    deadline = time.monotonic() + 120
    while not workers and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        workers = procs.children(proc.pid)
    assert workers and proc.poll() is None, "the conversion worker process should be starting by now"
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    t_end = time.monotonic() + 10
    while procs.alive(workers) and time.monotonic() < t_end:
        time.sleep(0.1)
    assert not procs.alive(workers)


def test_the_fp32_reference_computed_beside_the_conversion_is_the_models_and_says_so(tiny_export, tiny_npz):
    """The FP32 side runs while the conversion worker converts: its logits are exactly those of onnxruntime on the
    export's model.onnx over the test split, and its throughput figure says that it shared the CPU."""
    import onnxruntime as ort
    _, out = tiny_export
    r = json.loads((out / "report.json").read_text())
    fp32 = r["runtime"]["fp32"]
    assert fp32["runtime"].startswith("onnxruntime on model.onnx")
    assert fp32["measured_while"] == "the conversion (in its worker process) ran beside it: a throughput on a shared CPU"
    with np.load(out / "predictions.npz", allow_pickle=False) as z:
        logits = z["fp32_logits"]
    with np.load(tiny_npz, allow_pickle=False) as z:
        x = z["x_test"][:, None].astype(np.float32) / 255.0
    mean, std = r["preprocessing"]["mean"][0], r["preprocessing"]["std"][0]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: (x - mean) / std})[0]
    assert logits.shape == want.shape == (r["data"]["evaluated"], 4)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_summary_says_larger_when_the_tflite_file_is_larger(tiny_export):
    from pipeline.report.summary import summary
    from pipeline.report import Report
    _, out = tiny_export
    r = json.loads((out / "report.json").read_text())
    rep = Report.from_dict(r)
    ratio = r["artifacts"]["size_ratio_onnx_to_int8"]
    line = next(ln for ln in summary(rep, out).splitlines() if ln.startswith("sizes"))
    assert ("x smaller" in line) == (ratio >= 1) and ("x larger" in line) == (ratio < 1), line
    for flipped in (0.5, 2.0):  # both branches on the real report
        rep.artifacts["size_ratio_onnx_to_int8"] = flipped
        line = next(ln for ln in summary(rep, out).splitlines() if ln.startswith("sizes"))
        assert line.endswith("(2.00x larger)" if flipped < 1 else "(2.0x smaller)"), line


@pytest.mark.parametrize("args, needle", [
    (("--seed", "-1"), "seed -1 is out of range; pass an integer from 0 to 4294967295"),
    (("--max-drop-pp", "nan"), "'nan' is not a finite number"),
    (("--min-agreement", "inf"), "'inf' is not a finite number"),
    (("--mean", "0.5,nan"), "'0.5,nan' holds a value that is not a finite number"),
    (("--reliability", "--max-ece-increase", "nan"), "'nan' is not a finite number"),
    (("--reliability", "--max-worst-drop-pp=-inf"), "'-inf' is not a finite number"),
])
def test_seeds_and_limits_that_cannot_work_are_usage_errors(bad, args, needle):
    bad(*args, needle=needle)


def test_images_too_small_for_the_corruption_suite_fail_before_any_stage(bad, tmp_path):
    from conftest import make_tiny_npz
    small = make_tiny_npz(tmp_path / "small.npz", size=4)
    bad("--data", str(small), "--reliability",
        needle="the corruption suite needs images with 1 or 3 channels of at least 8x8 pixels, not 1x4x4 (C×H×W); "
               "pass --corruptions none")


@pytest.mark.slow
def test_several_targets_in_one_call_share_the_onnx_model_and_each_precisions_conversion(tmp_path, tinynet_dir,
                                                                                          tiny_npz, in_dir, capsys):
    """--target a,b,c: a folder per target; the ONNX model is exported once and int8 converted once."""
    in_dir(tinynet_dir)
    out = tmp_path / "multi"
    status = main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz),
                   "--calib-size", "100", "--target", "tflite-int8,rpi4,tflite-fp16,rpi4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert sorted(p.name for p in out.iterdir()) == ["rpi4", "tflite-fp16", "tflite-int8"]  # rpi4 once
    reps = {t: json.loads((out / t / "report.json").read_text()) for t in ("tflite-int8", "rpi4", "tflite-fp16")}
    assert "reused" not in reps["tflite-int8"]["conversion"] and "reused" in reps["rpi4"]["conversion"]
    assert "reused" in reps["rpi4"]["onnx"] and "reused" in reps["tflite-fp16"]["onnx"]
    assert "reused" not in reps["tflite-fp16"]["conversion"]  # another precision: converted here
    # the shared files are copies: each folder is complete, and the int8 models are the same bytes
    assert (out / "rpi4" / "model_int8.tflite").read_bytes() == (out / "tflite-int8" / "model_int8.tflite").read_bytes()
    assert reps["rpi4"]["artifacts"]["tflite"]["sha256"] == reps["tflite-int8"]["artifacts"]["tflite"]["sha256"]
    rows = [ln.split()[0] for ln in printed.splitlines()[1:4]]
    assert printed.splitlines()[0].startswith("target") and rows == ["tflite-int8", "rpi4", "tflite-fp16"]
    assert main(["--target", "tflite-int8,rpi44", "--out", str(tmp_path / "x")]) == 2  # a typo stops before any export
    assert "rpi4" in capsys.readouterr().err and not (tmp_path / "x").exists()
