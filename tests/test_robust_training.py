"""pipeline/robust_training.py: SymReg, the QAT fake quantization and SatNL against hand computations, and one
tiny real run of each pipeline.train flag (--qat, --symreg, --satnl)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline import robust_training as rt


def _linear(w) -> nn.Linear:
    m = nn.Linear(len(w[0]), len(w), bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(w, dtype=torch.float32))
    return m


def test_symreg_value_and_gradient_by_hand():
    # channel 0: max 1, min -0.5, max|w| 1 -> a = 0.5; channel 1: max 2, min -2 -> a = 0
    m = _linear([[1.0, -0.5, 0.2], [-2.0, 2.0, 0.0]])
    p = rt.symmetry_penalty(m, 2.0)  # 2 * mean(0.25, 0) = 0.25
    assert p.item() == pytest.approx(0.25)
    p.backward()
    # dP/da0 = lam * a0 = 1; a0 = 1 + lo/hi: da0/dhi = -lo/hi^2 = 0.5, da0/dlo = 1/hi = 1; channel 1: a1 = 0
    assert m.weight.grad.flatten().tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0, 0.0, 0.0])


def test_symreg_ignores_channel_scale_as_batchnorm_folding_does():
    m = _linear([[1.0, -0.5, 0.2], [0.3, 0.1, -0.05]])
    before = float(rt.symmetry_penalty(m, 1.0))
    with torch.no_grad():
        m.weight[0] *= -3.0  # a negative BatchNorm gamma folded in
        m.weight[1] *= 0.01
    assert float(rt.symmetry_penalty(m, 1.0)) == pytest.approx(before, rel=1e-5)
    stats = rt.asymmetry_stats(m)  # a = 0.5 and (0.3 - 0.05) / 0.3
    assert stats["mean_abs_asymmetry"] == pytest.approx((0.5 + 0.25 / 0.3) / 2, rel=1e-5)
    assert stats["wasted_grid_share"] == pytest.approx(stats["mean_abs_asymmetry"] / 2)


def test_weight_fake_quant_on_the_int8_grid_with_identity_gradient():
    w = torch.tensor([[0.5, -0.25, 0.127], [1e-3, -2.0, 0.7]], requires_grad=True)
    q = rt.fake_quant_weight(w)
    s = w.detach().abs().amax(1, keepdim=True) / 127
    steps = q.detach() / s
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert steps.abs().max() <= 127 + 1e-4
    assert q.detach()[0, 0] == pytest.approx(0.5) and q.detach()[1, 0] == pytest.approx(0.0)  # 1e-3 < s/2
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through


def test_activation_fake_quant_by_hand_and_clipped_ste():
    fq = rt.ActivationFakeQuant().train()
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    y = fq(x)
    # range [-1, 3]: s = 4/255, zp = round(-128 + 1/s) = round(-64.25) = -64
    qp = fq.qparams()
    assert qp.scale == pytest.approx(4 / 255) and qp.zero_point == -64 and (qp.qmin, qp.qmax) == (-128, 127)
    assert y[2].item() == pytest.approx(64 * 4 / 255, rel=1e-6)  # 1 / s = 63.75 -> 64 steps
    assert y[1].item() == 0.0  # zero is exact (nudged zero point)
    fq.eval()
    z = torch.tensor([1.0, 5.0, -3.0], requires_grad=True)
    out = fq(z)
    out.sum().backward()
    assert z.grad.tolist() == [1.0, 0.0, 0.0]  # zero gradient outside the representable range
    assert out[1].item() == pytest.approx((127 + 64) * 4 / 255, rel=1e-6)


def test_moving_min_max():
    fq = rt.ActivationFakeQuant(decay=0.9).train()
    fq(torch.tensor([0.0, 1.0]))
    fq(torch.tensor([0.0, 2.0]))
    assert float(fq.hi) == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)


def test_qat_model_folds_batchnorm_shares_parameters_and_places_fake_quant():
    from pipeline.zoo.refcnn import refcnn
    torch.manual_seed(0)
    model = refcnn()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
    keys = set(model.state_dict())
    gm = rt.qat_model(model)
    # input, 5 conv(+BN+ReLU), global average pool, linear: 8 points, by hand from pipeline/zoo/refcnn.py
    assert gm.qat_points == 8
    assert {id(p) for p in gm.parameters()} <= {id(p) for p in model.parameters()}
    folded = gm.qat_features_0
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    w, b = folded.folded()
    ref = model.features[1](model.features[0](x))
    assert torch.allclose(torch.nn.functional.conv2d(x, w, b, padding=1), ref, atol=1e-5)
    gm.train()
    rt.freeze_batchnorm(gm)
    gm(x).sum().backward()
    assert model.features[0].weight.grad is not None and model.features[1].weight.grad is not None
    assert set(model.state_dict()) == keys  # what is written is the plain architecture


def test_satnl_pact_forward_gradient_and_export_form():
    act = rt.SatReLU(2.0).train()
    x = torch.tensor([-1.0, 1.0, 3.0, 5.0])
    y = act(x)
    assert y.tolist() == [0.0, 1.0, 2.0, 2.0]
    y.sum().backward()
    assert act.alpha.grad.item() == 2.0  # d/d alpha = 1 where x >= alpha
    with torch.no_grad():
        act.alpha.fill_(1.5)
    act.eval()  # the eval form clamps at the float taken from alpha
    assert act.bound == 1.5 and act(x).tolist() == [0.0, 1.0, 1.5, 1.5]
    m = rt.to_satnl(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.ReLU())))
    assert sum(isinstance(c, rt.SatReLU) for c in m.modules()) == 2
    fresh = rt.satnl_factory("refcnn")()
    sd = fresh.state_dict()
    sd["features.2.alpha"] = torch.tensor(0.75)
    fresh.load_state_dict(sd)
    assert fresh.features[2].bound == 0.75


def test_satnl_initial_bounds_are_the_quantile():
    m = rt.to_satnl(nn.Sequential(nn.Identity(), nn.ReLU()))
    x = np.linspace(-1, 1, 2001, dtype=np.float32).reshape(1, -1)
    bounds = rt.init_satnl_bounds(m, x, quantile=0.5)
    assert bounds["1"] == pytest.approx(0.5, abs=1e-3)  # median of the positive part of U(0, 1]
    assert m[1].alpha.item() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--qat"], ["--symreg", "0.5"], ["--satnl"]])
def test_one_tiny_real_run_of_each_flag(tmp_path, flag):
    from pipeline import zoo
    from pipeline.train import main
    rc = main(["zoo:refcnn", "--weights", str(zoo.get_entry("refcnn").weights_path), "--epochs", "1",
               "--train-limit", "256", "--threads", "2", "--lr", "3e-4", "--out", str(tmp_path), *flag])
    assert rc == 0
    rec = json.loads((tmp_path / "refcnn.json").read_text())
    assert rec["robust"]["options"][flag[0][2:]] in (True, 0.5)
    assert rec["fp32_test_top1"] > 0.8  # fine-tuned from the shipped weights (92.4%), not from scratch
    sd = torch.load(tmp_path / "refcnn.pt", weights_only=True)
    if flag == ["--satnl"]:
        from pipeline.inputs import models
        loaded = models.load("pipeline.robust_training:satnl_refcnn", str(tmp_path / "refcnn.pt")).module
        assert rec["robust"]["satnl_bounds"] == pytest.approx(rt.satnl_bounds(loaded), abs=1e-4)
    else:  # the plain zoo architecture
        assert set(sd) == set(zoo.get_entry("refcnn").factory().state_dict())
    if flag[0] == "--symreg":
        assert rec["robust"]["weights_after"]["mean_abs_asymmetry"] < rec["robust"]["weights_before"]["mean_abs_asymmetry"]
    if flag == ["--qat"]:
        assert rec["robust"]["qat_points"] == 8
