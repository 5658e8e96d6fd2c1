"""Route onnx2tf-flatbuffer (onnx2tf 2.x, flatbuffer_direct backend, in a network-locked child process)."""
from __future__ import annotations

import subprocess
import tempfile
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.tflite import inspect as inspect_tflite

from pipeline.inputs import models

from pipeline.inputs import preprocessing
from pipeline.conversion import onnx2tf_flatbuffer as fb
from pipeline.errors import ConversionError
from pipeline.conversion.onnx_export import export_onnx
from pipeline.runtime.litert import TfliteRunner

PRE = preprocessing.Preprocessing(input_shape=(1, 12, 12), source_layout="NHW", source_dtype="uint8",
                                  scale=1 / 255, mean=(0.5,), std=(0.25,))

needs_route = pytest.mark.skipif(not (fb.DEFAULT_ROUTE_DIR / "onnx2tf" / "__init__.py").is_file(),
                                 reason="onnx2tf 2.x is not installed in .venv/routes/onnx2tf2: ./setup.sh --install-only")


def _tiny_cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    with torch.no_grad():  # non-trivial BN statistics, so folding matters
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fb")
    raw = np.random.default_rng(0).integers(0, 256, (300, 1, 12, 12)).astype(np.uint8)
    x = preprocessing.apply(raw, PRE)
    model = models.LoadedModel(spec="tiny", kind="factory", module=_tiny_cnn(), input_shape=(1, 12, 12))
    return d, x, export_onnx(model, x[:16], d / "model.onnx")


@pytest.fixture
def own_tmpdir(tmp_path, monkeypatch):
    """tempfile's folder (the TMPDIR a conversion inherits) set to an empty folder we can look into afterwards."""
    t = tmp_path / "tmpdir"
    t.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


@needs_route
def test_int8_conversion_is_fully_int8_and_tracks_fp32(tiny, own_tmpdir):
    import onnxruntime as ort
    d, x, onnx_art = tiny
    art = fb.Onnx2TfFlatbufferConverter().convert(onnx_art, x[:200], PRE, per_channel=True,
                                                  out_path=d / "model_int8.tflite")
    assert art.converter == "onnx2tf-flatbuffer" and art.input_layout == "NHWC" and art.calibration_samples == 200
    assert list(own_tmpdir.iterdir()) == []  # its temporary folder is gone
    insp = inspect_tflite.inspect(art.path)
    assert insp.fully_int8, insp.offending
    assert insp.input_dtype == "int8" and insp.output_dtype == "int8"
    assert inspect_tflite.check_precision(insp, "int8").precision_ok
    # the dynamic-batch ONNX is converted at a fixed batch of 1 (flatbuffer_direct pads a dynamic batch with FILL)
    assert insp.weights_per_channel and not insp.dynamic_batch
    assert [r["name"] for r in art.rewrites] == ["fixed_batch"] and "FILL" in art.rewrites[0]["why"]
    assert art.rewrites[0]["max_abs_diff"] <= art.rewrites[0]["tolerance"] and art.rewrites[0]["exact"]
    assert "float32" not in insp.dtype_counts

    held_out = x[200:]  # not calibration samples
    res = TfliteRunner(art.path, kernels="xnnpack", threads=1, input_layout=art.input_layout).run(held_out)
    sess = ort.InferenceSession(str(onnx_art.path), providers=["CPUExecutionProvider"])
    fp32 = sess.run(None, {"input": held_out})[0]
    steps = np.abs(res.outputs - fp32) / insp.outputs[0].scale[0]
    assert (res.outputs.argmax(1) == fp32.argmax(1)).mean() >= 0.95
    assert np.median(steps) <= 2.0 and steps.max() <= 8.0, (np.median(steps), steps.max())


@needs_route
def test_per_tensor_weights(tiny, own_tmpdir):
    d, x, onnx_art = tiny
    art = fb.Onnx2TfFlatbufferConverter().convert(onnx_art, x[:100], PRE, per_channel=False, out_path=d / "pt.tflite")
    insp = inspect_tflite.inspect(art.path)
    assert insp.fully_int8 and insp.input_dtype == "int8" and not insp.weights_per_channel
    assert list(own_tmpdir.iterdir()) == []


def test_precisions_this_route_does_not_offer_are_one_line_errors(tiny, tmp_path):
    _, x, onnx_art = tiny
    for prec in ("fp16", "int16x8"):
        with pytest.raises(ConversionError, match=f"does not offer precision {prec}") as e:
            fb.Onnx2TfFlatbufferConverter().convert(onnx_art, x[:100], PRE, out_path=tmp_path / "m.tflite",
                                                    precision=prec)
        assert "\n" not in str(e.value)


