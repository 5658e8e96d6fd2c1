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
from dataclasses import dataclass
import json
import math
import os
import sys
import time
from pathlib import Path

# the argument types live in the CLI kit (pipeline/cli.py); these names stay importable from here
from pipeline.cli import class_names as class_names_arg  # noqa: F401
from pipeline.cli import finite_float, ray_address, seed_int  # noqa: F401
from pipeline.cli import severities as _severities
from pipeline.errors import DataError, OutputError, UsageError


def add_reliability_arguments(p: argparse.ArgumentParser, in_export: bool) -> None:
    """The flags shared by ``pipeline.evaluate`` and ``pipeline.export --reliability``. ``--val-size`` defaults to
    None: ``pipeline.reliability.suite.resolve_val_size(None, n_train)`` = min(5000, training images // 5)."""
    from pipeline.reliability.suite import DEFAULT_MAX_ECE_INCREASE, DEFAULT_MAX_WORST_DROP_PP, DEFAULT_VAL_SIZE
    g = p.add_argument_group("Reliability" + (" (with --reliability)" if in_export else ""))
    from pipeline.reliability.corruptions import PRESETS, REGISTERED
    g.add_argument("--corruptions", default="all",
                   help="corruption suite: all (default: the 18 of the default suite), none, a preset ("
                        + ", ".join(PRESETS) + "), or a comma-separated list of: " + ", ".join(REGISTERED))
    g.add_argument("--severities", type=_severities, default=(1, 2, 3, 4, 5), help="severities (default 1,2,3,4,5)")
    g.add_argument("--val-size", type=int, default=None,
                   help=f"training images held for fitting the temperature (default: min({DEFAULT_VAL_SIZE}, "
                        "training images // 5))")
    g.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core; with --ray: "
                                                          "every CPU of the Ray instance or cluster)")
    g.add_argument("--ray", type=ray_address, metavar="auto|ADDRESS", default=None,
                   help="run the reliability jobs (1000 images of one shifted set each) as Ray tasks: auto starts a "
                        "local Ray instance, HOST:PORT or ray://HOST:PORT joins a running cluster; the model files "
                        "and images travel through Ray's object store (pip install '.[ray]'); same figures as without")
    if in_export:
        g.add_argument("--fp32-runtime", choices=("reference", "onnxruntime"), default="onnxruntime",
                       help="FP32 side of the run stage (with or without --reliability) and of the reliability "
                            "report: the model's own runtime (PyTorch for torch models) or onnxruntime on the "
                            "exported model.onnx (checked against PyTorch on 256 inputs; faster on CPU). "
                            "Default: onnxruntime")
    else:
        g.add_argument("--fp32-runtime", choices=("reference", "onnxruntime"), default=None,
                       help="FP32 side: onnxruntime on the export's model.onnx (checked against PyTorch by the "
                            "export on 256 inputs; several times faster on CPU) or the model's own runtime "
                            "(reference: PyTorch for torch models). Default: onnxruntime, as in the export, "
                            "unless --model or --weights names another FP32 model than the export's (model.onnx "
                            "does not describe it then): reference, with a note")
    g.add_argument("--max-ece-increase", type=finite_float, default=DEFAULT_MAX_ECE_INCREASE,
                   help=f"gate: largest int8-minus-FP32 ECE on the clean test split (default {DEFAULT_MAX_ECE_INCREASE})")
    g.add_argument("--max-worst-drop-pp", type=finite_float, default=DEFAULT_MAX_WORST_DROP_PP,
                   help="gate: largest top-1 drop in points over every class and every shifted set "
                        f"(default {DEFAULT_MAX_WORST_DROP_PP})")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import Parser
    p = Parser(prog="python -m pipeline.evaluate",
               description="Reliability report (calibration drift, temperature scaling, flips, per-class, "
                           "corruption suite) for an exported model; writes report.json and report.html.")
    p.add_argument("export_dir", help="an export folder (holds report.json and the .tflite model)")
    g = p.add_argument_group("Overrides (default: what the export's report.json says)")
    g.add_argument("--model", help="FP32 model spec (zoo:NAME, file.onnx, file.pt, package.module:factory)")
    g.add_argument("--weights", help="state_dict for a factory model")
    g.add_argument("--tflite", help="the deployed .tflite model")
    g.add_argument("--data", help="fashion-mnist or path/to/data.npz")
    g.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    g.add_argument("--class-names", type=class_names_arg, metavar="A,B,...",
                   help="one name per class, in index order (default: report.json's data.class_names, else the "
                        "data's own: the .npz's class_names array, the Fashion-MNIST names)")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N test images only")
    g.add_argument("--kernels", help="LiteRT kernels: xnnpack, builtin or ref")
    g.add_argument("--batch-size", type=int, default=256, help="batch for interpreter and FP32 runs (default 256)")
    g.add_argument("--seed", type=seed_int, help="seed of the validation split and the corruptions (default: the export's)")
    add_reliability_arguments(p, in_export=False)
    g = p.add_argument_group("Output")
    g.add_argument("--out", help="write report.json and report.html here instead of into the export folder")
    g.add_argument("-v", "--verbose", action="store_true", help="show the tools' own output")
    return p


