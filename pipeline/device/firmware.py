"""The microcontroller firmware package: what a TFLite-Micro project needs to run the exported model on a board.

Written for TFLite-Micro targets, into the work folder after the device bundle, so it is published with the rest
or not at all:

    firmware/
      model_data.h / .cc   the .tflite as a 16-byte aligned C array (g_model_data, g_model_data_len)
      op_resolver.h        RegisterModelOps(): a MicroMutableOpResolver<N> with exactly the model's N builtin ops
      model_settings.h     arena size, tensor shapes and quantization, and model_preprocess(): one raw image (as
                           the bundle's samples.npz "raw" holds it) -> the int8 model input, as the host computes it
      sample_data.h        one test image (raw), its int8 input and the host's int8 output (TFLite-Micro)
      main.cc              runs the sample through the interpreter: PASS when within 1 step of the host
      README.txt           the files, how to build them into a TFLite-Micro project, flash and RAM figures
    firmware.zip           the same folder

``model_data.cc`` and the two C headers are compiled with arm-none-eabi-g++/gcc for the target's core when the
toolchain is installed; the model section's size is what the report records as the firmware's model flash.
``op_resolver.h`` and ``main.cc`` need TFLite-Micro's headers, which this project does not ship; the test suite
checks them against declaration stubs (tests/test_firmware.py).
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import OutputError
from pipeline.jsonio import sha256_file
from pipeline.outdir import FIRMWARE_FILES as FILES  # what this module writes into firmware/

FIRMWARE_DIR = "firmware"
FIRMWARE_ZIP = "firmware.zip"
CHECK_TOLERANCE_STEPS = 1  # main.cc: the board's output vs the host's TFLite-Micro output, like the Pi bundle
SAMPLE_INDEX = 0  # the first evaluated test image (also the bundle's first sample)
ARENA_ALIGNMENT = 16
MODEL_SECTION = ".rodata.g_model_data"
COMPILE_TIMEOUT_S = 300

# TFLite builtin op -> the MicroMutableOpResolver method that registers it, from TFLite-Micro's
# tensorflow/lite/micro/micro_mutable_op_resolver.h (the 2025 header: TFLMRegistration). Builtin ops only; an op
# missing here has no Add method there (TFLite-Micro has no kernel for it, or registers it otherwise).
RESOLVER_METHODS = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable", "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce", "CAST": "AddCast", "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D", "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "EMBEDDING_LOOKUP": "AddEmbeddingLookup", "ELU": "AddElu", "EQUAL": "AddEqual", "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish", "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd", "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic", "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D",
    "MIRROR_PAD": "AddMirrorPad", "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MUL": "AddMul", "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2", "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable", "REDUCE_MAX": "AddReduceMax",
    "REDUCE_MIN": "AddReduceMin", "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape",
    "RESIZE_BILINEAR": "AddResizeBilinear", "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "REVERSE_V2": "AddReverseV2", "ROUND": "AddRound", "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2",
    "SHAPE": "AddShape", "SIN": "AddSin", "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth", "SPLIT": "AddSplit",
    "SPLIT_V": "AddSplitV", "SQUEEZE": "AddSqueeze", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub",
    "SUM": "AddSum", "SVDF": "AddSvdf", "TANH": "AddTanh", "TRANSPOSE_CONV": "AddTransposeConv",
    "TRANSPOSE": "AddTranspose", "UNPACK": "AddUnpack",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM", "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}


def resolver_methods(ops) -> list[tuple[str, str]]:
    """(op, Add method) for each distinct op of the model, sorted by op name. An op without a method is one
    MicroUnsupportedError line (exit 1) naming it."""
    from pipeline.runtime.micro import MicroUnsupportedError
    names = sorted(set(ops))
    missing = [n for n in names if n not in RESOLVER_METHODS]
    if missing:
        raise MicroUnsupportedError(
            f"the firmware package cannot register {', '.join(missing)}: TFLite-Micro's MicroMutableOpResolver has "
            f"no Add method for {'it' if len(missing) == 1 else 'them'} (the model's ops: {', '.join(names)}); "
            "replace that op or choose a LiteRT target (python -m pipeline.export --list-targets)")
    return [(n, RESOLVER_METHODS[n]) for n in names]


def tensor_arena_size(arena_bytes: int, margin: float) -> int:
    """The arena the firmware declares: the measured arena times (1 + margin), rounded up to 16 bytes."""
    need = int(math.ceil(arena_bytes * (1.0 + margin)))
    return -(-need // ARENA_ALIGNMENT) * ARENA_ALIGNMENT


def compile_flags(core) -> list[str]:
    return list(core.gcc_flags)


# --------------------------------------------------------------------------- C text helpers

def c_float(v: float) -> str:
    """The float32 value of ``v`` as a C float literal: the shortest decimal that converts back to exactly that float
    (``0.003921569f``), valid C89/C++98 (hexadecimal floats would need C99/C++17)."""
    f = np.float32(v)
    if not np.isfinite(f):
        raise OutputError(f"the firmware package cannot write the non-finite constant {v!r}; re-run the export")
    if f == 0:
        return "0.0f"
    if 1e-4 <= abs(float(f)) < 1e7:
        text = np.format_float_positional(f, unique=True, trim="0")
    else:
        text = np.format_float_scientific(f, unique=True, trim="0")
    return text + "f"


def c_string(s: str) -> str:
    """A C string literal holding ``s`` as UTF-8; anything but plain printable ASCII as 3-digit octal escapes."""
    out = []
    for b in s.encode("utf-8"):
        ch = chr(b)
        out.append(ch if 0x20 <= b < 0x7F and ch not in '"\\?' else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def c_bytes(data: bytes, per_line: int = 16, indent: str = "    ") -> str:
    hexes = [f"0x{b:02x}" for b in data]
    return "\n".join(indent + ", ".join(hexes[i:i + per_line]) + "," for i in range(0, len(hexes), per_line))


def c_ints(values, per_line: int = 16, indent: str = "    ") -> str:
    vals = [str(int(v)) for v in np.asarray(values).ravel()]
    return "\n".join(indent + ", ".join(vals[i:i + per_line]) + "," for i in range(0, len(vals), per_line))


def c_floats(values, per_line: int = 8, indent: str = "    ") -> str:
    vals = [c_float(v) for v in np.asarray(values).ravel()]
    return "\n".join(indent + ", ".join(vals[i:i + per_line]) + "," for i in range(0, len(vals), per_line))


# --------------------------------------------------------------------------- the artifact

@dataclass(frozen=True)
class FirmwareArtifact:
    folder: Path
    zip_path: Path
    files: dict
    ops: tuple[tuple[str, str], ...]  # (op, Add method)
    arena: dict
    flash: dict
    sample: dict
    target: dict
    seconds: float
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict:
        return {
            "path": f"{self.folder.name}/", "zip": self.zip_path.name,
            "zip_bytes": self.zip_path.stat().st_size if self.zip_path.exists() else None,
            "files": dict(self.files),
            **self.target,
            "op_resolver": {"op_count": len(self.ops), "ops": [o for o, _ in self.ops],
                            "methods": [m for _, m in self.ops],
                            "source": "tensorflow/lite/micro/micro_mutable_op_resolver.h (TFLite-Micro, 2025)"},
            "arena": dict(self.arena),
            "flash": dict(self.flash),
            "sample": dict(self.sample),
            "tflm_headers": "not shipped with this project: op_resolver.h and main.cc are checked against "
                            "declaration stubs in the test suite (tests/test_firmware.py), not compiled against "
                            "TFLite-Micro itself",
            "seconds": round(self.seconds, 3),
        }


def write_firmware(work: Path, tflite_path: Path, insp, micro, preprocessing: dict, raw: np.ndarray,
                   x: np.ndarray, labels: np.ndarray, *, target, model_spec: str,
                   class_names=None) -> FirmwareArtifact:
    """Write ``work/firmware/`` and ``work/firmware.zip``.

    ``insp``: the inspect stage's TfliteInspection; ``micro``: the micro stage's MicroResult (arena, the host's
    TFLite-Micro outputs); ``preprocessing``: the deployment record (report.json ``preprocessing``); ``raw``, ``x``,
    ``labels``: the evaluated test images as read (N×C×H×W), preprocessed (float32 N×C×H×W) and their classes."""
    from pipeline.runtime.litert import quantize
    from pipeline.targets import CORES
    t0 = time.perf_counter()
    core = CORES[target.core]
    ops = resolver_methods(insp.ops)
    inp, out = insp.inputs[0], insp.outputs[0]
    if inp.dtype != "int8" or out.dtype != "int8":
        raise OutputError(f"the firmware package is for fully-int8 models; this one takes {inp.dtype} and gives "
                          f"{out.dtype}")
    pre = preprocessing
    layout = pre.get("tflite_input_layout")
    q = pre.get("input_quantization") or {}
    if layout not in ("NHWC", "NCHW") or q.get("dtype") != "int8" or not q.get("scale"):
        raise OutputError("the preprocessing record has no int8 input quantization or TFLite input layout; re-run "
                          "the export")
    if (float(np.float32(q["scale"])) != float(np.float32(inp.scale[0])) or int(q["zero_point"]) != inp.zero_point[0]):
        raise OutputError(f"the preprocessing record's input quantization ({q}) is not the model's "
                          f"({inp.scale[0]}, {inp.zero_point[0]}); re-run the export")
    n = min(len(raw), len(x), len(micro.raw_outputs))
    if n <= SAMPLE_INDEX:
        raise OutputError("the firmware package needs at least one test image run on TFLite-Micro; pass a larger "
                          "--eval-limit and --micro-limit")
    i = SAMPLE_INDEX
    xs = x[i:i + 1]
    x_model = np.transpose(xs, (0, 2, 3, 1)) if layout == "NHWC" else xs
    # the host's input quantization (the same function as the run stage and the device bundle)
    sample_input = quantize(x_model, float(q["scale"]), int(q["zero_point"]), np.int8).reshape(-1)
    sample_output = np.asarray(micro.raw_outputs[i]).reshape(-1)
    if sample_output.dtype != np.int8:
        raise OutputError(f"TFLite-Micro gave {sample_output.dtype} outputs; the firmware package expects int8")
    in_shape = tuple(int(v) for v in inp.shape)
    out_count = int(np.prod(out.shape[1:])) if len(out.shape) > 1 else int(np.prod(out.shape))
    if int(np.prod(in_shape)) != sample_input.size or out_count != sample_output.size:
        raise OutputError(f"the model's tensors ({in_shape}, {out.shape}) do not match the sample "
                          f"({sample_input.size} inputs, {sample_output.size} outputs); re-run the export")
    names = [str(v) for v in class_names] if class_names is not None and len(class_names) == out_count else None

    arena_size = tensor_arena_size(micro.arena_bytes, target.arena_margin)
    arena = {"measured_bytes": micro.arena_bytes, "margin": target.arena_margin, "tensor_arena_size": arena_size,
             "how": f"TFLite-Micro's RecordingMicroAllocator on this host (tflite-micro wheel, reference kernels): "
                    f"{micro.arena_bytes:,} B, x (1 + {target.arena_margin:g}) arena_margin of the target, rounded up "
                    f"to {ARENA_ALIGNMENT} B = {arena_size:,} B (MODEL_TENSOR_ARENA_SIZE)"}
    model_bytes = tflite_path.read_bytes()
    digest = sha256_file(tflite_path)
    raw_sample = np.ascontiguousarray(raw[i])

    folder, zip_path = work / FIRMWARE_DIR, work / FIRMWARE_ZIP
    folder.mkdir()
    try:
        ctx = dict(model_spec=model_spec, target=target.name, device=target.device, tflite=tflite_path.name,
                   model_bytes=len(model_bytes), sha256=digest)
        (folder / "model_data.h").write_text(_model_data_h(ctx), encoding="utf-8")
        (folder / "model_data.cc").write_text(_model_data_cc(ctx, model_bytes), encoding="utf-8")
        (folder / "op_resolver.h").write_text(op_resolver_h(ctx, ops, insp.ops), encoding="utf-8")
        (folder / "model_settings.h").write_text(
            model_settings_h(ctx, pre, inp, out, in_shape, out_count, layout, raw_sample, arena, target, names),
            encoding="utf-8")
        (folder / "sample_data.h").write_text(
            _sample_data_h(ctx, raw_sample, sample_input, sample_output, int(labels[i]), i, names), encoding="utf-8")
        (folder / "main.cc").write_text(_main_cc(ctx), encoding="utf-8")
        flash = measure_flash(folder, core)
        warnings = ()
        if flash.get("measured") is False and flash.get("compile_failed"):
            warnings = (f"the firmware package did not compile for {core.name}: {flash['reason']}",)
        (folder / "README.txt").write_text(
            _readme(ctx, target, core, ops, arena, flash, micro, names, sample_output, int(labels[i])),
            encoding="utf-8")
        files = {name: (folder / name).stat().st_size for name in FILES}
        _zip(folder, zip_path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        for p in (zip_path, zip_path.with_name(zip_path.name + ".part")):
            p.unlink(missing_ok=True)
        raise
    sample = {"index": i, "label": int(labels[i]), "label_name": names[int(labels[i])] if names else None,
              "expected_output_from": "TFLite-Micro on this host (tflite-micro wheel, reference kernels), the micro "
                                      "stage's output for this image",
              "host_top1": int(np.argmax(sample_output)), "tolerance_steps": CHECK_TOLERANCE_STEPS,
              "input_from": "the host's preprocessing and input quantization (as samples.npz input_int8)"}
    tgt = {"target": target.name, "core": core.name, "gcc_flags": compile_flags(core),
           "tflm_target_arch": core.tflm_target_arch, "firmware_kernels": target.firmware_kernels,
           "budget_source": target.budget_source, "budget_given_by": target.budget_given_by}
    return FirmwareArtifact(folder=folder, zip_path=zip_path, files=files, ops=tuple(ops), arena=arena, flash=flash,
                            sample=sample, target=tgt, seconds=time.perf_counter() - t0, warnings=warnings)


def _zip(folder: Path, zip_path: Path) -> None:
    """A reproducible zip: fixed timestamps, sorted names, everything under ``firmware/``."""
    tmp = zip_path.with_name(zip_path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for name in sorted(p.name for p in folder.iterdir()):
            info = zipfile.ZipInfo(f"{folder.name}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, (folder / name).read_bytes())
    tmp.replace(zip_path)


# --------------------------------------------------------------------------- flash, measured with the toolchain

def toolchain() -> dict | None:
    """Paths of arm-none-eabi-g++, -gcc and -size, or None when one is missing."""
    tools = {k: shutil.which(f"arm-none-eabi-{k}") for k in ("g++", "gcc", "size")}
    return tools if all(tools.values()) else None


def measure_flash(folder: Path, core) -> dict:
    """Compile model_data.cc (and a translation unit holding model_settings.h and sample_data.h) for ``core`` with
    arm-none-eabi-g++/gcc and read the section sizes with arm-none-eabi-size. Never raises for a missing or failing
    toolchain: the result then says why nothing was measured."""
    tools = toolchain()
    if tools is None:
        return {"measured": False, "reason": "arm-none-eabi-g++, -gcc or -size is not installed (Debian: apt-get "
                                             "install gcc-arm-none-eabi; ./setup.sh installs it); the model section "
                                             "is then the .tflite size plus alignment, not measured"}
    flags = compile_flags(core)
    version = _first_line([tools["g++"], "--version"])
    with tempfile.TemporaryDirectory(prefix="firmware-size-") as tmp:
        obj, check_c = Path(tmp) / "model_data.o", Path(tmp) / "settings_check.c"
        check_o = Path(tmp) / "settings_check.o"
        cxx = [tools["g++"], *flags, "-std=c++11", "-Os", "-fdata-sections", "-ffunction-sections", "-c",
               str(folder / "model_data.cc"), "-o", str(obj)]
        check_c.write_text(_SETTINGS_CHECK, encoding="utf-8")
        cc = [tools["gcc"], *flags, "-std=c99", "-Os", "-Wall", "-ffunction-sections", "-fdata-sections",
              f"-I{folder}", "-c", str(check_c), "-o", str(check_o)]
        try:
            for cmd in (cxx, cc):
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
                if r.returncode != 0:
                    tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-2:])[:300]
                    return {"measured": False, "compile_failed": True,
                            "reason": f"{Path(cmd[0]).name} exited {r.returncode}: {tail}", "toolchain": version}
            model_sections = _sections(tools["size"], obj)
            check_sections = _sections(tools["size"], check_o)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"measured": False, "compile_failed": True, "reason": f"{type(e).__name__}: {e}"[:300],
                    "toolchain": version}
    model = model_sections.get(MODEL_SECTION)
    if model is None:
        return {"measured": False, "compile_failed": True, "toolchain": version,
                "reason": f"model_data.o has no {MODEL_SECTION} section (sections: {', '.join(model_sections)})"}
    shown = lambda cmd: " ".join(Path(c).name if c == cmd[0] else  # noqa: E731
                                 c.replace(str(folder), FIRMWARE_DIR).replace(tmp, ".") for c in cmd)
    return {
        "measured": True,
        "model_section": MODEL_SECTION,
        "model_section_bytes": model,
        "model_data_object_bytes": sum(v for k, v in model_sections.items() if _loaded(k)),
        "preprocess_and_sample_bytes": sum(v for k, v in check_sections.items() if _loaded(k)),
        "sections": {k: v for k, v in model_sections.items() if _loaded(k)},
        "toolchain": version,
        "commands": [shown(cxx), "arm-none-eabi-size -A -d model_data.o", shown(cc),
                     "arm-none-eabi-size -A -d settings_check.o"],
        "how": f"model_data.cc compiled for {core.name} ({' '.join(flags)}); {MODEL_SECTION} is the array linked "
               "into flash as is. preprocess_and_sample_bytes: model_preprocess() and sample_data.h compiled as C99 "
               "(-Os) in one translation unit. Code of TFLite-Micro, its kernels and the application is not "
               "included (the target's flash_margin covers it)",
    }


_SETTINGS_CHECK = """\
/* Compiles model_settings.h and sample_data.h for the target: model_preprocess() and the sample arrays. */
#include "model_settings.h"
#include "sample_data.h"

