"""``python -m pipeline.study ptq``: how reliable is post-training int8 quantization in the worst case?

After Yuan et al. 2023 (arXiv:2303.13003, "Benchmarking the Reliability of Post-training Quantization: a
Particular Focus on Worst-case Performance"). One cell per model x calibration source x calibration size x seed x
paradigm. Each cell calibrates one int8 model on the same representative dataset the export pipeline builds
(``calib_data``, same preprocessing) and measures it against the FP32 ONNX model on onnxruntime CPU:

- ``avg_drop_pp``: top-1(FP32) - top-1(int8) on the clean test images, in points;
- ``worst_class_drop_pp``: max over classes c of acc_fp32(c) - acc_int8(c) (points);
- ``worst_shift_drop_pp``: max over the shifted test sets (corruptions of the same images at one severity) of
  top-1(FP32) - top-1(int8) on that set;
- ``flips_per_10k``: clean test images whose int8 top-1 differs from the FP32 top-1, per 10,000.

Paradigms: ``tflite-per-channel`` and ``tflite-per-tensor`` are the pipeline's own export (TFLiteConverter min-max
calibration, targets tflite-int8 / tflite-int8-per-tensor) run on LiteRT's XNNPACK kernels, 1 thread;
``ort-minmax``, ``ort-entropy`` and ``ort-percentile`` are a peer runtime: ``onnxruntime.quantization.
quantize_static`` (QDQ, per-channel int8 weights, int8 activations) of the same model.onnx with the same
calibration images, run on onnxruntime's CPU provider, 1 thread.

Aggregated per (model, source, size, paradigm) over seeds: mean, sample std (ddof 1) and the worst seed (max).
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from pathlib import Path

import numpy as np

NAME = "ptq"
HELP = "PTQ reliability (Yuan et al. 2023): calibration source x size x seed x paradigm, average/worst drops"

PARADIGMS = {
    # name: (family, what it is)
    "tflite-per-channel": ("tflite", "TFLiteConverter min-max, per-channel weights (target tflite-int8), LiteRT"),
    "tflite-per-tensor": ("tflite", "TFLiteConverter min-max, per-tensor weights (target tflite-int8-per-tensor), "
                                    "LiteRT"),
    "ort-minmax": ("ort", "onnxruntime quantize_static MinMax, QDQ, per-channel weights (peer runtime)"),
    "ort-entropy": ("ort", "onnxruntime quantize_static Entropy, QDQ, per-channel weights (peer runtime)"),
    "ort-percentile": ("ort", "onnxruntime quantize_static Percentile 99.999, QDQ, per-channel weights (peer "
                              "runtime)"),
}
TFLITE_TARGETS = {"tflite-per-channel": "tflite-int8", "tflite-per-tensor": "tflite-int8-per-tensor"}
SHIFTS = ("gaussian_noise", "defocus_blur", "contrast", "rotate")  # names of the default suite (corruptions.py)
SHIFT_SEVERITY = 3
SHIFT_SEED = 0  # the shifted test sets are the same images for every cell (not the calibration seed)
RUN_THREADS = 1  # two cells at once on a 2-core host: one thread each

PRESETS = {
    "default": {"sources": ("balanced", "real", "fractal"), "sizes": (32, 128, 500), "seeds": 5,
                "paradigms": tuple(PARADIGMS), "eval_limit": 2000},
    "quick": {"sources": ("balanced", "fractal"), "sizes": (32,), "seeds": 2,
              "paradigms": ("tflite-per-channel", "ort-minmax"), "eval_limit": 1000, "models": "zoo:refcnn"},
}
DEFAULT_MODELS = "zoo:refcnn"

PAPER = {
    "source": "Yuan et al., arXiv:2303.13003 (2023), as summarised in /work/shared/notes/reliability-research.md "
              "(section C): abstract and first page only; no code; no numbers readable",
    "claims": [
        {"id": "worst_case", "claim": "most PTQ methods are not reliable in worst-case group performance (abstract)"},
        {"id": "calib_distribution", "claim": "reliability is sensitive to the calibration-set distribution "
                                              "(research question in the abstract)"},
        {"id": "paradigm", "claim": "reliability depends on the calibration paradigm (research question)"},
        {"id": "sampling", "claim": "reliability depends on the sampling of the calibration set (research "
                                    "question: data augmentation or sampling strategies)"},
    ],
    "metrics_second_hand": [
        "Δ_avg = L_fp − L_quant (second-hand, an emergentmind topic page citing the paper; unverified)",
        "Δ_worst = max over groups g of (L_quant(g) − L_fp(g)), G partitions the test set, e.g. classes "
        "(second-hand, unverified)",
    ],
    "figures": None,
}

DIFFERENCES = [
    "data set: Fashion-MNIST 28x28 grey; the paper evaluates 'across a wide range of tasks' (abstract), which ones "
    "is not readable",
    "models: the zoo's six small Fashion-MNIST CNNs (tens to hundreds of KiB), not the paper's networks",
    "toolchain: TFLiteConverter min-max (via onnx2tf) on LiteRT XNNPACK, and onnxruntime quantize_static "
    "MinMax/Entropy/Percentile on onnxruntime CPU; the paper's PTQ methods (possibly AdaRound/BRECQ/QDrop) are "
    "not known",
    "bits: W8A8 only, int8 activations with zero points, symmetric int8 weights",
    "groups: Δ_worst is taken over the 10 classes (and separately over 4 synthetic corruptions at severity "
    f"{SHIFT_SEVERITY}: {', '.join(SHIFTS)}); the paper's groups are not known",
    "metric sign: our drops are FP32 minus int8 accuracy (positive = int8 worse), the same orientation as the "
    "second-hand Δ_worst written with losses",
    "evaluation images: the first --eval-limit Fashion-MNIST test images, not the whole split unless "
    "--eval-limit 10000",
    "shifts: generated on the fly by pipeline.reliability.corruptions, not CIFAR-10-C / MNIST-C files",
]


# --------------------------------------------------------------------------- metrics (unit-tested by hand)

def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, 1) == labels)) if len(labels) else float("nan")


def per_class_top1(logits: np.ndarray, labels: np.ndarray, classes) -> dict[int, float]:
    pred = np.argmax(logits, 1)
    return {int(c): float(np.mean(pred[labels == c] == c)) for c in classes if np.any(labels == c)}


def avg_drop_pp(fp32: np.ndarray, quant: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * (top1(fp32, labels) - top1(quant, labels))


def worst_class_drop_pp(fp32: np.ndarray, quant: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """max over the classes present of acc_fp32(c) - acc_int8(c), in points, and that class."""
    classes = np.unique(labels)
    a, b = per_class_top1(fp32, labels, classes), per_class_top1(quant, labels, classes)
    drops = {c: 100.0 * (a[c] - b[c]) for c in a}
    c = max(drops, key=lambda k: (drops[k], -k))
    return drops[c], c


def flips_per_10k(fp32: np.ndarray, quant: np.ndarray) -> float:
    return 1e4 * float(np.mean(np.argmax(fp32, 1) != np.argmax(quant, 1)))


def summarize(values) -> dict:
    """mean, sample std (ddof 1; 0 for one value) and the worst (max) of one metric over seeds."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"n": 0, "mean": None, "std": None, "worst": None}
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"n": len(v), "mean": float(np.mean(v)), "std": std, "worst": float(max(v))}


