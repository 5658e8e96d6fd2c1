"""The built-in target profiles.

Two kinds of entry:

- formats, the precision ladder on a generic CPU: ``tflite-fp32``, ``tflite-fp16``,
  ``tflite-dynamic`` (int8 weights, float activations), ``tflite-int16x8`` (int16
  activations, int8 weights) and ``tflite-int8``;
- devices: ``rpi4``, ``rpi5``, ``android-arm64`` (int8 on LiteRT with the device's kernels
  and threads) and ``cortex-m4``, ``cortex-m7`` (int8 on TFLite-Micro, with the RAM and
  flash budgets of real boards).

Every figure says where it comes from (``references``); published device figures are in
``published`` and are context, never a measurement of the exported model. "notes" below
means the project's research notes, ``../shared/notes/devices.md``.
"""
from __future__ import annotations

from pipeline.targets import Target, register_target

KIB = 1024
MIB = 1024 * 1024

_INT8_SPEC = "TFLite int8 quantization spec: int8 weights per channel (zero point 0), int8 activations per tensor"
_HOST_CPU_NOTE = ("latency is measured on this host's CPU with these kernels and threads and labelled as such; "
                  "it is not the latency of any device")

# --------------------------------------------------------------------------- formats (the precision ladder)

TFLITE_FP32 = register_target(Target(
    name="tflite-fp32",
    description="Float32 TFLite, no quantization: the ladder's reference on LiteRT (XNNPACK, 4 threads)",
    precision="fp32",
    min_calibration_samples=0,  # no representative dataset is used
    references=(
        "TFLiteConverter with no optimizations: weights and activations stay float32",
        _HOST_CPU_NOTE,
    ),
))

TFLITE_FP16 = register_target(Target(
    name="tflite-fp16",
    description="Float16 weights, float32 compute and I/O (LiteRT, XNNPACK, 4 threads)",
    precision="fp16",
    min_calibration_samples=0,
    references=(
        "TFLiteConverter Optimize.DEFAULT + target_spec.supported_types=[float16]: weights stored as float16 "
        "and turned into float32 by DEQUANTIZE ops in the graph; the other ops compute in float32 on CPU kernels",
        _HOST_CPU_NOTE,
    ),
))

TFLITE_DYNAMIC = register_target(Target(
    name="tflite-dynamic",
    description="Dynamic-range quantization: int8 weights, float32 activations and I/O (LiteRT, XNNPACK, 4 threads)",
    precision="dynamic",
    min_calibration_samples=0,
    references=(
        "TFLiteConverter Optimize.DEFAULT without a representative dataset: weights int8, activations float32, "
        "quantized on the fly by hybrid kernels; weight tensors under 1024 elements stay float32 "
        "(the converter's default minimum, seen on this project's tiny model)",
        "not for microcontrollers: TFLite-Micro rejects hybrid models ('Hybrid models are not supported on "
        "TFLite Micro', notes §5)",
        _HOST_CPU_NOTE,
    ),
))

TFLITE_INT16X8 = register_target(Target(
    name="tflite-int16x8",
    description="16-bit activations, 8-bit weights, int16 I/O (LiteRT built-in kernels, 4 threads)",
    precision="int16x8",
    # XNNPACK takes no int16x8 node in ai-edge-litert 2.3.0 (no DELEGATE node in the interpreter's
    # op list, measured here), so the optimized path is LiteRT's built-in kernels.
    kernels="builtin",
    # int16 I/O, not float I/O: the graph then holds no float tensor and no QUANTIZE/DEQUANTIZE
    # pair, the device is fed integers exactly as with int8, and the contract is checkable as
    # "every activation int16" (with float I/O the first and last op would be float).
    per_channel_weights=True,
    min_calibration_samples=100,
    references=(
        "TFLiteConverter Optimize.DEFAULT + representative dataset + supported_ops="
        "[EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8], inference_input/output_type=int16: "
        "activations int16 symmetric (zero point 0), weights int8, biases int64",
        "kernels=builtin: XNNPACK delegates no int16x8 node in ai-edge-litert 2.3.0 (measured here)",
        _HOST_CPU_NOTE,
    ),
))

