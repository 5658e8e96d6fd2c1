"""Route ``direct`` (pipeline/conversion/direct.py): this project's own ONNX -> fully-int8 TFLite writer.

Each small model below holds one family of the ops the writer covers; it is exported to ONNX (dynamic batch),
written by the route from a representative set, inspected (fully int8, int8 input and output) and run on LiteRT's
reference kernels and XNNPACK against onnxruntime's FP32 outputs on other inputs: the int8 outputs must stay within
a few output quantization steps and agree on the top-1. A graph with an op the writer does not cover is declined
with one line naming the node, before anything is written. LiteRT runs in a subprocess (an int8 model it cannot
run could abort it, which would take pytest with it)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.conversion.direct import DirectConverter, unsupported
from pipeline.conversion.onnx_export import OnnxArtifact

ROOT = Path(__file__).resolve().parents[1]


class Plain(nn.Module):
    """Conv+BN+ReLU (fused), a stride-2 conv whose PyTorch padding is not TFLite's SAME (explicit PAD), a padded
    max pool (PADV2 at the int8 minimum), global average pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 24, 3, 2, 1)
        self.p = nn.MaxPool2d(3, 2, 1)
        self.h = nn.Linear(24, 7)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.p(torch.relu(self.c2(y)))
        return self.h(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Mobile(nn.Module):
    """Depthwise (multiplier 1 and 2) and pointwise convs, ReLU6, a residual Add, SiLU (Sigmoid x Mul), an SE
    gate (mean, Mul broadcast over H x W), HardSwish, an average pool, Flatten of a 2x2 map (TRANSPOSE first)
    and a MatMul + bias head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.dw2 = nn.Conv2d(8, 16, 5, 1, 2, groups=8)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.pool = nn.AvgPool2d(4)
        self.w = nn.Parameter(torch.randn(64, 6) * 0.2)
        self.b = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x):
        y = F.relu6(self.stem(x))
        y = y + self.pw(F.relu6(self.dw(y)))
        y = F.silu(self.dw2(y))
        y = y * torch.sigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        y = F.hardswish(self.pool(y))
        return torch.flatten(y, 1) @ self.w + self.b


class Branches(nn.Module):
    """Concat of two branches along channels (requantized to one scale), a BatchNormalization after it (densenet's:
    not folded into a conv; a 1x1 depthwise conv), Softmax output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 3, 1, 1)
        self.h = nn.Linear(16, 5)

        self.bn = nn.BatchNorm2d(16)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return torch.softmax(self.h(torch.relu(self.bn(y)).mean((2, 3))), 1)


class Wide(nn.Module):
    """A grouped convolution (SPLIT, a CONV_2D per group, CONCATENATION), a ceil_mode max pool (extra bottom/right
    padding), a layer scale (Mul by a per-channel constant), normalisation by constants (Sub, Div), a
    mobilenet_v3 squeeze-excite gate with HardSigmoid (ADD + RELU6, MUL by 1/6)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, 1, 1)
        self.g = nn.Conv2d(12, 24, 3, 1, 1, groups=4)
        self.p = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.gamma = nn.Parameter(torch.rand(24, 1, 1) + 0.5)
        self.se1, self.se2 = nn.Conv2d(24, 8, 1), nn.Conv2d(8, 24, 1)
        self.h = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.c1((x - 0.25) / 1.5))
        y = self.p(torch.relu(self.g(y))) * self.gamma
        y = y * F.hardsigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.h(y.mean((2, 3)))


class Odd(nn.Module):
    """LeakyReLU, an explicit zero F.pad, Tanh, a ceil_mode average pool that counts no padding, a global max pool."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.h = nn.Linear(8, 4)

    def forward(self, x):
        y = F.leaky_relu(self.c1(x), 0.1)
        y = torch.tanh(self.c2(F.pad(y, (1, 2, 0, 1))))  # 13 x 15: the pool below has partial windows
        y = F.avg_pool2d(y, 2, 2, ceil_mode=True, count_include_pad=False)  # timm's avg_down: TFLite SAME
        return self.h(torch.flatten(F.adaptive_max_pool2d(y, 1), 1))


class Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.h = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        return self.h(F.gelu(self.c(x)).mean((2, 3)))


