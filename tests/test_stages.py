"""Each stage on its own: ONNX export, int8 conversion, flatbuffer inspection, runtime, comparison."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.conversion import get_converter
from pipeline.calib_data import CalibContext, build
from pipeline.conversion import onnx2tf_tflite as convert
from pipeline.tflite import inspect as inspect_tflite
from pipeline.reliability import metrics
from pipeline.inputs import models
from pipeline.inputs import preprocessing
from pipeline.errors import CalibrationError, ExportError
from pipeline.conversion.onnx_export import export_onnx
from pipeline.runtime.litert import TfliteRunner


def _tiny_cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    with torch.no_grad():  # non-trivial BN statistics, so folding matters
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


PRE = preprocessing.Preprocessing(input_shape=(1, 12, 12), source_layout="NHW", source_dtype="uint8",
                                  scale=1 / 255, mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def raw_images():
    return np.random.default_rng(0).integers(0, 256, (300, 1, 12, 12)).astype(np.uint8)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, raw_images):
    """ONNX export + int8 conversion of a tiny CNN, shared by the tests below."""
    d = tmp_path_factory.mktemp("stages")
    model = models.LoadedModel(spec="tiny", kind="factory", module=_tiny_cnn(), input_shape=(1, 12, 12))
    x = preprocessing.apply(raw_images, PRE)
    onnx_art = export_onnx(model, x[:16], d / "model.onnx")
    tfl = get_converter("onnx2tf").convert(onnx_art, x[:200], PRE, per_channel=True,
                                                  out_path=d / "model_int8.tflite")
    return model, x, onnx_art, tfl


def test_onnx_export_matches_pytorch_with_dynamic_batch(converted):
    import onnx
    import onnxruntime as ort
    model, x, onnx_art, _ = converted
    assert onnx_art.dynamic_batch and onnx_art.max_abs_error <= onnx_art.tolerance
    proto = onnx.load(str(onnx_art.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(onnx_art.path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x[:37]})[0]  # a batch size never seen at export
    np.testing.assert_allclose(out, models.run_fp32(model, x[:37]), atol=1e-4)


def test_onnx_export_fails_clearly_when_outputs_differ(tmp_path, raw_images):
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _tiny_cnn()

        def forward(self, x):
            y = self.net(x)
            return y + 5 * torch.rand_like(y)

    model = models.LoadedModel(spec="noisy", kind="factory", module=Noisy().eval(), input_shape=(1, 12, 12))
    with pytest.raises(ExportError, match="ONNX outputs differ from PyTorch"):
        export_onnx(model, preprocessing.apply(raw_images[:8], PRE), tmp_path / "m.onnx")


def test_adaptive_pool_whose_output_does_not_divide_the_input_exports_and_converts_fully_int8(tmp_path, raw_images):
    """alexnet's AdaptiveAvgPool2d((6, 6)) at 64x64 (input 1x1) has no torch.onnx export; here 12x12 -> 5x5 and
    3x3 -> 6x6. The export substitutes the exact MatMul form, records it, and the model converts and runs int8."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((5, 5)), nn.Conv2d(8, 8, 1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(6), nn.Flatten(), nn.Linear(8 * 36, 5))
    model = models.LoadedModel(spec="adaptive", kind="factory", module=net.eval(), input_shape=(1, 12, 12))
    x = preprocessing.apply(raw_images, PRE)
    art = export_onnx(model, x[:16], tmp_path / "model.onnx")
    assert art.max_abs_error <= art.tolerance
    (rec,) = art.rewrites
    assert rec["name"] == "adaptive_avg_pool_matmul" and rec["pools"] == 2
    assert rec["shapes"] == ["12x12->5x5", "2x2->6x6"] and art.describe()["rewrites"][0]["exact"]
    tfl = get_converter("onnx2tf").convert(art, x[:200], PRE, per_channel=True, out_path=tmp_path / "m.tflite")
    assert inspect_tflite.inspect(tfl.path).fully_int8
    got = TfliteRunner(tfl.path).run(x[:200]).outputs
    ref = models.run_fp32(model, x[:200])
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_a_divisible_adaptive_pool_is_exported_as_is(tmp_path, raw_images):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 5))
    model = models.LoadedModel(spec="adaptive", kind="factory", module=net.eval(), input_shape=(1, 12, 12))
    art = export_onnx(model, preprocessing.apply(raw_images[:8], PRE), tmp_path / "model.onnx")
    assert art.rewrites == () and "rewrites" not in art.describe()


