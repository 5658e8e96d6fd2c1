"""``python -m pipeline.export --target tflite-int8``: PyTorch -> ONNX -> fully-int8 TFLite, verified.

The whole export is :func:`line`: a literal list of steps (``STEPS``), each a stage of ``pipeline/stages/``
with typed inputs and a frozen artifact out, each timed into ``report.json`` ``timings_s``. This module keeps
that line, the configuration and the command line.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.calib_data import DEFAULT_CACHE_DIR
from pipeline.errors import UsageError
from pipeline.reliability.suite import ReliabilityConfig

if TYPE_CHECKING:
    from pipeline.targets.user import UserBudget

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
    calib_cache: str | None = DEFAULT_CACHE_DIR  # generated calibration sets; None: no cache
    seed: int = 0
    target: str = "tflite-int8"
    # --ram/--flash over a TFLite-Micro target, or --target-file (a board file): pipeline/targets/user.py
    user_budget: UserBudget | None = None
    # --emulate DEVICE (Arm LiteRT targets): the bundle checked on an emulated Arm CPU (pipeline/stages/emulate.py)
    emulate: str | None = None
    emulate_cache: str = "~/.cache/edge-int8-pipeline/emulate"
    per_tensor: bool = False  # --per-tensor: one weight scale per tensor instead of per output channel
    debug_layers: bool = False  # --debug-layers: the layer-wise error always (else only when an accuracy gate fails)
    recover: str = "none"  # --recover: none, auto or tools (pipeline/stages/recover.py)
    out: str | None = None
    overwrite: bool = False  # replace an earlier export in --out as a whole (pipeline/outdir.py)
    max_drop_pp: float = 1.0
    min_agreement: float = 0.98
    converter: str = "auto"  # a route of pipeline.conversion.onnx2tf_tflite.routes(), or auto: the first that passes (stages/convert.py)
    # "worker": convert in a process started with the export (its imports overlap the first stages; a crash of
    # the converter is an error line, not a dead export); "process": in this process (tests that patch it)
    convert_in: str = "worker"
    batch_size: int = 256
    eval_limit: int | None = None
    micro_limit: int = 1000  # TFLite-Micro targets: run the first N test inputs on the (batch-1, slow) interpreter
    verbose: bool = False
    # --reliability: calibration drift, temperature scaling, flips, per-class, the corruption suite and two more
    # gates (stages/reliability.py); None: not asked for
    reliability: ReliabilityConfig | None = None
    # FP32 side of the run stage and of --reliability: "onnxruntime" runs the exported model.onnx (checked against
    # PyTorch in export_onnx on 256 real inputs); "reference" runs the model's own runtime (PyTorch).
    fp32_runtime: str = "onnxruntime"
    # The folder the export ran in, recorded so a reader can tell what relative --model/--weights/--data paths
    # meant. pipeline.evaluate never follows it (a received report is data: see README "Bad input").
    cwd: str = field(default_factory=lambda: str(Path.cwd()))

    def to_dict(self) -> dict:
        return asdict(self)


def export_target(cfg: ExportConfig):
    """The target this export builds for: the registry's (or the user's board), with ``--per-tensor`` applied."""
    import dataclasses

    from pipeline import targets
    t = targets.get_target(cfg.target, cfg.user_budget)
    return dataclasses.replace(t, per_channel_weights=False) if cfg.per_tensor else t


def out_path(cfg: ExportConfig, target) -> Path:
    """``--out``, or the default folder: MODEL-TARGET, with ``-per-tensor`` after it with --per-tensor."""
    from pipeline.outdir import default_out_name
    if cfg.out:
        return Path(cfg.out)
    return Path(default_out_name(cfg.model, target.name + ("-per-tensor" if cfg.per_tensor else ""), cfg.weights))


STEPS = ("prepare", "export_onnx", "convert", "inspect", "run", "micro", "compare", "debug_layers", "recover", "sanity",
         "latency", "report",
         "bundle", "firmware", "emulate", "reliability", "write")


def line(cfg: ExportConfig, folder, log=print, reuse=None, worker=None):
    """The export, step by step, into ``folder`` (an outdir.OutputFolder's staging area). Returns the Report."""
    from pipeline.stages import (bundle, compare, convert, debug_layers, emulate, export_onnx, firmware, inspect, latency,
                                 micro, prepare, recover, reliability, report, run, sanity, write)
    from pipeline.stages.runner import Steps
    t_start, work, fp32_onnx = time.perf_counter(), folder.work, cfg.fp32_runtime == "onnxruntime"
    step = Steps(STEPS, log, folder.writing)
    inp = step("prepare", prepare.prepare, cfg, log)
    if (bs := run_batch(cfg.batch_size, inp.x_test.shape[1:])) != cfg.batch_size:  # large inputs: smaller batches
        cfg = replace(cfg, batch_size=bs)
    t, precision = inp.target, inp.target.precision
    onnx = step("export_onnx", export_onnx.export_onnx, inp.model, inp.calib.array(), inp.x_test, work, reuse)
    # The FP32 reference needs no TFLite file: while the conversion runs in its worker process, this process
    # computes it (not when converting in this process: they would only compete).
    fp32_ready = (run.Fp32Reference(onnx, inp.model, inp.x_test, batch_size=cfg.batch_size,
                                    fp32_runtime=cfg.fp32_runtime)
                  if cfg.convert_in != "process" and not _conversion_reused(cfg, t, reuse) else None)
    try:
        tfl = step("convert", convert.convert, onnx, inp.calib.array(), inp.pre, t, converter=cfg.converter,
                   source=convert.torch_source(inp.model, cfg.model, cfg.weights),
                   check=convert.check_sample(inp.model, onnx, inp.x_test, t, cfg), worker=worker,
                   in_process=cfg.convert_in == "process", work=work, reuse=reuse, verbose=cfg.verbose)
        insp = step("inspect", inspect.inspect, tfl.path, t, tfl.converter)
        ran = step("run", run.run, tfl, onnx, inp.model, inp.x_test, t, batch_size=cfg.batch_size,
                   fp32_runtime=cfg.fp32_runtime, progress=inp.progress, fp32_ready=fp32_ready)
    except BaseException:  # the FP32 thread must not be inside onnxruntime/PyTorch when the process exits
        if fp32_ready is not None:
            fp32_ready.cancel()
        raise
    mic = step("micro", micro.micro, tfl, inp.x_test, ran.tflite.raw_outputs, t, limit=cfg.micro_limit,
               progress=inp.progress)
    cmp = step("compare", compare.compare, ran, insp, inp.labels)
    source = convert.torch_source(inp.model, cfg.model, cfg.weights)
    why = debug_layers.needed(cfg.debug_layers, cmp, cfg.max_drop_pp, cfg.min_agreement)
    layers = (step("debug_layers", _soft, debug_layers.debug_layers, why, onnx, tfl, inp.calib.array(), inp.pre,
                   inp.x_test, source=source, in_process=cfg.convert_in == "process", verbose=cfg.verbose)
              if why else step.skip("debug_layers", "the accuracy gates pass; --debug-layers asks for it"))
    first_cmp, rec = cmp, None
    if cfg.recover != recover.NONE and recover.failing(cmp, cfg.max_drop_pp, cfg.min_agreement):
        rec = step("recover", recover.recover, cfg.recover, cmp, onnx, tfl, ran, inp, t, work=work,
                   max_drop_pp=cfg.max_drop_pp, min_agreement=cfg.min_agreement, per_tensor_asked=cfg.per_tensor,
                   in_process=cfg.convert_in == "process", verbose=cfg.verbose, batch_size=cfg.batch_size, log=log,
                   layers=layers if isinstance(layers, dict) else None)
        if rec.kept:
            tfl, insp, ran, cmp = rec.tflite, rec.insp, rec.ran, rec.cmp
    else:
        step.skip("recover", "--recover none" if cfg.recover == recover.NONE else "the accuracy gates pass")
    sane = step("sanity", sanity.sanity, inp, ran, cmp, batch_size=cfg.batch_size, weights_given=bool(cfg.weights))
    lat = step("latency", latency.latency, tfl, inp.x_test, t)
    rep = step("report", report.build, cfg, inp, onnx, tfl, insp, ran, mic, cmp, sane, lat, step.timings,
               setup_s=step.timings["prepare"])
    debug_layers.attach(rep, layers, recovered=bool(rec and rec.kept))
    recover.attach(rep, rec, first_cmp)
    rep.artifacts["bundle"] = step("bundle", bundle.bundle, work, tfl, rep.preprocessing, inp,
                                   model_spec=cfg.model).describe()
    fw = step("firmware", firmware.firmware, work, tfl, insp, mic, rep.preprocessing, inp, model_spec=cfg.model)
    firmware.attach(rep, fw)
    emu = (step("emulate", emulate.emulate, cfg.emulate, work / "bundle", t, cache_dir=cfg.emulate_cache, log=log)
           if cfg.emulate is not None else step.skip("emulate", "no --emulate"))
    emulate.attach(rep, emu)
    rel = (step("reliability", reliability.reliability, cfg.reliability, inp, tfl, ran, model_spec=cfg.model,
                weights=cfg.weights, batch_size=cfg.batch_size, fp32_onnx=work / "model.onnx"
                if fp32_onnx and inp.model.kind != "onnx" else None, progress=inp.progress)
           if cfg.reliability is not None else step.skip("reliability", "no --reliability"))
    reliability.attach(rep, rel)
    rep.timings_s.update(step.timings, total=round(time.perf_counter() - t_start, 3))
    step("write", write.write, work, rep, write.prediction_arrays(inp, ran, mic, precision), folder.writing)
    return rep


BATCH_INPUT_BYTES = 1 << 25  # a batch of the interpreter and FP32 runs holds about this much float32 input


def run_batch(batch_size: int, input_shape) -> int:
    """--batch-size, or fewer images where they would hold more than BATCH_INPUT_BYTES of float32 input: 256
    images of 3x224x224 made batches of 154 MB whose activations (FP32 on onnxruntime, int8 on LiteRT) took the
    export of resnet18 to 4.8 GB (55 images here)."""
    per_image = 4 * max(math.prod(int(d) for d in input_shape), 1)
    return int(max(1, min(batch_size, BATCH_INPUT_BYTES // per_image)))


def _conversion_reused(cfg: ExportConfig, target, reuse) -> bool:
    from pipeline.stages.reuse import conversion_key
    return reuse is not None and conversion_key(cfg.converter, target) in reuse.items


def _soft(fn, *args, **kwargs):
    """The layer-wise debugger never fails an export (it runs by itself on a failing one, whose report matters
    more): any failure of it is the section's ``error``, one line."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a diagnosis that fails must not take the report with it
        text = str(e).splitlines()[0][:300] if str(e).strip() else ""
        return {"error": f"{type(e).__name__}: {text}" if text else type(e).__name__, "ran_because": args[0]}


def export(cfg: ExportConfig, log=print, reuse=None) -> tuple[int, Path, object]:
    """Run the whole export. Returns (exit status, output folder, Report). ``reuse``: see multi_target.

    ``--out`` is checked and locked before anything else (pipeline/outdir.py); the export is built in a staging
    folder beside it, whose ``tmp/`` is TMPDIR meanwhile, and moved in whole at the end, or not at all."""
    from pipeline import quiet
    from pipeline.outdir import OutputFolder
    quiet.configure(cfg.verbose)
    target = export_target(cfg)
    out = out_path(cfg, target)
    with OutputFolder.claim(out, cfg.overwrite) as folder, folder.temp_files_inside():
        converted = _conversion_reused(cfg, target, reuse)
        # The worker inherits TMPDIR (the staging folder's tmp/); none is needed when the conversion is reused.
        worker = None if converted else _start_worker(cfg)
        try:
            report = line(cfg, folder, log, reuse, worker)
            folder.publish()
        finally:
            if worker is not None:
                worker.close()
    return (0 if report.passed else 1), out, report


def _start_worker(cfg: ExportConfig):
    """The conversion workers (cfg.convert_in == "worker", conversion.early_routes): their imports overlap the first
    stages; the second, started only for auto behind a light first route, is niced. None: convert in this process."""
    from pipeline.conversion import early_routes, get_converter
    names = early_routes(cfg.converter)
    get_converter(names[0])  # an unknown --converter fails before anything starts
    if cfg.convert_in != "worker":
        return None
    from pipeline.conversion.worker import ConverterProcess, EarlyWorkers
    procs = []
    try:
        for i, name in enumerate(names):
            procs.append(ConverterProcess(name, cfg.verbose, low_priority=i > 0))
    except OSError:  # no process could be started: convert in this process (or in the ones that started)
        if not procs:
            return None
    return EarlyWorkers(procs)


# --------------------------------------------------------------------------- CLI

def _recover_mode(text: str) -> str:
    from pipeline.stages.recover import parse
    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import Parser, class_names, emulated_device, finite_float, floats, seed_int, shape
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
    g.add_argument("--target", help="target profile (see --list-targets; default tflite-int8), or several separated by "
                                    "commas: one export folder each under --out, converting once per precision")
    g.add_argument("--ram", metavar="SIZE", help="TFLite-Micro targets: the RAM budget of your board instead of the "
                                                 "profile's, e.g. 256KiB, 1MB or bytes (checked with the margin)")
    g.add_argument("--flash", metavar="SIZE", help="TFLite-Micro targets: the flash budget of your board, e.g. 1MiB")
    g.add_argument("--target-file", metavar="BOARD.toml",
                   help="your own microcontroller board (TOML, or JSON for a .json name): name, core, ram, flash, "
                        "clock_mhz, arena_margin, flash_margin, kernels (README 'Your own board')")
    g.add_argument("--emulate", metavar="DEVICE", type=emulated_device,
                   help="also run the device bundle's check on an emulated Arm CPU with the device's own aarch64 "
                        "wheels (rpi4, rpi5, android-arm64; Arm LiteRT targets only; builds an aarch64 root once, "
                        "with network): a gate, outputs only, no timings (README 'Check on an emulated Raspberry Pi')")
    g.add_argument("--emulate-cache", metavar="DIR", default=ExportConfig.emulate_cache,
                   help="where --emulate keeps the aarch64 root (default %(default)s)")
    g.add_argument("--per-tensor", action="store_true",
                   help="one weight scale per tensor instead of one per output channel (what many NPUs and some MCU "
                        "kernels want; depthwise convolutions usually lose accuracy: README 'When int8 hurts')")
    g.add_argument("--debug-layers", action="store_true",
                   help="compare every layer of the int8 model with the float reference (SQNR, error in steps, "
                        "clipping, error growth; named by ONNX node); runs by itself when an accuracy gate fails")
    g.add_argument("--recover", default="none", type=_recover_mode, metavar="auto|none|TOOLS",
                   help="when an accuracy gate fails, repair the FP32 graph and convert again: auto tries cle, "
                        "bias_correction, clip_percentile (cumulatively), then on a target that allows float ops "
                        "float_fallback (the 1, 2, 4, ... layers the debugger blames, kept in float) until the gates "
                        "pass; or name tools (default: none, README 'When int8 hurts')")
    g.add_argument("--list-targets", action="store_true", help="print the target registry and exit")
    from pipeline.conversion import AUTO, routes
    g.add_argument("--converter", default=AUTO, choices=(AUTO, *routes()),
                   help="conversion route: auto (default) tries " + ", ".join(routes()) + " in that order and "
                        "keeps the first whose model meets the target's contract and agrees with FP32 on a check "
                        "sample; a name forces that route")
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
                   help="batch for interpreter and FP32 runs (default 256; at most about 32 MiB of float32 "
                        "input per batch, so fewer images for large inputs: 55 at 3x224x224; a model with a fixed "
                        "batch of 1 runs one image at a time)")
    g.add_argument("--reliability", action="store_true",
                   help="also write the reliability report (calibration drift, temperature scaling, flips, "
                        "per-class, corruption suite) into report.json and report.html")
    from pipeline.evaluate import add_reliability_arguments
    add_reliability_arguments(p, in_export=True)
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
    from pipeline.reliability.suite import parse_corruptions
    if not 0.0 <= args.min_agreement <= 1.0:
        raise UsageError(f"--min-agreement {args.min_agreement} is not a fraction; pass a value from 0 to 1 "
                         "(e.g. 0.98 for 98%)")
    if args.calib_size is not None and args.calib_size <= 0:
        raise UsageError(f"--calib-size {args.calib_size} gives an empty representative dataset; pass at least 1 "
                         "(100-500 recommended), or leave it out for 500")
    corruptions = parse_corruptions(args.corruptions)  # a typo fails at once, --reliability or not
    from pipeline.targets.user import from_flags
    target, user_budget = from_flags(args.target, args.ram, args.flash, args.target_file, ExportConfig.target)
    if args.emulate is not None:
        from pipeline.stages.emulate import check_target
        for name in target.split(","):
            if name.strip():
                check_target(args.emulate, name.strip())
    if args.ray is not None and not args.reliability:
        raise UsageError("--ray runs the reliability jobs on Ray; add --reliability, or drop --ray (to run a study's "
                         "exports on Ray, use python -m pipeline.study precision --ray)")
    rel = None
    if args.reliability:
        if (args.val_size is not None and args.val_size <= 0) or args.workers < 0:
            raise UsageError("--val-size must be at least 1 and --workers at least 0")
        rel = ReliabilityConfig(corruptions=corruptions, severities=tuple(args.severities), val_size=args.val_size,
                                seed=args.seed, workers=args.workers, ray=args.ray,
                                max_ece_increase=args.max_ece_increase,
                                max_worst_drop_pp=args.max_worst_drop_pp)
    return ExportConfig(
        model=args.model, weights=args.weights, input_shape=args.input_shape, data=args.data,
        data_dir=args.data_dir, class_names=args.class_names, mean=args.mean, std=args.std, calib=args.calib,
        calib_size=args.calib_size, calib_cache=None if args.calib_cache in ("off", "") else args.calib_cache,
        seed=args.seed, target=target, user_budget=user_budget, emulate=args.emulate,
        emulate_cache=args.emulate_cache, per_tensor=args.per_tensor, debug_layers=args.debug_layers,
        recover=args.recover, out=args.out, overwrite=args.overwrite,
        max_drop_pp=args.max_drop_pp, min_agreement=args.min_agreement, converter=args.converter,
        batch_size=args.batch_size, eval_limit=args.eval_limit, micro_limit=args.micro_limit, verbose=args.verbose, reliability=rel,
        # --fp32-runtime also picks the FP32 side of the run stage: it counts with or without --reliability
        fp32_runtime=args.fp32_runtime)


def export_targets(cfg: ExportConfig, names: list[str], log=print) -> tuple[int, Path, list[dict]]:
    """``--target a,b,c``: one export per target into ``OUT/<target>/``, sharing what they can (``Reuse``): the
    ONNX model is exported once and each (precision, weight granularity) converted once. Bad input stops the
    call (exit 2); a target whose model cannot meet its contract is reported and the others go on."""
    import dataclasses
    import tempfile

    from pipeline import targets
    from pipeline.errors import ConversionError, ExportError
    from pipeline.outdir import default_out_name
    from pipeline.stages.reuse import Reuse
    names = [n for i, n in enumerate(names) if n and n not in names[:i]]
    if not names:
        raise UsageError("--target is empty; pass one or more target names separated by commas (see --list-targets)")
    for n in names:
        targets.get_target(n)  # an unknown name fails before anything runs, with a suggestion
    root = Path(cfg.out) if cfg.out else Path(default_out_name(cfg.model, "targets", cfg.weights))
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



def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import run_main

    def work():
        args = build_parser().parse_args(argv)
        if args.list_targets:
            from pipeline.report.summary import print_targets
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
        from pipeline.outdir import shown
        from pipeline.report.summary import summary, targets_table
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
    from pipeline.cli import exit_program
    exit_program(main())