int firmware_settings_check(int8_t* input) {
  int i, same = 0;
  model_preprocess(g_sample_raw, input);
  for (i = 0; i < MODEL_INPUT_SIZE; ++i) same += input[i] == g_sample_input_int8[i];
  return same + g_sample_expected_output[0] + g_sample_label;
}
"""


def _loaded(section: str) -> bool:
    return section.startswith((".text", ".rodata", ".data"))


def _sections(size_tool: str, obj: Path) -> dict:
    r = subprocess.run([size_tool, "-A", "-d", str(obj)], capture_output=True, text=True, timeout=60, check=True)
    out = {}
    for ln in r.stdout.splitlines():
        parts = ln.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit() and int(parts[1]) > 0:
            out[parts[0]] = int(parts[1])
    return out


def _first_line(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout.strip().splitlines() or [None])[0]
    except (OSError, subprocess.TimeoutExpired):
        return None


# --------------------------------------------------------------------------- the files

def _header(ctx: dict, what: str) -> str:
    return (f"// {what}\n"
            f"// Model: {ctx['model_spec']} -> {ctx['tflite']} ({ctx['model_bytes']:,} bytes, "
            f"sha256 {ctx['sha256']}),\n"
            f"// target {ctx['target']} ({ctx['device']}). Written by python -m pipeline.export; do not edit.\n")


def _guard(name: str) -> str:
    return "EDGE_INT8_" + re.sub(r"[^A-Z0-9]", "_", name.upper()) + "_"


def _model_data_h(ctx: dict) -> str:
    g = _guard("model_data.h")
    return (_header(ctx, "The model as a C array, linked into flash as is.") + f"""#ifndef {g}
