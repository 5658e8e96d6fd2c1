"""Stage ``recover`` (``--recover auto`` or a list of tools): when an accuracy gate fails, repair the FP32 graph
and convert again, until the gates pass (README "When int8 hurts").

The tools (:mod:`pipeline.recover`) rewrite the ONNX model before conversion and are applied cumulatively (a
tool whose attempt fails or lowers top-1 agreement is dropped and the next one starts without it), in
this order for ``auto`` (``ORDER``): cross-layer equalization with bias absorption (ReLU6 between a pair is
replaced by ReLU, as Nagel et al. do; the change is in the record and in the accuracy figures), then bias
correction of the weight rounding (for the weight granularity the target uses), then percentile clipping of the
activation ranges. Each attempt converts by the route that made the first model (an ONNX route: the
litert-torch route, which converts the PyTorch module, and the direct writer, which has no int8 form for the
per-channel Min and the clips the tools insert, are replaced by onnx2tf), runs on the target's kernels and
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
FLOAT_FALLBACK = "float_fallback"  # last, and only on a target that allows float ops: it costs speed on device
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
    known = [*TOOLS, FLOAT_FALLBACK]
    bad = [t for t in tools if t not in known]
    if not tools or bad:
        raise ValueError(f"--recover {text!r}: choose auto, none or tools from {', '.join(known)} (comma-separated)")
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
    order: tuple = ()  # the tools tried, in order

    def describe(self) -> dict:
        return {"mode": self.mode, "order": list(self.order or (ORDER if self.mode == AUTO else self.mode.split(","))),
                "applied": ("cumulatively from the FP32 ONNX graph: each attempt adds one tool to the ones kept so far; a "
                            "tool whose attempt failed or lowered top-1 agreement is dropped from the chain"),
                "compared_with": "the original FP32 model's outputs (a tool's FP32 change counts against it)",
                "kept": self.kept, "attempts": [dict(a) for a in self.attempts],
                "not_tried": [dict(n) for n in self.not_tried], "seconds": round(self.seconds, 3)}


def not_tried(target, per_tensor_asked: bool) -> list[dict]:
    from pipeline.precisions import get_precision
    out = []
    if get_precision(target.precision).fully_int8_required:
        what = ("int8 input and output" if target.allow_float_fallback else
                "fully int8 (int8 input, output and every op)")
        out.append({"tool": "int16x8 activations", "why": f"target {target.name} is {what}; int16 activations "
                    "change that contract: export to --target tflite-int16x8"})
    if not target.allow_float_fallback:
        out.append({"tool": "float fallback of the worst layers", "why": f"target {target.name} runs no float ops "
                    "(allow_float_fallback is off); a float layer would break its kernels' contract (on a CPU "
                    "that runs float ops: --target tflite-int8-float-fallback)"})
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
            per_tensor_asked: bool, in_process: bool, verbose: bool, batch_size: int = 256, log=None,
            layers: dict | None = None) -> Recovery:
    """``layers``: the debug_layers stage's section (its rows name the layers float fallback keeps in float)."""
    import onnx as onnx_lib

    from pipeline.recover import apply
    from pipeline.stages.debug_layers import route_key
    t_all = time.perf_counter()
    tools = ORDER + ((FLOAT_FALLBACK,) if target.allow_float_fallback else ()) if mode == AUTO else tuple(mode.split(","))
    skipped = tuple(not_tried(target, per_tensor_asked))
    route = route_key(tfl.converter)
    if route in ("litert-torch", "direct"):  # the tools' graphs hold ops only onnx2tf writes (per-channel Min, Clip)
        route = "onnx2tf"
    calib = inp.calib.array()
    model = onnx_lib.load(str(onnx.path))
    attempts: list[dict] = []
    applied: list[str] = []
    best = cmp.agreement  # a tool stays in the chain only when its attempt is at least as close
    run = _Attempts(onnx, inp, target, route, calib, in_process, verbose, batch_size, max_drop_pp, min_agreement,
                    tfl, ran, work, log)
    with tempfile.TemporaryDirectory(prefix="edge-int8-recover-") as tmp:
        for tool in tools:
            if tool == FLOAT_FALLBACK:
                kept = _float_fallback(run, layers, tfl, target, Path(tmp), attempts)
                if kept is not None:
                    return Recovery(mode, tuple(attempts), skipped, kept[0], *kept[1], time.perf_counter() - t_all,
                                    tools)
                continue
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
            d = Path(tmp) / name
            d.mkdir()
            path = d / "model_recovered.onnx"
            onnx_lib.save(new, str(path))
            onnx2 = dataclasses.replace(onnx, path=path, bytes=path.stat().st_size)
            done = run(name, tool, rec, onnx2, d, attempts, t0)
            if done is not None:
                shutil.copy2(path, work / "model_recovered.onnx")
                return Recovery(mode, tuple(attempts), skipped, name, *run.keep(done),
                                time.perf_counter() - t_all, tools)
            got = attempts[-1].get("agreement")
            if got is None or got < best:  # the next tool starts from the graph before this one
                attempts[-1]["dropped"] = (f"agreement {got:.2%} below the best so far ({best:.2%}): the next tool "
                                           "starts without it" if got is not None else
                                           "the attempt failed: the next tool starts without it")
                continue
            model, applied, best = new, [*applied, tool], got
    return Recovery(mode, tuple(attempts), skipped, None, seconds=time.perf_counter() - t_all, order=tools)


