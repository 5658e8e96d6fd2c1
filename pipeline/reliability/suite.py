"""The reliability report: what accuracy alone hides about the int8 model.

Sections written into ``report.json`` (and rendered into ``report.html`` by :mod:`pipeline.report.html`):

- ``calibration_drift``: top1, ece, ace, mce, nll, brier of FP32 and int8 on the clean test split, and
  int8 minus FP32 (:mod:`pipeline.reliability.confidence`), plus reliability-diagram and histogram data;
- ``temperature_scaling``: T fitted on a validation split carved from the *training* data, for FP32 and
  for int8; test metrics before/after; the FP32 temperature applied to int8 (:mod:`pipeline.reliability.temperature`);
- ``flips``: top-1 disagreements and how well margin/entropy/DeepGini/least confidence flag them
  (:mod:`pipeline.reliability.flips`);
- ``per_class``: FP32 and int8 accuracy per class, the drop, the worst class;
- ``shifts``: the corruption suite (:mod:`pipeline.reliability.corruptions`, :mod:`pipeline.reliability.shifts`);
- ``reliability``: how all of the above was obtained (kernels, threads, workers, seeds, timings).

Gates: ``max_ece_increase`` (int8 ECE minus FP32 ECE on the clean test split) and ``max_worst_drop_pp``
(the largest top-1 drop over the worst-case groups: every class of the clean test split and every
corruption x severity set).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.reliability import confidence as cm
from pipeline.reliability.corruptions import CORRUPTIONS, PRESETS, REGISTERED, SEVERITIES
from pipeline.errors import UsageError
from pipeline.reliability.flips import flips_section
from pipeline.reliability.engine import BLOCK, Engine, ModelPair, clean_jobs, default_workers, shift_jobs
from pipeline.quiet import progress as progress_bar
from pipeline.reliability.shifts import record, shifts_section
from pipeline.reliability.temperature import fit_temperature

DEFAULT_VAL_SIZE = 5000
DEFAULT_MAX_ECE_INCREASE = 0.02
DEFAULT_MAX_WORST_DROP_PP = 5.0


@dataclass(frozen=True)
class ReliabilityConfig:
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    val_size: int | None = None  # None: the default, resolve_val_size(None, training images)
    seed: int = 0
    workers: int = 0  # 0: one per available core (with ray: every CPU of the Ray instance or cluster)
    ray: str | None = None  # "auto" (a local Ray instance) or a cluster address: the jobs run as Ray tasks
    max_ece_increase: float = DEFAULT_MAX_ECE_INCREASE
    max_worst_drop_pp: float = DEFAULT_MAX_WORST_DROP_PP


MIN_RELIABLE_VAL_SIZE = 100  # below this the fitted temperatures carry a warning


def parse_corruptions(text: str | None) -> tuple[str, ...]:
    """``--corruptions``: 'all' (default: the default suite, ``CORRUPTIONS``), 'none', a preset on its own
    (``PRESETS``, e.g. 'mnist-c'), or a comma-separated list of registered corruption names."""
    if text is None or text.strip() == "all":
        return CORRUPTIONS
    if text.strip() == "none":
        return ()
    if text.strip() in PRESETS:
        return PRESETS[text.strip()]
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UsageError(f"--corruptions {text!r} is empty; pass all, none or a comma-separated list of names "
                         f"(see pipeline/reliability/corruptions.py), or a preset: {', '.join(PRESETS)}")
    import difflib
    for n in names:
        if n in PRESETS:
            raise UsageError(f"--corruptions: the preset {n!r} stands alone; pass --corruptions {n}, or list its "
                             f"corruptions by name: {','.join(PRESETS[n])}")
        if n not in REGISTERED:
            close = difflib.get_close_matches(n, REGISTERED + tuple(PRESETS), n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(close)}?" if close
                    else f"choose from {', '.join(REGISTERED)}, or a preset: {', '.join(PRESETS)}")
            raise UsageError(f"--corruptions: unknown corruption {n!r}; {hint}")
    if len(set(names)) != len(names):
        raise UsageError("--corruptions lists a corruption twice; list each once")
    return names


def resolve_val_size(requested: int | None, n_train: int) -> int:
    """The validation split's size. ``requested`` None (``--val-size`` not given): min(5000, n_train // 5), at
    least 1, so small datasets work without the flag. An explicit size must be 1..n_train (UsageError, exit 2).
    Cheap: call it as soon as the training split's size is known, before any model runs."""
    n_train = int(n_train)
    if n_train <= 0:
        raise UsageError("the dataset has no training images; the validation split for the temperature is "
                         "carved from them: pass data with a training split")
    if requested is None:
        return max(1, min(DEFAULT_VAL_SIZE, n_train // 5))
    requested = int(requested)
    if requested <= 0:
        raise UsageError(f"--val-size {requested} is empty; pass at least 1 (at most {n_train}, the training "
                         f"images), or leave it out for min({DEFAULT_VAL_SIZE}, training images // 5)")
    if requested > n_train:
        raise UsageError(f"--val-size {requested} exceeds the {n_train} training images; pass at most {n_train}, "
                         f"or leave it out for min({DEFAULT_VAL_SIZE}, training images // 5)")
    return requested


def describe_val_size(requested: int | None, n_train: int) -> str:
    size = resolve_val_size(requested, n_train)
    if requested is None:
        return (f"{size} of the {n_train} training images: the default min({DEFAULT_VAL_SIZE}, training images // 5) "
                "(--val-size not given)")
    return f"{size} of the {n_train} training images (--val-size {size})"


def held_out_split(weights: str | None, dataset) -> tuple[np.ndarray | None, str]:
    """The training images ``pipeline.train --holdout N`` kept out of training, read from the record it wrote
    beside the weights (``NAME.json`` beside ``NAME.pt``; JSON, never code), or (None, why not). Used only when the
    record is of exactly these weights (its ``weights_sha256``) and of this training split (data set name and
    size), so the temperature is fitted on images the model never saw."""
    import json

    from pipeline.jsonio import sha256_file
    if not weights:
        return None, ""
    path = Path(weights)
    rec_path = path.with_suffix(".json")
    if not rec_path.is_file() or not path.is_file():
        return None, ""  # no training record: nothing to say
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        return None, f"{rec_path.name} is not a readable JSON training record"
    hold = rec.get("holdout") if isinstance(rec, dict) else None
    if not isinstance(hold, dict) or not hold.get("n"):
        return None, f"{rec_path.name} holds no held-out images (pipeline.train without --holdout)"
    if rec.get("weights_sha256") != sha256_file(path):
        return None, f"{rec_path.name} does not describe these weights (no or another weights_sha256)"
    ds = rec.get("dataset") or {}
    n_train = len(dataset.y_train)
    if ds.get("name") != dataset.name or ds.get("train_size") != n_train:
        return None, (f"{rec_path.name} was trained on {ds.get('name')} ({ds.get('train_size')} training images), "
                      f"not this {dataset.name} ({n_train})")
    idx = hold.get("indices")
    if not isinstance(idx, list) or not idx or not all(isinstance(i, int) and 0 <= i < n_train for i in idx) \
            or len(set(idx)) != len(idx):
        return None, f"{rec_path.name} holdout.indices are not distinct training-image indices"
    return np.sort(np.asarray(idx, dtype=np.int64)), f"the {len(idx)} training images {rec_path.name} records as held out"


def validation_indices(y_train: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A class-balanced random subset of the training split (never the test split) for fitting T.
    ``size`` None: the default size (:func:`resolve_val_size`)."""
    from pipeline.calib_data.real import balanced_indices
    size = resolve_val_size(size, len(y_train))
    # A seed stream of its own, so the split is not the same draw as a 'balanced' representative dataset.
    stream = int(np.random.default_rng([int(seed), 0x7E3]).integers(2**31))
    return np.sort(balanced_indices(y_train, size, stream))


# --------------------------------------------------------------------------- sections from logits

def calibration_drift(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict:
    f, q = cm.summary(fp32, labels), cm.summary(int8, labels)
    pf, pq = cm.softmax(fp32), cm.softmax(int8)
    return {
        "fp32": f, "int8": q, "delta": {k: q[k] - f[k] for k in f},
        "n": int(len(labels)),
        "reliability_diagram": {"fp32": cm.reliability_bins(pf, labels), "int8": cm.reliability_bins(pq, labels)},
        "confidence_histogram": {"edges": cm.reliability_bins(pf, labels)["edges"],
                                 "fp32": cm.confidence_histogram(pf), "int8": cm.confidence_histogram(pq)},
        "definitions": {
            "ece": f"top-label, {cm.N_BINS} equal-width bins on [0, 1], weighted by bin size",
            "ace": f"top-label, {cm.N_BINS} adaptive equal-mass bins (equal confidences kept in one bin)",
            "mce": f"largest |accuracy - confidence| over the non-empty {cm.N_BINS} equal-width bins",
            "nll": "mean -log p(true class), natural log",
            "brier": "mean over samples of sum_k (p_k - onehot_k)^2 (range 0..2)",
            "delta": "int8 minus FP32",
            "probabilities": "softmax of the FP32 logits and of the dequantized int8 outputs",
        },
    }


def temperature_scaling(fp32_val: np.ndarray, int8_val: np.ndarray, y_val: np.ndarray, fp32_test: np.ndarray,
                        int8_test: np.ndarray, y_test: np.ndarray, validation: dict) -> dict:
    tf, tq = fit_temperature(fp32_val, y_val), fit_temperature(int8_val, y_val)

    def side(fit, val, test):
        return {"temperature": fit.temperature, "fit": fit.to_dict(),
                "val_nll_before": fit.nll_before, "val_nll_after": fit.nll_after,
                "test_before": cm.summary(test, y_test), "test_after": cm.summary(test, y_test, fit.temperature)}

    fp32, int8 = side(tf, fp32_val, fp32_test), side(tq, int8_val, int8_test)
    fp32["reading"], int8["reading"] = temperature_reading(tf.temperature), temperature_reading(tq.temperature)
    transfer = cm.summary(int8_test, y_test, tf.temperature)
    return {
        "validation": validation,
        "method": "one scalar T minimising mean NLL of softmax(z / T) on the validation split (Newton on 1/T; "
                  "convex); fitted separately for FP32 and for the int8 outputs (dequantized)",
        "meaning": TEMPERATURE_MEANING,
        "fp32": fp32,
        "int8": int8,
        "int8_with_fp32_temperature": {
            "temperature": tf.temperature, "test": transfer,
            "gap_vs_own_temperature": {k: transfer[k] - int8["test_after"][k] for k in ("ece", "nll", "brier")},
            "note": "a temperature fitted on the FP32 model before quantization, applied to the int8 model",
        },
        "temperature_ratio_int8_to_fp32": tq.temperature / tf.temperature,
    }


TEMPERATURE_MEANING = ("T divides the logits before the softmax. T > 1: the model is over-confident (its probabilities "
                       "are higher than its accuracy) and scaling softens them; T < 1: the model is under-confident "
                       "and scaling sharpens them; T = 1: calibrated as it is. Top-1 never changes.")
TEMPERATURE_CLOSE_TO_ONE = 0.05  # |T - 1| below this: read as calibrated as it is


def temperature_reading(t: float) -> str:
    """One sentence on what a fitted temperature says about the model (over- or under-confident)."""
    if abs(t - 1.0) < TEMPERATURE_CLOSE_TO_ONE:
        return f"T = {t:.3g}, close to 1: the model is about as confident as it is accurate; scaling changes little"
    if t > 1.0:
        return (f"T = {t:.3g} > 1: the model is over-confident on the validation split; dividing its logits by T "
                "softens its probabilities")
    return (f"T = {t:.3g} < 1: the model is under-confident on the validation split; dividing its logits by T "
            "sharpens its probabilities")


def change_phrase(drop_pp: float, subject: str = "the int8 model") -> str:
    """A top-1 drop in points said without a double negative: "loses 0.38 pp", "gains 0.38 pp" (a negative drop),
    "matches FP32"."""
    if round(drop_pp, 2) == 0:
        return f"{subject} matches FP32 (0.00 pp)"
    return f"{subject} {'loses' if drop_pp > 0 else 'gains'} {abs(drop_pp):.2f} pp"


def class_label(c: int, class_names=None) -> str:
    """Class ``c`` for people: "3 (Dress)" when named, else "3"."""
    if class_names and 0 <= c < len(class_names):
        return f"{c} ({class_names[c]})"
    return str(c)


def per_class(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, class_names=None) -> dict:
    k = max(int(labels.max()) + 1, fp32.shape[1])
    pf, pq = np.argmax(fp32, 1), np.argmax(int8, 1)
    rows = []
    for c in range(k):
        m = labels == c
        n = int(m.sum())
        if n == 0:
            continue
        f, q = float(np.mean(pf[m] == c)), float(np.mean(pq[m] == c))
        rows.append({"class": c, "name": (class_names[c] if class_names and c < len(class_names) else str(c)),
                     "label": class_label(c, class_names), "n": n, "fp32_top1": f, "int8_top1": q, "drop_pp": (f - q) * 100.0,
                     "flips": int(np.sum(pf[m] != pq[m]))})
    worst = max(rows, key=lambda r: (r["drop_pp"], r["flips"]))
    return {"classes": rows, "worst_class": worst,
            "delta_worst_pp": worst["drop_pp"],
            "note": "drop_pp = FP32 minus int8 top-1 on that class's test images; worst class = largest drop "
                    "(Yuan et al.'s worst-group view, groups = classes)"}


def gates(sections: dict, cfg: ReliabilityConfig) -> dict:
    d = sections["calibration_drift"]["delta"]["ece"]
    cls = sections["per_class"]["worst_class"]
    worst = {"group": f"class {cls.get('label', cls['name'])}", "drop_pp": cls["drop_pp"]}
    sh = sections["shifts"]
    if sh.get("records"):
        w = sh["worst_by_int8_drop"]
        if w["drop_pp"] > worst["drop_pp"]:
            worst = {"group": f"{w['corruption']} severity {w['severity']}", "drop_pp": w["drop_pp"]}
    from pipeline.report import Gate
    return {
        "max_ece_increase": Gate(passed=bool(d <= cfg.max_ece_increase), value=d, limit=cfg.max_ece_increase,
                                 reason=f"int8 ECE minus FP32 ECE on the clean test split: {d:+.4f} "
                                        f"(limit {cfg.max_ece_increase:+.4f})"),
        "max_worst_drop_pp": Gate(passed=bool(worst["drop_pp"] <= cfg.max_worst_drop_pp), value=worst["drop_pp"],
                                  limit=cfg.max_worst_drop_pp, details={"group": worst["group"]},
                                  reason=f"largest FP32-minus-int8 top-1 drop over every class and every shifted "
                                         f"set: {worst['drop_pp']:+.2f} pp on {worst['group']} "
                                         f"(limit {cfg.max_worst_drop_pp:+.2f} pp)"),
    }


# --------------------------------------------------------------------------- the whole evaluation

@dataclass
class ReliabilityResult:
    sections: dict
    gates: dict  # name -> report.Gate
    timings_s: dict = field(default_factory=dict)
    clean: dict = field(default_factory=dict)  # {"fp32", "int8"}: the clean-test outputs the sections used


def evaluate(pair: ModelPair, dataset, n_test: int, cfg: ReliabilityConfig, *, clean: dict | None = None,
             loaded_model=None, held_out_from_training: bool | None = None, runtime_note: str = "",
             progress: bool = False, log=None, clean_from_fp32_onnx: bool = False,
             held_out: tuple[np.ndarray | None, str] = (None, "")) -> ReliabilityResult:
    """Run FP32 and int8 on the validation split and every shifted test set, and build all sections.

    ``clean``: {"fp32": logits, "int8": logits} already computed on the first ``n_test`` test images
    (the export's predictions.npz); computed here when None. With ``pair.fp32_onnx`` they are used only when
    ``clean_from_fp32_onnx`` says their FP32 side came from onnxruntime on that same model.onnx too.
    ``held_out``: (:func:`held_out_split`): images held out of training, the temperature split by default (a
    seeded class-balanced subset of them with ``--val-size``).
    """
    t_all = time.perf_counter()
    if pair.fp32_onnx and not clean_from_fp32_onnx:
        clean, runtime_note = None, ""  # the given clean logits came from another FP32 runtime: recompute
    clean_given = clean is not None
    y_test = np.asarray(dataset.y_test[:n_test])
    held_idx, held_why = held_out
    if held_idx is not None:
        vidx = held_idx
        if cfg.val_size is not None and cfg.val_size < len(held_idx):
            sub = validation_indices(dataset.y_train[held_idx], cfg.val_size, cfg.seed)
            vidx = np.sort(held_idx[sub])
        held_out_from_training = True
    else:
        vidx = validation_indices(dataset.y_train, cfg.val_size, cfg.seed)
    arrays = {"test": np.ascontiguousarray(dataset.x_test[:n_test]),
              "val": np.ascontiguousarray(dataset.x_train[vidx])}
    workers = cfg.workers or (0 if cfg.ray else default_workers())
    jobs = clean_jobs("val", len(vidx))
    if clean is None:
        jobs += clean_jobs("test", n_test)
    jobs += shift_jobs("test", n_test, cfg.corruptions, cfg.severities, cfg.seed)
    total = sum(j.stop - j.start for j in jobs)
    timings = {}
    t0 = time.perf_counter()
    where = f"on Ray ({cfg.ray})" if cfg.ray else f"{workers} worker" + ("s" if workers != 1 else "")
    with progress_bar(total, f"reliability: FP32 ({pair.fp32_runtime}) + int8, {where}", progress) as bar, \
            Engine(pair, arrays, workers=workers, loaded_model=loaded_model, ray=cfg.ray) as engine:
        results = engine.run(jobs, progress=bar)
        workers = engine.workers
    timings["engine"] = round(time.perf_counter() - t0, 3)
    if clean is None:
        clean = results[("test", None, 0)]
    fp32, int8 = clean["fp32"], clean["int8"]
    probabilities = cm.outputs_are_probabilities(fp32)
    if probabilities:  # the model ends in a softmax: its outputs are probabilities, use log p as logits
        results = {k: {m: (cm.as_logits(v, True) if m in ("fp32", "int8") else v) for m, v in r.items()}
                   for k, r in results.items()}
        fp32, int8 = cm.as_logits(fp32, True), cm.as_logits(int8, True)
    val = results[("val", None, 0)]
    y_val = np.asarray(dataset.y_train[vidx])
    validation = {
        "split": "train", "size": int(len(vidx)), "seed": cfg.seed,
        "size_chosen": describe_val_size(cfg.val_size, len(dataset.y_train)) if held_idx is None else
        (f"all {len(held_idx)} held-out images" if len(vidx) == len(held_idx) else
         f"{len(vidx)} of the {len(held_idx)} held-out images (--val-size {cfg.val_size})"),
        "selection": "class-balanced random subset of the training split (own seed stream); the test split is "
                     "never used for fitting" if held_idx is None else
        f"{held_why}: images the model never trained on (pipeline.train --holdout); the test split is never used",
        "held_out_from_training": held_out_from_training,
        **({"held_out_split": f"not used: {held_why}"} if held_idx is None and held_why else {}),
        "note": ("the model was trained on these images, so T is fitted on data it has seen; a held-out "
                 "split would typically give a larger T (more softening)") if held_out_from_training is False
        else ("unknown whether the model saw these images in training" if held_out_from_training is None else ""),
    }
    if cfg.val_size is None and held_idx is None:  # the size was not asked for: say how it was chosen
        validation["note"] = "; ".join(t for t in (validation["size_chosen"], validation["note"]) if t)
    if len(vidx) < MIN_RELIABLE_VAL_SIZE:  # one NLL minimum over a handful of images says little about T
        validation["warning"] = (f"only {len(vidx)} validation images: temperatures fitted on fewer than "
                                 f"{MIN_RELIABLE_VAL_SIZE} are unreliable; pass --val-size 1000 or more (needs a "
                                 "training split 1000+ images larger than that)")
        validation["note"] = "; ".join(t for t in (validation["warning"], validation["note"]) if t)
        (log or print)(f"warning: {validation['warning']}", file=sys.stderr)
    t0 = time.perf_counter()
    clean_rec = record(None, 0, fp32, int8, y_test)
    sections = {
        "calibration_drift": calibration_drift(fp32, int8, y_test),
        "temperature_scaling": temperature_scaling(val["fp32"], val["int8"], y_val, fp32, int8, y_test, validation),
        "flips": flips_section(fp32, int8),
        "per_class": per_class(fp32, int8, y_test, getattr(dataset, "class_names", None)),
        "shifts": shifts_section(results, y_test, cfg.corruptions, cfg.severities, clean=clean_rec),
    }
    sections["shifts"]["generated"] = (
        f"on the fly from the raw test pixels by pipeline/reliability/corruptions.py (strength tables after CIFAR-10-C and "
        f"MNIST-C; not the published files), in blocks of {BLOCK} images seeded by (seed {cfg.seed}, block); each "
        f"shifted set generated once and fed to both models; FP32 on {pair.fp32_runtime}, int8 on LiteRT "
        f"{pair.kernels} kernels")
    if sections["shifts"].get("records"):  # in words, without a double negative ("loses -0.38 pp")
        sections["shifts"]["mean_change"] = (change_phrase(sections["shifts"]["mean"]["drop_pp"])
                                             + f" on average over the {sections['shifts']['sets']} shifted sets")
    timings["metrics"] = round(time.perf_counter() - t0, 3)
    timings["total"] = round(time.perf_counter() - t_all, 3)
    images_run = total
    sections["reliability"] = {
        "how": f"FP32 ({pair.fp32_runtime}"
               + (f" on the export's ONNX file {Path(pair.fp32_onnx).name}, checked against PyTorch by the export"
                  if pair.fp32_onnx else "")
               + f", 1 intra-op thread per worker) and the deployed TFLite model (LiteRT {pair.kernels} kernels, 1 thread per "
               f"worker, batch {pair.batch_size}) on the same inputs, "
               + (f"{workers} Ray worker(s) ({'a local Ray instance' if cfg.ray == 'auto' else 'cluster ' + cfg.ray}, "
                  f"one job of {BLOCK} images per task); " if cfg.ray else
                  f"{workers} worker process(es) on this host; ")
               + "int8 metrics use the dequantized outputs" + (f"; {runtime_note}" if runtime_note else ""),
        "fp32_runtime": pair.fp32_runtime,
        "outputs": "probabilities (model ends in softmax; log p used as logits)" if probabilities else "logits",
        "test_images": int(n_test),
        "validation_images": int(len(vidx)),
        "validation_size": describe_val_size(cfg.val_size, len(dataset.y_train)),
        "shifted_sets": len(cfg.corruptions) * len(cfg.severities),
        "images_evaluated": int(images_run),
        "model_runs": int(2 * images_run),
        "workers": workers,
        "backend": f"ray ({cfg.ray})" if cfg.ray else "local",
        "block": BLOCK,
        "seed": cfg.seed,
        "seconds": timings,
        "images_per_s": round(images_run / timings["engine"], 1) if timings["engine"] else None,
        "throughput_note": "images per second through both models (each image run by FP32 and int8), "
                           "measured on this host during this evaluation, including corruption generation and "
                           "worker start-up",
        "clean_outputs": "the export's run stage (the arrays in predictions.npz)" if clean_given
        else "computed here by the same workers",
    }
    return ReliabilityResult(sections=sections, gates=gates(sections, cfg), timings_s=timings,
                             clean={"fp32": clean["fp32"], "int8": clean["int8"]})
