"""Zoo architectures: shapes for both input sizes, ShuffleNetV2's shuffle, MobileOne's re-parameterisation,
training of a model with a separate training form, and the channel-slice conversion ShuffleNetV2 relies on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from pipeline.zoo.ghostnet import GhostModule, GhostNet
from pipeline.zoo.mobilenetv2 import MobileNetV2
from pipeline.zoo.mobileone import MobileOne, MobileOneBlock, reparameterize
from pipeline.zoo.resnet8 import ResNet8
from pipeline.zoo.shufflenetv2 import ShuffleNetV2, shuffle_split

ARCHITECTURES = {
    "shufflenetv2": ShuffleNetV2,
    "mobileone": MobileOne,  # training form (deploy=False)
    "ghostnet": GhostNet,
    "mobilenetv2": MobileNetV2,
    "resnet8": ResNet8,
}


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch-norm statistics and affine terms away from their init values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("chw", [(1, 28, 28), (3, 32, 32)], ids=["28x28x1", "32x32x3"])
def test_builds_for_both_input_sizes_and_stays_small(name, chw):
    torch.manual_seed(0)
    model = ARCHITECTURES[name](in_channels=chw[0], num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *chw))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    params = sum(p.numel() for p in model.parameters())
    assert 20_000 <= params <= 300_000, params  # "a few tens to a couple hundred thousand parameters"


def test_shuffle_split_is_megvii_channel_shuffle():
    def megvii_channel_shuffle(x):  # megvii-model/ShuffleNet-Series, ShuffleV2Block.channel_shuffle
        b, c, h, w = x.shape
        x = x.reshape(b * c // 2, 2, h * w).permute(1, 0, 2).reshape(2, -1, c // 2, h, w)
        return x[0], x[1]

    x = torch.randn(3, 16, 5, 5)
    for got, want in zip(shuffle_split(x), megvii_channel_shuffle(x)):
        assert torch.equal(got, want)
    # Each half mixes the previous unit's pass-through half (channels 0-7) and branch half (8-15).
    ids = torch.arange(16.0).reshape(1, 16, 1, 1)
    for half in shuffle_split(ids):
        chans = half.flatten().tolist()
        assert sum(c < 8 for c in chans) == 4 and sum(c >= 8 for c in chans) == 4


@pytest.mark.parametrize("cin, cout, k, stride, groups", [
    (8, 8, 3, 1, 8),  # depthwise with the skip BN branch and the 1×1 scale branch
    (8, 8, 3, 2, 8),  # depthwise, stride 2: no skip branch
    (8, 16, 1, 1, 1),  # pointwise: no scale branch
    (16, 16, 1, 1, 1),  # pointwise with skip
    (3, 16, 3, 2, 1),  # the stem: a full 3×3 conv
])
def test_mobileone_block_reparameterizes_exactly(cin, cout, k, stride, groups):
    torch.manual_seed(1)
    block = _randomize_bn(MobileOneBlock(cin, cout, k, stride, groups, branches=4)).eval()
    x = torch.randn(4, cin, 9, 9)
    with torch.no_grad():
        want = block(x)
        block.reparameterize()
        got = block(x)
    assert [type(m) for m in block.modules()] == [MobileOneBlock, nn.ReLU, nn.Conv2d]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("chw", [(1, 28, 28), (3, 32, 32)], ids=["28x28x1", "32x32x3"])
def test_mobileone_training_and_deployed_forms_give_the_same_outputs(chw):
    torch.manual_seed(2)
    trained = _randomize_bn(MobileOne(in_channels=chw[0], num_classes=10, deploy=False), seed=3).eval()
    deployed = reparameterize(trained)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in trained.modules())  # the trained module is left as it was
    fresh = MobileOne(in_channels=chw[0], num_classes=10, deploy=True).eval()  # what the zoo factory builds
    fresh.load_state_dict(deployed.state_dict(), strict=True)
    x = torch.randn(8, *chw)
    with torch.no_grad():
        want = trained(x)
        got = fresh(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    trained_params = sum(p.numel() for p in trained.parameters())
    assert sum(p.numel() for p in fresh.parameters()) < trained_params / 3  # the branches are gone


def test_ghost_module_cuts_to_an_odd_channel_count():
    m = GhostModule(6, 9).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 6, 7, 7)).shape == (2, 9, 7, 7)


def test_train_writes_the_deployed_form_of_a_model_trained_in_another_form(tmp_path):
    from conftest import make_tiny_npz
    from pipeline import zoo
    data = make_tiny_npz(tmp_path / "tiny28.npz", n_train=256, n_test=64, size=28, classes=4)
    # MobileOne's backward pass runs on oneDNN; in a pytest process that already holds many thread pools it has
    # aborted now and then on these hosts, so the training runs in a process of its own, as a user's would.
    child = (
        "import json, pathlib, sys, torch\n"
        "from pipeline import train\n"
        "before = torch.get_num_threads()\n"
        "rec = train.train('mobileone', sys.argv[1], None, epochs=1, seed=0, batch_size=128, lr=3e-3,\n"
        "                  out_dir=pathlib.Path(sys.argv[2]), threads=1 if before > 1 else 2)\n"
        "print(json.dumps({'rec': rec, 'before': before, 'after': torch.get_num_threads()}))\n")
    r = subprocess.run([sys.executable, "-c", child, str(data), str(tmp_path / "w")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    rec = got["rec"]
    assert got["after"] == got["before"]  # train() leaves the caller's thread count alone
    assert 1 <= rec["threads"]["used"] <= rec["threads"]["cores"]  # never more threads than cores
    assert rec["onednn"]["probe"] in ("ok", "crashed")
    entry = zoo.get_entry("mobileone")
    deployed = entry.factory()
    deployed.load_state_dict(torch.load(tmp_path / "w" / "mobileone.pt", weights_only=True), strict=True)
    saved = json.loads((tmp_path / "w" / "mobileone.json").read_text())
    assert saved["deploy"]["max_abs_logit_diff_vs_train_form"] <= saved["deploy"]["tolerance"]
    assert saved["parameters"] == sum(p.numel() for p in deployed.parameters())
    assert saved["deploy"]["train_form_parameters"] == sum(p.numel() for p in entry.build_for_training().parameters())
    # The record's accuracy is the deployed weights' own accuracy on the test split.
    z = np.load(data)
    x = torch.from_numpy((z["x_test"][:, None].astype(np.float32) / 255.0 - entry.mean[0]) / entry.std[0])
    with torch.no_grad():
        acc = float((deployed.eval()(x).argmax(1).numpy() == z["y_test"]).mean())
    assert saved["fp32_test_top1"] == pytest.approx(acc) == pytest.approx(rec["fp32_test_top1"])


def test_onednn_check_runs_a_real_training_step_in_a_child_and_turns_onednn_off_only_on_a_crash():
    from pipeline.train import onednn_training_check

    # The real probe: one training step of MobileOne's training form in a child process on this CPU. Where
    # oneDNN works it is kept (the child exits 0); where it aborts, the parent lives on and turns it off.
    real = onednn_training_check("zoo:mobileone", None, (1, 28, 28), [8, 3], channels_last=False, threads=1)
    assert (real["probe"], real["used"]) in (("ok", True), ("crashed", False)), real
    # A child that dies from SIGABRT, as oneDNN did on an AMD EPYC host, turns oneDNN off and says why.
    crashed = onednn_training_check("zoo:mobileone", None, (1, 28, 28), [8], False, 1,
                                    probe="import os, signal; os.kill(os.getpid(), signal.SIGABRT)")
    assert (crashed["probe"], crashed["used"]) == ("crashed", False) and "SIGABRT" in crashed["reason"]
    # A Python error is not a kernel crash: the training raises it itself, with its own message.
    err = onednn_training_check("zoo:mobileone", None, (1, 28, 28), [8], False, 1, probe="raise ValueError('bad shape')")
    assert (err["probe"], err["used"]) == ("error", True) and "bad shape" in err["reason"]


def test_channel_parity_slices_convert_on_the_channel_axis(tmp_path):
    """ShuffleNetV2's split is x[:, 0::2] / x[:, 1::2]; onnx2tf must slice the NHWC channel axis, not H."""
    import onnx

    from pipeline.conversion import get_converter

    from pipeline.conversion.onnx2tf_tflite import constants_as_initializers
    from pipeline.tflite.inspect import inspect
    from pipeline.inputs.models import LoadedModel
    from pipeline.conversion.onnx_export import export_onnx
    from pipeline.inputs.preprocessing import Preprocessing
    from pipeline.testing import assert_tflite_matches_torch

    class SplitUnit(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
            self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
            self.head = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(16, 4))

        def forward(self, x):
            keep, y = shuffle_split(self.stem(x))
            return self.head(torch.cat((keep, self.branch(y)), 1))

    torch.manual_seed(0)
    model = SplitUnit().eval()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (100, 1, 12, 12)).astype(np.float32)
    pre = Preprocessing(input_shape=(1, 12, 12), source_layout="NCHW", source_dtype="float32", scale=1.0,
                        mean=(0.0,), std=(1.0,), raw_range=(-1.0, 1.0))
    onnx_art = export_onnx(LoadedModel(spec="test:split", kind="factory", module=model, input_shape=(1, 12, 12)),
                           x[:16], tmp_path / "split.onnx")
    moved = constants_as_initializers(onnx_art.path, tmp_path / "init.onnx")
    assert not [n for n in onnx.load(str(moved)).graph.node if n.op_type == "Constant"]
    tfl = get_converter("onnx2tf").convert(onnx_art, x, pre, per_channel=True, out_path=tmp_path / "split.tflite")
    insp = inspect(tfl.path)
    assert insp.fully_int8 and insp.ops.get("STRIDED_SLICE") == 2, insp.ops
    # One conv, a split, a 1×1 conv, a stride-2 conv and a linear layer: a few output steps at most.
    assert_tflite_matches_torch(model, tfl.path, x[:32], max_steps=4)


