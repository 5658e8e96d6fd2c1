"""Route ``direct``: this project's own ONNX -> fully-int8 TFLite writer, for the ops of plain CNNs.

No TensorFlow, no onnx2tf, no PyTorch: the ONNX graph is calibrated on onnxruntime over the representative
dataset (every activation's min/max over the whole set) and written straight into a TFLite flatbuffer
(``ai_edge_litert``'s schema, object API) that follows TFLite's int8 quantization spec:

- activations int8, asymmetric, one scale and zero point per tensor, the range widened to hold 0;
- convolution and fully-connected weights int8, symmetric (zero point 0, values in [-127, 127]), one scale per
  output channel (``per_channel=False``: one per tensor); biases int32 at scale input_scale x weight_scale;
- ops whose int8 kernels require it keep their input's quantization (MAX_POOL_2D, AVERAGE_POOL_2D, PAD,
  RESHAPE, TRANSPOSE, SLICE, SPLIT_V); LOGISTIC and SOFTMAX get the fixed output scale 1/256, zero point -128;
- int8 input and output; NHWC layout for 4-D tensors (weights transposed here), with a dynamic batch when the
  ONNX graph has one.

Covered (:data:`OPS`): Conv (plain, depthwise, grouped), BatchNormalization left unfolded, Gemm and MatMul with
constant weights (+ an Add of a constant bias), Relu / Clip(0) / Clip(0, 6) (fused into the op before when it is
its only consumer), LeakyRelu, MaxPool (ceil_mode too), AveragePool, GlobalAveragePool, GlobalMaxPool, ReduceMean
over H and W, Add and Mul of two activations (with broadcast) or with a constant, Sub and Div by a constant, Pad
with zeros over H and W, Concat along channels, Slice (constant bounds, step 1) and Split along any axis but the
batch, channel shuffles (Reshape -> Transpose(0, 2, 1, 3, 4) -> Reshape; target shapes computed from the batch
size are written from the measured shapes, and a Shape -> Gather of a static dim folds to a constant), Sigmoid, HardSigmoid (alpha 1/6), HardSwish, Tanh, Softmax, Flatten and Reshape to [N, features], Identity
and Dropout.
Any other op, attribute or shape is declined before anything is written (:func:`unsupported`: one line naming
the node), and ``--converter auto`` goes on to the next route. The file is then judged like every route's:
the inspect stage's precision contract and the quick check against FP32 on LiteRT.

It converts in a worker process like every route (its imports, onnx, onnxruntime and LiteRT, are light: the
export starts it first), so an onnxruntime or LiteRT kernel that aborts fails this route with the signal named.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.conversion import TfliteArtifact, refuse_float_nodes
from pipeline.errors import ConversionError

NAME = "direct"

# ONNX op -> what the writer needs of it (checked by unsupported())
OPS = ("Conv", "Gemm", "MatMul", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
       "Add", "Mul", "Sub", "Div", "HardSigmoid", "BatchNormalization", "Concat", "LeakyRelu", "Tanh",
       "GlobalMaxPool", "Pad", "Sigmoid", "HardSwish", "Softmax", "Flatten", "Reshape", "Identity", "Dropout",
       "Constant", "Slice", "Split", "Transpose")
_PASS = ("Identity", "Dropout")
_ACT = {"Relu": "RELU", "Relu6": "RELU6"}


@dataclass
class _Q:
    scale: np.ndarray
    zero_point: np.ndarray
    dim: int = 0

    def as_t(self, schema):
        q = schema.QuantizationParametersT()
        q.scale = [float(s) for s in np.ravel(self.scale)]
        q.zeroPoint = [int(z) for z in np.ravel(self.zero_point)]
        q.quantizedDimension = int(self.dim)
        return q


def _act_q(lo: float, hi: float) -> _Q:
    """TFLite's asymmetric int8 for a tensor seen in [lo, hi] (widened to hold 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not np.isfinite(scale):
        raise ConversionError("direct route: a tensor took non-finite values on the representative dataset")
    if scale == 0.0:  # always 0: any scale holds it exactly
        scale = 1.0 / 255.0
    zp = int(np.clip(np.round(-128.0 - lo / scale), -128, 127))
    return _Q(np.array([scale], np.float64), np.array([zp], np.int64))


_TANH_OUT = _Q(np.array([1.0 / 128.0]), np.array([0]))  # TANH int8 output
_FIXED_OUT = _Q(np.array([1.0 / 256.0]), np.array([-128]))  # LOGISTIC, SOFTMAX int8 output


@dataclass
class _Val:
    """An ONNX value as written: its TFLite tensor, and whether it is a 4-D NCHW value stored as NHWC."""
    tensor: int
    nhwc: bool
    q: _Q


@dataclass
class _Graph:
    nodes: list
    consts: dict
    input: object
    output: str
    consumers: dict = field(default_factory=dict)
    shuffles: dict = field(default_factory=dict)  # tensor -> (its part of a channel shuffle, the shuffle's nodes)


CALIB_BATCH_BYTES = 1 << 28  # calibration batches hold about this much of activations (256 MiB)
_FOLD_LIMIT = 1 << 26  # bytes: a constant subgraph computing more than this is left to the other routes


