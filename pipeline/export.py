"""``python -m pipeline.export --target tflite-int8``: PyTorch -> ONNX -> fully-int8 TFLite, verified.

The pipeline is the literal list ``STAGES`` below; each stage is timed into the report.

    export_onnx  PyTorch -> ONNX (dynamic batch), onnx.checker, onnxruntime vs PyTorch
    convert      ONNX -> TFLite full int8, calibrated on the representative dataset
    inspect      flatbuffer: ops, tensor dtypes, quantization; fail unless fully int8
    run          int8 on LiteRT kernels (target's kernels/threads) and FP32 on the same inputs
    compare      top-1, drop, agreement, output errors in quantization steps, sizes
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UsageError
from .quiet import progress as _progress

DEFAULT_MODEL = "zoo:refcnn"


@dataclass(frozen=True)
class ExportConfig:
    model: str = DEFAULT_MODEL
    weights: str | None = None
    input_shape: tuple[int, int, int] | None = None
    data: str = "fashion-mnist"
    data_dir: str | None = None
    class_names: tuple[str, ...] | None = None  # --class-names: one per class; None: the data's own (npz, Fashion-MNIST)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    calib: str = "balanced"
    # --calib-size; None (not given): calib_data.DEFAULT_SIZE (500), or all a smaller folder/npz/training split holds.
    # Given explicitly, a source holding fewer samples is an error.
    calib_size: int | None = None
    calib_cache: str | None = "~/.cache/edge-int8-pipeline/calib"  # generated calibration sets; None: no cache
    seed: int = 0
    target: str = "tflite-int8"
    out: str | None = None
    overwrite: bool = False  # replace an earlier export in --out as a whole (pipeline/outdir.py)
    max_drop_pp: float = 1.0
    min_agreement: float = 0.98
    converter: str = "onnx2tf"
    batch_size: int = 256
    eval_limit: int | None = None
    micro_limit: int = 1000  # TFLite-Micro targets: run the first N test inputs on the (batch-1, slow) interpreter
    verbose: bool = False
    # --reliability (pipeline/reliability.py): calibration drift, temperature scaling, flips, per-class,
    # the corruption suite, two more gates and report.html, in one extra step after the stages
    reliability: bool = False
    corruptions: str = "all"
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    val_size: int | None = None  # None: reliability.resolve_val_size's default, min(5000, train // 5)
    workers: int = 0
    max_ece_increase: float = 0.02
    max_worst_drop_pp: float = 5.0
    # FP32 side of the run stage and of --reliability: "onnxruntime" runs the exported model.onnx (checked against
    # PyTorch in export_onnx on 256 real inputs); "reference" runs the model's own runtime (PyTorch).
    fp32_runtime: str = "onnxruntime"
    # The folder the export ran in, recorded so a reader can tell what relative --model/--weights/--data paths
    # meant. pipeline.evaluate never follows it (a received report is data: see README "Bad input").
    cwd: str = field(default_factory=os.getcwd)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Run:
    """What the stages share: the resolved inputs and each stage's output."""

    cfg: ExportConfig
    target: object
    model: object
    dataset: object
    pre: object
    calib: object
    work: Path
    x_test: object = None
    outputs: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    progress: bool = True
    converter_process: object = None  # convert_process.ConverterProcess started by export(), or None
    reuse: "Reuse | None" = None  # artifacts shared by the targets of one multi-target call
    reused: list = field(default_factory=list)  # the stages whose artifact came from an earlier target


# --------------------------------------------------------------------------- stages

def stage_export_onnx(run: Run):
    from .onnx_export import export_onnx
    import numpy as np
    dest = run.work / "model.onnx"
    if run.reuse is not None and (art := run.reuse.get("onnx", dest)) is not None:
        run.reused.append("export_onnx")
        return art
    # Checked on real inputs from both splits: 128 calibration (train) and 128 test images.
    sample = np.concatenate([run.calib.array()[:128], run.x_test[:128]])
    art = export_onnx(run.model, sample, dest)
    if run.reuse is not None:
        run.reuse.put("onnx", art)
    return art


def stage_convert(run: Run):
    from .convert import get_converter
    dest = run.work / f"model_{run.target.precision}.tflite"
    key = _conversion_key(run.cfg, run.target)
    if run.reuse is not None and (art := run.reuse.get(key, dest)) is not None:
        run.reused.append("convert")
        return art
    converter = run.converter_process or get_converter(run.cfg.converter)
    art = converter.convert(
        run.outputs["export_onnx"], run.calib.array(), run.pre,
        per_channel=run.target.per_channel_weights, out_path=dest, verbose=run.cfg.verbose,
        precision=run.target.precision)
    if run.reuse is not None:
        run.reuse.put(key, art)
    return art


def _conversion_key(cfg: ExportConfig, target) -> tuple:
    """What a conversion depends on besides the ONNX model and the representative dataset (the same for every
    target of one call): targets that agree on it share one .tflite."""
    return ("convert", cfg.converter, target.precision, target.per_channel_weights)