@dataclass(frozen=True)
class EvaluateConfig:
    """``python -m pipeline.evaluate``'s flags. None: what the export's report.json says (see build_parser)."""

    export_dir: str
    model: str | None = None
    weights: str | None = None
    tflite: str | None = None
    data: str | None = None
    data_dir: str | None = None
    class_names: tuple[str, ...] | None = None
    eval_limit: int | None = None
    kernels: str | None = None
    batch_size: int = 256
    seed: int | None = None
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    val_size: int | None = None
    workers: int = 0
    ray: str | None = None
    fp32_runtime: str | None = None
    max_ece_increase: float = 0.02
    max_worst_drop_pp: float = 5.0
    out: str | None = None
    verbose: bool = False

    def reliability(self, seed: int):
        from pipeline.reliability.suite import ReliabilityConfig
        return ReliabilityConfig(corruptions=self.corruptions, severities=self.severities, val_size=self.val_size,
                                 seed=seed, workers=self.workers, ray=self.ray,
                                 max_ece_increase=self.max_ece_increase,
                                 max_worst_drop_pp=self.max_worst_drop_pp)


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    from pipeline.reliability.suite import parse_corruptions
    if args.val_size is not None and args.val_size <= 0:
        raise UsageError(f"--val-size {args.val_size} is empty; pass at least 1, or leave it out for the default "
                         "min(5000, training images // 5)")
    if args.workers < 0:
        raise UsageError("--workers must be 0 (one per core) or more")
    return EvaluateConfig(**{k: v for k, v in vars(args).items() if k not in ("corruptions", "severities")},
                          corruptions=parse_corruptions(args.corruptions), severities=tuple(args.severities))


FIX = "pass a folder written by python -m pipeline.export (or re-run the export)"
MODEL_FILE_SUFFIXES = (".onnx", ".pt", ".pth", ".ptl", ".torchscript")


def _read_report(export_dir: Path) -> dict:
    """report.json as data: bounded size and depth, an object whose sections have the right types."""
    from pipeline import jsonio
    path = export_dir / "report.json"
    if not export_dir.is_dir():
        raise UsageError(f"{export_dir} is not a folder; pass the folder an export wrote (python -m pipeline.export --out DIR)")
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass a folder written by python -m pipeline.export")
    try:
        raw = path.read_bytes() if path.stat().st_size <= jsonio.MAX_BYTES else None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or type(e).__name__}); {FIX}") from None
    if raw is None:
        raise DataError(f"{path} is larger than {jsonio.MAX_BYTES >> 20} MiB, not an export report; {FIX}")
    depth = jsonio.nesting_depth(raw)
    if depth > jsonio.MAX_DEPTH:
        raise DataError(f"{path} nests {depth} levels deep (the limit is {jsonio.MAX_DEPTH}), not an export report; {FIX}")
    try:
        rep = json.loads(raw.decode("utf-8"), parse_constant=jsonio._no_constant)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path} is not readable JSON ({type(e).__name__}); re-run the export") from None
    if not isinstance(rep, dict):
        raise DataError(f"{path} holds a JSON {type(rep).__name__}, not an export report (an object); pass a folder "
                        "written by python -m pipeline.export")
    for key in ("preprocessing", "model", "config", "target"):
        if not isinstance(rep.get(key), dict):
            raise DataError(f"{path} lacks the '{key}' section; re-run python -m pipeline.export with this version")
    for key in ("artifacts", "conversion", "gates", "timings_s", "data", "versions"):
        if key in rep and not isinstance(rep[key], dict):
            raise DataError(f"{path}: '{key}' is not an object; re-run python -m pipeline.export")
    for name, g in rep.get("gates", {}).items():
        if not isinstance(g, dict):
            raise DataError(f"{path}: gates.{name} is not an object; re-run python -m pipeline.export")
    return rep


def _fields(rep: dict, section: str, path: Path):
    from pipeline.jsonio import Fields
    return Fields(rep[section], str(path), "re-run python -m pipeline.export", f"{section}.")


def _preprocessing(rep: dict, path: Path):
    from pipeline.inputs.preprocessing import from_record
    return from_record(rep["preprocessing"], str(path), "re-run python -m pipeline.export")


# --------------------------------------------------------------------------- what a received folder may name

def _is_model_file(spec: str) -> bool:
    return spec.lower().endswith(MODEL_FILE_SUFFIXES)


def _recorded_model(rep: dict, rpath: Path, export_dir: Path) -> tuple[str, str]:
    """(spec to load, spec as recorded) for the model the report names, when evaluate may load it by itself:
    a zoo model (shipped in the package), or an ONNX/TorchScript file inside the export folder (read, never run
    as Python). A factory (package.module:factory) is code: only the user's --model runs it."""
    key = "model.spec" if _fields(rep, "model", rpath).str("spec") else "config.model"
    spec = _fields(rep, "model", rpath).str("spec") or _fields(rep, "config", rpath).str("model")
    if not spec:
        raise DataError(f"{rpath} names no model (model.spec); pass --model SPEC")
    if spec.startswith("zoo:"):
        return spec, spec
    if _is_model_file(spec):
        from pipeline.jsonio import inside
        p = inside(export_dir, spec)
        if p is not None and p.is_file():
            return str(p), spec
        raise DataError(f"{rpath}: {key} records the model file {spec!r}, outside the export folder, which evaluate "
                        f"does not follow; pass --model PATH (the model file the export was made from)")
    raise DataError(f"{rpath}: {key} names {spec!r}, Python code that evaluate never imports because a report names "
                    f"it; pass --model {spec} to run it (only if you trust that module), with --weights if the "
                    "export used them")