def _fold(node, consts: dict, model) -> bool:
    """Evaluate ``node``, whose inputs are all constants, with onnx's reference evaluator (numpy) and store its
    outputs as constants; False when it cannot be (the node then stays, and is judged like any other)."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    ins = [i for i in node.input if i]
    if sum(consts[i].nbytes for i in ins) > _FOLD_LIMIT:
        return False
    try:
        graph = onnx.helper.make_graph(
            [node], "fold", [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(consts[i].dtype),
                                                                consts[i].shape) for i in ins],
            [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o])
        m = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        outs = ReferenceEvaluator(m).run(None, {i: consts[i] for i in ins})
    except Exception:  # noqa: BLE001 - not foldable here: left as a node
        return False
    if any(np.asarray(o).nbytes > _FOLD_LIMIT for o in outs):
        return False
    for name, v in zip([o for o in node.output if o], outs):
        consts[name] = np.asarray(v)
    return True


def _attrs(node) -> dict:
    import onnx
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _load(model) -> _Graph:
    """The graph with Constant nodes folded into constants and Identity/Dropout kept as nodes."""
    import onnx
    from onnx import numpy_helper
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dims = _static_dims(model)
    shape_of: dict = {}  # a Shape node's output -> the dims of its input (None where not static: the batch)
    nodes = []
    for n in model.graph.node:
        if n.op_type in _PASS and n.input[0] in consts:  # a shared constant under another name (a folded BN bias)
            consts[n.output[0]] = consts[n.input[0]]
            continue
        if n.op_type == "Shape" and n.input[0] in dims and not _attrs(n):
            shape_of[n.output[0]] = dims[n.input[0]]
        if n.op_type == "Gather" and n.input[0] in shape_of and n.input[1] in consts:  # a static dim, as in chunk()
            got = np.asarray(shape_of[n.input[0]], object)[consts[n.input[1]].astype(np.int64)]
            if all(v is not None for v in np.ravel(got)):
                consts[n.output[0]] = np.asarray(got, np.int64)
                continue
        if n.op_type == "Constant":
            a = _attrs(n)
            if "value" not in a:
                raise ConversionError(f"direct route: Constant node {n.name or n.output[0]} has no tensor value")
            consts[n.output[0]] = numpy_helper.to_array(a["value"])
            continue
        if n.input and all(i == "" or i in consts for i in n.input) and _fold(n, consts, model):
            continue  # computed from constants only (F.pad's pads, a reshaped weight): now a constant
        nodes.append(n)
    inputs = [i for i in model.graph.input if i.name not in consts]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ConversionError("direct route: the graph must have one input and one output "
                              f"(it has {len(inputs)} and {len(model.graph.output)})")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ConversionError("direct route: the graph input must be float32")
    used = {i for n in nodes for i in n.input} | {model.graph.output[0].name}
    while True:  # Shape nodes (and what read only them) whose every use was folded
        kept = [n for n in nodes if n.op_type not in ("Shape", "Gather") or any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes, used = kept, {i for n in kept for i in n.input} | {model.graph.output[0].name}
    g = _Graph(nodes, consts, inputs[0], model.graph.output[0].name)
    for n in nodes:
        for i in n.input:
            g.consumers.setdefault(i, []).append(n)
    _find_shuffles(g)  # may drop nodes (and then rebuilds the consumers)
    return g


def _static_dims(model) -> dict:
    """tensor -> its dims (None for the dynamic batch), for graphs that compute shapes (Shape nodes: chunk(),
    view(n, ...)); measured by running the graph once at batch 2 on zeros (onnxruntime), as ONNX's shape
    inference loses them after a Reshape to a computed shape. Empty for other graphs: nothing runs for them."""
    if not any(n.op_type == "Shape" for n in model.graph.node):
        return {}
    from pipeline.conversion.rewrites import probe_values
    consts = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in consts)
    d0 = inp.type.tensor_type.shape.dim[0] if inp.type.tensor_type.shape.dim else None
    dynamic = d0 is None or not d0.HasField("dim_value") or d0.dim_value <= 0
    return {name: ((None if dynamic and shape and shape[0] == 2 else shape[0]),) + tuple(shape[1:])
            for name, shape in probe_values(model, 2, shapes_only=True).items() if shape}


def _find_shuffles(g: _Graph) -> None:
    """Channel shuffles (ShuffleNet's ``x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)``:
    Reshape -> Transpose(0, 2, 1, 3, 4) -> Reshape), recorded in ``g.shuffles``; the nodes that only compute
    their target shapes from the batch size (Shape, Gather, Unsqueeze, Concat, ...) are dropped from the graph:
    the shuffle is written from the calibrated shapes (RESHAPE, TRANSPOSE, RESHAPE in NHWC)."""
    for t in g.nodes:
        if t.op_type != "Transpose" or list(_attrs(t).get("perm", [])) != [0, 2, 1, 3, 4]:
            continue
        r1 = next((n for n in g.nodes if t.input[0] in n.output and n.op_type == "Reshape"), None)
        users = g.consumers.get(t.output[0], [])
        if r1 is None or len(g.consumers.get(r1.output[0], [])) != 1 or len(users) != 1 \
                or users[0].op_type != "Reshape":
            continue
        parts = (r1, t, users[0])
        g.shuffles.update({r1.output[0]: ("split", parts), t.output[0]: ("transpose", parts),
                           users[0].output[0]: ("merge", parts)})
    if not g.shuffles:
        return
    dead: set[int] = set()

    def shape_only(c, o: str) -> bool:  # consumer c reads o only as a shuffle Reshape's target shape, or is dead
        if id(c) in dead:
            return True
        return c.op_type == "Reshape" and c.output[0] in g.shuffles and c.input[1] == o and c.input[0] != o

    for n in reversed(g.nodes):  # an ONNX graph lists producers before consumers
        outs = [o for o in n.output if o]
        if outs and g.output not in outs and all(g.consumers.get(o) and all(shape_only(c, o) for c in g.consumers[o])
                                                 for o in outs):
            dead.add(id(n))
    g.nodes = [n for n in g.nodes if id(n) not in dead]
    g.consumers = {}
    for n in g.nodes:
        for i in n.input:
            g.consumers.setdefault(i, []).append(n)


def _clip_bounds(node, consts) -> tuple[float | None, float | None]:
    a = _attrs(node)
    lo, hi = a.get("min"), a.get("max")
    if len(node.input) > 1 and node.input[1]:
        lo = float(consts[node.input[1]]) if node.input[1] in consts else "?"
    if len(node.input) > 2 and node.input[2]:
        hi = float(consts[node.input[2]]) if node.input[2] in consts else "?"
    return lo, hi


def _activation(node, consts) -> str | None:
    """'RELU' / 'RELU6' when the node is one TFLite can fuse or run as an int8 activation op, else None."""
    if node.op_type == "Relu":
        return "RELU"
    if node.op_type == "Clip":
        lo, hi = _clip_bounds(node, consts)
        if lo == 0.0 and hi is None:
            return "RELU"
        if lo == 0.0 and hi == 6.0:
            return "RELU6"
    return None


def unsupported(model) -> str | None:
    """Why this route cannot write ``model`` (one line naming the node), or None when every node is covered.
    A graph scan only (constant subgraphs folded): nothing runs."""
    try:
        return _unsupported(_load(model))
    except ConversionError as e:
        return str(e)


def _unsupported(g: _Graph) -> str | None:
    rank = len(g.input.type.tensor_type.shape.dim)
    if rank not in (2, 4):
        return f"direct route: a rank-{rank} input (it takes N x C x H x W images or N x features)"
    for n in g.nodes:
        what = f"{n.op_type} node {n.name or n.output[0]}"
        if n.op_type not in OPS:
            return f"direct route: no int8 writer for op {n.op_type} (node {n.name or n.output[0]})"
        a = _attrs(n)
        if n.op_type == "Clip" and _activation(n, g.consts) is None:
            return f"direct route: {what} clips to {_clip_bounds(n, g.consts)}; only Clip(0) and Clip(0, 6) are written"
        if n.op_type in ("Conv", "MaxPool", "AveragePool"):
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                return f"direct route: {what} uses auto_pad"
            if len(a.get("kernel_shape", [1, 1])) != 2:
                return f"direct route: {what} is not 2-D"
        if n.op_type == "MaxPool" and (any(d != 1 for d in a.get("dilations", [1, 1])) or len(n.output) > 1):
            return f"direct route: {what} has dilations or an indices output"
        if n.op_type == "AveragePool" and any(a.get("pads", [0] * 4)) and not a.get("count_include_pad", 0) == 0:
            return f"direct route: {what} counts its padding"
        if n.op_type == "Conv":
            w = g.consts.get(n.input[1])
            if w is None or w.ndim != 4:
                return f"direct route: {what} has no constant 4-D weight"
            if len(n.input) > 2 and n.input[2] and n.input[2] not in g.consts:
                return f"direct route: {what} has a computed bias"
            groups = int(a.get("group", 1))
            if groups != 1 and w.shape[0] % groups:
                return f"direct route: {what} has {w.shape[0]} outputs for {groups} groups"
        if n.op_type == "Gemm":
            if a.get("transA", 0) or n.input[1] not in g.consts or (len(n.input) > 2 and n.input[2]
                                                                     and n.input[2] not in g.consts):
                return f"direct route: {what} needs constant weights and bias and no transA"
        if n.op_type == "MatMul" and (n.input[1] not in g.consts or g.consts[n.input[1]].ndim != 2):
            return f"direct route: {what} multiplies two activations (attention); only constant 2-D weights are written"
        if n.op_type in ("Add", "Mul", "Sub", "Div"):
            consts = [k for k, i in enumerate(n.input) if i in g.consts]
            if len(consts) == 2:
                return f"direct route: {what} computes a constant"
            if n.op_type in ("Sub", "Div") and not consts:
                return f"direct route: {what} of two activations"
            if n.op_type in ("Sub", "Div") and consts != [1]:
                return f"direct route: {what} {'subtracts from' if n.op_type == 'Sub' else 'divides'} a constant"
            if n.op_type == "Div" and np.any(g.consts[n.input[1]] == 0):
                return f"direct route: {what} divides by zero"
            if consts and np.ndim(g.consts[n.input[consts[0]]]) > rank:
                return f"direct route: {what} broadcasts a constant of higher rank"
        if n.op_type == "Pad":
            mode = a.get("mode", b"constant")
            pads = g.consts.get(n.input[1]) if len(n.input) > 1 else a.get("pads")
            value = g.consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else 0.0
            if mode not in (b"constant", "constant") or pads is None or np.size(pads) != 8 or rank != 4:
                return f"direct route: {what} is not a constant padding of a feature map with constant pads"
            if np.any(np.asarray(pads)[[0, 1, 4, 5]] != 0) or np.any(np.asarray(pads) < 0):
                return f"direct route: {what} pads the batch or channel axes (or crops)"
            if value is None or float(np.ravel(value)[0] if np.size(value) else 0.0) != 0.0:
                return f"direct route: {what} pads with a value other than 0"
            if len(n.input) > 3 and n.input[3]:
                return f"direct route: {what} pads selected axes"
        if n.op_type == "BatchNormalization" and (any(i not in g.consts for i in n.input[1:5]) or len(n.output) > 1
                                                  or a.get("training_mode", 0)):
            return f"direct route: {what} is not an inference BatchNormalization with constant statistics"
        if n.op_type == "HardSigmoid" and abs(float(a.get("alpha", 0.2)) * 6.0 - 1.0) > 1e-6:
            return (f"direct route: {what} has alpha {a.get('alpha', 0.2)}; the written form "
                    "(ReLU6(x + beta/alpha) / 6) needs 1/6")
        if n.op_type == "Concat" and int(a.get("axis", 0)) not in (1, -3 if rank == 4 else 1):
            return f"direct route: {what} concatenates along axis {a.get('axis')}; only channels are written"
        if n.op_type == "Softmax" and int(a.get("axis", -1)) not in (-1, 1):
            return f"direct route: {what} is not over the last axis of N x classes"
        if n.op_type == "ReduceMean":
            axes = a.get("axes") if "axes" in a else (g.consts.get(n.input[1]) if len(n.input) > 1 else None)
            if axes is None or sorted(int(x) % 4 for x in np.ravel(axes)) != [2, 3]:
                return f"direct route: {what} is not a mean over H and W"
        if n.op_type == "Flatten" and int(a.get("axis", 1)) != 1:
            return f"direct route: {what} flattens at axis {a.get('axis')}"
        if n.op_type in ("Slice", "Split") and (why := _cut_unsupported(n, g, rank)):
            return f"direct route: {what} {why}"
        if n.op_type == "Transpose" and n.output[0] not in g.shuffles:
            return f"direct route: {what} is not a channel shuffle's; only those transposes are written"
        if n.op_type == "Reshape" and n.output[0] not in g.shuffles:
            shape = g.consts.get(n.input[1])
            if shape is None or np.ndim(shape) != 1 or len(shape) != 2:
                return f"direct route: {what} reshapes to {None if shape is None else list(shape)}; only [N, features]"
    return None


def _bias_of_matmul(add, g: _Graph):
    """The constant bias when ``add`` is MatMul(x, W) + b (b of shape [out]) and the MatMul feeds only it."""
    ins = list(add.input)
    const = [i for i in ins if i in g.consts]
    other = [i for i in ins if i not in g.consts]
    if len(const) != 1 or len(other) != 1:
        return None
    prod = next((n for n in g.nodes if other[0] in n.output), None)
    if prod is None or prod.op_type != "MatMul" or len(g.consumers.get(other[0], [])) != 1:
        return None
    b = np.ravel(g.consts[const[0]])
    w = g.consts.get(prod.input[1])
    return b if w is not None and w.ndim == 2 and b.size == w.shape[1] else None


def calibrate(model, names: list[str], x: np.ndarray) -> tuple[dict, dict]:
    """({tensor: (min, max)}, {tensor: shape at batch n}) of ``names`` over the samples ``x``, on onnxruntime."""
    from pipeline.conversion.rewrites import exposed_session, fixed_batch_size
    sess = exposed_session(model, names)
    iname = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    step = fixed_batch_size(model)
    if not step:  # every activation of a batch is held at once: batches of about CALIB_BATCH_BYTES
        per_sample = sum(v.nbytes for v in sess.run(None, {iname: np.ascontiguousarray(x[:1], np.float32)}))
        step = int(np.clip(CALIB_BATCH_BYTES // max(per_sample, 1), 1, 64))
    ranges: dict = {}
    shapes: dict = {}
    for i in range(0, len(x), step):
        xb = np.ascontiguousarray(x[i:i + step], np.float32)
        if fixed_batch_size(model) and len(xb) < step:  # a fixed-batch graph: pad the last batch with its first
            xb = np.concatenate([xb, np.repeat(xb[:1], step - len(xb), axis=0)])
        for name, v in zip(outs, sess.run(None, {iname: xb})):
            if name not in names or v.dtype.kind != "f":
                continue
            lo, hi = float(np.min(v)), float(np.max(v))
            old = ranges.get(name)
            ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
            if name not in shapes:  # None: a tensor whose first axis is not the batch
                shapes[name] = tuple(v.shape[1:]) if v.ndim and v.shape[0] == len(xb) else None
    return ranges, shapes


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TFLite's SAME padding (before, after) for one spatial axis."""
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