#define {g}

// The .tflite flatbuffer: {ctx['model_bytes']:,} bytes, 16-byte aligned (TFLite-Micro reads it in place).
extern const unsigned char g_model_data[];
extern const unsigned int g_model_data_len;

#endif  // {g}
""")


def _model_data_cc(ctx: dict, data: bytes) -> str:
    return (_header(ctx, "The model as a C array, linked into flash as is.")
            + f"// File size {len(data):,} bytes; sha256 {ctx['sha256']}.\n"
            + '#include "model_data.h"\n\n'
            + "alignas(16) const unsigned char g_model_data[] = {\n" + c_bytes(data) + "\n};\n"
            + f"const unsigned int g_model_data_len = {len(data)};\n")


def op_resolver_h(ctx: dict, ops: list[tuple[str, str]], counts: dict) -> str:
    g = _guard("op_resolver.h")
    calls = "\n".join(f"  if (resolver.{m}() != kTfLiteOk) return kTfLiteError;  // {op} x{counts.get(op, 0)}"
                      for op, m in ops)
    return (_header(ctx, "The op resolver: exactly the model's builtin ops, one Add call each.") + f"""#ifndef {g}
#define {g}

#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

// The model uses {len(ops)} distinct builtin ops: {', '.join(op for op, _ in ops)}.
constexpr unsigned int kModelOpCount = {len(ops)};
using ModelOpResolver = tflite::MicroMutableOpResolver<kModelOpCount>;