# --------------------------------------------------------------------------- the cell

def _ort_session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = RUN_THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_ort(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
                          ).reshape(len(x), -1).astype(np.float32)


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration samples, in equal batches: the largest divisor of
    their number up to ``batch`` (onnxruntime's histogram calibrators, Entropy and Percentile, stack the batches'
    outputs and fail on a shorter last batch; MinMax does not depend on the batching)."""

    def __init__(self, name: str, samples: np.ndarray, batch: int = 16):
        batch = max(d for d in range(1, min(batch, len(samples)) + 1) if len(samples) % d == 0)
        self.items = [{name: np.ascontiguousarray(samples[i:i + batch], np.float32)}
                      for i in range(0, len(samples), batch)]

    def get_next(self):
        return self.items.pop(0) if self.items else None


def ort_quantize(fp32_path: Path, q_path: Path, samples: np.ndarray, method: str) -> None:
    """quantize_static of ``fp32_path``: QDQ, int8 activations, per-channel int8 weights, ``method``
    (MinMax, Entropy or Percentile) calibrated on ``samples``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from pipeline.errors import PipelineError
    pre = q_path.with_name("model_preprocessed.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    except Exception:  # optional optimisation step; quantize the model as exported
        pre = fp32_path
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
            quantize_static(str(pre), str(q_path), _Reader(name, samples), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method))
    except Exception as e:
        raise PipelineError(f"onnxruntime quantize_static ({method}) failed: {str(e).strip()[:200]}") from None


