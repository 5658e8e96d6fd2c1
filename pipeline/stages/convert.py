"""Stage ``convert``: ONNX (or the PyTorch model) -> TFLite at the target's precision, calibrated on the
representative dataset, by one conversion route (:func:`pipeline.conversion.onnx2tf_tflite.routes`) or by ``auto``.

``--converter auto`` (the default) tries the routes in the registry's order and keeps the first whose model
1. converts (in its own worker process: a route that aborts or segfaults is one line naming the signal),
2. meets the target's precision contract (the inspect stage's rule: fully int8 for int8 targets), and
3. passes a quick check against FP32: on the first ``CHECK_IMAGES`` test inputs, run on LiteRT in the worker
   with the target's kernels and batch, top-1 agreement with the FP32 model of at least ``CHECK_AGREEMENT``
   (a route marked ``strict_check``, the direct writer, at least the export's ``--min-agreement``: below it the
   next routes are tried, and it is kept after all when none comes closer).
The report's ``conversion.routes_tried`` lists every route tried and why each failed (one line each).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipeline.conversion import AUTO, FALLBACK_ROUTE, TfliteArtifact, routes
from pipeline.errors import ConversionError, PipelineError
from pipeline.conversion.onnx_export import OnnxArtifact
from pipeline.inputs.preprocessing import Preprocessing
from pipeline.stages.reuse import Reuse, conversion_key

CHECK_IMAGES = 256
CHECK_AGREEMENT = 0.90  # a sanity bound for choosing a route; the export's own gates (default 98%) judge it after


@dataclasses.dataclass(frozen=True)
class Check:
    """What the quick check of ``auto`` runs: test inputs, their FP32 outputs, the target's kernels and batch."""

    inputs: np.ndarray
    fp32: np.ndarray
    kernels: str
    batch: int
    min_agreement: float = CHECK_AGREEMENT  # the export's --min-agreement gate (a route with strict_check needs it)


def convert(onnx: OnnxArtifact, representative: np.ndarray, pre: Preprocessing, target, *, converter: str,
            source: tuple | None, check: Check | None, worker=None, in_process: bool = False, work: Path,
            reuse: Reuse | None, verbose: bool = False) -> TfliteArtifact:
    """``source``: (model spec, weights, parameters) from :func:`torch_source`, for routes that convert the PyTorch
    model;
    ``worker``: the EarlyWorkers (or one ConverterProcess) the export started before anything else (their imports
    overlap the stages before), or None; ``in_process``: convert in this process instead of a worker per route."""
    dest = work / f"model_{target.precision}.tflite"
    key = conversion_key(converter, target)
    if reuse is not None and (art := reuse.get(key, dest)) is not None:
        return art
    kwargs = dict(per_channel=target.per_channel_weights, out_path=dest, verbose=verbose, precision=target.precision)
    if target.allow_float_fallback:  # int8 with float fallback (onnx2tf route; the others make fully-int8 models)
        kwargs["float_fallback"] = True
    args = (onnx, representative, pre, source, worker, in_process, kwargs)
    if converter != AUTO:  # the route the user named: its check run is not judged, only run where a crash is
        art = _route(converter, *args, check=check)[0]  # contained (a model LiteRT aborts on fails in the worker)
    else:
        art = _auto(target, check, args)
    art = with_record(art, pre)
    if reuse is not None:
        reuse.put(key, art)
    return art


def _route(name, onnx, representative, pre, source, worker, in_process, kwargs, *, check: Check | None):
    """(TfliteArtifact, outputs on the check inputs or None) from one route: in the early worker when it runs
    this route, in this process when asked, else in a worker process of its own."""
    from pipeline.conversion import get_converter
    from pipeline.conversion.worker import ConverterProcess, check_run, torch_module
    run = (check.inputs, check.kernels, check.batch) if check is not None else None
    early = worker.get(name) if worker is not None else None
    if early is not None:
        return early.convert_checked(onnx, representative, pre, source=source, check=run, **kwargs)
    if not in_process:
        proc = ConverterProcess(name, kwargs["verbose"])
        try:
            return proc.convert_checked(onnx, representative, pre, source=source, check=run, **kwargs)
        finally:
            proc.close()
    route = get_converter(name)
    art = (route.convert_torch(torch_module(name, source), representative, pre, **kwargs)
           if getattr(route, "needs", "onnx") == "torch" else route.convert(onnx, representative, pre, **kwargs))
    return art, (check_run(art, run) if run is not None else None)