// Adds every op of the model to ``resolver``; kTfLiteError when one cannot be added.
inline TfLiteStatus RegisterModelOps(ModelOpResolver& resolver) {{
{calls}
  return kTfLiteOk;
}}

#endif  // {g}
""")


def model_settings_h(ctx, pre, inp, out, in_shape, out_count, layout, raw_sample, arena, target, names) -> str:
    g = _guard("model_settings.h")
    c, h, w = (int(v) for v in pre["input_shape"])
    if layout == "NHWC":
        dims = {"BATCH": in_shape[0], "HEIGHT": in_shape[1], "WIDTH": in_shape[2], "CHANNELS": in_shape[3]}
    else:
        dims = {"BATCH": in_shape[0], "CHANNELS": in_shape[1], "HEIGHT": in_shape[2], "WIDTH": in_shape[3]}
    if (dims["CHANNELS"], dims["HEIGHT"], dims["WIDTH"]) != (c, h, w) or raw_sample.shape != (c, h, w):
        raise OutputError(f"the model input {in_shape} ({layout}) does not match the preprocessing record's "
                          f"C,H,W {(c, h, w)} or the raw sample {raw_sample.shape}; re-run the export")
    raw_type = "uint8_t" if raw_sample.dtype == np.uint8 else "float"
    if raw_sample.dtype not in (np.uint8, np.float32):
        raise OutputError(f"raw images are {raw_sample.dtype}; the firmware package takes uint8 or float32 images")
    scale_in, zp_in = float(inp.scale[0]), int(inp.zero_point[0])
    scale_out, zp_out = float(out.scale[0]), int(out.zero_point[0])
    mean, std = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
    dst = "((y * MODEL_INPUT_WIDTH + x) * MODEL_INPUT_CHANNELS + c)" if layout == "NHWC" else \
        "((c * MODEL_INPUT_HEIGHT + y) * MODEL_INPUT_WIDTH + x)"
    names_def = ""
    if names:
        names_def = ("\n// Class names, index order (UTF-8).\n#define MODEL_CLASS_NAMES { \\\n"
                     + " \\\n".join(f"    {c_string(n)}," for n in names) + " \\\n}\n")
    return (_header(ctx, "Model settings and the preprocessing, as the host computed them.") + f"""#ifndef {g}
