"""The fake-quantization simulator (pipeline/simulate.py).

- the quantizers, by hand: per-channel scales, rounding, clamping, level counts, zero points;
- the capture: every zoo model runs through it, its float run is the PyTorch model, its plan folds and fuses what
  the converter folds and fuses, and a model it cannot take is one SimulationError line;
- against the real thing: at W8A8 it agrees with the LiteRT int8 model of a real export of zoo:refcnn (2,000 test
  images) to the issue's bar, with the same input and output quantization; lower bits hurt more.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline import simulate as sim_mod
from pipeline import zoo
from pipeline.errors import PipelineError, UsageError
from pipeline.simulate import (QParams, QuantSetting, SimulationError, Simulator, W8A8, activation_qparams,
                               fake_quantize, quantize_bias, quantize_weight, weight_scales)

EVAL = 2000  # test images of the shared export (the "modest number")


# --------------------------------------------------------------------------- quantizers, by hand


def test_per_channel_weight_scales_are_max_abs_over_qmax():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]])
    assert torch.allclose(weight_scales(w), torch.tensor([2 / 127, 0.5 / 127, 1.0], dtype=torch.float64), rtol=1e-7)
    assert torch.allclose(weight_scales(w, per_channel=False), torch.tensor([2 / 127], dtype=torch.float64), rtol=1e-7)
    wq, s = quantize_weight(w)
    assert torch.equal(torch.round(wq / s.reshape(-1, 1)), torch.tensor([[64.0, -127.0], [127.0, 64.0], [0.0, 0.0]]))


def test_weights_round_half_away_from_zero_and_stay_symmetric():
    w = torch.tensor([[2.5, -2.5, 0.5, -0.5, 127.0]])  # scale 127 / 127 = 1: ties land exactly on .5
    wq, s = quantize_weight(w, per_channel=False)
    assert float(s) == 1.0
    assert wq.tolist() == [[3.0, -3.0, 1.0, -1.0, 127.0]]
    wq4, s4 = quantize_weight(torch.tensor([[-7.0, 7.0, 3.5]]), bits=4)  # [-7, 7] at 4 bits
    assert torch.round(wq4 / s4).tolist() == [[-7.0, 7.0, 4.0]]


def test_activations_round_half_to_even_and_clamp():
    qp = QParams(scale=1.0, zero_point=0, qmin=-128, qmax=127)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.6, 300.0, -300.0])
    assert fake_quantize(x, qp).tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, 127.0, 127.0, -128.0]


def test_two_bit_levels():
    qp = activation_qparams(0.0, 3.0, bits=2)
    assert (qp.qmin, qp.qmax, qp.levels) == (-2, 1, 4)
    assert len(torch.unique(fake_quantize(torch.linspace(-1, 4, 1001), qp))) == 4
    sym = activation_qparams(-3.0, 3.0, bits=2, symmetric=True)
    assert (sym.qmin, sym.qmax, sym.zero_point, sym.levels) == (-1, 1, 0, 3)
    wq, s = quantize_weight(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)), bits=2)
    assert set(torch.round(wq / s.reshape(-1, 1, 1, 1)).unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_asymmetric_and_symmetric_zero_points():
    a = activation_qparams(-1.0, 3.0)  # s = 4/255, zp = round(-128 + 1 / s) = round(-64.25) = -64
    assert a.scale == pytest.approx(4 / 255, rel=1e-7) and a.zero_point == -64 and (a.qmin, a.qmax) == (-128, 127)
    s = activation_qparams(-1.0, 3.0, symmetric=True)  # zp 0, restricted range [-127, 127], s = 3/127
    assert s.scale == pytest.approx(3 / 127, rel=1e-7) and s.zero_point == 0 and (s.qmin, s.qmax) == (-127, 127)
    relu = activation_qparams(0.0, 6.0)  # ReLU output: zero at qmin
    assert relu.zero_point == -128 and relu.scale == pytest.approx(6 / 255, rel=1e-7)
    assert activation_qparams(2.0, 5.0) == activation_qparams(0.0, 5.0)  # the range always holds 0 ...
    assert float(fake_quantize(torch.tensor(0.0), activation_qparams(-0.37, 1.91))) == 0.0  # ... exactly


def test_zero_point_is_tflites_nudged_one():
    # the refcnn input range ((0 - 0.2860) / 0.3530 .. (1 - 0.2860) / 0.3530): its .tflite says s=0.0111093, zp=-55
    qp = activation_qparams((0 - 0.2860) / 0.3530, (1 - 0.2860) / 0.3530)
    assert (round(qp.scale, 7), qp.zero_point) == (0.0111093, -55)


def test_bias_is_int32_at_the_accumulator_scale():
    b = torch.tensor([0.01, -0.02])
    bq = quantize_bias(b, 0.1, torch.tensor([0.003, 0.0001], dtype=torch.float64))
    steps = bq / torch.tensor([0.1 * 0.003, 0.1 * 0.0001], dtype=torch.float64)
    assert torch.allclose(steps, torch.tensor([33.0, -2000.0], dtype=torch.float64), atol=1e-6)


def test_settings_parse_and_check_their_bits():
    assert QuantSetting.parse("W8A8") == W8A8
    assert QuantSetting.parse("w4a2-sym-per-tensor") == QuantSetting(4, 2, True, False)
    assert QuantSetting(4, 8, True).name == "W4A8-sym"
    for bad in ("W9A8", "W1A8", "W8A16", "8x8"):
        with pytest.raises(UsageError):
            QuantSetting.parse(bad)


# --------------------------------------------------------------------------- capture and plan (no TFLite)


@pytest.fixture(scope="module")
def fmnist_bits(fmnist):
    """64 training images as the representative dataset, 64 test images: preprocessed as the zoo models take them."""
    from pipeline.inputs import preprocessing
    from pipeline.inputs.preprocessing import Preprocessing
    pre = Preprocessing(input_shape=(1, 28, 28), source_layout=fmnist.source_layout, source_dtype=fmnist.source_dtype,
                        scale=fmnist.scale, mean=zoo.FASHION_MNIST["mean"], std=zoo.FASHION_MNIST["std"])
    return preprocessing.apply(fmnist.x_train[:64], pre), preprocessing.apply(fmnist.x_test[:64], pre)


@pytest.mark.parametrize("name", zoo.list_models())
def test_every_zoo_model_runs_through_the_simulator(name, fmnist_bits):
    from pipeline.inputs import models
    calib, x = fmnist_bits
    loaded = models.load(f"zoo:{name}")
    sim = Simulator(loaded, calib)
    with torch.no_grad():
        ref = loaded.module(torch.from_numpy(x)).numpy()
    folded = sim.logits(x, None)  # BN folded, hardsigmoid folded, nothing quantized: the PyTorch model
    assert np.abs(folded - ref).max() <= 1e-3 * np.abs(ref).max()
    q = sim.logits(x, W8A8)
    out = sim.output_qparams(W8A8)
    steps = np.round(q / out.scale) + out.zero_point
    assert np.allclose(q / out.scale + out.zero_point, steps, atol=1e-3)  # logits on the int8 output grid
    assert steps.min() >= -128 and steps.max() <= 127
    assert (q.argmax(1) == ref.argmax(1)).mean() >= 0.95  # at most 3 of 64 flip (measured: 0 to 2)
    assert np.array_equal(q, sim.logits(x, W8A8))  # deterministic
    # a run frees each value after its last reader; keeping them all (keep=) gives the same logits
    sim._prepare(W8A8)
    kept: dict = {}
    with torch.no_grad():
        full = sim._run(torch.from_numpy(x), sim.qparams(W8A8), W8A8, keep=kept)
    assert np.array_equal(full.reshape(len(x), -1).float().numpy(), q)
    assert sum(map(len, sim._last_uses().values())) >= len(kept) // 2  # most values are freed early
    assert not sim.plan.ops.get("batch_norm") or sim.plan.describe()["folded_batch_norms"] == sim.plan.ops["batch_norm"]


def test_refcnn_plan_is_the_tflite_graph(fmnist_bits):
    from pipeline.inputs import models
    sim = Simulator(models.load("zoo:refcnn"), fmnist_bits[0])
    d = sim.plan.describe()
    # the .tflite: input, 5 CONV_2D with fused ReLU, MEAN, FULLY_CONNECTED; max pools, flatten, dropout keep the grid
    assert (d["quantization_points"], d["folded_batch_norms"], d["fused_activations"]) == (8, 5, 5)
    assert d["groups"] == 8 and d["inplace_add_unions"] == 0


def test_resnet8_residual_adds_take_the_calibrators_in_place_range(fmnist_bits):
    from pipeline.inputs import models
    calib, x = fmnist_bits
    loaded = models.load("zoo:resnet8")
    sim = Simulator(loaded, calib)
    plain = Simulator(loaded, calib, tflite_calibration=False)
    assert len(sim.plan.inplace) == 3  # one per residual stack: the main branch's last conv
    changed = 0
    for operand, add_q in sim.plan.inplace:
        g = sim.plan.group[operand]
        (lo, hi), own = sim.group_ranges[g], sim.ranges[operand]
        assert (lo, hi) == (min(own[0], sim.ranges[add_q][0]), max(own[1], sim.ranges[add_q][1]))
        assert plain.group_ranges[g] == own
        changed += (lo, hi) != own
    assert changed >= 1
    assert np.array_equal(sim.logits(x[:8], None), plain.logits(x[:8], None))  # only the grids differ


def test_concat_inputs_share_the_concat_grid():
    class Ghostish(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            y = torch.relu(self.a(x))
            z = torch.cat([y, 3 * torch.relu(self.b(y))], 1)
            return self.head(torch.nn.functional.max_pool2d(z, 2).mean((2, 3)))

    torch.manual_seed(0)
    calib = torch.randn(32, 1, 8, 8).numpy()
    sim = Simulator(Ghostish().eval(), calib)
    cat = sim.plan.concats[0]
    members = [q for q in sim.plan.qpoints if sim.plan.group[q] == sim.plan.group[cat]]
    assert len(members) >= 2  # the first relu and the scaled second relu (mul) write on the cat's grid
    assert sim.group_ranges[sim.plan.group[cat]] == sim.ranges[cat]


def test_lower_bits_round_to_fewer_values(fmnist_bits):
    from pipeline.inputs import models
    calib, x = fmnist_bits
    sim = Simulator(models.load("zoo:refcnn"), calib)
    w4a4 = sim.logits(x, QuantSetting(4, 4))
    assert len(np.unique(w4a4)) <= 16  # the 4-bit output grid
    sym = sim.qparams(QuantSetting(8, 8, symmetric_activations=True))
    assert all(p.zero_point == 0 and p.qmin == -127 for p in sym.values())


def test_a_model_with_a_fixed_batch_runs_in_chunks_of_it():
    class BatchOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(1, -1))  # batch 1 only

    torch.manual_seed(0)
    model = BatchOne().eval()
    x = torch.randn(5, 1, 4, 4)
    sim = Simulator(model, x.numpy())
    assert sim.fixed_batch == 1
    with torch.no_grad():
        ref = torch.cat([model(x[i:i + 1]) for i in range(5)]).numpy()
    assert np.allclose(sim.logits(x.numpy(), None), ref, atol=1e-5)
    assert sim.logits(x.numpy()).shape == (5, 3)


def _raises_one_line(fn, match: str):
    with pytest.raises(SimulationError, match=match) as e:
        fn()
    assert "\n" not in str(e.value) and isinstance(e.value, PipelineError)


def test_models_it_cannot_take_are_one_line_errors(tmp_path):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.sort(x.flatten(1), dim=1).values)

    calib = np.random.default_rng(0).normal(size=(8, 1, 2, 2)).astype(np.float32)
    _raises_one_line(lambda: Simulator(DataDependent().eval(), calib), "torch.export cannot capture")
    _raises_one_line(lambda: Simulator(Sorts().eval(), calib), "does not quantize: sort")
    script = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    _raises_one_line(lambda: Simulator(script, calib), "TorchScript")
    from pipeline.inputs.models import LoadedModel
    _raises_one_line(lambda: Simulator(LoadedModel(spec="m.onnx", kind="onnx"), calib), "not a PyTorch model")
    _raises_one_line(lambda: Simulator(nn.Linear(4, 2), np.zeros((0, 4), np.float32)), "representative dataset")


# --------------------------------------------------------------------------- against the real TFLite int8 model
# One real export shared by the module: these four tests take about 14 s together on an idle 2-core host (the
# export 9 s), under the ~20 s at which they would be marked slow.


@pytest.fixture(scope="module")
def refcnn_export(tmp_path_factory):
    """One export of zoo:refcnn on the first EVAL test images (the default calibration: balanced, 500 samples)."""
    from pipeline.export import ExportConfig, export
    cfg = ExportConfig(model="zoo:refcnn", eval_limit=EVAL, out=str(tmp_path_factory.mktemp("sim") / "refcnn"))
    status, out, _ = export(cfg, log=lambda *a, **k: None)
    assert status == 0
    return cfg, out


@pytest.fixture(scope="module")
def refcnn_acceptance(refcnn_export):
    cfg, out = refcnn_export
    return sim_mod.accept_against_tflite(cfg, out, log=lambda *a, **k: None)


def test_w8a8_agrees_with_tflite_int8(refcnn_acceptance):
    acc = refcnn_acceptance
    assert acc.images == EVAL and acc.setting == "W8A8"
    assert acc.input_params_match and acc.output_params_match  # the same calibration gives the same grids
    assert acc.agreement >= sim_mod.MIN_AGREEMENT, acc.line()
    assert acc.ece_diff <= sim_mod.MAX_ECE_DIFF, acc.line()
    assert acc.output_steps_max <= 2, acc.line()  # logits within 2 output steps of LiteRT's (measured: 1)
    assert acc.passed


def test_lower_bits_hurt_more(refcnn_export):
    from pipeline.stages.prepare import prepare
    cfg, _ = refcnn_export
    inp = prepare(cfg, log=lambda *a, **k: None)
    sim = Simulator(inp.model, inp.calib.array())
    x = inp.x_test[:1000]
    fp32 = sim.logits(x, None)

    def agreement(setting):
        return float((sim.logits(x, QuantSetting.parse(setting)).argmax(1) == fp32.argmax(1)).mean())

    w8a8, w4a8, w4a4 = agreement("W8A8"), agreement("W4A8"), agreement("W4A4")
    assert w8a8 >= 0.98
    assert w4a4 < w4a8 < w8a8  # measured on zoo:refcnn: 99.3%, 98.1%, 81.7% on the first 1000


def test_acceptance_refuses_another_exports_predictions(refcnn_export):
    import dataclasses
    cfg, out = refcnn_export
    for other in ({"eval_limit": 100}, {"calib": "fractal"}, {"seed": 1}):
        with pytest.raises(UsageError, match="holds another export .*" + next(iter(other))):
            sim_mod.accept_against_tflite(dataclasses.replace(cfg, **other), out, log=lambda *a, **k: None)


def test_cli_prints_the_verdict(refcnn_export, capsys):
    cfg, out = refcnn_export
    assert sim_mod.main(["--model", "zoo:refcnn", "--eval-limit", str(EVAL), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("zoo:refcnn W8A8 on 2000 images: top-1 agreement") and line.endswith("accepted")