class Cuts(nn.Module):
    """A ghost module (Concat, then Slice of the first channels), an unequal torch.split (ONNX Split: SPLIT_V), a
    Slice of H with negative bounds and one of the feature vector."""

    def __init__(self):
        super().__init__()
        self.p, self.d = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, 1, 1, groups=6)
        self.a, self.b = nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(6, 4, 1)
        self.h = nn.Linear(6, 5)

    def forward(self, x):
        y = self.p(x)
        y = torch.cat([y, torch.relu(self.d(y))], 1)[:, :9]  # ghost: keep 9 of 12 channels
        u, v = torch.split(y, [3, 6], dim=1)
        y = torch.cat([self.a(u), self.b(v)], 1)[:, :, 1:-1, :]
        z = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        return self.h(z[:, 1:7])


class Shuffle(nn.Module):
    """ShuffleNet v2's unit: chunk into two halves (two Slices, their bounds computed from x.size()), a branch, Concat, then torchvision's channel shuffle
    (view to N x groups x C/groups x H x W, transpose 1 and 2, view back: its shapes computed from x.size())."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, 2, 1)
        self.b = nn.Sequential(nn.Conv2d(6, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, 1, 1, groups=6), nn.Conv2d(6, 6, 1),
                               nn.ReLU())
        self.h = nn.Linear(12 * 8 * 8, 5)

    @staticmethod
    def shuffle(x, groups):
        n, c, h, w = x.size()
        return torch.transpose(x.view(n, groups, c // groups, h, w), 1, 2).contiguous().view(n, -1, h, w)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        u, v = y.chunk(2, dim=1)
        y = self.shuffle(torch.cat([u, self.b(v)], 1), 2)
        y = self.shuffle(y, 3)
        return self.h(torch.flatten(y, 1))  # NCHW order of the shuffled channels reaches the head


def _onnx(module: nn.Module, path: Path, size: int = 16, batch=None) -> OnnxArtifact:
    torch.manual_seed(0)
    module.eval()
    x = torch.randn(2 if batch is None else batch, 3, size, size)
    torch.onnx.export(module, x, str(path), input_names=["input"], output_names=["output"], opset_version=17,
                      do_constant_folding=True, dynamo=False,
                      dynamic_axes=None if batch else {"input": {0: "n"}, "output": {0: "n"}})
    return OnnxArtifact(path=path, bytes=path.stat().st_size, opset=17, input_name="input", output_name="output",
                        dynamic_batch=batch is None, max_abs_error=None, tolerance=None, samples=0, source="exported")


def _fp32(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))]) \
        if s.get_inputs()[0].shape[0] == 1 else s.run(None, {"input": x})[0]


_RUN = textwrap.dedent('''
    import json, sys
    import numpy as np
    from pipeline.runtime.litert import TfliteRunner
    from pipeline.tflite.inspect import inspect
    model, inputs, kernels, out = sys.argv[1:5]
    x = np.load(inputs)
    info = inspect(model)
    r = TfliteRunner(model, kernels=kernels, threads=2, batch_size=16 if info.dynamic_batch else 1)
    res = r.run(x)
    np.save(out, res.outputs)
    o = info.outputs[0]
    print(json.dumps({"fully_int8": info.fully_int8, "ops": sorted(info.ops), "offending": list(info.offending),
                      "in": info.inputs[0].dtype, "out": o.dtype,
                      "out_scale": float(o.scale[0]) if o.scale else None}))
''')


def _litert(model: Path, x: np.ndarray, kernels: str, tmp: Path) -> tuple[dict, np.ndarray]:
    np.save(tmp / "x.npy", x)
    p = subprocess.run([sys.executable, "-c", _RUN, str(model), str(tmp / "x.npy"), kernels, str(tmp / "y.npy")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), np.load(tmp / "y.npy")


def _convert(art: OnnxArtifact, tmp: Path, precision: str = "int8", per_channel: bool = True, n: int = 200):
    rng = np.random.default_rng(1)
    rep = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
    return DirectConverter().convert(art, rep, None, per_channel=per_channel, out_path=tmp / f"m_{precision}.tflite",
                                     precision=precision)


@pytest.mark.parametrize("net", [Plain, Mobile, Branches, Wide, Odd, Cuts, Shuffle])
@pytest.mark.parametrize("kernels", ["ref", "xnnpack"])
def test_int8_close_to_fp32_on_litert(net, kernels, tmp_path):
    torch.manual_seed(0)
    art = _convert(_onnx(net(), tmp_path / "m.onnx"), tmp_path)
    assert art.converter == "direct" and art.input_layout == "NHWC"
    x = np.random.default_rng(7).standard_normal((64, 3, 16, 16)).astype(np.float32)
    ref = _fp32(tmp_path / "m.onnx", x)
    info, y = _litert(art.path, x, kernels, tmp_path)
    assert info["fully_int8"] and info["in"] == "int8" and info["out"] == "int8", info
    steps = float(np.abs(y - ref).max()) / info["out_scale"]
    # a few output steps: activations and weights each rounded once per layer (Odd: TANH's fixed 1/128 output
    # scale is coarse against its small range; its float model written the same way matches to 6e-8)
    assert steps <= 12, (steps, info)
    assert np.mean(y.argmax(1) == ref.argmax(1)) >= 0.9
    if net is Plain:
        assert {"PAD", "PADV2", "MAX_POOL_2D", "MEAN", "FULLY_CONNECTED"} <= set(info["ops"]), info["ops"]
    if net is Mobile:
        assert {"DEPTHWISE_CONV_2D", "ADD", "MUL", "LOGISTIC", "HARD_SWISH", "AVERAGE_POOL_2D", "TRANSPOSE"} \
            <= set(info["ops"]), info["ops"]
    if net is Branches:
        assert {"CONCATENATION", "QUANTIZE", "DEPTHWISE_CONV_2D", "SOFTMAX"} <= set(info["ops"]), info["ops"]
    if net is Odd:
        assert {"LEAKY_RELU", "PAD", "TANH", "AVERAGE_POOL_2D", "MAX_POOL_2D"} <= set(info["ops"]), info["ops"]
    if net is Wide:
        assert {"SPLIT", "CONCATENATION", "MUL", "ADD"} <= set(info["ops"]), info["ops"]
    if net is Cuts:
        assert {"SLICE", "SPLIT_V", "CONCATENATION"} <= set(info["ops"]), info["ops"]
    if net is Shuffle:
        assert {"SLICE", "RESHAPE", "TRANSPOSE"} <= set(info["ops"]), info["ops"]  # ceil_mode pool: SAME here


@pytest.mark.parametrize("net", [Mobile, Branches, Wide, Odd, Cuts, Shuffle])
def test_float32_model_matches_onnxruntime(net, tmp_path):
    """precision fp32 (the layer-wise debugger's reference): same graph and names, float weights, no rounding."""
    torch.manual_seed(0)
    art = _convert(_onnx(net(), tmp_path / "m.onnx"), tmp_path, precision="fp32")
    x = np.random.default_rng(3).standard_normal((16, 3, 16, 16)).astype(np.float32)
    info, y = _litert(art.path, x, "ref", tmp_path)
    assert info["in"] == "float32" and not info["fully_int8"]
    np.testing.assert_allclose(y, _fp32(tmp_path / "m.onnx", x), atol=2e-4, rtol=1e-4)


def test_per_tensor_weights_and_fixed_batch(tmp_path):
    art = _convert(_onnx(Plain(), tmp_path / "m.onnx", batch=1), tmp_path, per_channel=False)
    x = np.random.default_rng(5).standard_normal((20, 3, 16, 16)).astype(np.float32)
    info, y = _litert(art.path, x, "ref", tmp_path)
    assert info["fully_int8"]
    assert np.abs(y - _fp32(tmp_path / "m.onnx", x)).max() / info["out_scale"] <= 10


class Vanishing(nn.Module):
    """A near-zero signal into a head with an ordinary bias (a deep randomly initialised net: googlenet's last
    block is calibrated to a range of ~1e-11): at scale input_scale x weight_scale the int32 biases would be ~1e13
    steps. Conv (per-channel and per-tensor) and Linear heads."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, 1, 1)
        self.h = nn.Linear(8, 6)
        with torch.no_grad():
            self.c.weight.mul_(1e-12)
            self.c.bias.mul_(1e-12)
            self.h.bias.copy_(torch.linspace(-0.03, 0.05, 6))

    def forward(self, x):
        y = torch.relu(self.c(x))
        return self.h(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("per_channel", [True, False])
def test_a_bias_that_would_overflow_int32_keeps_its_value(per_channel, tmp_path):
    torch.manual_seed(0)
    art = _convert(_onnx(Vanishing(), tmp_path / "m.onnx"), tmp_path, per_channel=per_channel)
    x = np.random.default_rng(5).standard_normal((20, 3, 16, 16)).astype(np.float32)
    info, y = _litert(art.path, x, "ref", tmp_path)
    ref = _fp32(tmp_path / "m.onnx", x)
    assert info["fully_int8"]
    # the logits are the bias (0.08 wide): clamped biases left ~1e-7 of it
    assert np.abs(y - ref).max() / info["out_scale"] <= 1.0, (y[0], ref[0])


class Affine(nn.Module):
    """A learnable affine block at its initial bias (hgnetv2's: x * scale + bias, bias all zero) after a tiny
    signal: the zero constant written at a 1/255 scale beside an activation of scale ~1e-9 gave an ADD whose output
    multiplier was over 1, and LiteRT aborted allocating tensors. Then a residual Add whose inputs nearly cancel."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, 1, 1)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))
        self.h = nn.Linear(8, 4)
        with torch.no_grad():
            self.c.weight.mul_(1e-8)
            self.c.bias.mul_(1e-8)

    def forward(self, x):
        y = torch.relu(self.c(x)) * self.scale + self.bias
        y = (y + 1.0) + (y * -0.999 - 1.0)  # nearly cancels: a tiny output range from two 1.0-wide inputs
        return self.h(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_adds_at_extreme_scale_ratios_run_on_litert(tmp_path):
    torch.manual_seed(0)
    art = _convert(_onnx(Affine(), tmp_path / "m.onnx"), tmp_path)
    x = np.random.default_rng(5).standard_normal((20, 3, 16, 16)).astype(np.float32)
    info, y = _litert(art.path, x, "ref", tmp_path)  # before: the subprocess died with SIGABRT here
    assert info["fully_int8"] and "ADD" in info["ops"]
    assert np.abs(y - _fp32(tmp_path / "m.onnx", x)).max() / info["out_scale"] <= 2.0


def test_a_route_the_user_names_runs_its_check_in_the_worker(tmp_path, monkeypatch):
    """--converter NAME: the route's quick check is not judged, but it runs in the worker as for auto, so a model
    LiteRT aborts on fails there as one line (hgnetv2_b0's, before the ADD fix, killed the export itself)."""
    import dataclasses

    from pipeline.conversion import TfliteArtifact
    from pipeline.stages import convert as C
    seen = {}

    def route(name, *args, check):
        seen[name] = check
        return TfliteArtifact(path=tmp_path / "m.tflite", bytes=1, converter=name, input_layout="NHWC",
                              calibration_samples=1), None

    monkeypatch.setattr(C, "_route", route)
    monkeypatch.setattr(C, "with_record", lambda art, pre: art)
    target = dataclasses.make_dataclass("T", [("precision", str), ("allow_float_fallback", bool),
                                              ("per_channel_weights", bool)])("int8", False, True)
    check = C.Check(inputs=np.zeros((4, 1)), fp32=np.eye(4, dtype=np.float32), kernels="ref", batch=1)
    art = C.convert(None, np.zeros((1, 1)), None, target, converter="direct", source=None, check=check,
                    work=tmp_path, reuse=None)
    assert art.converter == "direct" and seen == {"direct": check}


def test_declines_an_op_it_does_not_write_naming_the_node(tmp_path):
    from pipeline.errors import ConversionError
    art = _onnx(Gelu(), tmp_path / "g.onnx")
    why = unsupported(onnx.load(str(art.path)))
    # GELU's erf form: Div, Erf, Add, Mul by constants; the one node the writer has no int8 form for is named
    assert why is not None and "no int8 writer for op Erf (node /Erf)" in why and "\n" not in why
    with pytest.raises(ConversionError, match="no int8 writer for op Erf"):
        _convert(art, tmp_path)
    assert not (tmp_path / "m_int8.tflite").exists()


def test_other_clips_and_computed_shapes_are_declined(tmp_path):
    class C(nn.Module):
        def forward(self, x):
            return torch.clamp(x, -1.5, 2.0).mean((2, 3))

    class Swap(nn.Module):  # a 5-D transpose that is not a channel shuffle, its shapes computed from the input
        def forward(self, x):
            n, c, h, w = x.size()
            return x.view(n, 3, c // 3, h, w).transpose(2, 3).reshape(n, c, h, w)

    class Tokens(nn.Module):  # a computed reshape outside a shuffle (a transformer's tokens)
        def forward(self, x):
            n, c, h, w = x.size()
            return x.reshape(n, c, h * w).mean(2)

    torch.onnx.export(C(), torch.randn(1, 3, 8, 8), str(tmp_path / "c.onnx"), dynamo=False)
    assert "Clip" in unsupported(onnx.load(str(tmp_path / "c.onnx")))
    for net, why in ((Swap, "no int8 writer for op Shape"), (Tokens, "no int8 writer for op Shape")):
        torch.onnx.export(net(), torch.randn(2, 3, 8, 8), str(tmp_path / "s.onnx"), dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "n"}})
        assert why in unsupported(onnx.load(str(tmp_path / "s.onnx"))), net


def test_auto_keeps_direct_for_refcnn_and_records_it(tmp_path):
    """The default export of the zoo's reference CNN: the direct route converts it, passes the quick check on
    LiteRT in a worker, and the export's gates pass on the whole test split."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "pipeline.export", "--model", "zoo:refcnn", "--calib-size", "200",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["conversion"]["converter"] == "direct"
    tried = rep["conversion"]["routes_tried"]
    assert [t["route"] for t in tried] == ["direct"] and tried[0]["kept"] and "agreement" in tried[0]["reason"]
    assert rep["quantization"]["fully_int8"] and rep["accuracy"]["agreement"] >= 0.98


class _Stub:
    def __init__(self, name, strict=False):
        self.name, self.strict_check = name, strict


@pytest.mark.parametrize("direct_agrees, next_agrees, kept", [
    (0.99, 0.95, "direct"),  # at the gate: kept at once, the next route is never tried
    (0.96, 0.93, "direct"),  # below the gate, but closer than the next route, which passes the 90% bar
    (0.93, 0.99, "onnx2tf"),  # below the gate, and the next route comes closer
    (0.50, 0.70, "onnx2tf"),  # nothing reaches its bar: the closest is kept anyway
])
def test_auto_keeps_direct_only_at_the_agreement_gate_or_when_closest(direct_agrees, next_agrees, kept, tmp_path,
                                                                      monkeypatch):
    """The selection of ``auto`` with stand-in routes: each writes its own file to the shared path and returns
    outputs agreeing with FP32 on the given share of the 100 check inputs."""
    import dataclasses

    from pipeline.conversion import TfliteArtifact
    from pipeline.stages import convert as C
    stubs = {"direct": _Stub("direct", strict=True), "onnx2tf": _Stub("onnx2tf")}
    agree = {"direct": direct_agrees, "onnx2tf": next_agrees}
    fp32 = np.eye(4, dtype=np.float32)[np.arange(100) % 4]
    dest = tmp_path / "model_int8.tflite"
    calls = []

    def route(name, *args, check):
        calls.append(name)
        dest.write_text(name)
        out = fp32.copy()
        k = int(round((1 - agree[name]) * 100))
        out[:k] = np.roll(out[:k], 1, axis=1)  # the first k inputs flip
        return TfliteArtifact(path=dest, bytes=1, converter=name, input_layout="NHWC", calibration_samples=1), out

    monkeypatch.setattr(C, "routes", lambda: stubs)
    monkeypatch.setattr(C, "_route", route)
    monkeypatch.setattr("pipeline.stages.inspect.inspect", lambda *a, **k: None)
    target = dataclasses.make_dataclass("T", [("precision", str), ("allow_float_fallback", bool)])("int8", False)
    check = C.Check(inputs=np.zeros((100, 1)), fp32=fp32, kernels="ref", batch=1, min_agreement=0.98)
    art = C._auto(target, check, (None, None, None, None, None, False, {}))
    assert art.converter == kept and dest.read_text() == kept  # the kept route's own file is at the path
    assert calls == (["direct"] if direct_agrees >= 0.98 else ["direct", "onnx2tf"])
    tried = {t["route"]: t for t in art.routes_tried}
    assert tried[kept]["kept"] and sum(t["kept"] for t in art.routes_tried) == 1
    if direct_agrees < 0.98:
        assert "below the 98% this route must reach to be kept at once" in tried["direct"]["reason"]