#define {g}

#include <stdint.h>

#if defined(__FAST_MATH__)
#error "model_preprocess() reproduces the host's float32 arithmetic; compile this file without -ffast-math"
#endif

// Tensor arena. TFLite-Micro measured {arena['measured_bytes']:,} bytes on the host (RecordingMicroAllocator,
// reference kernels); the target's arena_margin of {target.arena_margin:g} is added (CMSIS-NN kernels ask for scratch
// buffers the reference kernels do not) and the sum rounded up to {ARENA_ALIGNMENT} bytes. Declare the arena
// 16-byte aligned: alignas(16) uint8_t tensor_arena[MODEL_TENSOR_ARENA_SIZE];
#define MODEL_ARENA_MEASURED_BYTES {arena['measured_bytes']}
#define MODEL_TENSOR_ARENA_SIZE {arena['tensor_arena_size']}

// Input tensor: int8 {layout} {'x'.join(map(str, in_shape))}; real = (q - zero_point) * scale.
#define MODEL_INPUT_LAYOUT_{layout} 1
#define MODEL_INPUT_BATCH {dims['BATCH']}
#define MODEL_INPUT_HEIGHT {dims['HEIGHT']}
#define MODEL_INPUT_WIDTH {dims['WIDTH']}
#define MODEL_INPUT_CHANNELS {dims['CHANNELS']}
#define MODEL_INPUT_SIZE {int(np.prod(in_shape))}
#define MODEL_INPUT_SCALE {c_float(scale_in)}
#define MODEL_INPUT_ZERO_POINT ({zp_in})

