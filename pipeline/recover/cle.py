"""Cross-layer equalization (CLE) with bias absorption, on the FP32 ONNX graph.

Method: Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, sections 4.1 (equalization) and 4.1.2 (absorbing high biases). Written from the paper.

Why: with one weight scale per tensor (``--per-tensor``; many NPUs and MCU kernels), a layer whose output
channels have very different weight ranges loses the small channels to rounding (MobileNet depthwise convs are
the classic case). With per-channel scales this matters much less.

Equalization. For two layers with a positive-homogeneous function between them (f(s*x) = s*f(x) for s > 0:
ReLU, max/average pooling, nothing at all), y = W2 f(W1 x + b1) + b2 is unchanged by
``W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i`` for any s_i > 0. With r1_i = max |W1[i]| (output channel i of
layer 1) and r2_i = max |W2[:, i]| (input channel i of layer 2), the ranges after scaling are r1_i / s_i and
r2_i * s_i; making them equal gives ``s_i = sqrt(r1_i / r2_i)`` (the paper's s_i = sqrt(r1_i r2_i) / r2_i).
A zero range on either side leaves the channel alone (s_i = 1). Layers chain (layer 2 of one pair is layer 1 of
the next), so all pairs are equalized in turn, repeatedly, until no s_i differs from 1 by more than 1e-6 or
``iterations`` sweeps are done.

Pairs found: Conv1 -> [Relu | Clip(0, inf) | MaxPool | AveragePool | Global*Pool]* -> Conv2, Gemm or MatMul,
where each tensor on the way has exactly one consumer and is not a graph output. Conv1 is a Conv (group 1 or
depthwise: group == C_in == C_out) or a Gemm; Conv2 is a group-1 Conv, a depthwise Conv (its channel i is
scaled), a Gemm or a MatMul with constant weights. A Flatten(axis=1) right before a Gemm/MatMul is allowed: the
NCHW flatten maps channel i to the K-block [i*HW, (i+1)*HW), so block i is scaled. Grouped (not depthwise)
convs are skipped. ReLU6 (Clip(0, 6)) is not positive-homogeneous: with ``relu6="keep"`` those pairs are
skipped and listed in the record; with ``relu6="to_relu"`` the Clip between the pair is replaced by Relu (as
the paper does for MobileNetV2) -- this changes the FP32 model, and the record's fp32 diff says by how much;
with ``relu6="per_channel"`` (ours) the pair is equalized and Clip(0, hi) becomes Relu -> Min(x, hi / S_i), one
bound per channel, which keeps the FP32 model exactly (the converters keep Min as an int8 MINIMUM).

Bias absorption (``absorb_bias=True``, pairs Conv1 -> Relu -> [pools/Flatten] -> Conv2). Equalization can
grow b1 and so the activation range of layer 1. For a channel whose pre-activation x_i is always >= c_i >= 0,
relu(x_i - c_i) = relu(x_i) - c_i, so ``b1_i -= c_i`` and ``b2 += sum_{i, kernel positions} W2[:, i] c_i``
(Gemm: ``C += alpha / beta * W2 c``) keeps the output and narrows the activation range. The paper takes
c_i = max(0, beta_i - 3 gamma_i) from BatchNorm; BN is folded away in our ONNX exports, so we estimate the
same mean/std of the pre-activation from the calibration inputs (onnxruntime with Conv1's output exposed):
``c_i = max(0, min(mu_i - 3 sigma_i, min over calib of x_i))``. The extra min with the observed minimum (our
choice, not the paper's) makes the absorption exact on the calibration data instead of "exact for 99.9% of a
Gaussian". Zero padding of Conv2 breaks the identity at the borders (the padded zeros would have to become
-c_i); by default (``absorb_padded=False``) we absorb only into Conv2s without padding (1x1 convs, Gemm).

Measured (tests/test_recover.py's model shape: Conv3x3-BN(beta += 3)-ReLU-DWConv3x3(pad 1)-ReLU-Conv1x1-ReLU-
GAP-Linear, 64 inputs; max |after - before| / max |before| of the outputs):
no absorption 2.8e-7; padding-free absorption with the clamp 2.8e-7 (exact); without the clamp (pure
mu - 3 sigma) 3.2e-4; absorbing into the padded depthwise conv as well 7.4e-2 (the border error). Hence the
defaults ``absorb_padded=False, absorb_clamp=True``. On zoo:mobilenetv2 (256 Fashion-MNIST test images) no
channel has mu - 3 sigma > 0, so absorption changes nothing there.
"""
from __future__ import annotations