TFLITE_INT8 = register_target(Target(
    name="tflite-int8",
    description="Fully-int8 TFLite for a generic mobile CPU (LiteRT, XNNPACK, 4 threads)",
    precision="int8",
    threads=4,  # a typical big-core count of phone and Raspberry Pi class CPUs
    allow_float_fallback=False,
    per_channel_weights=True,
    min_calibration_samples=100,
    references=(
        _INT8_SPEC,
    ),
))

# One weight scale per tensor: what kernels without per-axis support take. NNAPI gained per-channel symmetric
# weights (ANEURALNETWORKS_TENSOR_QUANT8_SYMM_PER_CHANNEL) only in Android 10 (API level 29); older NNAPI drivers
# and several NPU toolchains take per-tensor weights only. Same as tflite-int8 otherwise (`--per-tensor` gives the
# same weights on any target). Depthwise convolutions are where it hurts: README "When int8 hurts".
TFLITE_INT8_PER_TENSOR = register_target(Target(
    name="tflite-int8-per-tensor",
    description="Fully-int8 TFLite with one weight scale per tensor (kernels and accelerators without per-axis "
                "weights), LiteRT, XNNPACK, 4 threads",
    precision="int8",
    threads=4,
    allow_float_fallback=False,
    per_channel_weights=False,
    min_calibration_samples=100,
    references=(
        "TFLite int8 quantization spec: weights per channel or per tensor (zero point 0), int8 activations per "
        "tensor; this target uses per-tensor weights",
        "Android NNAPI: ANEURALNETWORKS_TENSOR_QUANT8_SYMM_PER_CHANNEL was added in API level 29 (Android 10); "
        "drivers of earlier releases take per-tensor quantized weights only",
    ),
))

# Int8 with float fallback: what TFLiteConverter makes without the integer-only op set. Graph input and output stay
# int8 and every op with an int8 kernel runs in int8; an op without one, and the layers `--recover float_fallback`
# names (the worst ones of the layer-wise debugger), run in float between a DEQUANTIZE and a QUANTIZE. For CPUs
# (XNNPACK runs float and int8 ops side by side) and GPU delegates; never for microcontrollers or int8-only NPUs,
# which is why the fully-int8 targets refuse float ops (README "When int8 hurts").
TFLITE_INT8_FLOAT_FALLBACK = register_target(Target(
    name="tflite-int8-float-fallback",
    description="Int8 with float fallback: int8 I/O and int8 ops, except ops without int8 kernels and the layers "
                "--recover float_fallback keeps in float (LiteRT, XNNPACK, 4 threads; CPUs, not MCUs or NPUs)",
    precision="int8",
    threads=4,
    allow_float_fallback=True,
    per_channel_weights=True,
    min_calibration_samples=100,
    references=(
        _INT8_SPEC + "; float ops allowed: the report lists each (quantization.float_ops)",
        "TFLiteConverter Optimize.DEFAULT + representative dataset without TFLITE_BUILTINS_INT8 ('integer with "
        "float fallback', TFLite post-training quantization guide), int8 input and output; named layers kept in "
        "float by the MLIR quantizer's denylisted_nodes (the mechanism of tf.lite.experimental.QuantizationDebugger's "
        "selective quantization)",
        _HOST_CPU_NOTE,
    ),
))

# --------------------------------------------------------------------------- application processors (LiteRT)

RPI4 = register_target(Target(
    name="rpi4",
    description="Raspberry Pi 4 Model B: fully-int8 on LiteRT with XNNPACK, 4 threads (one per Cortex-A72 core)",
    device="Raspberry Pi 4B, 4x Cortex-A72 @ 1.5 GHz",
    precision="int8",
    clock_mhz=1500,
    ram_bytes=1024 * MIB,  # the smallest board variant; not checked (an OS device)
    flash_bytes=None,  # microSD storage: no flash budget
    references=(
        _INT8_SPEC,
        "BCM2711, 4x Cortex-A72 @ 1.5 GHz (1.8 GHz on later boards per press), 1/2/4/8 GB LPDDR4-3200, "
        "microSD: Raspberry Pi spec pages (notes Table B); ram_bytes is the 1 GB variant",
        "ai-edge-litert 2.3.0 ships manylinux_2_27_aarch64 wheels for cp310-cp314 (PyPI, notes §1.4)",
        "an emulated Cortex-A72 (qemu-aarch64, notes 'Measured on this project's machines') gave XNNPACK outputs "
        "bit-identical to x86 XNNPACK on a 2-conv int8 CNN; emulation timings mean nothing",
        _HOST_CPU_NOTE,
    ),
    published=(
        "INT8 MobileNet v1 1.0 24 ms, INT8 MobileNet v2 1.0 17 ms (ARM64 OS, multi-threaded; 29/20 ms on the "
        "32-bit OS): XNNPACK README end2end-bench, Feb 2022 (XNNPACK library, not the TFLite interpreter)",
        "FP32 MobileNet v1 312 / 186 / 142 ms with 1 / 2 / 4 threads: XNNPACK issue #814 (user report, 2020)",
        "ResNet-8 (MLPerf Tiny IC) about 1.08 ms, MobileNet v1 0.25 VWW about 2.6-3.0 ms: MLPerf Tiny v0.5, "
        "latentai LEIP (TVM-based, not TFLite)",
    ),
))

