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

from pipeline.errors import ConversionError
from pipeline.precisions import PrecisionCheck, RegistryView, get_precision  # noqa: F401  (PrecisionCheck: re-exported)

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
# Each precision's contract lives with its registry entry (pipeline/precisions.py).

# ``precision name -> rule`` (a live view of the registry, for readers of the old table).
PRECISION_RULES = RegistryView("rule")


def check_precision(insp: TfliteInspection, precision: str) -> PrecisionCheck:
    """Check the precision contract of one target: ``get_precision(precision).checker(insp)``.

    For ``int8`` this is exactly ``insp.fully_int8``; the other rungs have their own rules.
    """
    return get_precision(precision, error=ConversionError).checker(insp)
