"""``python -m pipeline.evaluate EXPORT_DIR``: the reliability report for an exported model.

Reads the export's ``report.json`` (preprocessing record, model, data, target) and its TFLite model,
runs FP32 and the deployed model on the same inputs (clean test split, a validation split of the training
data, and the corruption suite), and writes the sections ``calibration_drift``, ``temperature_scaling``,
``flips``, ``per_class``, ``shifts`` and ``reliability`` into ``report.json``, plus ``report.html``.
With ``--out DIR`` both files go to DIR and the export folder is left untouched.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from .errors import DataError, OutputError, PipelineError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(f"{message}; see python -m pipeline.evaluate --help")


def finite_float(text: str) -> float:
    """argparse type: a finite number (a NaN limit would make every gate comparison false)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; pass a plain value such as 1.5")
    return v


def seed_int(text: str) -> int:
    """argparse type: a seed, 0 to 2**32 - 1 (what numpy's generators take)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not 0 <= v < 2 ** 32:
        raise argparse.ArgumentTypeError(f"seed {v} is out of range; pass an integer from 0 to {2 ** 32 - 1}")
    return v


def _severities(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of severities 1..5") from None
    if not vals or any(v < 1 or v > 5 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"{text!r}: severities must be distinct integers from 1 to 5")
    return tuple(sorted(vals))


def add_reliability_arguments(p: argparse.ArgumentParser, in_export: bool, adaptive_val_size: bool | None = None) -> None:
    """The flags shared by ``pipeline.evaluate`` and ``pipeline.export --reliability``.

    ``adaptive_val_size`` (default: ``not in_export``): ``--val-size`` defaults to None, meaning
    ``pipeline.reliability.resolve_val_size(None, n_train)`` = min(5000, training images // 5); the caller must
    then accept ``args.val_size is None``. False keeps the fixed default of 5000 (what the export CLI expects
    until it passes ``adaptive_val_size=True``).
    """
    from .reliability import DEFAULT_MAX_ECE_INCREASE, DEFAULT_MAX_WORST_DROP_PP, DEFAULT_VAL_SIZE
    adaptive = (not in_export) if adaptive_val_size is None else bool(adaptive_val_size)
    g = p.add_argument_group("Reliability" + (" (with --reliability)" if in_export else ""))
    g.add_argument("--corruptions", default="all",
                   help="corruption suite: all (default), none, or a comma-separated list of names "
                        "(see pipeline/corruptions.py)")
    g.add_argument("--severities", type=_severities, default=(1, 2, 3, 4, 5), help="severities (default 1,2,3,4,5)")
    g.add_argument("--val-size", type=int, default=None if adaptive else DEFAULT_VAL_SIZE,
                   help="training images held for fitting the temperature (default: "
                        + (f"min({DEFAULT_VAL_SIZE}, training images // 5))" if adaptive else f"{DEFAULT_VAL_SIZE})"))
    g.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    g.add_argument("--fp32-runtime", choices=("reference", "onnxruntime"),
                   default="onnxruntime" if in_export else "reference",
                   help="FP32 side: the model's own runtime (PyTorch for torch models) or onnxruntime on the "
                        "export's model.onnx (checked against PyTorch by the export on 256 inputs; faster on CPU). "
                        f"Default: {'onnxruntime' if in_export else 'reference'}")
    g.add_argument("--max-ece-increase", type=finite_float, default=DEFAULT_MAX_ECE_INCREASE,
                   help=f"gate: largest int8-minus-FP32 ECE on the clean test split (default {DEFAULT_MAX_ECE_INCREASE})")
    g.add_argument("--max-worst-drop-pp", type=finite_float, default=DEFAULT_MAX_WORST_DROP_PP,
                   help="gate: largest top-1 drop in points over every class and every shifted set "
                        f"(default {DEFAULT_MAX_WORST_DROP_PP})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline.evaluate",
                description="Reliability report (calibration drift, temperature scaling, flips, per-class, "
                            "corruption suite) for an exported model; writes report.json and report.html.")
    p.add_argument("export_dir", help="an export folder (holds report.json and the .tflite model)")
    g = p.add_argument_group("Overrides (default: what the export's report.json says)")
    g.add_argument("--model", help="FP32 model spec (zoo:NAME, file.onnx, file.pt, package.module:factory)")
    g.add_argument("--weights", help="state_dict for a factory model")
    g.add_argument("--tflite", help="the deployed .tflite model")
    g.add_argument("--data", help="fashion-mnist or path/to/data.npz")
    g.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N test images only")
    g.add_argument("--kernels", help="LiteRT kernels: xnnpack, builtin or ref")
    g.add_argument("--batch-size", type=int, default=256, help="batch for interpreter and FP32 runs (default 256)")
    g.add_argument("--seed", type=seed_int, help="seed of the validation split and the corruptions (default: the export's)")
    add_reliability_arguments(p, in_export=False)
    g = p.add_argument_group("Output")
    g.add_argument("--out", help="write report.json and report.html here instead of into the export folder")
    g.add_argument("-v", "--verbose", action="store_true", help="show the tools' own output")
    return p


def reliability_config(args: argparse.Namespace, seed: int):
    from .reliability import ReliabilityConfig, parse_corruptions
    if args.val_size is not None and args.val_size <= 0:
        raise UsageError(f"--val-size {args.val_size} is empty; pass at least 1, or leave it out for the default "
                         "min(5000, training images // 5)")
    if args.workers < 0:
        raise UsageError("--workers must be 0 (one per core) or more")
    return ReliabilityConfig(corruptions=parse_corruptions(args.corruptions), severities=tuple(args.severities),
                             val_size=args.val_size, seed=seed, workers=args.workers,
                             max_ece_increase=args.max_ece_increase, max_worst_drop_pp=args.max_worst_drop_pp)


def _read_report(export_dir: Path) -> dict:
    path = export_dir / "report.json"
    if not export_dir.is_dir():
        raise UsageError(f"{export_dir} is not a folder; pass the folder an export wrote (python -m pipeline.export --out DIR)")
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass a folder written by python -m pipeline.export")
    try:
        rep = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON ({type(e).__name__}); re-run the export") from None
    if not isinstance(rep, dict):
        raise DataError(f"{path} holds a JSON {type(rep).__name__}, not an export report (an object); pass a folder "
                        "written by python -m pipeline.export")
    for key in ("preprocessing", "model", "config", "target"):
        if not isinstance(rep.get(key), dict):
            raise DataError(f"{path} lacks the '{key}' section; re-run python -m pipeline.export with this version")
    for key in ("artifacts", "conversion"):
        if key in rep and not isinstance(rep[key], dict):
            raise DataError(f"{path}: '{key}' is not an object; re-run python -m pipeline.export")
    return rep


def _report_str(section: dict, key: str, path: Path) -> str | None:
    """A string field of the report (None when absent or empty)."""
    v = section.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise DataError(f"{path}: '{key}' is {v!r}, not a string; re-run python -m pipeline.export")
    return v


def _preprocessing(rep: dict, path: Path):
    from .preprocessing import Preprocessing
    try:
        pre = Preprocessing.from_dict(rep["preprocessing"])
    except KeyError as e:
        raise DataError(f"{path}: the preprocessing record lacks {e}; re-run python -m pipeline.export "
                        "with this version") from None
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: the preprocessing record is malformed ({e}); re-run python -m pipeline.export") from None
    if len(pre.input_shape) != 3 or min(pre.input_shape) <= 0:
        raise DataError(f"{path}: preprocessing input_shape {list(pre.input_shape)} is not C,H,W; "
                        "re-run python -m pipeline.export")
    c = pre.input_shape[0]
    for name in ("mean", "std"):
        v = getattr(pre, name)
        if v is not None and len(v) not in (1, c):
            raise DataError(f"{path}: preprocessing {name} has {len(v)} values for {c}-channel inputs; "
                            "re-run python -m pipeline.export")
    if pre.std is not None and any(not x > 0 for x in pre.std):
        raise DataError(f"{path}: preprocessing std {list(pre.std)} must be positive; re-run python -m pipeline.export")
    return pre


def _export_cwd(cfg: dict) -> Path | None:
    """``config.cwd``: the folder the export ran in (absent in reports of older versions)."""
    v = cfg.get("cwd")
    if isinstance(v, str) and v and os.path.isabs(v) and os.path.isdir(v):
        return Path(v)
    return None


def _from_export_cwd(value: str | None, export_cwd: Path | None) -> str | None:
    """A path the export recorded as typed: relative to the folder it ran in. Kept as is when it exists from
    here (or is absolute, or is not a path, like zoo:NAME or fashion-mnist); otherwise the export folder's."""
    if not value or export_cwd is None or value == "fashion-mnist" or value.startswith("zoo:"):
        return value
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return value
    there = export_cwd / p
    return str(there) if there.exists() else value


def _is_factory_spec(spec: str) -> bool:
    return (":" in spec and not spec.startswith("zoo:") and not os.path.exists(spec)
            and not spec.lower().endswith((".onnx", ".pt", ".pth", ".ptl", ".torchscript")))


def _add_import_path(folder: Path) -> None:
    """Make ``package.module:factory`` importable from the export's folder, after the current folder."""
    f = str(folder)
    if f in sys.path:
        return
    here = ("", os.getcwd())
    i = next((k + 1 for k, p in enumerate(sys.path) if p in here), 0)
    sys.path.insert(i, f)


def held_out_from_training(model) -> bool | None:
    """Zoo models were trained on the whole training split (their training record says so)."""
    if model.kind == "zoo":
        from . import zoo
        entry = zoo.get_entry(model.spec[4:])
        if str(model.extra.get("weights")) != str(entry.weights_path):
            return None  # --weights: not the shipped checkpoint the record describes
        rec = entry.training_record() or {}
        ds = rec.get("dataset") or {}
        if ds.get("train_size"):
            return False
    return None


def evaluate_export(args: argparse.Namespace, log=print):
    import numpy as np

    from . import data as data_mod
    from . import html_report, models, quiet
    from .parallel_eval import ModelPair
    from .reliability import evaluate, resolve_val_size

    quiet.configure(args.verbose)
    t0 = time.perf_counter()
    export_dir = Path(args.export_dir)
    rep = _read_report(export_dir)
    rpath = export_dir / "report.json"
    cfg = rep["config"]
    pre = _preprocessing(rep, rpath)
    # The export recorded --model/--weights/--data/--data-dir as typed, relative to the folder it ran in
    # (config.cwd): found from there when they do not exist from here. Command-line overrides are used as given.
    export_cwd = _export_cwd(cfg)
    if args.model:
        model_spec = args.model
    else:
        model_spec = _report_str(rep["model"], "spec", rpath) or _report_str(cfg, "model", rpath)
        if not model_spec:
            raise DataError(f"{rpath} names no model; pass --model")
        model_spec = _from_export_cwd(model_spec, export_cwd)
        if export_cwd is not None and _is_factory_spec(model_spec):
            _add_import_path(export_cwd)
    weights = args.weights if args.model or args.weights else _from_export_cwd(_report_str(cfg, "weights", rpath),
                                                                              export_cwd)
    tfl = rep.get("artifacts", {}).get("tflite")
    tfl_rel = _report_str(tfl, "path", rpath) if isinstance(tfl, dict) else None
    tflite = Path(args.tflite) if args.tflite else (export_dir / tfl_rel if tfl_rel else None)
    if tflite is None:
        raise DataError(f"{rpath} names no TFLite model (artifacts.tflite.path); pass --tflite path/to/model.tflite")
    if not tflite.is_file():
        raise DataError(f"the TFLite model {tflite} does not exist; pass --tflite path/to/model.tflite")
    data_spec = args.data or _from_export_cwd(_report_str(cfg, "data", rpath), export_cwd) or "fashion-mnist"
    data_dir = args.data_dir or (_from_export_cwd(_report_str(cfg, "data_dir", rpath), export_cwd)
                                 if not args.data else None)
    kernels = (args.kernels or _report_str(rep["target"], "litert_kernels", rpath)
               or _report_str(rep["target"], "kernels", rpath) or "xnnpack")
    if kernels not in ("xnnpack", "builtin", "ref"):
        raise UsageError(f"--kernels {kernels!r}: choose xnnpack, builtin or ref")
    if args.batch_size <= 0:
        raise UsageError("--batch-size must be at least 1")
    try:
        seed = args.seed if args.seed is not None else int(cfg.get("seed") or 0)
    except (TypeError, ValueError):
        raise DataError(f"{rpath}: config.seed {cfg.get('seed')!r} is not an integer; pass --seed") from None
    rcfg = reliability_config(args, seed)
    limit = args.eval_limit if args.eval_limit is not None else cfg.get("eval_limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise UsageError(f"--eval-limit must be at least 1 (got {limit!r})")
    out_dir = Path(args.out) if args.out else export_dir
    _check_writable(out_dir)  # created only when the results are written
    # Data before the model: the validation split's size is checked before any model is loaded or run.
    ds = data_mod.load(data_spec, data_dir, pre.input_shape)
    resolve_val_size(rcfg.val_size, len(ds.y_train))
    if rcfg.corruptions:
        from .corruptions import check_corruptible
        check_corruptible(pre.input_shape)
    model = models.load(model_spec, weights)
    num_classes = models.probe(model, pre.input_shape)
    data_mod.check_fits(ds, pre.input_shape, num_classes)
    precision = _report_str(rep["target"], "precision", rpath) or "int8"
    insp, chk = _check_tflite(tflite, precision, num_classes, rep, given=bool(args.tflite),
                              pre_shape=pre.input_shape)
    n = len(ds.x_test) if limit is None else min(int(limit), len(ds.x_test))
    if n <= 0:
        raise DataError(f"{data_spec} has no test images; pass data with a test split")
    layout = rep["preprocessing"].get("tflite_input_layout") or rep.get("conversion", {}).get("input_layout") or "NHWC"
    fp32_onnx = None
    if args.fp32_runtime == "onnxruntime" and model.kind != "onnx":
        onnx_rel = (rep.get("artifacts", {}).get("onnx") or {}).get("path")
        fp32_onnx = export_dir / onnx_rel if onnx_rel and not args.model else None
        if fp32_onnx is None or not fp32_onnx.is_file():
            raise UsageError("--fp32-runtime onnxruntime needs the export's model.onnx (and no --model override); "
                             "drop --fp32-runtime or re-run the export")
        fp32_onnx = str(fp32_onnx.resolve())
    pair = ModelPair(model_spec=model_spec, weights=weights, tflite_path=str(tflite.resolve()), input_layout=layout,
                     kernels=kernels, preprocessing=pre, batch_size=args.batch_size, fp32_onnx=fp32_onnx)
    clean, clean_note = _export_predictions(export_dir, rep, n, own_models=not (args.model or args.tflite or args.weights
                                                                                  or args.data or args.kernels))
    result = evaluate(pair, ds, n, rcfg, clean=clean, loaded_model=model, held_out_from_training=held_out_from_training(model),
                      runtime_note=clean_note, progress=not args.verbose and sys.stderr.isatty())
    rep.update(result.sections)
    rep.setdefault("gates", {}).update(result.gates)
    overrides = [flag for flag, v in (("--model", args.model), ("--weights", args.weights), ("--tflite", args.tflite),
                                      ("--data", args.data), ("--data-dir", args.data_dir),
                                      ("--eval-limit", args.eval_limit), ("--kernels", args.kernels)) if v is not None]
    if overrides:
        _restate_for_overrides(rep, overrides, result.clean, np.asarray(ds.y_test[:n]), ds, n, model, tflite, insp,
                               chk, kernels, pair.fp32_runtime)
    rep["passed"] = all(g.get("passed", True) for g in rep["gates"].values())
    rep.setdefault("timings_s", {})["reliability"] = round(time.perf_counter() - t0, 3)
    rep["reliability"]["command"] = "python -m pipeline.evaluate " + " ".join(sys.argv[1:])
    rep["reliability"]["config"] = {k: (list(v) if isinstance(v, tuple) else v)
                                    for k, v in dataclasses.asdict(rcfg).items()}
    rep.setdefault("artifacts", {})["report_html"] = {"path": "report.html"}
    write_outputs(rep, out_dir)
    return rep, out_dir


def _check_tflite(tflite: Path, precision: str, num_classes: int, rep: dict, given: bool, pre_shape):
    """The .tflite must be a model of the export's precision with one output per class of the FP32 model."""
    import numpy as np

    from .errors import ConversionError
    from .inspect_tflite import check_precision, inspect
    where = f"--tflite {tflite}" if given else f"the export's {tflite.name}"
    try:
        insp = inspect(tflite)
    except ConversionError:
        raise DataError(f"{where} is not a TFLite flatbuffer (LiteRT cannot load it); pass a .tflite written by "
                        "python -m pipeline.export") from None
    if not insp.outputs or not insp.inputs:
        raise DataError(f"{where} has no input or output tensor; pass a .tflite written by python -m pipeline.export")
    c, h, w = (int(v) for v in pre_shape)
    in_shape = tuple(int(v) for v in insp.inputs[0].shape[1:])
    if in_shape not in ((h, w, c), (c, h, w)):
        raise UsageError(f"{where} takes inputs of shape {'x'.join(map(str, in_shape))} but this export's "
                         f"preprocessing makes {c}x{h}x{w} (C×H×W) images; pass the .tflite converted with this "
                         "export's input shape")
    shape = insp.outputs[0].shape
    k = int(np.prod(shape[1:])) if len(shape) > 1 else int(np.prod(shape))
    if k != num_classes:
        raise UsageError(f"{where} gives {k} outputs per image but the FP32 model {num_classes}; pass the .tflite "
                         "converted from this FP32 model (or --model for the model it was converted from)")
    chk = check_precision(insp, precision)
    if not chk.precision_ok:
        target = rep["target"].get("name") or precision
        raise UsageError(f"{where} is not a {precision} model as target {target} requires ({chk.reason}); pass "
                         f"the {precision} .tflite of this export, or evaluate an export made for its own target")
    return insp, chk


def _restate_for_overrides(rep: dict, overrides: list[str], clean: dict, labels, ds, n: int, model, tflite: Path,
                           insp, chk, kernels: str, fp32_runtime: str) -> None:
    """With overrides the export's accuracy, data and model records no longer describe what was evaluated:
    recompute them (and the gates that read them) from the clean test outputs evaluated here."""
    import numpy as np

    from . import metrics
    prec = chk.precision
    out_q = insp.outputs[0].scale[0] if insp.outputs[0].scale else 0.0
    cmp = metrics.compare(np.asarray(clean["fp32"]), np.asarray(clean["int8"]), labels, out_q)
    by = "recomputed by python -m pipeline.evaluate with " + ", ".join(overrides)
    rep["accuracy"] = cmp.to_dict() | {
        "precision": prec, "tflite_top1": cmp.int8_top1,
        "evaluated_on": f"{ds.name} test split, {n} images; {prec} TFLite on LiteRT {kernels} kernels (1 thread per "
                        f"worker), FP32 on {fp32_runtime}; {by}"}
    rep["data"] = {**ds.describe(), "evaluated": n, "split": "test"}
    rep["model"] = model.describe()
    gates = rep.setdefault("gates", {})
    cfg = rep.get("config", {})
    limits = {}  # the export's limits; a gate it did not record is not added
    for name in ("max_drop_pp", "min_agreement"):
        limit = (gates.get(name) or {}).get("limit", cfg.get(name))
        if isinstance(limit, (int, float)) and not isinstance(limit, bool):
            limits[name] = limit
    fresh = metrics.accuracy_gates(cmp, limits.get("max_drop_pp", float("inf")), limits.get("min_agreement", 0.0))
    gates.update({name: fresh[name] | {"note": by} for name in limits})
    if "--tflite" in overrides:
        rep.setdefault("artifacts", {})["tflite"] = {"path": str(tflite.resolve()), "bytes": tflite.stat().st_size,
                                                     "precision": prec}
        rep["quantization"] = insp.to_dict(with_tensors=True) | {"precision": chk.to_dict()}
        if "fully_int8" in gates:
            gates["fully_int8"].update(value=insp.fully_int8, passed=bool(insp.fully_int8) or prec != "int8")
        if "precision_ok" in gates:
            gates["precision_ok"].update(value=chk.precision_ok, passed=chk.precision_ok, reason=chk.reason)
    rep["evaluate_overrides"] = {
        "flags": overrides, "note": "accuracy, data, model and the max_drop_pp / min_agreement gates were recomputed "
        "here" + (", and the TFLite model's artifacts, quantization and precision gates" if "--tflite" in overrides
                  else "") + "; the runtime, latency, calibration, conversion and bundle sections still describe "
        "the export"}


def _export_predictions(export_dir: Path, rep: dict, n: int, own_models: bool):
    """The export's clean-test logits (predictions.npz), when they belong to these models and inputs."""
    import numpy as np
    p = export_dir / "predictions.npz"
    prec = rep.get("target", {}).get("precision", "int8")
    if not own_models or not p.is_file():
        return None, ""
    try:
        with np.load(p, allow_pickle=False) as z:
            if "fp32_logits" not in z.files or f"{prec}_logits" not in z.files:
                return None, ""
            fp32, q = z["fp32_logits"], z[f"{prec}_logits"]
    except (OSError, ValueError):
        return None, ""
    if len(fp32) != n or len(q) != n:
        return None, ""
    return {"fp32": fp32, "int8": q}, "clean-test logits read from the export's predictions.npz"


def _check_writable(out: Path) -> None:
    """Fail early when ``out`` cannot become the output folder. Creates nothing that stays: a probe entry is made
    and removed in ``out`` (or in its nearest existing parent); write_outputs creates the folder."""
    import tempfile
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"--out {out} exists and is not a folder; pass a folder path")
        where = out
    else:
        where = out.absolute().parent
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            raise OutputError(f"cannot create {out}: {where} is not a folder; pass a writable --out")
    try:
        probe = tempfile.mkdtemp(prefix=".write-check-", dir=where)
        os.rmdir(probe)
    except OSError as e:
        what = f"cannot write in {out}" if where == out else f"cannot create {out}: cannot write in {where}"
        raise OutputError(f"{what} ({e.strerror or e}); pass a writable --out") from None


def write_outputs(rep: dict, out_dir: Path) -> None:
    """report.json and report.html: rendered first, written to temp files, then renamed into place. The output
    folder is created here; on failure, the temp files and the folders this call created are removed."""
    from . import html_report
    from .report import _clean
    contents = {"report.html": html_report.render(rep), "report.json": json.dumps(_clean(rep), indent=2) + "\n"}
    missing = []
    p = out_dir.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    tmps: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        for name, text in contents.items():
            tmp = out_dir / f".{name}.{os.getpid()}.part"
            tmps.append(tmp)
            tmp.write_text(text, encoding="utf-8")
        for name, tmp in zip(contents, tmps):
            os.replace(tmp, out_dir / name)
    except BaseException as e:
        for tmp in tmps:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError):
            raise OutputError(f"cannot write the report to {out_dir} ({e.strerror or e}); pass a writable --out") from None
        raise