def ptq_cell(config: dict, files: dict, seed: int) -> dict:
    """One model x source x size x seed x paradigm: calibrate, then FP32 vs int8 on clean and shifted test sets.

    Pure: the record depends on config and seed only (the folder it writes to is scratch, overwritten)."""
    from pipeline.export import ExportConfig, export
    from pipeline.reliability.engine import Job, make_inputs
    from pipeline.stages.prepare import prepare
    paradigm = config["paradigm"]
    family = PARADIGMS[paradigm][0]
    folder = Path(config["out"])
    t0 = time.perf_counter()
    cfg = ExportConfig(model=config["model"], calib=config["calib"], calib_size=config["calib_size"], seed=seed,
                       target=TFLITE_TARGETS.get(paradigm, "tflite-int8"), eval_limit=config["eval_limit"],
                       out=str(folder), overwrite=True, verbose=False)
    quiet = lambda *a, **k: None  # noqa: E731
    inputs = prepare(cfg, log=quiet)
    if family == "tflite":
        status, folder, report = export(cfg, log=quiet)
        from pipeline.runtime.litert import TfliteRunner
        runner = TfliteRunner(folder / "model_int8.tflite", kernels="xnnpack", threads=RUN_THREADS,
                              input_layout=report.to_dict()["preprocessing"].get("tflite_input_layout") or "NHWC")
        run_q = lambda x: runner.run(x).outputs  # noqa: E731
        runtime = f"LiteRT {runner.kernels} kernels, {RUN_THREADS} thread"
        calib_n = int(report.to_dict()["calibration"]["size"])
    else:
        from pipeline.conversion.onnx_export import export_onnx
        folder.mkdir(parents=True, exist_ok=True)
        export_onnx(inputs.model, inputs.x_test[:256], folder / "model.onnx")
        method = {"ort-minmax": "MinMax", "ort-entropy": "Entropy", "ort-percentile": "Percentile"}[paradigm]
        ort_quantize(folder / "model.onnx", folder / "model_qdq.onnx", inputs.calib.samples, method)
        q = _ort_session(folder / "model_qdq.onnx")
        run_q = lambda x: _run_ort(q, x)  # noqa: E731
        runtime = f"onnxruntime CPUExecutionProvider (peer runtime), {RUN_THREADS} thread"
        calib_n = len(inputs.calib)
    fp = _ort_session(folder / "model.onnx")
    labels = np.asarray(inputs.labels)
    n = len(labels)
    sets = {"clean": inputs.x_test}
    for c in config["shifts"]:
        sets[c] = make_inputs(inputs.raw_test, Job("test", 0, n, c, config["severity"], SHIFT_SEED), inputs.pre)
    per_set = {}
    clean_fp = clean_q = None
    for name, x in sets.items():
        f, qz = _run_ort(fp, x), run_q(x)
        per_set[name] = {"fp32_top1": top1(f, labels), "int8_top1": top1(qz, labels),
                         "drop_pp": avg_drop_pp(f, qz, labels), "flips_per_10k": flips_per_10k(f, qz)}
        if name == "clean":
            clean_fp, clean_q = f, qz
    wc, wc_class = worst_class_drop_pp(clean_fp, clean_q, labels)
    shift_drops = {k: v["drop_pp"] for k, v in per_set.items() if k != "clean"}
    worst_shift = max(shift_drops, key=shift_drops.get) if shift_drops else None
    return {
        "model": config["model"], "calib": config["calib"], "calib_size": config["calib_size"],
        "calib_used": calib_n, "seed": seed, "paradigm": paradigm, "family": family, "runtime": runtime,
        "fp32_runtime": f"onnxruntime CPUExecutionProvider on model.onnx, {RUN_THREADS} thread",
        "evaluated": n,
        "avg_drop_pp": per_set["clean"]["drop_pp"], "worst_class_drop_pp": wc, "worst_class": wc_class,
        "worst_shift_drop_pp": shift_drops[worst_shift] if worst_shift else None, "worst_shift": worst_shift,
        "flips_per_10k": per_set["clean"]["flips_per_10k"],
        "fp32_top1": per_set["clean"]["fp32_top1"], "int8_top1": per_set["clean"]["int8_top1"],
        "sets": per_set, "folder": str(folder), "cell_seconds": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------- the study

def add_arguments(parser) -> None:
    # The shared --models defaults to every zoo model; this study's default grid is sized for one model
    # (about an hour on 2 cores), so its default is refcnn. --models all still runs the whole zoo.
    parser.set_defaults(models=None)
    for action in parser._actions:  # the shared flag's help names "all" as its default: say this study's
        if action.dest == "models":
            action.help = f"comma-separated zoo:NAME models, or all (default {DEFAULT_MODELS})"
    parser.add_argument("--quick", action="store_true",
                        help="the test preset: refcnn, balanced+fractal, size 32, 2 seeds, tflite-per-channel + "
                             "ort-minmax, 1000 test images (about a minute)")
    parser.add_argument("--sources", help="comma-separated --calib sources (default balanced,real,fractal)")
    parser.add_argument("--sizes", help="comma-separated calibration sizes (default 32,128,500)")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 per setting (default 5)")
    parser.add_argument("--paradigms", help="comma-separated, of " + ", ".join(PARADIGMS) + " (default all)")
    parser.add_argument("--eval-limit", type=int, help="first N test images (default 2000)")
    parser.add_argument("--shifts", help="comma-separated corruptions of the default suite for the worst-shift "
                                         f"drop, at severity {SHIFT_SEVERITY} (default {','.join(SHIFTS)})")


def grid(args) -> dict:
    """The preset (--quick or default) with the flags given over it."""
    from pipeline.errors import UsageError
    from pipeline.reliability.corruptions import CORRUPTIONS
    p = dict(PRESETS["quick" if getattr(args, "quick", False) else "default"])
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    if args.sources:
        p["sources"] = split(args.sources)
    if args.sizes:
        try:
            p["sizes"] = tuple(int(x) for x in split(args.sizes))
        except ValueError:
            raise UsageError(f"--sizes {args.sizes!r}: pass integers separated by commas, e.g. 32,128,500") from None
    if args.seeds is not None:
        p["seeds"] = args.seeds
    if args.paradigms:
        p["paradigms"] = split(args.paradigms)
    if args.eval_limit is not None:
        p["eval_limit"] = args.eval_limit
    p["shifts"] = split(args.shifts) if args.shifts else SHIFTS
    for k in ("sources", "sizes", "paradigms"):
        if not p[k] or len(set(p[k])) != len(p[k]):
            raise UsageError(f"--{k} is empty or names a value twice; name each once")
    bad = [x for x in p["paradigms"] if x not in PARADIGMS]
    if bad:
        raise UsageError(f"unknown paradigm {bad[0]!r}; choose from {', '.join(PARADIGMS)}")
    bad = [x for x in p["shifts"] if x not in CORRUPTIONS]
    if bad:
        raise UsageError(f"--shifts {bad[0]!r} is not in the default corruption suite ({', '.join(CORRUPTIONS)})")
    if any(s <= 0 for s in p["sizes"]) or p["seeds"] <= 0 or p["eval_limit"] <= 0:
        raise UsageError("--sizes, --seeds and --eval-limit must be at least 1")
    models = args.models or p.get("models") or DEFAULT_MODELS
    p["models"] = models
    return p


def cells(args, out: Path) -> list:
    from pipeline.execution import Cell
    from pipeline.study import model_slug, parse_models
    g = grid(args)
    result = []
    # seed outermost: a run stopped early (and resumed with a smaller --seeds) has every setting at the first seeds
    for seed in range(g["seeds"]):
        for model in parse_models(g["models"]):
            for src in g["sources"]:
                for size in g["sizes"]:
                    for par in g["paradigms"]:
                        slug = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in src)
                        config = {"model": model, "calib": src, "calib_size": size, "paradigm": par,
                                  "eval_limit": g["eval_limit"], "shifts": list(g["shifts"]),
                                  "severity": SHIFT_SEVERITY,
                                  "out": str(out / "exports" / model_slug(model) / f"{slug}-{size}" / f"seed{seed}"
                                             / par)}
                        result.append(Cell(key=f"{model}/{src}/{size}/seed{seed}/{par}", fn=ptq_cell,
                                           config=config, seed=seed))
    return result