def test_conversion_is_fully_int8_with_per_channel_weights(converted):
    _, _, _, tfl = converted
    insp = inspect_tflite.inspect(tfl.path)
    assert insp.fully_int8, insp.offending
    assert insp.input_dtype == "int8" and insp.output_dtype == "int8"
    assert insp.weights_per_channel
    assert insp.dynamic_batch
    assert {"CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D"} <= set(insp.ops)
    assert "int8" in insp.dtype_counts and "float32" not in insp.dtype_counts
    conv = next(o for o in insp.op_list if o.name == "CONV_2D")
    w = insp.tensors[conv.inputs[1]]
    assert w.dtype == "int8" and len(w.scale) == 6 and set(w.zero_point) == {0}  # symmetric, per channel
    assert insp.tensors[conv.inputs[2]].dtype == "int32"  # bias


def test_conversion_leaves_no_variants(converted):
    _, _, onnx_art, tfl = converted
    assert sorted(p.name for p in tfl.path.parent.iterdir()) == ["model.onnx", "model_int8.tflite"]


def test_inspector_flags_a_float_model(tmp_path):
    import tensorflow as tf
    fn = tf.function(lambda x: tf.nn.relu(x * 2.0 + 1.0), input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    blob = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()]).convert()
    p = tmp_path / "float.tflite"
    p.write_bytes(blob)
    insp = inspect_tflite.inspect(p)
    assert not insp.fully_int8
    assert insp.input_dtype == "float32"
    assert any("float32" in o for o in insp.offending)
    assert any(o.startswith(("MUL", "ADD", "RELU")) for o in insp.offending)


def test_inspector_flags_a_hybrid_model(tmp_path, converted):
    """Dynamic-range (weights int8, activations float) is what ultralytics' int8=True hands out: not fully int8."""
    import tensorflow as tf
    import onnx2tf
    _, _, onnx_art, _ = converted
    km = onnx2tf.convert(input_onnx_file_path=str(onnx_art.path), output_folder_path=str(tmp_path / "o"),
                         disable_model_save=True, not_use_onnxsim=True, non_verbose=True)
    fn = tf.function(lambda x: km(x), input_signature=[tf.TensorSpec(km.inputs[0].shape, tf.float32)])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], km)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    p = tmp_path / "dynamic.tflite"
    p.write_bytes(conv.convert())
    insp = inspect_tflite.inspect(p)
    assert not insp.fully_int8
    assert any(o.startswith("CONV_2D") or o.startswith("FULLY_CONNECTED") for o in insp.offending)


def test_inspector_rejects_garbage(tmp_path):
    p = tmp_path / "x.tflite"
    p.write_bytes(b"\x00" * 64)
    with pytest.raises(Exception):
        inspect_tflite.inspect(p)


def test_batched_run_equals_one_at_a_time(converted):
    _, x, _, tfl = converted
    batched = TfliteRunner(tfl.path, kernels="xnnpack", threads=2, batch_size=64).run(x[:150])
    single = TfliteRunner(tfl.path, kernels="xnnpack", threads=1, batch_size=1).run(x[:150])
    assert batched.batch_size == 64 and single.batch_size == 1
    np.testing.assert_array_equal(batched.raw_outputs, single.raw_outputs)


