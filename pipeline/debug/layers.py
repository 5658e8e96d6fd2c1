"""Layer-wise quantization error: every intermediate tensor of the deployed int8 .tflite against the float
reference of the same graph, named by the ONNX model's own nodes (README "When int8 hurts").

Why: a top-1 drop says *that* int8 hurts, not *where*. This module runs

1. the fully-int8 .tflite and a float32 .tflite converted from the same ONNX by the same route, both on LiteRT's
   builtin kernels with no delegate and ``experimental_preserve_all_tensors`` (XNNPACK would fuse and drop the
   intermediates), on the same inputs;
2. matches their tensors **by name** (a route keeps op and tensor names between its int8 and float conversions;
   checked on onnx2tf). Only activations (op outputs, and the model input) are compared; int8 tensors with no
   float counterpart are counted by reason (constants: weights, biases, shape operands; QUANTIZE/DEQUANTIZE and
   other int8-only op outputs; non-quantized or differently shaped tensors);
3. runs the ONNX model on onnxruntime with every node output exposed, and matches each float activation to an
   ONNX value **by content** (same element count, rank-4 NHWC transposed to NCHW or as-is, relative max error
   below :data:`MATCH_REL_ERROR`), so each layer carries the ONNX node that produces it, the ONNX nodes the
   TFLite op fused (Conv -> BatchNormalization -> Relu become one CONV_2D), and a display name: the fused
   chain's weighted node (Conv, Gemm, MatMul, ...) or else its first non-layout node.

Per matched activation, over all samples (int8 dequantized with its own scale and zero point, ``f`` float):
``sqnr_db`` = 10 log10(sum f^2 / sum (f - q)^2), clamped to +-:data:`SQNR_CAP_DB` (no error at all gives the
cap; a zero float signal with some error gives minus the cap); ``rmse_steps`` = RMSE / scale; ``clip_share`` =
share of float values outside the int8 range [(qmin - zp) scale, (qmax - zp) scale]; ``growth_db`` = the lowest
SQNR among the op's matched activation inputs minus this tensor's SQNR (the error this op added; None when no
input is matched; the model input is a row with its own SQNR, its input quantization error).

Costs two interpreter runs of ``samples`` inputs and one onnxruntime run; every failure is one line
(:class:`pipeline.errors.RuntimeStageError`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import ConversionError, RuntimeStageError

SQNR_CAP_DB = 99.0
MATCH_REL_ERROR = 1e-3
KERNELS_NOTE = "LiteRT builtin reference-quality kernels, no delegate, preserve_all_tensors"
UNMATCHED_NOTE = ("int8 tensors are matched to the float model's by name, then the rest in execution order where "
                  "the producing op and the shape agree ('paired_in_order': a route that renames tensors between "
                  "its conversions); tensors left are not compared and are counted by reason: 'constant' "
                  "(weights, biases, shape operands: not produced by an op), 'int8_only' (outputs of ops the float model does not "
                  "have, e.g. QUANTIZE/DEQUANTIZE), 'not_quantized' (no scale: int32 shapes, float tensors), "
                  "'shape_differs'; 'float_only' counts float activations with no int8 counterpart")
ONNX_NOTE = (f"each float activation is matched to an ONNX node output by content (same element count, rank-4 NHWC "
             f"transposed to NCHW or as-is, relative max error < {MATCH_REL_ERROR:g}) on the first batch of inputs; "
             f"rows with no match keep only their TFLite name (onnx_node null)")
COARSE_CHANNEL_STEPS = 8  # a median channel with fewer int8 steps than this is named in the summary line
SQNR_NOTE = (f"sqnr_db = 10 log10(sum f^2 / sum (f - q)^2) over all samples, clamped to +-{SQNR_CAP_DB:g} dB "
             f"(no error gives +{SQNR_CAP_DB:g}); growth_db = lowest SQNR of the op's matched inputs minus its own")
CHANNEL_NOTE = ("channel_steps = median over the tensor's live channels (its last axis, NHWC; a channel whose float "
                "range is 0 is left out) of each channel's float range (max - min over all samples and positions) divided "
                "by the tensor's int8 step; channel_spread = the largest channel magnitude (max |value|) / the median "
                "channel's. A tensor-wide SQNR is dominated by its largest channels; a few "
                "outlier channels that set one scale for all leave the others few steps (coarse) without lowering it; "
                f"the summary names the coarsest layer when its median channel has fewer than {COARSE_CHANNEL_STEPS} steps")
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger", "QLinearConv", "Einsum"}
LAYOUT_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Expand"}


@dataclass(frozen=True)
class LayerError:
    """One compared activation tensor (a TFLite op's output, or the model input: ``index`` -1, op ``INPUT``)."""

    index: int  # execution index of the producing TFLite op
    op: str  # TFLite builtin op
    tflite_name: str
    shape: tuple  # at batch 1 for a dynamic-batch model
    scale: float
    zero_point: int
    sqnr_db: float
    rmse_steps: float
    clip_share: float
    growth_db: float | None
    onnx_node: str | None = None  # the ONNX node producing the matched value (None: no content match)
    onnx_op: str | None = None
    layer: str | None = None  # display name: the fused chain's weighted node, else its first non-layout node
    layer_op: str | None = None
    fused: tuple = ()  # ONNX nodes this TFLite op computes, in graph order
    inputs: tuple = field(default=(), repr=False)  # tflite names of the matched activation inputs
    channel_steps: float | None = None  # median over channels of the float range in int8 steps (last axis)
    channel_spread: float | None = None  # largest channel's max |value| / the median channel's

    @property
    def name(self) -> str:
        return self.layer or self.tflite_name

    @property
    def label(self) -> str:
        return f"{self.name} ({self.layer_op or self.op})"

    def describe(self) -> dict:
        return {"index": self.index, "op": self.op, "tflite_name": self.tflite_name, "shape": list(self.shape),
                "scale": self.scale, "zero_point": self.zero_point, "sqnr_db": _r(self.sqnr_db),
                "rmse_steps": _r(self.rmse_steps), "clip_share": _r(self.clip_share, 6),
                "growth_db": None if self.growth_db is None else _r(self.growth_db),
                "onnx_node": self.onnx_node, "onnx_op": self.onnx_op, "layer": self.name,
                "layer_op": self.layer_op or self.op, "fused": list(self.fused),
                "channel_steps": None if self.channel_steps is None else _r(self.channel_steps, 2),
                "channel_spread": None if self.channel_spread is None else _r(self.channel_spread, 1)}


@dataclass(frozen=True)
class LayerErrors:
    rows: tuple  # LayerError, in execution order (the model input first)
    unmatched: dict  # reason -> count
    samples: int
    batch: int  # inputs per invoke()
    seconds: float
    tflite_tensors: int  # tensors in the int8 model

    def worst(self, k: int = 5) -> dict:
        """The ``k`` lowest-SQNR layers, the ``k`` largest-growth layers and the ``k`` layers whose median channel
        gets the fewest int8 steps (rows)."""
        low = sorted(self.rows, key=lambda r: (r.sqnr_db, r.index))[:k]
        grown = sorted((r for r in self.rows if r.growth_db is not None), key=lambda r: (-r.growth_db, r.index))[:k]
        coarse = sorted((r for r in self.rows if r.channel_steps is not None),
                        key=lambda r: (r.channel_steps, r.index))[:k]
        return {"lowest_sqnr": low, "largest_growth": grown, "coarsest_channels": coarse}

    def describe(self, k: int = 10) -> dict:
        w = self.worst(k)
        return {
            "rows": [r.describe() for r in self.rows],
            "worst": {"lowest_sqnr": [_brief(r) for r in w["lowest_sqnr"]],
                      "largest_growth": [_brief(r) for r in w["largest_growth"]],
                      "coarsest_channels": [_brief(r) for r in w["coarsest_channels"]]},
            "counts": {"compared": len(self.rows), "onnx_named": sum(r.onnx_node is not None for r in self.rows),
                       "not_onnx_named": sum(r.onnx_node is None for r in self.rows),
                       "unmatched": dict(self.unmatched), "int8_model_tensors": self.tflite_tensors},
            "samples": self.samples, "batch": self.batch, "kernels": KERNELS_NOTE, "seconds": round(self.seconds, 3),
            "sqnr_cap_db": SQNR_CAP_DB,
            "notes": {"unmatched": UNMATCHED_NOTE, "onnx_names": ONNX_NOTE, "metrics": SQNR_NOTE,
                      "channels": CHANNEL_NOTE},
        }


def _r(v: float, digits: int = 4) -> float:
    return round(float(v), digits)


def _brief(r: LayerError) -> dict:
    return {"layer": r.name, "op": r.layer_op or r.op, "tflite_op": r.op, "index": r.index, "sqnr_db": _r(r.sqnr_db),
            "growth_db": None if r.growth_db is None else _r(r.growth_db),
            "channel_steps": None if r.channel_steps is None else _r(r.channel_steps, 2),
            "channel_spread": None if r.channel_spread is None else _r(r.channel_spread, 1)}


def summary_line(desc: dict, k: int = 3) -> str:
    """One terminal line from :meth:`LayerErrors.describe`: the worst SQNR layers and the largest growths."""
    w = desc.get("worst", {})

    def item(b, key, sign=""):
        return f"{b['layer']} ({b['op']}) {b[key]:{sign}.1f} dB"
    low = ", ".join(item(b, "sqnr_db") for b in w.get("lowest_sqnr", [])[:k]) or "none"
    grown = ", ".join(item(b, "growth_db", "+") for b in w.get("largest_growth", [])[:k]) or "none"
    line = f"layers     worst SQNR: {low}; largest growth: {grown}"
    coarse = (w.get("coarsest_channels") or [None])[0]
    if coarse and coarse["channel_steps"] < COARSE_CHANNEL_STEPS:
        line += (f"; coarse channels: {coarse['layer']} ({coarse['op']}) median channel {coarse['channel_steps']:.1f} "
                 f"int8 steps, largest channel {coarse['channel_spread']:.0f}x the median")
    return line


# --------------------------------------------------------------------------- running the two .tflite models

@dataclass
class _Run:
    """One model run on every sample with all tensors kept: per tensor index, the list of per-invoke arrays."""

    details: dict  # tensor index -> get_tensor_details() entry (shapes at batch 1 for a dynamic batch)
    ops: list  # _get_ops_details(), in execution order
    input_index: int
    values: dict  # tensor index -> [array per invoke]

    def by_name(self) -> dict:
        return {d["name"]: i for i, d in self.details.items()}

    def activations(self) -> set:
        return {int(i) for o in self.ops for i in o["outputs"] if int(i) >= 0} | {self.input_index}


def _interpreter(path: Path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from pipeline.quiet import captured
    try:
        with captured(verbose=False):
            return Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                               experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    except Exception as e:
        raise RuntimeStageError(f"LiteRT cannot load {Path(path).name} for the layer-wise comparison: "
                                f"{_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _batch_of(path: Path) -> int:
    """-1 for a dynamic batch, else the model's fixed batch."""
    inp = _interpreter(path).get_input_details()[0]
    sig = inp.get("shape_signature", inp["shape"])
    return -1 if len(sig) and int(sig[0]) == -1 else int(inp["shape"][0]) if len(inp["shape"]) else 1


def _run(path: Path, x_nchw: np.ndarray, layout: str, batch: int, dynamic: bool) -> _Run:
    from pipeline.runtime.litert import quantize
    it = _interpreter(path)
    inp = it.get_input_details()[0]
    if len(it.get_input_details()) != 1:
        raise RuntimeStageError(f"{Path(path).name} has {len(it.get_input_details())} inputs; the layer-wise "
                                f"comparison takes single-input models")
    details = {int(d["index"]): d for d in it.get_tensor_details()}
    try:
        ops = list(it._get_ops_details())
    except Exception as e:  # a private API of the interpreter
        raise RuntimeStageError(f"LiteRT does not list the ops of {Path(path).name}: {_first_line(e)}") from None
    keep = {int(i) for o in ops for i in o["outputs"] if int(i) >= 0} | {int(inp["index"])}
    allocated = None

    def prepare(m: int):
        try:
            if dynamic:
                it.resize_tensor_input(inp["index"], [m, *[int(v) for v in inp["shape"][1:]]], strict=True)
            it.allocate_tensors()
        except Exception as e:
            raise ConversionError(f"LiteRT cannot prepare {Path(path).name} for a batch of {m}: "
                                  f"{_first_line(e)}") from None
    x = np.transpose(x_nchw, (0, 2, 3, 1)) if layout == "NHWC" else x_nchw
    values: dict = {i: [] for i in keep}
    for s in range(0, len(x), batch):
        chunk = x[s:s + batch]
        if allocated != len(chunk):  # the last chunk of a dynamic-batch run may be smaller
            prepare(len(chunk))
            allocated = len(chunk)
        if np.issubdtype(inp["dtype"], np.integer):
            scale, zp = inp["quantization"]
            chunk = quantize(chunk, scale, zp, inp["dtype"])
        try:
            it.set_tensor(inp["index"], np.ascontiguousarray(chunk, dtype=inp["dtype"]))
            it.invoke()
            for i in keep:
                values[i].append(it.get_tensor(i))
        except Exception as e:
            raise RuntimeStageError(f"LiteRT failed to run {Path(path).name} keeping all tensors: "
                                    f"{_first_line(e)}") from None
    return _Run(details=details, ops=ops, input_index=int(inp["index"]), values=values)


def _run_both(int8_path: Path, float_path: Path, x: np.ndarray, layout: str,
              batch: int | None) -> tuple[_Run, _Run, int, int]:
    """Both models on the same inputs in the same batches: the whole set in one invoke when both have a dynamic
    batch (one input at a time when the kernels refuse that batch), else the models' fixed batch."""
    b8, bf = _batch_of(int8_path), _batch_of(float_path)
    if b8 != bf and -1 not in (b8, bf):
        raise RuntimeStageError(f"the int8 model's batch ({b8}) and the float model's ({bf}) differ: "
                                f"convert both from the same ONNX by the same route")
    n = len(x)
    if b8 != bf:  # one fixed (a route that converts at a fixed batch for int8), one dynamic: both at the fixed one
        b = max(b8, bf)
        used = max(b, n - n % b)
        xs = np.resize(x, (used, *x.shape[1:])) if used > n else x[:used]
        try:
            return _run(int8_path, xs, layout, b, b8 == -1), _run(float_path, xs, layout, b, bf == -1), b, used
        except ConversionError as e:
            raise RuntimeStageError(str(e)) from None
    if b8 == -1:
        first = min(n, max(1, int(batch))) if batch else n
        for b in ((first, 1) if first > 1 else (1,)):
            try:
                return _run(int8_path, x, layout, b, True), _run(float_path, x, layout, b, True), b, n
            except ConversionError as e:
                if b == 1:
                    raise RuntimeStageError(str(e)) from None
    used = max(b8, n - n % b8)
    xs = np.resize(x, (used, *x.shape[1:])) if used > n else x[:used]  # fewer inputs than the batch: repeated
    try:
        return _run(int8_path, xs, layout, b8, False), _run(float_path, xs, layout, b8, False), b8, used
    except ConversionError as e:
        raise RuntimeStageError(str(e)) from None


# --------------------------------------------------------------------------- metrics

def _metrics(f: np.ndarray, q: np.ndarray, scale: float, zp: int, dtype) -> tuple[float, float, float]:
    from pipeline.runtime.litert import dequantize
    f = f.astype(np.float64)
    err = f - dequantize(q, scale, zp).astype(np.float64)
    noise, signal = float(np.sum(err * err)), float(np.sum(f * f))
    sqnr = sqnr_db(signal, noise)
    rmse_steps = math.sqrt(noise / max(err.size, 1)) / scale
    info = np.iinfo(dtype)
    lo, hi = (info.min - zp) * scale, (info.max - zp) * scale
    clip = float(np.mean((f < lo) | (f > hi))) if f.size else 0.0
    return sqnr, rmse_steps, clip


def _channels(arrays: list, scale: float) -> tuple[float | None, float | None]:
    """(median live channel's range in int8 steps, largest channel magnitude / the median one) of a float
    activation whose last axis is its channels (NHWC; a [N, C, 1, 1] vector, as a layout TRANSPOSE leaves it, has
    them on axis 1); (None, None) for a tensor of rank < 2 or with fewer than two live channels."""
    if not arrays or arrays[0].ndim < 2 or scale <= 0:
        return None, None
    shape = arrays[0].shape
    if shape[-1] == 1 and shape[1] > 1 and all(d == 1 for d in shape[2:]):  # [N, C, 1, 1]: a layout transpose's
        arrays = [a.reshape(a.shape[0], -1) for a in arrays]  # vector, its channels on axis 1
    c = arrays[0].shape[-1]
    if c < 2:
        return None, None
    flat = [a.reshape(-1, c) for a in arrays]
    hi = np.max([a.max(0) for a in flat], axis=0).astype(np.float64)
    lo = np.min([a.min(0) for a in flat], axis=0).astype(np.float64)
    live = (hi - lo) > 0  # a constant channel (dead, or all one value) carries nothing to resolve
    if live.sum() < 2:
        return None, None
    size = np.maximum(np.abs(hi), np.abs(lo))[live]
    return float(np.median((hi - lo)[live])) / scale, float(size.max() / max(float(np.median(size)), 1e-30))


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise), clamped to +-SQNR_CAP_DB (no noise: +cap; noise on a zero signal: -cap)."""
    if noise <= 0:
        return SQNR_CAP_DB
    if signal <= 0:
        return -SQNR_CAP_DB
    return float(min(SQNR_CAP_DB, max(-SQNR_CAP_DB, 10.0 * math.log10(signal / noise))))


# --------------------------------------------------------------------------- ONNX names by content

def _onnx_values(onnx_path: Path, x_nchw: np.ndarray) -> tuple[dict, dict, list, set]:
    """Every float value of the ONNX graph on ``x_nchw``: (name -> array, value -> producing node index,
    nodes, graph input and initializer names)."""
    import onnx
    import onnxruntime as ort
    try:
        model = onnx.load(str(onnx_path))
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # shapes help onnxruntime but are not needed
            inferred = model
        known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
        outputs = {o.name for o in model.graph.output}
        nodes = list(model.graph.node)
        for node in nodes:
            for name in node.output:
                if not name or name in outputs:
                    continue
                v = known.get(name)
                if v is not None and v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                    continue  # only float activations can match a float .tflite tensor
                model.graph.output.append(v if v is not None else
                                          onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                outputs.add(name)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        b = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else len(x_nchw)
        if b > len(x_nchw):  # a fixed ONNX batch larger than the TFLite one: no names by content
            return {}, {}, nodes, set()
        names = [o.name for o in sess.get_outputs()]
        parts: dict = {n: [] for n in names}
        for s in range(0, len(x_nchw) - len(x_nchw) % b or b, b):
            for n, v in zip(names, sess.run(names, {inp.name: np.ascontiguousarray(x_nchw[s:s + b], np.float32)})):
                parts[n].append(v)
    except Exception as e:
        raise RuntimeStageError(f"onnxruntime cannot run {Path(onnx_path).name} with its intermediate values "
                                f"exposed: {_first_line(e)}") from None
    values = {n: np.concatenate(p) if len(p) > 1 else p[0] for n, p in parts.items()
              if p and np.asarray(p[0]).dtype == np.float32}
    values[inp.name] = np.ascontiguousarray(x_nchw[:sum(len(p) for p in parts[names[0]])], np.float32)
    producer = {o: i for i, node in enumerate(nodes) for o in node.output}
    sources = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    return values, producer, nodes, sources


def _stats(values: dict) -> dict:
    """Per ONNX value: (sum of squares, L1 norm, peak), for a layout-free prefilter of the content match."""
    out = {}
    for name, v in values.items():
        a = np.abs(v.astype(np.float64).ravel())
        out[name] = (float(np.sum(a * a)), float(np.sum(a)), float(a.max()) if a.size else 0.0)
    return out


def _match(t: np.ndarray, values: dict, stats: dict, producer: dict) -> str | None:
    """The ONNX value whose content equals the float TFLite tensor ``t`` (NHWC->NCHW for rank 4, or as-is)."""
    t = t.astype(np.float32)
    nchw = t.transpose(0, 3, 1, 2) if t.ndim == 4 else None
    views = [(nchw.ravel(), nchw.shape), (t.ravel(), t.shape)] if nchw is not None else [(t.ravel(), t.shape)]
    sq = float(np.sum(t.astype(np.float64) ** 2))
    best = None
    for name, v in values.items():
        if v.size != t.size:
            continue
        vs, l1, peak = stats[name]
        peak = max(peak, 1e-12)
        eps = MATCH_REL_ERROR * peak  # |sum a^2 - sum b^2| <= eps (2 |b|_1 + eps n) when max |a - b| < eps
        if abs(vs - sq) > eps * (2 * l1 + eps * v.size) + 1e-12:
            continue
        ref = v.ravel()
        for view, shape in views:
            rel = float(np.max(np.abs(view - ref))) / peak if ref.size else 0.0
            if rel < MATCH_REL_ERROR:
                # ties (Identity, Flatten of a [N,C,1,1]): the closest, then the same shape, then the later node
                key = (rel > 1e-6, v.shape != shape, -producer.get(name, -1))
                if best is None or key < best[0]:
                    best = (key, name)
    return best[1] if best else None


def _fused(value: str, stops: set, producer: dict, nodes: list, float_values: dict) -> list[int]:
    """Indices of the ONNX nodes between the already matched values ``stops`` and ``value`` (float data only)."""
    seen, todo = set(), [value]
    while todo:
        v = todo.pop()
        i = producer.get(v)
        if i is None or i in seen:
            continue
        seen.add(i)
        for src in nodes[i].input:
            if src and src not in stops and src in float_values:
                todo.append(src)
    return sorted(seen)


# --------------------------------------------------------------------------- the comparison

def _pair_in_order(q: "_Run", f: "_Run", matched: dict) -> dict:
    """int8 and float activations the names did not pair (a route that renames tensors between its int8 and float
    conversions: onnx2tf-flatbuffer), paired in execution order when the producing builtin op and the shapes agree.
    QUANTIZE/DEQUANTIZE outputs of the int8 model are never paired."""
    taken = set(matched.values())
    f_prod = [(int(o), str(op["op_name"])) for op in f.ops for o in op["outputs"]
              if int(o) >= 0 and int(o) not in taken]
    out, k = {}, 0
    for op in q.ops:
        name = str(op["op_name"])
        for o in (int(v) for v in op["outputs"]):
            d = q.details.get(o)
            if o < 0 or o in matched or name in ("QUANTIZE", "DEQUANTIZE") or d is None:
                continue
            if not np.issubdtype(d["dtype"], np.integer) or not d["quantization"][0]:
                continue
            shapes = [a.shape for a in q.values.get(o, [])]
            for m in range(k, len(f_prod)):
                j, fname = f_prod[m]
                if fname == name and [a.shape for a in f.values.get(j, [])] == shapes:
                    out[o], k = j, m + 1
                    break
    return out


def layer_errors(int8_path, float_path, onnx_path, x_nchw: np.ndarray, *, input_layout: str = "NHWC",
                 samples: int = 64, batch: int | None = None) -> LayerErrors:
    """Compare every activation of ``int8_path`` with ``float_path`` (a float32 .tflite converted from
    ``onnx_path`` by the same route) on the first ``samples`` of ``x_nchw`` (preprocessed float32 N,C,H,W);
    name them by the ONNX graph's nodes. ``batch``: inputs per invoke for a dynamic-batch model (default: all
    samples at once, one at a time when the kernels refuse that batch); a fixed-batch model uses its own."""
    t0 = time.perf_counter()
    int8_path, float_path, onnx_path = Path(int8_path), Path(float_path), Path(onnx_path)
    for p in (int8_path, float_path, onnx_path):
        if not p.is_file():
            raise RuntimeStageError(f"{p} does not exist; the layer-wise comparison needs the int8 .tflite, the "
                                    f"float .tflite and the ONNX model")
    if input_layout not in ("NHWC", "NCHW"):
        raise RuntimeStageError(f"input_layout {input_layout!r} is not NHWC or NCHW")
    x = np.ascontiguousarray(np.asarray(x_nchw)[:max(1, int(samples))], np.float32)
    if x.ndim != 4 or not len(x):
        raise RuntimeStageError(f"the layer-wise comparison takes N,C,H,W inputs, got shape {x.shape}")
    q, f, batch, n = _run_both(int8_path, float_path, x, input_layout, batch)
    f_names, f_acts = f.by_name(), f.activations()
    producer_op = {int(o): (int(op["index"]), op) for op in q.ops for o in op["outputs"] if int(o) >= 0}
    unmatched: dict = {"constant": 0, "int8_only": 0, "not_quantized": 0, "shape_differs": 0, "float_only": 0}
    q_acts = q.activations()
    matched: dict = {}  # int8 tensor index -> float tensor index
    for i, d in q.details.items():
        if i not in q_acts:
            unmatched["constant"] += 1
            continue
        j = f_names.get(d["name"])
        scale = d["quantization"][0] if d.get("quantization") else 0.0
        if j is None or j not in f_acts:
            unmatched["int8_only"] += 1
        elif not np.issubdtype(d["dtype"], np.integer) or not scale:
            unmatched["not_quantized"] += 1
        elif [a.shape for a in q.values[i]] != [a.shape for a in f.values[j]]:
            unmatched["shape_differs"] += 1
        else:
            matched[i] = j
    q_names = {d["name"] for i, d in q.details.items() if i in q_acts}
    unmatched["float_only"] = sum(f.details[j]["name"] not in q_names for j in f_acts)
    by_order = _pair_in_order(q, f, matched)
    matched.update(by_order)
    unmatched["int8_only"] -= len(by_order)
    unmatched["float_only"] -= len(by_order)
    unmatched["paired_in_order"] = len(by_order)

    # ONNX names by content, on the first invoke's inputs
    values, producer, nodes, sources = _onnx_values(onnx_path, x[:batch])
    stats = _stats(values)
    onnx_of = {i: _match(f.values[j][0], values, stats, producer) for i, j in matched.items()}
    stops = {v for v in onnx_of.values() if v} | sources

    sqnr: dict = {}
    rows = []
    order = [q.input_index] + [int(o) for op in q.ops for o in op["outputs"] if int(o) >= 0]
    for i in order:
        if i not in matched or i in sqnr:
            continue
        d, j = q.details[i], matched[i]
        scale, zp = float(d["quantization"][0]), int(d["quantization"][1])
        fv = np.concatenate([a.ravel() for a in f.values[j]])
        qv = np.concatenate([a.ravel() for a in q.values[i]])
        s, rmse, clip = _metrics(fv, qv, scale, zp, d["dtype"])
        c_steps, c_spread = _channels(f.values[j], scale)
        sqnr[i] = s
        if i == q.input_index:
            index, op_name, ins = -1, "INPUT", []
        else:
            index, op = producer_op[i]
            op_name, ins = str(op["op_name"]), [int(k) for k in op["inputs"] if int(k) in sqnr]
        growth = (min(sqnr[k] for k in ins) - s) if ins else None
        value = onnx_of.get(i)
        node = onnx_op = layer = layer_op = None
        fused: list = []
        if value is not None:
            if value in producer:
                n_ = nodes[producer[value]]
                node, onnx_op = n_.name or value, n_.op_type
                same = any(onnx_of.get(k) == value for k in ins)  # a layout op (TRANSPOSE) of a matched value
                idx = [] if same else _fused(value, stops - {value}, producer, nodes, values)
                fused = [nodes[k].name or nodes[k].output[0] for k in idx]
                pick = ([k for k in idx if nodes[k].op_type in WEIGHTED_OPS]
                        or [k for k in idx if nodes[k].op_type not in LAYOUT_OPS] or [producer[value]])
                layer, layer_op = nodes[pick[0]].name or nodes[pick[0]].output[0], nodes[pick[0]].op_type
            else:  # a graph input
                node, onnx_op, layer, layer_op = value, "Input", value, "Input"
        rows.append(LayerError(index=index, op=op_name, tflite_name=str(d["name"]),
                               shape=tuple(int(v) for v in d["shape"]), scale=scale, zero_point=zp, sqnr_db=s,
                               rmse_steps=rmse, clip_share=clip, growth_db=growth, onnx_node=node, onnx_op=onnx_op,
                               layer=layer, layer_op=layer_op, fused=tuple(fused),
                               inputs=tuple(str(q.details[k]["name"]) for k in ins), channel_steps=c_steps,
                               channel_spread=c_spread))
    return LayerErrors(rows=tuple(rows), unmatched=unmatched, samples=n, batch=batch,
                       seconds=time.perf_counter() - t0, tflite_tensors=len(q.details))