METRICS = ("avg_drop_pp", "worst_class_drop_pp", "worst_shift_drop_pp", "flips_per_10k")


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (model, source, size, paradigm) over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["calib"], r["calib_size"], r["paradigm"]), []).append(r)
    rows = []
    for (model, src, size, par), rs in groups.items():
        row = {"model": model, "calib": src, "calib_size": size, "paradigm": par, "seeds": sorted(r["seed"] for r in rs),
               "runtime": rs[0]["runtime"], "fp32_top1": rs[0]["fp32_top1"], "evaluated": rs[0]["evaluated"]}
        for m in METRICS:
            row[m] = summarize(r[m] for r in rs)
        row["worst_seed"] = max(rs, key=lambda r: r["worst_class_drop_pp"])["seed"]
        rows.append(row)
    return rows


def checks(rows: list[dict], records: list[dict]) -> list[dict]:
    """The paper's claims as checks, each with our measured evidence for or against."""
    out = []
    if not rows:
        return out
    gap = [(r["worst_class_drop_pp"]["mean"] - r["avg_drop_pp"]["mean"]) for r in rows]
    worst_gt = sum(1 for r in rows if r["worst_class_drop_pp"]["worst"] > max(1.0, 3 * abs(r["avg_drop_pp"]["mean"])))
    out.append({"id": "worst_case", "evidence":
                f"worst-class drop exceeds the average drop by {np.mean(gap):.2f} pp on average over {len(rows)} "
                f"settings (max {max(gap):.2f}); in {worst_gt}/{len(rows)} settings the worst seed's worst-class "
                "drop is above max(1 pp, 3x the mean average drop)",
                "verdict": "supported" if worst_gt >= len(rows) / 2 else "not supported here" if worst_gt == 0
                else "partly"})

    def spread(key: str, label: str, fix: tuple[str, ...]) -> dict:
        by: dict[tuple, dict] = {}
        for r in rows:
            by.setdefault(tuple(r[k] for k in fix), {})[r[key]] = r["worst_class_drop_pp"]["mean"]
        ranges = [max(v.values()) - min(v.values()) for v in by.values() if len(v) > 1]
        if not ranges:
            return {"evidence": f"only one {label} measured", "verdict": "not measured"}
        return {"evidence": f"mean worst-class drop varies by {np.mean(ranges):.2f} pp on average (max "
                            f"{max(ranges):.2f}) across {label}s, other settings fixed ({len(ranges)} comparisons)",
                "verdict": "supported" if max(ranges) >= 1.0 else "not supported here"}
    out.append({"id": "calib_distribution", **spread("calib", "calibration source",
                                                     ("model", "calib_size", "paradigm"))})
    out.append({"id": "paradigm", **spread("paradigm", "paradigm", ("model", "calib", "calib_size"))})
    seed_std = [r["worst_class_drop_pp"]["std"] for r in rows if r["worst_class_drop_pp"]["n"] > 1]
    seed_rng = [r["worst_class_drop_pp"]["worst"] - min(x["worst_class_drop_pp"] for x in records
                if (x["model"], x["calib"], x["calib_size"], x["paradigm"]) ==
                (r["model"], r["calib"], r["calib_size"], r["paradigm"])) for r in rows]
    if seed_std:
        out.append({"id": "sampling", "evidence":
                    f"over seeds (different calibration draws of the same source and size) the worst-class drop has "
                    f"a std of {np.mean(seed_std):.2f} pp on average (max {max(seed_std):.2f}); best-to-worst seed "
                    f"spread up to {max(seed_rng):.2f} pp",
                    "verdict": "supported" if max(seed_rng) >= 1.0 else "not supported here"})
    else:
        out.append({"id": "sampling", "evidence": "one seed per setting", "verdict": "not measured"})
    return out


