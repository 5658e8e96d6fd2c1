"""Stage ``inspect``: read the .tflite flatbuffer (ops, tensor dtypes, quantization; :mod:`pipeline.tflite.inspect`)
and hold the model to its precision's contract (:mod:`pipeline.precisions`)."""
from __future__ import annotations

from pathlib import Path


def inspect(tflite: Path, target, route: str = "the converter"):
    """The inspection, or the error naming what breaks the target's precision contract (``route``: who converted
    the model, named in the message)."""
    from pipeline.errors import ConversionError, NotFullyInt8Error
    from pipeline.tflite.inspect import inspect as read
    from pipeline.precisions import get_precision
    precision = get_precision(target.precision)
    insp = read(tflite)
    if target.allow_float_fallback:  # float ops allowed (and listed); int8 I/O, no custom or Flex op
        from pipeline.precisions import contract_check
        chk = contract_check(target.precision, target.allow_float_fallback, insp)
        if not chk.precision_ok:
            raise ConversionError(f"the converted model breaks the {target.name} contract: {chk.reason}; replace "
                                  "these ops or choose another target")
        return insp
    if precision.fully_int8_required and not insp.fully_int8:
        shown = "; ".join(insp.offending[:6]) + (f"; and {len(insp.offending) - 6} more" if len(insp.offending) > 6 else "")
        raise NotFullyInt8Error(f"the converted model is not fully int8: {shown}; {route} left these ops in "
                                "float (a converter limitation, e.g. for ELU): replace them in the model (e.g. ELU -> "
                                "LeakyReLU or ReLU) or choose a target that allows float fallback")
    if not precision.fully_int8_required:
        chk = precision.checker(insp)
        if not chk.precision_ok:
            raise ConversionError(f"the converted model breaks the {target.name} precision contract: "
                                  f"{chk.reason}; replace these ops or choose another precision")
    return insp