// Output tensor: int8 {'x'.join(map(str, out.shape))}, one value per class (logits).
#define MODEL_OUTPUT_SIZE {out_count}
#define MODEL_NUM_CLASSES {out_count}
#define MODEL_OUTPUT_SCALE {c_float(scale_out)}
#define MODEL_OUTPUT_ZERO_POINT ({zp_out})
{names_def}
// Preprocessing (the export's deployment record, report.json "preprocessing"): a raw image, C x H x W as read
// ({pre['source_dtype']}, the layout of the device bundle's samples.npz "raw"), becomes
//   x = (raw * scale - mean[c]) / std[c];  q = round_half_to_even(x / MODEL_INPUT_SCALE) + MODEL_INPUT_ZERO_POINT
// in float32, clamped to [-128, 127], written in the model's {layout} order. Each float constant in this file is
// the shortest decimal that converts to exactly the float32 the host used.
typedef {raw_type} model_raw_t;
#define MODEL_RAW_CHANNELS {c}
#define MODEL_RAW_HEIGHT {h}
#define MODEL_RAW_WIDTH {w}
#define MODEL_RAW_SIZE {c * h * w}
#define MODEL_RAW_SCALE {c_float(pre['scale'])}
#define MODEL_MEAN_INIT {{{', '.join(c_float(v) for v in mean)}}}
#define MODEL_STD_INIT {{{', '.join(c_float(v) for v in std)}}}

// round() as numpy does it: halves to the nearest even integer. |v| is at most 1000 here.
static inline int32_t model_round_half_even(float v) {{
  int32_t i = (int32_t)v;  // toward zero
  float frac = v - (float)i;  // exact
  if (frac > 0.5f || (frac == 0.5f && (i & 1))) return i + 1;
  if (frac < -0.5f || (frac == -0.5f && (i & 1))) return i - 1;
  return i;
}}

// One raw image (MODEL_RAW_SIZE values, C x H x W) -> the int8 model input (MODEL_INPUT_SIZE values), bit for bit
// what the host computes. The product raw * scale goes through a volatile float so no compiler fuses it with the
// subtraction into a multiply-add (which rounds once, where the host rounds twice).
static inline void model_preprocess(const model_raw_t* raw, int8_t* input) {{
  static const float mean[MODEL_RAW_CHANNELS] = MODEL_MEAN_INIT;
  static const float std_dev[MODEL_RAW_CHANNELS] = MODEL_STD_INIT;
  int c, y, x;
  for (c = 0; c < MODEL_RAW_CHANNELS; ++c) {{
    for (y = 0; y < MODEL_RAW_HEIGHT; ++y) {{
      for (x = 0; x < MODEL_RAW_WIDTH; ++x) {{
        volatile float scaled = (float)raw[(c * MODEL_RAW_HEIGHT + y) * MODEL_RAW_WIDTH + x] * MODEL_RAW_SCALE;
        float v = (scaled - mean[c]) / std_dev[c];
        float q = v / MODEL_INPUT_SCALE;
        int32_t r;
        if (q > 1000.0f) q = 1000.0f;
        if (q < -1000.0f) q = -1000.0f;
        r = model_round_half_even(q) + MODEL_INPUT_ZERO_POINT;
        input[{dst}] = (int8_t)(r < -128 ? -128 : (r > 127 ? 127 : r));
      }}
    }}
  }}
}}

#endif  // {g}
""")


def _sample_data_h(ctx, raw_sample, sample_input, sample_output, label, index, names) -> str:
    g = _guard("sample_data.h")
    raw_type = "uint8_t" if raw_sample.dtype == np.uint8 else "float"
    raw_text = c_ints(raw_sample) if raw_sample.dtype == np.uint8 else c_floats(raw_sample)
    label_text = f" ({names[label]})" if names else ""
    return (_header(ctx, "One test image with the host's results, for main.cc.") + f"""#ifndef {g}
#define {g}

#include <stdint.h>

#include "model_settings.h"

#if defined(__GNUC__)
#define SAMPLE_MAYBE_UNUSED __attribute__((unused))
#else
#define SAMPLE_MAYBE_UNUSED
#endif

