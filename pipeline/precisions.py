"""The precision ladder as a registry: one frozen :class:`Precision` per rung, registered by name.

Each entry holds everything the pipeline knows about one precision: the graph I/O dtypes, how
TFLiteConverter is set up (:class:`ConverterSettings`), whether it needs a representative dataset,
whether the int8 ``fully_int8`` gate applies, and its contract checker (``precision.checker(insp)``
-> :class:`PrecisionCheck`, what ``inspect_tflite.check_precision`` returns). The targets, the
converter, the inspect stage, the report and ``pipeline.evaluate`` all look the entry up here;
none of them branches on a precision's name.

Adding a precision is one registration plus a test. The registration (here, below the ladder)::

    def _uint8io_contract(insp, g):  # one line per offending op/tensor; none: the contract is met
        def tensor(t, ti, op):
            return [f"{t.dtype} tensor {t.name}"] if t.dtype not in ("int8", "uint8", "int32") else []
        return _io(insp, "uint8") + _scan(insp, tensor, forbid_qdq=False, float_graph=False)

    register_precision(Precision(
        name="uint8io", description="int8 inside, uint8 graph input and output",
        input_dtype="uint8", output_dtype="uint8", representative_dataset=True,
        converter=ConverterSettings(summary="Optimize.DEFAULT + representative dataset, uint8 I/O",
                                    optimize=True, ops_set="TFLITE_BUILTINS_INT8", io_dtype="uint8"),
        rule="every tensor int8 (int32 biases), graph input and output uint8; no float, custom or Flex op",
        contract=_uint8io_contract))

The test: ``tests/test_precisions.py`` parametrizes over :data:`PRECISIONS`, so the new entry is
converted (a tiny CNN, in process) and its checker must accept that model and refuse the models
of every other rung, and every other checker must refuse it; add a case there only for what the
shared test cannot see. A target then names it (``Target(precision="uint8io", ...)``); the CLI,
convert, inspect, report and ``pipeline.evaluate`` need no change.
"""
from __future__ import annotations

import difflib
import operator
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping

from pipeline.errors import PipelineError, UsageError

if TYPE_CHECKING:
    from pipeline.tflite.inspect import OpInfo, TensorInfo, TfliteInspection


# --------------------------------------------------------------------------- the entry


@dataclass(frozen=True)
class ConverterSettings:
    """How TFLiteConverter is set up for one precision (applied by ``convert._configure``)."""

    summary: str  # one line, quoted in conversion errors
    optimize: bool = False  # converter.optimizations = [Optimize.DEFAULT]
    supported_types: tuple[str, ...] = ()  # target_spec.supported_types, as tf dtype names ("float16")
    ops_set: str | None = None  # target_spec.supported_ops = [tf.lite.OpsSet.<ops_set>]
    io_dtype: str | None = None  # inference_input_type / inference_output_type (tf dtype name); None: float32


@dataclass(frozen=True)
class PrecisionCheck:
    """Whether a converted model meets one rung of the precision ladder (``precision_ok``)."""

    precision: str
    precision_ok: bool
    rule: str
    offending: tuple[str, ...] = field(default_factory=tuple)
    weights: dict = field(default_factory=dict)  # weight tensors of weighted ops by stored dtype

    @property
    def reason(self) -> str:
        if self.precision_ok:
            return f"meets the {self.precision} contract"
        shown = "; ".join(self.offending[:6]) + (f"; and {len(self.offending) - 6} more" if len(self.offending) > 6 else "")
        return f"not {self.precision}: {shown}"

    def to_dict(self) -> dict:
        return {"precision": self.precision, "precision_ok": self.precision_ok, "rule": self.rule,
                "offending": list(self.offending), "weights": dict(self.weights), "reason": self.reason}


@dataclass(frozen=True)
class WeightMap:
    """The weights of a model's weighted ops, found once and shared by every contract."""

    weight_idx: frozenset  # weight tensor indices, and the stored constant behind a DEQUANTIZE
    bias_idx: frozenset  # bias tensor indices
    weights: dict  # stored weight dtype -> count (sorted by dtype)


