"""pipeline.testing: TFLite vs PyTorch in output quantization steps, and golden outputs, on real LiteRT kernels."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.errors import UsageError
from pipeline.testing import (
    assert_tflite_matches_golden,
    assert_tflite_matches_torch,
    compare_tflite_torch,
    load_golden,
    write_golden,
)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        for bn in (m[1], m[5]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _toy_inputs(n: int, seed: int) -> np.ndarray:
    """Normalised float32 N×1×12×12 inputs: noise plus a bright quadrant (the conftest toy data's pattern)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.25, (n, 1, 12, 12)).astype(np.float32)
    for i, q in enumerate(rng.integers(0, 4, n)):
        r, c = divmod(int(q), 2)
        x[i, 0, r * 6:(r + 1) * 6, c * 6:(c + 1) * 6] += 0.6
    return x


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny model converted once to full int8 (onnx2tf + TFLiteConverter, 200 calibration samples)."""
    from pipeline.conversion import get_converter
    from pipeline.inputs.models import LoadedModel
    from pipeline.conversion.onnx_export import export_onnx
    from pipeline.inputs.preprocessing import Preprocessing

    d = tmp_path_factory.mktemp("testing")
    model = _tiny_model()
    calib = _toy_inputs(200, seed=1)
    pre = Preprocessing(input_shape=(1, 12, 12), source_layout="NCHW", source_dtype="float32", scale=1.0,
                        mean=(0.0,), std=(1.0,), raw_range=(0.0, 1.0))
    onnx = export_onnx(LoadedModel(spec="test:tiny", kind="factory", module=model, input_shape=(1, 12, 12)),
                       calib[:32], d / "model.onnx")
    tfl = get_converter("onnx2tf").convert(onnx, calib, pre, per_channel=True, out_path=d / "model_int8.tflite")
    return model, tfl.path, onnx, pre, d


def _interpreter_outputs(path, x_nchw: np.ndarray) -> tuple[np.ndarray, float]:
    """Dequantized outputs from a plain LiteRT Interpreter, one sample at a time (independent of pipeline.runtime.litert)."""
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_path=str(path), num_threads=1)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]])
    interp.allocate_tensors()
    s_in, z_in = inp["quantization"]
    s_out, z_out = out["quantization"]
    ys = []
    for sample in x_nchw:
        q = np.clip(np.round(sample.transpose(1, 2, 0) / s_in) + z_in, -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], q[None])
        interp.invoke()
        ys.append((interp.get_tensor(out["index"])[0].astype(np.float32) - z_out) * s_out)
    return np.stack(ys), float(s_out)


def test_passes_within_steps_and_matches_an_independent_interpreter_run(converted):
    model, path, *_ = converted
    x = _toy_inputs(40, seed=7)
    # Two conv layers, one pooling and one linear layer in int8: a few steps of the output scale at most.
    cmp = assert_tflite_matches_torch(model, path, x, max_steps=4)
    assert cmp.max_steps <= 4
    assert cmp.samples == 40 and cmp.outputs_per_sample == 4
    expected, scale = _interpreter_outputs(path, x)
    assert cmp.output_scale == pytest.approx(scale, rel=0, abs=0)
    np.testing.assert_array_equal(cmp.tflite, expected)  # NHWC + quantization handled as a plain interpreter does
    with torch.no_grad():
        np.testing.assert_array_equal(cmp.reference, model(torch.from_numpy(x)).numpy())
    steps = np.abs(cmp.reference.astype(np.float64) - cmp.tflite) / scale
    assert cmp.max_steps == pytest.approx(steps.max())
    assert cmp.where == tuple(int(v) for v in np.unravel_index(steps.argmax(), steps.shape))


def test_failure_says_max_difference_where_and_how_many_steps(converted):
    model, path, *_ = converted
    x = _toy_inputs(40, seed=7)
    tflite, scale = _interpreter_outputs(path, x)
    offset = torch.zeros(4)
    offset[2] = 12.0 * scale  # a PyTorch model that disagrees by 12 output steps on output 2

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, t):
            return self.inner(t) + offset

    shifted = Shifted().eval()
    with torch.no_grad():
        ref = shifted(torch.from_numpy(x)).numpy().astype(np.float64)
    steps = np.abs(ref - tflite) / scale
    sample, output = np.unravel_index(steps.argmax(), steps.shape)
    assert output == 2

    with pytest.raises(AssertionError) as e:
        assert_tflite_matches_torch(shifted, path, x, max_steps=4)
    msg = str(e.value)
    assert f"at sample {sample}, output 2 " in msg
    got_steps = float(re.search(r"= ([0-9.]+) output quantization steps", msg).group(1))
    assert got_steps == pytest.approx(steps.max(), abs=0.01)
    got_diff = float(re.search(r"by up to ([0-9.e-]+) =", msg).group(1))
    assert got_diff == pytest.approx(steps.max() * scale, rel=1e-5)
    over = steps > 4
    assert f"{int(over.sum())} of 160 outputs in {int(over.any(axis=1).sum())} of 40 samples exceed it" in msg


def test_torch_tensor_inputs_give_the_same_comparison(converted):
    model, path, *_ = converted
    x = _toy_inputs(8, seed=3)
    a = compare_tflite_torch(model, path, x)
    b = compare_tflite_torch(model, path, torch.from_numpy(x))
    np.testing.assert_array_equal(a.tflite, b.tflite)
    assert a.max_steps == b.max_steps


@pytest.mark.parametrize("bad, fragment", [
    (np.zeros((2, 1, 10, 10), np.float32), "neither NHWC nor NCHW"),
    (np.zeros((1, 12, 12), np.float32), "N×C×H×W"),
    (np.zeros((2, 1, 12, 12), np.uint8), "raw images"),
    (np.zeros((0, 1, 12, 12), np.float32), "no samples"),
])
def test_bad_inputs_raise_usage_errors(converted, bad, fragment):
    model, path, *_ = converted
    with pytest.raises(UsageError, match=fragment):
        assert_tflite_matches_torch(model, path, bad, max_steps=4)


def test_training_mode_missing_file_and_negative_limit_are_refused(converted, tmp_path):
    model, path, *_ = converted
    x = _toy_inputs(2, seed=0)
    model.train()
    try:
        with pytest.raises(UsageError, match="model.eval"):
            assert_tflite_matches_torch(model, path, x, max_steps=4)
    finally:
        model.eval()
    with pytest.raises(UsageError, match="does not exist"):
        assert_tflite_matches_torch(model, tmp_path / "none.tflite", x, max_steps=4)
    with pytest.raises(UsageError, match="negative"):
        assert_tflite_matches_torch(model, path, x, max_steps=-1)


def test_float_output_model_is_refused(converted):
    from pipeline.conversion import get_converter
    model, _, onnx, pre, d = converted
    fp32 = get_converter("onnx2tf").convert(onnx, _toy_inputs(8, 1), pre, per_channel=True,
                                            out_path=d / "model_fp32.tflite", precision="fp32")
    with pytest.raises(UsageError, match="no quantization step"):
        assert_tflite_matches_torch(model, fp32.path, _toy_inputs(2, 0), max_steps=4)


def test_golden_round_trip_and_a_changed_output_is_reported(converted, tmp_path):
    _, path, *_ = converted
    x = _toy_inputs(10, seed=5)
    folder = write_golden(tmp_path / "g", path, x, kernels=(("ref", 1), ("xnnpack", 2)),
                          meta={"versions": {"tensorflow": "test"}})
    xs, outputs, meta = load_golden(folder)
    np.testing.assert_array_equal(xs, x)
    raw = outputs["ref"]
    assert raw.dtype == np.int8 and raw.shape == (10, 4) and meta["outputs"]["xnnpack"]["threads"] == 2
    np.testing.assert_array_equal(assert_tflite_matches_golden(path, folder), raw)
    np.testing.assert_array_equal(assert_tflite_matches_golden(path, folder, kernels="xnnpack"), outputs["xnnpack"])
    with pytest.raises(UsageError, match="not 'builtin'"):
        assert_tflite_matches_golden(path, folder, kernels="builtin")

    tampered = raw.copy()
    v = int(raw[3, 1])
    tampered[3, 1] = v + 2 if v <= 125 else v - 2
    np.save(folder / "int8_outputs_ref.npy", tampered, allow_pickle=False)
    with pytest.raises(AssertionError, match=r"differ by up to 2 step\(s\) \(limit 0\) at sample 3, output 1"):
        assert_tflite_matches_golden(path, folder)
    assert_tflite_matches_golden(path, folder, max_steps=2)

    meta["output_scale"] *= 1.01
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(AssertionError, match=r"output quantization changed.*written with \{'tensorflow': 'test'\}"):
        assert_tflite_matches_golden(path, folder, max_steps=2)


def test_golden_keeps_its_model_and_detects_an_edited_copy(converted, tmp_path):
    from pipeline.testing import golden_model
    _, path, *_ = converted
    folder = write_golden(tmp_path / "g", path, _toy_inputs(4, 2), kernels=(("ref", 1),))
    stored = golden_model(folder)
    assert stored.read_bytes() == path.read_bytes() and stored.parent == folder
    np.testing.assert_array_equal(assert_tflite_matches_golden(stored, folder), load_golden(folder)[1]["ref"])
    blob = bytearray(stored.read_bytes())
    blob[-1] ^= 0xFF
    stored.write_bytes(bytes(blob))
    with pytest.raises(AssertionError, match="the golden folder was edited"):
        golden_model(folder)
    stored.unlink()
    with pytest.raises(UsageError, match="holds no copy of its model"):
        golden_model(folder)


def test_golden_arrays_are_never_unpickled(converted, tmp_path):
    _, path, *_ = converted
    folder = write_golden(tmp_path / "g", path, _toy_inputs(2, 0))
    np.save(folder / "int8_outputs_ref.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_golden(folder)


def test_tuple_outputs_use_the_first_and_other_outputs_are_refused(converted):
    model, path, *_ = converted
    x = _toy_inputs(6, seed=2)

    class Pair(nn.Module):
        def forward(self, t):
            return model(t), t.mean()

    class Dict(nn.Module):
        def forward(self, t):
            return {"logits": model(t)}

    a = compare_tflite_torch(Pair().eval(), path, x)
    np.testing.assert_array_equal(a.reference, compare_tflite_torch(model, path, x).reference)
    with pytest.raises(UsageError, match="returned dict"):
        compare_tflite_torch(Dict().eval(), path, x)
