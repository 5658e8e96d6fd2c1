"""Registry of torchvision and timm classification architectures for ``benchmarks/architectures.py``.

Every entry is a module-level factory taking no arguments, so the export CLI can build it:

    python -m pipeline.export --model benchmarks.arch_models:resnet18 [--weights sd.pt] --input-shape 3,64,64 ...

Each factory returns the architecture with 10 classes and a seeded random initialisation (``torch.manual_seed(0)``
right before construction: the same weights in every process). No pretrained weights are ever downloaded
(``pretrained=False`` / ``weights=None``). ``INPUT_SIZE[name]`` is the square input side each model is benchmarked
at: 64 for all of them (transformer-style timm models are built with ``img_size=64``).

``python benchmarks/arch_models.py --train-steps N --archs a,b --out DIR`` fine-tunes each model briefly on
Fashion-MNIST (3-channel 64x64, normalised with mean 0.286 / std 0.353), recomputes BatchNorm's running
statistics on 50 training batches (:func:`recalibrate_bn`), and writes ``DIR/NAME.pt``, a plain
state dict (``torch.load(weights_only=True)`` loads it), so the export's agreement means something.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_CLASSES = 10
SEED = 0
MEAN, STD = 0.286, 0.353  # Fashion-MNIST's statistics (after 1/255), the same on the three replicated channels

# name -> (library, builder name, keyword arguments)
SPECS: dict[str, tuple[str, str, dict]] = {
    # torchvision
    "resnet18": ("torchvision", "resnet18", {}),
    "resnet50": ("torchvision", "resnet50", {}),
    "googlenet": ("torchvision", "googlenet", {"aux_logits": False, "init_weights": True}),
    "shufflenet_v2_x1_0": ("torchvision", "shufflenet_v2_x1_0", {}),
    "shufflenet_v2_x0_5": ("torchvision", "shufflenet_v2_x0_5", {}),
    "mobilenet_v2": ("torchvision", "mobilenet_v2", {}),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", {}),
    "mobilenet_v3_large": ("torchvision", "mobilenet_v3_large", {}),
    "efficientnet_b0": ("torchvision", "efficientnet_b0", {}),
    "squeezenet1_1": ("torchvision", "squeezenet1_1", {}),
    "mnasnet0_5": ("torchvision", "mnasnet0_5", {}),
    "densenet121": ("torchvision", "densenet121", {}),
    "regnet_y_400mf": ("torchvision", "regnet_y_400mf", {}),
    "regnet_x_400mf": ("torchvision", "regnet_x_400mf", {}),
    "alexnet": ("torchvision", "alexnet", {}),
    "convnext_tiny": ("torchvision", "convnext_tiny", {}),
    # timm
    "mobilevit_xxs": ("timm", "mobilevit_xxs", {}),
    "efficientformerv2_s0": ("timm", "efficientformerv2_s0", {"img_size": 64}),
    "levit_128s": ("timm", "levit_128s", {"img_size": 64}),
    "fastvit_t8": ("timm", "fastvit_t8", {}),
    "edgenext_xx_small": ("timm", "edgenext_xx_small", {}),
    "mobilenetv4_conv_small": ("timm", "mobilenetv4_conv_small", {}),
    "mobileone_s0": ("timm", "mobileone_s0", {}),
    "repvgg_a0": ("timm", "repvgg_a0", {}),
    "ghostnet_050": ("timm", "ghostnet_050", {}),
    "convnext_atto": ("timm", "convnext_atto", {}),
    "regnetx_002": ("timm", "regnetx_002", {}),
    "efficientvit_b0": ("timm", "efficientvit_b0", {}),
    "lcnet_050": ("timm", "lcnet_050", {}),
    "hgnetv2_b0": ("timm", "hgnetv2_b0", {}),
    "resnet10t": ("timm", "resnet10t", {}),
    "rexnet_100": ("timm", "rexnet_100", {}),
    "mixnet_s": ("timm", "mixnet_s", {}),
    "tinynet_e": ("timm", "tinynet_e", {}),
    "vit_tiny_patch16_64": ("timm", "vit_tiny_patch16_224", {"img_size": 64}),
    "starnet_s050": ("timm", "starnet_s050", {}),
    "repghostnet_050": ("timm", "repghostnet_050", {}),
    "mobilenetv3_small_050": ("timm", "mobilenetv3_small_050", {}),
    "ese_vovnet19b_slim_dw": ("timm", "ese_vovnet19b_slim_dw", {}),
}
INPUT_SIZE: dict[str, int] = {name: 64 for name in SPECS}
ARCHS = tuple(SPECS)


def build(name: str, seed: int = SEED):
    """The architecture ``name`` with NUM_CLASSES outputs and a seeded random initialisation."""
    import torch
    from benchmarks.torchvision_shim import import_timm, import_torchvision
    if name not in SPECS:
        raise KeyError(f"unknown architecture {name!r}; choose from {', '.join(SPECS)}")
    lib, builder, kwargs = SPECS[name]
    tv = import_torchvision()
    torch.manual_seed(seed)
    if lib == "torchvision":
        model = getattr(tv.models, builder)(weights=None, num_classes=NUM_CLASSES, **kwargs)
    else:
        timm = import_timm()
        model = timm.create_model(builder, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    return model.eval()


def _factory(name: str):
    def factory():
        return build(name)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{SPECS[name][0]} {SPECS[name][1]}, {NUM_CLASSES} classes, seeded random init"
    return factory


for _name in SPECS:
    globals()[_name] = _factory(_name)
del _name


# --------------------------------------------------------------------------- brief fine-tuning

def fmnist_rgb(split: str, size: int = 64, limit: int | None = None, data_dir: str | None = None):
    """Fashion-MNIST (pipeline.inputs.data) as uint8 N x 3 x size x size (bilinear resize, grey replicated), and labels."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from pipeline.inputs import data as data_mod
    ds = data_mod.load("fashion-mnist", data_dir)
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    out = np.empty((len(x), 3, size, size), np.uint8)
    for i in range(0, len(x), 1000):
        t = torch.from_numpy(x[i:i + 1000].astype(np.float32))
        if t.max() <= 1.0:  # the loader may already have scaled to [0, 1]
            t = t * 255.0
        r = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        out[i:i + 1000] = r.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).numpy()
    return out, np.asarray(y).astype(np.int64)