class _Writer:
    def __init__(self, schema, batch: int, fp32: bool = False):
        self.s = schema
        self.batch = batch  # -1: dynamic
        self.fp32 = fp32  # write float32 tensors, no quantization (dtype INT8 -> FLOAT32, INT32 biases too)
        self.tensors: list = []
        self.buffers = [schema.BufferT()]
        self.opcodes: dict[int, int] = {}
        self.codes: list = []
        self.ops: list = []

    def tensor(self, name: str, shape, dtype: int, q: _Q | None = None, data: np.ndarray | None = None,
               float_data: np.ndarray | None = None) -> int:
        """A tensor; ``float_data``: what a constant holds in the float32 model (its unquantized values)."""
        t = self.s.TensorT()
        t.name = name
        shape = [int(v) for v in shape]
        t.shape = [1 if v == -1 else v for v in shape]
        if -1 in shape:
            t.shapeSignature = shape
        if self.fp32 and q is not None:  # the float model: quantized tensors are float32, constants unquantized
            if data is not None:
                if float_data is None:
                    raise ConversionError(f"direct route: no float32 value for constant {name}")
                data = np.asarray(float_data, np.float32)
            dtype, q = self.s.TensorType.FLOAT32, None
        t.type = dtype
        t.buffer = 0
        if data is not None:
            b = self.s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        if q is not None:
            t.quantization = q.as_t(self.s)
        self.tensors.append(t)
        return len(self.tensors) - 1

    def s_name(self, v) -> str:
        """The name of the tensor of ``v`` (a _Val)."""
        return self.tensors[v.tensor].name

    def const_i32(self, name: str, values) -> int:
        a = np.asarray(values, np.int32)
        return self.tensor(name, a.shape, self.s.TensorType.INT32, data=a)

    def op(self, code: int, inputs: list[int], outputs: list[int], opt_type: int = 0, opt=None, version: int = 1):
        if code not in self.opcodes:
            c = self.s.OperatorCodeT()
            c.builtinCode = code
            c.deprecatedBuiltinCode = min(code, 127)
            c.version = version
            self.codes.append(c)
            self.opcodes[code] = len(self.codes) - 1
        o = self.s.OperatorT()
        o.opcodeIndex = self.opcodes[code]
        o.inputs = [int(i) for i in inputs]
        o.outputs = [int(i) for i in outputs]
        o.builtinOptionsType = opt_type
        o.builtinOptions = opt
        self.ops.append(o)

    def finish(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        import flatbuffers
        sg = self.s.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = self.tensors, inputs, outputs, self.ops, "main"
        m = self.s.ModelT()
        m.version = 3
        m.operatorCodes = self.codes
        m.subgraphs = [sg]
        m.buffers = self.buffers
        m.description = description
        sig = self.s.SignatureDefT()
        sig.signatureKey = "serving_default"
        sig.subgraphIndex = 0
        sig.inputs = [self._tmap("input", inputs[0])]
        sig.outputs = [self._tmap("output", outputs[0])]
        m.signatureDefs = [sig]
        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def _tmap(self, name: str, index: int):
        t = self.s.TensorMapT()
        t.name, t.tensorIndex = name, index
        return t


BIAS_MAX = 2 ** 30  # an int32 bias stays within this, leaving the accumulator room for the products' sum


def _weight_q(w: np.ndarray, axis: int, per_channel: bool, bias: np.ndarray | None = None,
              in_scale: float | None = None) -> tuple[np.ndarray, _Q]:
    """Symmetric int8 weights (zero point 0, [-127, 127]) with one scale per ``axis`` slice, or one in all.

    With the op's ``bias`` and its input's scale, a weight scale is raised where the int32 bias (at scale
    input_scale x weight_scale) would pass BIAS_MAX: a tensor calibrated to a near-zero range (1.6e-13 after the
    last block of a randomly initialised googlenet) made the bias 1e14 steps, clamped to 2^31 - 1, and the logits
    lost their bias. The input's contribution is then below the weights' new resolution anyway."""
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=red) if per_channel else np.array([np.abs(w).max()])
    scale = np.where(amax > 0, amax / 127.0, 1e-6).astype(np.float64)  # an all-zero channel: any scale holds it
    if bias is not None and in_scale is not None and in_scale > 0:
        need = np.abs(np.asarray(bias, np.float64)) / (float(in_scale) * BIAS_MAX)
        scale = np.maximum(scale, need if per_channel else np.array([need.max(initial=0.0)]))
    shape = [1] * w.ndim
    if per_channel:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, _Q(scale, np.zeros(scale.size, np.int64), axis if per_channel else 0)