def _auto(target, check: Check | None, args) -> TfliteArtifact:
    """The first route that converts, meets the precision contract and passes the quick check. When every route
    that converted failed only the check, the one closest to FP32 is kept anyway (its file set aside meanwhile, as
    the routes write the same path): the export then reports that model with failing accuracy gates, the layer-wise
    errors and any recovery (README 'When int8 hurts'), instead of stopping with no report."""
    import shutil
    import tempfile

    from pipeline.stages.inspect import inspect
    worker = args[4]
    tried: list[dict] = []
    below: list[tuple[float, int, TfliteArtifact, Path]] = []  # (agreement, order, artifact, its file set aside)
    with tempfile.TemporaryDirectory(prefix="edge-int8-routes-") as aside:
        for i, name in enumerate(routes()):
            try:
                art, out = _route(name, *args, check=check)
                inspect(art.path, target, art.converter)  # the precision contract, as the inspect stage holds it
                agreement = None
                if check is not None:
                    agreement = float(np.mean(out.argmax(1) == check.fp32.argmax(1)))
                    # this project's own writer (direct) is kept at once only when it meets the export's gate:
                    # below it, the other routes get their chance and the closest to FP32 is kept
                    strict = getattr(routes()[name], "strict_check", False)
                    bar = max(CHECK_AGREEMENT, check.min_agreement) if strict else CHECK_AGREEMENT
                    if not np.isfinite(out).all() or agreement < bar:
                        if np.isfinite(out).all():
                            keep = Path(aside) / f"{i}-{art.path.name}"
                            shutil.copy2(art.path, keep)
                            below.append((agreement, -i, art, keep))
                        raise ConversionError(f"top-1 agreement with FP32 {agreement:.1%} on {len(out)} test inputs "
                                              f"(LiteRT {check.kernels}), below the {bar:.0%} "
                                              + ("this route must reach to be kept at once (the export's agreement "
                                                 "gate)" if strict else "a route must reach to be kept"))
            except PipelineError as e:
                tried.append({"route": name, "kept": False, "reason": str(e)})
                continue
            if worker is not None:  # the other early workers' routes are not needed: stop their imports
                worker.close(keep=name)
            passed = "converted, met the precision contract" + (
                f", top-1 agreement {agreement:.2%} with FP32 on {len(check.inputs)} test inputs"
                if check is not None else "")
            closer = [b for b in below if agreement is not None and b[0] > agreement]
            if closer:  # a strict route set aside below its bar is still closer to FP32 than this one: that one
                best, neg_i, art_b, keep = max(closer, key=lambda b: (b[0], b[1]))
                shutil.copy2(keep, art_b.path)
                tried.append({"route": name, "kept": False, "reason": passed + f"; not kept: route "
                              f"{tried[-neg_i]['route']} came closer ({best:.2%})"})
                tried[-neg_i] = {**tried[-neg_i], "kept": True, "reason": tried[-neg_i]["reason"] + (
                    f"; kept: closer to FP32 than route {name}, and the export's accuracy gates judge it")}
                return dataclasses.replace(art_b, routes_tried=tuple(tried), bytes=art_b.path.stat().st_size)
            tried.append({"route": name, "kept": True, "reason": passed})
            return dataclasses.replace(art, routes_tried=tuple(tried))
        if below:
            why = "this one came closest"
            pool = below
            if target.allow_float_fallback:  # only this route's model can be repaired by float fallback (recover)
                mine = [b for b in below if b[2].converter == routes()[FALLBACK_ROUTE].name]
                if mine:
                    pool, why = mine, (f"this is the route whose layers --recover float_fallback can keep in float "
                                       f"(target {target.name})")
            agreement, neg_i, art, keep = max(pool, key=lambda b: (b[0], b[1]))
            shutil.copy2(keep, art.path)
            tried[-neg_i] = {**tried[-neg_i], "kept": True,
                             "reason": tried[-neg_i]["reason"] + f"; kept anyway: no route reached its bar, "
                                       f"{why}, and the export's accuracy gates judge it"}
            return dataclasses.replace(art, routes_tried=tuple(tried), bytes=art.path.stat().st_size)
    raise ConversionError("no conversion route made this model " + target.precision + ": "
                          + "; ".join(f"[{t['route']}] {t['reason']}" for t in tried))


def with_record(art: TfliteArtifact, pre: Preprocessing) -> TfliteArtifact:
    """The deployment record (preprocessing + the model's input layout and quantization) embedded in the .tflite
    as metadata ``preprocessing.METADATA_NAME``, so the file itself says how to feed it."""
    from pipeline.tflite.inspect import inspect as read
    from pipeline.inputs.preprocessing import METADATA_NAME, InputQuantization
    from pipeline.tflite.metadata import embed_file
    t = read(art.path).inputs[0]
    quant = InputQuantization(dtype=t.dtype, scale=float(t.scale[0]) if t.scale else 0.0,
                              zero_point=int(t.zero_point[0]) if t.zero_point else 0)
    deployed = pre.deployed(art.input_layout, quant)
    embed_file(art.path, METADATA_NAME, deployed.to_dict())
    return dataclasses.replace(art, bytes=art.path.stat().st_size, preprocessing=deployed)


def torch_source(model, spec: str, weights: str | None):
    """What a route that converts the PyTorch model needs to rebuild this very model in its worker: the spec and
    weights named on the command line and the parameters as arrays; None for ONNX and TorchScript models."""
    if model.module is None or model.kind == "torchscript":
        return None
    return spec, weights, {k: v.detach().cpu().numpy() for k, v in model.module.state_dict().items()}


def check_sample(model, onnx: OnnxArtifact, x_test: np.ndarray, target, cfg) -> Check | None:
    """The quick check of ``auto`` (None for a forced route): the first test inputs and their FP32 outputs, on
    the FP32 side the run stage will use (``cfg``: the ExportConfig)."""
    from pipeline.inputs import models
    if cfg.converter != AUTO:
        return None
    x = x_test[:CHECK_IMAGES]
    ref = models.onnx_reference(onnx.path) if cfg.fp32_runtime == "onnxruntime" and model.kind != "onnx" else model
    return Check(inputs=x, fp32=models.run_fp32(ref, x, batch_size=cfg.batch_size), kernels=target.run_kernels,
                 batch=min(cfg.batch_size, len(x)), min_agreement=cfg.min_agreement)
