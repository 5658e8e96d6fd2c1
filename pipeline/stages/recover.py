"""Stage ``recover`` (``--recover auto`` or a list of tools): when an accuracy gate fails, repair the FP32 graph
and convert again, until the gates pass (README "When int8 hurts").

The tools (:mod:`pipeline.recover`) rewrite the ONNX model before conversion and are applied cumulatively, in
this order for ``auto`` (``ORDER``): cross-layer equalization with bias absorption (ReLU6 between a pair is
replaced by ReLU, as Nagel et al. do; the change is in the record and in the accuracy figures), then bias
correction of the weight rounding (for the weight granularity the target uses), then percentile clipping of the
activation ranges. Each attempt converts by the route that made the first model (an ONNX route: the
litert-torch route, which converts the PyTorch module, is replaced by onnx2tf), runs on the target's kernels and
is compared with the ORIGINAL FP32 model's outputs, so whatever a tool changes in FP32 counts against it. The
first attempt whose drop and agreement pass the export's gates is kept: its model becomes ``model_<precision>.tflite``
and its graph ``model_recovered.onnx``; otherwise the first model stays and the report lists every attempt.

What is never tried, and why, is in the record too: a precision fallback (int16x8 activations, or float for
named layers) changes the target's contract, so it is not done on a fully-int8 target (use ``--target
tflite-int16x8`` for int16 activations); per-channel weights are not put back when ``--per-tensor`` was asked
(the kernels the user targets want per-tensor).
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

ORDER = ("cle", "bias_correction", "clip_percentile")
OPTIONS = {"cle": {"relu6": "per_channel"}, "bias_correction": {}, "clip_percentile": {}}
NONE = "none"
AUTO = "auto"


def parse(text: str) -> str:
    """``--recover`` value: auto, none, or tools separated by commas (argparse type; ValueError names the fix)."""
    from pipeline.recover import TOOLS
    v = text.strip().lower()
    if v in (AUTO, NONE):
        return v
    tools = [t.strip() for t in v.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if not tools or bad:
        raise ValueError(f"--recover {text!r}: choose auto, none or tools from {', '.join(TOOLS)} (comma-separated)")
    return ",".join(dict.fromkeys(tools))


@dataclasses.dataclass(frozen=True)
class Recovery:
    mode: str
    attempts: tuple[dict, ...]
    not_tried: tuple[dict, ...]
    kept: str | None  # the attempt whose model replaced the first one, or None
    tflite: object = None  # the kept attempt's TfliteArtifact, TfliteInspection, RunOutputs and Comparison
    insp: object = None
    ran: object = None
    cmp: object = None
    seconds: float = 0.0

    def describe(self) -> dict:
        return {"mode": self.mode, "order": list(ORDER) if self.mode == AUTO else self.mode.split(","),
                "applied": "cumulatively (each attempt adds one tool to the previous ones), from the FP32 ONNX graph",
                "compared_with": "the original FP32 model's outputs (a tool's FP32 change counts against it)",
                "kept": self.kept, "attempts": [dict(a) for a in self.attempts],
                "not_tried": [dict(n) for n in self.not_tried], "seconds": round(self.seconds, 3)}


def not_tried(target, per_tensor_asked: bool) -> list[dict]:
    from pipeline.precisions import get_precision
    out = []
    if get_precision(target.precision).fully_int8_required:
        out.append({"tool": "int16x8 activations", "why": f"target {target.name} is fully int8 (int8 input, output "
                    "and every op); int16 activations change that contract: export to --target tflite-int16x8"})
    if not target.allow_float_fallback:
        out.append({"tool": "float fallback of the worst layers", "why": f"target {target.name} runs no float ops "
                    "(allow_float_fallback is off); a float layer would break its kernels' contract"})
    if per_tensor_asked:
        out.append({"tool": "per-channel weights", "why": "--per-tensor was asked: the kernels you target want one "
                    "weight scale per tensor"})
    elif not target.per_channel_weights:
        out.append({"tool": "per-channel weights", "why": f"target {target.name} takes one weight scale per tensor"})
    else:
        out.append({"tool": "per-channel weights", "why": "already per channel"})
    return out


def failing(cmp, max_drop_pp: float, min_agreement: float) -> bool:
    """Whether the export's accuracy gates (the report's own rule) fail on this comparison."""
    from pipeline.reliability.metrics import accuracy_gates
    return not all(g.passed for g in accuracy_gates(cmp, max_drop_pp, min_agreement).values())


def recover(mode: str, cmp, onnx, tfl, ran, inp, target, *, work: Path, max_drop_pp: float, min_agreement: float,
            per_tensor_asked: bool, in_process: bool, verbose: bool, batch_size: int = 256, log=None) -> Recovery:
    import onnx as onnx_lib

    from pipeline.recover import apply
    from pipeline.runtime.litert import TfliteRunner
    from pipeline.stages import compare as compare_stage
    from pipeline.stages.convert import _route, with_record
    from pipeline.stages.debug_layers import route_key
    from pipeline.stages.inspect import inspect
    from pipeline.precisions import get_precision
    t_all = time.perf_counter()
    tools = ORDER if mode == AUTO else tuple(mode.split(","))
    skipped = tuple(not_tried(target, per_tensor_asked))
    route = route_key(tfl.converter)
    if route == "litert-torch":
        route = "onnx2tf"
    calib = inp.calib.array()
    model = onnx_lib.load(str(onnx.path))
    attempts: list[dict] = []
    applied: list[str] = []
    need_int8 = get_precision(target.precision).fully_int8_required
    with tempfile.TemporaryDirectory(prefix="edge-int8-recover-") as tmp:
        for tool in tools:
            t0 = time.perf_counter()
            name = "+".join([*applied, tool])
            try:
                new, rec = apply(tool, model, calib, **({"per_channel": target.per_channel_weights}
                                                        if tool == "bias_correction" else OPTIONS.get(tool, {})))
            except Exception as e:  # noqa: BLE001 - a tool that cannot handle this graph is one attempt's record
                attempts.append({"attempt": name, "tool": tool,
                                 "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}",
                                 "seconds": round(time.perf_counter() - t0, 3)})
                continue
            rec = {k: v for k, v in rec.items() if k != "nodes"} | {"nodes": list(rec.get("nodes", []))[:20]}
            if not rec.get("changed_layers"):
                attempts.append({"attempt": name, "tool": tool, "record": rec, "converted": False,
                                 "note": "nothing to change in this graph", "seconds": round(time.perf_counter() - t0, 3)})
                continue
            model, applied = new, [*applied, tool]
            d = Path(tmp) / name
            d.mkdir()
            path = d / "model_recovered.onnx"
            onnx_lib.save(model, str(path))
            onnx2 = dataclasses.replace(onnx, path=path, bytes=path.stat().st_size)
            kwargs = dict(per_channel=target.per_channel_weights, out_path=d / f"model_{target.precision}.tflite",
                          verbose=verbose, precision=target.precision)
            try:
                art, _ = _route(route, onnx2, calib, inp.pre, None, None, in_process, kwargs, check=None)
                art = with_record(art, inp.pre)
                insp = inspect(art.path, target, art.converter)
                if need_int8 and not insp.fully_int8:
                    raise ValueError("the recovered model is not fully int8")
                runner = TfliteRunner(art.path, kernels=target.run_kernels, threads=target.threads,
                                      batch_size=batch_size, input_layout=art.input_layout)
                ran2 = dataclasses.replace(ran, tflite=runner.run(inp.x_test))
                cmp2 = compare_stage.compare(ran2, insp, inp.labels)
            except Exception as e:  # noqa: BLE001 - one attempt's failure is recorded, the next one runs
                attempts.append({"attempt": name, "tool": tool, "record": rec, "converted": False,
                                 "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                                 "seconds": round(time.perf_counter() - t0, 3)})
                continue
            passed = not failing(cmp2, max_drop_pp, min_agreement)
            attempts.append({"attempt": name, "tool": tool, "record": rec, "converted": True, "route": route,
                             "int8_top1": round(cmp2.int8_top1, 6), "drop_pp": round(cmp2.drop_pp, 4),
                             "agreement": round(cmp2.agreement, 6), "passed_gates": passed,
                             "seconds": round(time.perf_counter() - t0, 3)})
            if log is not None:
                log(f"recover: {name}: drop {cmp2.drop_pp:+.2f} pp, agreement {cmp2.agreement:.2%}"
                    + (" (gates pass)" if passed else ""), file=sys.stderr)
            if passed:
                final = work / f"model_{target.precision}.tflite"
                shutil.copy2(art.path, final)
                shutil.copy2(path, work / "model_recovered.onnx")
                art = dataclasses.replace(art, path=final, bytes=final.stat().st_size,
                                          rewrites=tuple(tfl.rewrites), routes_tried=tuple(tfl.routes_tried))
                return Recovery(mode, tuple(attempts), skipped, name, art, insp, ran2, cmp2,
                                time.perf_counter() - t_all)
    return Recovery(mode, tuple(attempts), skipped, None, seconds=time.perf_counter() - t_all)


def attach(report, rec: Recovery | None, first_cmp=None) -> None:
    if rec is None:
        return
    d = rec.describe()
    if first_cmp is not None:
        d["before"] = {"int8_top1": round(first_cmp.int8_top1, 6), "drop_pp": round(first_cmp.drop_pp, 4),
                       "agreement": round(first_cmp.agreement, 6)}
    report.sections["recovery"] = d
    if rec.kept:
        report.warnings.append(f"--recover: the deployed model is the recovered one ({rec.kept}; its graph is "
                               "model_recovered.onnx); accuracy figures are of that model against the original FP32")
    else:
        report.warnings.append("--recover: no attempt passed the gates; the first model is kept (report.json "
                               "recovery.attempts lists each)")