// Test image {index} of the evaluated split, label {label}{label_text}: raw, C x H x W as read ({raw_type}).
static const {raw_type} g_sample_raw[MODEL_RAW_SIZE] SAMPLE_MAYBE_UNUSED = {{
{raw_text}
}};

// The same image as the host's int8 model input (preprocessing + input quantization; samples.npz input_int8).
static const int8_t g_sample_input_int8[MODEL_INPUT_SIZE] SAMPLE_MAYBE_UNUSED = {{
{c_ints(sample_input)}
}};

// The host's int8 output for it: TFLite-Micro (tflite-micro wheel, reference kernels). A board may differ by
// {CHECK_TOLERANCE_STEPS} step (CMSIS-NN rounds some ops differently).
static const int8_t g_sample_expected_output[MODEL_OUTPUT_SIZE] SAMPLE_MAYBE_UNUSED = {{
{c_ints(sample_output)}
}};

static const int g_sample_label SAMPLE_MAYBE_UNUSED = {label};
#define SAMPLE_TOLERANCE_STEPS {CHECK_TOLERANCE_STEPS}

#endif  // {g}
""")


def _main_cc(ctx: dict) -> str:
    return _header(ctx, "Runs the bundled sample through TFLite-Micro and checks the result against the host's.") + \
        """//
// Prints (through MicroPrintf) the check of the preprocessing and of the output, then PASS or FAIL, and leaves
// g_firmware_check_result = 1 (PASS) or -1 (FAIL) for a debugger. On TFLite-Micro's cortex_m_generic target
// MicroPrintf goes through DebugLog, which prints nothing until a callback is registered: build with
// -DFIRMWARE_LOG_CALLBACK=your_uart_puts (a C function taking const char*) to have main register it.
#include <cstdint>

#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "tensorflow/lite/schema/schema_generated.h"

#if defined(FIRMWARE_LOG_CALLBACK)
#include "tensorflow/lite/micro/cortex_m_generic/debug_log_callback.h"
extern "C" void FIRMWARE_LOG_CALLBACK(const char* s);
#endif

#include "model_data.h"
#include "model_settings.h"
#include "op_resolver.h"
#include "sample_data.h"

volatile int g_firmware_check_result = 0;

namespace {

alignas(16) uint8_t tensor_arena[MODEL_TENSOR_ARENA_SIZE];

int Fail(const char* what) {
  MicroPrintf("FAIL: %s", what);
  g_firmware_check_result = -1;
  return 1;
}

}  // namespace

int main() {
  tflite::InitializeTarget();
#if defined(FIRMWARE_LOG_CALLBACK)
  RegisterDebugLogCallback(FIRMWARE_LOG_CALLBACK);
#endif
  const tflite::Model* model = tflite::GetModel(g_model_data);
  if (model->version() != TFLITE_SCHEMA_VERSION) return Fail("the model's schema version is not this TFLite-Micro's");

  static ModelOpResolver resolver;
  if (RegisterModelOps(resolver) != kTfLiteOk) return Fail("an op of the model could not be registered");

  static tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, MODEL_TENSOR_ARENA_SIZE);
  if (interpreter.AllocateTensors() != kTfLiteOk) return Fail("AllocateTensors: the arena is too small");

  TfLiteTensor* input = interpreter.input(0);
  TfLiteTensor* output = interpreter.output(0);
  if (input == nullptr || output == nullptr || input->type != kTfLiteInt8 || output->type != kTfLiteInt8 ||
      input->bytes != MODEL_INPUT_SIZE || output->bytes != MODEL_OUTPUT_SIZE) {
    return Fail("the model's input or output is not the int8 tensor model_settings.h describes");
  }

  model_preprocess(g_sample_raw, input->data.int8);
  int input_differs = 0;
  for (int i = 0; i < MODEL_INPUT_SIZE; ++i) input_differs += input->data.int8[i] != g_sample_input_int8[i];
  MicroPrintf("preprocessing: %d of %d input values differ from the host's", input_differs, MODEL_INPUT_SIZE);

  if (interpreter.Invoke() != kTfLiteOk) return Fail("Invoke");

  int max_diff = 0, top1 = 0;
  for (int i = 0; i < MODEL_OUTPUT_SIZE; ++i) {
    const int d = output->data.int8[i] - g_sample_expected_output[i];
    if ((d < 0 ? -d : d) > max_diff) max_diff = d < 0 ? -d : d;
    if (output->data.int8[i] > output->data.int8[top1]) top1 = i;
  }
  MicroPrintf("output: max difference %d step(s) from the host's TFLite-Micro output (allowed %d); top-1 %d, "
              "label %d; arena used %d of %d bytes", max_diff, SAMPLE_TOLERANCE_STEPS, top1, g_sample_label,
              static_cast<int>(interpreter.arena_used_bytes()), MODEL_TENSOR_ARENA_SIZE);
  if (input_differs != 0) return Fail("the preprocessing differs from the host's");
  if (max_diff > SAMPLE_TOLERANCE_STEPS) return Fail("the output differs from the host's");
  MicroPrintf("PASS");
  g_firmware_check_result = 1;
  return 0;
}
"""


def _readme(ctx, target, core, ops, arena, flash, micro, names, sample_output, label) -> str:
    budget = (f"the {target.name} profile (targets/profiles.py)" if target.budget_source == "profile"
              else f"you: {target.budget_given_by}")
    ram = f"{target.ram_bytes:,} B" if target.ram_bytes else "no RAM budget"
    fl = f"{target.flash_bytes:,} B" if target.flash_bytes else "no flash budget"
    if flash.get("measured"):
        flash_text = (f"  - model section {flash['model_section']}: {flash['model_section_bytes']:,} B, measured by\n"
                      f"    compiling model_data.cc for {core.name} ({flash['toolchain']}):\n"
                      f"      {flash['commands'][0]}\n      {flash['commands'][1]}\n"
                      f"  - model_preprocess() and sample_data.h together: {flash['preprocess_and_sample_bytes']:,} B "
                      "(C99, -Os).")
    else:
        flash_text = (f"  - not measured: {flash['reason']}.\n"
                      f"  - the model array is {ctx['model_bytes']:,} B (the .tflite size).")
    cmsis = target.firmware_kernels == "cmsis-nn"
    kernels = "CMSIS-NN (OPTIMIZED_KERNEL_DIR=cmsis_nn)" if cmsis else "TFLite-Micro's reference kernels"
    make_opts = f"TARGET=cortex_m_generic TARGET_ARCH={core.tflm_target_arch}" + (
        " OPTIMIZED_KERNEL_DIR=cmsis_nn" if cmsis else "")
    return f"""Firmware package for {ctx['model_spec']} on {target.device} (target {target.name}),