class DirectConverter:
    name = NAME
    needs = "onnx"
    light = True  # its worker imports onnx, onnxruntime and LiteRT only (conversion.early_routes)
    strict_check = True  # auto keeps it at once only when its quick check meets the export's agreement gate

    def preload(self, verbose: bool = False) -> None:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        from ai_edge_litert import interpreter  # noqa: F401  (the quick check)

    def unsupported(self, onnx_path: Path) -> str | None:
        import onnx
        return unsupported(onnx.load(str(onnx_path)))

    def convert(self, onnx, representative: np.ndarray, pre, *, per_channel: bool = True, out_path: Path,
                verbose: bool = False, precision: str = "int8", float_fallback: bool = False,
                float_nodes: tuple = ()) -> TfliteArtifact:
        import onnx as onnx_lib
        refuse_float_nodes(self.name, float_nodes)
        if float_fallback:
            raise ConversionError("the direct route keeps no layer in float (this target allows float fallback: "
                                  "the onnx2tf route can)")
        if precision not in ("int8", "fp32"):
            raise ConversionError(f"the direct route writes int8 and float32 models, not precision {precision!r}; "
                                  "use --converter onnx2tf")
        t0 = time.perf_counter()
        model = onnx_lib.load(str(onnx.path))
        g = _load(model)
        why = _unsupported(g)
        if why is not None:
            raise ConversionError(why)
        names = [o for n in g.nodes for o in n.output if o] + [g.input.name]
        try:
            ranges, shapes = calibrate(model, names, np.asarray(representative, np.float32))
            t_cal = time.perf_counter() - t0
            data = _lower(g, ranges, shapes, per_channel, onnx.dynamic_batch, fp32=precision == "fp32")
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - one line, and auto tries the next route
            first = " ".join(str(e).split())[:300]
            raise ConversionError(f"direct route: {type(e).__name__}: {first}") from None
        Path(out_path).write_bytes(data)
        return TfliteArtifact(path=Path(out_path), bytes=len(data), converter=self.name,
                              input_layout="NHWC" if len(shapes[g.input.name]) == 3 else "NCHW",
                              calibration_samples=len(representative),
                              timings_s={"calibrate_s": round(t_cal, 3),
                                         "write_s": round(time.perf_counter() - t0 - t_cal, 3)})


_NHWC_AXIS = {1: 3, 2: 1, 3: 2}  # an N x C x H x W axis -> its place in N x H x W x C


def _cut_unsupported(n, g: _Graph, rank: int) -> str | None:
    """Why the writer cannot take this Slice or Split (constant bounds, step 1, not along the batch), or None."""
    a = _attrs(n)
    if n.op_type == "Slice":
        if "starts" in a:  # opset < 10
            return "is an opset-9 Slice"
        if any(i and i not in g.consts for i in n.input[1:]):
            return "has computed bounds"
        axes = g.consts[n.input[3]] if len(n.input) > 3 and n.input[3] else range(len(g.consts[n.input[1]]))
        if len(n.input) > 4 and n.input[4] and np.any(g.consts[n.input[4]] != 1):
            return "has a step other than 1"
    else:
        if len(n.input) > 1 and n.input[1] and n.input[1] not in g.consts:
            return "has computed sizes"
        axes = [a.get("axis", 0)]
    if any(int(x) % rank == 0 for x in np.ravel(list(axes))):
        return "cuts along the batch axis"
    return None


def _cut_axis(axis: int, nhwc: bool, rank: int) -> int:
    axis = int(axis) % rank
    return _NHWC_AXIS[axis] if nhwc else axis


