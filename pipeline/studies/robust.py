"""``python -m pipeline.study robust``: does training for robustness to quantization pay off once deployed?

For each model, five training variants fine-tune the same shipped weights with the same schedule (Park et al.
2022, SymReg/SatNL; Hu et al. 2022, RQ2, QAT): ``standard`` (plain fine-tuning, the control), ``qat``,
``symreg``, ``satnl`` and ``symreg+satnl`` (pipeline/robust_training.py). Each model x variant is one cell: it
trains (cached in ``OUT/weights/`` by its training config, so a resumed or repeated study does not train again),
exports the result through the whole pipeline at each precision target (int8 and dynamic by default, int16x8
with ``--precisions``: real LiteRT kernels), simulates it at other bit widths with :mod:`pipeline.simulate` (W8A8, W6A6, W4A8, W4A4) and runs the
shift suite (pipeline/reliability/corruptions.py) through the FP32 model and the int8 TFLite model to count
flips (top-1 disagreements with FP32) per 10,000 images, clean and shifted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

NAME = "robust"
HELP = "training for robustness to quantization (QAT, SymReg, SatNL) vs standard fine-tuning, deployed"

VARIANTS = {  # name -> RobustOptions fields (symreg: the --symreg lambda is filled in)
    "standard": {},
    "qat": {"qat": True},
    "symreg": {"symreg": True},
    "satnl": {"satnl": True},
    "symreg+satnl": {"symreg": True, "satnl": True},
}
PRECISIONS = ("int8", "int16x8", "dynamic")
SETTINGS = ("W8A8", "W6A6", "W4A8", "W4A4")
QUICK = {"models": "zoo:refcnn", "variants": "standard,qat", "epochs": 1, "train_limit": 1000, "eval_limit": 1000,
         "precisions": "int8", "settings": "W8A8,W4A4", "shift_limit": 300,
         "corruptions": "gaussian_noise,contrast,rotate"}
# the full preset was sized to finish in well under an hour on a shared 2-core host (see the README section)
FULL = {"models": "zoo:refcnn,zoo:resnet8", "variants": ",".join(VARIANTS), "epochs": 1, "train_limit": 2000,
        "eval_limit": 2000, "precisions": "int8,dynamic", "settings": ",".join(SETTINGS),
        "shift_limit": 500, "corruptions": "all"}
DEFAULT_LR = 3e-4  # fine-tuning from trained weights: a tenth of the from-scratch peak (pipeline.train's 3e-3)
DEFAULT_SYMREG = 0.1
SEVERITY = 3
KERNELS, THREADS = "xnnpack", 1
# Fine-tuning asks for 2 PyTorch threads wherever the cell runs: the backward pass's sums depend on how the work
# is split between threads, and a Ray worker starts with 1 (OMP_NUM_THREADS=1) where a local pool worker has the
# host's count (the standard refcnn trained to 92.20% with 2 threads and to 92.19% with Ray's 1). 2 is what the
# measured full preset used; pipeline.train still caps it at the cores the process may use, and records both.
TRAIN_THREADS = 2

PAPER = {
    "hu2022_rq2": {
        "source": "Hu et al. 2022 (arXiv 2204.04220), RQ2, results/RQ2 CSV of Anony4paper/quan_study, as quoted in "
                  "/work/shared/notes/reliability-research.md",
        "rows": [
            {"model": "LeNet-5 (MNIST)", "toolchain": "TFLite-16 (likely dynamic-range int8 weights)",
             "variant": "qat", "clean_flips": 0, "shifted_mean_flips": 7.7},
            {"model": "LeNet-5 (MNIST)", "toolchain": "TFLite-16 (likely dynamic-range int8 weights)",
             "variant": "standard", "clean_flips": 3, "shifted_mean_flips": 36.2},
            {"model": "NiN (CIFAR-10, FP32 73.45%)", "toolchain": "TFLite-8 (full-integer PTQ)", "variant": "qat",
             "clean_flips": 988, "shifted_mean_flips": None},
        ],
        "unit": "disagreements with the original model out of 10,000 test inputs",
    },
    "park2022": {
        "source": "Park, Jang, Park, ECCV 2022 (arXiv 2208.00338): abstract only (reliability-research.md, D); no "
                  "numbers, no formula, no code",
        "claims": [
            "SymReg and SatNL applied during training give a model that holds up under quantization",
            "the same weights hold up across bit-widths",
            "they work with existing PTQ (and QAT) algorithms",
        ],
    },
}


def add_arguments(p) -> None:
    p.set_defaults(models=None)
    p.add_argument("--quick", action="store_true",
                   help="the test preset: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--variants", help=f"comma-separated of {', '.join(VARIANTS)} (default: all; quick: 2)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default 1)")
    p.add_argument("--train-limit", type=int, help="fine-tune on the first N training images (default 2000; quick "
                                                   "1000)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate (default {DEFAULT_LR:g})")
    p.add_argument("--symreg", type=float, default=DEFAULT_SYMREG,
                   help=f"the SymReg lambda of the symreg variants (default {DEFAULT_SYMREG:g})")
    p.add_argument("--eval-limit", type=int, help="clean evaluation on the first N test images (default 2000; "
                                                  "quick 1000)")
    p.add_argument("--precisions", help=f"comma-separated of {', '.join(PRECISIONS)} (default int8,dynamic; "
                                         "quick int8)")
    p.add_argument("--settings", help=f"simulated settings (default {','.join(SETTINGS)}; quick W8A8,W4A4)")
    p.add_argument("--shift-limit", type=int, help="shifted evaluation on the first N test images (default 500; "
                                                   "quick 300)")
    p.add_argument("--corruptions", help="shift suite: all (the default suite) or comma-separated names")
    p.add_argument("--seed", type=int, default=0, help="training, calibration and corruption seed (default 0)")


def _options(args) -> dict:
    preset = QUICK if args.quick else FULL
    o = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in preset.items()}
    from pipeline.errors import UsageError
    for key, allowed in (("variants", VARIANTS), ("precisions", PRECISIONS)):
        names = [s.strip() for s in str(o[key]).split(",") if s.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise UsageError(f"--{key} {o[key]!r}: choose from {', '.join(allowed)}")
        o[key] = names
    from pipeline.simulate import QuantSetting
    o["settings"] = [QuantSetting.parse(s).name for s in str(o["settings"]).split(",") if s.strip()]
    if str(o["corruptions"]) == "all":
        from pipeline.reliability.corruptions import CORRUPTIONS
        o["corruptions"] = list(CORRUPTIONS)
    else:
        o["corruptions"] = [s.strip() for s in str(o["corruptions"]).split(",") if s.strip()]
    for k in ("epochs", "train_limit", "eval_limit", "shift_limit"):
        if int(o[k]) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be at least 1")
    return o


def cells(args, out: Path) -> list:
    from pipeline.execution import Cell
    from pipeline.studies import models_of
    from pipeline.errors import UsageError
    o = _options(args)
    if args.models is None:
        args.models = o["models"]
    specs = models_of(args)
    result = []
    for spec in specs:
        if not spec.startswith("zoo:"):
            raise UsageError(f"{spec}: the robust study fine-tunes zoo models (their shipped weights); pass zoo:NAME")
        for variant in o["variants"]:
            opts = dict(VARIANTS[variant])
            if opts.get("symreg"):
                opts["symreg"] = float(args.symreg)
            config = {"model": spec, "variant": variant, "options": opts, "epochs": int(o["epochs"]),
                      "train_limit": int(o["train_limit"]), "lr": float(args.lr), "eval_limit": int(o["eval_limit"]),
                      "precisions": o["precisions"], "settings": o["settings"], "shift_limit": int(o["shift_limit"]),
                      "corruptions": o["corruptions"], "severity": SEVERITY, "train_threads": TRAIN_THREADS,
                      "out": str(out)}
            result.append(Cell(key=f"{spec[4:]}/{variant}", fn=robust_cell, config=config, seed=int(args.seed)))
    return result


# --------------------------------------------------------------------------- the cell


def training_key(config: dict, seed: int) -> str:
    body = {k: config[k] for k in ("model", "options", "epochs", "train_limit", "lr", "train_threads")}
    body["seed"] = seed
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def flips_per_10k(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 disagreements between two logit arrays, per 10,000 images."""
    return float(10000.0 * np.mean(np.argmax(a, 1) != np.argmax(b, 1))) if len(a) else float("nan")


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, 1) == labels))