class Reuse:
    """The artifacts the exports of one multi-target call share: the ONNX model once, and one conversion per
    (precision, weight granularity). Each is kept in this call's own folder and copied into every export that
    uses it, so every export folder stays complete and self-contained."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.items: dict = {}
        self.used: dict = {}  # key -> how many exports took it from here

    def get(self, key, dest: Path):
        import dataclasses
        art = self.items.get(key)
        if art is None:
            return None
        shutil.copyfile(art.path, dest)
        self.used[key] = self.used.get(key, 0) + 1
        return dataclasses.replace(art, path=dest)

    def put(self, key, art) -> None:
        import dataclasses
        if Path(str(art.path) + ".data").exists():  # a model over 2 GB with external data: not copied around
            return
        keep = self.folder / f"{len(self.items)}-{art.path.name}"
        shutil.copyfile(art.path, keep)
        self.items[key] = dataclasses.replace(art, path=keep)


def stage_inspect(run: Run):
    from .errors import NotFullyInt8Error
    from .inspect_tflite import inspect
    from .precisions import get_precision
    precision = get_precision(run.target.precision)
    insp = inspect(run.outputs["convert"].path)
    if not insp.fully_int8 and not run.target.allow_float_fallback and precision.fully_int8_required:
        shown = "; ".join(insp.offending[:6]) + (f"; and {len(insp.offending) - 6} more" if len(insp.offending) > 6 else "")
        raise NotFullyInt8Error(f"the converted model is not fully int8: {shown}; TFLiteConverter left these ops in "
                                "float (a converter limitation, e.g. for ELU): replace them in the model (e.g. ELU -> "
                                "LeakyReLU or ReLU) or choose a target that allows float fallback")
    if not precision.fully_int8_required:
        from .errors import ConversionError
        chk = precision.checker(insp)
        if not chk.precision_ok and not run.target.allow_float_fallback:
            raise ConversionError(f"the converted model breaks the {run.target.name} precision contract: "
                                  f"{chk.reason}; replace these ops or choose another precision")
    return insp


def stage_run(run: Run):
    from . import models
    from .runtime import TfliteRunner
    tfl = run.outputs["convert"]
    runner = TfliteRunner(tfl.path, kernels=run.target.run_kernels, threads=run.target.threads,
                          batch_size=run.cfg.batch_size, input_layout=tfl.input_layout)
    with _progress(2 * len(run.x_test), f"run {run.target.precision} + FP32", run.progress) as bar:
        int8 = runner.run(run.x_test, progress=bar)
        t0 = time.perf_counter()
        fp32_model = run.model
        if run.cfg.fp32_runtime == "onnxruntime" and run.model.kind != "onnx":
            fp32_model = models.onnx_reference(run.outputs["export_onnx"].path)
        fp32 = models.run_fp32(fp32_model, run.x_test, batch_size=run.cfg.batch_size, progress=bar)
        fp32_s = time.perf_counter() - t0
    return RunOutputs(int8=int8, fp32=fp32, fp32_seconds=fp32_s, fp32_runtime=_fp32_runtime_label(run, fp32_model),
                      fp32_model=fp32_model)


def _fp32_runtime_label(run: Run, fp32_model) -> str:
    if fp32_model is run.model:
        return run.model.reference_runtime
    o = run.outputs["export_onnx"]
    return (f"onnxruntime on model.onnx (matches PyTorch within {o.max_abs_error:.2g} on {o.samples} real inputs, "
            f"tolerance {o.tolerance:.2g})")


def stage_compare(run: Run):
    from .metrics import compare
    r = run.outputs["run"]
    insp = run.outputs["inspect"]
    return compare(r.fp32, r.int8.outputs, run.dataset.y_test[: len(run.x_test)],
                   output_scale=insp.outputs[0].scale[0] if insp.outputs[0].scale else 0.0)


@dataclass(frozen=True)
class SanityCheck:
    """Is the FP32 reference itself sane (pipeline/sanity.py)? A broken FP32 model makes every int8 figure moot."""

    gate: dict  # fp32_above_chance
    probe: dict  # FP32 top-1 under the preprocessing in use and the usual alternatives
    weights_missing: bool  # a factory built without --weights: random initialisation

    def warnings(self) -> list[str]:
        from .sanity import suggestion
        out = []
        if self.weights_missing:
            out.append("the factory was built without --weights: its weights are a random initialisation")
        if self.gate["passed"] and self.probe.get("better"):
            out.append("another preprocessing is clearly better: " + suggestion(self.probe["better"]))
        return out


def stage_sanity(run: Run):
    """FP32 top-1 above chance (a gate) and the preprocessing probe, before the drop/agreement gates count."""
    from . import models, sanity
    cfg, n, r = run.cfg, len(run.x_test), run.outputs["run"]
    labels = run.dataset.y_test[:n]
    # the FP32 model of the run stage; its logits there are the probe's "in use" row
    probe = sanity.probe(lambda x: models.run_fp32(r.fp32_model, x, batch_size=cfg.batch_size), run.dataset.x_test[:n],
                         labels, run.pre, run.model.mean, run.model.std,
                         train_stats=sanity.train_statistics(run.dataset.x_train, run.pre.scale), in_use_logits=r.fp32)
    weights_missing = run.model.kind == "factory" and not cfg.weights
    gate = sanity.fp32_gate(run.outputs["compare"].fp32_top1, labels, probe, weights_missing)
    return SanityCheck(gate=gate, probe=probe, weights_missing=weights_missing)


def stage_micro(run: Run):
    """TFLite-Micro targets only: load, arena_bytes, flash_bytes, budgets, TFLM vs LiteRT (pipeline/micro.py)."""
    if not run.target.is_micro:
        return None
    from .micro import check
    tfl, r = run.outputs["convert"], run.outputs["run"]
    n = min(run.cfg.micro_limit, len(run.x_test))
    with _progress(n, "run TFLite-Micro", run.progress) as bar:
        return check(tfl.path, run.x_test[:n], tfl.input_layout, r.int8.raw_outputs[:n], run.target,
                     limit=n, progress=bar)


def stage_latency(run: Run):
    """LiteRT targets only: batch-1 host latency on the target's kernels and on the reference kernels."""
    if run.target.is_micro:
        return None
    from .runtime import measure_latency
    tfl = run.outputs["convert"]
    kernels = [run.target.kernels] + (["ref"] if run.target.kernels != "ref" else [])
    return {k: measure_latency(tfl.path, run.x_test[:1], k, run.target.threads, tfl.input_layout) for k in kernels}


STAGES: list[tuple[str, Callable[[Run], object]]] = [
    ("export_onnx", stage_export_onnx),
    ("convert", stage_convert),
    ("inspect", stage_inspect),
    ("run", stage_run),
    ("micro", stage_micro),  # TFLite-Micro targets only
    ("compare", stage_compare),
    ("sanity", stage_sanity),  # FP32 above chance; the preprocessing probe
    ("latency", stage_latency),  # LiteRT targets only
]


@dataclass(frozen=True)
class RunOutputs:
    int8: object  # runtime.RunResult
    fp32: object  # np.ndarray of FP32 logits
    fp32_seconds: float
    fp32_runtime: str = "pytorch"
    fp32_model: object = field(default=None, repr=False, compare=False)  # what ran the FP32 side (the sanity stage too)