def assemble(args, cell_list, records) -> dict:
    g = grid(args)
    done = [r["result"] for r in records if r.get("status") == "done" and r.get("result")]
    failed = [{"key": r.get("key"), "error": r.get("error")} for r in records if r.get("status") != "done"]
    rows = aggregate(done)
    return {
        "kind": "ptq", "title": "PTQ reliability: calibration source x size x seed x paradigm (after Yuan et al. "
                                "2023)",
        "preset": "quick" if getattr(args, "quick", False) else "default",
        "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()},
        "definitions": {
            "avg_drop_pp": "100 x (top-1 FP32 - top-1 int8) on the clean evaluated test images",
            "worst_class_drop_pp": "max over classes c of 100 x (acc_fp32(c) - acc_int8(c)), clean images",
            "worst_shift_drop_pp": f"max over the shifted sets ({', '.join(g['shifts'])} at severity "
                                   f"{SHIFT_SEVERITY}, corruption seed {SHIFT_SEED}) of the top-1 drop on that set",
            "flips_per_10k": "clean images whose int8 top-1 differs from FP32's, per 10,000",
            "aggregate": "mean, sample std (ddof 1) and worst (max) over seeds; seed = the calibration draw",
            "fp32": "model.onnx (exported by the pipeline) on onnxruntime CPU, 1 thread",
            "checks": "worst_case: supported when, in at least half of the settings, the worst seed's worst-class "
                      "drop exceeds max(1 pp, 3 x the mean average drop); calibration source / paradigm: supported "
                      "when the mean worst-class drop of one setting differs by >= 1 pp across sources (paradigms), "
                      "all else fixed; sampling: supported when the best-to-worst seed spread of the worst-class "
                      "drop reaches 1 pp in some setting",
        },
        "paradigms": {k: PARADIGMS[k][1] for k in g["paradigms"]},
        "rows": rows, "checks": checks(rows, done), "cells": done, "failures": failed,
        "paper": PAPER, "differences": DIFFERENCES,
    }


