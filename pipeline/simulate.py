"""Fake-quantization simulator: the int8 TFLite model's arithmetic, at any bit width from 2 to 8, in PyTorch.

``Simulator(model, representative_dataset).logits(x, QuantSetting(weight_bits=4, activation_bits=8))`` returns
the logits of the simulated quantized model: what a fully quantized TFLite model built from ``model`` with that
calibration set would compute, without converting anything. At W8A8 (asymmetric activations, per-channel
weights) it is checked against the real LiteRT int8 model the pipeline exports (:func:`accept_against_tflite`,
``python -m pipeline.simulate``); the other settings are the same arithmetic with other integer ranges.

The model is captured with ``torch.export`` (an ATen graph: conv2d, batch_norm, relu, add, cat, ...), then
rewritten the way the converter rewrites it, and interpreted op by op with fake-quantized tensors (float values
that lie exactly on an integer grid), in float32 (default) or float64 (``exact=True``: every integer accumulation
of the quantized model is then exact).

What is quantized, and where (as in the ``.tflite`` the pipeline exports; checked op by op on the zoo models):

- BatchNorm after a conv/linear with no other consumer is folded into it first:
  ``w' = w * g``, ``b' = (b - mean) * g + beta`` with ``g = gamma / sqrt(var + eps)``.
- A ReLU / ReLU6 / hardtanh(0, 6) / hardtanh(-1, 1) that is the only consumer of a conv, linear, add, sub or mul
  is fused into it: the tensor is quantized after the activation, never before (TFLite's fused activations).
- HardSigmoid after a conv/linear (only consumer) is folded the way the converter folds it: the conv's weights
  and bias become ``w / 6`` and ``b / 6 + 1/2`` (quantized as such), then ``clamp(0, 1)`` (RELU_0_TO_1) with the
  fixed range [0, 1]. HardSigmoid, sigmoid and tanh elsewhere get the fixed ranges [0, 1], [0, 1], [-1, 1].
- Quantization points (one per-tensor grid each): the model input; the output of every conv/linear (after its
  fused activation); of add, sub, mul; of mean / global average pooling (TFLite MEAN has its own scale); of any
  activation that is not fused; of a BatchNorm that could not be folded.
- Ops that keep the grid (no rounding of their own): max pooling, flatten/reshape/view, slicing, permute,
  dropout, zero padding. ``cat`` keeps it too and, as TFLite requires of CONCATENATION, its inputs and output
  share one grid: the tensors a cat joins (through grid-keeping ops) form one *group* and the convs feeding the
  cat write directly on its grid. ``avg_pool2d`` (AVERAGE_POOL_2D) rounds onto its input's grid.
- Calibration: min and max over the whole representative dataset, in float (no quantization), as the TFLite
  calibrator records them. A group takes the range of its last cat (the converter gives a cat its own output
  range and imposes it on the cat's inputs; along a chain of cats, as in zoo:shufflenetv2's stages, the last one
  wins), else of its one quantization point. One quirk of the calibrator is reproduced because it moves real
  scales (measured on zoo:resnet8, mobilenetv2, ghostnet): the float ADD runs in place while calibrating,
  writing its output into the buffer of its first operand that has no other consumer, and the calibrator reads
  that operand after the op, so the operand's range becomes the union of its own and the ADD's output range
  (after the fused activation). ``Simulator(..., tflite_calibration=False)`` turns this off.

Formulas (``b`` bits; all scales are rounded to float32 as the flatbuffer stores them):

- weights, symmetric, zero point 0: ``qmax = 2^(b-1) - 1``; per output channel c (default)
  ``s_c = max|w_c| / qmax`` (per tensor: ``s = max|w| / qmax``); ``w_q = clamp(round_away(w / s), -qmax, qmax)``;
  a channel of zeros gets ``s = 1``. Depthwise convs are per output channel too (TFLite's channel axis).
- biases: int32 at the accumulator's scale ``s_b = s_in * s_c``: ``b_q = clamp(round_away(b / s_b), -2^31,
  2^31 - 1)``, so the bias error is the converter's (at most half an accumulator step), at every bit width.
- activations, asymmetric (default): ``qmin = -2^(b-1)``, ``qmax = 2^(b-1) - 1`` (2^b levels; [-128, 127] at 8
  bits). The range is widened to hold 0: ``lo = min(min, 0)``, ``hi = max(max, 0)``; ``s = (hi - lo) / (qmax -
  qmin)``; ``zp = round_away(qmin - lo / s)`` clamped to [qmin, qmax] (TFLite's nudged zero point, so 0 is exact).
- activations, symmetric: zero point 0, ``qmax = 2^(b-1) - 1``, ``qmin = -qmax`` (2^b - 1 levels, as TFLite's
  symmetric int16 activations), ``s = max(|lo|, |hi|) / qmax``.
- fake quantization of an activation: ``q = clamp(round_even(v / s) + zp, qmin, qmax)``, value ``(q - zp) * s``.

Rounding: weights and biases round half away from zero (the converter's ``std::round``); activations round half
to even, as the pipeline quantizes the model input (``np.round``, where pixel values do hit ties) and as
XNNPACK requantizes (``lrintf`` in its fp32 requantization; the export runs on XNNPACK). LiteRT's reference
kernels round half away from zero with fixed-point multipliers instead. Inside the network ties are rare: on
zoo:ghostnet, switching the activations to half away from zero or half up moves top-1 agreement with TFLite by
0.01 points (one image of 10,000) and ECE not at all to 4 decimals.

Measured (``python -m pipeline.simulate --model zoo:NAME --out DIR``: the default export, balanced calibration
of 500 samples, the whole Fashion-MNIST test split of 10,000 images; top-1 agreement with the LiteRT int8
model, |ECE_sim - ECE_tflite|, mean |logit difference| in output steps):

    refcnn 100.00% 0.0000 0.00 | resnet8 100.00% 0.0000 0.01 | mobilenetv2 99.97% 0.0006 0.05
    shufflenetv2 100.00% 0.0000 0.03 | ghostnet 99.58% 0.0012 0.57 | mobileone 100.00% 0.0001 0.01

On all six, every activation grid (scale and zero point of each op output and of the input) and every int8
weight equals the ``.tflite``'s, and every int32 bias too except for +-1 in 1 layer of resnet8, mobilenetv2 and
shufflenetv2 and 4 of ghostnet's 56 (float rounding in the converter's folding). ``exact=True`` (float64):
refcnn 99.99% 0.0000, resnet8 100.00% 0.0000, mobilenetv2 99.99% 0.0002, shufflenetv2 99.99% 0.0002, ghostnet
99.57% 0.0006, mobileone 100.00% 0.0000 (ECE moves by up to 0.0006 with float32 vs float64 alone: about the
noise of a 10,000-image ECE under one-step logit changes). Without the in-place ADD quirk: resnet8 99.77%
(0.53 steps), mobilenetv2 99.57% (0.79), ghostnet 99.00% (1.14 steps: below the bar); taking the union of a cat
group's ranges instead of the last cat's: shufflenetv2 99.70% (0.78 steps; measured in float64). What remains on ghostnet (98 int8 ops, 9
residual ADDs, 3 squeeze-excite MULs) is kernel arithmetic: LiteRT's own XNNPACK and reference kernels give
logits about 1 step apart on average there (on 1,000 images; sim vs reference kernels 1.0, sim vs XNNPACK 0.57).

Limits: a model ``torch.export`` cannot capture (data-dependent control flow, TorchScript, ONNX files) or that
uses an op outside the tables below raises :class:`SimulationError` (one line). A model whose graph fixes the
batch size runs in chunks of that size. Ops TFLite would lower to several quantized ops (a standalone
BatchNorm, GELU, ...) are simulated as one quantized op. Requantization rounds the float result, where TFLite
kernels use fixed-point or float32 multipliers (a difference of a step at rare near-ties).
"""
from __future__ import annotations