class _Attempts:
    """One attempt: convert a graph (with options), run it on the target's kernels, compare with the original FP32
    outputs, record it; returns what the attempt made when it passes the gates, else None."""

    def __init__(self, onnx, inp, target, route, calib, in_process, verbose, batch_size, max_drop_pp,
                 min_agreement, tfl, ran, work, log):
        self.onnx, self.inp, self.target, self.route, self.calib = onnx, inp, target, route, calib
        self.ran, self.work = ran, work
        self.in_process, self.verbose, self.batch_size, self.tfl, self.log = in_process, verbose, batch_size, tfl, log
        self.max_drop_pp, self.min_agreement = max_drop_pp, min_agreement

    def __call__(self, name: str, tool: str, rec: dict, onnx2, d: Path, attempts: list, t0: float,
                 **options):
        from pipeline.precisions import get_precision
        from pipeline.runtime.litert import TfliteRunner
        from pipeline.stages import compare as compare_stage
        from pipeline.stages.convert import _route, with_record
        from pipeline.stages.inspect import inspect
        target, inp = self.target, self.inp
        kwargs = dict(per_channel=target.per_channel_weights, out_path=d / f"model_{target.precision}.tflite",
                      verbose=self.verbose, precision=target.precision, **options)
        try:
            art, _ = _route(self.route, onnx2, self.calib, inp.pre, None, None, self.in_process, kwargs, check=None)
            art = with_record(art, inp.pre)
            insp = inspect(art.path, target, art.converter)
            if get_precision(target.precision).fully_int8_required and not target.allow_float_fallback \
                    and not insp.fully_int8:
                raise ValueError("the recovered model is not fully int8")
            runner = TfliteRunner(art.path, kernels=target.run_kernels, threads=target.threads,
                                  batch_size=self.batch_size, input_layout=art.input_layout)
            ran2 = dataclasses.replace(self.ran, tflite=runner.run(inp.x_test))
            cmp2 = compare_stage.compare(ran2, insp, inp.labels)
        except Exception as e:  # noqa: BLE001 - one attempt's failure is recorded, the next one runs
            attempts.append({"attempt": name, "tool": tool, "record": rec, "converted": False,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                             "seconds": round(time.perf_counter() - t0, 3)})
            return None
        passed = not failing(cmp2, self.max_drop_pp, self.min_agreement)
        attempts.append({"attempt": name, "tool": tool, "record": rec, "converted": True, "route": self.route,
                         "int8_top1": round(cmp2.int8_top1, 6), "drop_pp": round(cmp2.drop_pp, 4),
                         "agreement": round(cmp2.agreement, 6), "passed_gates": passed,
                         "seconds": round(time.perf_counter() - t0, 3)})
        if self.log is not None:
            self.log(f"recover: {name}: drop {cmp2.drop_pp:+.2f} pp, agreement {cmp2.agreement:.2%}"
                     + (" (gates pass)" if passed else ""), file=sys.stderr)
        return (art, insp, ran2, cmp2) if passed else None

    def keep(self, done) -> tuple:
        """The passing attempt's model becomes the export's ``model_<precision>.tflite``."""
        art, insp, ran2, cmp2 = done
        final = self.work / f"model_{self.target.precision}.tflite"
        shutil.copy2(art.path, final)
        art = dataclasses.replace(art, path=final, bytes=final.stat().st_size,
                                  rewrites=tuple(self.tfl.rewrites), routes_tried=tuple(self.tfl.routes_tried))
        return art, insp, ran2, cmp2


FALLBACK_STEPS = (1, 2, 4, 8, 16)


