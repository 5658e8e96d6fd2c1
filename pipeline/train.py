"""Seeded training: ``python -m pipeline.train zoo:NAME --data fashion-mnist --epochs N``, or a user's own
``package.module:factory`` (``--weights`` to fine-tune from a state_dict) on their ``--data my.npz``.

Reproduces a shipped checkpoint: same seed, same data, same schedule -> the same weights
(up to nondeterminism of CPU kernels across machines). Writes the weights as a plain
``state_dict`` and a JSON record with the measured FP32 test accuracy.

A zoo entry with a separate training form (``train_factory``, e.g. MobileOne's
over-parameterised branches) is trained in that form, turned into the deployed form with
its ``to_deploy`` and checked to give the same outputs; the deployed weights are written.
"""
from __future__ import annotations

import argparse
import dataclasses
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

from pipeline.inputs import data as data_mod
from pipeline import zoo
from pipeline.inputs import models
from pipeline.inputs import preprocessing
from pipeline.errors import ModelError, UsageError


AUGMENTATIONS = ("shift+hflip", "shift", "none")
LABEL_SMOOTHING = 0.05  # the shipped checkpoints' (--label-smoothing); 0 = plain cross-entropy
HOLDOUT_RULE = ("per class c (in label order), the first n_c indices of numpy.random.default_rng(seed).permutation "
                "of that class's training indices, one generator drawn in class order; n_c = N // K, plus 1 for "
                "the first N % K classes")