made by python -m pipeline.export from {ctx['tflite']} ({ctx['model_bytes']:,} bytes, sha256 {ctx['sha256']}).

Files
  model_data.h, model_data.cc   the .tflite as a C array: g_model_data (16-byte aligned), g_model_data_len
  op_resolver.h                 RegisterModelOps(ModelOpResolver&): a tflite::MicroMutableOpResolver<{len(ops)}> with
                                exactly the model's {len(ops)} builtin ops ({', '.join(op for op, _ in ops)})
  model_settings.h              MODEL_TENSOR_ARENA_SIZE, input/output shapes, scales and zero points, class count,
                                the preprocessing constants and model_preprocess(raw, input): one raw image
                                (C x H x W as read, like the device bundle's samples.npz "raw") -> int8 input,
                                bit for bit as the host computes it. Plain C99; also valid C++.
  sample_data.h                 one test image (raw), its int8 input and the host's int8 output (label {label})
  main.cc                       runs that image: checks the preprocessing (identical) and the output (within
                                {CHECK_TOLERANCE_STEPS} step of the host's TFLite-Micro output), prints PASS or FAIL

Adding it to a TFLite-Micro project
  1. Get TFLite-Micro (https://github.com/tensorflow/tflite-micro) and build its library for this core with
     {kernels}:
       make -f tensorflow/lite/micro/tools/make/Makefile {make_opts} microlite
     or export a source tree into your project with
       python3 tensorflow/lite/micro/tools/project_generation/create_tflm_tree.py \\
            --makefile_options="{make_opts}" tflm_tree
  2. Add model_data.cc and main.cc (or your own code calling the same functions) to your sources, this folder
     and the TFLite-Micro tree (with its third_party folders) to the include path, and compile for the core:
       {' '.join(compile_flags(core))}    ({core.name}, {core.fpu})
     Do not compile model_settings.h with -ffast-math (it refuses): the preprocessing reproduces the host's
     float32 arithmetic.
  3. main.cc prints through MicroPrintf. With TARGET=cortex_m_generic, register your UART writer: build with
     -DFIRMWARE_LOG_CALLBACK=your_uart_puts, or read g_firmware_check_result in a debugger (1 PASS, -1 FAIL).
  CMSIS-NN: its conv, depthwise conv and fully-connected kernels ask for scratch buffers in the arena that the
  host's reference kernels do not; the arena margin below is for them. They may also round some outputs one
  step differently from the host, which is why main.cc allows {CHECK_TOLERANCE_STEPS} step.
  TFLite-Micro's headers are not part of this package: op_resolver.h and main.cc were checked against
  declaration stubs on the host, not compiled against TFLite-Micro itself.

RAM
  - MODEL_TENSOR_ARENA_SIZE = {arena['tensor_arena_size']:,} B: {arena['how']}.
  - budget: {ram} (given by {budget}); the micro stage's check: {micro.ram.reason}.
  - not included: the stack, the interpreter object and your application's RAM.

Flash
{flash_text}
  - budget: {fl} (given by {budget}); the micro stage's check: {micro.flash.reason}.
  - not included: TFLite-Micro, its kernels and your application (the flash_margin of {target.flash_margin:g}
    covers them).
"""
