"""The built-in target profiles."""
from __future__ import annotations

from . import Target, register_target

TFLITE_INT8 = register_target(Target(
    name="tflite-int8",
    description="Fully-int8 TFLite for a generic mobile CPU (LiteRT, XNNPACK, 4 threads)",
    format="tflite",
    precision="int8",
    runtime="litert",
    kernels="xnnpack",
    threads=4,  # a typical big-core count of phone and Raspberry Pi class CPUs
    input_dtype="int8",
    output_dtype="int8",
    allow_float_fallback=False,
    per_channel_weights=True,
    min_calibration_samples=100,
    references=(
        "TFLite int8 quantization spec: int8 weights per channel (zero point 0), int8 activations per tensor",
    ),
))