import argparse
import math
import operator
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError, UsageError

MIN_BITS, MAX_BITS = 2, 8
# The acceptance bar for the simulator at W8A8 against the real TFLite int8 model.
MIN_AGREEMENT = 0.995
MAX_ECE_DIFF = 0.002
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


class SimulationError(PipelineError):
    """A model the fake-quantization simulator cannot capture or does not know how to quantize."""


# --------------------------------------------------------------------------- settings and quantizers


@dataclass(frozen=True)
class QuantSetting:
    """One precision of the simulated model: weight and activation bits, activation symmetry, weight granularity."""

    weight_bits: int = 8
    activation_bits: int = 8
    symmetric_activations: bool = False
    per_channel_weights: bool = True

    def __post_init__(self):
        for what, bits in (("weight", self.weight_bits), ("activation", self.activation_bits)):
            if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise UsageError(f"{what} bits {bits!r} are out of range; pass an integer from {MIN_BITS} to {MAX_BITS}")

    @property
    def name(self) -> str:
        """``W8A8``, ``W4A8-sym``, ``W8A8-per-tensor``: parsed back by :meth:`parse`."""
        return (f"W{self.weight_bits}A{self.activation_bits}" + ("-sym" if self.symmetric_activations else "")
                + ("" if self.per_channel_weights else "-per-tensor"))

    @classmethod
    def parse(cls, text: str) -> "QuantSetting":
        import re
        m = re.fullmatch(r"[wW](\d+)[aA](\d+)((?:-sym|-per-tensor)*)", text.strip())
        if not m:
            raise UsageError(f"setting {text!r} is not WnAm[-sym][-per-tensor]; e.g. W8A8, W4A8-sym, W8A8-per-tensor")
        return cls(int(m[1]), int(m[2]), "-sym" in m[3], "-per-tensor" not in m[3])

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


W8A8 = QuantSetting()


