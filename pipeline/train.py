"""Seeded training of zoo models: ``python -m pipeline.train zoo:NAME --data fashion-mnist --epochs N``.

Reproduces a shipped checkpoint: same seed, same data, same schedule -> the same weights
(up to nondeterminism of CPU kernels across machines). Writes the weights as a plain
``state_dict`` and a JSON record with the measured FP32 test accuracy.

A zoo entry with a separate training form (``train_factory``, e.g. MobileOne's
over-parameterised branches) is trained in that form, turned into the deployed form with
its ``to_deploy`` and checked to give the same outputs; the deployed weights are written.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as data_mod
from . import preprocessing, zoo
from .errors import ModelError, PipelineError, UsageError


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shifts by up to ``pad`` pixels and horizontal flips (seeded)."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # n,h
    cols = (dx[:, None] + torch.arange(w)[None, :])  # n,w
    idx = torch.arange(n)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous()


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(torch.from_numpy(x[i:i + batch]))
        correct += int((logits.argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def train(name: str, data_spec: str, data_dir: str | None, epochs: int, seed: int, batch_size: int,
          lr: float, out_dir: Path, threads: int, channels_last: bool = False) -> dict:
    entry = zoo.get_entry(name)
    ds = data_mod.load(data_spec, data_dir, entry.input_shape)
    data_mod.check_fits(ds, entry.input_shape, entry.num_classes)
    pre = preprocessing.Preprocessing(
        input_shape=entry.input_shape, source_layout=ds.source_layout, source_dtype=ds.source_dtype,
        scale=ds.scale, mean=entry.mean, std=entry.std,
    )
    x_train = preprocessing.apply(ds.x_train, pre)
    x_test = preprocessing.apply(ds.x_test, pre)
    last = len(x_train) % batch_size
    onednn = onednn_training_check(name, sorted({min(batch_size, len(x_train))} | ({last} if last else set())),
                                   channels_last, threads)
    if not onednn["used"]:
        print(f"warning: {onednn['reason']}", file=sys.stderr, flush=True)
    threads_before = torch.get_num_threads()
    t0 = time.time()
    try:
        torch.set_num_threads(threads)
        with torch.backends.mkldnn.flags(enabled=onednn["used"]):
            model, history = _fit(entry, x_train, ds.y_train, x_test, ds.y_test, epochs, seed, batch_size, lr,
                                  channels_last, t0)
    finally:  # the caller's thread count is theirs (a test or a notebook goes on with it)
        torch.set_num_threads(threads_before)
    model = model.to(memory_format=torch.contiguous_format).eval()
    deploy = None
    if entry.to_deploy is not None:
        deploy = _to_deploy(entry, model, x_test, ds.y_test)
        model = deploy.pop("model")
    record = {
        "model": f"zoo:{name}",
        "dataset": ds.describe(),
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": "AdamW(weight_decay=5e-4) + OneCycleLR, label smoothing 0.05, shift±2 + hflip",
        "channels_last": channels_last,
        "onednn": onednn,
        "fp32_test_top1": evaluate(model, x_test, ds.y_test),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "train_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        **({"deploy": deploy} if deploy is not None else {}),
        "history": history,
        "command": " ".join(["python -m pipeline.train"] + sys.argv[1:]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.pt"
    with tempfile.NamedTemporaryFile(dir=out_dir, delete=False, suffix=".tmp") as f:
        torch.save(model.state_dict(), f)
    os.chmod(f.name, 0o644)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile is private; the weights ship with the package
    os.replace(f.name, weights)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _fit(entry, x_train, y_train, x_test, y_test, epochs, seed, batch_size, lr, channels_last, t0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = entry.build_for_training()
    if channels_last:  # NHWC activations: faster CPU convolutions, above all depthwise ones
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb = augment(xt[idx], gen)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), yt[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": total / len(xt), "test_top1": acc})
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f}, test top-1 {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return model, history


# oneDNN (PyTorch's x86 convolution library) picks JIT kernels from what CPUID reports about the processor and its
# caches. On some virtualised AMD EPYC hosts its training kernels abort the whole process inside loss.backward()
# (MobileOne, seen 3 runs of 3; the same step passes with oneDNN off), and no Python code can catch an abort.
# PyTorch's native kernels do not depend on that detection, but train 2-20x slower (measured here: MobileNetV2
# 18.6 s vs 0.9 s for 8 steps), so oneDNN stays on wherever it works: one training step of the same model, batch
# sizes, memory format and thread count is first run in a child process, and only if that child dies from a
# signal is oneDNN turned off, for this training only.
_PROBE = ("import sys, json; from pipeline.train import _probe_step; "
          "_probe_step(*json.loads(sys.argv[1]))")


def onednn_training_check(name: str, batch_sizes: list[int], channels_last: bool, threads: int,
                          timeout_s: float = 300.0, probe: str = _PROBE) -> dict:
    """Whether oneDNN's training kernels survive one step of ``zoo:name`` on this CPU (run in a child process)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = json.dumps([name, batch_sizes, channels_last, threads])
    try:
        r = subprocess.run([sys.executable, "-c", probe, args], env=env, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"used": False, "probe": "timeout", "reason": f"a oneDNN training step of zoo:{name} did not finish in {timeout_s:.0f} s "
                                         "in a child process; training with PyTorch's native kernels (slower)"}
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        return {"used": False, "probe": "crashed", "reason": f"oneDNN's training kernels crashed ({sig}) on this CPU in a test step of "
                                         f"zoo:{name}; training with PyTorch's native kernels instead (slower, "
                                         "same arithmetic up to float rounding)"}
    if r.returncode != 0:  # a Python error is not a kernel crash: the training itself raises it with its message
        last = (r.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return {"used": True, "probe": "error", "reason": f"the oneDNN probe step failed without a crash ({last})"}
    return {"used": True, "probe": "ok", "reason": "a oneDNN training step ran in a child process on this CPU"}


def _probe_step(name: str, batch_sizes: list[int], channels_last: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    entry = zoo.get_entry(name)
    model = entry.build_for_training()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for n in batch_sizes:
        x = torch.rand((n, *entry.input_shape), generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), torch.randint(0, entry.num_classes, (n,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def _to_deploy(entry, trained: nn.Module, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """Turn the trained module into the factory's form and check both give the same test outputs."""
    deployed = entry.to_deploy(trained).eval()
    reference = entry.factory()
    try:
        reference.load_state_dict(deployed.state_dict(), strict=True)
    except RuntimeError as e:
        raise ModelError(f"zoo:{entry.name}: to_deploy gives weights that do not fit its factory ({str(e)[:200]})") from None
    diffs, scale = [], []
    for i in range(0, len(x_test), 1000):
        xb = torch.from_numpy(x_test[i:i + 1000])
        a, b = trained(xb), reference.eval()(xb)
        diffs.append(float((a - b).abs().max()))
        scale.append(float(a.abs().max()))
    max_diff, tol = max(diffs), 1e-4 * max(1.0, max(scale))
    if not max_diff <= tol:
        raise ModelError(f"zoo:{entry.name}: the deployed form differs from the trained one by up to {max_diff:.3g} "
                            f"on the test set (tolerance {tol:.3g}); fix its to_deploy")
    return {"model": reference, "train_form_parameters": int(sum(p.numel() for p in trained.parameters())),
            "train_form_test_top1": evaluate(trained, x_test, y_test),
            "max_abs_logit_diff_vs_train_form": max_diff, "tolerance": tol}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description="Seeded training of a zoo model.")
    p.add_argument("model", help="zoo:NAME")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--channels-last", action="store_true",
                   help="train with NHWC (channels_last) activations: faster on CPU, same model")
    p.add_argument("--out", default=str(zoo.WEIGHTS_DIR), help="folder for NAME.pt and NAME.json")
    args = p.parse_args(argv)
    try:
        if not args.model.startswith("zoo:"):
            raise UsageError(f"{args.model!r} is not a zoo model; pass zoo:NAME (one of {', '.join(zoo.list_models(include_unshipped=True))})")
        if args.epochs < 1:
            raise UsageError("--epochs must be at least 1")
        rec = train(args.model[4:], args.data, args.data_dir, args.epochs, args.seed, args.batch_size,
                    args.lr, Path(args.out), args.threads, channels_last=args.channels_last)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    print(f"{rec['model']}: FP32 test top-1 {rec['fp32_test_top1']:.4f} after {rec['epochs']} epochs "
          f"({rec['train_seconds']}s); weights in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