def train(name: str, steps: int, out: Path, batch: int = 32, lr: float = 1e-3, threads: int = 1,
          log=print) -> dict:
    """Fine-tune ``name`` from its seeded init for ``steps`` AdamW steps; save a plain state dict to ``out``."""
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    size = INPUT_SIZE[name]
    x, y = fmnist_rgb("train", size, limit=min(60000, steps * batch))
    model = build(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(SEED)
    t0 = time.perf_counter()
    loss_v = float("nan")
    for step in range(steps):
        idx = rng.integers(0, len(x), batch)
        xb = (torch.from_numpy(x[idx]).float() / 255.0 - MEAN) / STD
        yb = torch.from_numpy(y[idx])
        opt.zero_grad()
        logits = model(xb)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        loss = torch.nn.functional.cross_entropy(logits, yb)
        loss.backward()
        opt.step()
        loss_v = float(loss)
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  {name} step {step + 1}/{steps} loss {loss_v:.3f}")
    recalibrated = recalibrate_bn(model, x, rng, batches=BN_BATCHES, batch=batch)
    model.eval()
    xt, yt = fmnist_rgb("test", size, limit=1000)
    with torch.no_grad():
        pred = torch.cat([model((torch.from_numpy(xt[i:i + 250]).float() / 255.0 - MEAN) / STD).argmax(1)
                          for i in range(0, len(xt), 250)])
    acc = float((pred.numpy() == yt).mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)  # as is: its _metadata holds versions some models check (torchvision mnasnet)
    torch.load(out, weights_only=True)  # loadable without pickles
    return {"arch": name, "steps": steps, "batch": batch, "final_loss": round(loss_v, 4),
            "fp32_top1_first_1000_test": round(acc, 4), "seconds": round(time.perf_counter() - t0, 1),
            "bn_recalibrated_layers": recalibrated, "bn_recalibration_batches": BN_BATCHES if recalibrated else 0,
            "weights": str(out)}


BN_BATCHES = 50  # 1,600 training images


def recalibrate_bn(model, x, rng, *, batches: int, batch: int) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over ``batches`` training batches
    (weights untouched). A short fine-tune leaves them mostly at their initial values where the architecture
    sets a small BN momentum (torchvision mnasnet 0.0003, mobilenet_v3 0.01): the eval-mode model was then at
    chance (measured: mnasnet0_5 9.3%, mobilenet_v3_large 9.7% after 150 steps). Returns the layers reset."""
    import torch
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            idx = rng.integers(0, len(x), batch)
            model((torch.from_numpy(x[idx]).float() / 255.0 - MEAN) / STD)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return len(bns)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="build or briefly fine-tune the benchmark architectures")
    p.add_argument("--archs", default="all", help="comma-separated names or 'all'")
    p.add_argument("--train-steps", type=int, default=0, help="fine-tune N steps on Fashion-MNIST and save weights")
    p.add_argument("--out", default="/tmp/arch-bench/weights")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    names = list(SPECS) if args.archs == "all" else [a.strip() for a in args.archs.split(",") if a.strip()]
    if args.list:
        for n in SPECS:
            print(f"{n:26s} {SPECS[n][0]:12s} {SPECS[n][1]} {INPUT_SIZE[n]}x{INPUT_SIZE[n]}")
        return 0
    for n in names:
        if args.train_steps > 0:
            print(train(n, args.train_steps, Path(args.out) / f"{n}.pt"))
        else:
            m = build(n)
            print(n, sum(p.numel() for p in m.parameters()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