RPI5 = register_target(Target(
    name="rpi5",
    description="Raspberry Pi 5: fully-int8 on LiteRT with XNNPACK, 4 threads (one per Cortex-A76 core)",
    device="Raspberry Pi 5, 4x Cortex-A76 @ 2.4 GHz",
    precision="int8",
    clock_mhz=2400,
    ram_bytes=1024 * MIB,  # the smallest variant seen; not checked
    flash_bytes=None,
    references=(
        _INT8_SPEC,
        "BCM2712, 4x Cortex-A76 @ 2.4 GHz, 512 KB L2 per core, 2 MB shared L3, LPDDR4X-4267, 1/2/4/8 GB "
        "variants: Raspberry Pi spec pages (notes §3 and Table B); ram_bytes is the 1 GB variant",
        _HOST_CPU_NOTE,
    ),
    published=(
        "no reliable published TFLite int8 latency was found (notes §3); the vendor claims 2-3x the Pi 4's "
        "CPU performance - measure on the board with the benchmark script",
    ),
))

ANDROID_ARM64 = register_target(Target(
    name="android-arm64",
    description="64-bit Android phone: fully-int8 on LiteRT with XNNPACK, 4 threads (the big cores)",
    device="arm64-v8a Android phone (big cores)",
    precision="int8",
    clock_mhz=None,  # varies by phone
    ram_bytes=None,
    flash_bytes=None,
    references=(
        _INT8_SPEC,
        "LiteRT applies XNNPACK by default; benchmark_model's README advises pinning to the big cores with "
        "taskset on Android (notes §1.1); 4 threads = a typical big-core cluster",
        _HOST_CPU_NOTE,
    ),
    published=(
        "XNNPACK int8 is about 30% faster on average than TFLite's default quantized kernels on ARM64 phones "
        "(5x on x86-64, so host speed-ups do not transfer): TF blog 'Faster Quantized Inference with XNNPACK', "
        "Sep 2021",
        "MobileNet v1 quant op profile on Android: 79.7 ms average, CONV_2D 89.3% of the time: "
        "TFLite benchmark_model README example (device not named)",
    ),
))

# --------------------------------------------------------------------------- microcontrollers (TFLite-Micro)

_CMSIS_MARGIN = (
    "arena_margin 0.25: the host tflite-micro wheel links the reference kernels; CMSIS-NN conv, depthwise_conv "
    "and fully_connected request extra scratch buffers in the arena (arm_convolve_wrapper_s8_get_buffer_size), "
    "so the host-measured arena can under-estimate a CMSIS-NN build (notes §5); the margin also leaves room "
    "for the application's own RAM. 25% is this project's policy, not a measured figure"
)
_FLASH_MARGIN = (
    "flash_margin 0.25: flash also holds the interpreter, kernels and application code (for scale: ST reports "
    "68.05 KiB of code flash for an X-CUBE-AI MobileNet v1 0.25 build, notes §4.3). 25% is this project's "
    "policy, not a measured figure"
)
_TFLM_HOST = (
    "arena_bytes is measured by TFLite-Micro's RecordingMicroAllocator (print_allocations, 'Arena allocation "
    "total') in the tflite-micro Python wheel on this host; flash_bytes is the .tflite size"
)

