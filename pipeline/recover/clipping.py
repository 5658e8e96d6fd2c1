"""Percentile calibration ranges by clipping activations in the FP32 ONNX graph.

Method: percentile calibration (e.g. Wu, Judd, Zhang, Isaev, Micikevicius, "Integer Quantization for Deep
Learning Inference: Principles and Empirical Evaluation", 2020, section 4.2; also McKinstry et al. 2019).
Written from the description, not from any implementation.

Why: the TFLite converter calibrates each activation tensor with min-max over the representative dataset, so
one outlier value stretches the int8 scale of the whole tensor and every ordinary value loses resolution. We
cannot change the converter's calibrator, so we change what it sees: after a tensor T we insert
``Clip(T, lo, hi)`` with lo, hi = the (100 - p)-th and p-th percentiles of T's values over the calibration set
(all elements, per tensor, as activations are quantized per tensor). Everything downstream then reads the
clipped tensor, and its min-max range is [lo, hi].

Which tensors (``where="activations"``): the outputs of Relu, Clip, LeakyRelu, HardSigmoid, HardSwish, Sigmoid,
Add, Sum, Concat, and of Conv / Gemm / MatMul whose output is not read by an activation (an activation after
them is clipped instead, once). ``where="all"``: every float tensor a node produces. Graph outputs are never
clipped (that would change the model's logits, and their scale is the output scale). A Clip is inserted only
where it narrows the range by more than ``min_narrowing`` (default 10%): (hi - lo) < (1 - 0.10) (max - min),
so tensors without real outliers are left alone.

Caveat (not measured here): the converter quantizes the producer's own output tensor too; unless it fuses the
new Clip into the producer (TFLite fuses only RELU/RELU6/RELU_N1_TO_1), that tensor keeps its full min-max
range and the rounding there is unchanged; the clipped tensor gets the narrow scale for its consumers.

The record gives each clipped tensor's old and new range, the FP32 diff of the outputs and the top-1 agreement
of the clipped FP32 model with the original on the calibration inputs.
"""
from __future__ import annotations

import time

import numpy as np

from pipeline.recover import Graph, compare, opset, outputs, run, top1_agreement

ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Add", "Sum", "Concat"}
LINEAR = {"Conv", "Gemm", "MatMul"}
READ_BY_ACTIVATION = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "PRelu", "Elu"}


def _candidates(g: Graph, where: str) -> list[str]:
    out = []
    for n in g.g.node:
        if n.op_type == "Constant" or not n.output:
            continue
        t = n.output[0]
        if t in g.outputs or t in g.const_nodes:
            continue
        if where == "all":
            out.append(t)
        elif n.op_type in ACTIVATIONS:
            out.append(t)
        elif n.op_type in LINEAR and not any(c.op_type in READ_BY_ACTIVATION for c, _ in g.consumers.get(t, [])):
            out.append(t)
    return out


def clip_activations(model, calib: np.ndarray, *, percentile: float = 99.99, where: str = "activations",
                     min_narrowing: float = 0.10):
    """Insert percentile Clip nodes. Returns ``(new_model, record)``; see the module doc."""
    if where not in ("activations", "all"):
        raise ValueError(f"where must be 'activations' or 'all', not {where!r}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], not {percentile}")
    t0 = time.perf_counter()
    g = Graph(model)
    names = _candidates(g, where)
    got = run(model, calib, names)
    before = [got[o.name] for o in model.graph.output]
    plans = []
    for t in names:
        v = got[t]
        if v.dtype.kind != "f" or not v.size:
            continue
        old = (float(v.min()), float(v.max()))
        lo, hi = (float(q) for q in np.percentile(v, [100.0 - percentile, percentile]))
        if old[1] - old[0] <= 0 or (hi - lo) >= (1.0 - min_narrowing) * (old[1] - old[0]):
            continue
        plans.append({"tensor": t, "old_range": list(old), "new_range": [lo, hi],
                      "narrowed_by": 1.0 - (hi - lo) / (old[1] - old[0])})
    clipped_nodes = _insert(g, plans)
    new = g.finish()
    after = outputs(new, calib)
    return new, {
        "tool": "clip_percentile", "method": "percentile calibration range via inserted Clip nodes",
        "percentile": percentile, "where": where, "min_narrowing": min_narrowing,
        "candidates": len(names), "changed_layers": len(plans), "nodes": clipped_nodes, "clipped": plans,
        **compare(before, after), "top1_agreement": top1_agreement(before, after),
        "calibration_inputs": int(len(calib)), "seconds": round(time.perf_counter() - t0, 3),
    }


def _insert(g: Graph, plans: list[dict]) -> list[str]:
    """Add one Clip after each planned tensor (right after its producer) and rewire its readers."""
    import onnx
    by_tensor = {p["tensor"]: p for p in plans}
    readers = {t: list(g.consumers.get(t, [])) for t in by_tensor}
    new_nodes, names = [], []
    for n in g.g.node:
        new_nodes.append(n)
        for t in n.output:
            if t not in by_tensor:
                continue
            lo, hi = by_tensor[t]["new_range"]
            out = f"{t}/percentile_clip"
            name = f"{n.name or t}/PercentileClip"
            if opset(g.model) >= 11:
                clip = onnx.helper.make_node("Clip", [t, g.scalar(lo, f"{name}/min"), g.scalar(hi, f"{name}/max")],
                                             [out], name=name)
            else:
                clip = onnx.helper.make_node("Clip", [t], [out], name=name, min=lo, max=hi)
            new_nodes.append(clip)
            names.append(name)
            for reader, i in readers[t]:
                reader.input[i] = out
    del g.g.node[:]
    g.g.node.extend(new_nodes)
    g.reindex()
    return names