# --------------------------------------------------------------------------- driver

def export(cfg: ExportConfig, log=print, reuse: Reuse | None = None) -> tuple[int, Path, "object"]:
    """Run the whole export. Returns (exit status, output folder, report). ``reuse``: see export_targets.

    ``--out`` is checked and locked before anything else (pipeline/outdir.py); the export is built in a staging
    folder beside it, whose ``tmp/`` is TMPDIR meanwhile, and moved in whole at the end, or not at all."""
    from . import quiet
    from .outdir import OutputFolder
    quiet.configure(cfg.verbose)
    t_start = time.perf_counter()
    out = _out_path(cfg)
    with OutputFolder.claim(out, cfg.overwrite) as folder, folder.temp_files_inside():
        import targets
        converted = reuse is not None and _conversion_key(cfg, targets.get_target(cfg.target)) in reuse.items
        # The worker inherits TMPDIR (the staging folder's tmp/); none is needed when the conversion is reused.
        converter_process = None if converted else _start_converter_process(cfg)
        try:
            run = _prepare(cfg, log, folder.work)
            run.converter_process, run.reuse = converter_process, reuse
            report = _run_and_write(run, folder, t_start, log)
            folder.publish()
        finally:
            if converter_process is not None:
                converter_process.close()
    return (0 if report.passed else 1), out, report


def _run_and_write(run: Run, folder, t_start: float, log):
    """The stages, then the files (into the staging folder; a full disk is one OutputError line)."""
    import numpy as np

    from .jsonio import sha256_file
    cfg = run.cfg
    setup_s = time.perf_counter() - t_start
    for i, (name, fn) in enumerate(STAGES, 1):
        t0 = time.perf_counter()
        with folder.writing(f"the {name} stage's files", only_full_disk=True):
            run.outputs[name] = fn(run)
        run.timings[name] = round(time.perf_counter() - t0, 3)
        shown = "skipped (not this target)" if run.outputs[name] is None else f"{run.timings[name]:6.2f}s"
        log(f"[{i}/{len(STAGES)}] {name:<12} {shown}", file=sys.stderr)
    report = _build_report(run, setup_s)
    from .report_figures import confusion_and_flip_examples  # report.html's confusion and flip thumbnails
    r, n = run.outputs["run"], len(run.x_test)
    report.sections["fp32_vs_int8"] = confusion_and_flip_examples(
        run.dataset.x_test[:n], run.dataset.y_test[:n], r.fp32, r.int8.outputs,
        class_names=run.dataset.class_names, raw_range=run.pre.raw_range)
    report.artifacts["report_html"] = {"path": "report.html"}
    with folder.writing("predictions.npz"):
        np.savez_compressed(run.work / "predictions.npz", **_prediction_arrays(run))
    report.artifacts["predictions"]["sha256"] = sha256_file(run.work / "predictions.npz")
    t0 = time.perf_counter()
    with folder.writing("the device bundle (bundle/, bundle.tar.gz)"):
        report.artifacts["bundle"] = _write_bundle(run, report)
    report.timings_s["bundle"] = round(time.perf_counter() - t0, 3)
    if cfg.reliability:
        t0 = time.perf_counter()
        _add_reliability(run, report)
        report.timings_s["reliability"] = round(time.perf_counter() - t0, 3)
        log(f"[+] reliability  {report.timings_s['reliability']:6.2f}s", file=sys.stderr)
    report.timings_s["total"] = round(time.perf_counter() - t_start, 3)
    with folder.writing("report.json"):
        report.write(run.work / "report.json")
    from .html_report import write as write_html
    with folder.writing("report.html"):
        write_html(report.to_dict(), run.work / "report.html")
    return report


def _start_converter_process(cfg: ExportConfig):
    """Start the conversion worker (its TensorFlow/onnx2tf imports overlap the setup and export_onnx), unless
    this process has TensorFlow loaded already (a library caller converting again: in-process is faster)."""
    from .convert import get_converter
    get_converter(cfg.converter)  # an unknown --converter fails before anything starts
    if "tensorflow" in sys.modules or os.environ.get("PIPELINE_CONVERT_IN_PROCESS") == "1":
        return None
    try:
        from .convert_process import ConverterProcess
        return ConverterProcess(cfg.converter, cfg.verbose)
    except OSError:  # no process could be started: convert in this process
        return None