def _recorded_path(rep: dict, rpath: Path, export_dir: Path, key: str, flag: str) -> str | None:
    """``config.<key>`` (a --data/--weights/--data-dir value the export recorded as typed): used only when it is
    a relative path inside the export folder; anything else needs the flag."""
    from pipeline.jsonio import inside
    v = _fields(rep, "config", rpath).str(key)
    if v is None or (key == "data" and v == "fashion-mnist"):
        return v
    p = inside(export_dir, v)
    if p is not None and p.exists():
        return str(p)
    raise DataError(f"{rpath}: config.{key} records {flag} {v}, a path outside the export folder, which evaluate "
                    f"does not follow; pass {flag} PATH (the {'folder' if key == 'data_dir' else 'file'} the export "
                    "used)")


def _same(given: str | None, recorded: str | None) -> bool:
    """Does a flag name what the export recorded (the same text, or the same existing file)?"""
    if given is None or recorded is None:
        return False
    if given == recorded:
        return True
    try:
        a, b = Path(given).expanduser(), Path(recorded).expanduser()
        return a.exists() and b.is_absolute() and a.resolve() == b.resolve()
    except (OSError, ValueError, RuntimeError):
        return False


def _verified_artifact(rep: dict, key: str, export_dir: Path, rpath: Path) -> Path:
    """``artifacts.<key>``: a file inside the export folder whose sha256 is the one the export recorded."""
    from pipeline.jsonio import sha256_file
    art = _fields(rep, "artifacts", rpath) if "artifacts" in rep else None
    sec = art.section(key, required=False) if art is not None else None
    if sec is None:
        raise DataError(f"{rpath} records no artifacts.{key}; re-run python -m pipeline.export")
    p = sec.path_inside("path", export_dir, required=True)
    want = sec.sha256("sha256", required=False)
    if want is None:
        raise DataError(f"{rpath} records no sha256 for artifacts.{key} (an export of an older version): its files "
                        "cannot be checked; re-run python -m pipeline.export")
    if not p.is_file():
        raise DataError(f"the export's {p.name} (artifacts.{key}.path) does not exist in {export_dir}; copy the whole "
                        "export folder")
    try:
        got = sha256_file(p)
    except OSError as e:
        raise DataError(f"cannot read the export's {p.name} ({e.strerror or e}); check its permissions") from None
    if got != want:
        raise DataError(f"the export's {p.name} changed after the export: its sha256 is not the one report.json "
                        f"records (artifacts.{key}.sha256); copy the export folder again or re-run the export")
    return p


def _inside_folder(path: str | os.PathLike, folder: Path) -> bool:
    try:
        p, f = Path(path).resolve(), folder.resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return p == f or f in p.parents


def _check_factory_source(spec: str, export_dir: Path) -> None:
    """A --model package.module:factory must not be imported from inside the export folder: find where its top
    package would come from (without running it) and refuse that folder."""
    import importlib.machinery
    top = spec.partition(":")[0].split(".")[0]
    if not top or not top.isidentifier():
        return  # models.load gives the usage error
    where = f"--model {spec}"
    if _inside_folder(os.getcwd(), export_dir):
        raise UsageError(f"{where}: the current folder is inside the export folder {export_dir}, so its files would be "
                         "importable; run python -m pipeline.evaluate from the folder that holds your module")
    mod = sys.modules.get(top)
    if mod is not None:
        places = [getattr(mod, "__file__", None), *list(getattr(mod, "__path__", []) or [])]
    else:
        search = list(sys.path) + ([os.getcwd()] if os.getcwd() not in sys.path and "" not in sys.path else [])
        found = importlib.machinery.PathFinder.find_spec(top, [p or os.getcwd() for p in search])
        places = [] if found is None else [found.origin, *list(found.submodule_search_locations or [])]
    if any(p and _inside_folder(p, export_dir) for p in places):
        raise UsageError(f"{where} would import {top} from inside the export folder {export_dir}: a received folder "
                         "is data, never code; keep the module outside it and run from the folder that holds it")