@dataclass(frozen=True)
class Precision:
    """One rung of the precision ladder."""

    name: str
    description: str
    input_dtype: str  # graph input dtype of a model that meets the contract
    output_dtype: str
    converter: ConverterSettings
    rule: str  # the contract in words (report.json quantization.precision.rule)
    # (inspection, weights) -> the offending ops/tensors, one line each; none: the contract is met
    contract: Callable[["TfliteInspection", WeightMap], list[str]]
    representative_dataset: bool = False  # calibrated: the converter needs representative samples
    fully_int8_required: bool = False  # the fully_int8 gate applies (and a NotFullyInt8Error stops the export)

    def checker(self, insp: "TfliteInspection") -> PrecisionCheck:
        """Check ``insp`` against this precision's contract."""
        g = weight_map(insp)
        offending = tuple(self.contract(insp, g))
        return PrecisionCheck(self.name, not offending, self.rule, offending, g.weights)

    def contract_text(self, quantization: dict) -> str:
        """The contract verdict of a report's ``quantization`` section, as the summaries show it."""
        if self.fully_int8_required:
            return f"fully_int8={quantization['fully_int8']}"
        return f"precision_ok={quantization['precision']['precision_ok']}"

    @property
    def int8_fields_note(self) -> str:
        """What the report's int8_* fields (named before the ladder existed) hold for this precision."""
        return "" if self.fully_int8_required else f"; the int8_* fields hold the {self.name} model's figures"


_REGISTRY: dict[str, Precision] = {}
# The ladder, widest first (registration order); read-only and live.
PRECISIONS: Mapping[str, Precision] = MappingProxyType(_REGISTRY)


def register_precision(precision: Precision) -> Precision:
    if precision.name in _REGISTRY:
        raise ValueError(f"precision {precision.name!r} is registered twice")
    _REGISTRY[precision.name] = precision
    return precision