def _prepare(cfg: ExportConfig, log, work: Path) -> Run:
    """Load and check the model, the data and the representative dataset; ``work``: where the files go (the
    claimed output folder's staging folder, removed by its owner on failure)."""
    import numpy as np
    import targets
    from calib_data import CalibContext, build
    from . import data as data_mod
    from . import models, preprocessing

    target = targets.get_target(cfg.target)
    if cfg.calib_size is not None and cfg.calib_size <= 0:
        raise UsageError(f"--calib-size {cfg.calib_size} gives an empty representative dataset; pass at least 1 "
                         "(100-500 recommended)")
    if cfg.batch_size <= 0:
        raise UsageError("--batch-size must be at least 1")
    model = models.load(cfg.model, cfg.weights)
    ds = data_mod.load(cfg.data, cfg.data_dir, cfg.input_shape or model.input_shape)
    if cfg.input_shape and model.input_shape and tuple(cfg.input_shape) != tuple(model.input_shape):
        raise UsageError(f"--input-shape {','.join(map(str, cfg.input_shape))} does not fit {model.spec}, which "
                         f"takes {','.join(map(str, model.input_shape))}; drop --input-shape or fix it")
    input_shape = tuple(cfg.input_shape or model.input_shape or ds.sample_shape)
    num_classes = models.probe(model, input_shape)
    if model.num_classes is None:
        model.num_classes = num_classes
    if model.extra.get("outputs_returned", 1) > 1:
        log(f"warning: {model.spec} returns {model.extra['outputs_returned']} outputs; the first is taken as the "
            "logits and only it is exported and compared (return one tensor to silence this)", file=sys.stderr)
    if cfg.class_names is not None:  # --class-names: over the data's own names
        ds = ds.with_class_names(cfg.class_names, "--class-names")
    data_mod.check_fits(ds, input_shape, num_classes)
    ds = data_mod.check_class_count(ds, num_classes)
    if cfg.reliability:  # the validation split and the corruption suite must fit the data: say so now
        from .corruptions import check_corruptible
        from .reliability import parse_corruptions, resolve_val_size
        resolve_val_size(cfg.val_size, len(ds.y_train))
        if parse_corruptions(cfg.corruptions):
            check_corruptible(input_shape)
    mean = preprocessing.per_channel(cfg.mean if cfg.mean is not None else model.mean, input_shape[0], 0.0, "mean")
    std = preprocessing.per_channel(cfg.std if cfg.std is not None else model.std, input_shape[0], 1.0, "std")
    if any(s <= 0 for s in std):
        raise UsageError("--std values must be positive")
    pre = preprocessing.Preprocessing(
        input_shape=input_shape, source_layout=ds.source_layout, source_dtype=ds.source_dtype,
        scale=ds.scale, mean=mean, std=std,
        raw_range=(0.0, 255.0) if ds.source_dtype == "uint8" else (float(ds.x_train.min()), float(ds.x_train.max())),
    )
    ctx = CalibContext(x_train=ds.x_train, y_train=ds.y_train, preprocessing=pre, dataset_name=ds.name,
                       cache_dir=Path(cfg.calib_cache).expanduser() if cfg.calib_cache else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calib = build(cfg.calib, ctx, cfg.calib_size, cfg.seed)
    for w in caught:
        log(f"warning: {w.message}", file=sys.stderr)
    if len(calib) < target.min_calibration_samples and not caught:
        log(f"warning: {len(calib)} calibration samples is below the target's minimum of "
            f"{target.min_calibration_samples}", file=sys.stderr)
    n_eval = len(ds.x_test) if cfg.eval_limit is None else min(cfg.eval_limit, len(ds.x_test))
    if n_eval <= 0:
        raise UsageError("--eval-limit must be at least 1")
    x_test = preprocessing.apply(ds.x_test[:n_eval], pre)
    run = Run(cfg=cfg, target=target, model=model, dataset=ds, pre=pre, calib=calib, work=work, x_test=x_test,
              progress=not cfg.verbose and sys.stderr.isatty())
    np.random.seed(cfg.seed)
    return run


def _default_out_name(model_spec: str, target: str, weights: str | None = None) -> str:
    """The folder an export writes when --out is not given, in the current folder: what the model is, then the
    target. zoo:NAME -> NAME (zoo:refcnn -> refcnn-tflite-int8); an ONNX or TorchScript file -> its stem;
    package.module:factory -> package-module-factory; --weights adds its stem (mymodels:factory --weights run3.pt
    -> mymodels-factory-run3-tflite-int8), so two factories named alike, or two weight files, do not collide."""
    if model_spec.startswith("zoo:"):
        parts = [model_spec[4:]]
    elif model_spec.lower().endswith((".onnx", ".pt", ".pth", ".ptl", ".torchscript")) or ":" not in model_spec:
        parts = [Path(model_spec).stem]
    else:
        module, _, attr = model_spec.rpartition(":")
        parts = [*module.split("."), attr]
    if weights:
        parts.append(Path(weights).stem)
    clean = ["".join(c if c.isalnum() or c in "-_." else "_" for c in part).strip(".") for part in parts]
    return "-".join([c for c in clean if c] or ["model"]) + f"-{target}"


def _out_path(cfg: ExportConfig) -> Path:
    import targets
    return Path(cfg.out) if cfg.out else Path(_default_out_name(cfg.model, targets.get_target(cfg.target).name,
                                                                  cfg.weights))


def _write_bundle(run: Run, report) -> dict:
    """After the stages: the device bundle (bundle/ and bundle.tar.gz) in the work folder."""
    from .bundle import write_bundle
    tfl = run.outputs["convert"]
    n = len(run.x_test)
    return write_bundle(run.work, tfl.path, tfl.input_layout, report.preprocessing, run.dataset.x_test[:n],
                        run.x_test, run.dataset.y_test[:n], model_spec=run.cfg.model,
                        target=run.target.name, class_names=run.dataset.class_names).describe()


def _add_reliability(run: Run, report) -> None:
    """After the stages (--reliability): the reliability sections and gates (pipeline/reliability.py)."""
    from .evaluate import held_out_from_training
    from .parallel_eval import ModelPair
    from .reliability import ReliabilityConfig, evaluate, parse_corruptions
    cfg, tfl, r = run.cfg, run.outputs["convert"], run.outputs["run"]
    pair = ModelPair(model_spec=cfg.model, weights=cfg.weights, tflite_path=str(Path(tfl.path).resolve()),
                     input_layout=tfl.input_layout, kernels=run.target.run_kernels, preprocessing=run.pre,
                     batch_size=cfg.batch_size,
                     fp32_onnx=str((run.work / "model.onnx").resolve())
                     if cfg.fp32_runtime == "onnxruntime" and run.model.kind != "onnx" else None)
    rcfg = ReliabilityConfig(corruptions=parse_corruptions(cfg.corruptions), severities=tuple(cfg.severities),
                             val_size=cfg.val_size, seed=cfg.seed, workers=cfg.workers,
                             max_ece_increase=cfg.max_ece_increase, max_worst_drop_pp=cfg.max_worst_drop_pp)
    res = evaluate(pair, run.dataset, len(run.x_test), rcfg, clean={"fp32": r.fp32, "int8": r.int8.outputs},
                   loaded_model=run.model, held_out_from_training=held_out_from_training(run.model),
                   clean_from_fp32_onnx=cfg.fp32_runtime == "onnxruntime",
                   runtime_note="clean-test logits from the run stage (the arrays in predictions.npz)",
                   progress=run.progress)
    report.sections.update(res.sections)
    report.gates.update(res.gates)
    report.passed = all(g["passed"] for g in report.gates.values())
    report.artifacts["report_html"] = {"path": "report.html"}


_REUSED = ("made once for an earlier target of the same multi-target call (same model, representative dataset, "
           "converter, precision and weight granularity) and copied here; its timings are that run's")


def _build_report(run: Run, setup_s: float):
    from .report import Report
    from .jsonio import sha256_file
    from .metrics import accuracy_gates
    from .precisions import get_precision
    o = run.outputs
    onnx_art, tfl, insp, r, cmp = o["export_onnx"], o["convert"], o["inspect"], o["run"], o["compare"]
    cfg = run.cfg
    precision = get_precision(run.target.precision)
    prec = precision.name
    chk = precision.checker(insp)
    sane = o["sanity"]
    gates = {
        "fp32_above_chance": sane.gate,  # first: when it fails, the gates after it compare two broken models
        "fully_int8": {"required": True, "value": insp.fully_int8, "passed": bool(insp.fully_int8)}
        if precision.fully_int8_required
        else {"required": False, "applies": False, "value": insp.fully_int8, "passed": True,
              "note": f"int8 targets only; this target is {prec} (see precision_ok)"},
        "precision_ok": {"required": True, "precision": prec, "value": chk.precision_ok, "passed": chk.precision_ok,
                         "rule": chk.rule, "reason": chk.reason},
        **accuracy_gates(cmp, cfg.max_drop_pp, cfg.min_agreement),
    }
    gates.update(_device_gates(run))
    n = len(run.x_test)
    q = insp.to_dict(with_tensors=True) | {"precision": chk.to_dict()}
    int8_run = r.int8.describe()
    tfl_sha256 = sha256_file(tfl.path)
    return Report(
        kind="export",
        target=run.target.to_dict(),
        model=run.model.describe() | {"weights_missing": sane.weights_missing},
        warnings=sane.warnings(),
        data={**run.dataset.describe(), "evaluated": n, "split": "test"},
        preprocessing={**run.pre.to_dict(), "tflite_input_layout": tfl.input_layout,
                       "formula": "x = (raw * scale - mean[c]) / std[c]; int8 = round(x / in_scale) + in_zero_point"},
        calibration=run.calib.describe(),
        onnx=onnx_art.describe() | ({"reused": _REUSED} if "export_onnx" in run.reused else {}),
        conversion=tfl.describe() | ({"reused": _REUSED} if "convert" in run.reused else {}),
        quantization=q,
        runtime={
            "int8": int8_run,
            "fp32": {"runtime": r.fp32_runtime, "images": n, "seconds": round(r.fp32_seconds, 4),
                     "images_per_s": round(n / r.fp32_seconds, 1) if r.fp32_seconds else None,
                     "measured_on": int8_run["measured_on"]},
            "note": "host measurements on this machine's CPU, not device latency",
            **_latency_section(run),
        },
        artifacts={  # sha256: pipeline.evaluate and the Pi script refuse a file that changed after the export
            "onnx": {"path": "model.onnx", "bytes": onnx_art.bytes, "sha256": sha256_file(onnx_art.path)},
            f"tflite_{prec}": {"path": tfl.path.name, "bytes": tfl.bytes, "sha256": tfl_sha256},
            "tflite": {"path": tfl.path.name, "bytes": tfl.bytes, "precision": prec, "sha256": tfl_sha256},
            "size_ratio_onnx_to_int8": round(onnx_art.bytes / tfl.bytes, 3) if tfl.bytes else None,
            "predictions": {"path": "predictions.npz", "arrays": list(_prediction_arrays(run, names_only=True))},
            "report": {"path": "report.json"},
        },
        accuracy=cmp.to_dict() | {"precision": prec, "tflite_top1": cmp.int8_top1,
                                  "evaluated_on": f"{run.dataset.name} test split, {n} images; {prec} TFLite on LiteRT "
                                                  f"{run.target.run_kernels} kernels with {run.target.threads} threads, "
                                                  f"FP32 on {r.fp32_runtime}"
                                                  + precision.int8_fields_note},
        timings_s={"setup": round(setup_s, 3), **run.timings, **{f"convert.{k}": v for k, v in tfl.timings_s.items()}},
        gates=gates,
        passed=all(g["passed"] for g in gates.values()),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()},
        sections={"device": _device_section(run), "preprocessing_probe": sane.probe},
    )