def _lower(g: _Graph, ranges: dict, shapes: dict, per_channel: bool, dynamic_batch: bool, fp32: bool = False) -> bytes:
    """The TFLite flatbuffer. ``fp32``: the same graph, same tensor names, in float32 (the layer-wise debugger's
    reference)."""
    from ai_edge_litert import schema_py_generated as s
    B, T, O = s.BuiltinOperator, s.TensorType, s.BuiltinOptions
    batch = -1 if dynamic_batch else _batch_of(g)
    w = _Writer(s, batch, fp32)
    vals: dict[str, _Val] = {}

    def bshape(name: str, nhwc: bool) -> list[int]:
        if shapes.get(name) is None or nhwc and len(shapes[name]) != 3:
            raise ConversionError(f"direct route: tensor {name} is not N x C x H x W or N x features with the batch "
                                  "first")
        sh = list(shapes[name])
        if nhwc:
            sh = [sh[1], sh[2], sh[0]]
        return [batch, *sh]

    def q_of(name: str) -> _Q:
        if name not in ranges:
            raise ConversionError(f"direct route: tensor {name} was not seen in calibration")
        return _act_q(*ranges[name])

    def act_out(name: str, nhwc: bool, q: _Q | None = None) -> _Val:
        q = q or q_of(name)
        v = _Val(w.tensor(name, bshape(name, nhwc), T.INT8, q), nhwc, q)
        vals[name] = v
        return v

    def fused(node) -> tuple[str, int]:
        """(output name after a fusable activation, TFLite fused activation)."""
        out = node.output[0]
        users = g.consumers.get(out, [])
        if out != g.output and len(users) == 1 and _activation(users[0], g.consts) is not None:
            kind = _relu6_or_relu(_activation(users[0], g.consts), q_of(users[0].output[0]))
            return users[0].output[0], getattr(s.ActivationFunctionType, kind)
        return out, s.ActivationFunctionType.NONE

    done: set[str] = set()
    xin = g.input.name
    nhwc_in = len(shapes[xin]) == 3
    vals[xin] = act_out(xin, nhwc_in)
    in_index = vals[xin].tensor
    for n in g.nodes:
        if n.output[0] in done:
            continue
        a = _attrs(n)
        op = n.op_type
        if op in _PASS:
            vals[n.output[0]] = vals[n.input[0]]
            continue
        src = vals[n.input[0]] if n.input[0] in vals else None
        if op == "Conv":
            out, act = fused(n)
            wt = g.consts[n.input[1]].astype(np.float64)
            bias = g.consts[n.input[2]].astype(np.float64) if len(n.input) > 2 and n.input[2] else np.zeros(wt.shape[0])
            groups = int(a.get("group", 1))
            kh, kw = wt.shape[2], wt.shape[3]
            sh, sw = (list(a.get("strides", [1, 1])) + [1])[:2]
            dh, dw = (list(a.get("dilations", [1, 1])) + [1])[:2]
            x, padding = _pad_for(w, s, src, n.input[0], shapes, a.get("pads", [0, 0, 0, 0]), (kh, kw), (sh, sw),
                                  (dh, dw), pool=None, out=n.output[0])
            if groups != 1 and wt.shape[1] != 1:  # grouped: SPLIT, one CONV_2D per group, CONCATENATION
                _grouped_conv(w, x, padding, wt, bias, groups, (sh, sw), (dh, dw), act, per_channel,
                              act_out(out, True), shapes[n.output[0]])
                done.add(out)
                continue
            if groups == 1:
                wq, wqp = _weight_q(wt.transpose(0, 2, 3, 1), 0, per_channel, bias, x.q.scale[0])
                code, opt_t, opt = B.CONV_2D, O.Conv2DOptions, s.Conv2DOptionsT()
            else:
                wq, wqp = _weight_q(wt.transpose(1, 2, 3, 0), 3, per_channel, bias, x.q.scale[0])
                code, opt_t, opt = B.DEPTHWISE_CONV_2D, O.DepthwiseConv2DOptions, s.DepthwiseConv2DOptionsT()
                opt.depthMultiplier = wt.shape[0] // groups
            opt.padding, opt.strideH, opt.strideW = padding, int(sh), int(sw)
            opt.dilationHFactor, opt.dilationWFactor, opt.fusedActivationFunction = int(dh), int(dw), act
            wi = w.tensor(n.input[1], wq.shape, T.INT8, wqp, wq,
                          wt.transpose(0, 2, 3, 1) if groups == 1 else wt.transpose(1, 2, 3, 0))
            bi = _bias(w, f"{n.output[0]}_bias", bias, x.q, wqp)
            y = act_out(out, True)
            w.op(code, [x.tensor, wi, bi], [y.tensor], opt_t, opt, version=3)
            done.add(out)
        elif op in ("Gemm", "MatMul"):
            wt = g.consts[n.input[1]].astype(np.float64)
            bias = np.zeros(0)
            out_node = n
            if op == "Gemm":
                if not a.get("transB", 0):
                    wt = wt.T
                wt = wt * float(a.get("alpha", 1.0))
                if len(n.input) > 2 and n.input[2]:
                    bias = np.ravel(np.broadcast_to(g.consts[n.input[2]], (wt.shape[0],))) * float(a.get("beta", 1.0))
            else:
                wt = wt.T
                users = g.consumers.get(n.output[0], [])
                b = _bias_of_matmul(users[0], g) if len(users) == 1 and users[0].op_type == "Add" else None
                if b is not None:
                    bias, out_node = b.astype(np.float64), users[0]
                    done.add(users[0].output[0])
            if bias.size == 0:
                bias = np.zeros(wt.shape[0])
            out, act = fused(out_node)
            if not src.nhwc and len(shapes[n.input[0]] or ()) != 1:
                raise ConversionError(f"direct route: {op} node {n.name or out} takes a rank-"
                                      f"{len(shapes[n.input[0]] or ()) + 1} input; only N x features is written")
            x = _flat(w, s, src, n.input[0], shapes)
            wq, wqp = _weight_q(wt, 0, per_channel, bias, x.q.scale[0])
            wi = w.tensor(n.input[1], wq.shape, T.INT8, wqp, wq, wt)
            bi = _bias(w, f"{n.output[0]}_bias", bias, x.q, wqp)
            y = act_out(out, False)
            opt = s.FullyConnectedOptionsT()
            opt.fusedActivationFunction = act
            w.op(B.FULLY_CONNECTED, [x.tensor, wi, bi], [y.tensor], O.FullyConnectedOptions, opt, version=5)
            done.add(out)
        elif op in ("Relu", "Clip"):
            kind = _relu6_or_relu(_activation(n, g.consts), q_of(n.output[0]))
            y = act_out(n.output[0], src.nhwc)
            w.op(B.RELU if kind == "RELU" else B.RELU6, [src.tensor], [y.tensor], version=2)
        elif op in ("MaxPool", "AveragePool"):
            kh, kw = a["kernel_shape"]
            sh, sw = (list(a.get("strides", [1, 1])) + [1])[:2]
            if op == "AveragePool" and a.get("ceil_mode", 0) and a.get("count_include_pad", 0):
                raise ConversionError(f"direct route: AveragePool node {n.name or n.output[0]} uses ceil_mode and "
                                      "counts its padding")
            x, padding = _pad_for(w, s, src, n.input[0], shapes, a.get("pads", [0, 0, 0, 0]), (kh, kw), (sh, sw),
                                  (1, 1), pool=op, out=n.output[0])
            opt = s.Pool2DOptionsT()
            opt.padding, opt.strideH, opt.strideW, opt.filterHeight, opt.filterWidth = padding, sh, sw, kh, kw
            y = act_out(n.output[0], True, x.q)
            w.op(B.MAX_POOL_2D if op == "MaxPool" else B.AVERAGE_POOL_2D, [x.tensor], [y.tensor],
                 O.Pool2DOptions, opt, version=2)
        elif op in ("GlobalAveragePool", "ReduceMean"):
            opt = s.ReducerOptionsT()
            opt.keepDims = op == "GlobalAveragePool" or bool(a.get("keepdims", 1))
            y = act_out(n.output[0], opt.keepDims)
            w.op(B.MEAN, [src.tensor, w.const_i32(f"{n.output[0]}_axes", [1, 2])], [y.tensor], O.ReducerOptions, opt,
                 version=2)
        elif op in ("Add", "Mul", "Sub", "Div"):
            if any(i in g.consts for i in n.input):  # an activation and a constant (second for Sub and Div)
                k = 0 if n.input[1] in g.consts else 1
                x, c = vals[n.input[k]], g.consts[n.input[1 - k]].astype(np.float64)
                c = -c if op == "Sub" else 1.0 / c if op == "Div" else c
                op = "Add" if op == "Sub" else "Mul" if op == "Div" else op
                xs = [x, _const_operand(w, f"{n.output[0]}_const", c, x)]
            else:
                xs = [vals[i] for i in n.input]
            out, act = fused(n) if op == "Add" else (n.output[0], s.ActivationFunctionType.NONE)
            if xs[0].nhwc != xs[1].nhwc:
                raise ConversionError(f"direct route: {op} node {n.name or out} mixes a feature map and a vector")
            y = act_out(out, xs[0].nhwc, _add_out_q(q_of(out), xs) if op == "Add" else None)
            opt = s.AddOptionsT() if op == "Add" else s.MulOptionsT()
            opt.fusedActivationFunction = act
            w.op(B.ADD if op == "Add" else B.MUL, [xs[0].tensor, xs[1].tensor], [y.tensor],
                 O.AddOptions if op == "Add" else O.MulOptions, opt, version=2)
            done.add(out)
        elif op == "Concat":
            xs = [vals[i] for i in n.input]
            if len({v.nhwc for v in xs}) != 1:
                raise ConversionError(f"direct route: Concat node {n.name or n.output[0]} mixes feature maps and vectors")
            y = act_out(n.output[0], xs[0].nhwc)
            # LiteRT's int8 CONCATENATION wants every input at the output's scale and zero point: requantize
            xs = [v if _same_q(v.q, y.q) else _requantize(w, v, f"{name}_requant", bshape(name, v.nhwc), y.q)
                  for v, name in zip(xs, n.input)]
            opt = s.ConcatenationOptionsT()
            opt.axis = 3 if xs[0].nhwc else 1
            w.op(B.CONCATENATION, [v.tensor for v in xs], [y.tensor], O.ConcatenationOptions, opt, version=2)
        elif op == "BatchNormalization":  # not folded into a conv (after a Concat, densenet): a 1x1 depthwise conv
            if not src.nhwc:
                raise ConversionError(f"direct route: BatchNormalization node {n.name or n.output[0]} on a vector")
            gamma, beta, mean, var = (g.consts[i].astype(np.float64) for i in n.input[1:5])
            k = gamma / np.sqrt(var + float(a.get("epsilon", 1e-5)))
            out, act = fused(n)
            wq, wqp = _weight_q(k.reshape(1, 1, 1, -1), 3, per_channel, beta - mean * k, src.q.scale[0])
            wi = w.tensor(f"{n.output[0]}_scale", wq.shape, T.INT8, wqp, wq, k.reshape(1, 1, 1, -1))
            bi = _bias(w, f"{n.output[0]}_shift", beta - mean * k, src.q, wqp)
            opt = s.DepthwiseConv2DOptionsT()
            opt.padding, opt.strideH, opt.strideW, opt.depthMultiplier = s.Padding.VALID, 1, 1, 1
            opt.dilationHFactor, opt.dilationWFactor, opt.fusedActivationFunction = 1, 1, act
            y = act_out(out, True)
            w.op(B.DEPTHWISE_CONV_2D, [src.tensor, wi, bi], [y.tensor], O.DepthwiseConv2DOptions, opt, version=3)
            done.add(out)
        elif op == "Pad":  # zero padding of H and W: PAD pads with the zero point, real 0
            if not src.nhwc:
                raise ConversionError(f"direct route: Pad node {n.name or n.output[0]} pads a vector")
            pads = np.asarray(g.consts[n.input[1]] if len(n.input) > 1 else a["pads"]).astype(int)
            y = act_out(n.output[0], True, src.q)
            w.op(B.PAD, [src.tensor, w.const_i32(f"{n.output[0]}_pads", [[0, 0], [pads[2], pads[6]], [pads[3], pads[7]],
                                                                            [0, 0]])], [y.tensor], O.PadOptions,
                 s.PadOptionsT(), version=2)
        elif op == "GlobalMaxPool":
            c, h, wd = shapes[n.input[0]]
            opt = s.Pool2DOptionsT()
            opt.padding, opt.strideH, opt.strideW, opt.filterHeight, opt.filterWidth = s.Padding.VALID, 1, 1, h, wd
            y = act_out(n.output[0], True, src.q)
            w.op(B.MAX_POOL_2D, [src.tensor], [y.tensor], O.Pool2DOptions, opt, version=2)
        elif op == "LeakyRelu":
            opt = s.LeakyReluOptionsT()
            opt.alpha = float(a.get("alpha", 0.01))
            y = act_out(n.output[0], src.nhwc)
            w.op(B.LEAKY_RELU, [src.tensor], [y.tensor], O.LeakyReluOptions, opt, version=2)
        elif op == "Tanh":
            y = act_out(n.output[0], src.nhwc, _TANH_OUT)
            w.op(B.TANH, [src.tensor], [y.tensor], version=2)
        elif op == "HardSigmoid":  # clip(x / 6 + beta, 0, 1) = ReLU6(x + 6 beta) / 6: ADD with a fused RELU6, MUL
            beta6 = float(a.get("beta", 0.5)) * 6.0
            lo, hi = ranges[n.input[0]]
            mid = f"{n.output[0]}_relu6"
            q_mid = _act_q(min(max(lo + beta6, 0.0), 6.0), min(max(hi + beta6, 0.0), 6.0))
            t = w.tensor(mid, bshape(n.input[0], src.nhwc), T.INT8, q_mid)
            opt = s.AddOptionsT()
            opt.fusedActivationFunction = getattr(s.ActivationFunctionType, _relu6_or_relu("RELU6", q_mid))
            w.op(B.ADD, [src.tensor, _const_operand(w, f"{mid}_shift", np.array([beta6]), src).tensor], [t],
                 O.AddOptions, opt, version=2)
            y = act_out(n.output[0], src.nhwc)
            w.op(B.MUL, [t, _const_operand(w, f"{mid}_sixth", np.array([1.0 / 6.0]), src).tensor], [y.tensor],
                 O.MulOptions, s.MulOptionsT(), version=2)
        elif op == "Sigmoid":
            y = act_out(n.output[0], src.nhwc, _FIXED_OUT)
            w.op(B.LOGISTIC, [src.tensor], [y.tensor], version=2)
        elif op == "HardSwish":
            y = act_out(n.output[0], src.nhwc)
            w.op(B.HARD_SWISH, [src.tensor], [y.tensor], version=1)
        elif op == "Softmax":
            if src.nhwc:
                raise ConversionError(f"direct route: Softmax node {n.name or n.output[0]} is over a feature map")
            opt = s.SoftmaxOptionsT()
            opt.beta = 1.0
            y = act_out(n.output[0], False, _FIXED_OUT)
            w.op(B.SOFTMAX, [src.tensor], [y.tensor], O.SoftmaxOptions, opt, version=2)
        elif n.output[0] in g.shuffles:  # channel shuffle: written whole at its last node, in NHWC
            part, (r1, _, r2) = g.shuffles[n.output[0]]
            if part != "merge":
                continue
            x = vals[r1.input[0]]
            sh = shapes.get(r1.output[0]) or ()
            groups, per, h, wd = sh if len(sh) == 4 else (0, 0, 0, 0)
            if not groups or not x.nhwc or shapes[r1.input[0]] != (groups * per, h, wd) \
                    or shapes[r2.output[0]] != (groups * per, h, wd):
                raise ConversionError(f"direct route: Reshape node {r1.name or r1.output[0]} -> Transpose -> Reshape "
                                      "is not a channel shuffle of a feature map")
            split = w.tensor(f"{r1.output[0]}_nhwc", [batch, h, wd, groups, per], T.INT8, x.q)
            w.op(B.RESHAPE, [x.tensor, w.const_i32(f"{r1.output[0]}_shape", [-1, h, wd, groups, per])], [split],
                 O.ReshapeOptions, _reshape_opt(s, [-1, h, wd, groups, per]), version=1)
            moved = w.tensor(f"{n.input[0]}_nhwc", [batch, h, wd, per, groups], T.INT8, x.q)
            w.op(B.TRANSPOSE, [split, w.const_i32(f"{n.input[0]}_perm", [0, 1, 2, 4, 3])], [moved],
                 O.TransposeOptions, s.TransposeOptionsT(), version=2)
            y = act_out(n.output[0], True, x.q)
            w.op(B.RESHAPE, [moved, w.const_i32(f"{n.output[0]}_shape", [-1, h, wd, groups * per])], [y.tensor],
                 O.ReshapeOptions, _reshape_opt(s, [-1, h, wd, groups * per]), version=1)
        elif op == "Slice":  # SLICE: a copy, at the input's quantization
            dims = [batch, *shapes[n.input[0]]]
            rank = len(dims)
            starts, ends = (np.ravel(g.consts[i]).astype(np.int64) for i in n.input[1:3])
            axes = np.ravel(g.consts[n.input[3]]) if len(n.input) > 3 and n.input[3] else range(len(starts))
            begin, size = [0] * rank, [-1] * rank
            for ax, b, e in zip(axes, starts, ends):
                d = dims[int(ax) % rank]
                b, e = (min(max(v + d if v < 0 else v, 0), d) for v in (int(b), int(e)))
                k = _cut_axis(ax, src.nhwc, rank)
                begin[k], size[k] = b, max(e - b, 0)
            y = act_out(n.output[0], src.nhwc, src.q)
            w.op(B.SLICE, [src.tensor, w.const_i32(f"{n.output[0]}_begin", begin),
                           w.const_i32(f"{n.output[0]}_size", size)], [y.tensor], O.SliceOptions, s.SliceOptionsT(),
                 version=2)
        elif op == "Split":  # SPLIT_V: copies, at the input's quantization
            rank = 1 + len(shapes[n.input[0]])
            axis = int(a.get("axis", 0))
            dim = shapes[n.input[0]][axis % rank - 1]
            if len(n.input) > 1 and n.input[1]:
                sizes = np.ravel(g.consts[n.input[1]])
            elif "split" in a:
                sizes = np.asarray(a["split"])
            else:
                sizes = np.full(len(n.output), -(-dim // len(n.output)))
                sizes[-1] = dim - sizes[:-1].sum()
            ys = [act_out(o, src.nhwc, src.q) for o in n.output]
            opt = s.SplitVOptionsT()
            opt.numSplits = len(ys)
            w.op(B.SPLIT_V, [src.tensor, w.const_i32(f"{n.output[0]}_sizes", sizes),
                             w.const_i32(f"{n.output[0]}_axis", np.array(_cut_axis(axis, src.nhwc, rank)))],
                 [v.tensor for v in ys], O.SplitVOptions, opt, version=2)
        elif op in ("Flatten", "Reshape"):
            c = int(np.prod(shapes[n.input[0]]))
            if shapes[n.output[0]] != (c,):
                raise ConversionError(f"direct route: {op} node {n.name or n.output[0]} does not make N x {c}")
            vals[n.output[0]] = _flat(w, s, src, n.input[0], shapes)
        else:  # unsupported() lets no other op through
            raise ConversionError(f"direct route: no int8 writer for op {op}")
    out = vals[g.output]
    if out.nhwc:
        raise ConversionError("direct route: the model's output is a 4-D feature map, not N x classes")
    if out.tensor == in_index:
        raise ConversionError("direct route: the graph computes nothing")
    return w.finish([in_index], [out.tensor], "pipeline direct int8 writer")


def _relu6_or_relu(kind: str, q: _Q) -> str:
    """RELU for a RELU6 whose output cannot reach 6 in int8 (its largest value, (127 - zero point) x scale, is
    below 6): the same in int8, and LiteRT would refuse the RELU6 when 6 / scale overflows int32 (seen on a randomly
    initialised mobilenet_v2 whose activations were about 1e-9)."""
    if kind == "RELU6" and (127 - int(q.zero_point[0])) * float(q.scale[0]) < 6.0:
        return "RELU"
    return kind


ADD_SCALE_RATIO = 2 ** 18  # LiteRT's int8 ADD needs 2 max(input scales) / (2^20 output scale) below 1


def _add_out_q(q: _Q, xs: list) -> _Q:
    """ADD's output quantization, widened (same zero point) where an input's scale is too large for it, as when
    two inputs cancel: LiteRT aborts while allocating tensors on an ADD whose output multiplier is not below 1."""
    need = max(float(v.q.scale[0]) for v in xs) / ADD_SCALE_RATIO
    return q if float(q.scale[0]) >= need else _Q(np.array([need]), q.zero_point, q.dim)


def _const_operand(w: _Writer, name: str, c: np.ndarray, like: _Val) -> _Val:
    """The constant ``c`` (ONNX-broadcast against ``like``) as an int8 tensor of its own range, laid out like
    ``like`` (NHWC for a feature map)."""
    c = np.asarray(c, np.float64)
    rank = 4 if like.nhwc else 2
    c = c.reshape((1,) * (rank - c.ndim) + c.shape) if c.ndim < rank else c
    if like.nhwc:
        c = c.transpose(0, 2, 3, 1)
    # an all-zero constant (a learnable affine block's bias at its initial value) takes the activation's
    # quantization: at _act_q's 1/255 for a zero range, ADD beside an activation of scale 5e-9 needed an output
    # multiplier over 1 and LiteRT aborted while allocating tensors (hgnetv2_b0, random init)
    q = like.q if not c.any() else _act_q(float(c.min()), float(c.max()))
    data = np.clip(np.round(c / q.scale[0]) + q.zero_point[0], -128, 127).astype(np.int8)
    return _Val(w.tensor(name, c.shape, w.s.TensorType.INT8, q, data, c.astype(np.float32)), like.nhwc, q)


def _grouped_conv(w: _Writer, x: _Val, padding: int, wt: np.ndarray, bias: np.ndarray, groups: int, stride, dil,
                  act: int, per_channel: bool, y: _Val, out_chw) -> None:
    """A grouped convolution: its input SPLIT along channels, one CONV_2D per group, written at the output's
    quantization so that the CONCATENATION needs no requantization."""
    s = w.s
    t = w.tensors[x.tensor]
    n, hp, wp, cin = t.shapeSignature or t.shape
    cin_g, cout_g = wt.shape[1], wt.shape[0] // groups
    if cin != cin_g * groups:
        raise ConversionError(f"direct route: a grouped convolution takes {cin} channels, not {cin_g} x {groups}")
    base = w.s_name(y)
    parts = [w.tensor(f"{base}_in{i}", [n, hp, wp, cin_g], s.TensorType.INT8, x.q) for i in range(groups)]
    opt = s.SplitOptionsT()
    opt.numSplits = groups
    w.op(s.BuiltinOperator.SPLIT, [w.const_i32(f"{base}_axis", np.array(3)), x.tensor], parts,
         s.BuiltinOptions.SplitOptions, opt, version=3)
    outs = []
    for i, part in enumerate(parts):
        wg = wt[i * cout_g:(i + 1) * cout_g].transpose(0, 2, 3, 1)
        wq, wqp = _weight_q(wg, 0, per_channel, bias[i * cout_g:(i + 1) * cout_g], x.q.scale[0])
        wi = w.tensor(f"{base}_w{i}", wq.shape, s.TensorType.INT8, wqp, wq, wg)
        bi = _bias(w, f"{base}_b{i}", bias[i * cout_g:(i + 1) * cout_g], x.q, wqp)
        o = w.tensor(f"{base}_g{i}", [n, out_chw[1], out_chw[2], cout_g], s.TensorType.INT8, y.q)
        copt = s.Conv2DOptionsT()
        copt.padding, copt.strideH, copt.strideW = padding, int(stride[0]), int(stride[1])
        copt.dilationHFactor, copt.dilationWFactor, copt.fusedActivationFunction = int(dil[0]), int(dil[1]), act
        w.op(s.BuiltinOperator.CONV_2D, [part, wi, bi], [o], s.BuiltinOptions.Conv2DOptions, copt, version=3)
        outs.append(o)
    copt = s.ConcatenationOptionsT()
    copt.axis = 3
    w.op(s.BuiltinOperator.CONCATENATION, outs, [y.tensor], s.BuiltinOptions.ConcatenationOptions, copt, version=2)


def _same_q(a: _Q, b: _Q) -> bool:
    return np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)


def _requantize(w: _Writer, v: _Val, name: str, shape: list[int], q: _Q) -> _Val:
    """``v`` at the quantization ``q`` (QUANTIZE int8 -> int8; the float model needs nothing)."""
    if w.fp32:
        return v
    t = w.tensor(name, shape, w.s.TensorType.INT8, q)
    w.op(w.s.BuiltinOperator.QUANTIZE, [v.tensor], [t], version=2)
    return _Val(t, v.nhwc, q)


def _bias(w: _Writer, name: str, bias: np.ndarray, xq: _Q, wq: _Q) -> int:
    """The int32 bias at scale input_scale x weight_scale (per channel when the weights are)."""
    bscale = (xq.scale[0] * wq.scale).astype(np.float64)  # one per channel, or one for per-tensor weights
    bq = np.clip(np.round(bias / np.broadcast_to(bscale, bias.shape)), -2**31, 2**31 - 1).astype(np.int32)
    return w.tensor(name, bq.shape, w.s.TensorType.INT32, _Q(bscale, np.zeros(bscale.size, np.int64), 0), bq, bias)


def _batch_of(g: _Graph) -> int:
    d = g.input.type.tensor_type.shape.dim[0]
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else 1


def _reshape_opt(s, shape: list[int]):
    opt = s.ReshapeOptionsT()
    opt.newShape = list(shape)
    return opt


def _flat(w: _Writer, s, src: _Val, name: str, shapes: dict) -> _Val:
    """``src`` as N x features in ONNX's (NCHW) order: NHWC maps with H = W = 1 reshape as they are, others are
    transposed to NCHW first (int8 keeps the quantization through both)."""
    if not src.nhwc:
        return src
    c, h, wd = shapes[name]
    x = src
    if h * wd != 1:
        t = w.tensor(f"{name}_nchw", [w.batch, c, h, wd], s.TensorType.INT8, src.q)
        w.op(s.BuiltinOperator.TRANSPOSE, [src.tensor, w.const_i32(f"{name}_perm", [0, 3, 1, 2])], [t],
             s.BuiltinOptions.TransposeOptions, s.TransposeOptionsT(), version=2)
        x = _Val(t, False, src.q)
    y = w.tensor(f"{name}_flat", [w.batch, c * h * wd], s.TensorType.INT8, src.q)
    w.op(s.BuiltinOperator.RESHAPE, [x.tensor, w.const_i32(f"{name}_shape", [-1, c * h * wd])], [y],
         s.BuiltinOptions.ReshapeOptions, _reshape_opt(s, [-1, c * h * wd]), version=1)
    return _Val(y, False, src.q)


def _pad_for(w: _Writer, s, src: _Val, name: str, shapes: dict, pads, k, stride, dil, *, pool, out: str):
    """(input value, TFLite padding) for a window op with ONNX ``pads`` [top, left, bottom, right] whose output
    is ``out``: VALID, SAME where SAME pads the same, else an explicit PAD (zero in real terms for a convolution; the
    int8 minimum for a max pool, also the extra bottom/right rows a ceil_mode max pool reads) then VALID."""
    c, h, wd = shapes[name]
    pt, pl, pb, pr = (list(pads) + [0, 0, 0, 0])[:4]
    oh, ow = shapes[out][1:]
    # the padded size VALID needs for the output ONNX computed (more than the pads when ceil_mode rounds up)
    pb += max(0, (oh - 1) * stride[0] + (k[0] - 1) * dil[0] + 1 - (h + pt + pb))
    pr += max(0, (ow - 1) * stride[1] + (k[1] - 1) * dil[1] + 1 - (wd + pl + pr))
    ceil_extra = (pb, pr) != tuple((list(pads) + [0, 0, 0, 0])[2:4])
    if ceil_extra and pool is None:
        raise ConversionError(f"direct route: the convolution on {name} reads past its padding")
    if not any((pt, pl, pb, pr)):
        return src, s.Padding.VALID
    if (_same_pads(h, k[0], stride[0], dil[0]) == (pt, pb) and _same_pads(wd, k[1], stride[1], dil[1]) == (pl, pr)):
        return src, s.Padding.SAME
    if pool == "AveragePool":  # SAME averages over the window inside the input only: count_include_pad=0
        raise ConversionError(f"direct route: an AveragePool over {name} pads unlike TFLite's SAME")
    shape = [w.batch, h + pt + pb, wd + pl + pr, c]
    t = w.tensor(f"{name}_padded", shape, s.TensorType.INT8, src.q)
    paddings = w.const_i32(f"{name}_pads", [[0, 0], [pt, pb], [pl, pr], [0, 0]])
    if pool == "MaxPool":
        low = w.tensor(f"{name}_padvalue", [], s.TensorType.INT8, src.q, np.array(-128, np.int8),
                       np.array(np.finfo(np.float32).min, np.float32))
        w.op(s.BuiltinOperator.PADV2, [src.tensor, paddings, low], [t], s.BuiltinOptions.PadV2Options,
             s.PadV2OptionsT(), version=2)
    else:
        w.op(s.BuiltinOperator.PAD, [src.tensor, paddings], [t], s.BuiltinOptions.PadOptions, s.PadOptionsT(),
             version=2)
    return _Val(t, True, src.q), s.Padding.VALID