def _train(config: dict, seed: int) -> tuple[Path, dict, bool]:
    """Fine-tune (or reuse the cached result of the same training config): the weights file and its record."""
    from pipeline import robust_training, zoo
    from pipeline.train import train, trainee
    name = config["model"][4:]
    folder = Path(config["out"]) / "weights" / f"{name}-{config['variant']}-{training_key(config, seed)}"
    pt, rec = folder / f"{name}.pt", folder / f"{name}.json"
    if pt.is_file() and rec.is_file():
        return pt, json.loads(rec.read_text()), True
    shipped = str(zoo.get_entry(name).weights_path)
    opts = robust_training.RobustOptions(**config["options"])
    entry = trainee(config["model"], shipped)
    record = train(entry, "fashion-mnist", None, config["epochs"], seed, 128, config["lr"], folder,
                   threads=config["train_threads"], spec=config["model"], weights=shipped, robust=opts,
                   train_limit=config["train_limit"])
    return pt, record, False


def robust_cell(config: dict, files: dict, seed: int) -> dict:
    """Train one model x variant (cached), export it at each precision, simulate the bit widths, run the shifts."""
    import torch
    from pipeline import targets, zoo
    from pipeline.export import ExportConfig, export
    from pipeline.inputs import models
    from pipeline.simulate import QuantSetting, Simulator
    from pipeline.stages.prepare import prepare
    from pipeline.study import ece_of, ladder_targets
    name = config["model"][4:]
    weights, trained, cached = _train(config, seed)
    entry = zoo.get_entry(name)
    satnl = bool(config["options"].get("satnl"))
    spec = f"pipeline.robust_training:satnl_{name}" if satnl else config["model"]
    cell_dir = Path(config["out"]) / "exports" / f"{name}-{config['variant']}"
    by_precision = {targets.get_target(t).precision: t for t in ladder_targets()}
    base = dict(model=spec, weights=str(weights), mean=tuple(entry.mean), std=tuple(entry.std),
                eval_limit=config["eval_limit"], seed=seed, overwrite=True, verbose=False)
    rows, int8_tflite = {}, None
    fp32 = labels = None
    for precision in config["precisions"]:
        target = by_precision[precision]
        cfg = ExportConfig(**base, target=target, out=str(cell_dir / target))
        status, folder, report = export(cfg, log=lambda *a, **k: None)
        r = report.to_dict()
        z = np.load(folder / "predictions.npz", allow_pickle=False)
        labels, fp32, q = z["labels"], z["fp32_logits"], z[f"{precision}_logits"]
        rows[precision] = {"target": target, "status": status, "top1": top1(q, labels),
                           "drop_pp": 100 * (top1(fp32, labels) - top1(q, labels)),
                           "flips_per_10k": flips_per_10k(fp32, q), "ece": ece_of(q, labels),
                           "kernels": targets.get_target(target).kernels,
                           "threads": targets.get_target(target).threads}
        if precision == "int8":
            int8_tflite = Path(r["artifacts"]["tflite"]["path"])
            if not int8_tflite.is_absolute():
                int8_tflite = folder / int8_tflite
    # inputs as the export saw them: the same representative dataset and preprocessing
    inp = prepare(ExportConfig(**base, target=by_precision["int8"]), log=lambda *a, **k: None)
    model = models.load(spec, str(weights)).module.eval()
    calib = inp.calib.array()
    x = inp.x_test
    y = inp.labels
    with torch.no_grad():
        fp32_torch = np.concatenate([model(torch.from_numpy(x[i:i + 500])).numpy() for i in range(0, len(x), 500)])
    sim = Simulator(model, calib, name=spec)
    simulated = {}
    for s in config["settings"]:
        q = sim.logits(x, QuantSetting.parse(s))
        simulated[s] = {"top1": top1(q, y), "drop_pp": 100 * (top1(fp32_torch, y) - top1(q, y)),
                        "flips_per_10k": flips_per_10k(fp32_torch, q)}
    shifts = None
    if int8_tflite is not None:
        shifts = _shifts(model, int8_tflite, inp, config, seed)
    rec = trained.get("robust", {})
    return {
        "model": config["model"], "variant": config["variant"], "options": config["options"],
        "deploy_spec": spec, "weights": str(weights), "cached": cached,
        "training": {"fp32_test_top1": trained["fp32_test_top1"], "train_seconds": trained["train_seconds"],
                     "epochs": trained["epochs"], "trained_on": trained.get("holdout", {}).get("trained_on"),
                     "lr": trained["lr"], "weights_before": rec.get("weights_before"),
                     "weights_after": rec.get("weights_after"), "satnl_bounds": rec.get("satnl_bounds"),
                     "qat_points": rec.get("qat_points")},
        "evaluated": int(len(labels)) if labels is not None else int(len(y)),
        "fp32_top1": top1(fp32, labels) if fp32 is not None else top1(fp32_torch, y),
        "precisions": rows, "simulated": simulated, "simulated_images": int(len(y)),
        "calibration": {"source": "balanced", "size": int(len(calib)), "seed": seed},
        "shifts": shifts,
    }