@pytest.mark.slow
@needs_route
@pytest.mark.parametrize("prec", ["fp32", "dynamic"])
def test_float_rungs_meet_their_contract(tiny, own_tmpdir, prec):
    d, x, onnx_art = tiny
    a = fb.Onnx2TfFlatbufferConverter().convert(onnx_art, x[:100], PRE, out_path=d / f"{prec}.tflite", precision=prec)
    assert inspect_tflite.check_precision(inspect_tflite.inspect(a.path), prec).precision_ok
    assert a.calibration_samples == 0 and a.input_layout == "NHWC"
    assert list(own_tmpdir.iterdir()) == []


def test_the_child_cannot_reach_the_network(tmp_path):
    """A child started the way conversion children are cannot resolve names nor connect, while the same
    connection attempt without the lock gets past the lock (refused by the closed port, not blocked)."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent('''
        import socket, sys
        out = []
        try:
            socket.getaddrinfo("pypi.org", 443)
            out.append("resolved")
        except OSError as e:
            out.append("resolve-blocked" if "blocked" in str(e) else f"resolve-failed:{e}")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", 9))
            out.append("connected")
        except OSError as e:
            out.append("connect-blocked" if "blocked" in str(e) else f"connect-failed:{type(e).__name__}")
        print(" ".join(out))
    '''))
    cmd, env = fb.child_command([str(probe)], tmp_path / "lock")
    locked = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert locked.returncode == 0, locked.stderr
    assert locked.stdout.split() == ["resolve-blocked", "connect-blocked"], locked.stdout
    # the socket lock is not the only one where unshare -n works: without sitecustomize, still no route out
    if fb._unshare_prefix():
        bare = subprocess.run(cmd, env={k: v for k, v in env.items() if k != "PYTHONPATH"},
                              capture_output=True, text=True, timeout=60)
        assert "resolved" not in bare.stdout.split() and "connected" not in bare.stdout.split(), bare.stdout
    assert "sitecustomize" in fb.network_block()


def _fake_route(root, body: str):
    pkg = root / "onnx2tf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import os, signal, sys\n__version__ = '2.0.0-fake'\n" + textwrap.dedent(body))
    return root


def test_a_child_killed_by_a_signal_is_named_and_leaves_no_temp_files(tiny, tmp_path, own_tmpdir):
    _, x, onnx_art = tiny
    route = _fake_route(tmp_path / "route", '''
        def convert(**kw):
            open(os.path.join(os.environ["TMPDIR"], "scratch.bin"), "wb").write(b"x" * 100)
            os.abort()
    ''')
    conv = fb.Onnx2TfFlatbufferConverter(route_dir=route)
    with pytest.raises(ConversionError) as e:
        conv.convert(onnx_art, x[:20], PRE, out_path=tmp_path / "m.tflite")
    assert str(e.value).startswith("onnx2tf 2.x died with SIGABRT while converting model.onnx"), str(e.value)
    assert "\n" not in str(e.value)
    assert list(own_tmpdir.iterdir()) == [] and not (tmp_path / "m.tflite").exists()


def test_a_failure_is_one_line_naming_the_cause_and_a_hang_is_killed(tiny, tmp_path, own_tmpdir):
    _, x, onnx_art = tiny
    route = _fake_route(tmp_path / "route", '''
        def convert(**kw):
            if kw.get("output_integer_quantized_tflite"):
                try:
                    raise ValueError("Unsupported op for strict full integer quantization: op_type=ONE_HOT")
                except ValueError as e:
                    raise RuntimeError("flatbuffer_direct fast path failed.") from e
            import time
            time.sleep(60)
    ''')
    conv = fb.Onnx2TfFlatbufferConverter(route_dir=route, timeout_s=3)
    with pytest.raises(ConversionError) as e:
        conv.convert(onnx_art, x[:20], PRE, out_path=tmp_path / "m.tflite")
    msg = str(e.value)
    assert msg == ("onnx2tf 2.x cannot convert model.onnx: ValueError: Unsupported op for strict full integer "
                   "quantization: op_type=ONE_HOT"), msg
    with pytest.raises(ConversionError, match="did not finish converting model.onnx within 3 s"):
        conv.convert(onnx_art, x[:20], PRE, out_path=tmp_path / "m.tflite", precision="fp32")
    assert list(own_tmpdir.iterdir()) == []


@needs_route
def test_an_op_without_builtin_is_one_line_naming_the_node(tmp_path, own_tmpdir):
    import onnx
    from onnx import TensorProto, helper
    from pipeline.conversion.onnx_export import OnnxArtifact
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["r"], name="relu0"),
                           helper.make_node("Det", ["r"], ["logits"], name="my_det")], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "det.onnx")
    art = OnnxArtifact(path=tmp_path / "det.onnx", bytes=0, opset=17, input_name="input", output_name="logits",
                       dynamic_batch=True, max_abs_error=None, tolerance=None, samples=0, source="given")
    pre = preprocessing.Preprocessing(input_shape=(1, 4, 4), source_layout="NHW", source_dtype="uint8",
                                      scale=1 / 255, mean=(0.5,), std=(0.25,))
    x = np.random.default_rng(0).normal(size=(10, 1, 4, 4)).astype(np.float32)
    with pytest.raises(ConversionError) as e:
        fb.Onnx2TfFlatbufferConverter().convert(art, x, pre, out_path=tmp_path / "det.tflite")
    msg = str(e.value)
    assert msg.startswith("onnx2tf 2.x cannot convert det.onnx: no TFLite builtin op for the ONNX node my_det (Det)")
    assert "\n" not in msg and "Traceback" not in msg
    assert list(own_tmpdir.iterdir()) == []


def test_custom_op_failure_names_the_onnx_node():
    log = ("Traceback (most recent call last):\n  ...\nRuntimeError: flatbuffer_direct fast path failed.\n"
           "ROUTE_ERROR: RuntimeError: Encountered unresolved custom op: ONNX_DET. See instructions: "
           "https://www.tensorflow.org/lite/guide/ops_custom Node number 2 (ONNX_DET) failed to prepare.\n")
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Det", ["x"], ["y"], name="my_det")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    with tempfile.TemporaryDirectory() as t:
        p = f"{t}/m.onnx"
        onnx.save(helper.make_model(g), p)
        msg = fb.describe_failure(log, p, "m.onnx", 1)
    assert msg.startswith("onnx2tf 2.x cannot convert m.onnx: no TFLite builtin op for the ONNX node my_det (Det)")
    assert "http" not in msg and "\n" not in msg


def test_missing_install_says_to_run_setup(tmp_path):
    with pytest.raises(ConversionError, match=r"not installed in .*; run \./setup\.sh"):
        fb.Onnx2TfFlatbufferConverter(route_dir=tmp_path / "nowhere").preload()


def _mobile_block():
    """What stops onnx2tf 2.6.9 on real CNNs: a padded stride-2 conv under a dynamic batch (a SHAPE/FILL pad), a
    depthwise conv (its bias got the weights' quantized_dimension 3) and a padded max pool after a ReLU (onnxsim
    fuses our zero Pad back into the pool, which becomes a -3.4e38 PADV2)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5)).eval()