import time

import numpy as np

from pipeline.recover import Graph, attrs, compare, outputs, run

PASS_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
EPS = 1e-12


# ----------------------------------------------------------------- weight layouts

def _kind(g: Graph, node) -> str | None:
    """'conv', 'depthwise', 'gemm' or 'matmul' for a layer with constant weights we can rescale, else None."""
    if node.op_type == "Conv":
        w = g.const(node.input[1])
        if w is None or w.ndim != 4:
            return None
        group = attrs(node).get("group", 1)
        if group == 1:
            return "conv"
        if group == w.shape[0] and w.shape[1] == 1:
            return "depthwise"
        return None
    if node.op_type == "Gemm":
        a = attrs(node)
        w = g.const(node.input[1])
        return "gemm" if w is not None and w.ndim == 2 and not a.get("transA", 0) else None
    if node.op_type == "MatMul":
        w = g.const(node.input[1])
        return "matmul" if w is not None and w.ndim == 2 else None
    return None


def _out_view(kind: str, node, w: np.ndarray) -> np.ndarray:
    """Weights with the output channel first (a view)."""
    if kind == "gemm" and not attrs(node).get("transB", 0):
        return w.T
    return w


def _in_view(kind: str, node, w: np.ndarray) -> np.ndarray:
    """Weights with the input index first, 2-D or more (a view)."""
    if kind == "conv":
        return w.swapaxes(0, 1)
    if kind == "depthwise":
        return w
    if kind == "gemm" and attrs(node).get("transB", 0):
        return w.T
    return w  # gemm without transB, matmul: [K, N]


def _bias(g: Graph, node, n_out: int) -> np.ndarray:
    """Layer bias as a float64 vector of n_out (zeros when the layer has none)."""
    idx = 2
    b = g.const(node.input[idx]) if len(node.input) > idx and node.input[idx] else None
    if b is None:
        return np.zeros(n_out)
    b = np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (n_out,)) if b.size in (1, n_out) else None
    if b is None:
        raise ValueError(f"{node.name}: bias of unexpected shape")
    return np.array(b)


def _bias_ok(g: Graph, node) -> bool:
    if len(node.input) > 2 and node.input[2]:
        b = g.const(node.input[2])
        if b is None:
            return False
        if node.op_type == "Gemm" and attrs(node).get("beta", 1.0) == 0:
            return False
    return True


# ----------------------------------------------------------------- finding pairs

def _clip_bounds(g: Graph, node) -> tuple[float, float] | None:
    a = attrs(node)
    lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
    if len(node.input) > 1 and node.input[1]:
        v = g.const(node.input[1])
        if v is None:
            return None
        lo = float(v)
    if len(node.input) > 2 and node.input[2]:
        v = g.const(node.input[2])
        if v is None:
            return None
        hi = float(v)
    return float(lo), float(hi)


