"""Accuracy-recovery transforms on the FP32 ONNX graph, applied before int8 conversion ("When int8 hurts").

Each tool is a function ``fn(model: onnx.ModelProto, calib: np.ndarray, **options) -> (onnx.ModelProto, record)``:

- ``model`` is never modified in place; the returned model is a new proto;
- ``calib`` is a float32 batch (N x C x H x W) in the model's input layout, already preprocessed;
- ``record`` is a JSON-safe dict with at least ``tool``, ``changed_layers`` (a count), ``nodes`` (the ONNX
  node names changed), ``fp32_max_abs_diff`` / ``fp32_max_rel_diff`` (the model's outputs before vs after on
  ``calib``, onnxruntime CPU; relative = max |after - before| / max |before|) and ``seconds``.

The registry :data:`TOOLS` maps a name to a :class:`Tool`; :func:`apply` runs one by name. The helpers below
(constant access, onnxruntime runs with intermediate tensors exposed, output comparison) are shared by the
three tool modules; the modules import this package, never each other.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tool:
    name: str
    module: str  # pipeline.recover.<module>
    function: str
    description: str

    @property
    def fn(self):
        """The tool's function, its module imported on first use (a fixed name of this package, never one read from
        a file)."""
        from pipeline.recover import bias_correction, cle, clipping
        return getattr({"cle": cle, "bias_correction": bias_correction, "clipping": clipping}[self.module],
                       self.function)


TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("cle", "cle", "equalize",
         "cross-layer equalization (+ bias absorption): equal per-channel weight ranges of consecutive layers"),
    Tool("bias_correction", "bias_correction", "correct_biases",
         "empirical bias correction: remove the mean output shift that weight rounding causes"),
    Tool("clip_percentile", "clipping", "clip_activations",
         "percentile clipping: Clip nodes so that min-max calibration sees the [100-p, p] percentile range"),
)}


def apply(name: str, model, calib: np.ndarray, **opts):
    """Run the tool registered as ``name``; returns ``(model, record)``."""
    if name not in TOOLS:
        import difflib
        near = difflib.get_close_matches(name, TOOLS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown recovery tool {name!r}{hint}; known: {', '.join(TOOLS)}")
    return TOOLS[name].fn(model, calib, **opts)


# ---------------------------------------------------------------- shared helpers (used by the tool modules)

def attrs(node) -> dict:
    """A node's attributes as Python values."""
    import onnx
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class Graph:
    """A mutable view over a *copy* of a model: constants by name, producers and consumers of tensors."""

    def __init__(self, model):
        self.model = copy.deepcopy(model)
        self.g = self.model.graph
        self._new = 0
        self.reindex()

    def reindex(self) -> None:
        from onnx import numpy_helper
        self.inits = {t.name: t for t in self.g.initializer}
        self.const_nodes = {}
        for n in self.g.node:
            if n.op_type == "Constant" and n.output:
                a = attrs(n)
                if "value" in a:
                    self.const_nodes[n.output[0]] = numpy_helper.to_array(a["value"])
                elif "value_float" in a:
                    self.const_nodes[n.output[0]] = np.array(a["value_float"], np.float32)
                elif "value_floats" in a:
                    self.const_nodes[n.output[0]] = np.array(a["value_floats"], np.float32)
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, i))
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output, else None."""
        from onnx import numpy_helper
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return self.const_nodes.get(name)

    def set_input(self, node, index: int, value: np.ndarray, tag: str) -> str:
        """Point ``node.input[index]`` to a new initializer holding ``value`` (the old one is pruned later)."""
        from onnx import numpy_helper
        self._new += 1
        name = f"{node.name or node.output[0]}/{tag}_{self._new}"
        self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
        return name

    def scalar(self, value: float, tag: str) -> str:
        from onnx import numpy_helper
        self._new += 1
        name = f"{tag}_{self._new}"
        self.g.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def single_consumer(self, tensor: str):
        """The only node reading ``tensor``, or None when several read it or it is a graph output."""
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.outputs:
            return None
        return users[0][0]

    def finish(self):
        """Drop unused initializers and Constant nodes; return the model."""
        used = {i for n in self.g.node for i in n.input} | self.outputs
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        graph_inputs = [i for i in self.g.input if i.name in used or i.name not in self.inits]
        del self.g.input[:]
        self.g.input.extend(graph_inputs)
        nodes = [n for n in self.g.node if not (n.op_type == "Constant" and n.output[0] not in used)]
        del self.g.node[:]
        self.g.node.extend(nodes)
        return self.model


def input_name(model) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def session(model):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model, calib: np.ndarray, tensors: list[str] | None = None, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Run ``model`` on ``calib`` (in batches); returns the graph outputs and the ``tensors`` asked for
    (intermediate tensors are exposed as extra graph outputs of a copy)."""
    import onnx
    m = model
    extra = [t for t in (tensors or []) if t not in {o.name for o in model.graph.output}]
    if extra:
        from pipeline.conversion.rewrites import elem_types
        known = elem_types(model)  # a shape subgraph's Concat is int64: declared float, onnxruntime refuses the graph
        m = copy.deepcopy(model)
        m.graph.output.extend(onnx.helper.make_tensor_value_info(t, known.get(t, onnx.TensorProto.FLOAT), None)
                              for t in extra)
    sess = session(m)
    names = [o.name for o in sess.get_outputs()]
    feed = input_name(model)
    parts: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(calib), batch_size):
        got = sess.run(None, {feed: np.ascontiguousarray(calib[start:start + batch_size], np.float32)})
        for n, v in zip(names, got):
            parts[n].append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


def outputs(model, calib: np.ndarray) -> list[np.ndarray]:
    got = run(model, calib)
    return [got[o.name] for o in model.graph.output]


def compare(before: list[np.ndarray], after: list[np.ndarray]) -> dict:
    """``fp32_max_abs_diff`` and ``fp32_max_rel_diff`` (relative to the largest |before| of each output)."""
    abs_d, rel_d = 0.0, 0.0
    for b, a in zip(before, after):
        d = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if b.size else 0.0
        abs_d = max(abs_d, d)
        rel_d = max(rel_d, d / max(float(np.abs(b).max()) if b.size else 0.0, 1e-12))
    return {"fp32_max_abs_diff": abs_d, "fp32_max_rel_diff": rel_d}


def top1_agreement(before: list[np.ndarray], after: list[np.ndarray]) -> float | None:
    """Share of inputs whose argmax of the first output is unchanged (None when it is not N x classes)."""
    b, a = before[0], after[0]
    if b.ndim != 2 or b.shape[1] < 2:
        return None
    return float(np.mean(b.argmax(1) == a.argmax(1)))