def test_a_batch_the_kernels_refuse_to_prepare_falls_back_to_one_at_a_time(converted, monkeypatch):
    """googlenet's converted model once failed to prepare on XNNPACK at batch 256 while it ran at batch 1: the
    evaluation must run it one image at a time (and say so), not fail. The refusal is injected into the real
    interpreter's allocate_tensors for batches above 1; the run itself is on the real kernels."""
    from ai_edge_litert import interpreter as litert_interpreter
    _, x, _, tfl = converted
    real = litert_interpreter.Interpreter.allocate_tensors

    def refuse_batches(self):
        if self.get_input_details()[0]["shape"][0] > 1:
            raise RuntimeError("Failed to prepare for a large batch (injected)\nNode number 3 failed")
        return real(self)

    monkeypatch.setattr(litert_interpreter.Interpreter, "allocate_tensors", refuse_batches)
    res = TfliteRunner(tfl.path, kernels="xnnpack", threads=1, batch_size=64).run(x[:70])
    assert res.batch_size == 1
    assert res.batch_fallback.startswith("LiteRT cannot prepare the model for a batch of 64: Failed to prepare "
                                         "for a large batch (injected); ran one image at a time")
    assert res.describe()["batch_fallback"] == res.batch_fallback
    monkeypatch.setattr(litert_interpreter.Interpreter, "allocate_tensors", real)
    np.testing.assert_array_equal(res.raw_outputs,
                                  TfliteRunner(tfl.path, kernels="xnnpack", threads=1, batch_size=64).run(x[:70]).raw_outputs)


def test_reference_kernels_agree_with_xnnpack_within_one_step(converted):
    _, x, _, tfl = converted
    a = TfliteRunner(tfl.path, kernels="xnnpack", threads=1).run(x[:100]).raw_outputs.astype(int)
    b = TfliteRunner(tfl.path, kernels="ref", threads=1).run(x[:100]).raw_outputs.astype(int)
    assert np.abs(a - b).max() <= 1


def test_int8_tracks_fp32_within_output_steps(converted):
    """Regression: dequantized int8 outputs stay within a few output quantization steps of FP32."""
    model, x, _, tfl = converted
    res = TfliteRunner(tfl.path, kernels="xnnpack", threads=1).run(x[200:300])  # not calibration samples
    fp32 = models.run_fp32(model, x[200:300])
    scale = inspect_tflite.inspect(tfl.path).outputs[0].scale[0]
    steps = np.abs(res.outputs - fp32) / scale
    assert np.median(steps) <= 2.0 and steps.max() <= 8.0, (np.median(steps), steps.max())


def test_compare_on_hand_made_logits():
    labels = np.array([0, 1, 2, 0])
    fp32 = np.array([[3, 1, 0], [0, 2, 1], [0, 1, 2], [1, 2, 0]], np.float32)  # 3/4 right
    int8 = np.array([[3, 1, 0], [0, 2, 1], [2, 1, 0], [2, 1, 0]], np.float32)  # 3/4 right, 2 flips
    c = metrics.compare(fp32, int8, labels, output_scale=0.5)
    assert c.fp32_top1 == 0.75 and c.int8_top1 == 0.75 and c.drop_pp == 0.0
    assert c.agreement == 0.5 and c.flips == 2
    assert c.max_abs_error == 2.0 and c.max_error_steps == 4.0
    assert c.mean_abs_error == pytest.approx(np.abs(fp32 - int8).mean())


def test_calibration_sources_are_balanced_seeded_and_from_train():
    y = np.repeat(np.arange(4), [50, 30, 10, 110])
    x = np.arange(200, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 12, 12), np.uint8)
    ctx = CalibContext(x_train=x, y_train=y, preprocessing=PRE, dataset_name="toy")
    a = build("balanced", ctx, 40, seed=1)
    assert a.describe()["per_class"] == [10, 10, 10, 10]
    np.testing.assert_array_equal(a.array(), build("balanced", ctx, 40, seed=1).array())
    assert not np.array_equal(a.array(), build("balanced", ctx, 40, seed=2).array())
    per_class = build("balanced", ctx, 60, seed=0).describe()["per_class"]
    assert sum(per_class) == 60 and per_class[2] == 10  # class 2 holds only 10: the others share the rest
    others = [per_class[i] for i in (0, 1, 3)]
    assert max(others) - min(others) <= 1
    with pytest.raises(CalibrationError, match="is larger than the"):
        build("balanced", ctx, 201, seed=0)
    with pytest.raises(CalibrationError, match="empty"):
        build("balanced", ctx, 0, seed=0)
    with pytest.raises(CalibrationError, match="did you mean balanced"):
        build("balancd", ctx, 10, seed=0)