def _prediction_arrays(run: Run, names_only: bool = False) -> dict:
    """predictions.npz: int8 keeps int8_logits/int8_raw; other precisions name theirs (fp16_logits, ...)."""
    from .precisions import get_precision
    r, micro = run.outputs["run"], run.outputs.get("micro")
    p = get_precision(run.target.precision).name
    arrays = {"labels": lambda: run.dataset.y_test[: len(run.x_test)], "fp32_logits": lambda: r.fp32,
              f"{p}_logits": lambda: r.int8.outputs, f"{p}_raw": lambda: r.int8.raw_outputs}
    if micro is not None:
        arrays["tflm_raw"] = lambda: micro.raw_outputs  # TFLite-Micro on the first micro.images inputs
    return {k: (None if names_only else v()) for k, v in arrays.items()}


def _device_gates(run: Run) -> dict:
    micro = run.outputs.get("micro")
    if micro is None:
        return {}
    return {
        "arena_fits_ram": {"required": True, "value": micro.ram.required_bytes, "limit": micro.ram.budget_bytes,
                           "passed": micro.ram.fits, "reason": micro.ram.reason},
        "model_fits_flash": {"required": True, "value": micro.flash.required_bytes, "limit": micro.flash.budget_bytes,
                             "passed": micro.flash.fits, "reason": micro.flash.reason},
        # TFLite-Micro's kernels and LiteRT's implement the same int8 arithmetic (the TFLite int8 spec) but
        # may round differently by one step (optimized vs reference kernels, notes devices.md); a larger
        # difference in any output means the two runtimes disagree on the model.
        "tflm_matches_litert": {"required": True, "limit_steps": 1, "value": micro.max_diff_steps,
                                "top1_agreement": micro.agreement, "images": micro.images,
                                "passed": micro.max_diff_steps <= 1,
                                "reason": f"TFLite-Micro vs LiteRT {micro.litert_kernels} kernels on the first "
                                          f"{micro.images} test inputs: max difference {micro.max_diff_steps} output "
                                          f"step(s), top-1 agreement {micro.agreement:.2%}"},
    }