class _NoImportsFrom:
    """While evaluating, no sys.path entry that is (or resolves inside) the export folder: running from inside a
    received folder must not make its files importable by the imports evaluate does later (numpy, torch, ...)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        self.saved = list(sys.path)
        sys.path[:] = [p for p in sys.path if not _inside_folder(p or os.getcwd(), self.folder)]
        return self

    def __exit__(self, *exc):
        removed = [p for p in self.saved if p not in sys.path]
        for p in removed:  # put back what was removed; keep what evaluate added (a factory's folder)
            if p not in sys.path:
                sys.path.insert(min(self.saved.index(p), len(sys.path)), p)
        return False


def held_out_from_training(model) -> bool | None:
    """Zoo models were trained on the whole training split (their training record says so)."""
    if model.kind == "zoo":
        from pipeline import zoo
        entry = zoo.get_entry(model.spec[4:])
        if str(model.extra.get("weights")) != str(entry.weights_path):
            return None  # --weights: not the shipped checkpoint the record describes
        rec = entry.training_record() or {}
        ds = rec.get("dataset") or {}
        if ds.get("train_size"):
            return False
    return None


def evaluate_export(ecfg: EvaluateConfig, log=print):
    export_dir = Path(ecfg.export_dir)
    with _NoImportsFrom(export_dir):
        return _evaluate_export(ecfg, export_dir, log)


def _evaluate_export(ecfg: EvaluateConfig, export_dir: Path, log=print):
    import numpy as np

    from pipeline.inputs import data as data_mod
    from pipeline import quiet
    from pipeline.inputs import models
    from pipeline.reliability.engine import ModelPair
    from pipeline.inputs.preprocessing import check_batch_fits_memory
    from pipeline.reliability.suite import evaluate, resolve_val_size

    quiet.configure(ecfg.verbose)
    t0 = time.perf_counter()
    steps = _Steps(log)
    rep = _read_report(export_dir)
    rpath = export_dir / "report.json"
    cfg, target = _fields(rep, "config", rpath), _fields(rep, "target", rpath)
    pre = _preprocessing(rep, rpath)
    if ecfg.batch_size <= 0:
        raise UsageError("--batch-size must be at least 1")
    check_batch_fits_memory(pre.input_shape, ecfg.batch_size, f"{rpath}: preprocessing.input_shape")
    from pipeline.export import run_batch
    ecfg = dataclasses.replace(ecfg, batch_size=run_batch(ecfg.batch_size, pre.input_shape))  # as the export runs
    # A received folder is data. The model, weights and data it records are used only when they are a zoo model
    # or files inside the folder; anything else must come from this command line. A flag naming what the export
    # recorded confirms it (the FP32 check below then applies); a flag naming something else overrides it.
    overrides: list[str] = []
    if ecfg.model:
        rec_spec = _fields(rep, "model", rpath).str("spec") or cfg.str("model")
        model_spec = ecfg.model
        model_given = not _same(ecfg.model, rec_spec)
        if model_given:
            overrides.append("--model")
    else:
        model_spec, rec_spec = _recorded_model(rep, rpath, export_dir)
        model_given = False
    rec_weights = cfg.str("weights")
    if ecfg.weights is not None:
        weights = ecfg.weights
        if not _same(ecfg.weights, rec_weights):
            overrides.append("--weights")
    elif model_given:
        weights = None  # another model: the export's weights do not belong to it
    else:
        weights = _recorded_path(rep, rpath, export_dir, "weights", "--weights")
    tflite, tflite_given = _tflite(ecfg, rep, export_dir, rpath, overrides)
    rec_data = cfg.str("data")
    if ecfg.data:
        data_spec = ecfg.data
        if not _same(ecfg.data, rec_data):
            overrides.append("--data")
    else:
        data_spec = _recorded_path(rep, rpath, export_dir, "data", "--data") or "fashion-mnist"
    if ecfg.data_dir:
        data_dir = ecfg.data_dir
        if not _same(ecfg.data_dir, cfg.str("data_dir")):
            overrides.append("--data-dir")
    elif ecfg.data or data_spec != "fashion-mnist":
        data_dir = None
    else:
        data_dir = _recorded_path(rep, rpath, export_dir, "data_dir", "--data-dir")
    rec_kernels = target.str("litert_kernels") or target.str("kernels")
    kernels = ecfg.kernels or rec_kernels or "xnnpack"
    if kernels not in ("xnnpack", "builtin", "ref"):
        raise UsageError(f"--kernels {kernels!r}: choose xnnpack, builtin or ref")
    if ecfg.kernels is not None and ecfg.kernels != rec_kernels:
        overrides.append("--kernels")
    seed = ecfg.seed if ecfg.seed is not None else (cfg.int("seed", 0, 2 ** 32 - 1) or 0)
    rcfg = ecfg.reliability(seed)
    rec_limit = cfg.int("eval_limit", 1, 2 ** 62)
    limit = ecfg.eval_limit if ecfg.eval_limit is not None else rec_limit
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise UsageError(f"--eval-limit must be at least 1 (got {limit!r})")
    if ecfg.eval_limit is not None and ecfg.eval_limit != rec_limit:
        overrides.append("--eval-limit")
    precision = target.str("precision", choices=_PRECISIONS) or "int8"
    layout = (pre.tflite_input_layout  # the deployment record; reports before it kept the layout in conversion
              or (_fields(rep, "conversion", rpath).str("input_layout", choices=("NHWC", "NCHW"))
                  if "conversion" in rep else None) or "NHWC")
    own_models = not overrides
    # The export's recorded logits: verified before use, needed to check the FP32 model is the export's.
    predictions = _verified_artifact(rep, "predictions", export_dir, rpath) if own_models else None
    out_dir = Path(ecfg.out) if ecfg.out else export_dir
    _check_writable(out_dir)  # created only when the results are written
    # Data before the model: the validation split's size is checked before any model is loaded or run.
    ds = data_mod.load(data_spec, data_dir, pre.input_shape)
    resolve_val_size(rcfg.val_size, len(ds.y_train))
    if tuple(ds.sample_shape) != tuple(pre.input_shape):  # before any model sees an input of this shape
        data_mod.check_fits(ds, pre.input_shape, 2)
    if rcfg.corruptions:
        from pipeline.reliability.corruptions import check_corruptible
        check_corruptible(pre.input_shape)
    if ":" in model_spec and not model_spec.startswith("zoo:") and not _is_model_file(model_spec):
        _check_factory_source(model_spec, export_dir)
    model = models.load(model_spec, weights)
    if model_spec != ecfg.model:
        model.spec = rec_spec  # the report keeps the spec as recorded, not the folder's absolute path
    num_classes = models.probe(model, pre.input_shape)
    ds = _with_class_names(ds, ecfg, rep, rpath)
    data_mod.check_fits(ds, pre.input_shape, num_classes)
    ds = data_mod.check_class_count(ds, num_classes)
    fp32_onnx, fp32_choice, fp32_note = _fp32_runtime(ecfg, rep, export_dir, rpath, model, overrides)
    insp, chk = _check_tflite(tflite, precision, num_classes, rep, given=tflite_given,
                              pre_shape=pre.input_shape)
    n = len(ds.x_test) if limit is None else min(int(limit), len(ds.x_test))
    if n <= 0:
        raise DataError(f"{data_spec} has no test images; pass data with a test split")
    clean, clean_note = None, ""
    if predictions is not None:
        clean, clean_note = _export_predictions(predictions, precision, n)
        _check_fp32_reproduces(model, ds, pre, predictions, ecfg.batch_size, model.spec)
    pair = ModelPair(model_spec=model_spec, weights=weights, tflite_path=str(tflite.resolve()), input_layout=layout,
                     kernels=kernels, preprocessing=pre, batch_size=ecfg.batch_size, fp32_onnx=fp32_onnx)
    if fp32_note:
        log(f"note: {fp32_note}", file=sys.stderr)
    steps.done("checks", f"report, data ({n} test images), FP32 model ({fp32_choice.split(':')[0]}) and "
                         f"{tflite.name} checked")
    # The export's clean logits (predictions.npz) serve an onnxruntime FP32 side when the export ran that too
    recorded_fp32 = (rep.get("runtime") or {}).get("fp32") if isinstance(rep.get("runtime"), dict) else None
    clean_from_onnx = bool(fp32_onnx) and isinstance(recorded_fp32, dict) \
        and str(recorded_fp32.get("runtime", "")).startswith("onnxruntime on model.onnx")
    from pipeline.reliability.suite import held_out_split
    result = evaluate(pair, ds, n, rcfg, clean=clean, loaded_model=model, held_out_from_training=held_out_from_training(model),
                      runtime_note=clean_note, progress=not ecfg.verbose and sys.stderr.isatty(), log=log,
                      clean_from_fp32_onnx=clean_from_onnx, held_out=held_out_split(weights, ds))
    steps.done("engine", f"{result.sections['reliability']['images_evaluated']:,} images through both models, "
                         f"{result.sections['reliability']['workers']} worker(s)")
    from pipeline.report import SCHEMA_VERSION, Report
    from pipeline.report.figures import confusion_and_flip_examples
    report = Report.from_dict(rep)  # the export's report, typed; written back in this version's schema
    report.schema_version = SCHEMA_VERSION
    report.sections.update(result.sections)
    report.sections["fp32_vs_int8"] = confusion_and_flip_examples(
        ds.x_test[:n], ds.y_test[:n], result.clean["fp32"], result.clean["int8"], class_names=ds.class_names,
        raw_range=pre.raw_range)
    if ds.class_names is not None:  # the names the per-class table used, whatever their source
        report.data.update(class_names=list(ds.class_names), class_names_source=ds.class_names_source)
    else:
        for k in ("class_names", "class_names_source"):
            report.data.pop(k, None)
    report.gates.update(result.gates)
    if overrides:
        _restate_for_overrides(report, overrides, result.clean, np.asarray(ds.y_test[:n]), ds, n, model, tflite,
                               insp, chk, kernels, pair.fp32_runtime)
    report.timings_s["reliability"] = round(time.perf_counter() - t0, 3)
    report.sections["reliability"].update(
        fp32_runtime_choice=fp32_choice, command="python -m pipeline.evaluate " + " ".join(sys.argv[1:]),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(rcfg).items()})
    report.artifacts["report_html"] = {"path": "report.html"}
    report.write(out_dir)
    steps.done("report", f"{out_dir}/report.json and report.html written")
    return report, out_dir


class _Steps:
    """``[i/N] name  seconds  what`` on stderr after each step, as the export prints its stages (the engine's
    progress bar, with an ETA, is shown meanwhile when stderr is a terminal)."""

    NAMES = ("checks", "engine", "report")

    def __init__(self, log):
        self.log, self.t = log, time.perf_counter()

    def done(self, name: str, what: str) -> None:
        now = time.perf_counter()
        i = self.NAMES.index(name) + 1
        self.log(f"[{i}/{len(self.NAMES)}] {name:<8} {now - self.t:6.2f}s  {what}", file=sys.stderr)
        self.t = now


def _with_class_names(ds, ecfg, rep: dict, rpath: Path):
    """The class names: --class-names, else the ones report.json records (what the export showed), else the
    data's own (the .npz's class_names array, the Fashion-MNIST names)."""
    if ecfg.class_names is not None:
        return ds.with_class_names(ecfg.class_names, "--class-names")
    data = rep.get("data")
    recorded = data.get("class_names") if isinstance(data, dict) else None
    if recorded is None:
        return ds
    where = f"{rpath}: data.class_names"
    if not isinstance(recorded, list) or len(recorded) > 100_000:
        raise DataError(f"{where} is not a list of names; pass --class-names A,B,... or re-run the export")
    return ds.with_class_names(recorded, where)


def _fp32_runtime(ecfg, rep: dict, export_dir: Path, rpath: Path, model, overrides: list[str]):
    """The FP32 side: ``(model.onnx path or None, how it was chosen, a note to print or "")``.

    Default (no --fp32-runtime): onnxruntime on the export's model.onnx (sha256 verified; the export checked it
    against PyTorch), as the export does, unless --model/--weights name another FP32 model than the export's -
    model.onnx does not describe it then - or the report records no model.onnx: the model's reference runtime,
    with a note."""
    others = [f for f in ("--model", "--weights") if f in overrides]
    ref = f"the reference runtime ({model.reference_runtime})"
    if model.kind == "onnx":
        return None, "onnxruntime: the FP32 model is an ONNX file, whose own runtime is onnxruntime", ""
    if ecfg.fp32_runtime == "reference":
        return None, f"reference: {ref}, as --fp32-runtime reference asks", ""
    if ecfg.fp32_runtime == "onnxruntime" and others:
        raise UsageError(f"--fp32-runtime onnxruntime runs the export's model.onnx, which does not describe the FP32 "
                         f"model {' and '.join(others)} name{'s' if len(others) == 1 else ''}; drop --fp32-runtime "
                         "(the reference runtime runs it then) or drop " + " and ".join(others))
    if ecfg.fp32_runtime is None:
        if others:
            why = (f"{' and '.join(others)} name{'s' if len(others) == 1 else ''} another FP32 model than the "
                   "export's, which its model.onnx does not describe")
            return None, f"reference: {ref}, not the default onnxruntime on model.onnx: {why}", \
                f"FP32 runs on {ref}, not on onnxruntime with the export's model.onnx: {why}"
        art = rep.get("artifacts", {}).get("onnx")
        if not isinstance(art, dict) or not art.get("path"):
            why = "the report records no model.onnx (artifacts.onnx)"
            return None, f"reference: {ref}, not the default onnxruntime on model.onnx: {why}", \
                f"FP32 runs on {ref}: {why}"
    onnx = str(_verified_artifact(rep, "onnx", export_dir, rpath))
    how = ("as --fp32-runtime onnxruntime asks" if ecfg.fp32_runtime else
           "the default, as in the export; --fp32-runtime reference runs the model's own runtime instead")
    return onnx, f"onnxruntime: the export's model.onnx, checked against PyTorch by the export ({how})", ""


from pipeline.precisions import PRECISIONS as _PRECISIONS  # noqa: E402  (the ladder: a live, read-only name -> Precision)
# Recorded FP32 logits vs the FP32 model loaded here, on the first FP32_CHECK_IMAGES test inputs. The export
# accepted ONNX (onnxruntime) against PyTorch within onnx_export.tolerance_for (1e-4 + 1e-4 of the output range)
# and its recorded logits may be onnxruntime's, so PyTorch here is within one such tolerance of them; batch size
# and thread count change float summation order by far less (~1e-6 relative). Twice that tolerance is therefore
# never hit by the export's own model, while another model (other weights or architecture) differs by a sizeable
# fraction of the output range - thousands of times more.
FP32_CHECK_IMAGES = 256
FP32_CHECK_TOLERANCE_FACTOR = 2.0


def _tflite(ecfg, rep: dict, export_dir: Path, rpath: Path, overrides: list[str]) -> tuple[Path, bool]:
    """The .tflite: --tflite as given, else the export's (inside the folder, sha256 verified)."""
    art = rep.get("artifacts", {}).get("tflite")
    if ecfg.tflite:
        given = Path(ecfg.tflite)
        if not given.is_file():
            raise DataError(f"the TFLite model {given} does not exist; pass --tflite path/to/model.tflite")
        from pipeline.jsonio import inside
        own = inside(export_dir, art.get("path")) if isinstance(art, dict) else None
        if own is None or own != given.resolve():
            overrides.append("--tflite")
            return given, True
    if not isinstance(art, dict) or not art.get("path"):
        raise DataError(f"{rpath} names no TFLite model (artifacts.tflite.path); pass --tflite path/to/model.tflite")
    return _verified_artifact(rep, "tflite", export_dir, rpath), False


