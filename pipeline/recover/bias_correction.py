"""Empirical bias correction of the weight-quantization error, on the FP32 ONNX graph.

Method: Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, section 4.2 (bias correction; we use its empirical variant: the input statistics come
from data, here the calibration inputs, instead of from BatchNorm parameters). Written from the paper.

Why: rounding the weights, W~ = W + eps, shifts a layer's output by eps x. Its mean over the data,
E[eps x] = eps E[x], is generally not zero (E[x] >= 0 after a ReLU), so the quantized layer is biased, and the
bias accumulates through the network. Subtracting it from the layer's bias removes the mean error:
W~ x + (b - eps E[x]) has the same expectation as W x + b.

What we simulate is what the TFLite converter does to weights (symmetric int8, zero point 0, codes in
[-127, 127]):

- ``per_channel=True`` (the converter's default): one scale per output channel, s_o = max |W[o]| / 127;
- ``per_channel=False`` (``--per-tensor``): one scale for the tensor, s = max |W| / 127;
- W~ = s * clip(round(W / s), -127, 127), rounding half away from zero as TFLite's std::round does (np.round
  rounds half to even; ties have measure zero for trained float weights, so either is fine).

Per layer, eps = W~ - W and the expected output error per output channel o is

- Conv: ``E_o = sum_{j, kh, kw} eps[o, j, kh, kw] * E[x_{g(o), j}]`` where E[x_c] is the mean of input channel c
  over the calibration set (batch and spatial positions) and g(o) the group of o (depthwise: j = o);
- Gemm: ``E = alpha * E[x] @ eps`` (eps as K x N), divided by beta for the bias C.

New bias: b - E (a zero bias is created when the layer has none). Input means come from one onnxruntime run of
the original FP32 model with every layer input exposed; the paper's sequential variant (means measured with
the earlier layers already quantized) is not done here. Zero padding makes eps E[x] slightly off at the
borders of padded convs (the padded zeros are not x's mean); the paper has the same approximation.
MatMul layers are skipped (they have no bias input; adding an Add node would change what the converter fuses).
"""
from __future__ import annotations

import time

import numpy as np

from pipeline.recover import Graph, attrs, compare, outputs, run