def _latency_section(run: Run) -> dict:
    lat = run.outputs.get("latency")
    if not lat:
        return {"latency": {"measured": False,
                            "reason": "host timings say nothing about a microcontroller; see target.published"}}
    return {"latency": {"measured": True, "batch_size": 1,
                        "note": "host measurements (this machine's CPU), never device latency",
                        "kernels": {k: v.describe() for k, v in lat.items()}}}


def _device_section(run: Run) -> dict:
    t, micro = run.target, run.outputs.get("micro")
    d = {"device": t.device, "clock_mhz": t.clock_mhz, "ram_bytes": t.ram_bytes, "flash_bytes": t.flash_bytes,
         "published": list(t.published), "references": list(t.references),
         "device_latency": "not estimated: no anchor in the notes scales to this model honestly; published "
                           "figures for reference models are in 'published'"}
    if micro is not None:
        d["tflite_micro"] = micro.describe()
    return d


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    from .cli import Parser, class_names, finite_float, floats, seed_int, shape
    p = Parser(prog="python -m pipeline.export",
               description="PyTorch -> ONNX -> fully-int8 TFLite, run on real TFLite kernels and checked "
                           "against the FP32 model.")
    g = p.add_argument_group("Inputs")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="zoo:NAME, path/to/model.onnx, path/to/model.pt (TorchScript) or package.module:factory "
                        f"(default {DEFAULT_MODEL})")
    g.add_argument("--weights", help="state_dict file for a factory model (loaded with weights_only=True)")
    g.add_argument("--input-shape", type=shape, help="C,H,W when the model does not say")
    g = p.add_argument_group("Data")
    g.add_argument("--data", default="fashion-mnist", help="fashion-mnist or path/to/data.npz")
    g.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                                      "(default /usr/share/datasets/fashion-mnist)")
    g.add_argument("--class-names", type=class_names, metavar="A,B,...",
                   help="one name per class, in index order, shown in the report and by the device bundle's Pi "
                        "script (default: the .npz's class_names array, the ten Fashion-MNIST names for "
                        "fashion-mnist, else class indices)")
    g.add_argument("--mean", type=floats, help="per-channel mean after scaling (default: the model's, else 0)")
    g.add_argument("--std", type=floats, help="per-channel std after scaling (default: the model's, else 1)")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N test images only (default: all)")
    g = p.add_argument_group("Target")
    g.add_argument("--target", default="tflite-int8", help="target profile (see --list-targets), or several separated "
                                                          "by commas: one export folder each under --out, converting "
                                                          "once per precision")
    g.add_argument("--list-targets", action="store_true", help="print the target registry and exit")
    g.add_argument("--converter", default="onnx2tf", help="conversion route (default onnx2tf)")
    g.add_argument("--micro-limit", type=int, default=1000,
                   help="TFLite-Micro targets: run the first N test inputs on TFLite-Micro (default 1000)")
    g = p.add_argument_group("Calibration")
    g.add_argument("--calib", default="balanced",
                   help="representative dataset source: balanced (default), real, first, fractal, "
                        "noise[:gaussian|uniform], shifted:CORRUPTION[:SEVERITY], folder:PATH, npz:PATH")
    g.add_argument("--calib-size", type=int, default=None,
                   help="number of calibration samples (default 500, or all a folder, npz or training split holds "
                        "when that is fewer; given explicitly, a source holding fewer is an error)")
    g.add_argument("--calib-cache", default=ExportConfig.calib_cache, metavar="DIR",
                   help="folder caching generated calibration sets, or 'off' (default %(default)s)")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the calibration draw and generated sets, and with --reliability of the validation "
                        "split and the corruptions (default 0)")
    g = p.add_argument_group("Verification")
    g.add_argument("--max-drop-pp", type=finite_float, default=1.0, help="gate: largest top-1 drop in points (default 1.0)")
    g.add_argument("--min-agreement", type=finite_float, default=0.98, help="gate: smallest top-1 agreement (default 0.98)")
    g.add_argument("--batch-size", type=int, default=256,
                   help="batch for interpreter and FP32 runs (default 256; a model with a fixed batch of 1 runs "
                        "one image at a time)")
    g.add_argument("--reliability", action="store_true",
                   help="also write the reliability report (calibration drift, temperature scaling, flips, "
                        "per-class, corruption suite) into report.json and report.html")
    from .evaluate import add_reliability_arguments
    add_reliability_arguments(p, in_export=True, adaptive_val_size=True)
    g = p.add_argument_group("Output")
    g.add_argument("--out", help="output folder (default MODEL-TARGET in the current folder, e.g. "
                                 "refcnn-tflite-int8, or mymodels-factory-run3-tflite-int8 for --model "
                                 "mymodels:factory --weights run3.pt): created when new, "
                                 "used when empty; any other folder is refused, except an earlier export "
                                 "with --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out as a whole (refused if it also holds files no "
                        "export writes)")
    g.add_argument("-v", "--verbose", action="store_true", help="show the tools' own output")
    return p


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    if not 0.0 <= args.min_agreement <= 1.0:
        raise UsageError(f"--min-agreement {args.min_agreement} is not a fraction; pass a value from 0 to 1 "
                         "(e.g. 0.98 for 98%)")
    if args.calib_size is not None and args.calib_size <= 0:
        raise UsageError(f"--calib-size {args.calib_size} gives an empty representative dataset; pass at least 1 "
                         "(100-500 recommended), or leave it out for 500")
    return ExportConfig(
        model=args.model, weights=args.weights, input_shape=args.input_shape, data=args.data,
        data_dir=args.data_dir, class_names=args.class_names, mean=args.mean, std=args.std, calib=args.calib, calib_size=args.calib_size,
        calib_cache=None if args.calib_cache in ("off", "") else args.calib_cache,
        seed=args.seed, target=args.target, out=args.out, overwrite=args.overwrite, max_drop_pp=args.max_drop_pp,
        min_agreement=args.min_agreement, converter=args.converter, batch_size=args.batch_size,
        eval_limit=args.eval_limit, micro_limit=args.micro_limit, verbose=args.verbose,
        **_reliability_args(args),
    )


