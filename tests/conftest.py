"""Shared fixtures: tiny seeded models and data, and expensive exports shared per session."""
from __future__ import annotations

import contextlib
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline import quiet  # noqa: E402

quiet.configure(verbose=False)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

TINYNET_SRC = textwrap.dedent('''
    import torch.nn as nn

    def tinynet(channels=1, classes=4):
        return nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
        )

    def fixednet(classes=4):
        # Only takes 1x12x12 inputs: the linear layer fixes the spatial size.
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, classes))

    class NoisyNet(nn.Module):
        # Export-unsafe on purpose: random noise in forward makes ONNX differ from PyTorch.
        def __init__(self):
            super().__init__()
            self.net = tinynet()

        def forward(self, x):
            import torch
            return self.net(x) + 10 * torch.rand_like(self.net(x))

    def not_a_module():
        return 42

    class WithAux(nn.Module):
        # Returns (logits [N,4], features [N,16]): converters may reorder several outputs.
        def __init__(self):
            super().__init__()
            self.net = tinynet()

        def forward(self, x):
            return self.net(x), -0.5 * self.net[:-1](x)

    def with_aux():
        return WithAux()

    class TokenNet(nn.Module):
        # LayerNorm over the last axis of [N, tokens, channels]: onnx2tf 1.28 fails on it.
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(1, 8, 3, stride=3)
            self.ln = nn.LayerNorm(8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            return self.head(self.ln(t).mean(1))

    def tokennet():
        return TokenNet()

    class NotCallable:
        pass

    def upnet():
        # GroupNorm and ConvTranspose: onnx2tf 1.28 fails on them under the dynamic batch, converts at batch 1
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                             nn.ConvTranspose2d(8, 8, 2, stride=2), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def stemnet():
        # resnet's stem: a padded MaxPool after ReLU. onnx2tf 1.28 pads it with -3.4e38 (a PADV2 whose int8
        # scale is ~1e36); the onnx2tf route rewrites it into an explicit zero Pad first (exact after ReLU).
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 4))

    class Versioned(nn.Module):
        # checks a version in the state dict's _metadata, as torchvision's MNASNet does
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(144, 4)

        def forward(self, x):
            return self.fc(x.flatten(1))

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
            if local_metadata.get("version") != 2:
                raise ValueError(f"version should be 2 instead of {local_metadata.get('version')}")
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

        _version = 2

    def versioned():
        return Versioned()

    def reflectnet():
        # Reflect padding: PyTorch exports its pads as a computed subgraph, which onnx2tf 1.28 applies to the
        # batch axis of a dynamic-batch model (the converted model returns more rows than it was given).
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
''')


@pytest.fixture(scope="session")
def fmnist():
    from pipeline.inputs import data
    if not FMNIST_DIR.is_dir():
        pytest.fail(f"Fashion-MNIST is not installed at {FMNIST_DIR}: apt-get install dataset-fashion-mnist")
    return data.load_fashion_mnist(FMNIST_DIR)


def make_tiny_npz(path: Path, n_train: int = 400, n_test: int = 200, size: int = 12, classes: int = 4,
                  layout: str = "NHW", seed: int = 0) -> Path:
    """A learnable toy dataset: each class is a bright square in its own quadrant, plus noise."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, classes, n)
        x = rng.integers(0, 60, (n, size, size)).astype(np.float32)
        h = size // 2
        for i, c in enumerate(y):
            r, q = divmod(int(c) % 4, 2)
            x[i, r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
        x = np.clip(x, 0, 255).astype(np.uint8)
        if layout == "NCHW":
            x = x[:, None]
        elif layout == "NHWC":
            x = x[..., None]
        return x, y.astype(np.int64)

    xtr, ytr = split(n_train)
    xte, yte = split(n_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    return make_tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="session")
def tinynet_dir(tmp_path_factory, tiny_npz) -> Path:
    """A folder holding tinynet.py (a factory) and tinynet.pt (weights trained on tiny.npz, seeded)."""
    import torch
    import torch.nn.functional as F
    d = tmp_path_factory.mktemp("tinynet")
    (d / "tinynet.py").write_text(TINYNET_SRC)
    sys.path.insert(0, str(d))
    import importlib
    mod = importlib.import_module("tinynet")
    torch.manual_seed(0)
    model = mod.tinynet(classes=4)
    z = np.load(tiny_npz)
    x = torch.from_numpy(z["x_train"][:, None].astype(np.float32) / 255.0)
    y = torch.from_numpy(z["y_train"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    torch.save(model.state_dict(), d / "tinynet.pt")
    return d


@pytest.fixture()
def in_dir(monkeypatch):
    """Change into a folder for the test (the CLI imports factories from the current folder)."""
    def _cd(path):
        monkeypatch.chdir(path)
        if str(path) not in sys.path:
            monkeypatch.syspath_prepend(str(path))
    return _cd


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tinynet_dir, tiny_npz):
    """One CLI export of the tiny factory model on the toy data, shared by the tests that read its outputs."""
    from pipeline.export import main
    out = tmp_path_factory.mktemp("tiny_export") / "out"
    with contextlib.chdir(tinynet_dir):
        status = main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"),
                       "--data", str(tiny_npz), "--calib-size", "100", "--out", str(out)])
    return status, out


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``, read from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pids: list[int]) -> list[int]:
    left = []
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                left.append(p)
        except OSError:
            pass
    return left


@pytest.fixture()
def procs():
    """``procs.children(pid)``: live child processes; ``procs.alive(pids)``: which of ``pids`` still run."""
    import types
    return types.SimpleNamespace(children=_children, alive=_alive)


def chromium_run(html: Path, tmp: Path, *extra: str):
    """Headless Chromium on a local page, with no network of its own (the flags this workplace's machines need)."""
    import shutil
    import subprocess
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is needed for the HTML test: apt-get install -y chromium")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp / 'profile'}", *extra, html.as_uri()],
                          capture_output=True, text=True, timeout=120)