def round_half_away(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_weight(w: np.ndarray, per_channel: bool, axis: int = 0) -> np.ndarray:
    """The converter's symmetric int8 weights, dequantized (W~), with one scale per ``axis`` slice or per tensor."""
    w64 = np.asarray(w, np.float64)
    if per_channel:
        moved = np.moveaxis(w64, axis, 0)
        scale = np.abs(moved).reshape(moved.shape[0], -1).max(1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).reshape((-1,) + (1,) * (moved.ndim - 1))
        q = np.clip(round_half_away(moved / scale), -127, 127) * scale
        return np.moveaxis(q, 0, axis)
    scale = float(np.abs(w64).max()) / 127.0 or 1.0
    return np.clip(round_half_away(w64 / scale), -127, 127) * scale


def _layers(g: Graph) -> tuple[list, list[dict]]:
    todo, skipped = [], []
    for n in g.g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = g.const(n.input[1]) if len(n.input) > 1 else None
        if w is None:
            skipped.append({"node": n.name, "reason": "weights are not a constant"})
        elif n.op_type == "MatMul":
            skipped.append({"node": n.name, "reason": "MatMul has no bias input"})
        elif n.op_type == "Gemm" and (attrs(n).get("transA", 0) or attrs(n).get("beta", 1.0) == 0 or w.ndim != 2):
            skipped.append({"node": n.name, "reason": "Gemm with transA or beta 0"})
        elif len(n.input) > 2 and n.input[2] and g.const(n.input[2]) is None:
            skipped.append({"node": n.name, "reason": "bias is not a constant"})
        else:
            todo.append(n)
    return todo, skipped


def expected_error(node, w: np.ndarray, w_q: np.ndarray, x_mean: np.ndarray) -> np.ndarray:
    """E[eps x] per output channel (see the module doc). ``x_mean``: per input channel (Conv) or per K (Gemm)."""
    eps = np.asarray(w_q, np.float64) - np.asarray(w, np.float64)
    a = attrs(node)
    if node.op_type == "Conv":
        group = a.get("group", 1)
        c_out, c_in_g = eps.shape[:2]
        e = eps.reshape(c_out, c_in_g, -1).sum(2)  # [C_out, C_in/group]
        means = x_mean.reshape(group, c_in_g)[np.arange(c_out) // (c_out // group)]
        return (e * means).sum(1)
    eps_kn = eps.T if a.get("transB", 0) else eps
    return a.get("alpha", 1.0) * (x_mean @ eps_kn) / a.get("beta", 1.0)


def _bias_vector(g: Graph, node, n_out: int) -> np.ndarray:
    if len(node.input) > 2 and node.input[2]:
        b = np.asarray(g.const(node.input[2]), np.float64)
        return np.array(np.broadcast_to(b.reshape(-1), (n_out,)))
    return np.zeros(n_out)


def _with_quantized_weights(model, per_channel: bool):
    """A copy of ``model`` whose Conv/Gemm weights are W~ (the converter's int8 weights, dequantized)."""
    g = Graph(model)
    for n in _layers(g)[0]:
        w = g.const(n.input[1])
        axis = 1 if n.op_type == "Gemm" and not attrs(n).get("transB", 0) else 0
        g.set_input(n, 1, quantize_weight(w, per_channel, axis).astype(w.dtype), "Wq")
    return g.finish()


def correct_biases(model, calib: np.ndarray, *, per_channel: bool = True):
    """Empirical bias correction for every Conv/Gemm. Returns ``(new_model, record)``; see the module doc."""
    t0 = time.perf_counter()
    g = Graph(model)
    layers, skipped = _layers(g)
    got = run(model, calib, sorted({n.input[0] for n in layers}))
    before = [got[o.name] for o in model.graph.output]
    per_layer, created = [], []
    for n in layers:
        x = got[n.input[0]].astype(np.float64)
        x_mean = x.mean(axis=(0,) + tuple(range(2, x.ndim))) if n.op_type == "Conv" else x.reshape(
            -1, x.shape[-1]).mean(0)
        w = g.const(n.input[1])
        axis = 1 if n.op_type == "Gemm" and not attrs(n).get("transB", 0) else 0
        err = expected_error(n, w, quantize_weight(w, per_channel, axis), x_mean)
        b = _bias_vector(g, n, len(err))
        if not (len(n.input) > 2 and n.input[2]):
            created.append(n.name)
        dtype = g.const(n.input[2]).dtype if len(n.input) > 2 and n.input[2] else np.float32
        g.set_input(n, 2, (b - err).astype(dtype), "B_corr")
        per_layer.append({"node": n.name, "op": n.op_type, "max_abs_correction": float(np.abs(err).max()),
                          "max_abs_bias": float(np.abs(b).max())})
    new = g.finish()
    after = outputs(new, calib)
    sim = _simulated_bias(model, new, calib, before, per_channel)
    return new, {
        "tool": "bias_correction", "method": "Nagel et al. ICCV 2019 sec. 4.2, empirical bias correction",
        "per_channel": per_channel, "changed_layers": len(per_layer), "nodes": [r["node"] for r in per_layer],
        "bias_created": created, "skipped": skipped, "layers": per_layer,
        "largest_correction": max((r["max_abs_correction"] for r in per_layer), default=0.0),
        **compare(before, after), "simulated_quantized_weights": sim, "calibration_inputs": int(len(calib)),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _simulated_bias(model, corrected, calib, fp32: list[np.ndarray], per_channel: bool) -> dict:
    """Mean over output channels of |mean over inputs of (output with W~ - FP32 output)|, before and after."""
    def bias_err(m):
        q = outputs(_with_quantized_weights(m, per_channel), calib)[0].astype(np.float64)
        d = q - fp32[0]
        return float(np.abs(d.reshape(len(d), -1).mean(0)).mean())
    return {"mean_abs_output_bias_uncorrected": bias_err(model), "mean_abs_output_bias_corrected": bias_err(corrected),
            "what": "weights replaced by the simulated int8 weights (activations float); bias = mean error of the "
                    "first output per output element, compared with the FP32 model"}