def summary(rep: dict, out_dir: Path) -> str:
    cd, fl, sh, ts, pc = (rep["calibration_drift"], rep["flips"], rep["shifts"], rep["temperature_scaling"],
                          rep["per_class"])
    failed = [k for k, g in rep["gates"].items() if not g.get("passed", True)]
    lines = [
        f"model      {rep['model'].get('spec')}  ->  {rep['target'].get('name')}",
        f"clean      FP32 {cd['fp32']['top1']:.2%}  int8 {cd['int8']['top1']:.2%}  flips {fl['count']}/{fl['n']} "
        f"({fl['rate']:.2%})  "
        + (f"best flag {fl['best_detector']} AUROC {fl['detectors'][fl['best_detector']]['auroc']:.3f}"
           if fl.get("best_detector") else "best flag n/a (needs flipped and unflipped images)"),
        f"calibration ECE {cd['fp32']['ece']:.4f} -> {cd['int8']['ece']:.4f} ({cd['delta']['ece']:+.4f})  "
        f"T fp32 {ts['fp32']['temperature']:.3f}  int8 {ts['int8']['temperature']:.3f}",
        f"per class  worst {pc['worst_class']['name']} {pc['worst_class']['drop_pp']:+.2f} pp",
    ]
    if sh.get("records"):
        w, m = sh["worst_by_int8_drop"], sh["mean"]
        lines.append(f"shifts     {sh['sets']} sets x {sh['images_per_set']} images: mean drop {m['drop_pp']:+.2f} pp, "
                     f"mean flip rate {1 - m['agreement']:.2%}; worst {w['corruption']} s{w['severity']} "
                     f"{w['drop_pp']:+.2f} pp")
    rel = rep["reliability"]
    lines.append(f"speed      {rel['images_evaluated']:,} images through both models in {rel['seconds']['engine']:.1f}s "
                 f"({rel['images_per_s']:.0f} img/s, {rel['workers']} workers; host)")
    lines.append(f"verdict    {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}")
    lines.append(f"files      {out_dir}/report.json, {out_dir}/report.html")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .errors import Terminated, raise_on_sigterm
    raise_on_sigterm()
    try:
        args = build_parser().parse_args(argv)
        rep, out = evaluate_export(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("error: interrupted; report.json and report.html were not changed", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated (SIGTERM); report.json and report.html were not changed", file=sys.stderr)
        return 143
    print(summary(rep, out))
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