def _shifts(model, tflite: Path, inp, config: dict, seed: int) -> dict:
    """FP32 (PyTorch) vs int8 TFLite (XNNPACK, 1 thread) on the first ``shift_limit`` test images, clean and with
    each corruption at ``severity``: flips per 10k and accuracies."""
    import torch
    from pipeline.inputs.preprocessing import apply
    from pipeline.reliability import corruptions
    from pipeline.runtime.litert import TfliteRunner
    n = min(config["shift_limit"], len(inp.dataset.x_test))
    raw, labels = inp.dataset.x_test[:n], inp.dataset.y_test[:n]
    pre = inp.pre
    runner = TfliteRunner(tflite, kernels=KERNELS, threads=THREADS)
    shape, c = [int(v) for v in runner.inp["shape"]], pre.input_shape[0]
    if len(shape) == 4 and shape[1] == c and shape[3] != c:  # the converter kept NCHW
        runner.input_layout = "NCHW"

    def both(x):
        with torch.no_grad():
            a = np.concatenate([model(torch.from_numpy(x[i:i + 500])).numpy() for i in range(0, len(x), 500)])
        return a, runner.run(x).outputs

    a, b = both(apply(raw, pre))
    out = {"images": n, "severity": config["severity"], "kernels": KERNELS, "threads": THREADS,
           "clean": {"flips_per_10k": flips_per_10k(a, b), "fp32_top1": top1(a, labels), "int8_top1": top1(b, labels)},
           "corruptions": {}}
    lo, hi = pre.raw_range
    for c in config["corruptions"]:
        unit = ((raw.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)).clip(0, 1)
        back = corruptions.corrupt(unit, c, config["severity"], seed=seed) * np.float32(hi - lo) + np.float32(lo)
        if raw.dtype == np.uint8:
            back = np.rint(back).astype(np.uint8)
        a, b = both(apply(back, pre))
        out["corruptions"][c] = {"flips_per_10k": flips_per_10k(a, b), "fp32_top1": top1(a, labels),
                                 "int8_top1": top1(b, labels)}
    vals = [v["flips_per_10k"] for v in out["corruptions"].values()]
    out["shifted_mean_flips_per_10k"] = float(np.mean(vals)) if vals else None
    if vals:
        worst = max(out["corruptions"], key=lambda k: out["corruptions"][k]["flips_per_10k"])
        out["shifted_max"] = {"corruption": worst, "flips_per_10k": out["corruptions"][worst]["flips_per_10k"]}
    return out