def find_pairs(g: Graph) -> tuple[list[dict], list[dict]]:
    """Equalizable pairs and the pairs skipped for a bounded activation (ReLU6)."""
    pairs, bounded = [], []
    for n1 in g.g.node:
        k1 = _kind(g, n1)
        if k1 not in ("conv", "depthwise", "gemm") or not _bias_ok(g, n1):
            continue
        t, path, clips, flatten = n1.output[0], [], [], False
        nxt = g.single_consumer(t)
        while nxt is not None:
            if nxt.op_type == "Relu" or nxt.op_type in PASS_OPS:
                pass
            elif nxt.op_type == "Clip":
                b = _clip_bounds(g, nxt)
                if b is None or b[0] != 0.0:
                    nxt = None
                    break
                if np.isfinite(b[1]):
                    clips.append(nxt)
            elif nxt.op_type == "Flatten" and attrs(nxt).get("axis", 1) == 1:
                flatten = True
            else:
                break
            if nxt.op_type == "AveragePool" and any(attrs(nxt).get("pads", [])):
                nxt = None  # zero padding is fine for scaling, but keep the rule set small and exact
                break
            path.append(nxt)
            if flatten:
                nxt = g.single_consumer(nxt.output[0])
                break
            nxt = g.single_consumer(nxt.output[0])
        if nxt is None:
            continue
        k2 = _kind(g, nxt)
        feeding = path[-1].output[0] if path else n1.output[0]
        if k2 is None or (flatten and k2 not in ("gemm", "matmul")) or nxt.input[0] != feeding:
            continue
        if k2 == "gemm" and not _bias_ok(g, nxt):
            continue
        w1, w2 = g.const(n1.input[1]), g.const(nxt.input[1])
        c1 = _out_view(k1, n1, w1).shape[0]
        k_in = _in_view(k2, nxt, w2).shape[0]
        if k_in % c1 or (k_in != c1 and not flatten):
            continue
        pair = {"conv1": n1, "conv2": nxt, "kind1": k1, "kind2": k2, "block": k_in // c1, "path": path,
                "clips": clips}
        (bounded if clips else pairs).append(pair)
    return pairs, bounded


# ----------------------------------------------------------------- equalization

def _ranges1(p, w1) -> np.ndarray:
    v = _out_view(p["kind1"], p["conv1"], w1)
    return np.abs(v).reshape(v.shape[0], -1).max(1)


def _ranges2(p, w2, c1: int) -> np.ndarray:
    v = _in_view(p["kind2"], p["conv2"], w2)
    return np.abs(v).reshape(c1, -1).max(1)  # K-blocks of a flatten are contiguous rows


def _spread(r: np.ndarray) -> float:
    """max/min of per-channel ranges (channels with a zero range ignored)."""
    r = r[r > EPS]
    return float(r.max() / r.min()) if r.size else 1.0


def _scale(p, weights: dict, biases: dict, s: np.ndarray) -> None:
    n1, n2 = p["conv1"].name, p["conv2"].name
    v1 = _out_view(p["kind1"], p["conv1"], weights[n1])
    v1 /= s.reshape((-1,) + (1,) * (v1.ndim - 1))
    biases[n1] /= s
    v2 = _in_view(p["kind2"], p["conv2"], weights[n2])
    rows = np.repeat(s, p["block"])
    v2 *= rows.reshape((-1,) + (1,) * (v2.ndim - 1))