def _f(s: dict, digits: int = 2) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (worst {s['worst']:.{digits}f})"


def svg_dots(rows: list[dict], metric: str, title: str, w: int = 640) -> str:
    """One line per (source, size), one dot per paradigm at its mean, a bar to the worst seed."""
    from html import escape as e
    from pipeline.report.html import nice_ticks, tick_label
    if not rows:
        return ""
    pars = sorted({r["paradigm"] for r in rows}, key=list(PARADIGMS).index)
    keys = sorted({(r["model"], r["calib"], r["calib_size"]) for r in rows})
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    vals = [v for r in rows for v in (r[metric]["mean"], r[metric]["worst"]) if v is not None]
    ticks = nice_ticks(min(0.0, min(vals)), max(vals) if vals else 1.0, 6)
    lo, hi = ticks[0], ticks[-1]
    left, right, top, rowh = 210, 12, 26, 12 * len(pars) + 8
    h = top + rowh * len(keys) + 40
    pw = w - left - right
    xp = lambda v: left + pw * (v - lo) / ((hi - lo) or 1)  # noqa: E731
    p = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}' "
         f"role='img' aria-label='{e(title)}'><text x='{w / 2}' y='14' text-anchor='middle' font-size='12'>"
         f"{e(title)}</text>"]
    for t in ticks:
        p.append(f"<line x1='{xp(t):.1f}' x2='{xp(t):.1f}' y1='{top}' y2='{h - 34}' stroke='#ddd'/>"
                 f"<text x='{xp(t):.1f}' y='{h - 22}' text-anchor='middle' font-size='10'>"
                 f"{tick_label(t, ticks[1] - ticks[0])}</text>")
    p.append(f"<text x='{left + pw / 2}' y='{h - 6}' text-anchor='middle' font-size='10'>{e(metric)} (pp or per "
             f"10k): dot = mean over seeds, bar to the worst seed</text>")
    for i, k in enumerate(keys):
        y0 = top + i * rowh
        p.append(f"<text x='{left - 6}' y='{y0 + rowh / 2 + 3}' text-anchor='end' font-size='10'>"
                 f"{e(k[0].removeprefix('zoo:'))} {e(k[1])} n={k[2]}</text>")
        for j, par in enumerate(pars):
            r = next((r for r in rows if (r["model"], r["calib"], r["calib_size"], r["paradigm"]) == (*k, par)), None)
            if r is None or r[metric]["mean"] is None:
                continue
            y = y0 + 6 + j * 12
            c = colours[j % len(colours)]
            p.append(f"<line x1='{xp(r[metric]['mean']):.1f}' x2='{xp(r[metric]['worst']):.1f}' y1='{y}' y2='{y}' "
                     f"stroke='{c}' stroke-width='2'/><circle cx='{xp(r[metric]['mean']):.1f}' cy='{y}' r='3.5' "
                     f"fill='{c}'><title>{e(par)}: {e(_f(r[metric]))}</title></circle>")
    legend = " ".join(f"<tspan fill='{colours[j % len(colours)]}'>● {e(par)}</tspan>" for j, par in enumerate(pars))
    p.append(f"<text x='4' y='{top - 4}' font-size='10'>{legend}</text></svg>")
    return "".join(p)


