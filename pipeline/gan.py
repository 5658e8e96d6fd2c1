"""A small seeded class-conditional DCGAN, trained by the project on the training split (``--calib gan``).

Masouris et al. (arXiv 2305.06052) calibrate on images from a class-conditional GAN (StyleGAN2-ADA, or its
distilled student DiStyleGAN) trained on the task's own training split. This is the same idea at the size of
our data: a DCGAN (Radford et al., 2016) conditioned on the class, small enough to train on CPU in minutes.

- **Generator.** ``z ~ N(0, I)`` (``z_dim``) concatenated with the one-hot class -> linear -> ``2w x s x s``
  (``s = ceil(H/4)``, BatchNorm, ReLU) -> transposed conv 4x4/2 to ``w x 2s x 2s`` (BatchNorm, ReLU) ->
  transposed conv 4x4/2 to ``C x 4s x 4s`` -> tanh, centre-cropped to ``C x H x W``. Output in [-1, 1], the raw
  value range mapped linearly.
- **Discriminator.** conv 4x4/2 to ``w`` (LeakyReLU 0.2) -> conv 4x4/2 to ``2w`` (BatchNorm, LeakyReLU) ->
  flatten -> a projection head (Miyato & Koyama, 2018): ``linear(h) + <embed(y), h>``, plus an auxiliary
  classifier ``linear(h) -> K`` (AC-GAN, Odena et al., 2017) that makes the class conditioning learnt in few steps.
- **Training.** non-saturating GAN loss (BCE with logits) plus the auxiliary cross-entropy (D on real images
  with their labels, G on fakes with the class they were conditioned on), Adam (lr 2e-4, beta1 0.5) for both, as
  DCGAN and as the paper's DiStyleGAN defaults; every draw (shuffling, noise, initial weights) comes from ``seed``.

Trained generators are cached under the calibration cache folder (``<cache>/gan/``) by everything they depend
on: the data (name and a SHA-1 of the training images and labels), the image shape and raw range, the seed,
the configuration and :data:`VERSION`. Weights are a plain ``state_dict`` written with ``torch.save`` and read
back with ``torch.load(weights_only=True)``; a sidecar ``.json`` holds the key and the training summary. A file
lock makes concurrent study cells wait for one training instead of each training its own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import CalibrationError

VERSION = 1  # bump when the architecture or the training loop changes (invalidates cached generators)


@dataclass(frozen=True)
class GanConfig:
    z_dim: int = 64
    width: int = 32  # w: channels of the first conv of D and the last hidden layer of G
    epochs: int = 2
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    subset: int | None = None  # train on a class-stratified random subset of this many images (None: all)

    def to_dict(self) -> dict:
        return asdict(self)


# ``--calib gan`` (default) and ``--calib gan:tiny`` (tests and the study's --quick preset: seconds, not minutes).
PRESETS = {
    "default": GanConfig(),
    "tiny": GanConfig(width=32, epochs=1, batch_size=32, lr=1e-3, subset=6000),
}


def _torch():
    import torch
    return torch


def build_models(shape: tuple[int, int, int], n_classes: int, cfg: GanConfig):
    """(generator, discriminator) for C x H x W images and ``n_classes`` classes (torch modules)."""
    torch = _torch()
    nn = torch.nn
    c, h, w = shape
    sh, sw = math.ceil(h / 4), math.ceil(w / 4)
    k = cfg.width

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_classes, self.z_dim, self.shape = n_classes, cfg.z_dim, (c, h, w)
            self.fc = nn.Sequential(nn.Linear(cfg.z_dim + n_classes, 2 * k * sh * sw, bias=False),
                                    nn.BatchNorm1d(2 * k * sh * sw), nn.ReLU(True))
            self.up = nn.Sequential(
                nn.ConvTranspose2d(2 * k, k, 4, 2, 1, bias=False), nn.BatchNorm2d(k), nn.ReLU(True),
                nn.ConvTranspose2d(k, c, 4, 2, 1), nn.Tanh())

        def forward(self, z, y):
            onehot = nn.functional.one_hot(y, self.n_classes).to(z.dtype)
            x = self.up(self.fc(torch.cat([z, onehot], 1)).view(-1, 2 * k, sh, sw))
            top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
            return x[:, :, top:top + h, left:left + w]

    class Discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(c, k, 4, 2, 1), nn.LeakyReLU(0.2, True),
                nn.Conv2d(k, 2 * k, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * k), nn.LeakyReLU(0.2, True),
                nn.Flatten())
            feat = 2 * k * ((h // 2) // 2) * ((w // 2) // 2)  # a 4x4/2 conv with padding 1 halves (floor)
            self.head = nn.Linear(feat, 1)
            self.embed = nn.Embedding(n_classes, feat)
            self.classify = nn.Linear(feat, n_classes)

        def forward(self, x, y):
            """(real/fake logit with the class projection, class logits of the auxiliary classifier)"""
            f = self.body(x)
            return self.head(f).squeeze(1) + (self.embed(y) * f).sum(1), self.classify(f)

    return Generator(), Discriminator()


def _init(module, gen) -> None:
    """DCGAN initialisation (N(0, 0.02) convs and linears, N(1, 0.02) norms), drawn from ``gen``."""
    torch = _torch()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear, torch.nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=gen) * 0.02)
                m.bias.zero_()


def to_unit(x_raw: np.ndarray, raw_range: tuple[float, float]) -> np.ndarray:
    """Raw images -> float32 in [-1, 1] (the generator's tanh range)."""
    lo, hi = raw_range
    return ((x_raw.astype(np.float32) - lo) / (hi - lo) * 2 - 1).astype(np.float32)


def from_unit(x: np.ndarray, raw_range: tuple[float, float]) -> np.ndarray:
    lo, hi = raw_range
    return lo + (np.clip(x, -1, 1) + 1) / 2 * (hi - lo)


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` images, as equal a share per class as the data allows, drawn with ``seed``."""
    rng = np.random.default_rng([seed, 11])
    classes = np.unique(y)
    per = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    take = []
    i = 0
    while len(take) < n and any(i < len(p) for p in per):
        take += [int(p[i]) for p in per if i < len(p)]
        i += 1
    return np.sort(np.array(take[:n], np.int64))


def train(x_raw: np.ndarray, y: np.ndarray, raw_range: tuple[float, float], seed: int, cfg: GanConfig,
          progress=None) -> tuple[dict, dict]:
    """Train the generator on raw N x C x H x W images and labels 0..K-1; (generator state_dict, summary)."""
    torch = _torch()
    if len(x_raw) == 0:
        raise CalibrationError("the training split is empty; a GAN cannot be trained on it")
    y = np.asarray(y).astype(np.int64)
    n_classes = int(y.max()) + 1
    if cfg.subset is not None and cfg.subset < len(y):
        idx = stratified_subset(y, cfg.subset, seed)
        x_raw, y = x_raw[idx], y[idx]
    x = torch.from_numpy(to_unit(x_raw, raw_range))
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # nothing should draw from the global generator; belt and braces
    G, D = build_models(tuple(x.shape[1:]), n_classes, cfg)
    _init(G, gen)
    _init(D, gen)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    n = len(x)
    bs = min(cfg.batch_size, n)
    steps = n // bs if n >= bs else 1
    t0 = time.perf_counter()
    G.train()
    D.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: small convs gain little from more, and study cells run side by side
    try:
        history = _epochs(G, D, opt_g, opt_d, x, yt, gen, cfg, n_classes, steps, bs, progress)
    finally:
        torch.set_num_threads(threads)
    summary = {"images": int(n), "classes": n_classes, "steps": steps * cfg.epochs, "history": history,
               "train_s": round(time.perf_counter() - t0, 1), "torch_threads": 1, "torch": torch.__version__}
    return {k: v.detach().clone() for k, v in G.state_dict().items()}, summary


def _epochs(G, D, opt_g, opt_d, x, yt, gen, cfg: GanConfig, n_classes: int, steps: int, bs: int, progress):
    torch = _torch()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ce = torch.nn.functional.cross_entropy
    n = len(x)
    history = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        ld_sum = lg_sum = 0.0
        for s in range(steps):
            b = order[s * bs:(s + 1) * bs]
            real, lab = x[b], yt[b]
            z = torch.randn(len(b), cfg.z_dim, generator=gen)
            fake_lab = torch.randint(0, n_classes, (len(b),), generator=gen)
            fake = G(z, fake_lab)
            ones, zeros = torch.ones(len(b)), torch.zeros(len(b))
            adv_real, cls_real = D(real, lab)
            adv_fake, _ = D(fake.detach(), fake_lab)
            loss_d = bce(adv_real, ones) + bce(adv_fake, zeros) + ce(cls_real, lab)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            adv_g, cls_g = D(fake, fake_lab)
            loss_g = bce(adv_g, ones) + ce(cls_g, fake_lab)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            ld_sum += float(loss_d.detach())
            lg_sum += float(loss_g.detach())
            if progress:
                progress(epoch, s, steps)
        history.append({"epoch": epoch + 1, "loss_d": round(ld_sum / steps, 4), "loss_g": round(lg_sum / steps, 4)})
    return history


def load_generator(state: dict, shape: tuple[int, int, int], n_classes: int, cfg: GanConfig):
    G, _ = build_models(shape, n_classes, cfg)
    G.load_state_dict(state)
    G.eval()
    return G


def sample(G, labels: np.ndarray, seed: int, batch: int = 500) -> np.ndarray:
    """Generator outputs (float32 N x C x H x W in [-1, 1]) for ``labels``; the noise drawn from ``seed``.

    Sampled in eval mode (BatchNorm with its running statistics), so a sample does not depend on its batch."""
    torch = _torch()
    gen = torch.Generator().manual_seed(int(seed) + 1_000_003)
    labels = np.asarray(labels, np.int64)
    out = []
    with torch.no_grad():
        z_all = torch.randn(len(labels), G.z_dim, generator=gen)
        for i in range(0, len(labels), batch):
            out.append(G(z_all[i:i + batch], torch.from_numpy(labels[i:i + batch])).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, *G.shape), np.float32)


def conditioned_labels(size: int, n_classes: int) -> np.ndarray:
    """The class each sample is conditioned on: 0, 1, ..., K-1, 0, 1, ... (balanced, as the paper's 500 per class)."""
    return np.arange(size, dtype=np.int64) % n_classes


# --------------------------------------------------------------------------- the cache

def gan_key(x_raw: np.ndarray, y: np.ndarray, dataset_name: str, raw_range, seed: int, cfg: GanConfig) -> dict:
    from pipeline.calib_data.cache import data_fingerprint
    h = hashlib.sha1(np.ascontiguousarray(np.asarray(y).astype(np.int64)).data).hexdigest()
    return {"version": VERSION, "seed": int(seed), "config": cfg.to_dict(), "shape": list(x_raw.shape[1:]),
            "raw_range": [float(raw_range[0]), float(raw_range[1])],
            "data": {"name": dataset_name, "sha1": data_fingerprint(x_raw), "labels_sha1": h}}


def _paths(cache_dir: Path, key: dict) -> tuple[Path, Path, Path]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    stem = f"gan-s{key['seed']}-{'x'.join(map(str, key['shape']))}-{digest}"
    return cache_dir / f"{stem}.pt", cache_dir / f"{stem}.json", cache_dir / f"{stem}.lock"


@contextlib.contextmanager
def _locked(lock: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, at worst two processes train the same generator
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read(pt: Path, meta_path: Path, key: dict):
    torch = _torch()
    if not (pt.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            return None
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception:  # unreadable or truncated entry: retrain and overwrite
        return None
    return state, meta.get("training", {})


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def trained_generator(x_raw: np.ndarray, y: np.ndarray, dataset_name: str, raw_range, seed: int, cfg: GanConfig,
                      cache_dir: Path | None, progress=None):
    """(generator in eval mode, info): from ``cache_dir`` when this (data, seed, config) was trained before, else
    trained now (and stored there). ``info`` says which, where, and the training summary."""
    torch = _torch()
    shape = tuple(int(v) for v in x_raw.shape[1:])
    n_classes = int(np.asarray(y).max()) + 1
    key = gan_key(x_raw, y, dataset_name, raw_range, seed, cfg)
    if cache_dir is None:
        state, summary = train(x_raw, y, raw_range, seed, cfg, progress)
        return load_generator(state, shape, n_classes, cfg), {"cache": {"used": False}, "training": summary}
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        state, summary = train(x_raw, y, raw_range, seed, cfg, progress)
        return load_generator(state, shape, n_classes, cfg), {"cache": {"used": False}, "training": summary}
    pt, meta_path, lock = _paths(cache_dir, key)
    with _locked(lock):
        hit = _read(pt, meta_path, key)
        if hit is not None:
            state, summary = hit
            return (load_generator(state, shape, n_classes, cfg),
                    {"cache": {"used": True, "hit": True, "path": str(pt)}, "training": summary})
        state, summary = train(x_raw, y, raw_range, seed, cfg, progress)
        try:
            _write_atomic(pt, lambda f: torch.save(state, f))
            _write_atomic(meta_path, lambda f: f.write(json.dumps({"key": key, "training": summary}, indent=1).encode()))
        except OSError:
            pass  # caching never fails a calibration
    return (load_generator(state, shape, n_classes, cfg),
            {"cache": {"used": True, "hit": False, "path": str(pt)}, "training": summary})
