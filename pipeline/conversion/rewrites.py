"""ONNX graph rewrites for known ONNX -> fully-int8 TFLite conversion blockers.

Each rewrite is a registered :class:`Rewrite`: a ``name``, a short ``why``, ``applies(model)``,
``apply(model)`` (a new ``onnx.ModelProto``; the argument is left untouched) and whether it is exact.
:func:`apply_rewrites` applies the requested ones that match, one after the other, checks every step
(``onnx.checker``, same graph input/output names and shapes) and measures what each changed: FP32 outputs
of onnxruntime before and after the step, on real inputs. An exact rewrite that moves the outputs by more
than float rounding, or an approximate one beyond its stated tolerance, is an error, not a record.

Rewrites read only the ONNX graph: no user code, no network. Shapes a rewrite needs and the graph does not
state (torch.onnx.export computes reshape targets from ``Shape`` at run time) are probed by running the graph
in onnxruntime on zeros at batch 1.

What each blocker is (measured with onnx2tf 1.28.8 + TFLiteConverter, TF 2.21, LiteRT 2.3):

- ``maxpool_pad``: torch exports ``nn.MaxPool2d(padding=p)`` as a MaxPool with ``pads``; onnx2tf turns those
  pads into a PADV2 whose pad value is float32's lowest (-3.4e38), so the int8 range of the pooled tensor gets
  a scale of about 1e36 (a wrong model at best; LiteRT aborts in AllocateTensors on resnet18/googlenet).
- ``gelu_tanh`` / ``gelu_sigmoid``: GELU is exported with Erf, and TFLite has no int8 Erf kernel.
- ``layernorm``: onnx2tf 1.28 cannot convert LayerNormalization under a dynamic batch ("Eager execution of
  tf.constant with unsupported shape"); the decomposed form has Pow and Sqrt, which have no int8 kernels.
- ``channel_shuffle``: the Reshape-Transpose-Reshape of a channel shuffle goes through a 5-D tensor whose shape
  torch computes from the dynamic batch; onnx2tf mixes up its axes and the next Conv fails.
- ``pad_into_conv``: a zero Pad in front of a Conv (``F.pad``) moved into the Conv's own pads.
- ``broadcast_rank``: a lower-rank constant operand of an elementwise op (an attention bias [H, T, T] added to
  [N, H, T, T]) made full rank, so onnx2tf's NCHW -> NHWC handling sees matching ranks.
- ``static_reshape``: reshape targets computed from ``Shape`` made constants (-1 for the batch axis).
- ``div_guard`` (approximate, only after the failure it answers): LiteRT's int8 DIV stops at run time on a divisor
  element at its zero point, which a never-negative computed divisor (a linear attention's normaliser where ReLU
  zeroes a query: efficientvit) has wherever it is below half an int8 step; the divisor gets a floor of two
  steps of its range on the calibration set.

:func:`fixed_batch` (not a registered rewrite: it changes the graph's input shape) writes a copy of a
dynamic-batch ONNX with a fixed batch and its shape subgraphs folded, for converters that fail on a dynamic batch.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import ConversionError, UsageError


class RewriteError(ConversionError):
    """A rewrite produced an invalid graph or changed the model's outputs beyond its tolerance."""


@dataclass(frozen=True)
class RewriteRecord:
    name: str
    nodes_changed: int  # ONNX nodes of the source graph the rewrite replaced or edited
    node_names: tuple[str, ...]  # the first few of them
    max_abs_diff: float  # FP32 outputs (onnxruntime), graph before vs after this rewrite, on the check inputs
    top1_agreement: float  # argmax of the first output, before vs after
    exact: bool  # whether the rewrite is mathematically exact (then max_abs_diff is float rounding)
    tolerance: float  # the max_abs_diff the rewrite is allowed (checked)
    samples: int

    def describe(self) -> dict:
        return {"name": self.name, "nodes_changed": self.nodes_changed, "node_names": list(self.node_names),
                "max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement, "exact": self.exact,
                "tolerance": self.tolerance, "samples": self.samples}


@dataclass(frozen=True)
class Rewrite:
    name: str
    why: str
    exact: bool
    match: Callable  # (Graph) -> list of match objects; each has .names (the ONNX node names it changes)
    rebuild: Callable  # (Graph, matches) -> None, edits the Graph in place
    # Allowed max abs FP32 difference: atol + rtol * max |output|. Exact rewrites: float rounding.
    atol: float = 1e-5
    rtol: float = 1e-5

    def matches(self, model, inputs: np.ndarray | None = None) -> list:
        return self.match(Graph(model, inputs))

    def applies(self, model, inputs: np.ndarray | None = None) -> bool:
        return bool(self.matches(model, inputs))

    def node_names(self, model, inputs: np.ndarray | None = None) -> list[str]:
        return [n for m in self.matches(model, inputs) for n in m.names]

    def apply(self, model, inputs: np.ndarray | None = None):
        """``inputs``: real preprocessed inputs, for a rewrite whose constants come from the values the graph
        computes (``div_guard``); the others read the graph only."""
        g = Graph(_copy(model), inputs)
        found = self.match(g)
        if found:
            self.rebuild(g, found)
        return g.finish()

    def tolerance(self, reference_outputs: list[np.ndarray]) -> float:
        scale = max((float(np.abs(o).max()) for o in reference_outputs if o.size), default=0.0)
        return self.atol + self.rtol * scale


REWRITES: dict[str, Rewrite] = {}


def register(rw: Rewrite) -> Rewrite:
    REWRITES[rw.name] = rw
    return rw


def get_rewrite(name: str) -> Rewrite:
    if name not in REWRITES:
        raise UsageError(f"unknown rewrite {name!r}; choose from {', '.join(REWRITES)}")
    return REWRITES[name]


# --------------------------------------------------------------------------- graph helpers

def _copy(model):
    import onnx
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