def fallback_candidates(layers: dict | None) -> list[dict]:
    """The debugger's rows worth keeping in float, worst first: ops (not the model input, not QUANTIZE or
    DEQUANTIZE) whose output's median channel gets fewer than ``COARSE_CHANNEL_STEPS`` int8 steps (a few outlier
    channels set the tensor's scale; their SQNR and growth look fine because those channels dominate it), the
    coarsest first; then the others by the error they add (``growth_db``, largest first), then by their own SQNR."""
    from pipeline.debug.layers import COARSE_CHANNEL_STEPS
    rows = [r for r in (layers or {}).get("rows", []) if r.get("index", -1) >= 0
            and r.get("op") not in ("INPUT", "QUANTIZE", "DEQUANTIZE") and r.get("growth_db") is not None]

    def coarse(r: dict) -> bool:
        return r.get("channel_steps") is not None and r["channel_steps"] < COARSE_CHANNEL_STEPS
    return (sorted((r for r in rows if coarse(r)), key=lambda r: (r["channel_steps"], r["index"]))
            + sorted((r for r in rows if not coarse(r)), key=lambda r: (-r["growth_db"], r["sqnr_db"], r["index"])))


def _float_fallback(run: _Attempts, layers: dict | None, tfl, target, tmp: Path, attempts: list):
    """Keep the 1, 2, 4, 8, 16 layers the debugger blames most (coarse channels, then growth_db) in float,
    converting the ORIGINAL graph each time (the debugger's layer names are of its conversion), until the gates
    pass. Returns (name, (artifact, inspection, outputs, comparison)) of the first passing attempt, or None."""
    from pipeline.conversion import FALLBACK_ROUTE
    from pipeline.stages.debug_layers import route_key
    t0 = time.perf_counter()
    why = None
    first = route_key(tfl.converter)  # the debugger's layer names are tensor names of this route's conversion
    if not target.allow_float_fallback:
        why = f"target {target.name} runs no float ops (allow_float_fallback is off)"
    elif first != FALLBACK_ROUTE:
        why = (f"the first model was converted by route {first}; only the onnx2tf route keeps named layers in "
               "float: export with --converter onnx2tf")
    elif not layers or "rows" not in layers:
        why = ("no layer-wise errors to choose the layers from"
               + (f" (the debugger failed: {layers['error']})" if layers and "error" in layers else ""))
    cands = fallback_candidates(layers) if why is None else []
    if why is None and not cands:
        why = "the layer-wise debugger named no op with a measured error growth"
    if why is not None:
        attempts.append({"attempt": FLOAT_FALLBACK, "tool": FLOAT_FALLBACK, "converted": False, "error": why,
                         "seconds": round(time.perf_counter() - t0, 3)})
        return None
    for k in FALLBACK_STEPS:
        chosen = cands[:k]
        t0 = time.perf_counter()
        name = f"{FLOAT_FALLBACK}({len(chosen)})"
        rec = {"tool": FLOAT_FALLBACK, "changed_layers": len(chosen),
               "float_layers": [{"layer": r.get("layer"), "op": r.get("layer_op") or r.get("op"),
                                 "tflite_name": r["tflite_name"], "growth_db": r["growth_db"],
                                 "sqnr_db": r["sqnr_db"], "channel_steps": r.get("channel_steps")} for r in chosen],
               "applied_to": "the original FP32 graph (the debugger's layer names are of its conversion), not on "
                             "top of the tools before it",
               "chosen_by": "coarse channels first (layer_errors channel_steps below "
                            "pipeline.debug.layers.COARSE_CHANNEL_STEPS, fewest first), then largest error growth "
                            "(growth_db), then lowest SQNR"}
        d = tmp / name
        d.mkdir()
        done = run(name, FLOAT_FALLBACK, rec, run.onnx, d, attempts, t0,
                   float_fallback=True, float_nodes=tuple(r["tflite_name"] for r in chosen))
        if done is not None:
            return name, run.keep(done)
        if k >= len(cands):
            break
    return None


def attach(report, rec: Recovery | None, first_cmp=None) -> None:
    if rec is None:
        return
    d = rec.describe()
    if first_cmp is not None:
        d["before"] = {"int8_top1": round(first_cmp.int8_top1, 6), "drop_pp": round(first_cmp.drop_pp, 4),
                       "agreement": round(first_cmp.agreement, 6)}
    report.sections["recovery"] = d
    if rec.kept and rec.kept.startswith(FLOAT_FALLBACK):
        report.warnings.append(f"--recover: the deployed model keeps layers in float ({rec.kept}; report.json "
                               "recovery.attempts names them and quantization.float_ops lists the ops); accuracy "
                               "figures are of that model against the original FP32")
    elif rec.kept:
        report.warnings.append(f"--recover: the deployed model is the recovered one ({rec.kept}; its graph is "
                               "model_recovered.onnx); accuracy figures are of that model against the original FP32")
    else:
        report.warnings.append("--recover: no attempt passed the gates; the first model is kept (report.json "
                               "recovery.attempts lists each)")