CORTEX_M4 = register_target(Target(
    name="cortex-m4",
    description="Cortex-M4F board (STM32L4R5ZI budgets): fully-int8 on TFLite-Micro, RAM and flash checked",
    device="STM32L4R5ZI (NUCLEO-L4R5ZI), Cortex-M4F @ 120 MHz",
    precision="int8",
    runtime="tflite-micro",
    kernels="tflm-reference",
    # LiteRT's optimized built-in kernels (1 thread) for the full test-set run: its reference kernels
    # ran the reference CNN at under 40 img/s here; TFLite-Micro is compared with these outputs.
    litert_kernels="builtin",
    threads=1,
    clock_mhz=120,
    core="cortex-m4",
    firmware_kernels="cmsis-nn",  # the firmware package's README builds TFLite-Micro with CMSIS-NN
    ram_bytes=640 * KIB,
    flash_bytes=2 * MIB,
    arena_margin=0.25,
    flash_margin=0.25,
    references=(
        _INT8_SPEC,
        "NUCLEO-L4R5ZI: Cortex-M4F 120 MHz, 640 KB SRAM, 2 MB flash: MLPerf Tiny v0.5 reference system "
        "description (notes §2.4 and Table B)",
        _TFLM_HOST,
        _CMSIS_MARGIN,
        _FLASH_MARGIN,
    ),
    published=(
        "MLPerf Tiny v0.5 reference (TFLM v2.3.1 reference kernels + Mbed) on this board: KWS DS-CNN 181.9 ms, "
        "VWW MobileNet v1 0.25 600.6 ms, IC ResNet-8 704.2 ms, AD FC autoencoder 10.05 ms (notes §2.4)",
        "MLPerf Tiny v0.7 STMicroelectronics (X-CUBE-AI 7.1.0) on this board: KWS 97.6 ms, VWW 254.6 ms, "
        "IC 252.8 ms, AD 9.67 ms; IC energy 12,298 uJ/inference (notes §2.4, Table A)",
        "MLPerf Tiny reference int8 models: KWS 53,936 B, VWW 333,288 B, IC 98,496 B, AD 276,976 B; reference "
        "firmware arenas (allocated, not minima) KWS 200 KB, VWW 200 KB, IC 100 KB, AD 10 KB (notes §2.1)",
    ),
))

CORTEX_M7 = register_target(Target(
    name="cortex-m7",
    description="Cortex-M7 board (STM32H7A3ZI budgets): fully-int8 on TFLite-Micro, RAM and flash checked",
    device="STM32H7A3ZI (NUCLEO-H7A3ZI-Q), Cortex-M7 @ 280 MHz",
    precision="int8",
    runtime="tflite-micro",
    kernels="tflm-reference",
    litert_kernels="builtin",
    threads=1,
    clock_mhz=280,
    core="cortex-m7",
    firmware_kernels="cmsis-nn",
    # MLPerf Tiny v0.7's system description lists 1.19 MB of RAM; the "about 1.4 MB" quoted in the
    # issue is larger and its breakdown was not checked here. The budget takes the smaller figure,
    # read as 10^6 bytes.
    ram_bytes=1_190_000,
    flash_bytes=2 * MIB,
    arena_margin=0.25,
    flash_margin=0.25,
    references=(
        _INT8_SPEC,
        "NUCLEO-H7A3ZI-Q: Cortex-M7 280 MHz, 1.19 MB RAM, 2 MB flash: MLPerf Tiny v0.7 STMicroelectronics "
        "system description (notes §2.4 and Table B); ram_bytes = 1.19 MB read as 1,190,000 bytes (the smaller "
        "reading); a figure of 'about 1.4 MB' seen quoted elsewhere was not traced to a source read here and is not used",
        _TFLM_HOST,
        _CMSIS_MARGIN,
        _FLASH_MARGIN,
    ),
    published=(
        "MLPerf Tiny v0.7 STMicroelectronics (X-CUBE-AI 7.1.0) on this board: KWS DS-CNN 22.3 ms, VWW MobileNet "
        "v1 0.25 64.4 ms, IC ResNet-8 70.4 ms, AD FC autoencoder 2.28 ms (notes §2.4)",
        "ST model zoo, MobileNet v1 0.25 224 int8 on STM32H7: 272.96 KiB activations + 16.38 KiB runtime RAM, "
        "214.69 KiB weights + 68.05 KiB code flash (X-CUBE-AI, not TFLite-Micro; notes §4.3)",
    ),
))