class Graph:
    """A mutable view of one model's main graph: producers, consumers, constants, new names, node edits."""

    def __init__(self, model, inputs: np.ndarray | None = None):
        import onnx
        from onnx import numpy_helper
        self.model = model
        self.inputs = inputs  # real inputs (apply_rewrites' check inputs), or None
        self.g = model.graph
        self.opset = _opset(model)
        self.nodes = list(self.g.node)
        self.inits = {t.name: t for t in self.g.initializer}
        self.consts: dict[str, np.ndarray] = {}
        for n in self.nodes:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1:
                a = n.attribute[0]
                if a.name == "value":
                    self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int"):
                    self.consts[n.output[0]] = np.asarray(onnx.helper.get_attribute_value(a))
                elif a.name in ("value_floats", "value_ints"):
                    self.consts[n.output[0]] = np.asarray(onnx.helper.get_attribute_value(a))
        self.graph_outputs = {o.name for o in self.g.output}
        self.graph_inputs = {i.name for i in self.g.input}
        self._names = {v for n in self.nodes for v in (*n.input, *n.output, n.name)} | set(self.inits) \
            | self.graph_inputs | self.graph_outputs
        self.removed: set[int] = set()  # id(node)
        self.before: dict[int, list] = {}  # id(anchor node) -> nodes to insert before it
        self._probe: dict | None = None
        self._reindex()

    def _reindex(self):
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)

    # values
    def const(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper
        if name in self.consts:
            return self.consts[name]
        if name in self.inits and name not in self.graph_inputs:
            return numpy_helper.to_array(self.inits[name])
        return None

    def fold(self, name: str, _depth: int = 0) -> np.ndarray | None:
        """The value of ``name`` when it depends on constants only (e.g. torch's computed Pad pads), else None."""
        v = self.const(name)
        if v is not None or _depth > 40:
            return v
        n = self.producer.get(name)
        if n is None or n.domain not in ("", "ai.onnx") or n.op_type in ("Shape", "Size", "RandomNormal",
                                                                         "RandomUniform", "RandomNormalLike",
                                                                         "RandomUniformLike", "Multinomial"):
            return None
        feeds = {}
        for i in n.input:
            if i:
                val = self.fold(i, _depth + 1)
                if val is None:
                    return None
                feeds[i] = val
        try:
            from onnx.reference import ReferenceEvaluator
            outs = ReferenceEvaluator(n).run(None, feeds)
        except Exception:  # noqa: BLE001 - an op the reference runtime cannot run: not foldable
            return None
        for o, val in zip(n.output, outs):
            self.consts[o] = np.asarray(val)
        return self.consts.get(name)

    def probe(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every tensor at batch 1, by running the graph on zeros in onnxruntime ({} if it cannot)."""
        if self._probe is None:
            self._probe = probe_values(self.model, 1, shapes_only=True)
        return self._probe

    def only_consumer(self, name: str, op_type: str | tuple):
        cons = self.consumers.get(name, [])
        types = (op_type,) if isinstance(op_type, str) else op_type
        if len(cons) == 1 and cons[0].op_type in types and name not in self.graph_outputs:
            return cons[0]
        return None

    def attr(self, node, name: str, default=None):
        import onnx
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def set_attr(self, node, name: str, value) -> None:
        import onnx
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                break
        node.attribute.append(onnx.helper.make_attribute(name, value))

    # edits
    def name(self, base: str) -> str:
        base = base.lstrip("/") or "rw"
        for k in itertools.count():
            cand = f"{base}_rw{k}" if k else f"{base}_rw"
            if cand not in self._names:
                self._names.add(cand)
                return cand
        raise AssertionError

    def constant(self, base: str, value) -> str:
        from onnx import numpy_helper
        name = self.name(base)
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def node(self, op_type: str, inputs: list[str], base: str, outputs: list[str] | None = None, **attrs):
        import onnx
        outs = outputs if outputs is not None else [self.name(base + "_out")]
        return onnx.helper.make_node(op_type, inputs, outs, name=self.name(base), **attrs)

    def insert_before(self, anchor, new_nodes: list) -> None:
        self.before.setdefault(id(anchor), []).extend(new_nodes)

    def remove(self, *nodes) -> None:
        for n in nodes:
            self.removed.add(id(n))

    def reduce_mean(self, x: str, axes: list[int], base: str, out: str | None = None):
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.constant(base + "_axes", np.asarray(axes, np.int64))], base,
                             [out] if out else None, keepdims=1)
        return self.node("ReduceMean", [x], base, [out] if out else None, axes=axes, keepdims=1)

    def finish(self):
        out = []
        for n in self.nodes:
            out.extend(self.before.get(id(n), []))
            if id(n) not in self.removed:
                out.append(n)
        del self.g.node[:]
        self.g.node.extend(out)
        _drop_unused(self.model)
        return self.model


def _drop_unused(model) -> None:
    """Remove nodes whose outputs nobody reads and initializers nobody uses (left over by a rewrite)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed.update(i for i in n.input if i)
            for a in n.attribute:  # subgraphs (If/Loop) read outer names
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    needed.update(i for sn in sub.node for i in sn.input)
    keep.reverse()
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed or t.name in {i.name for i in g.input}]
    if len(inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(inits)


def elem_types(model) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference (the graph as is where inference fails)."""
    import onnx
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001
        inferred = model
    types = {}
    for vi in itertools.chain(inferred.graph.value_info, inferred.graph.input, inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _input_shape(model, batch: int) -> tuple[int, ...] | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = []
    for k, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        elif k == 0:
            shape.append(batch)
        else:
            return None
    return tuple(shape)


def exposed_session(model, names=None, optimize: bool = False):
    """An onnxruntime CPU session of ``model`` whose outputs also hold the tensors ``names`` (None: every tensor
    a node computes whose type is known). Graph optimizations off unless ``optimize``."""
    import onnx
    import onnxruntime as ort
    m = _copy(model)
    types = elem_types(m)
    have = {o.name for o in m.graph.output}
    wanted = [o for n in m.graph.node for o in n.output if o and o in types] if names is None else names
    for name in wanted:
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT),
                                                                     None))
            have.add(name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def probe_values(model, batch: int, shapes_only: bool) -> dict:
    """Every tensor the graph computes, at batch ``batch`` on zeros (onnxruntime): name -> shape (or value)."""
    import onnx
    init_names = {t.name for t in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(real_inputs) != 1:
        return {}
    shape = _input_shape(model, batch)
    if shape is None:
        return {}
    try:
        sess = exposed_session(model)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(real_inputs[0].type.tensor_type.elem_type)
        vals = sess.run(None, {real_inputs[0].name: np.zeros(shape, dtype)})
    except Exception:  # noqa: BLE001
        return {}
    names = [o.name for o in sess.get_outputs()]
    if shapes_only:
        return {k: tuple(np.shape(v)) for k, v in zip(names, vals)}
    return dict(zip(names, vals))


@dataclass
class _Match:
    names: list[str]
    data: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- maxpool_pad

_NONNEG_OPS = {"Relu", "Sigmoid", "Softmax", "HardSigmoid", "Abs", "Exp", "Softplus"}
_PASS_OPS = {"MaxPool", "Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "AveragePool",
             "GlobalAveragePool", "GlobalMaxPool", "Resize", "Slice", "Gather", "Split"}


def _nonnegative(g: Graph, name: str, depth: int = 0) -> bool:
    """Whether ``name`` is provably >= 0 (a ReLU, a clip at >= 0, a sigmoid, ... or a pooling/reshape of one)."""
    if depth > 20:
        return False
    n = g.producer.get(name)
    if n is None:
        c = g.const(name)
        return c is not None and bool((c >= 0).all())
    if n.op_type in _NONNEG_OPS:
        return True
    if n.op_type == "Clip":
        lo = g.attr(n, "min") if g.opset < 11 else (g.fold(n.input[1]) if len(n.input) > 1 and n.input[1] else None)
        return lo is not None and float(np.min(lo)) >= 0
    if n.op_type in _PASS_OPS:
        return _nonnegative(g, n.input[0], depth + 1)
    if n.op_type == "Concat":
        return all(_nonnegative(g, i, depth + 1) for i in n.input)
    if n.op_type in ("Mul", "Add") and len(n.input) == 2:
        return all(_nonnegative(g, i, depth + 1) for i in n.input)
    return False


def _safe_pad_mode(g: Graph, x: str, dilations) -> str | None:
    """How to pad the input of a max pool without a -inf pad value, exactly: 0 for a non-negative input, else
    replicating the edge (exact for dilation 1: every window holding a padded cell holds the edge cell too)."""
    if _nonnegative(g, x):
        return "zero"
    if all(d == 1 for d in (dilations or [1])):
        return "edge"
    return None


def _ceil_pads(g: Graph, n, kernel: list, pads: list) -> list | None:
    """``pads`` plus the end padding that makes a ceil-mode pool's output size come out of floor mode (PyTorch's
    rule: the last window starts inside the input or its begin padding), or None without static spatial dims."""
    shape = g.probe().get(n.input[0])
    k = len(kernel)
    if not shape or len(shape) != k + 2:
        return None
    strides = list(g.attr(n, "strides") or [1] * k)
    dil = list(g.attr(n, "dilations") or [1] * k)
    out = list(pads)
    for i in range(k):
        size, pb, pe = shape[2 + i], pads[i], pads[k + i]
        eff = dil[i] * (kernel[i] - 1) + 1
        n_out = -(-(size + pb + pe - eff) // strides[i]) + 1
        if (n_out - 1) * strides[i] >= size + pb:
            n_out -= 1
        out[k + i] = pe + max(0, (n_out - 1) * strides[i] + eff - (size + pb + pe))
    return out


def _maxpool_pad_match(g: Graph) -> list:
    found = []
    for n in g.nodes:
        if n.op_type != "MaxPool" or len(n.output) > 1 and n.output[1]:
            continue
        kernel = list(g.attr(n, "kernel_shape") or [])
        pads = list(g.attr(n, "pads") or [0] * (2 * len(kernel)))
        auto = g.attr(n, "auto_pad", b"NOTSET")
        if auto not in (b"NOTSET", "NOTSET") or not kernel:
            continue
        if g.attr(n, "ceil_mode", 0):  # ceil mode: onnx2tf pads the end with -3.4e38 too; make that padding explicit
            pads = _ceil_pads(g, n, kernel, pads)
            if pads is None:
                continue
        if not any(pads):
            continue
        mode = _safe_pad_mode(g, n.input[0], g.attr(n, "dilations"))
        if mode:
            found.append(_Match([n.name], {"node": n, "pads": pads, "mode": mode}))
    # an explicit Pad with a -inf (or huge negative) value feeding max pools only
    for n in g.nodes:
        if n.op_type != "Pad" or (g.attr(n, "mode", b"constant") not in (b"constant", "constant")):
            continue
        value = g.fold(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if value is None or not float(np.asarray(value).ravel()[0]) < -1e30:
            continue
        cons = g.consumers.get(n.output[0], [])
        if not cons or n.output[0] in g.graph_outputs or any(c.op_type != "MaxPool" for c in cons):
            continue
        dil = [d for c in cons for d in (g.attr(c, "dilations") or [1])]
        mode = _safe_pad_mode(g, n.input[0], dil)
        if mode:
            found.append(_Match([n.name], {"node": n, "mode": mode, "explicit": True}))
    return found


def _maxpool_pad_rebuild(g: Graph, found: list) -> None:
    for m in found:
        n, mode = m.data["node"], m.data["mode"]
        if m.data.get("explicit"):
            if mode == "zero":
                n.input[2] = g.constant(n.name + "_value", np.zeros((), g.fold(n.input[2]).dtype))
            else:
                n.input[2] = ""
                g.set_attr(n, "mode", "edge")
            continue
        pads = m.data["pads"]
        k = len(pads) // 2
        full = np.asarray([0, 0, *pads[:k], 0, 0, *pads[k:]], np.int64)
        padded = g.name(n.output[0] + "_padded")
        inputs = [n.input[0], g.constant(n.name + "_pads", full)]
        attrs = {"mode": "constant"} if mode == "zero" else {"mode": "edge"}
        g.insert_before(n, [g.node("Pad", inputs, n.name + "_pad", [padded], **attrs)])
        n.input[0] = padded
        g.set_attr(n, "pads", [0] * len(pads))
        g.set_attr(n, "ceil_mode", 0)


register(Rewrite(
    "maxpool_pad", exact=True, match=_maxpool_pad_match, rebuild=_maxpool_pad_rebuild,
    why="onnx2tf pads a padded MaxPool with float32's lowest value (PADV2 -3.4e38): the int8 scale of that tensor "
        "becomes ~1e36 and LiteRT aborts or the model is wrong; pad with 0 (input >= 0, e.g. after ReLU) or "
        "replicate the edge instead, both exact for max pooling"))


# --------------------------------------------------------------------------- pad_into_conv

def _pad_into_conv_match(g: Graph) -> list:
    found = []
    for n in g.nodes:
        if n.op_type != "Pad" or g.attr(n, "mode", b"constant") not in (b"constant", "constant"):
            continue
        if g.opset < 11:
            pads = g.attr(n, "pads")
            value = g.attr(n, "value", 0.0)
        else:
            pads = g.fold(n.input[1]) if len(n.input) > 1 else None
            value = g.fold(n.input[2]) if len(n.input) > 2 and n.input[2] else 0.0
        if pads is None or value is None or float(np.asarray(value).ravel()[0]) != 0.0:
            continue
        if len(n.input) > 3 and n.input[3]:  # opset-18 axes: only the spatial-axes-only case is not worth it
            continue
        pads = [int(p) for p in np.asarray(pads).ravel()]
        r = len(pads) // 2
        if r < 3 or any(pads[i] for i in (0, 1, r, r + 1)) or any(p < 0 for p in pads):
            continue
        cons = g.consumers.get(n.output[0], [])
        if not cons or n.output[0] in g.graph_outputs or any(
                c.op_type != "Conv" or c.input[0] != n.output[0]
                or g.attr(c, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") for c in cons):
            continue
        found.append(_Match([n.name] + [c.name for c in cons], {"pad": n, "convs": cons, "pads": pads}))
    return found


def _pad_into_conv_rebuild(g: Graph, found: list) -> None:
    for m in found:
        pads = m.data["pads"]
        r = len(pads) // 2
        begin, end = pads[2:r], pads[r + 2:]
        for c in m.data["convs"]:
            own = list(g.attr(c, "pads") or [0] * (2 * (r - 2)))
            k = len(own) // 2
            g.set_attr(c, "pads", [own[i] + begin[i] for i in range(k)] + [own[k + i] + end[i] for i in range(k)])
            c.input[0] = m.data["pad"].input[0]
        g.remove(m.data["pad"])


register(Rewrite(
    "pad_into_conv", exact=True, match=_pad_into_conv_match, rebuild=_pad_into_conv_rebuild,
    why="a zero Pad in front of a Conv (F.pad) is a separate PAD op with its own int8 tensor, and its pads are a "
        "computed subgraph onnx2tf may apply to the wrong axis; the Conv's own pads do the same, exactly"))


# --------------------------------------------------------------------------- GELU

_SQRT2 = float(np.sqrt(2.0))


def _scalar(g: Graph, name: str) -> float | None:
    v = g.fold(name)
    if v is None or np.size(v) != 1:
        return None
    return float(np.asarray(v).ravel()[0])


def _other(node, name: str) -> str | None:
    ins = list(node.input)
    if len(ins) != 2 or name not in ins:
        return None
    return ins[1] if ins[0] == name else ins[0]


def _near(v: float | None, target: float, tol: float = 1e-3) -> bool:
    return v is not None and abs(v - target) <= tol * abs(target)


def _gelu_match(g: Graph) -> list:
    """GELU as exported: 0.5 * x * (1 + erf(x / sqrt(2))) in any multiplication order, or the Gelu op."""
    found = []
    for n in g.nodes:
        if n.op_type == "Gelu" and n.domain in ("", "ai.onnx") and g.attr(n, "approximate", b"none") in (b"none", "none"):
            found.append(_Match([n.name], {"x": n.input[0], "out": n.output[0], "remove": [n], "anchor": n}))
            continue
        if n.op_type != "Erf":
            continue
        pre = g.producer.get(n.input[0])
        if pre is None or pre.op_type not in ("Div", "Mul") or g.only_consumer(pre.output[0], "Erf") is None:
            continue
        x = None
        for cand in pre.input:
            c = _scalar(g, _other(pre, cand) or "")
            if pre.op_type == "Div" and pre.input[0] == cand and _near(c, _SQRT2):
                x = cand
            elif pre.op_type == "Mul" and _near(c, 1 / _SQRT2):
                x = cand
        if x is None:
            continue
        add = g.only_consumer(n.output[0], "Add")
        if add is None or not _near(_scalar(g, _other(add, n.output[0])), 1.0):
            continue
        mul = g.only_consumer(add.output[0], "Mul")
        if mul is None:
            continue
        other = _other(mul, add.output[0])
        remove = [pre, n, add, mul]
        if other == x:  # (x * (1 + erf)) * 0.5
            half = g.only_consumer(mul.output[0], "Mul")
            if half is None or not _near(_scalar(g, _other(half, mul.output[0])), 0.5):
                continue
            remove.append(half)
            out = half.output[0]
        else:  # (x * 0.5) * (1 + erf)
            h = g.producer.get(other)
            if h is None or h.op_type != "Mul" or _other(h, x) is None or not _near(_scalar(g, _other(h, x)), 0.5) \
                    or len(g.consumers.get(h.output[0], [])) != 1:
                continue
            remove.append(h)
            out = mul.output[0]
        anchor = max(remove, key=lambda r: next(i for i, m in enumerate(g.nodes) if m is r))
        found.append(_Match([r.name for r in remove], {"x": x, "out": out, "remove": remove, "anchor": anchor}))
    return found


def _np_float(g: Graph, x: str):
    return np.float16 if elem_types(g.model).get(x) == 10 else np.float32


def _gelu_rebuild(form: str):
    def rebuild(g: Graph, found: list) -> None:
        for m in found:
            x, out, base = m.data["x"], m.data["out"], m.data["remove"][-1].name or "gelu"
            f = _np_float(g, x)
            nodes = []

            def op(t, ins, outs=None):
                nodes.append(g.node(t, ins, base + "_" + t.lower(), outs))
                return nodes[-1].output[0]

            if form == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                x2 = op("Mul", [x, x])
                x3 = op("Mul", [x2, x])
                inner = op("Add", [x, op("Mul", [x3, g.constant(base + "_c", f(0.044715))])])
                t = op("Tanh", [op("Mul", [inner, g.constant(base + "_k", f(np.sqrt(2 / np.pi)))])])
                op("Mul", [op("Mul", [x, g.constant(base + "_half", f(0.5))]),
                           op("Add", [t, g.constant(base + "_one", f(1.0))])], [out])
            else:  # x * sigmoid(1.702 x)
                s = op("Sigmoid", [op("Mul", [x, g.constant(base + "_k", f(1.702))])])
                op("Mul", [x, s], [out])
            g.insert_before(m.data["anchor"], nodes)
            g.remove(*m.data["remove"])
    return rebuild


register(Rewrite(
    "gelu_tanh", exact=False, match=_gelu_match, rebuild=_gelu_rebuild("tanh"), atol=1e-3, rtol=1e-3,
    why="TFLite has no int8 Erf kernel; GELU's tanh approximation (max abs error 5e-4 per activation) uses "
        "MUL/ADD/TANH, all int8"))
register(Rewrite(
    "gelu_sigmoid", exact=False, match=_gelu_match, rebuild=_gelu_rebuild("sigmoid"), atol=5e-2, rtol=5e-2,
    why="TFLite has no int8 Erf kernel; x*sigmoid(1.702x) (max abs error 0.02 per activation) needs only "
        "MUL and LOGISTIC, int8 lookup tables"))


# --------------------------------------------------------------------------- LayerNorm

def _last_axis(g: Graph, x: str, axes) -> bool:
    rank = len(g.probe().get(x, ())) or None
    axes = [int(a) for a in np.asarray(axes).ravel()]
    if axes == [-1]:
        return True
    return rank is not None and len(axes) == 1 and axes[0] == rank - 1


def _reduce_axes(g: Graph, n):
    if g.opset >= 18 and len(n.input) > 1 and n.input[1]:
        return g.fold(n.input[1])
    return g.attr(n, "axes")


def _layernorm_match(g: Graph) -> list:
    found = []
    for n in g.nodes:
        if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx"):
            if len(n.output) > 1 and any(o for o in n.output[1:]):
                continue
            if not _last_axis(g, n.input[0], [g.attr(n, "axis", -1)]):
                continue
            bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
            found.append(_Match([n.name], {"x": n.input[0], "out": n.output[0], "eps": g.attr(n, "epsilon", 1e-5),
                                           "scale": n.input[1], "bias": bias,
                                           "remove": [n], "anchor": n}))
            continue
        # decomposed: (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) [* scale] [+ bias]
        if n.op_type != "Sqrt":
            continue
        add = g.producer.get(n.input[0])
        if add is None or add.op_type != "Add":
            continue
        var = next((g.producer.get(i) for i in add.input if g.producer.get(i) is not None
                    and g.producer[i].op_type == "ReduceMean"), None)
        if var is None:
            continue
        eps = _scalar(g, _other(add, var.output[0]) or "")
        sq = g.producer.get(var.input[0])
        if eps is None or sq is None or not _last_axis(g, var.input[0], _reduce_axes(g, var) or [-2]):
            continue
        if sq.op_type == "Pow" and _near(_scalar(g, sq.input[1]), 2.0):
            d = sq.input[0]
        elif sq.op_type == "Mul" and sq.input[0] == sq.input[1]:
            d = sq.input[0]
        else:
            continue
        sub = g.producer.get(d)
        if sub is None or sub.op_type != "Sub":
            continue
        mean = g.producer.get(sub.input[1])
        if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0] \
                or not _last_axis(g, mean.input[0], _reduce_axes(g, mean) or [-2]):
            continue
        div = g.only_consumer(n.output[0], "Div")
        if div is None or list(div.input) != [d, n.output[0]]:
            continue
        if {c.name for c in g.consumers.get(d, [])} != {sq.name, div.name} or any(
                len(g.consumers.get(v.output[0], [])) != 1 for v in (sq, var, add)):
            continue
        found.append(_Match([r.name for r in (mean, sub, sq, var, add, n, div)],
                            {"x": sub.input[0], "out": div.output[0], "eps": eps, "scale": None, "bias": None,
                             "remove": [mean, sub, sq, var, add, n, div], "anchor": div}))
    return found


def _layernorm_rebuild(g: Graph, found: list) -> None:
    for m in found:
        x, out, base = m.data["x"], m.data["out"], m.data["anchor"].name or "layernorm"
        f = _np_float(g, x)
        nodes = []

        def op(t, ins, outs=None, **kw):
            nodes.append(g.node(t, ins, base + "_" + t.lower(), outs, **kw))
            return nodes[-1].output[0]

        mean = g.reduce_mean(x, [-1], base + "_mean")
        nodes.append(mean)
        d = op("Sub", [x, mean.output[0]])
        var = g.reduce_mean(op("Mul", [d, d]), [-1], base + "_var")
        nodes.append(var)
        veps = op("Add", [var.output[0], g.constant(base + "_eps", f(m.data["eps"]))])
        tail = [t for t in (m.data["scale"], m.data["bias"]) if t]
        # d / sqrt(v): TFLiteConverter turns it into d * RSQRT(v) (int8 kernels, measured); 1/sqrt(v) as a
        # Reciprocal became SQRT + DIV instead
        y = op("Div", [d, op("Sqrt", [veps])], None if tail else [out])
        if m.data["scale"]:
            y = op("Mul", [y, m.data["scale"]], None if m.data["bias"] else [out])
        if m.data["bias"]:
            op("Add", [y, m.data["bias"]], [out])
        g.insert_before(m.data["anchor"], nodes)
        g.remove(*m.data["remove"])


register(Rewrite(
    "layernorm", exact=True, match=_layernorm_match, rebuild=_layernorm_rebuild, atol=1e-4, rtol=1e-4,
    why="onnx2tf 1.28 cannot convert LayerNormalization under a dynamic batch, and the decomposed form's Pow/Sqrt "
        "have no int8 kernels; ReduceMean, Sub, (x-mean)^2 as a Mul, Add and (x-mean)/sqrt(var+eps) convert to "
        "MEAN/SUB/MUL/ADD/RSQRT, all int8"))


# --------------------------------------------------------------------------- L2 normalisation

def _l2_normalize_match(g: Graph) -> list:
    """F.normalize(x, dim) as torch exports it: Div(x, Expand(Clip(ReduceL2(x, axes, keepdims=1), min=eps),
    Shape(x))), the Expand optional (edgenext's cross-covariance attention normalises q and k)."""
    found = []
    for n in g.nodes:
        if n.op_type != "ReduceL2" or g.attr(n, "keepdims", 1) != 1:
            continue
        axes = _reduce_axes(g, n)
        if axes is None or len(n.input) < 1:
            continue
        clip = g.only_consumer(n.output[0], "Clip")
        if clip is None:
            continue
        eps = _scalar(g, clip.input[1]) if len(clip.input) > 1 and clip.input[1] else g.attr(clip, "min")
        has_max = (len(clip.input) > 2 and clip.input[2]) or g.attr(clip, "max") is not None
        if eps is None or eps < 0 or has_max:
            continue
        nxt, expand = clip, None
        e = g.only_consumer(clip.output[0], "Expand")
        if e is not None:  # to x's own shape: Shape(x), or that shape as a constant (a fixed-batch graph)
            shape_node = g.producer.get(e.input[1])
            if shape_node is not None and shape_node.op_type == "Shape":
                if shape_node.input[0] != n.input[0]:
                    continue
            else:
                target = g.fold(e.input[1])
                if target is None or tuple(int(v) for v in np.asarray(target).ravel()) != \
                        tuple(g.probe().get(n.input[0], ())):
                    continue
            nxt, expand = e, e
        div = g.only_consumer(nxt.output[0], "Div")
        if div is None or list(div.input) != [n.input[0], nxt.output[0]]:
            continue
        chain = [n, clip, *([expand] if expand is not None else []), div]
        found.append(_Match([r.name for r in chain], {"x": n.input[0], "out": div.output[0], "eps": float(eps),
                                                      "axes": [int(a) for a in np.asarray(axes).ravel()],
                                                      "remove": chain, "anchor": div}))
    return found


def _l2_normalize_rebuild(g: Graph, found: list) -> None:
    for m in found:
        x, out, base = m.data["x"], m.data["out"], m.data["anchor"].name or "l2_normalize"
        f = _np_float(g, x)
        sq = g.node("Mul", [x, x], base + "_sq")
        axes = np.asarray(m.data["axes"], np.int64)
        if g.opset >= 13:
            ss = g.node("ReduceSum", [sq.output[0], g.constant(base + "_axes", axes)], base + "_sum", keepdims=1)
        else:
            ss = g.node("ReduceSum", [sq.output[0]], base + "_sum", axes=list(axes), keepdims=1)
        floor = g.node("Max", [ss.output[0], g.constant(base + "_eps2", f(m.data["eps"]) ** 2)], base + "_max")
        root = g.node("Sqrt", [floor.output[0]], base + "_sqrt")
        # x / sqrt(v): TFLiteConverter makes it x * RSQRT(v), int8 kernels (as for layernorm)
        div = g.node("Div", [x, root.output[0]], base + "_div", [out])
        g.insert_before(m.data["anchor"], [sq, ss, floor, root, div])
        g.remove(*m.data["remove"])


register(Rewrite(
    "l2_normalize", exact=True, match=_l2_normalize_match, rebuild=_l2_normalize_rebuild, atol=1e-4, rtol=1e-4,
    why="F.normalize exports as x / max(ReduceL2(x), eps): a DIV whose int8 kernel refuses some divisors at run "
        "time; x / sqrt(max(sum(x*x), eps^2)) is the same value and converts to MUL, SUM, MAXIMUM and RSQRT"))


# --------------------------------------------------------------------------- channel shuffle

def _channel_shuffle_match(g: Graph) -> list:
    found = []
    shapes = None
    for n in g.nodes:
        if n.op_type != "Reshape":
            continue
        tr = g.only_consumer(n.output[0], "Transpose")
        if tr is None or list(g.attr(tr, "perm") or []) != [0, 2, 1, 3, 4]:
            continue
        r2 = g.only_consumer(tr.output[0], "Reshape")
        if r2 is None:
            continue
        shapes = shapes if shapes is not None else g.probe()
        s_in, s_mid, s_out = shapes.get(n.input[0]), shapes.get(n.output[0]), shapes.get(r2.output[0])
        if not s_in or not s_mid or len(s_in) != 4 or len(s_mid) != 5 or s_out != s_in:
            continue
        c, groups, per = s_in[1], s_mid[1], s_mid[2]
        if s_mid[0] != s_in[0] or groups * per != c or tuple(s_mid[3:]) != tuple(s_in[2:]):
            continue
        idx = np.arange(c).reshape(groups, per).T.reshape(-1).astype(np.int64)
        found.append(_Match([n.name, tr.name, r2.name], {"x": n.input[0], "nodes": (n, tr, r2), "idx": idx}))
    return found


def _channel_shuffle_rebuild(g: Graph, found: list) -> None:
    for m in found:
        n, tr, r2 = m.data["nodes"]
        idx = g.constant((r2.name or "shuffle") + "_perm", m.data["idx"])
        g.insert_before(r2, [g.node("Gather", [m.data["x"], idx], (r2.name or "shuffle") + "_gather",
                                    [r2.output[0]], axis=1)])
        g.remove(n, tr, r2)


register(Rewrite(
    "channel_shuffle", exact=True, match=_channel_shuffle_match, rebuild=_channel_shuffle_rebuild,
    why="the Reshape-Transpose-Reshape channel shuffle goes through a 5-D tensor shaped from the dynamic batch, "
        "whose axes onnx2tf mixes up (the next Conv fails); a Gather of the channels in shuffled order is the "
        "same permutation, exact, and int8 (GATHER)"))


# --------------------------------------------------------------------------- broadcast_rank

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater"}


def _broadcast_rank_match(g: Graph) -> list:
    found = []
    shapes = None
    for n in g.nodes:
        if n.op_type not in _ELEMENTWISE or len(n.input) < 2:
            continue
        consts = [(k, g.const(i)) for k, i in enumerate(n.input)]
        low = [(k, c) for k, c in consts if c is not None and c.ndim >= 1 and c.size > 1]
        if not low:
            continue
        shapes = shapes if shapes is not None else g.probe()
        out_rank = len(shapes.get(n.output[0], ()))
        fix = [(k, c) for k, c in low if c.ndim < out_rank]
        if fix:
            found.append(_Match([n.name], {"node": n, "fix": fix, "rank": out_rank}))
    return found


def _broadcast_rank_rebuild(g: Graph, found: list) -> None:
    for m in found:
        n = m.data["node"]
        for k, c in m.data["fix"]:
            n.input[k] = g.constant(n.input[k], c.reshape((1,) * (m.data["rank"] - c.ndim) + c.shape))


register(Rewrite(
    "broadcast_rank", exact=True, match=_broadcast_rank_match, rebuild=_broadcast_rank_rebuild,
    why="a constant operand of lower rank than its elementwise op's output (an attention bias [H,T,T] added to "
        "[N,H,T,T]) leaves onnx2tf without a shape for the broadcast; the same constant at full rank (leading "
        "1s) is the same computation"))


# --------------------------------------------------------------------------- static_reshape

def _static_reshape_match(g: Graph) -> list:
    found = []
    b1 = b2 = None
    for n in g.nodes:
        if n.op_type != "Reshape" or g.fold(n.input[1]) is not None:
            continue
        if b1 is None:
            b1 = g.probe()
            b2 = probe_values(g.model, 2, shapes_only=True)
        s1, s2 = b1.get(n.output[0]), b2.get(n.output[0])
        if not s1 or not s2 or len(s1) != len(s2) or s1[0] != 1 or s2[0] != 2 or s1[1:] != s2[1:]:
            continue
        found.append(_Match([n.name], {"node": n, "shape": np.asarray([-1, *s1[1:]], np.int64)}))
    return found


def _static_reshape_rebuild(g: Graph, found: list) -> None:
    for m in found:
        n = m.data["node"]
        n.input[1] = g.constant((n.name or "reshape") + "_shape", m.data["shape"])


register(Rewrite(
    "static_reshape", exact=True, match=_static_reshape_match, rebuild=_static_reshape_rebuild,
    why="torch computes reshape targets from Shape at run time; onnx2tf cannot tell which NCHW axis each "
        "computed dimension is. Constant targets (-1 for the batch axis, probed at batch 1 and 2) keep the "
        "dynamic batch and say the rest"))


# --------------------------------------------------------------------------- applying and measuring

# --------------------------------------------------------------------------- div_guard

# LiteRT's int8 DIV refuses, at run time, a divisor element at its zero point: "div.cc:262 data[i] != zero_point".
DIV_ZERO_POINT = "data[i] != zero_point"
DIV_GUARD_STEPS = 2  # the floor, in int8 steps of the divisor's observed range [0, max]


def _values_on(model, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The values of the tensors ``names`` on the real inputs ``x`` (onnxruntime, the graph's own batch)."""
    sess = exposed_session(model, names, optimize=True)
    iname = sess.get_inputs()[0].name
    step = fixed_batch_size(model) or len(x)
    wanted = [o.name for o in sess.get_outputs()]
    parts = [dict(zip(wanted, sess.run(None, {iname: x[i:i + step]}))) for i in range(0, len(x), step)]
    return {n: np.concatenate([np.ravel(p[n]) for p in parts]) for n in names}


def _div_guard_match(g: Graph) -> list:
    """Div nodes whose divisor is computed (not a constant) and, on the real inputs, never negative: a linear
    attention's normaliser q . sum(k) + eps (efficientvit), a count, a norm. Without inputs, every Div with a
    computed divisor (what the rewrite would look at)."""
    # x / Sqrt(v) (LayerNorm, F.normalize as rewritten) becomes x * RSQRT(v) in TFLite: no DIV to guard
    cands = [n for n in g.nodes if n.op_type == "Div" and len(n.input) == 2 and g.fold(n.input[1]) is None
             and getattr(g.producer.get(n.input[1]), "op_type", None) != "Sqrt"]
    if not cands or g.inputs is None:
        return [_Match([n.name], {"div": n}) for n in cands]
    try:
        vals = _values_on(g.model, sorted({n.input[1] for n in cands}), np.ascontiguousarray(g.inputs, np.float32))
    except Exception:  # noqa: BLE001 - onnxruntime cannot run it: nothing to measure the floor on
        return []
    found = []
    for n in cands:
        v = vals[n.input[1]]
        if v.size == 0 or not np.isfinite(v).all() or float(v.min()) < 0 or float(v.max()) <= 0:
            continue
        floor = float(v.max()) * DIV_GUARD_STEPS / 255.0
        found.append(_Match([n.name], {"div": n, "floor": floor}))
    return found


def _div_guard_rebuild(g: Graph, found: list) -> None:
    for m in found:
        div, base = m.data["div"], m.data["div"].name or "div_guard"
        floor = _np_float(g, div.input[1])(m.data["floor"])
        mx = g.node("Max", [div.input[1], g.constant(base + "_floor", floor)], base + "_guard")
        new = g.node("Div", [div.input[0], mx.output[0]], base + "_guarded", list(div.output))
        g.insert_before(div, [mx, new])
        g.remove(div)


register(Rewrite(
    "div_guard", exact=False, match=_div_guard_match, rebuild=_div_guard_rebuild, atol=1e-4, rtol=0.25,
    why="LiteRT's int8 DIV stops at run time on a divisor element that quantizes to its zero point (below half "
        "an int8 step of the divisor's range: a linear attention's normaliser where ReLU zeroes a query); the "
        f"divisor gets a floor of {DIV_GUARD_STEPS} int8 steps of its range measured on real inputs, which moves "
        "only the elements int8 could not represent (the measured FP32 change is recorded)"))


# Applied before every onnx2tf conversion: exact, and without them onnx2tf 1.28 writes a PADV2 whose -3.4e38 pad
# value gets an int8 scale of ~1e36 (LiteRT aborts on resnet18; googlenet's XNNPACK refuses the model).
ALWAYS_REWRITES = ("maxpool_pad", "pad_into_conv")
DEFAULT_ORDER = ("maxpool_pad", "pad_into_conv", "gelu_tanh", "layernorm", "l2_normalize", "channel_shuffle",
                 "broadcast_rank", "static_reshape", "div_guard")
# Applied only after a failure that names it (the only approximate rewrite whose trigger is a run-time check).
ON_FAILURE = {"div_guard": DIV_ZERO_POINT}


def _run(model_bytes: bytes, x: np.ndarray, batch: int | None) -> list[np.ndarray]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    step = batch or len(x)
    parts = [sess.run(None, {name: x[i:i + step]}) for i in range(0, len(x), step)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def fixed_batch_size(model) -> int | None:
    """The graph input's fixed batch size, None when the batch is dynamic."""
    d = model.graph.input[0].type.tensor_type.shape.dim
    return d[0].dim_value if d and d[0].HasField("dim_value") else None


def _io_signature(model) -> list:
    def sig(vi):
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in vi.type.tensor_type.shape.dim)
        return vi.name, vi.type.tensor_type.elem_type, dims
    inits = {t.name for t in model.graph.initializer}
    return [sig(v) for v in model.graph.input if v.name not in inits] + [sig(v) for v in model.graph.output]


def compare(before, after, x: np.ndarray) -> tuple[float, float, list[np.ndarray]]:
    """Max abs difference of all FP32 outputs and top-1 agreement of the first, onnxruntime, on ``x``."""
    batch = fixed_batch_size(before)
    a = _run(before.SerializeToString(), x, batch)
    b = _run(after.SerializeToString(), x, batch)
    diff = max(float(np.abs(p.astype(np.float64) - q).max()) if p.size else 0.0 for p, q in zip(a, b))
    pa, pb = a[0].reshape(len(x), -1), b[0].reshape(len(x), -1)
    agree = float((pa.argmax(1) == pb.argmax(1)).mean()) if pa.shape[1] > 1 else 1.0
    return diff, agree, a


def apply_rewrites(src_path: Path, dst_path: Path, names=None, check_inputs: np.ndarray | None = None,
                   copy_unchanged: bool = True, value_inputs: np.ndarray | None = None) -> list[RewriteRecord]:
    """Apply the named rewrites (default: :data:`DEFAULT_ORDER`) that match ``src_path``, in order; write the
    result to ``dst_path`` (a copy of the source when none matched, unless ``copy_unchanged`` is False: then
    nothing is written) and return one record per applied rewrite.

    ``check_inputs`` (real preprocessed inputs, NCHW float32) measure each step: FP32 onnxruntime outputs of the
    graph before vs after it. Raises :class:`RewriteError` when a step breaks onnx.checker, changes the graph's
    input/output names or shapes, or moves the outputs beyond the rewrite's tolerance. ``value_inputs`` (default:
    ``check_inputs``): the inputs a rewrite whose constants come from the graph's values reads them on; the
    converter's own calibration set, so that they match the ranges it will quantize with."""
    import onnx
    if check_inputs is None or len(check_inputs) == 0:
        raise UsageError("apply_rewrites needs check_inputs: real preprocessed inputs to measure each rewrite on")
    x = np.ascontiguousarray(check_inputs, np.float32)
    model = onnx.load(str(src_path))
    signature = _io_signature(model)
    vx = x if value_inputs is None else np.ascontiguousarray(value_inputs, np.float32)
    records = []
    for name in (DEFAULT_ORDER if names is None else names):
        rw = get_rewrite(name)
        matched = rw.node_names(model, vx)
        if not matched:
            continue
        new = rw.apply(model, vx)
        try:
            onnx.checker.check_model(new, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise RewriteError(f"rewrite {name} made a graph onnx.checker rejects: {str(e).strip()[:200]}") from None
        if _io_signature(new) != signature:
            raise RewriteError(f"rewrite {name} changed the graph's input/output names or shapes")
        diff, agree, ref = compare(model, new, x)
        tol = rw.tolerance(ref)
        if not diff <= tol:
            raise RewriteError(f"rewrite {name} moved the FP32 outputs by {diff:.3g} (allowed {tol:.3g}) on "
                               f"{len(x)} inputs")
        records.append(RewriteRecord(name=name, nodes_changed=len(matched), node_names=tuple(matched[:5]),
                                     max_abs_diff=diff, top1_agreement=agree, exact=rw.exact, tolerance=tol,
                                     samples=len(x)))
        model = new
    if not records and not copy_unchanged:
        return records
    dst_path = Path(dst_path)
    large = model.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF
    onnx.save(model, str(dst_path), save_as_external_data=large, all_tensors_to_one_file=True,
              location=dst_path.name + ".data")
    return records


# --------------------------------------------------------------------------- fixed batch

def fixed_batch(src_path: Path, dst_path: Path, batch: int = 1) -> Path:
    """Write ``src_path`` with a fixed batch of ``batch`` on every graph input and output, and every value
    computed from shapes only (``Shape`` -> ... -> a Reshape target) folded to a constant at that batch.

    For converters that fail on a dynamic batch. The result accepts exactly ``batch`` rows: evaluation must
    feed it in batches of that size."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(src_path))
    g = model.graph
    inits = {t.name for t in g.initializer}
    for vi in [*(v for v in g.input if v.name not in inits), *g.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    values = probe_values(model, batch, shapes_only=False)
    graph = Graph(model)
    # a value is shape-only when its node reads only constants and shape-only values (Shape reads any tensor)
    shape_only: set[str] = set()
    for n in graph.nodes:
        if n.op_type == "Shape" or (n.op_type != "Constant" and n.input and all(
                (not i) or i in shape_only or graph.const(i) is not None for i in n.input)
                and n.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike")):
            shape_only.update(o for o in n.output if o)
    folded = 0
    for n in graph.nodes:
        outs = [o for o in n.output if o]
        if outs and all(o in shape_only and o in values for o in outs) and not any(
                o in graph.graph_outputs for o in outs):
            for o in outs:
                g.initializer.append(numpy_helper.from_array(np.asarray(values[o]), o))
            graph.remove(n)
            folded += 1
    graph.finish()
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst_path))
    return Path(dst_path)


def fixed_batch_record(src_path: Path, dst_path: Path, check: np.ndarray, *, why: str, batch: int = 1) -> dict:
    """:func:`fixed_batch` plus its record, in the form of a rewrite's (``describe()`` + ``why``): the FP32
    outputs of the dynamic-batch graph (``check`` in one batch) against the fixed one's (``batch`` rows at a
    time), onnxruntime. Only float rounding may separate them (batched and one-at-a-time kernels sum in
    different orders): beyond ``1e-4 + 1e-4 * max|output|`` it is a RewriteError."""
    import onnx
    fixed_batch(src_path, dst_path, batch)
    before, after = onnx.load(str(src_path)), onnx.load(str(dst_path))
    x = np.ascontiguousarray(check[:max(batch, (len(check) // batch) * batch)], np.float32)
    a = _run(before.SerializeToString(), x, None)
    b = _run(after.SerializeToString(), x, batch)
    diff = max(float(np.abs(p.astype(np.float64) - q).max()) if p.size else 0.0 for p, q in zip(a, b))
    tol = 1e-4 + 1e-4 * max((float(np.abs(o).max()) for o in a if o.size), default=0.0)
    if not diff <= tol:
        raise RewriteError(f"fixing the batch at {batch} moved the FP32 outputs by {diff:.3g} (allowed {tol:.3g})")
    pa, pb = a[0].reshape(len(x), -1), b[0].reshape(len(x), -1)
    agree = float((pa.argmax(1) == pb.argmax(1)).mean()) if pa.shape[1] > 1 else 1.0
    return {"name": "fixed_batch", "batch": batch, "nodes_changed": 0, "node_names": [], "max_abs_diff": diff,
            "top1_agreement": agree, "exact": True, "tolerance": tol, "samples": len(x), "why": why}


# --------------------------------------------------------------------------- the routes' rewrite loop

def convert_with_rewrites(convert: Callable[[Path], "object"], src: Path, check: np.ndarray, work: Path,
                          *, retry: tuple[str, ...] | None = None,
                          values: np.ndarray | None = None) -> tuple[object, list[dict]]:
    """``convert(path)`` (a route's one conversion, raising ConversionError) after the exact rewrites of
    ``ALWAYS_REWRITES``; when that fails, once more after the ``retry`` rewrites (default: the others of
    ``DEFAULT_ORDER``) that match. Returns what ``convert`` returned and the records of every rewrite applied
    (``describe()`` plus ``why``). Rewritten copies go into ``work``; ``check`` are the real inputs each rewrite
    is measured on; ``values``: the calibration set, for the rewrites that read the graph's values."""
    done: list[dict] = []
    try:
        first = apply_rewrites(src, Path(work) / "first.onnx", ALWAYS_REWRITES, check, copy_unchanged=False)
    except RewriteError:  # the model converts as exported; the error stays with the rewrite's tests
        first = []
    if first:
        src, done = Path(work) / "first.onnx", [r.describe() | {"why": "always (exact)"} for r in first]
    try:
        return convert(src), done
    except ConversionError as failed:
        called_for = [n for n in DEFAULT_ORDER if n not in ALWAYS_REWRITES and ON_FAILURE.get(n, "") in str(failed)]
        rest = retry if retry is not None else tuple(called_for)
        try:
            more = apply_rewrites(src, Path(work) / "retry.onnx", rest, check, copy_unchanged=False,
                                  value_inputs=values)
        except RewriteError as e:
            raise ConversionError(f"{failed} (a rewrite to get around it failed: {e})") from None
        if not more:
            raise
        try:
            art = convert(Path(work) / "retry.onnx")
        except ConversionError as again:
            raise ConversionError(f"{again} (after rewriting {', '.join(r.name for r in more)} because: "
                                  f"{str(failed)[:200]})") from None
        return art, done + [r.describe() | {"why": f"the conversion without it failed: {str(failed)[:200]}"}
                            for r in more]