def _check_fp32_reproduces(model, ds, pre, predictions: Path, batch_size: int, spec: str) -> None:
    """The FP32 model loaded here must give the export's recorded FP32 logits (predictions.npz, verified): a report
    whose model spec was edited to another model, or a changed factory module, is refused."""
    import numpy as np

    from pipeline.inputs import models
    from pipeline.conversion.onnx_export import tolerance_for
    from pipeline.inputs.preprocessing import apply
    from pipeline.inputs.safe_arrays import SafeNpz
    with SafeNpz(predictions, f"the export's {predictions.name}", DataError) as z:
        recorded = z.load("fp32_logits") if "fp32_logits" in z else None
    if recorded is None or recorded.ndim != 2 or recorded.dtype.kind != "f":
        raise DataError(f"the export's {predictions.name} holds no FP32 logits (fp32_logits); re-run the export")
    k = min(FP32_CHECK_IMAGES, len(recorded), len(ds.x_test))
    if k == 0:
        return
    got = models.run_fp32(model, apply(ds.x_test[:k], pre), batch_size=batch_size)
    want = recorded[:k].astype(np.float64)
    tol = FP32_CHECK_TOLERANCE_FACTOR * tolerance_for(want)
    err = float(np.abs(got.astype(np.float64) - want).max()) if got.shape == want.shape else math.inf
    if not err <= tol:
        how = (f"differ by up to {err:.3g} (tolerance {tol:.3g})" if math.isfinite(err)
               else f"have shape {list(got.shape[1:])}, the recorded ones {list(want.shape[1:])}")
        raise DataError(f"the FP32 model {spec} does not reproduce the export's FP32 logits ({predictions.name}): on "
                        f"the first {k} test images its outputs {how}; this is not the model (or data) the export was "
                        "made from: pass --model/--weights/--data naming what the export used, or re-run the export")