@dataclass(frozen=True)
class QParams:
    """One per-tensor integer grid: value = (q - zero_point) * scale, q in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def to_dict(self) -> dict:
        return asdict(self)


def _f32(v: float) -> float:
    return float(np.float32(v))


def round_half_away(x):
    """Round half away from zero (C's ``std::round``), for torch tensors."""
    import torch
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def activation_qparams(lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> QParams:
    """The grid of a tensor observed in [lo, hi] (see the module docstring for the formulas)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        m = max(-lo, hi)
        return QParams(_f32(m / qmax) if m > 0 else 1.0, 0, -qmax, qmax)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if hi - lo <= 0:  # a tensor that is always 0
        return QParams(1.0, qmin, qmin, qmax)
    scale = (hi - lo) / (qmax - qmin)
    zp_from_min = qmin - lo / scale
    zp = qmin if zp_from_min < qmin else qmax if zp_from_min > qmax else int(math.floor(zp_from_min + 0.5))
    return QParams(_f32(scale), zp, qmin, qmax)


def fake_quantize(x, qp: QParams):
    """``(clamp(round_even(x / s) + zp, qmin, qmax) - zp) * s``, in ``x``'s dtype."""
    import torch
    q = torch.round(x / qp.scale).add_(qp.zero_point).clamp_(qp.qmin, qp.qmax)
    return q.sub_(qp.zero_point).mul_(qp.scale)


def weight_scales(w, bits: int = 8, per_channel: bool = True):
    """Symmetric weight scales: one per output channel (dim 0) or one for the tensor, float32-rounded."""
    import torch
    qmax = 2 ** (bits - 1) - 1
    w = w.to(torch.float64)
    amax = w.abs().reshape(w.shape[0], -1).amax(1) if per_channel else w.abs().amax().reshape(1)
    scale = (amax / qmax).to(torch.float32).to(torch.float64)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_weight(w, bits: int = 8, per_channel: bool = True):
    """``(w_q * s, s)``: the dequantized weights on the symmetric grid [-(2^(b-1) - 1), 2^(b-1) - 1] and the scales
    (shape [C_out] per channel, [1] per tensor)."""
    import torch
    qmax = 2 ** (bits - 1) - 1
    w = w.to(torch.float64)
    s = weight_scales(w, bits, per_channel)
    shaped = s.reshape((-1,) + (1,) * (w.dim() - 1))
    return torch.clamp(round_half_away(w / shaped), -qmax, qmax) * shaped, s


def quantize_bias(b, input_scale: float, w_scales):
    """The bias as int32 at the accumulator scale ``input_scale * w_scales`` (dequantized)."""
    import torch
    s = (float(input_scale) * w_scales.to(torch.float64)).to(torch.float32).to(torch.float64)
    return torch.clamp(round_half_away(b.to(torch.float64) / s), INT32_MIN, INT32_MAX) * s


# --------------------------------------------------------------------------- op tables (ATen, as torch.export gives them)

WEIGHTED = {"conv2d", "linear"}
BATCH_NORM = {"batch_norm"}
ELEMENTWISE = {"add", "sub", "mul"}  # binary ops with their own output grid and a fusable activation
# Activations TFLite fuses into the op before them (RELU, RELU6, RELU_N1_TO_1), recognised by their bounds.
ACTIVATIONS = {"relu", "relu6", "hardtanh", "clamp"}
FIXED_RANGE = {"hardsigmoid": (0.0, 1.0), "sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}
OWN_GRID = {"mean", "adaptive_avg_pool2d", "hardswish", "leaky_relu", "silu", "gelu", "elu", "prelu", "div"}
SAME_GRID_REQUANT = {"avg_pool2d"}  # rounds onto its input's grid (AVERAGE_POOL_2D shares its input's scale)
CONCAT = {"cat", "concat"}
KEEP_GRID = {"max_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d", "flatten", "view", "reshape",
             "_unsafe_view", "slice", "select", "permute", "transpose", "t", "squeeze", "unsqueeze", "dropout",
             "clone", "contiguous", "alias", "detach", "expand", "pad", "constant_pad_nd", "channel_shuffle",
             "split", "chunk", "split_with_sizes", "unbind", "narrow", "identity"}
SHAPE = {"sym_size", "size", "sym_numel", "sym_stride"}


def _packet(node) -> str:
    """The ATen op name of a call_function node (``relu_`` -> ``relu``), or ``getitem``."""
    if node.target is operator.getitem:
        return "getitem"
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", None) or getattr(node.target, "__name__", "")
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _functional(target):
    """The out-of-place overload of an in-place ATen op (``aten.relu_.default`` -> ``aten.relu.default``)."""
    import torch
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return target
    return getattr(getattr(torch.ops.aten, name[:-1]), target._overloadname)


def _activation_bounds(node) -> tuple[float, float | None] | None:
    """(lo, hi) of a fusable activation node, None if it is not one TFLite fuses."""
    kind = _packet(node)
    if kind == "relu":
        return 0.0, None
    if kind == "relu6":
        return 0.0, 6.0
    if kind == "hardtanh":
        lo = float(node.args[1]) if len(node.args) > 1 else float(node.kwargs.get("min_val", -1.0))
        hi = float(node.args[2]) if len(node.args) > 2 else float(node.kwargs.get("max_val", 1.0))
        return (lo, hi) if (lo, hi) in ((0.0, 6.0), (-1.0, 1.0)) else None
    if kind == "clamp":
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float, type(None))):
            return None
        return (0.0, None if hi is None else float(hi)) if float(lo) == 0.0 and hi in (None, 6, 6.0) else None
    return None


# --------------------------------------------------------------------------- the plan: what is quantized where


@dataclass
class _Weighted:
    weight: Any  # float64 tensor after BN folding (and hardsigmoid folding)
    bias: Any  # float64 tensor (zeros when the layer had none)
    kind: str  # conv2d or linear
    folded_bn: str | None = None
    folded_hardsigmoid: bool = False


@dataclass
class Plan:
    """How the captured graph is quantized: quantization points, their groups, folds and fusions."""

    qpoints: list[str] = field(default_factory=list)  # node names whose output is quantized (graph order)
    group: dict[str, str] = field(default_factory=dict)  # tensor node -> group id (the root's node name)
    fixed: dict[str, tuple[float, float]] = field(default_factory=dict)  # qpoint -> fixed range
    weighted: dict[str, _Weighted] = field(default_factory=dict)  # conv/linear node -> folded params
    aliases: dict[str, str] = field(default_factory=dict)  # folded BatchNorm node -> its conv/linear node
    fused: dict[str, str] = field(default_factory=dict)  # activation node -> the op it is fused into
    relu_0_to_1: set[str] = field(default_factory=set)  # hardsigmoid nodes folded into their conv: clamp(0, 1)
    concats: list[str] = field(default_factory=list)  # cat nodes (graph order): observed, never rounded
    anchor: dict[str, str] = field(default_factory=dict)  # group -> the node whose calibrated range it takes
    inplace: list[tuple[str, str]] = field(default_factory=list)  # (operand, add qpoint): the calibrator's quirk
    ops: dict[str, int] = field(default_factory=dict)  # ATen op counts

    def describe(self) -> dict:
        return {"quantization_points": len(self.qpoints), "groups": len(self.anchor), "concatenations": len(self.concats),
                "weighted_layers": len(self.weighted), "folded_batch_norms": len(self.aliases),
                "fused_activations": len(self.fused), "folded_hardsigmoids": len(self.relu_0_to_1),
                "inplace_add_unions": len(self.inplace), "ops": dict(sorted(self.ops.items()))}


class _Groups:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def add(self, a: str) -> None:
        self.parent.setdefault(a, a)

    def find(self, a: str) -> str:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


# --------------------------------------------------------------------------- the simulator


def torch_module(model, name: str):
    """The ``nn.Module`` of ``model`` (a module or a ``LoadedModel``); SimulationError for what torch.export cannot
    capture (an ONNX file, TorchScript)."""
    import torch
    module = getattr(model, "module", model)
    if module is None or not isinstance(module, torch.nn.Module):
        raise SimulationError(f"{name} is not a PyTorch model (an ONNX file?); the simulator takes the PyTorch "
                              "model: zoo:NAME or package.module:factory --weights FILE")
    if isinstance(module, torch.jit.ScriptModule):
        raise SimulationError(f"{name} is TorchScript, which torch.export cannot capture; pass the Python model "
                              "instead (package.module:factory --weights FILE)")
    return module



class Simulator:
    """A PyTorch model captured once, calibrated once on the representative dataset, simulated at any setting.

    ``model``: an ``nn.Module`` (eval mode is set on a copy) or the pipeline's ``LoadedModel``.
    ``representative_dataset``: float32 N x C x H x W samples, preprocessed as the model takes them (the export's
    calibration set: ``prepare(cfg).calib.array()``).
    """

    def __init__(self, model, representative_dataset, *, batch_size: int = 256, tflite_calibration: bool = True,
                 exact: bool = False, name: str | None = None):
        import torch
        self.name = name or getattr(model, "spec", None) or type(getattr(model, "module", model)).__name__
        module = torch_module(model, self.name)
        calib = np.asarray(representative_dataset, dtype=np.float32)
        if calib.ndim < 2 or len(calib) == 0:
            raise SimulationError(f"the representative dataset has shape {calib.shape}; pass at least one sample "
                                  "in the model's input layout (N x C x H x W)")
        self.batch_size = int(batch_size)
        self.tflite_calibration = tflite_calibration
        # float32 by default (2-5x faster on the zoo); exact=True interprets in float64, where every integer
        # accumulation of the quantized model is exact. float32 moves values near a rounding tie (~1e-7 relative):
        # measured on the zoo, top-1 agreement with TFLite within 0.02 points of float64's, ECE within 0.0006.
        self.dtype = torch.float64 if exact else torch.float32
        self._weights_cache: dict = {}
        self._capture(module, calib)
        self.plan = self._make_plan()
        self.ranges = self._calibrate(calib)
        self.group_ranges = self._group_ranges()
        self.calibration_samples = len(calib)

    # ----------------------------------------------------------------- capture

    def _capture(self, module, calib: np.ndarray) -> None:
        import copy
        import warnings

        import torch
        module = copy.deepcopy(module).eval()
        sample = torch.from_numpy(np.concatenate([calib[:2]] * 2)[:2])
        self.fixed_batch = None
        first_error = None
        for dynamic in (True, False):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    shapes = ({0: torch.export.Dim.AUTO},) if dynamic else None
                    ex = sample if dynamic else sample[:1]
                    ep = torch.export.export(module, (ex,), dynamic_shapes=shapes, strict=False)
                break
            except Exception as e:  # noqa: BLE001 - any capture failure is this one error
                first_error = first_error or e
        else:
            text = (str(first_error).strip().splitlines() or [type(first_error).__name__])[0][:200]
            raise SimulationError(f"torch.export cannot capture {self.name} ({type(first_error).__name__}: {text}); "
                                  "the simulator needs a model whose graph does not depend on the input values "
                                  "(no data-dependent Python control flow)")
        sig = ep.graph_signature
        if len(sig.user_inputs) != 1:
            raise SimulationError(f"{self.name} takes {len(sig.user_inputs)} inputs; the simulator handles image "
                                  "classifiers with one input")
        self.graph = ep.graph
        self.input_name = sig.user_inputs[0]
        consts = {}
        for ph, target in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
            consts[ph] = ep.state_dict[target] if target in ep.state_dict else ep.constants[target]
        for ph, target in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
            consts[ph] = ep.constants[target]
        self.consts = {k: (v.detach().to(torch.float64) if v.is_floating_point() else v.detach())
                       for k, v in consts.items()}  # float64 for folding and weight quantization
        self._run_consts = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in self.consts.items()}
        node = next(n for n in self.graph.nodes if n.name == self.input_name)
        val = node.meta.get("val")
        if val is not None and isinstance(val.shape[0], int):
            self.fixed_batch = int(val.shape[0])
        out = next(n for n in self.graph.nodes if n.op == "output").args[0]
        out = out[0] if isinstance(out, (tuple, list)) else out
        self.output_name = out.name

    # ----------------------------------------------------------------- plan

    def _make_plan(self) -> Plan:
        import torch
        plan = Plan()
        groups = _Groups()
        self._input_of: dict[str, str] = {}
        nodes = {n.name: n for n in self.graph.nodes}
        unknown = []
        for n in self.graph.nodes:
            if n.op == "call_function":
                plan.ops[_packet(n)] = plan.ops.get(_packet(n), 0) + 1

        def tensor_args(n):
            return [a for a in n.all_input_nodes if a.name not in self.consts]

        # 1. BatchNorm folding and hardsigmoid folding into conv/linear
        for n in self.graph.nodes:
            if n.op != "call_function" or _packet(n) not in WEIGHTED:
                continue
            w_node = n.args[1]
            b_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            if not isinstance(w_node, torch.fx.Node) or w_node.name not in self.consts:
                raise SimulationError(f"{self.name}: the weights of {n.name} are computed at run time; the simulator "
                                      "needs constant weights (parameters)")
            w = self.consts[w_node.name]
            b = self.consts[b_node.name] if isinstance(b_node, torch.fx.Node) else torch.zeros(w.shape[0], dtype=w.dtype)
            entry = _Weighted(weight=w, bias=b, kind=_packet(n))
            users = list(n.users)
            if len(users) == 1 and _packet(users[0]) in BATCH_NORM and users[0].args[0] is n:
                bn = users[0]
                training = bn.args[5] if len(bn.args) > 5 else False
                if not training:
                    gamma, beta, mean, var = (self.consts[a.name] if isinstance(a, torch.fx.Node) else None
                                              for a in bn.args[1:5])
                    eps = float(bn.args[7]) if len(bn.args) > 7 else 1e-5
                    g = (gamma if gamma is not None else torch.ones_like(mean)) / torch.sqrt(var + eps)
                    entry.weight = w * g.reshape((-1,) + (1,) * (w.dim() - 1))
                    entry.bias = (b - mean) * g + (beta if beta is not None else 0.0)
                    entry.folded_bn = bn.name
                    plan.aliases[bn.name] = n.name
            result = nodes[entry.folded_bn] if entry.folded_bn else n
            users = list(result.users)
            if len(users) == 1 and _packet(users[0]) == "hardsigmoid":
                entry.weight, entry.bias = entry.weight / 6.0, entry.bias / 6.0 + 0.5
                entry.folded_hardsigmoid = True
                plan.relu_0_to_1.add(users[0].name)
            plan.weighted[n.name] = entry
            self._input_of[n.name] = n.args[0].name

        # 2. quantization points, fusion and groups
        for n in self.graph.nodes:
            name = n.name
            if n.op == "placeholder":
                if name == self.input_name:
                    self._qpoint(plan, groups, name)
                continue
            if n.op != "call_function":
                continue
            kind = _packet(n)
            if name in plan.weighted and plan.weighted[name].folded_bn:
                continue  # its folded BatchNorm is the layer's result
            ins = tensor_args(n)
            if kind in WEIGHTED or kind in ELEMENTWISE or name in plan.aliases:
                users = list(n.users)
                if len(users) == 1 and _activation_bounds(users[0]) is not None and users[0].args[0] is n:
                    plan.fused[users[0].name] = name  # quantized after the activation
                else:
                    self._qpoint(plan, groups, name)
            elif kind in FIXED_RANGE:
                self._qpoint(plan, groups, name)
                plan.fixed[name] = FIXED_RANGE[kind]
            elif kind in ACTIVATIONS or kind in BATCH_NORM or kind in OWN_GRID:
                self._qpoint(plan, groups, name)
            elif kind in SAME_GRID_REQUANT:
                self._qpoint(plan, groups, name)
                if ins and ins[0].name in plan.group:
                    groups.union(plan.group[ins[0].name], name)
            elif kind in CONCAT:
                parts = [a.name for a in ins if a.name in plan.group]
                if parts:
                    plan.concats.append(name)
                    plan.group[name] = plan.group[parts[0]]
                    for other in parts[1:]:
                        groups.union(plan.group[parts[0]], plan.group[other])
            elif kind in KEEP_GRID or kind == "getitem":
                src = next((a.name for a in ins if a.name in plan.group), None)
                if src is not None:
                    plan.group[name] = plan.group[src]
            elif not (kind in SHAPE or kind.startswith("_assert") or kind == "_check"):
                unknown.append(kind)
        if unknown:
            raise SimulationError(f"{self.name} uses ATen ops the simulator does not quantize: "
                                  f"{', '.join(sorted(set(unknown)))}; add them to the op tables of pipeline/simulate.py")

        # 3. the calibrator's in-place ADD: its first operand with no other consumer takes the ADD's output range
        for n in self.graph.nodes:
            if n.op != "call_function" or _packet(n) != "add":
                continue
            ops = [a for a in n.args[:2] if isinstance(a, torch.fx.Node)]
            if len(ops) != 2 or any(a.name in self.consts for a in ops):
                continue
            shapes = [tuple(str(d) for d in a.meta["val"].shape) if "val" in a.meta else None for a in ops]
            if shapes[0] is None or shapes[0] != shapes[1]:
                continue  # a broadcast ADD does not run in place
            out_q = next((u.name for u in n.users if plan.fused.get(u.name) == n.name), n.name)
            observed = set(plan.qpoints) | set(plan.concats)
            for a in ops:
                if a.name != self.input_name and len(a.users) == 1 and a.name in observed:
                    plan.inplace.append((a.name, out_q))
                    break

        # 4. groups resolved to their roots; each takes the range of its last cat, else of its first quantization
        # point (a grid-keeping op takes its input's grid; a cat imposes its own on its inputs, and along a chain of
        # cats the last one wins: measured on zoo:shufflenetv2, whose stages are such chains)
        plan.group = {k: groups.find(v) for k, v in plan.group.items()}
        order = {n.name: i for i, n in enumerate(self.graph.nodes)}
        concats = set(plan.concats)
        for name in sorted(set(plan.qpoints) | concats, key=order.__getitem__):
            g = plan.group[name]
            if name in concats or g not in plan.anchor:
                plan.anchor[g] = name
        return plan

    @staticmethod
    def _qpoint(plan: Plan, groups: _Groups, name: str) -> None:
        plan.qpoints.append(name)
        groups.add(name)
        plan.group[name] = name

    # ----------------------------------------------------------------- interpretation

    def _run(self, x, params: dict[str, QParams] | None, setting: QuantSetting | None, observe=None, keep=None):
        """Interpret the graph on the batch ``x`` (float32 tensor). ``params``: group -> grid (None: float run).
        ``observe(name, tensor)``: called on every observed node's float value (before quantization); ``keep``: a
        dict that receives every node's value (after quantization)."""
        import torch
        plan = self.plan
        env: dict[str, Any] = {}
        qpoints, concats = set(plan.qpoints), set(plan.concats)
        weights = self._weights_cache[setting]

        def arg(a):
            if isinstance(a, torch.fx.Node):
                return env[a.name] if a.name in env else self._run_consts[a.name]
            if isinstance(a, (list, tuple)):
                return type(a)(arg(v) for v in a)
            if isinstance(a, dict):
                return {k: arg(v) for k, v in a.items()}
            return a

        last = None if keep is not None else self._last_uses()
        for i, n in enumerate(self.graph.nodes):
            if last is not None:  # free what no later node reads: the live set, not every activation of the batch
                for dead in last.get(i - 1, ()):
                    env.pop(dead, None)
            if n.op == "placeholder":
                if n.name == self.input_name:
                    if params is not None:  # the model input: in float32 numpy, as the pipeline quantizes it
                        qp = params[plan.group[n.name]]
                        q = np.clip(np.round(x.numpy() / np.float32(qp.scale)) + qp.zero_point, qp.qmin, qp.qmax)
                        env[n.name] = (torch.from_numpy(q).to(self.dtype) - qp.zero_point) * qp.scale
                    else:
                        env[n.name] = x.to(self.dtype)
                        if observe:
                            observe(n.name, env[n.name])
                continue
            if n.op == "output":
                break
            if n.op != "call_function":
                continue
            name = n.name
            if name in plan.aliases:  # a folded BatchNorm: the conv already computed it
                v = env[plan.aliases[name]]
            elif name in plan.weighted:
                args = list(arg(n.args))
                args[1], b = weights[name]
                args = args + [None] * (3 - len(args)) if len(args) < 3 else args
                args[2] = b
                v = _functional(n.target)(*args, **arg(dict(n.kwargs)))
            elif name in plan.relu_0_to_1:
                v = torch.clamp(arg(n.args[0]), 0.0, 1.0)
            else:
                v = _functional(n.target)(*arg(n.args), **arg(dict(n.kwargs)))
            if observe and (name in qpoints or name in concats):
                observe(name, v)
            if name in qpoints:
                if params is not None:
                    v = fake_quantize(v, params[plan.group[name]])
            env[name] = v
        if keep is not None:
            keep.update(env)
        return env[self.output_name]

    def _last_uses(self) -> dict[int, list[str]]:
        """Node index -> the values whose last reader is that node (the graph output is never freed)."""
        cached = getattr(self, "_last_use_cache", None)
        if cached is None or cached[0] is not self.graph:
            nodes = list(self.graph.nodes)
            pos = {n.name: i for i, n in enumerate(nodes)}
            last: dict[str, int] = {}
            for i, n in enumerate(nodes):
                for a in n.all_input_nodes:
                    last[a.name] = i
                if n.name in self.plan.aliases:  # a folded BatchNorm reads its conv's value by name
                    last[self.plan.aliases[n.name]] = max(last.get(self.plan.aliases[n.name], 0), i)
            by_node: dict[int, list[str]] = {}
            for name, i in last.items():
                if name != self.output_name and name in pos and nodes[i].op != "output":
                    by_node.setdefault(i, []).append(name)
            self._last_use_cache = (self.graph, by_node)
        return self._last_use_cache[1]

    # ----------------------------------------------------------------- calibration

    def _calibrate(self, calib: np.ndarray) -> dict[str, tuple[float, float]]:
        import torch
        ranges: dict[str, list[float]] = {}

        def observe(name, v):
            lo, hi = float(v.min()), float(v.max())
            r = ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)

        self._prepare(None)
        with torch.no_grad():
            for chunk in self._batches(calib):
                self._run(chunk, None, None, observe)
        return {k: (v[0], v[1]) for k, v in ranges.items()}

    def _group_ranges(self) -> dict[str, tuple[float, float]]:
        plan = self.plan
        ranges = {**self.ranges, **plan.fixed}
        if self.tflite_calibration:  # the in-place ADD wrote its output into this operand's buffer
            for operand, add_q in plan.inplace:
                (a, b), (lo, hi) = ranges[operand], plan.fixed.get(add_q, self.ranges[add_q])
                ranges[operand] = (min(a, lo), max(b, hi))
        return {g: ranges[anchor] for g, anchor in plan.anchor.items()}

    def _batches(self, x: np.ndarray):
        import torch
        bs = self.fixed_batch or self.batch_size
        for i in range(0, len(x), bs):
            chunk = torch.from_numpy(np.ascontiguousarray(x[i:i + bs], dtype=np.float32))
            if self.fixed_batch and len(chunk) < bs:  # padded with its last sample: ranges stay the same
                yield torch.cat([chunk, chunk[-1:].expand(bs - len(chunk), *chunk.shape[1:])])
            else:
                yield chunk

    # ----------------------------------------------------------------- public

    def qparams(self, setting: QuantSetting = W8A8) -> dict[str, QParams]:
        """The activation grid of every group (by group root) at ``setting``."""
        return {g: activation_qparams(lo, hi, setting.activation_bits, setting.symmetric_activations)
                for g, (lo, hi) in self.group_ranges.items()}

    def input_qparams(self, setting: QuantSetting = W8A8) -> QParams:
        return self.qparams(setting)[self.plan.group[self.input_name]]

    def output_qparams(self, setting: QuantSetting = W8A8) -> QParams | None:
        g = self.plan.group.get(self.output_name)
        return self.qparams(setting)[g] if g is not None else None

    def _prepare(self, setting: QuantSetting | None) -> None:
        """The weights and biases of every conv/linear at ``setting`` (None: float), in the run's dtype."""
        if setting in self._weights_cache:
            return
        plan, cache = self.plan, {}
        params = self.qparams(setting) if setting is not None else None
        for name, e in plan.weighted.items():
            if setting is None:
                w, b = e.weight, e.bias
            else:
                w, w_s = quantize_weight(e.weight, setting.weight_bits, setting.per_channel_weights)
                src = self._input_of[name]
                b = quantize_bias(e.bias, params[plan.group[src]].scale, w_s) if src in plan.group else e.bias
            cache[name] = (w.to(self.dtype), b.to(self.dtype))
        self._weights_cache[setting] = cache

    def logits(self, x: np.ndarray, setting: QuantSetting | None = W8A8, progress=None) -> np.ndarray:
        """Logits [N, K] of the simulated quantized model (float32; on the output grid). ``setting=None``: the
        float model after folding (the FP32 reference, up to float rounding)."""
        import torch
        x = np.asarray(x, dtype=np.float32)
        self._prepare(setting)
        params = self.qparams(setting) if setting is not None else None
        out = []
        with torch.no_grad():
            for chunk in self._batches(x):
                y = self._run(chunk, params, setting)
                out.append(y.reshape(len(y), -1).to(torch.float32).numpy())
                if progress:
                    progress(len(chunk))
        return np.concatenate(out)[: len(x)] if out else np.zeros((0, 0), np.float32)

    def describe(self) -> dict:
        d = {"model": self.name, "calibration_samples": self.calibration_samples,
             "tflite_calibration": self.tflite_calibration, "dtype": str(self.dtype).replace("torch.", ""),
             "fixed_batch": self.fixed_batch}
        d.update(self.plan.describe())
        return d