def test_conversion_in_the_worker_process_gives_the_same_bytes(converted, tmp_path):
    """The export's worker process (imports overlapped with setup) converts exactly as in-process."""
    from pipeline.conversion.worker import ConverterProcess
    _, x, onnx_art, tfl = converted
    art = ConverterProcess("onnx2tf").convert(onnx_art, x[:200], PRE, per_channel=True,
                                              out_path=tmp_path / "w.tflite")
    assert (tmp_path / "w.tflite").read_bytes() == tfl.path.read_bytes()
    assert art.input_layout == tfl.input_layout and art.calibration_samples == 200
    assert art.timings_s["worker_import_s"] > 0 and "import_s" not in art.timings_s
    # A PipelineError in the worker comes back as the same class and message.
    with pytest.raises(convert.ConversionError, match="unknown precision 'int3'"):
        ConverterProcess("onnx2tf").convert(onnx_art, x[:200], PRE, per_channel=True,
                                            out_path=tmp_path / "bad.tflite", precision="int3")
    assert not (tmp_path / "bad.tflite").exists()


def test_a_dead_conversion_worker_is_a_clear_error(converted, tmp_path):
    import os
    import signal
    from pipeline.conversion.worker import ConverterProcess
    _, x, onnx_art, _ = converted
    proc = ConverterProcess("onnx2tf")
    os.kill(proc._proc.pid, signal.SIGKILL)
    proc._proc.join(10)
    with pytest.raises(convert.ConversionError, match=r"onnx2tf\+tflite-converter conversion process died with SIGKILL"):
        proc.convert(onnx_art, x[:50], PRE, per_channel=True, out_path=tmp_path / "dead.tflite")
    assert not (tmp_path / "dead.tflite").exists()


def test_unknown_converter_is_a_usage_error():
    from pipeline.errors import UsageError
    with pytest.raises(UsageError, match="unknown converter 'nope'; choose auto or one of direct, onnx2tf, litert-torch, onnx2tf-flatbuffer"):
        get_converter("nope")


def test_converter_errors_are_cut_to_the_line_that_says_what_failed(tmp_path):
    """Keras call failures start with 'in user code:' and a traceback; TFLiteConverter puts its reason late."""
    from pipeline.conversion.onnx2tf_tflite import _describe_failure, _short
    keras = ValueError("in user code:\n\n    File \"/x/convert.py\", line 126, in None  *\n        lambda x: keras_model(x)\n\n"
                       "    ValueError: Exception encountered when calling layer 'tf.math.multiply_6' (type TFOpLambda).\n"
                       "    \n    Dimensions must be equal, but are 8 and 64 for '{{node model_2/tf.math.multiply_6/Mul}} "
                       "= Mul[T=DT_FLOAT](a, b)' with input shapes: [?,8,8,64], [64,1,1].\n")
    assert _short(keras) == ("ValueError: Exception encountered when calling layer 'tf.math.multiply_6' (type "
                             "TFOpLambda): Dimensions must be equal, but are 8 and 64 with input shapes: "
                             "[?,8,8,64], [64,1,1].")
    msg = _describe_failure(keras, "", tmp_path / "none.onnx")
    assert msg.startswith("ONNX -> TFLite conversion failed: ValueError: ") and "--converter litert-torch" in msg
    assert "in user code" not in msg
    erf = RuntimeError("Could not translate MLIR to FlatBuffer.\n<string>:1:1: error: 'tf.Erf' op is neither a "
                       "custom op nor a flex op")
    assert "nn.GELU(approximate='tanh')" in _short(erf)


def test_run_batches_hold_about_32_mib_of_input():
    """--batch-size is the most: 3x224x224 float32 images run 55 at a time (256 took resnet18's export to 4.8 GB)."""
    from pipeline.export import run_batch
    assert run_batch(256, (1, 28, 28)) == 256
    assert run_batch(256, (3, 224, 224)) == 55
    assert run_batch(16, (3, 224, 224)) == 16
    assert run_batch(256, (3, 4096, 4096)) == 1