def _check_tflite(tflite: Path, precision: str, num_classes: int, rep: dict, given: bool, pre_shape):
    """The .tflite must be a model of the export's precision with one output per class of the FP32 model."""
    import numpy as np

    from pipeline.errors import ConversionError
    from pipeline.tflite.inspect import inspect
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
    from pipeline.precisions import contract_check
    chk = contract_check(precision, bool(rep["target"].get("allow_float_fallback")), insp)
    if not chk.precision_ok:
        target = rep["target"].get("name") or precision
        raise UsageError(f"{where} is not a {precision} model as target {target} requires ({chk.reason}); pass "
                         f"the {precision} .tflite of this export, or evaluate an export made for its own target")
    return insp, chk


def _restate_for_overrides(report, overrides: list[str], clean: dict, labels, ds, n: int, model, tflite: Path,
                           insp, chk, kernels: str, fp32_runtime: str) -> None:
    """With overrides the export's accuracy, data and model records no longer describe what was evaluated:
    recompute them (and the gates that read them) from the clean test outputs evaluated here."""
    import numpy as np

    from pipeline.reliability import metrics
    from pipeline.precisions import get_precision
    from pipeline.reliability.sanity import fp32_gate
    prec = chk.precision
    precision = get_precision(prec)
    out_q = insp.outputs[0].scale[0] if insp.outputs[0].scale else 0.0
    cmp = metrics.compare(np.asarray(clean["fp32"]), np.asarray(clean["int8"]), labels, out_q)
    by = "recomputed by python -m pipeline.evaluate with " + ", ".join(overrides)
    report.accuracy = cmp.to_dict() | {
        "precision": prec, "tflite_top1": cmp.int8_top1,
        "evaluated_on": f"{ds.name} test split, {n} images; {prec} TFLite on LiteRT {kernels} kernels (1 thread per "
                        f"worker), FP32 on {fp32_runtime}; {by}"}
    report.data = {**ds.describe(), "evaluated": n, "split": "test"}
    missing = model.kind == "factory" and not model.extra.get("weights")
    report.model = model.describe() | {"weights_missing": missing}
    gates = report.gates
    limits = {}  # the export's limits; a gate it did not record is not added
    for name in ("max_drop_pp", "min_agreement"):
        limit = gates[name].limit if name in gates else report.config.get(name)
        if isinstance(limit, (int, float)) and not isinstance(limit, bool):
            limits[name] = limit
    fresh = metrics.accuracy_gates(cmp, limits.get("max_drop_pp", float("inf")), limits.get("min_agreement", 0.0))
    gates.update({name: fresh[name].with_(note=by) for name in limits})
    # The FP32 model evaluated here must itself be above chance (pipeline/reliability/sanity.py), whatever the export said.
    gates["fp32_above_chance"] = fp32_gate(cmp.fp32_top1, labels, None, missing).with_(note=by)
    if "--tflite" in overrides:
        report.artifacts["tflite"] = {"path": str(tflite.resolve()), "bytes": tflite.stat().st_size, "precision": prec}
        report.quantization = insp.to_dict(with_tensors=True) | {"precision": chk.to_dict()}
        if "fully_int8" in gates:
            gates["fully_int8"] = gates["fully_int8"].with_(
                value=insp.fully_int8, passed=bool(insp.fully_int8) or not precision.fully_int8_required
                or bool(report.target.get("allow_float_fallback")))
        if "precision_ok" in gates:
            gates["precision_ok"] = gates["precision_ok"].with_(value=chk.precision_ok, passed=chk.precision_ok,
                                                                reason=chk.reason)
    report.sections["evaluate_overrides"] = {
        "flags": overrides, "note": "accuracy, data, model and the max_drop_pp / min_agreement gates were recomputed "
        "here" + (", and the TFLite model's artifacts, quantization and precision gates" if "--tflite" in overrides
                  else "") + "; the runtime, latency, calibration, conversion and bundle sections still describe "
        "the export"}