# --------------------------------------------------------------------------- assemble and render


def assemble(args, cells, records) -> dict:
    o = _options(args)
    rows, failures = [], []
    for c, r in zip(cells, records):
        if r["status"] == "done":
            rows.append(r["result"])
        else:
            failures.append({"key": c.key, "error": r.get("error")})
    study = {
        "kind": "study.robust", "schema_version": "1.0",
        "title": "Training for robustness to quantization: standard vs QAT vs SymReg vs SatNL",
        "preset": "quick" if args.quick else "full",
        "settings": {"variants": o["variants"], "epochs": o["epochs"], "train_limit": o["train_limit"],
                     "lr": args.lr, "symreg_lambda": args.symreg, "eval_limit": o["eval_limit"],
                     "precisions": o["precisions"], "simulated": o["settings"], "shift_limit": o["shift_limit"],
                     "corruptions": o["corruptions"], "severity": SEVERITY, "seed": args.seed},
        "rows": rows, "failures": failures,
        "checks": checks(rows),
        "paper": PAPER,
        "definitions": {
            "flips_per_10k": "10,000 x share of images whose top-1 differs between the quantized model and the same "
                             "weights in FP32 (Hu et al.'s 'disagreements', scaled to 10k images)",
            "drop_pp": "FP32 top-1 minus quantized top-1 of the same weights, percentage points",
            "ece": "top-label ECE, 15 equal-width bins",
            "asymmetry": "per output channel a_c = (max w_c + min w_c) / max|w_c|; |a_c|/2 is the share of the "
                         "symmetric int8 weight grid no weight of the channel uses",
        },
        "differences": differences(o),
    }
    return study