@pytest.mark.slow
def test_train_cli_trains_and_fine_tunes_a_users_own_factory(tmp_path, tinynet_dir, tiny_npz):
    """`python -m pipeline.train mod:factory` trains the user's own model with the same seeded loop, and
    `--weights` fine-tunes from a state_dict; the weights load into the factory and score what the record says."""
    import subprocess
    import sys

    def train(*extra):
        return subprocess.run([sys.executable, "-m", "pipeline.train", "tinynet:tinynet", "--data", str(tiny_npz),
                               "--epochs", "6", "--batch-size", "32", "--lr", "1e-2", "--augment", "none",
                               "--threads", "1", *extra],
                              cwd=tinynet_dir, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    r = train("--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "a" / "tinynet_tinynet.json").read_text())
    assert rec["model"] == "tinynet:tinynet" and rec["mean"] == [0.0] and rec["std"] == [1.0]
    sys.path.insert(0, str(tinynet_dir))
    import tinynet
    m = tinynet.tinynet()
    m.load_state_dict(torch.load(tmp_path / "a" / "tinynet_tinynet.pt", weights_only=True), strict=True)
    z = np.load(tiny_npz)
    with torch.no_grad():
        acc = float((m.eval()(torch.from_numpy(z["x_test"][:, None] / np.float32(255))).argmax(1).numpy()
                     == z["y_test"]).mean())
    assert acc == pytest.approx(rec["fp32_test_top1"]) and acc > 0.5  # the toy task is learnable in 6 epochs
    # Fine-tuning starts from the given weights: one more epoch from the trained ones keeps them good.
    r = train("--weights", str(tmp_path / "a" / "tinynet_tinynet.pt"), "--epochs", "1", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b" / "tinynet_tinynet.json").read_text())["initial_weights"].endswith(".pt")
    # Usage errors: one line, exit 2.
    r = train("--mean", "0.5", "--std", "0", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--std" in r.stderr
    assert not (tmp_path / "c").exists()