def get_precision(name: str, error: type[PipelineError] = UsageError) -> Precision:
    """The registered precision ``name``; an unknown name raises ``error`` with a "did you mean"."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(_REGISTRY)}"
        raise error(f"unknown precision {name!r}; {hint}")
    return _REGISTRY[name]


class RegistryView(Mapping):
    """A live, read-only ``name -> getattr(precision, attr)`` view of the registry."""

    def __init__(self, attr: str):
        self._get = operator.attrgetter(attr)  # "rule", "converter.summary", ...

    def __getitem__(self, name: str):
        return self._get(_REGISTRY[name])

    def __iter__(self):
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)


# --------------------------------------------------------------------------- contract building blocks

# Ops whose input slot 1 holds the weights.
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL")
# Ops whose int32/int64 outputs or inputs are shapes or indices, not integer activations.
_INDEX_OPS = ("SHAPE", "ARG_MAX", "ARG_MIN", "GATHER", "GATHER_ND")


def weight_map(insp: "TfliteInspection") -> WeightMap:
    from pipeline.tflite.inspect import _BIAS_SLOT
    tensors = insp.tensors
    producer = {ti: op for op in insp.op_list for ti in op.outputs}
    weight_dtypes: Counter = Counter()
    weight_src: dict[int, "TensorInfo"] = {}  # weight tensor index -> the stored constant behind it
    for op in insp.op_list:
        if op.name in _WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0:
            w = tensors[op.inputs[1]]
            src = w
            p = producer.get(w.index)
            if p is not None and p.name == "DEQUANTIZE" and p.inputs and tensors[p.inputs[0]].is_constant:
                src = tensors[p.inputs[0]]
            weight_src[w.index] = src
            weight_dtypes[src.dtype] += 1
    bias_idx = {op.inputs[_BIAS_SLOT[op.name]] for op in insp.op_list
                if op.name in _BIAS_SLOT and len(op.inputs) > _BIAS_SLOT[op.name] and op.inputs[_BIAS_SLOT[op.name]] >= 0}
    return WeightMap(weight_idx=frozenset(set(weight_src) | {s.index for s in weight_src.values()}),
                     bias_idx=frozenset(bias_idx), weights=dict(sorted(weight_dtypes.items())))


def _io(insp: "TfliteInspection", io_dtype: str) -> list[str]:
    """Graph inputs and outputs not of ``io_dtype``."""
    return [f"graph {role} {t.name}: {t.dtype}, expected {io_dtype}"
            for role, group in (("input", insp.inputs), ("output", insp.outputs)) for t in group if t.dtype != io_dtype]


TensorRule = Callable[["TensorInfo", int, "OpInfo"], list[str]]
OpRule = Callable[["OpInfo"], list[str]]


def _scan(insp: "TfliteInspection", tensor_rule: TensorRule, *, forbid_qdq: bool, float_graph: bool,
          op_rule: OpRule | None = None) -> list[str]:
    """One line per op that breaks a contract: custom/Flex ops, QUANTIZE/DEQUANTIZE (``forbid_qdq``),
    tensors ``tensor_rule`` refuses, integer activations (``float_graph``) and what ``op_rule`` refuses."""
    bad: list[str] = []
    for op in insp.op_list:
        if op.custom:
            bad.append(f"{op.name}#{op.index}: {'Flex (TensorFlow)' if op.name.startswith('Flex') else 'custom'} op")
            continue
        problems = []
        if forbid_qdq and op.name in ("QUANTIZE", "DEQUANTIZE"):
            problems.append(f"{op.name} op")
        for ti in (*op.inputs, *op.outputs):
            if ti < 0:
                continue
            t = insp.tensors[ti]
            problems += tensor_rule(t, ti, op)
            if float_graph and t.dtype in ("int32", "int64") and not t.is_constant and op.name not in _INDEX_OPS:
                problems.append(f"{t.dtype} activation {t.name}")
        if op_rule is not None:
            problems += op_rule(op)
        if problems:
            bad.append(f"{op.name}#{op.index}: {', '.join(sorted(set(problems)))}")
    return bad


# --------------------------------------------------------------------------- the ladder, widest first


def _fp32_contract(insp: "TfliteInspection", g: WeightMap) -> list[str]:
    def tensor(t, ti, op):
        quantized = bool(t.scale)
        if t.dtype in ("float16", "int8", "int16", "uint8", "bfloat16") or quantized:
            return [f"{t.dtype}{' quantized' if quantized else ''} tensor {t.name}"]
        return []
    return _io(insp, "float32") + _scan(insp, tensor, forbid_qdq=True, float_graph=True)


register_precision(Precision(
    name="fp32", description="float32 weights and activations (no quantization)",
    input_dtype="float32", output_dtype="float32",
    converter=ConverterSettings(summary="no optimizations: float32 weights and activations"),
    rule="every tensor float32 (int32/int64 only for shapes/indices, unquantized); graph input and output "
         "float32; no quantized or float16 tensor, no QUANTIZE/DEQUANTIZE, custom or Flex op",
    contract=_fp32_contract,
))


def _fp16_contract(insp: "TfliteInspection", g: WeightMap) -> list[str]:
    def tensor(t, ti, op):
        quantized = bool(t.scale)
        if t.dtype == "float16" and not (t.is_constant and op.name == "DEQUANTIZE"):
            return [f"float16 tensor {t.name} is computed on, not a stored weight"]
        if t.dtype in ("int8", "int16", "uint8") or (quantized and t.dtype != "float16"):
            return [f"{t.dtype} quantized tensor {t.name}"]
        return []
    bad = _io(insp, "float32") + _scan(insp, tensor, forbid_qdq=False, float_graph=True)
    if set(g.weights) - {"float16"}:
        bad.append(f"weights stored as {', '.join(sorted(set(g.weights) - {'float16'}))}, expected float16")
    return bad


register_precision(Precision(
    name="fp16", description="float16 weights, float32 activations and I/O",
    input_dtype="float32", output_dtype="float32",
    converter=ConverterSettings(
        summary="Optimize.DEFAULT + supported_types=[float16]: float16 weights, float32 activations and I/O",
        optimize=True, supported_types=("float16",)),
    rule="every weight of a weighted op is a float16 constant turned into float32 by a DEQUANTIZE op; "
         "activations and graph input and output float32; no integer-quantized tensor, custom or Flex op",
    contract=_fp16_contract,
))


def _dynamic_contract(insp: "TfliteInspection", g: WeightMap) -> list[str]:
    def tensor(t, ti, op):
        if t.dtype == "int8" and not (t.is_constant and ti in g.weight_idx):
            return [f"int8 activation {t.name}"]
        if t.dtype in ("float16", "int16", "uint8"):
            return [f"{t.dtype} tensor {t.name}"]
        return []
    bad = _io(insp, "float32") + _scan(insp, tensor, forbid_qdq=True, float_graph=True)
    if not g.weights.get("int8"):  # a converter that silently did nothing fails here
        bad.append("no weight tensor is int8 (the converter keeps weights under 1024 elements in float32): "
                   "the model is float32 throughout")
    return bad


register_precision(Precision(
    name="dynamic", description="dynamic-range quantization: int8 weights, float32 activations and I/O",
    input_dtype="float32", output_dtype="float32",
    converter=ConverterSettings(
        summary="Optimize.DEFAULT, no representative dataset: int8 weights, float32 activations and I/O",
        optimize=True),
    rule="weights int8 (at least one weight tensor; the converter keeps tensors under 1024 elements in "
         "float32), every other tensor float32 (int32 only for shapes/indices); graph input and output "
         "float32; no int8 activation, no float16, custom or Flex op",
    contract=_dynamic_contract,
))


def _int16x8_contract(insp: "TfliteInspection", g: WeightMap) -> list[str]:
    from pipeline.tflite.inspect import _FLOAT_TYPES
    tensors = insp.tensors

    def tensor(t, ti, op):
        if t.dtype in _FLOAT_TYPES:
            return [f"{t.dtype} tensor {t.name}"]
        if t.dtype == "int8" and ti not in g.weight_idx:
            return [f"int8 activation {t.name}"]
        if t.dtype == "int16" and any(z != 0 for z in t.zero_point):
            return [f"int16 tensor {t.name} has a nonzero zero point"]
        if t.dtype == "uint8":
            return [f"uint8 tensor {t.name}"]
        return []

    def biases(op):
        return [f"bias {tensors[ti].name} is {tensors[ti].dtype}" for ti in op.inputs
                if ti in g.bias_idx and ti >= 0 and tensors[ti].dtype not in ("int64", "int32")]
    bad = _io(insp, "int16") + _scan(insp, tensor, forbid_qdq=True, float_graph=False, op_rule=biases)
    if set(g.weights) - {"int8"}:
        bad.append(f"weights stored as {', '.join(sorted(set(g.weights) - {'int8'}))}, expected int8")
    return bad


register_precision(Precision(
    name="int16x8", description="int16 activations and I/O, int8 weights, int64 biases",
    input_dtype="int16", output_dtype="int16", representative_dataset=True,
    converter=ConverterSettings(
        summary="Optimize.DEFAULT + representative dataset + EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_"
                "WEIGHTS_INT8, int16 I/O: int16 activations, int8 weights, int64 biases",
        optimize=True, ops_set="EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8", io_dtype="int16"),
    rule="every activation int16 with zero point 0, weights int8, biases int64/int32; graph input and output "
         "int16; no float tensor, no QUANTIZE/DEQUANTIZE, custom or Flex op",
    contract=_int16x8_contract,
))


def _int8_contract(insp: "TfliteInspection", g: WeightMap) -> list[str]:
    return list(insp.offending)  # exactly insp.fully_int8 (inspect_tflite.inspect decides it)


register_precision(Precision(
    name="int8", description="fully int8: int8 weights, activations and I/O",
    input_dtype="int8", output_dtype="int8", representative_dataset=True, fully_int8_required=True,
    converter=ConverterSettings(
        summary="Optimize.DEFAULT + representative dataset + TFLITE_BUILTINS_INT8, int8 I/O: fully int8",
        optimize=True, ops_set="TFLITE_BUILTINS_INT8", io_dtype="int8"),
    rule="fully_int8: every op reads and writes int8 activations with int8 weights; int32 only as biases or "
         "shape/index operands; graph input and output int8; no float, custom or Flex op",
    contract=_int8_contract,
))


# --------------------------------------------------------------------------- int8 with float fallback (a target flag)

FALLBACK_RULE = ("int8 with float fallback: graph input and output int8; every op int8 except ops left in float "
                 "between a DEQUANTIZE and a QUANTIZE (listed as float_ops); no custom or Flex op; at least one int8 op")


def fallback_check(insp: "TfliteInspection") -> PrecisionCheck:
    """The contract of a target with ``allow_float_fallback``: float ops are allowed and listed, the rest holds."""
    g = weight_map(insp)
    bad = _io(insp, "int8")
    bad += [f"{op.name}#{op.index}: {'Flex (TensorFlow)' if op.name.startswith('Flex') else 'custom'} op"
            for op in insp.op_list if op.custom]
    if not any(insp.tensors[ti].dtype == "int8" for op in insp.op_list if not op.custom
               for ti in op.outputs if ti >= 0):
        bad.append("no op writes int8: the model is float throughout")
    return PrecisionCheck("int8", not bad, FALLBACK_RULE, tuple(bad), g.weights)


def contract_check(precision: str, allow_float_fallback: bool, insp: "TfliteInspection") -> PrecisionCheck:
    """The precision contract a target holds a converted model to: its precision's, or int8 with float fallback
    when the target allows float ops (a Target's fields, or a report's ``target`` section's)."""
    if allow_float_fallback and precision == "int8":
        return fallback_check(insp)
    return get_precision(precision).checker(insp)


def float_ops(insp: "TfliteInspection") -> list[str]:
    """Ops of an int8 model that are not int8 (QUANTIZE/DEQUANTIZE around them included), one line each."""
    return list(insp.offending)