def _row(rows, model, variant):
    return next((r for r in rows if r["model"] == model and r["variant"] == variant), None)


def checks(rows: list[dict]) -> list[dict]:
    """The papers' claims as checks, each with our evidence (per model, variant vs the standard control)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        std = _row(rows, model, "standard")
        if std is None:
            continue
        for variant, claim in (("qat", "Hu et al. RQ2: QAT models flip least (clean and shifted)"),
                               ("symreg", "Park et al.: SymReg makes the model robust to quantization"),
                               ("satnl", "Park et al.: SatNL makes the model robust to quantization"),
                               ("symreg+satnl", "Park et al.: SymReg + SatNL hold up across bit-widths")):
            v = _row(rows, model, variant)
            if v is None:
                continue
            ev = {}
            if "int8" in v["precisions"] and "int8" in std["precisions"]:
                ev["int8_flips_per_10k"] = [std["precisions"]["int8"]["flips_per_10k"],
                                            v["precisions"]["int8"]["flips_per_10k"]]
            if v.get("shifts") and std.get("shifts"):
                ev["shifted_mean_flips_per_10k"] = [std["shifts"]["shifted_mean_flips_per_10k"],
                                                    v["shifts"]["shifted_mean_flips_per_10k"]]
            low = min(v["simulated"], key=lambda s: (int(s[1:].split("A")[0]), s)) if v["simulated"] else None
            if low and low in std["simulated"]:
                ev[f"{low}_drop_pp"] = [std["simulated"][low]["drop_pp"], v["simulated"][low]["drop_pp"]]
            better = [b <= a for a, b in ev.values()]
            verdict = ("holds" if all(better) else "does not hold" if not any(better) else "mixed") if ev else "n/a"
            out.append({"model": model, "variant": variant, "claim": claim, "evidence_standard_vs_variant": ev,
                        "verdict": verdict})
    return out


def differences(o: dict) -> list[str]:
    return [
        "Data and models: Fashion-MNIST (28x28 grey) and this zoo's small CNNs (refcnn 0.14M, resnet8 0.08M "
        "parameters); Hu et al. used MNIST LeNet-1/5 and CIFAR-10 NiN/ResNet-20, Park et al. CIFAR and ImageNet.",
        f"Training: every variant fine-tunes the shipped weights for {o['epochs']} epoch(s) on the first "
        f"{o['train_limit']:,} training images (AdamW, one-cycle). The papers train from scratch for full schedules; "
        "our differences between variants are those of a short fine-tune.",
        "QAT: our own fake quantization matching this pipeline's int8 scheme (pipeline/robust_training.py); Hu et "
        "al. used tfmot quantize_model. The deployed model is recalibrated by the converter from the float "
        "weights (the QAT moving ranges are not carried into the .tflite).",
        "SymReg and SatNL: Park et al.'s formulas are not available (abstract only); ours are written in the "
        "README section and pipeline/robust_training.py. Our SatNL learns one clamp bound per ReLU (PACT).",
        "Toolchain: ONNX -> onnx2tf -> TFLiteConverter, LiteRT kernels; 'TFLite-16' in Hu et al. is most likely "
        "dynamic-range int8 weights (our 'dynamic' row), not int16x8.",
        f"Shifts: this project's corruption suite generated on the fly at severity {SEVERITY} on the first "
        f"{o['shift_limit']:,} test images, not MNIST-C/CIFAR-10-C files; flips are scaled to 10,000 images.",
        "Simulated bit widths come from pipeline/simulate.py (validated against LiteRT int8 at W8A8 only); "
        "W6A6/W4A8/W4A4 have no deployable TFLite kernel.",
    ]


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(study: dict) -> list:
    from pipeline.studies import Section
    rows, s = study["rows"], study["settings"]
    sections = [Section(
        "How the numbers were obtained",
        intro=(f"Measured here ({study['preset']} preset). Each variant fine-tunes the shipped weights "
               f"({s['epochs']} epoch(s), first {s['train_limit']:,} training images, lr {s['lr']:g}, seed "
               f"{s['seed']}); each result is exported through the whole pipeline (balanced calibration, 500 "
               f"images) and evaluated on the first {s['eval_limit']:,} Fashion-MNIST test images with the "
               "target's LiteRT kernels. Simulated bit widths: pipeline/simulate.py on the same images and "
               f"calibration set. Shifts: FP32 PyTorch vs int8 TFLite (XNNPACK, 1 thread) on the first "
               f"{s['shift_limit']:,} test images, {len(s['corruptions'])} corruption(s) at severity {s['severity']}."))]
    sections.append(Section(
        "Training",
        header=("model", "variant", "FP32 top-1", "mean weight asymmetry before -> after", "SatNL bounds (mean)",
                "train s", "cached"),
        rows=tuple((r["model"], r["variant"], f"{r['training']['fp32_test_top1']:.2%}",
                    f"{r['training']['weights_before']['mean_abs_asymmetry']:.3f} -> "
                    f"{r['training']['weights_after']['mean_abs_asymmetry']:.3f}"
                    if r["training"].get("weights_before") else "-",
                    _f(np.mean(list(r["training"]["satnl_bounds"].values())) if r["training"].get("satnl_bounds")
                       else None),
                    f"{r['training']['train_seconds']:.0f}", "yes" if r["cached"] else "no") for r in rows),
        notes=("FP32 top-1 on the full 10,000-image test split (pipeline.train's record).",
               "asymmetry: " + study["definitions"]["asymmetry"] + "; mean over all conv/linear channels.")))
    prec_rows = []
    for r in rows:
        for p, v in r["precisions"].items():
            prec_rows.append((r["model"], r["variant"], f"{p} ({v['kernels']}, {v['threads']} thr)",
                              f"{r['fp32_top1']:.2%}", f"{v['top1']:.2%}", f"{v['drop_pp']:+.2f}",
                              f"{v['flips_per_10k']:.0f}", f"{v['ece']:.4f}"))
    sections.append(Section(
        "Deployed TFLite (real LiteRT kernels)",
        header=("model", "variant", "precision", "FP32 top-1", "top-1", "drop (pp)", "flips / 10k", "ECE"),
        rows=tuple(prec_rows),
        notes=(study["definitions"]["flips_per_10k"] + ".", study["definitions"]["drop_pp"] + ".")))
    settings = s["simulated"]
    sim_rows = tuple((r["model"], r["variant"], *(f"{r['simulated'][k]['drop_pp']:+.2f} / "
                                                  f"{r['simulated'][k]['flips_per_10k']:.0f}" for k in settings))
                     for r in rows)
    figs = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        vals = [r["simulated"][k]["drop_pp"] for r in mine for k in settings]
        if vals and len(settings) > 1:
            from pipeline.report.html import nice_ticks, svg_lines, tick_label
            ticks = nice_ticks(min(0.0, min(vals)), max(vals), 6)
            colors = ["#444", "#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
            series = [(r["variant"], [r["simulated"][k]["drop_pp"] for k in settings], colors[i % 5], "")
                      for i, r in enumerate(mine)]
            svg = svg_lines(list(settings), series, f"{model}: top-1 drop (pp) by simulated setting", ticks,
                            lambda v, st: tick_label(v, st), w=360, h=220, legend=True, zero_line=True)
            figs.append(svg.replace("severity (0 = clean)", "simulated setting"))
    sections.append(Section(
        "Simulated bit widths (pipeline/simulate.py)", header=("model", "variant", *(f"{k}: drop pp / flips" for k in
                                                                                      settings)),
        rows=sim_rows, figures=tuple(figs),
        notes=("drop: FP32 (same weights, PyTorch) top-1 minus simulated top-1; flips per 10k vs FP32.",
               "Per-channel symmetric weights, per-tensor asymmetric activations, min/max calibration on the "
               "export's representative dataset; only W8A8 is validated against LiteRT.")))
    sh_rows = []
    for r in rows:
        sh = r.get("shifts")
        if sh:
            mx = sh.get("shifted_max") or {}
            sh_rows.append((r["model"], r["variant"], f"{sh['clean']['flips_per_10k']:.0f}",
                            _f(sh["shifted_mean_flips_per_10k"], "{:.1f}"),
                            f"{mx.get('flips_per_10k', 0):.0f} ({mx.get('corruption', '-')})",
                            f"{sh['clean']['int8_top1']:.2%}", ""))
    for p in study["paper"]["hu2022_rq2"]["rows"]:
        sh_rows.append((p["model"], p["variant"], str(p["clean_flips"]), _f(p["shifted_mean_flips"], "{:.1f}"),
                        "-", "-", f"Hu et al. 2022, {p['toolchain']}"))
    sections.append(Section(
        "Flips, clean and shifted (int8 TFLite vs FP32): ours beside Hu et al. RQ2",
        header=("model", "variant", "clean flips / 10k", "shifted mean flips / 10k", "shifted max", "int8 top-1 "
                "(shift subset, clean)", "paper"),
        rows=tuple(sh_rows),
        notes=(f"Paper rows: {study['paper']['hu2022_rq2']['source']}; {study['paper']['hu2022_rq2']['unit']}.",
               "Ours: per 10k scaled from the shift subset; the paper counts on 10,000 images.")))
    sections.append(Section(
        "Claims checked (Park et al. 2022 has no readable numbers: its claims, with our evidence)",
        header=("model", "claim", "evidence: standard -> variant", "verdict"),
        rows=tuple((c["model"], c["claim"], "; ".join(f"{k} {a:.1f} -> {b:.1f}" for k, (a, b) in
                                                      c["evidence_standard_vs_variant"].items()), c["verdict"])
                   for c in study["checks"]),
        notes=(study["paper"]["park2022"]["source"] + ".",
               "'holds' = the variant is no worse than standard fine-tuning on every listed measure; a claim that "
               "does not hold is reported as measured, with the likely reason under 'differences'.")))
    if study["failures"]:
        sections.append(Section("Failed cells", header=("cell", "error"),
                                rows=tuple((f["key"], str(f["error"])) for f in study["failures"])))
    sections.append(Section("Differences from the papers' settings", notes=tuple(study["differences"])))
    return sections