def simulate(model, representative_dataset, x, setting: QuantSetting = W8A8) -> np.ndarray:
    """One call: capture and calibrate ``model`` on ``representative_dataset``, return the logits on ``x``."""
    return Simulator(model, representative_dataset).logits(x, setting)


# --------------------------------------------------------------------------- acceptance against TFLite


@dataclass(frozen=True)
class Acceptance:
    """The simulator at W8A8 against the real TFLite int8 model of the same export, on the same test images."""

    model: str
    setting: str
    images: int
    agreement: float  # share of images where sim and TFLite int8 have the same top-1
    ece_sim: float
    ece_tflite: float
    accuracy_sim: float
    accuracy_tflite: float
    accuracy_fp32: float
    agreement_sim_fp32: float
    agreement_tflite_fp32: float
    ece_fp32: float
    output_steps_mean: float  # mean |sim - TFLite| of the logits, in TFLite output quantization steps
    output_steps_max: float
    input_params_match: bool  # the simulator's input scale/zero point equal the .tflite's
    output_params_match: bool
    export_dir: str
    min_agreement: float = MIN_AGREEMENT
    max_ece_diff: float = MAX_ECE_DIFF
    simulator: dict = field(default_factory=dict)

    @property
    def ece_diff(self) -> float:
        return abs(self.ece_sim - self.ece_tflite)

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and self.ece_diff <= self.max_ece_diff

    def to_dict(self) -> dict:
        return {**asdict(self), "ece_diff": self.ece_diff, "passed": self.passed}

    def line(self) -> str:
        verdict = "accepted" if self.passed else "NOT accepted"
        return (f"{self.model} {self.setting} on {self.images} images: top-1 agreement with TFLite int8 "
                f"{100 * self.agreement:.2f}% (bar {100 * self.min_agreement:.1f}%), |ECE_sim - ECE_tflite| = "
                f"{self.ece_diff:.4f} ({self.ece_sim:.4f} vs {self.ece_tflite:.4f}; bar {self.max_ece_diff}), "
                f"logits {self.output_steps_mean:.2f} steps apart on average (max {self.output_steps_max:.0f}): "
                f"{verdict}")