def _reliability_args(args: argparse.Namespace) -> dict:
    from .reliability import parse_corruptions
    parse_corruptions(args.corruptions)  # a typo fails at once, before the conversion, --reliability or not
    # --fp32-runtime also picks the FP32 side of the run stage: it counts with or without --reliability
    out = {"fp32_runtime": args.fp32_runtime}
    if not args.reliability:
        return out
    if (args.val_size is not None and args.val_size <= 0) or args.workers < 0:
        raise UsageError("--val-size must be at least 1 and --workers at least 0")
    return {**out, "reliability": True, "corruptions": args.corruptions, "severities": tuple(args.severities),
            "val_size": args.val_size, "workers": args.workers, "max_ece_increase": args.max_ece_increase,
            "max_worst_drop_pp": args.max_worst_drop_pp}


def print_targets() -> None:
    import targets
    def size(b):
        if b is None:
            return "-"
        for unit, n in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if b >= n and b % n == 0:
                return f"{b // n} {unit}"
        return f"{b:,} B"

    rows = [("name", "precision", "I/O", "runtime", "kernels", "threads", "device", "clock", "RAM", "flash",
             "margin")]
    for name in targets.list_targets():
        t = targets.get_target(name)
        rows.append((t.name, t.precision, t.input_dtype, t.runtime, t.kernels, str(t.threads), t.device,
                     f"{t.clock_mhz} MHz" if t.clock_mhz else "-", size(t.ram_bytes), size(t.flash_bytes),
                     f"arena +{t.arena_margin:.0%}, flash +{t.flash_margin:.0%}" if t.is_micro else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\nRAM/flash: board budgets (checked with the margins on TFLite-Micro targets only); "
          "sources in each profile's references (report.json target.references)")


def summary(report, out: Path) -> str:
    a, art, q = report.accuracy, report.artifacts, report.quantization
    p = report.target["precision"]
    failed = [k for k, g in report.gates.items() if not g["passed"]]
    verdict = "PASS" if report.passed else "FAIL (" + ", ".join(failed) + ")"
    reasons = [f"           {k}: {report.gates[k]['reason']}" for k in failed if report.gates[k].get("reason")]
    from .precisions import get_precision
    return "\n".join([
        f"model      {report.model['spec']}  ->  target {report.target['name']}",
        f"{p:<10} {get_precision(p).contract_text(q)}"
        + f"  input {q['input_dtype']}  output {q['output_dtype']}  ops {sum(q['ops'].values())} ({', '.join(q['ops'])})",
        f"sizes      ONNX {art['onnx']['bytes'] / 1024:.1f} KiB  ->  {p} TFLite {art['tflite']['bytes'] / 1024:.1f} KiB "
        + (f"({art['size_ratio_onnx_to_int8']}x smaller)" if art['size_ratio_onnx_to_int8'] >= 1 else
           f"({1 / art['size_ratio_onnx_to_int8']:.2f}x larger)"),
        *(["convert    converted twice: the first model broke the batch axis (a computed pad or reshape), the "
           "second is from the constant-folded graph (report.json: conversion.constant_folded)"]
          if report.conversion.get("constant_folded") else []),
        f"accuracy   FP32 {a['fp32_top1'] * 100:.2f}%  {p} {a['int8_top1'] * 100:.2f}%  drop {a['drop_pp']:+.2f} pp  "
        f"agreement {a['agreement'] * 100:.2f}%  ({a['n']} test images)",
        _steps_line(a),
        _preprocessing_line(report),
        f"throughput {p} {report.runtime['int8']['images_per_s']:.0f} img/s on LiteRT {report.runtime['int8']['kernels']}, "
        f"{_threads(report.runtime['int8']['threads'])} (host)",
        *_device_lines(report),
        *[f"WARNING    {w}" for w in report.warnings],
        f"verdict    {verdict}  in {report.timings_s['total']:.1f}s",
        *reasons,
        *_reliability_lines(report),
        f"files      {out}/ (model.onnx, {art['tflite']['path']}, report.json, report.html, predictions.npz, bundle/, "
        "bundle.tar.gz)",
    ])


def _threads(n) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _steps_line(a: dict) -> str:
    """The output error in quantization steps: what a regression test's max_steps must allow."""
    if not a.get("output_scale"):
        return f"errors     max |quantized - FP32| {a['max_abs_error']:.4g} (float outputs: no quantization steps)"
    worst = a["max_error_steps"]
    return (f"errors     max |int8 - FP32| {worst:.1f} output steps (mean {a['mean_error_steps']:.2f}) on these "
            f"inputs: a regression test (pipeline.testing.assert_tflite_matches_torch) wants max_steps a little "
            f"above it, e.g. {max(2, math.ceil(worst * 1.5))}")


def _preprocessing_line(report) -> str:
    pre, q = report.preprocessing, report.quantization
    fmt = lambda v: ",".join(f"{x:.4g}" for x in v)  # noqa: E731
    scale = pre.get("scale")
    scale_s = "1/255" if scale and abs(scale - 1 / 255) < 1e-9 else f"{scale:.4g}"
    qi = (q.get("inputs") or [{}])[0].get("quantization", {})
    qin = (f", input scale {qi['scale'][0]:.4g} zero point {qi['zero_point'][0]}"
           if qi.get("scale") and qi.get("zero_point") else "")
    return (f"preproc    x = (raw * {scale_s} - mean) / std, mean {fmt(pre['mean'])} std {fmt(pre['std'])}; "
            f"{pre.get('source_layout')} data -> TFLite {pre.get('tflite_input_layout')} {q['input_dtype']}{qin}")


def _reliability_lines(report) -> list[str]:
    s = report.sections
    if "calibration_drift" not in s:
        return []
    cd, fl, sh = s["calibration_drift"], s["flips"], s["shifts"]
    lines = [f"reliability ECE {cd['fp32']['ece']:.4f} -> {cd['int8']['ece']:.4f}  flips {fl['count']}/{fl['n']}  "
             f"worst class {s['per_class']['worst_class'].get('label', s['per_class']['worst_class']['name'])} "
             f"{s['per_class']['worst_class']['drop_pp']:+.2f} pp"]
    if sh.get("records"):
        w = sh["worst_by_int8_drop"]
        lines.append(f"shifts     {sh['sets']} sets: mean drop {sh['mean']['drop_pp']:+.2f} pp, mean flip rate "
                     f"{1 - sh['mean']['agreement']:.2%}, worst {w['corruption']} s{w['severity']} {w['drop_pp']:+.2f} pp")
    return lines


def _device_lines(report) -> list[str]:
    lat = report.runtime.get("latency", {})
    lines = []
    if lat.get("measured"):
        ks = lat["kernels"]
        first = next(iter(ks.values()))
        lines.append("latency    " + "  ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in ks.items())
                     + f"  (median, batch 1, {_threads(first['threads'])}; host measurement, not device latency)")
    m = report.sections.get("device", {}).get("tflite_micro")
    if m:
        c = m["compared_with_litert"]
        lines.append(f"tflm       arena_bytes {m['arena_bytes']:,}  flash_bytes {m['flash_bytes']:,}  "
                     f"RAM {m['ram_check']['required_bytes']:,}/{m['ram_check']['budget_bytes']:,} B  "
                     f"flash {m['flash_check']['required_bytes']:,}/{m['flash_check']['budget_bytes']:,} B "
                     f"(margins: arena +{m['ram_check']['margin']:.0%}, flash +{m['flash_check']['margin']:.0%})")
        lines.append(f"tflm/LiteRT top-1 agreement {c['top1_agreement']:.2%}, max diff {c['max_diff_steps']} step(s) "
                     f"on the first {c['images']} test inputs (TFLite-Micro reference kernels on this host)")
    return lines


def export_targets(cfg: ExportConfig, names: list[str], log=print) -> tuple[int, Path, list[dict]]:
    """``--target a,b,c``: one export per target into ``OUT/<target>/``, sharing what they can (``Reuse``): the
    ONNX model is exported once and each (precision, weight granularity) converted once. Bad input stops the
    call (exit 2); a target whose model cannot meet its contract is reported and the others go on."""
    import dataclasses
    import tempfile

    import targets
    from .errors import ConversionError, ExportError
    names = [n for i, n in enumerate(names) if n and n not in names[:i]]
    if not names:
        raise UsageError("--target is empty; pass one or more target names separated by commas (see --list-targets)")
    for n in names:
        targets.get_target(n)  # an unknown name fails before anything runs, with a suggestion
    root = Path(cfg.out) if cfg.out else Path(_default_out_name(cfg.model, "targets", cfg.weights))
    rows, status = [], 0
    with tempfile.TemporaryDirectory(prefix="edge-int8-reuse-") as keep:
        reuse = Reuse(Path(keep))
        for i, name in enumerate(names, 1):
            log(f"== target {i}/{len(names)}: {name}", file=sys.stderr)
            sub = dataclasses.replace(cfg, target=name, out=str(root / name))
            try:
                st, out, report = export(sub, log, reuse)
                rows.append({"target": name, "status": st, "out": out, "report": report})
            except (ConversionError, ExportError) as e:  # this target's contract; the others may still meet theirs
                st = e.exit_status
                rows.append({"target": name, "status": st, "out": root / name, "error": str(e)})
            status = max(status, st)
    return status, root, rows


def targets_table(rows: list[dict], root: Path) -> str:
    """The one summary of a multi-target export: a row per target."""
    from .precisions import get_precision
    head = ("target", "precision", "contract", "FP32", "quantized", "drop pp", "agreement", "TFLite KiB",
            "converted", "verdict")
    table, notes = [head], []
    for r in rows:
        rep = r.get("report")
        if rep is None:
            table.append((r["target"], "-", "-", "-", "-", "-", "-", "-", "-", "FAIL (error)"))
            notes.append(f"{r['target']}: {r['error']}")
            continue
        a, q, p = rep.accuracy, rep.quantization, rep.target["precision"]
        contract = get_precision(p).contract_text(q)
        failed = [k for k, g in rep.gates.items() if not g["passed"]]
        table.append((r["target"], p, contract, f"{a['fp32_top1']:.2%}", f"{a['int8_top1']:.2%}",
                      f"{a['drop_pp']:+.2f}", f"{a['agreement']:.2%}", f"{rep.artifacts['tflite']['bytes'] / 1024:.1f}",
                      "reused" if rep.conversion.get("reused") else "here",
                      "PASS" if rep.passed else "FAIL (" + ", ".join(failed) + ")"))
        notes += [f"{r['target']}: {k}: {rep.gates[k]['reason']}" for k in failed if rep.gates[k].get("reason")]
        notes += [f"{r['target']}: WARNING {w}" for w in rep.warnings]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines + notes + [f"files      {root}/<target>/ (one export folder per target, each with its "
                                      "report.json)"])


def main(argv: list[str] | None = None) -> int:
    from .cli import run_main

    def work():
        args = build_parser().parse_args(argv)
        if args.list_targets:
            print_targets()
            return None
        cfg = config_from_args(args)
        names = [t.strip() for t in cfg.target.split(",")]
        if len(names) > 1:
            return names, export_targets(cfg, names)
        return names, export(cfg)

    def show(result) -> int:
        if result is None:  # --list-targets
            return 0
        from .outdir import shown
        names, (status, where, done) = result
        if len(names) > 1:
            text = targets_table(done, Path(shown(where)))
        else:
            text = summary(done, Path(shown(where)))  # an --out with bytes that are not UTF-8: shown escaped (out\xff)
        enc = getattr(sys.stdout, "encoding", None) or "utf-8"
        print(text.encode(enc, "backslashreplace").decode(enc, "replace"))
        return status

    return run_main(work, interrupted_note="; nothing was written to the output folder", then=show)


if __name__ == "__main__":
    raise SystemExit(main())