def _export_predictions(predictions: Path, precision: str, n: int):
    """The export's clean-test logits (predictions.npz, sha256 verified), when they cover these ``n`` inputs."""
    from pipeline.inputs.safe_arrays import SafeNpz
    with SafeNpz(predictions, f"the export's {predictions.name}", DataError) as z:
        if "fp32_logits" not in z or f"{precision}_logits" not in z:
            return None, ""
        fp32, q = z.load("fp32_logits"), z.load(f"{precision}_logits")
    if len(fp32) != n or len(q) != n or fp32.shape != q.shape or fp32.ndim != 2:
        return None, ""
    return {"fp32": fp32, "int8": q}, "clean-test logits read from the export's predictions.npz"


def _check_writable(out: Path) -> None:
    """Fail early when ``out`` cannot become the output folder. Creates nothing that stays: a probe entry is made
    and removed in ``out`` (or in its nearest existing parent); Report.write creates the folder."""
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


def summary(report, out_dir: Path) -> str:
    s = report.sections
    cd, fl, sh, ts, pc = (s["calibration_drift"], s["flips"], s["shifts"], s["temperature_scaling"], s["per_class"])
    failed = report.failed()
    lines = [
        f"model      {report.model.get('spec')}  ->  {report.target.get('name')}",
        f"clean      FP32 {cd['fp32']['top1']:.2%}  int8 {cd['int8']['top1']:.2%}  flips {fl['count']}/{fl['n']} "
        f"({fl['rate']:.2%})  "
        + (f"best flag {fl['best_detector']} AUROC {fl['detectors'][fl['best_detector']]['auroc']:.3f}"
           if fl.get("best_detector") else "best flag n/a (needs flipped and unflipped images)"),
        f"calibration ECE {cd['fp32']['ece']:.4f} -> {cd['int8']['ece']:.4f} ({cd['delta']['ece']:+.4f})  "
        f"T fp32 {ts['fp32']['temperature']:.3f}  int8 {ts['int8']['temperature']:.3f}"
        + _temperature_words(ts['fp32']['temperature'], ts['int8']['temperature']),
        f"per class  worst {pc['worst_class'].get('label', pc['worst_class']['name'])} "
        f"{pc['worst_class']['drop_pp']:+.2f} pp",
    ]
    if sh.get("records"):
        w, m = sh["worst_by_int8_drop"], sh["mean"]
        lines.append(f"shifts     {sh['sets']} sets x {sh['images_per_set']} images: mean drop {m['drop_pp']:+.2f} pp, "
                     f"mean flip rate {1 - m['agreement']:.2%}; worst {w['corruption']} s{w['severity']} "
                     f"{w['drop_pp']:+.2f} pp")
    rel = s["reliability"]
    lines.append(f"speed      {rel['images_evaluated']:,} images through both models in {rel['seconds']['engine']:.1f}s "
                 f"({rel['images_per_s']:.0f} img/s, {rel['workers']} worker{'s' if rel['workers'] != 1 else ''}; host)")
    lines.append(f"verdict    {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}")
    lines.append(f"files      {out_dir}/report.json, {out_dir}/report.html")
    return "\n".join(lines)


def _temperature_words(t_fp32: float, t_int8: float) -> str:
    """ "(< 1: under-confident, scaling sharpens)" for the summary line, when both temperatures read alike."""
    from pipeline.reliability.suite import TEMPERATURE_CLOSE_TO_ONE
    def side(t):
        if abs(t - 1.0) < TEMPERATURE_CLOSE_TO_ONE:
            return "~1: calibrated as is"
        return "> 1: over-confident, scaling softens" if t > 1 else "< 1: under-confident, scaling sharpens"
    a, b = side(t_fp32), side(t_int8)
    return f" ({a})" if a == b else f" (FP32 {a}; int8 {b})"


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import run_main

    def show(result) -> int:
        report, out = result
        print(summary(report, out))
        return 0 if report.passed else 1

    return run_main(lambda: evaluate_export(config_from_args(build_parser().parse_args(argv))),
                    interrupted_note="; report.json and report.html were not changed", then=show)


if __name__ == "__main__":
    from pipeline.cli import exit_program
    exit_program(main())