def holdout_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` training indices held out of training, class-balanced and seeded (HOLDOUT_RULE), sorted."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if n < 0 or n > len(labels) - len(classes):
        raise UsageError(f"--holdout {n} must be from 0 to {len(labels) - len(classes)} (the training split has "
                         f"{len(labels)} images in {len(classes)} classes)")
    rng = np.random.default_rng(seed)
    picked = []
    for i, c in enumerate(classes):
        own = np.flatnonzero(labels == c)
        want = n // len(classes) + (1 if i < n % len(classes) else 0)
        if want > len(own) - 1:
            raise UsageError(f"--holdout {n} would hold out all images of class {c}; pass a smaller --holdout")
        picked.append(rng.permutation(own)[:want])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2, hflip: bool = True) -> torch.Tensor:
    """Random shifts by up to ``pad`` pixels and (``hflip``) horizontal flips (seeded)."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # n,h
    cols = (dx[:, None] + torch.arange(w)[None, :])  # n,w
    idx = torch.arange(n)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if hflip:
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


def trainee(spec: str, weights: str | None = None, input_shape: tuple[int, int, int] | None = None,
            data_shape: tuple[int, int, int] | None = None, mean: tuple[float, ...] | None = None,
            std: tuple[float, ...] | None = None) -> zoo.ZooEntry:
    """What to train, as a zoo entry: a registered one (``zoo:NAME``), or an unregistered one built around the
    user's ``package.module:factory`` (named on the command line; ``weights`` fine-tunes from a state_dict)."""
    if spec.startswith("zoo:"):
        entry = zoo.get_entry(spec[4:])
        if weights:  # fine-tune the shipped architecture from the given state_dict
            factory = lambda: models.load(spec, weights).module  # noqa: E731
            entry = dataclasses.replace(entry, factory=factory, train_factory=None, to_deploy=None)
        return entry
    if ":" not in spec:
        raise UsageError(f"{spec!r} is neither zoo:NAME nor package.module:factory; pass one of those "
                         f"(zoo models: {', '.join(zoo.list_models(include_unshipped=True))})")
    factory = lambda: models.load(spec, weights).module  # noqa: E731
    shape = tuple(input_shape or data_shape or ())
    if len(shape) != 3:
        raise UsageError(f"cannot tell the input shape of {spec}; pass --input-shape C,H,W")
    num_classes = models.probe(models.load(spec, weights), shape)
    mod, _, attr = spec.partition(":")
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{mod.split('.')[-1]}_{attr}")
    c = shape[0]
    return zoo.ZooEntry(name=name, factory=factory, input_shape=shape, num_classes=num_classes, dataset="user",
                        mean=preprocessing.per_channel(mean, c, 0.0, "mean"),
                        std=preprocessing.per_channel(std, c, 1.0, "std"), description=f"factory {spec}")


def train(entry: zoo.ZooEntry | str, data_spec: str, data_dir: str | None, epochs: int, seed: int, batch_size: int,
          lr: float, out_dir: Path, threads: int, channels_last: bool = False, spec: str | None = None,
          weights: str | None = None, augmentation: str = "shift+hflip", holdout: int = 0,
          label_smoothing: float = LABEL_SMOOTHING, robust=None, train_limit: int | None = None) -> dict:
    """Train ``entry`` (a zoo entry, or a zoo name) and write ``out_dir/NAME.pt`` (state_dict) and ``NAME.json``.

    ``spec``/``weights``: how a child process rebuilds the model for the oneDNN check (default ``zoo:NAME``).
    ``holdout``: that many training images (``holdout_indices(y_train, holdout, seed)``) are never trained on;
    the record names them (``holdout.indices``), e.g. to fit a temperature on images the model has not seen."""
    if isinstance(entry, str):
        entry = zoo.get_entry(entry)
    name, spec = entry.name, spec or f"zoo:{entry.name}"
    ds = data_mod.load(data_spec, data_dir, entry.input_shape)
    data_mod.check_fits(ds, entry.input_shape, entry.num_classes)
    pre = preprocessing.Preprocessing(
        input_shape=entry.input_shape, source_layout=ds.source_layout, source_dtype=ds.source_dtype,
        scale=ds.scale, mean=entry.mean, std=entry.std,
    )
    held = holdout_indices(ds.y_train, holdout, seed) if holdout else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(len(ds.y_train)), held)
    if train_limit:  # --train-limit: the first N of the images trained on
        keep = keep[:train_limit]
    x_train, y_train = preprocessing.apply(ds.x_train[keep], pre), ds.y_train[keep]
    x_test = preprocessing.apply(ds.x_test, pre)
    last = len(x_train) % batch_size
    # More threads than the cores this process may run on never trains faster, and oneDNN's MobileOne backward
    # pass once corrupted the heap with 3 threads on 2 cores (an Intel Xeon CI host, after the probe passed).
    asked, threads = threads, max(1, min(threads, _cores()))
    onednn = onednn_training_check(spec, weights, entry.input_shape,
                                   sorted({min(batch_size, len(x_train))} | ({last} if last else set())),
                                   channels_last, threads)
    if not onednn["used"]:
        print(f"warning: {onednn['reason']}", file=sys.stderr, flush=True)
    threads_before = torch.get_num_threads()
    t0 = time.time()
    try:
        torch.set_num_threads(threads)
        with torch.backends.mkldnn.flags(enabled=onednn["used"]):
            model, history, robust_record = _fit(entry, x_train, y_train, x_test, ds.y_test, epochs, seed,
                                                 batch_size, lr, channels_last, t0, augmentation, label_smoothing,
                                                 robust)
    finally:  # the caller's thread count is theirs (a test or a notebook goes on with it)
        torch.set_num_threads(threads_before)
    model = model.to(memory_format=torch.contiguous_format).eval()
    deploy = None
    if entry.to_deploy is not None:
        deploy = _to_deploy(entry, model, x_test, ds.y_test)
        model = deploy.pop("model")
    record = {
        "model": spec,
        **({"initial_weights": weights} if weights else {}),
        "dataset": ds.describe(),
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": f"AdamW(weight_decay=5e-4) + OneCycleLR, label smoothing {label_smoothing:g}",
        "label_smoothing": label_smoothing,
        "holdout": {"n": int(len(held)), "seed": seed, "rule": HOLDOUT_RULE, "indices": held.tolist(),
                    "trained_on": int(len(keep))},
        "augmentation": {"shift+hflip": "shift±2 + hflip", "shift": "shift±2", "none": "none"}[augmentation],
        "channels_last": channels_last,
        "onednn": onednn,
        "threads": {"used": threads, "asked": asked, "cores": _cores()},
        "fp32_test_top1": evaluate(model, x_test, ds.y_test),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "train_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        **({"deploy": deploy} if deploy is not None else {}),
        **({"robust": robust_record} if robust_record else {}),
        "history": history,
        "mean": list(entry.mean),
        "std": list(entry.std),
        "command": " ".join(["python -m pipeline.train"] + sys.argv[1:]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_file = out_dir / f"{name}.pt"
    with tempfile.NamedTemporaryFile(dir=out_dir, delete=False, suffix=".tmp") as f:
        torch.save(model.state_dict(), f)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile is private; the weights ship with the package
    os.replace(f.name, weights_file)
    from pipeline.jsonio import sha256_file
    # the record describes exactly these weights: pipeline.evaluate uses its held-out images only when this matches
    record["weights_sha256"] = sha256_file(weights_file)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _fit(entry, x_train, y_train, x_test, y_test, epochs, seed, batch_size, lr, channels_last, t0, augmentation,
         label_smoothing=LABEL_SMOOTHING, robust=None):
    from pipeline import robust_training
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = entry.build_for_training()
    if channels_last:  # NHWC activations: faster CPU convolutions, above all depthwise ones
        model = model.to(memory_format=torch.channels_last)
    robust = robust or robust_training.RobustOptions()
    prepared = robust_training.prepare(model, robust, x_train)  # --qat/--symreg/--satnl (pipeline/robust_training.py)
    model = prepared.train_form
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    history = []
    for epoch in range(epochs):
        robust_training.train_mode(prepared)
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb = xt[idx] if augmentation == "none" else augment(xt[idx], gen, hflip=augmentation == "shift+hflip")
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), yt[idx], label_smoothing=label_smoothing)
            loss = loss + robust_training.penalty(prepared, robust)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": total / len(xt), "test_top1": acc})
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f}, test top-1 {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    model, robust_record = robust_training.finish(prepared)
    return model, history, (robust_record if robust.any else None)


def _cores() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# oneDNN (PyTorch's x86 convolution library) picks JIT kernels from what CPUID reports about the processor and its
# caches. On some virtualised AMD EPYC hosts its training kernels abort the whole process inside loss.backward()
# (MobileOne, seen 3 runs of 3; the same step passes with oneDNN off), and no Python code can catch an abort.
# PyTorch's native kernels do not depend on that detection, but train 2-20x slower (measured here: MobileNetV2
# 18.6 s vs 0.9 s for 8 steps), so oneDNN stays on wherever it works: one training step of the same model, batch
# sizes, memory format and thread count is first run in a child process, and only if that child dies from a
# signal is oneDNN turned off, for this training only.
_PROBE = ("import sys, json; from pipeline.train import _probe_step; "
          "_probe_step(*json.loads(sys.argv[1]))")


def onednn_training_check(spec: str, weights: str | None, input_shape, batch_sizes: list[int], channels_last: bool,
                          threads: int, timeout_s: float = 300.0, probe: str = _PROBE) -> dict:
    """Whether oneDNN's training kernels survive one step of ``spec`` on this CPU (run in a child process)."""
    root = str(Path(__file__).resolve().parents[1])
    # The child imports what the user named on the command line, from the same folder as this process.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    args = json.dumps([spec, weights, list(input_shape), batch_sizes, channels_last, threads])
    try:
        r = subprocess.run([sys.executable, "-c", probe, args], env=env, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"used": False, "probe": "timeout", "reason": f"a oneDNN training step of {spec} did not finish in {timeout_s:.0f} s "
                                         "in a child process; training with PyTorch's native kernels (slower)"}
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        return {"used": False, "probe": "crashed", "reason": f"oneDNN's training kernels crashed ({sig}) on this CPU in a test step of "
                                         f"{spec}; training with PyTorch's native kernels instead (slower, "
                                         "same arithmetic up to float rounding)"}
    if r.returncode != 0:  # a Python error is not a kernel crash: the training itself raises it with its message
        last = (r.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return {"used": True, "probe": "error", "reason": f"the oneDNN probe step failed without a crash ({last})"}
    return {"used": True, "probe": "ok", "reason": "a oneDNN training step ran in a child process on this CPU"}


def _probe_step(spec: str, weights: str | None, input_shape: list[int], batch_sizes: list[int], channels_last: bool,
                threads: int) -> None:
    torch.set_num_threads(threads)
    entry = trainee(spec, weights, tuple(input_shape))
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


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import DefaultsFormatter, Parser, floats, seed_int, shape
    p = Parser(prog="python -m pipeline.train", formatter_class=DefaultsFormatter,
               description="Seeded training (or fine-tuning) of a zoo model or of your own "
                           "package.module:factory; writes NAME.pt (a state_dict) and NAME.json (the record).")
    p.add_argument("model", help="zoo:NAME, or package.module:factory (a function or class returning an nn.Module, "
                                 "importable from the current folder)")
    p.add_argument("--weights", help="start from this state_dict (fine-tuning; loaded with weights_only=True)")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist or path/to/data.npz")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--input-shape", type=shape, help="C,H,W of a factory model (default: the data's image shape)")
    p.add_argument("--mean", type=floats, help="factory models: per-channel mean after scaling to [0,1] (default 0)")
    p.add_argument("--std", type=floats, help="factory models: per-channel std after scaling to [0,1] (default 1)")
    p.add_argument("--epochs", type=int, default=12, help="passes over the training split")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the initial weights, the order and augmentation")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (AdamW)")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="PyTorch threads")
    p.add_argument("--augment", choices=AUGMENTATIONS, default="shift+hflip",
                   help="random shifts by up to 2 pixels, and horizontal flips (drop them for data whose classes "
                        "are not mirror-symmetric, e.g. digits or text)")
    p.add_argument("--holdout", type=int, default=0,
                   help="hold N training images out of training (class-balanced, seeded by --seed); the JSON record "
                        "names them, e.g. to fit a temperature on images the model never trained on")
    p.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING,
                   help="label smoothing of the cross-entropy (0 = none; the shipped checkpoints used 0.05)")
    p.add_argument("--train-limit", type=int, help="train on the first N training images only (quick runs, tests)")
    p.add_argument("--qat", action="store_true",
                   help="quantization-aware fine-tuning matching the deployed int8 scheme, from --weights or the zoo's "
                        "shipped weights (pipeline/robust_training.py); writes a plain float state_dict")
    p.add_argument("--symreg", type=float, default=0.0, metavar="LAMBDA",
                   help="add LAMBDA x the weight-symmetry regularizer to the loss (pipeline/robust_training.py)")
    p.add_argument("--satnl", action="store_true",
                   help="train with saturating activations clamp(x, 0, alpha), alpha learned per layer (PACT); "
                        "export the result as --model pipeline.robust_training:satnl_NAME")
    p.add_argument("--channels-last", action="store_true",
                   help="train with NHWC (channels_last) activations: faster on CPU, same model")
    p.add_argument("--out", help=f"folder for NAME.pt and NAME.json (default: {zoo.WEIGHTS_DIR} for zoo models "
                                 "trained from scratch, else the current folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import run_main

    def work():
        args = build_parser().parse_args(argv)
        if args.epochs < 1 or args.batch_size < 1 or args.threads < 1:
            raise UsageError("--epochs, --batch-size and --threads must be at least 1")
        if not 0 <= args.label_smoothing < 1:
            raise UsageError(f"--label-smoothing {args.label_smoothing} must be in [0, 1)")
        if not (args.lr > 0 and args.lr < float("inf")):
            raise UsageError(f"--lr {args.lr} must be a positive number")
        if args.model.startswith("zoo:") and (args.input_shape or args.mean or args.std):
            raise UsageError("--input-shape, --mean and --std are for factory models; a zoo model has its own")
        if args.std and any(v <= 0 for v in args.std):
            raise UsageError("--std values must be positive")
        data_shape = None
        if not args.model.startswith("zoo:") and not args.input_shape:
            data_shape = data_mod.load(args.data, args.data_dir, None).sample_shape
        from pipeline import robust_training
        robust = robust_training.RobustOptions(qat=args.qat, symreg=args.symreg, satnl=args.satnl)
        if args.symreg < 0 or (args.train_limit is not None and args.train_limit < 1):
            raise UsageError("--symreg must be >= 0 and --train-limit at least 1")
        if args.qat and not args.weights and args.model.startswith("zoo:"):  # QAT fine-tunes the shipped weights
            args.weights = str(zoo.get_entry(args.model[4:]).weights_path)
        entry = trainee(args.model, args.weights, args.input_shape, data_shape, args.mean, args.std)
        own = args.model.startswith("zoo:") and not args.weights and not robust.any and not args.train_limit
        out = Path(args.out) if args.out else (zoo.WEIGHTS_DIR if own else Path.cwd())
        rec = train(entry, args.data, args.data_dir, args.epochs, args.seed, args.batch_size, args.lr, out,
                    args.threads, channels_last=args.channels_last, spec=args.model, weights=args.weights,
                    augmentation=args.augment, holdout=args.holdout, label_smoothing=args.label_smoothing,
                    robust=robust, train_limit=args.train_limit)
        return rec, out, entry

    def show(result) -> int:
        rec, out, entry = result
        print(f"{rec['model']}: FP32 test top-1 {rec['fp32_test_top1']:.4f} after {rec['epochs']} epochs "
              f"({rec['train_seconds']}s); weights in {out / (entry.name + '.pt')}")
        return 0

    return run_main(work, then=show)


if __name__ == "__main__":
    from pipeline.cli import exit_program
    exit_program(main())