@needs_route
def test_strided_depthwise_and_padded_pool_convert_fully_int8(tiny, tmp_path, own_tmpdir):
    import onnxruntime as ort
    _, x, _ = tiny
    model = models.LoadedModel(spec="mobile", kind="factory", module=_mobile_block(), input_shape=(1, 12, 12))
    onnx_art = export_onnx(model, x[:16], tmp_path / "model.onnx")
    art = fb.Onnx2TfFlatbufferConverter().convert(onnx_art, x[:200], PRE, out_path=tmp_path / "m.tflite")
    insp = inspect_tflite.inspect(art.path)
    assert insp.fully_int8 and insp.ops.get("DEPTHWISE_CONV_2D") == 1 and "PADV2" not in insp.ops, insp.ops
    assert [r["name"] for r in art.rewrites] == ["fixed_batch", "maxpool_pad"]
    held_out = x[200:]
    res = TfliteRunner(art.path, kernels="builtin", threads=1, input_layout=art.input_layout).run(held_out)
    fp32 = ort.InferenceSession(str(onnx_art.path), providers=["CPUExecutionProvider"]).run(None, {"input": held_out})[0]
    assert (res.outputs.argmax(1) == fp32.argmax(1)).mean() >= 0.9
    steps = np.abs(res.outputs - fp32) / insp.outputs[0].scale[0]
    assert np.median(steps) <= 3 and steps.max() <= 32, (np.median(steps), steps.max())