def equalize(model, calib: np.ndarray, *, iterations: int = 20, absorb_bias: bool = True, relu6: str = "keep",
             absorb_padded: bool = False, absorb_sigmas: float = 3.0, absorb_clamp: bool = True):
    """Cross-layer equalization (+ bias absorption). Returns ``(new_model, record)``; see the module doc."""
    if relu6 not in ("keep", "to_relu", "per_channel"):
        raise ValueError(f"relu6 must be 'keep', 'to_relu' or 'per_channel', not {relu6!r}")
    t0 = time.perf_counter()
    before = outputs(model, calib)
    g = Graph(model)
    pairs, bounded = find_pairs(g)
    replaced = []
    if relu6 == "to_relu":
        for p in bounded:
            for clip in p["clips"]:
                clip.op_type = "Relu"
                del clip.input[1:]
                del clip.attribute[:]
                replaced.append(clip.name)
        pairs = pairs + bounded
        bounded = []
    clipped = []  # relu6="per_channel": (pair, clip node) whose bound becomes hi / S_i per channel
    if relu6 == "per_channel":
        clipped = [(p, c) for p in bounded for c in p["clips"]]
        pairs = pairs + bounded
        bounded = []
    skipped = [{"conv1": p["conv1"].name, "conv2": p["conv2"].name,
                "reason": "bounded activation (Clip/ReLU6) between them is not positive-homogeneous; "
                          "relu6='to_relu' replaces it by Relu"} for p in bounded]

    layers = {}
    for p in pairs:
        for key in ("conv1", "conv2"):
            layers[p[key].name] = (p[key], p["kind1" if key == "conv1" else "kind2"])
    weights = {name: g.const(n.input[1]).astype(np.float64) for name, (n, _) in layers.items()}
    biases = {name: _bias(g, n, _out_view(k, n, weights[name]).shape[0]) for name, (n, k) in layers.items()
              if k != "matmul"}
    spread_before = [(_spread(_ranges1(p, weights[p["conv1"].name])),
                      _spread(_ranges2(p, weights[p["conv2"].name], len(biases[p["conv1"].name]))))
                     for p in pairs]
    sweeps = 0
    total = {id(p): np.ones(len(biases[p["conv1"].name])) for p in pairs}  # S_i: conv1's output channel i / S_i
    for sweeps in range(1, iterations + 1):
        worst = 0.0
        for p in pairs:
            c1 = len(biases[p["conv1"].name])
            r1 = _ranges1(p, weights[p["conv1"].name])
            r2 = _ranges2(p, weights[p["conv2"].name], c1)
            ok = (r1 > EPS) & (r2 > EPS)
            s = np.ones(c1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            _scale(p, weights, biases, s)
            total[id(p)] *= s
            worst = max(worst, float(np.abs(np.log(s)).max()) if s.size else 0.0)
        if worst < 1e-6:
            break
    pair_records = []
    for p, (sb1, sb2) in zip(pairs, spread_before):
        c1 = len(biases[p["conv1"].name])
        pair_records.append({
            "conv1": p["conv1"].name, "conv2": p["conv2"].name,
            "between": [n.op_type for n in p["path"]],
            "conv1_range_spread_before": sb1,
            "conv1_range_spread_after": _spread(_ranges1(p, weights[p["conv1"].name])),
            "conv2_range_spread_before": sb2,
            "conv2_range_spread_after": _spread(_ranges2(p, weights[p["conv2"].name], c1)),
        })
    _write(g, layers, weights, biases)
    per_channel_bounds = _per_channel_bounds(g, clipped, total) if clipped else []

    absorbed = []
    if absorb_bias and pairs:
        absorbed = _absorb(g, pairs, weights, biases, calib, absorb_padded, absorb_sigmas, absorb_clamp)
        _write(g, layers, weights, biases)
    new = g.finish()
    after = outputs(new, calib)
    rec = {
        "tool": "cle", "method": "Nagel et al. ICCV 2019, cross-layer equalization + bias absorption",
        "pairs": len(pairs), "changed_layers": len(layers), "nodes": sorted(layers),
        "iterations": sweeps if pairs else 0, "relu6": relu6, "relu6_replaced_by_relu": replaced,
        "relu6_per_channel_bounds": per_channel_bounds,
        "skipped_pairs": skipped, "pair_details": pair_records,
        "bias_absorption": {"enabled": absorb_bias, "absorb_padded": absorb_padded, "sigmas": absorb_sigmas,
                            "clamp_to_calib_min": absorb_clamp, "absorbed": absorbed},
        **compare(before, after), "calibration_inputs": int(len(calib)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if not pairs:
        rec["note"] = "no equalizable layer pair found: the model is returned unchanged"
    return new, rec


def _per_channel_bounds(g: Graph, clipped: list, total: dict) -> list[str]:
    """relu6="per_channel": after conv1's output channel i was divided by S_i, Clip(0, hi) becomes
    Relu -> Min(x, hi / S_i) with one bound per channel (broadcast over N, H, W): the FP32 model is unchanged, and
    the pair could be equalized although the activation is bounded (ours, not the paper's, which replaces ReLU6 by
    ReLU and so changes the model)."""
    import onnx
    from onnx import numpy_helper
    done, out = {}, []
    for p, clip in clipped:
        lo, hi = _clip_bounds(g, clip)
        bound = (hi / total[id(p)]).astype(np.float32)
        rank = 4 if p["kind1"] in ("conv", "depthwise") else 2
        bound = bound.reshape((-1,) + (1,) * (rank - 2))
        relu_out = f"{clip.output[0]}/relu"
        name = f"{clip.name or clip.output[0]}/PerChannelMin"
        g._new += 1
        cname = f"{name}/bound_{g._new}"
        g.g.initializer.append(numpy_helper.from_array(bound, cname))
        done[clip.name or clip.output[0]] = (onnx.helper.make_node("Min", [relu_out, cname], [clip.output[0]],
                                                                   name=name), relu_out)
        out.append(name)
    nodes = []
    for n in g.g.node:
        key = n.name or (n.output[0] if n.output else "")
        if n.op_type == "Clip" and key in done:
            mn, relu_out = done[key]
            relu = onnx.helper.make_node("Relu", [n.input[0]], [relu_out], name=f"{key}/Relu")
            nodes += [relu, mn]
        else:
            nodes.append(n)
    del g.g.node[:]
    g.g.node.extend(nodes)
    g.reindex()
    return out


def _write(g: Graph, layers: dict, weights: dict, biases: dict) -> None:
    for name, (node, kind) in layers.items():
        dtype = g.const(node.input[1]).dtype
        g.set_input(node, 1, weights[name].astype(dtype), "W_eq")
        if kind == "matmul":
            continue
        b = biases[name]
        had = len(node.input) > 2 and node.input[2]
        if had or np.any(b != 0):
            g.set_input(node, 2, b.astype(np.float32), "B_eq")
    g.reindex()


def _padded(node) -> bool:
    a = attrs(node)
    return any(a.get("pads", [])) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")


def _absorb(g: Graph, pairs: list[dict], weights: dict, biases: dict, calib, absorb_padded: bool, sigmas: float,
            clamp: bool) -> list[dict]:
    """Bias absorption for Conv1 -> Relu -> [pools/Flatten] -> Conv2 pairs (see the module doc)."""
    todo = []
    for p in pairs:
        path = p["path"]
        if not path or path[0].op_type not in ("Relu", "Clip") or p["kind2"] == "matmul":
            continue
        if any(n.op_type in ("Relu", "Clip") for n in path[1:]):
            continue
        if p["kind2"] in ("conv", "depthwise") and _padded(p["conv2"]) and not absorb_padded:
            continue
        todo.append(p)
    if not todo:
        return []
    got = run(g.model, calib, [p["conv1"].output[0] for p in todo])
    done = []
    for p in todo:
        x = got[p["conv1"].output[0]]
        x = np.moveaxis(x, -1 if p["kind1"] == "gemm" else 1, 0)  # channels first
        x = x.reshape(x.shape[0], -1).astype(np.float64)
        mu, sigma, lo = x.mean(1), x.std(1), x.min(1)
        c = mu - sigmas * sigma
        c = np.maximum(0.0, np.minimum(c, lo) if clamp else c)
        if not np.any(c > 0):
            continue
        n1, n2 = p["conv1"].name, p["conv2"].name
        biases[n1] -= c
        v2 = _in_view(p["kind2"], p["conv2"], weights[n2])
        rows = np.repeat(c, p["block"])
        if p["kind2"] == "conv":  # v2: [C_in, C_out, kh, kw]
            shift = np.einsum("iokl,i->o", v2, rows)
        elif p["kind2"] == "depthwise":  # [C, 1, kh, kw]
            shift = v2.reshape(len(rows), -1).sum(1) * rows
        else:  # gemm: v2 [K, N]
            a = attrs(p["conv2"])
            shift = (rows @ v2) * a.get("alpha", 1.0) / a.get("beta", 1.0)
        biases[n2] += shift
        done.append({"conv1": n1, "conv2": n2, "channels": int(np.count_nonzero(c)), "max_c": float(c.max())})
    return done
