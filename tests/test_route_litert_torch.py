"""The litert-torch + ai-edge-quantizer route (pipeline/conversion/litert_torch.py) on a tiny seeded CNN:
fully int8 by the project's checker, run on LiteRT's kernels, close to PyTorch FP32; other precisions' contracts;
one-line errors."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConversionError
from pipeline.tflite.inspect import check_precision, inspect
from pipeline.inputs.preprocessing import Preprocessing
from pipeline.runtime.litert import TfliteRunner

SIZE = 12
PRE = Preprocessing(input_shape=(1, SIZE, SIZE), source_layout="NHW", source_dtype="uint8", scale=1 / 255,
                    mean=(0.0,), std=(1.0,))


def _converter():
    from pipeline.conversion.litert_torch import LiteRtTorchConverter
    return LiteRtTorchConverter()


@pytest.fixture(scope="module")
def trained(tiny_npz):
    """(model, representative NCHW, test NCHW): a seeded CNN trained on the toy quadrant data of conftest."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    z = np.load(tiny_npz, allow_pickle=False)
    x_train = z["x_train"][:, None].astype(np.float32) / 255.0
    x_test = z["x_test"][:, None].astype(np.float32) / 255.0
    x, y = torch.from_numpy(x_train), torch.from_numpy(z["y_train"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, np.ascontiguousarray(x_train[:100]), np.ascontiguousarray(x_test)


def _fp32(model, x):
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _compare(model, path, x, layout):
    runner = TfliteRunner(path, kernels="builtin", threads=1, input_layout=layout)
    q = runner.run(x).outputs
    fp = _fp32(model, x)
    agreement = float((q.argmax(1) == fp.argmax(1)).mean())
    steps = float(np.abs(q - fp).max() / runner.out_scale)
    return agreement, steps


@pytest.fixture(scope="module")
def int8_model(trained, tmp_path_factory):
    model, rep, _ = trained
    out = tmp_path_factory.mktemp("litert_torch") / "model_int8.tflite"
    art = _converter().convert_torch(model, rep, PRE, per_channel=True, out_path=out)
    return art


def test_int8_is_fully_int8_nhwc(int8_model, trained):
    art = int8_model
    assert art.converter == "litert-torch" and art.input_layout == "NHWC"
    assert art.calibration_samples == len(trained[1]) and art.bytes == art.path.stat().st_size
    insp = inspect(art.path)
    assert insp.fully_int8, insp.offending
    assert check_precision(insp, "int8").precision_ok
    assert insp.weights_per_channel
    assert insp.input_dtype == "int8" and insp.output_dtype == "int8"
    assert insp.inputs[0].shape == (1, SIZE, SIZE, 1)  # NHWC, batch 1 (see the module docstring)
    assert "QUANTIZE" not in insp.ops and "DEQUANTIZE" not in insp.ops and "TRANSPOSE" not in insp.ops


def test_int8_runs_on_litert_and_matches_torch(int8_model, trained):
    model, _, x_test = trained
    agreement, steps = _compare(model, int8_model.path, x_test, int8_model.input_layout)
    # measured: agreement 1.0 and 3.3 output steps (per channel and per tensor); bounds about 1.5x that
    assert agreement >= 0.97
    assert steps <= 5, f"max |int8 - FP32| is {steps:.1f} output quantization steps"


def test_calibration_uses_the_whole_set(trained, tmp_path):
    """The input range covers every calibration sample, also an extreme one early in the set (AEQ's default
    moving-average calibration forgets it: its ranges follow the last ~20 samples)."""
    model, rep, _ = trained
    rep = rep.copy()
    rep[0] *= 3.0
    out = tmp_path / "m.tflite"
    _converter().convert_torch(model, rep, PRE, out_path=out)
    t = inspect(out).inputs[0]
    hi = (127 - t.zero_point[0]) * t.scale[0]
    assert hi >= rep.max() * 0.99, f"int8 input covers up to {hi:.3f}, the calibration set reaches {rep.max():.3f}"


def test_per_tensor_weights(trained, tmp_path):
    model, rep, x_test = trained
    out = tmp_path / "pt.tflite"
    art = _converter().convert_torch(model, rep, PRE, per_channel=False, out_path=out)
    insp = inspect(out)
    assert insp.fully_int8, insp.offending
    assert not insp.weights_per_channel
    weights = [insp.tensors[op.inputs[1]] for op in insp.op_list if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D",
                                                                                "FULLY_CONNECTED")]
    assert weights and all(len(w.scale) == 1 for w in weights)
    agreement, steps = _compare(model, out, x_test, art.input_layout)
    assert agreement >= 0.97 and steps <= 5, (agreement, steps)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "dynamic", "int16x8"])
def test_other_precisions_meet_their_contract(trained, tmp_path, precision):
    model, rep, x_test = trained
    out = tmp_path / f"m_{precision}.tflite"
    art = _converter().convert_torch(model, rep, PRE, out_path=out, precision=precision)
    chk = check_precision(inspect(out), precision)
    assert chk.precision_ok, chk.reason
    q = TfliteRunner(out, kernels="builtin", input_layout=art.input_layout).run(x_test[:64]).outputs
    assert float((q.argmax(1) == _fp32(model, x_test[:64]).argmax(1)).mean()) >= 0.95


def _one_line_error(call) -> str:
    with pytest.raises(ConversionError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 500, msg
    return msg


def test_unknown_precision_is_one_line(trained, tmp_path):
    model, rep, _ = trained
    msg = _one_line_error(lambda: _converter().convert_torch(model, rep, PRE, out_path=tmp_path / "m.tflite",
                                                             precision="int4"))
    assert "unknown precision 'int4'" in msg


def test_precision_without_recipe_is_one_line(trained, tmp_path, monkeypatch):
    from pipeline.conversion import litert_torch as route
    monkeypatch.delitem(route.RECIPES, "fp16")  # stands for a rung registered later that AEQ has no recipe for
    model, rep, _ = trained
    msg = _one_line_error(lambda: _converter().convert_torch(model, rep, PRE, out_path=tmp_path / "m.tflite",
                                                             precision="fp16"))
    assert "no ai-edge-quantizer recipe for precision 'fp16'" in msg and "onnx2tf" in msg


def test_unexportable_model_is_one_line(trained, tmp_path):
    import torch.nn as nn

    class DataDependent(nn.Module):  # Python control flow on a tensor value: torch.export cannot trace it
        def forward(self, x):
            return x.mean((2, 3)) if x.sum() > 0 else -x.mean((2, 3))

    _, rep, _ = trained
    out = tmp_path / "m.tflite"
    msg = _one_line_error(lambda: _converter().convert_torch(DataDependent().eval(), rep, PRE, out_path=out))
    assert msg.startswith("litert-torch cannot convert this model:") and "data-dependent" in msg
    assert not out.exists()


def test_representative_of_the_wrong_shape_is_one_line(trained, tmp_path):
    model, rep, _ = trained
    msg = _one_line_error(lambda: _converter().convert_torch(model, rep[:, :, :8], PRE, out_path=tmp_path / "m.tflite"))
    assert "representative dataset has shape" in msg


def test_onnx_convert_points_to_convert_torch():
    msg = _one_line_error(lambda: _converter().convert(None, np.zeros((1, 1, SIZE, SIZE), np.float32), PRE))
    assert "convert_torch" in msg
