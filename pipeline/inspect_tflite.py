"""Stage 3: read the TFLite flatbuffer and decide whether the model is fully int8.

``fully_int8`` holds only when every op computes in int8: all activation tensors an op
reads or writes are int8, weights are int8, int32 appears only as biases or as
shape/index operands, and no float, quantize/dequantize-to-float, custom or Flex op remains.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from .errors import ConversionError

_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_FLOAT_TYPES = {"float32", "float16", "float64", "bfloat16"}
# Ops whose int32 operand in the listed input slot is a bias (allowed by the int8 spec).
_BIAS_SLOT = {"CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "FULLY_CONNECTED": 2, "TRANSPOSE_CONV": 3}


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    quantized_dimension: int
    is_constant: bool

    @property
    def per_channel(self) -> bool:
        return len(self.scale) > 1

    def to_dict(self) -> dict:
        return {
            "index": self.index, "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "shape_signature": list(self.shape_signature),
            "quantization": {"scale": list(self.scale)[:8], "zero_point": list(self.zero_point)[:8],
                             "channels": len(self.scale), "quantized_dimension": self.quantized_dimension},
            "constant": self.is_constant,
        }


@dataclass(frozen=True)
class OpInfo:
    index: int
    name: str  # builtin name, or the custom code (Flex ops start with "Flex")
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    custom: bool


@dataclass(frozen=True)
class TfliteInspection:
    path: str
    bytes: int
    ops: dict  # op name -> count
    op_list: tuple[OpInfo, ...]
    tensors: tuple[TensorInfo, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    fully_int8: bool
    offending: tuple[str, ...] = field(default_factory=tuple)  # "OP#idx: reason"
    weights_per_channel: bool = False
    dtype_counts: dict = field(default_factory=dict)

    @property
    def input_dtype(self) -> str:
        return self.inputs[0].dtype

    @property
    def output_dtype(self) -> str:
        return self.outputs[0].dtype

    @property
    def dynamic_batch(self) -> bool:
        sig = self.inputs[0].shape_signature
        return bool(sig) and sig[0] == -1

    def to_dict(self, with_tensors: bool = True) -> dict:
        d = {
            "fully_int8": self.fully_int8,
            "input_dtype": self.input_dtype,
            "output_dtype": self.output_dtype,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "ops": dict(self.ops),
            "offending_ops": list(self.offending),
            "weights_per_channel": self.weights_per_channel,
            "tensor_dtypes": dict(self.dtype_counts),
            "dynamic_batch": self.dynamic_batch,
        }
        if with_tensors:
            d["tensors"] = [t.to_dict() for t in self.tensors]
        return d


def _np(v) -> np.ndarray:
    return np.asarray(v) if v is not None else np.zeros(0)


def inspect(path: Path) -> TfliteInspection:
    buf = Path(path).read_bytes()
    try:
        model = schema.ModelT.InitFromPackedBuf(buf, 0)
    except Exception as e:
        raise ConversionError(f"{path} is not a readable TFLite flatbuffer ({type(e).__name__})") from None
    if not model.subgraphs:
        raise ConversionError(f"{path} has no subgraph")
    sg = model.subgraphs[0]
    codes = []
    for oc in model.operatorCodes:
        code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
        name = _OP_NAMES.get(code, f"BUILTIN_{code}")
        custom = name == "CUSTOM"
        if custom:
            cc = oc.customCode
            name = cc.decode() if isinstance(cc, (bytes, bytearray)) else str(cc)
        codes.append((name, custom))

    tensors = []
    for i, t in enumerate(sg.tensors):
        q = t.quantization
        scale = tuple(float(v) for v in _np(q.scale if q else None).ravel())
        zp = tuple(int(v) for v in _np(q.zeroPoint if q else None).ravel())
        buf_idx = t.buffer
        const = bool(buf_idx and buf_idx < len(model.buffers) and (
            (model.buffers[buf_idx].data is not None and len(model.buffers[buf_idx].data) > 0)
            or (model.buffers[buf_idx].size or 0) > 0))
        name = t.name.decode() if isinstance(t.name, (bytes, bytearray)) else str(t.name)
        tensors.append(TensorInfo(
            index=i, name=name, dtype=_TYPE_NAMES.get(t.type, str(t.type)),
            shape=tuple(int(v) for v in _np(t.shape).ravel()),
            shape_signature=tuple(int(v) for v in _np(t.shapeSignature).ravel()) or tuple(int(v) for v in _np(t.shape).ravel()),
            scale=scale, zero_point=zp, quantized_dimension=int(q.quantizedDimension) if q else 0,
            is_constant=const,
        ))

    ops, offending = [], []
    weights_pc = []
    for k, op in enumerate(sg.operators or []):
        name, custom = codes[op.opcodeIndex]
        ins = tuple(int(v) for v in _np(op.inputs).ravel())
        outs = tuple(int(v) for v in _np(op.outputs).ravel())
        ops.append(OpInfo(k, name, ins, outs, custom))
        if custom:
            kind = "Flex (TensorFlow) op" if name.startswith("Flex") else "custom op"
            offending.append(f"{name}#{k}: {kind}")
            continue
        problems = []
        for slot, ti in enumerate(ins):
            if ti < 0:
                continue
            t = tensors[ti]
            if t.dtype in _FLOAT_TYPES:
                problems.append(f"input {slot} is {t.dtype}")
            elif t.dtype == "int32" and _BIAS_SLOT.get(name) == slot:
                pass  # int32 bias
            elif t.dtype in ("int16", "uint8"):
                problems.append(f"input {slot} is {t.dtype}")
            if name in _BIAS_SLOT and slot == 1:
                weights_pc.append(t.per_channel)
        for ti in outs:
            t = tensors[ti]
            if t.dtype in _FLOAT_TYPES or t.dtype in ("int16", "uint8"):
                problems.append(f"output is {t.dtype}")
        if problems:
            offending.append(f"{name}#{k}: {', '.join(sorted(set(problems)))}")

    inputs = tuple(tensors[i] for i in _np(sg.inputs).ravel())
    outputs = tuple(tensors[i] for i in _np(sg.outputs).ravel())
    for t in inputs + outputs:
        if t.dtype != "int8":
            offending.append(f"graph {'input' if t in inputs else 'output'} {t.name}: {t.dtype}")
    return TfliteInspection(
        path=str(path), bytes=len(buf),
        ops=dict(sorted(Counter(o.name for o in ops).items())),
        op_list=tuple(ops), tensors=tuple(tensors), inputs=inputs, outputs=outputs,
        fully_int8=not offending, offending=tuple(offending),
        weights_per_channel=bool(weights_pc) and all(weights_pc),
        dtype_counts=dict(sorted(Counter(t.dtype for t in tensors).items())),
    )


# --------------------------------------------------------------------------- precision contracts

# Ops whose input slot 1 holds the weights.
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL")

PRECISION_RULES = {
    "int8": "fully_int8: every op reads and writes int8 activations with int8 weights; int32 only as biases or "
            "shape/index operands; graph input and output int8; no float, custom or Flex op",
    "int16x8": "every activation int16 with zero point 0, weights int8, biases int64/int32; graph input and output "
               "int16; no float tensor, no QUANTIZE/DEQUANTIZE, custom or Flex op",
    "dynamic": "weights int8 (at least one weight tensor; the converter keeps tensors under 1024 elements in "
               "float32), every other tensor float32 (int32 only for shapes/indices); graph input and output "
               "float32; no int8 activation, no float16, custom or Flex op",
    "fp16": "every weight of a weighted op is a float16 constant turned into float32 by a DEQUANTIZE op; "
            "activations and graph input and output float32; no integer-quantized tensor, custom or Flex op",
    "fp32": "every tensor float32 (int32/int64 only for shapes/indices, unquantized); graph input and output "
            "float32; no quantized or float16 tensor, no QUANTIZE/DEQUANTIZE, custom or Flex op",
}


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


def check_precision(insp: TfliteInspection, precision: str) -> PrecisionCheck:
    """Check the precision contract of one target (``PRECISION_RULES``).

    For ``int8`` this is exactly ``insp.fully_int8``; the other rungs have their own rules.
    """
    if precision not in PRECISION_RULES:
        raise ConversionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_RULES)}")
    tensors = insp.tensors
    producer = {ti: op for op in insp.op_list for ti in op.outputs}
    weight_dtypes: Counter = Counter()
    weight_src: dict[int, TensorInfo] = {}  # weight tensor index -> the stored constant behind it
    for op in insp.op_list:
        if op.name in _WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0:
            w = tensors[op.inputs[1]]
            src = w
            p = producer.get(w.index)
            if p is not None and p.name == "DEQUANTIZE" and p.inputs and tensors[p.inputs[0]].is_constant:
                src = tensors[p.inputs[0]]
            weight_src[w.index] = src
            weight_dtypes[src.dtype] += 1
    weights = dict(sorted(weight_dtypes.items()))
    if precision == "int8":
        return PrecisionCheck(precision, insp.fully_int8, PRECISION_RULES[precision], insp.offending, weights)

    bad: list[str] = []
    io_dtype = "int16" if precision == "int16x8" else "float32"
    for role, group in (("input", insp.inputs), ("output", insp.outputs)):
        for t in group:
            if t.dtype != io_dtype:
                bad.append(f"graph {role} {t.name}: {t.dtype}, expected {io_dtype}")
    weight_idx = set(weight_src) | {s.index for s in weight_src.values()}
    bias_idx = {op.inputs[_BIAS_SLOT[op.name]] for op in insp.op_list
                if op.name in _BIAS_SLOT and len(op.inputs) > _BIAS_SLOT[op.name] and op.inputs[_BIAS_SLOT[op.name]] >= 0}
    for op in insp.op_list:
        if op.custom:
            bad.append(f"{op.name}#{op.index}: {'Flex (TensorFlow)' if op.name.startswith('Flex') else 'custom'} op")
            continue
        problems = []
        if op.name in ("QUANTIZE", "DEQUANTIZE") and precision in ("fp32", "dynamic", "int16x8"):
            problems.append(f"{op.name} op")
        for ti in (*op.inputs, *op.outputs):
            if ti < 0:
                continue
            t = tensors[ti]
            quantized = bool(t.scale)
            if precision == "int16x8":
                if t.dtype in _FLOAT_TYPES:
                    problems.append(f"{t.dtype} tensor {t.name}")
                elif t.dtype == "int8" and ti not in weight_idx:
                    problems.append(f"int8 activation {t.name}")
                elif t.dtype == "int16" and any(z != 0 for z in t.zero_point):
                    problems.append(f"int16 tensor {t.name} has a nonzero zero point")
                elif t.dtype == "uint8":
                    problems.append(f"uint8 tensor {t.name}")
            elif precision == "dynamic":
                if t.dtype == "int8" and not (t.is_constant and ti in weight_idx):
                    problems.append(f"int8 activation {t.name}")
                elif t.dtype in ("float16", "int16", "uint8"):
                    problems.append(f"{t.dtype} tensor {t.name}")
            elif precision == "fp16":
                if t.dtype == "float16" and not (t.is_constant and op.name == "DEQUANTIZE"):
                    problems.append(f"float16 tensor {t.name} is computed on, not a stored weight")
                elif t.dtype in ("int8", "int16", "uint8") or (quantized and t.dtype != "float16"):
                    problems.append(f"{t.dtype} quantized tensor {t.name}")
            elif precision == "fp32":
                if t.dtype in ("float16", "int8", "int16", "uint8", "bfloat16") or quantized:
                    problems.append(f"{t.dtype}{' quantized' if quantized else ''} tensor {t.name}")
            if precision in ("fp32", "fp16", "dynamic") and t.dtype in ("int32", "int64") and not t.is_constant \
                    and op.name not in ("SHAPE", "ARG_MAX", "ARG_MIN", "GATHER", "GATHER_ND"):
                problems.append(f"{t.dtype} activation {t.name}")
        if precision == "int16x8":
            for ti in op.inputs:
                if ti in bias_idx and ti >= 0 and tensors[ti].dtype not in ("int64", "int32"):
                    problems.append(f"bias {tensors[ti].name} is {tensors[ti].dtype}")
        if problems:
            bad.append(f"{op.name}#{op.index}: {', '.join(sorted(set(problems)))}")
    # What each rung needs to be present at all (a converter that silently did nothing fails here).
    if precision == "dynamic" and not weight_dtypes.get("int8"):
        bad.append("no weight tensor is int8 (the converter keeps weights under 1024 elements in float32): "
                   "the model is float32 throughout")
    if precision == "fp16" and set(weight_dtypes) - {"float16"}:
        bad.append(f"weights stored as {', '.join(sorted(set(weight_dtypes) - {'float16'}))}, expected float16")
    if precision == "int16x8" and set(weight_dtypes) - {"int8"}:
        bad.append(f"weights stored as {', '.join(sorted(set(weight_dtypes) - {'int8'}))}, expected int8")
    return PrecisionCheck(precision, not bad, PRECISION_RULES[precision], tuple(bad), weights)