def render(study: dict) -> list:
    from pipeline.studies import Section
    rows = study["rows"]
    ex = study.get("execution", {})
    header = ("model", "source", "size", "paradigm", "seeds", "avg drop pp", "worst-class drop pp",
              "worst-shift drop pp", "flips /10k")
    table = tuple((r["model"].removeprefix("zoo:"), r["calib"], str(r["calib_size"]), r["paradigm"],
                   str(len(r["seeds"])), _f(r["avg_drop_pp"]), _f(r["worst_class_drop_pp"]),
                   _f(r["worst_shift_drop_pp"]), _f(r["flips_per_10k"], 1)) for r in rows)
    n_eval = sorted({r["evaluated"] for r in rows})
    fp = sorted({(r["model"].removeprefix("zoo:"), round(100 * r["fp32_top1"], 2)) for r in rows})
    how = (f"Measured here: {len(study['cells'])} cells, each a fresh calibration; FP32 = model.onnx on onnxruntime "
           f"CPU, 1 thread; int8 = the paradigm's runtime (below), 1 thread; the first {', '.join(map(str, n_eval))} "
           f"Fashion-MNIST test images; wall {ex.get('wall_seconds', '?')} s on {ex.get('backend', '?')} with "
           f"{ex.get('cells_at_once', '?')} cells at once. FP32 top-1: "
           + ", ".join(f"{m} {a}%" for m, a in fp) + ".")
    sections = [
        Section("Drops vs FP32, mean ± std over seeds (worst seed)", header, table,
                figures=tuple(f for f in (svg_dots(rows, "worst_class_drop_pp", "worst-class drop (pp)"),
                                          svg_dots(rows, "avg_drop_pp", "average top-1 drop (pp)"),
                                          svg_dots(rows, "worst_shift_drop_pp", "worst-shift drop (pp)")) if f),
                notes=tuple(f"{k}: {v}" for k, v in study["definitions"].items()), intro=how),
        Section("Paradigms", ("paradigm", "what it is"), tuple((k, v) for k, v in study["paradigms"].items())),
        Section("The paper's claims, checked (paper column: the paper's claim; ours: measured evidence)",
                ("claim (paper, abstract)", "ours (measured)", "verdict"),
                tuple((next(c["claim"] for c in study["paper"]["claims"] if c["id"] == k["id"]), k["evidence"],
                       k["verdict"]) for k in study["checks"]),
                notes=(f"Source: {study['paper']['source']}.",
                       "No published figure of the paper is readable, so there is no number to put beside ours.",
                       *study["paper"]["metrics_second_hand"],
                       "A check that goes against the paper is reported as measured; see the differences below for "
                       "the reasons we believe explain it (tiny 28x28 models, W8A8 with well-behaved ranges).")),
    ]
    if study.get("failures"):
        sections.append(Section("Failed cells", ("cell", "error"),
                                tuple((f["key"], str(f["error"])[:200]) for f in study["failures"])))
    sections.append(Section("Differences from the paper", notes=tuple(study["differences"])))
    return sections