# The export options a reused export folder must share with the simulation (report.json "config").
SAME_EXPORT_FIELDS = ("model", "weights", "data", "input_shape", "mean", "std", "calib", "calib_size", "seed",
                      "target", "per_tensor", "eval_limit", "recover")


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _ece(logits: np.ndarray, labels: np.ndarray) -> float:
    from pipeline.reliability.confidence import ece, softmax
    return float(ece(softmax(logits), labels))


def _same(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean()) if len(a) else float("nan")


def accept_against_tflite(cfg, export_dir: str | Path | None = None, *, log=print,
                          tflite_calibration: bool = True, exact: bool = False) -> Acceptance:
    """Run the pipeline's export of ``cfg`` (an ``ExportConfig``) in process, unless ``export_dir`` already holds
    it, then simulate the same model at W8A8 with the same representative dataset on the same test images and
    compare with the export's ``predictions.npz`` (``int8_logits``: the LiteRT int8 model's dequantized outputs).

    ``export_dir`` given and holding ``predictions.npz`` and ``report.json``: reused; it must come from an export
    with the same options (``SAME_EXPORT_FIELDS`` of its report's config, then the labels are checked).
    Otherwise the export writes to ``export_dir`` or ``cfg.out``."""
    import json

    from pipeline.export import export, export_target
    from pipeline.inputs import models
    from pipeline.stages.prepare import prepare
    quiet = (lambda *a, **k: None)
    if export_target(cfg).precision != "int8":
        raise UsageError(f"target {cfg.target} is not fully int8; the simulator is checked against an int8 target "
                         "(tflite-int8, tflite-int8-per-tensor or a device profile)")
    torch_module(models.load(cfg.model, cfg.weights), cfg.model)  # before a whole export, not after it
    folder = Path(export_dir) if export_dir is not None else None
    if folder is None or not (folder / "predictions.npz").is_file():
        if folder is not None:
            cfg = replace(cfg, out=str(folder))
        if cfg.out is None:
            raise UsageError("accept_against_tflite needs an output folder for the export; pass export_dir or "
                             "ExportConfig(out=...)")
        log(f"exporting {cfg.model} into {cfg.out} ...", file=sys.stderr)
        _, folder, _ = export(cfg, log=quiet)
    folder = Path(folder)
    with np.load(folder / "predictions.npz") as z:
        labels, fp32, tfl = z["labels"], z["fp32_logits"], z["int8_logits"]
    report = json.loads((folder / "report.json").read_text())
    had = report.get("config", {})
    differ = [k for k in SAME_EXPORT_FIELDS if k in had and _plain(had[k]) != _plain(getattr(cfg, k))]
    if differ:
        what = ", ".join(f"{k} {had[k]!r}, not {_plain(getattr(cfg, k))!r}" for k in differ)
        raise UsageError(f"{folder} holds another export ({what}); pass an empty --out, or the same options")
    inp = prepare(cfg, log=quiet)
    if len(inp.x_test) != len(labels) or not np.array_equal(inp.labels, labels):
        raise UsageError(f"{folder} holds another export ({len(labels)} test images, not these {len(inp.x_test)}); "
                         "pass an empty --out, or the same options")
    setting = QuantSetting(per_channel_weights=inp.target.per_channel_weights)  # W8A8 (-per-tensor: as exported)
    sim = Simulator(inp.model, inp.calib.array(), batch_size=cfg.batch_size, tflite_calibration=tflite_calibration,
                    exact=exact)
    logits = sim.logits(inp.x_test, setting)
    q = report.get("quantization", {})
    t_in = q.get("inputs", [{}])[0].get("quantization", {})
    t_out = q.get("outputs", [{}])[0].get("quantization", {})
    s_in, s_out = sim.input_qparams(setting), sim.output_qparams(setting)

    def match(qp: QParams | None, t: dict) -> bool:
        return (qp is not None and bool(t.get("scale")) and abs(qp.scale - t["scale"][0]) <= 1e-6 * t["scale"][0]
                and qp.zero_point == t["zero_point"][0])

    out_scale = float(t_out["scale"][0]) if t_out.get("scale") else (s_out.scale if s_out else 1.0)
    steps = np.abs(logits.astype(np.float64) - tfl.astype(np.float64)) / out_scale
    return Acceptance(
        model=cfg.model, setting=setting.name, images=int(len(labels)), agreement=_same(logits, tfl),
        ece_sim=_ece(logits, labels), ece_tflite=_ece(tfl, labels), ece_fp32=_ece(fp32, labels),
        accuracy_sim=float((logits.argmax(1) == labels).mean()), accuracy_tflite=float((tfl.argmax(1) == labels).mean()),
        accuracy_fp32=float((fp32.argmax(1) == labels).mean()), agreement_sim_fp32=_same(logits, fp32),
        agreement_tflite_fp32=_same(tfl, fp32), output_steps_mean=float(steps.mean()),
        output_steps_max=float(steps.max()), input_params_match=match(s_in, t_in),
        output_params_match=match(s_out, t_out), export_dir=str(folder), simulator=sim.describe())


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import Parser, seed_int
    from pipeline.export import DEFAULT_MODEL
    p = Parser(prog="python -m pipeline.simulate",
               description="Check the fake-quantization simulator at W8A8 against the real TFLite int8 model: "
                           "export the model with the pipeline, simulate it with the same representative dataset, "
                           f"and compare top-1 (bar {100 * MIN_AGREEMENT:.1f}%) and ECE (bar {MAX_ECE_DIFF}).")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"as for pipeline.export (default {DEFAULT_MODEL})")
    p.add_argument("--weights", help="state_dict file for a factory model")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist or path/to/data.npz")
    p.add_argument("--calib", default="balanced", help="representative dataset source (default balanced)")
    p.add_argument("--calib-size", type=int, default=None, help="calibration samples (default: the export's, 500)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--eval-limit", type=int, help="compare on the first N test images only (default: all)")
    p.add_argument("--per-tensor", action="store_true",
                   help="export and simulate with one weight scale per tensor (W8A8-per-tensor)")
    p.add_argument("--out", required=True, help="the export's folder: reused when it holds an export of these "
                                                "options, else created (as pipeline.export --out)")
    p.add_argument("--no-tflite-calibration", action="store_true",
                   help="calibrate every tensor on its own range (without the TFLite calibrator's in-place ADD)")
    p.add_argument("--exact", action="store_true", help="simulate in float64 (exact integer accumulations; slower)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import run_main

    def work():
        import json

        from pipeline.export import ExportConfig
        a = build_parser().parse_args(argv)
        cfg = ExportConfig(model=a.model, weights=a.weights, data=a.data, calib=a.calib, calib_size=a.calib_size,
                           seed=a.seed, eval_limit=a.eval_limit, per_tensor=a.per_tensor, out=a.out)
        res = accept_against_tflite(cfg, a.out, tflite_calibration=not a.no_tflite_calibration, exact=a.exact)
        print(json.dumps(res.to_dict(), indent=2) if a.json else res.line())
        return 0 if res.passed else 1

    return run_main(work)


if __name__ == "__main__":
    raise SystemExit(main())
