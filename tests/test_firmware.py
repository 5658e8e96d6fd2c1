"""The microcontroller firmware package (pipeline/device/firmware.py), on one real export of zoo:refcnn to cortex-m4.

What is compiled and run here:
- model_data.cc with arm-none-eabi-g++ for Cortex-M4 and M7: the model section is the .tflite, byte for byte in
  size, 16-byte aligned, and the export's report records the same figure;
- model_settings.h and sample_data.h with arm-none-eabi-gcc (C99) and -g++ (C++11), warnings as errors;
- model_preprocess() with the host's gcc, on the bundle's raw samples and on every uint8 value at every pixel:
  bit-identical to the host's int8 input (samples.npz input_int8, and the host's own functions); also its
  Cortex-M4 build, run on an emulated Arm core (qemu-arm), and checked for fused multiply-adds;
- op_resolver.h and main.cc against declaration stubs of TFLite-Micro written here (the project does not ship
  TFLite-Micro's headers): N is the number of distinct ops, every op of the model gets its Add call, and main.cc
  prints PASS within one step of the host's output and FAIL beyond.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import outdir
from pipeline.device import firmware as fw
from pipeline.export import main
from pipeline.tflite.inspect import inspect

M4 = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]
M7 = ["-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is needed for the firmware tests: ./setup.sh installs it (apt-get install "
                    "gcc-arm-none-eabi qemu-user-static)")
    return path


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=300, **kw)
    assert r.returncode == 0, (cmd, r.stderr[-2000:] if isinstance(r.stderr, bytes) else r.stderr)
    return r


@pytest.fixture(scope="module")
def m4(tmp_path_factory):
    """One export of zoo:refcnn to cortex-m4 (small evaluation), shared by this module."""
    out = tmp_path_factory.mktemp("firmware") / "refcnn-m4"
    status = main(["--model", "zoo:refcnn", "--target", "cortex-m4", "--eval-limit", "200", "--micro-limit", "20",
                   "--calib-size", "100", "--out", str(out)])
    assert status == 0
    return SimpleNamespace(out=out, fw=out / "firmware", report=json.loads((out / "report.json").read_text()),
                           model=out / "model_int8.tflite", samples=np.load(out / "bundle" / "samples.npz"))


# --------------------------------------------------------------------------- the package and the report

def test_export_writes_the_package_and_records_it(m4):
    assert sorted(p.name for p in m4.fw.iterdir()) == sorted(outdir.FIRMWARE_FILES)
    assert outdir.foreign_entries(m4.out) == []  # --overwrite may replace this export as a whole
    with zipfile.ZipFile(m4.out / "firmware.zip") as z:
        assert sorted(z.namelist()) == sorted(f"firmware/{n}" for n in outdir.FIRMWARE_FILES)
        for n in outdir.FIRMWARE_FILES:
            assert z.read(f"firmware/{n}") == (m4.fw / n).read_bytes()
    r = m4.report
    f = r["firmware"]
    assert r["artifacts"]["firmware"]["zip_bytes"] == (m4.out / "firmware.zip").stat().st_size
    assert f["files"] == {n: (m4.fw / n).stat().st_size for n in outdir.FIRMWARE_FILES}
    assert "firmware" in r["timings_s"] and r["schema_version"] == "1.1"
    ops = inspect(m4.model).ops
    assert f["op_resolver"]["op_count"] == len(ops) and f["op_resolver"]["ops"] == sorted(ops)
    measured = r["device"]["tflite_micro"]["arena_bytes"]
    size = f["arena"]["tensor_arena_size"]
    assert f["arena"]["measured_bytes"] == measured and f["arena"]["margin"] == r["target"]["arena_margin"] == 0.25
    assert size % 16 == 0 and measured * 1.25 <= size < measured * 1.25 + 16
    settings = (m4.fw / "model_settings.h").read_text()
    assert f"#define MODEL_TENSOR_ARENA_SIZE {size}\n" in settings
    assert f"#define MODEL_ARENA_MEASURED_BYTES {measured}\n" in settings
    assert f["core"] == "cortex-m4" and f["gcc_flags"] == M4 and f["budget_source"] == "profile"
    # the expected output is TFLite-Micro's on the host, for the same first test image
    tflm = np.load(m4.out / "predictions.npz")["tflm_raw"][0].ravel()
    sample = (m4.fw / "sample_data.h").read_text()
    assert _c_array(sample, "g_sample_expected_output") == tflm.tolist()
    assert _c_array(sample, "g_sample_input_int8") == m4.samples["input_int8"][0].ravel().tolist()
    assert _c_array(sample, "g_sample_raw") == m4.samples["raw"][0].ravel().tolist()


def test_summary_html_and_bundle_readme_point_to_the_package(m4, capsys):
    html = (m4.out / "report.html").read_text()
    n_ops = len(m4.report["quantization"]["ops"])  # one resolver entry per op type of the model
    assert "id='firmware'" in html and f"MicroMutableOpResolver&lt;{n_ops}&gt;" in html
    assert f"{m4.report['firmware']['flash']['model_section_bytes']:,} B" in html
    from pipeline.report import Report
    from pipeline.report.summary import summary
    text = summary(Report.from_dict(m4.report), m4.out)
    assert "firmware/, firmware.zip)" in text and f"MicroMutableOpResolver<{n_ops}>" in text
    readme = (m4.out / "bundle" / "README.txt").read_text()
    assert "firmware package, firmware/ and firmware.zip" in readme and "On the device (Raspberry Pi OS" not in readme
    board = (m4.fw / "README.txt").read_text()
    assert "TARGET_ARCH=cortex-m4+fp OPTIMIZED_KERNEL_DIR=cmsis_nn" in board
    assert f"{m4.report['firmware']['arena']['tensor_arena_size']:,} B" in board
    assert "declaration" in board and "stubs" in board


def test_model_data_holds_the_tflite(m4):
    data = m4.model.read_bytes()
    cc = (m4.fw / "model_data.cc").read_text()
    assert "alignas(16) const unsigned char g_model_data[] = {" in cc
    assert bytes(int(v, 16) for v in re.findall(r"0x([0-9a-f]{2})", cc.split("{", 1)[1])) == data
    assert f"const unsigned int g_model_data_len = {len(data)};" in cc
    assert hashlib.sha256(data).hexdigest() in cc and f"{len(data):,} bytes" in cc
    assert "extern const unsigned char g_model_data[];" in (m4.fw / "model_data.h").read_text()


@pytest.mark.parametrize("flags", [M4, M7], ids=["cortex-m4", "cortex-m7"])
def test_model_data_compiles_for_the_core_and_its_flash_is_the_model(m4, flags, tmp_path):
    gxx, size, readelf = _tool("arm-none-eabi-g++"), _tool("arm-none-eabi-size"), _tool("arm-none-eabi-readelf")
    obj = tmp_path / "model_data.o"
    _run([gxx, *flags, "-std=c++11", "-Os", "-Wall", "-Wextra", "-Werror", "-fdata-sections", "-c",
          m4.fw / "model_data.cc", "-o", obj])
    sizes = dict(ln.split()[:2] for ln in _run([size, "-A", "-d", obj], text=True).stdout.splitlines()
                 if ln.startswith("."))
    assert int(sizes[".rodata.g_model_data"]) == m4.model.stat().st_size
    sec = next(ln for ln in _run([readelf, "-S", "-W", obj], text=True).stdout.splitlines()
               if ".rodata.g_model_data " in ln)
    assert sec.split()[-1] == "16"  # section alignment: the array is 16-byte aligned
    flash = m4.report["firmware"]["flash"]
    assert flash["measured"] is True and flash["model_section_bytes"] == m4.model.stat().st_size
    assert flash["commands"][0].startswith("arm-none-eabi-g++ " + " ".join(M4))
    assert flash["toolchain"].startswith("arm-none-eabi-g++")


@pytest.mark.parametrize("flags", [M4, M7], ids=["cortex-m4", "cortex-m7"])
def test_settings_and_sample_headers_compile_for_the_core_as_c_and_cpp(m4, flags, tmp_path):
    gcc, gxx = _tool("arm-none-eabi-gcc"), _tool("arm-none-eabi-g++")
    src = ('#include "model_settings.h"\n#include "sample_data.h"\n'
           "int check(int8_t* in) { model_preprocess(g_sample_raw, in); return in[0] + g_sample_label; }\n")
    (tmp_path / "check.c").write_text(src)
    (tmp_path / "check.cc").write_text(src)
    for tool, std, name in ((gcc, "-std=c99", "check.c"), (gxx, "-std=c++11", "check.cc")):
        _run([tool, *flags, std, "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{m4.fw}", "-c",
              tmp_path / name, "-o", tmp_path / (name + ".o")])


# --------------------------------------------------------------------------- the preprocessing, bit for bit

_HARNESS = r"""
#include "model_settings.h"
#ifdef FREESTANDING
/* No C library: Linux system calls (arm EABI: exit 1, read 3, write 4), so qemu-arm runs it. */
static long sys3(long nr, long a, long b, long c) {
  register long r7 __asm__("r7") = nr;
  register long r0 __asm__("r0") = a;
  register long r1 __asm__("r1") = b;
  register long r2 __asm__("r2") = c;
  __asm__ volatile("svc 0" : "+r"(r0) : "r"(r7), "r"(r1), "r"(r2) : "memory");
  return r0;
}
static long io(long nr, long fd, char* buf, long len) {
  long done = 0;
  while (done < len) {
    long r = sys3(nr, fd, (long)(buf + done), len - done);
    if (r <= 0) break;
    done += r;
  }
  return done;
}
void _start(void) {
  static model_raw_t raw[MODEL_RAW_SIZE];
  static int8_t input[MODEL_INPUT_SIZE];
  while (io(3, 0, (char*)raw, (long)sizeof raw) == (long)sizeof raw) {
    model_preprocess(raw, input);
    io(4, 1, (char*)input, (long)sizeof input);
  }
  sys3(1, 0, 0, 0);
  for (;;) {}
}
#else
#include <stdio.h>
int main(void) {
  static model_raw_t raw[MODEL_RAW_SIZE];
  static int8_t input[MODEL_INPUT_SIZE];
  while (fread(raw, sizeof raw[0], MODEL_RAW_SIZE, stdin) == MODEL_RAW_SIZE) {
    model_preprocess(raw, input);
    fwrite(input, 1, MODEL_INPUT_SIZE, stdout);
  }
  return 0;
}
#endif
"""


def _host_int8(raw: np.ndarray, pre: dict) -> np.ndarray:
    """What the host feeds the model: the preprocessing record's formula and the input quantization, with the
    host's own functions (those the run stage and the device bundle use)."""
    from pipeline.inputs.preprocessing import Preprocessing, apply
    from pipeline.runtime.litert import quantize
    p = Preprocessing.from_dict(pre)
    x = apply(raw, p)
    x = np.transpose(x, (0, 2, 3, 1)) if pre["tflite_input_layout"] == "NHWC" else x
    q = pre["input_quantization"]
    return quantize(x, q["scale"], q["zero_point"], np.int8)


def _every_uint8(c: int, h: int, w: int) -> np.ndarray:
    """256 images in which every pixel of every channel takes every value 0..255 once."""
    idx = np.arange(c * h * w)
    return np.stack([((idx + k) % 256).astype(np.uint8).reshape(c, h, w) for k in range(256)])


def _native(folder: Path, tmp: Path, raw: np.ndarray, flags=("-O2",)) -> np.ndarray:
    gcc = _tool("gcc")
    (tmp / "harness.c").write_text(_HARNESS)
    exe = tmp / "harness"
    _run([gcc, *flags, "-std=gnu99", "-Wall", "-Wextra", "-Werror", f"-I{folder}", tmp / "harness.c", "-o", exe])
    return np.frombuffer(_run([exe], input=np.ascontiguousarray(raw).tobytes()).stdout, np.int8)


def _fma_flags() -> list[tuple[str, ...]]:
    """-O0, -O2, and -O2 with fused multiply-add enabled when this CPU has it (GNU C contracts a*b-c into one
    rounding by default; model_preprocess must not let it)."""
    flags = [("-O0",), ("-O2",)]
    if " fma " in Path("/proc/cpuinfo").read_text():
        flags.append(("-O2", "-mfma"))
    return flags


def test_preprocess_is_bit_identical_to_the_host_on_the_bundled_samples(m4, tmp_path):
    raw, expected = m4.samples["raw"], m4.samples["input_int8"]
    assert raw.dtype == np.uint8 and len(raw) == 64
    for flags in _fma_flags():
        got = _native(m4.fw, tmp_path, raw, flags).reshape(expected.shape)
        np.testing.assert_array_equal(got, expected, err_msg=f"gcc {' '.join(flags)}")


def test_preprocess_is_bit_identical_for_every_uint8_value(m4, tmp_path):
    pre = m4.report["preprocessing"]
    raw = _every_uint8(*pre["input_shape"])
    expected = _host_int8(raw, pre)
    np.testing.assert_array_equal(_native(m4.fw, tmp_path, raw).reshape(expected.shape), expected)


# Synthetic deployment records for the branches refcnn does not take: (raw dtype, model input layout, scale, mean,
# std, input scale, zero point). The last one puts every other value exactly on a rounding tie (q = raw / 0.5 with
# raw on a 0.25 grid), where numpy rounds half to even.
SYNTHETIC = {
    "float-nchw": (np.float32, "NCHW", 0.5, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.0186584, -14),
    "uint8-nhwc-3ch": (np.uint8, "NHWC", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.0186584, -14),
    "float-nhwc": (np.float32, "NHWC", 1 / 255, (0.5, 0.25, 0.0), (0.5, 2.0, 1.0), 0.03, 7),
    "float-ties": (np.float32, "NHWC", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.5, 0),
}


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_preprocess_covers_float_images_nchw_channels_and_ties(case, tmp_path):
    dtype, layout, scale, mean, std, in_scale, zp = SYNTHETIC[case]
    rng = np.random.default_rng(0)
    pre = {"input_shape": [3, 5, 7], "source_layout": "NCHW", "source_dtype": np.dtype(dtype).name, "scale": scale,
           "mean": list(mean), "std": list(std), "raw_range": [0.0, 255.0], "tflite_input_layout": layout,
           "input_quantization": {"dtype": "int8", "scale": in_scale, "zero_point": zp}}
    if dtype == np.uint8:
        raw = _every_uint8(3, 5, 7)
    elif case == "float-ties":
        raw = (rng.integers(-300, 300, (64, 3, 5, 7)) * 0.25).astype(np.float32)
    else:
        raw = rng.uniform(-60.0, 300.0, (400, 3, 5, 7)).astype(np.float32)
    in_shape = (1, 5, 7, 3) if layout == "NHWC" else (1, 3, 5, 7)
    inp = SimpleNamespace(scale=(in_scale,), zero_point=(zp,), shape=in_shape)
    out = SimpleNamespace(scale=(0.1,), zero_point=(0,), shape=(1, 4))
    ctx = dict(model_spec="synthetic", target="t", device="d", tflite="m.tflite", model_bytes=1, sha256="0")
    folder = tmp_path / "fw"
    folder.mkdir()
    (folder / "model_settings.h").write_text(fw.model_settings_h(
        ctx, pre, inp, out, in_shape, 4, layout, raw[0], {"measured_bytes": 100, "tensor_arena_size": 128},
        SimpleNamespace(arena_margin=0.25), ["a \"quoted\" name?", "naïve", "c", "d"]))
    expected = _host_int8(raw, pre)
    if case == "float-ties":
        assert np.mean(np.abs(raw) * 4 % 2 == 1) > 0.3  # many exact ties: round half to even matters
    for flags in _fma_flags():
        got = _native(folder, tmp_path, raw, flags).reshape(expected.shape)
        np.testing.assert_array_equal(got, expected, err_msg=f"{case} gcc {' '.join(flags)}")


def test_preprocess_on_an_emulated_cortex_m4_is_bit_identical(m4, tmp_path):
    """model_preprocess() built for Cortex-M4 (hard float, GNU C) runs on qemu-arm over the bundled samples and every
    uint8 value: the same bytes as the host."""
    gcc, qemu = _tool("arm-none-eabi-gcc"), _tool("qemu-arm-static")
    (tmp_path / "harness.c").write_text(_HARNESS)
    elf = tmp_path / "harness.elf"
    _run([gcc, *M4, "-O2", "-std=gnu99", "-ffreestanding", "-nostdlib", "-static", "-DFREESTANDING",
          "-Wl,-e,_start", "-Wl,--no-warn-rwx-segments", f"-I{m4.fw}", tmp_path / "harness.c", "-lgcc", "-o", elf])
    pre = m4.report["preprocessing"]
    raw = np.concatenate([m4.samples["raw"], _every_uint8(*pre["input_shape"])])
    expected = np.concatenate([m4.samples["input_int8"], _host_int8(raw[64:], pre)])
    got = np.frombuffer(_run([qemu, elf], input=raw.tobytes()).stdout, np.int8)
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)


@pytest.mark.parametrize("flags", [M4, M7], ids=["cortex-m4", "cortex-m7"])
def test_preprocess_build_has_no_fused_multiply_add(m4, flags, tmp_path):
    """GNU C fuses raw * scale - mean into one VFMA (one rounding; the host rounds twice) unless the product is
    forced to float; the volatile in model_preprocess does that. Without it this test finds the VFMA."""
    gcc, objdump = _tool("arm-none-eabi-gcc"), _tool("arm-none-eabi-objdump")
    src = tmp_path / "pre.c"
    src.write_text('#include "model_settings.h"\n'
                   "void pre(const model_raw_t* raw, int8_t* in) { model_preprocess(raw, in); }\n")
    for folder, fused_expected in ((m4.fw, False), (tmp_path / "no_volatile", True)):
        if fused_expected:  # the same header without the volatile: proves the check can see a fused multiply-add
            folder.mkdir()
            text = (m4.fw / "model_settings.h").read_text()
            assert "volatile float scaled" in text
            (folder / "model_settings.h").write_text(text.replace("volatile float scaled", "float scaled"))
        obj = tmp_path / "pre.o"
        _run([gcc, *flags, "-O2", "-std=gnu99", f"-I{folder}", "-c", src, "-o", obj])
        asm = _run([objdump, "-d", obj], text=True).stdout
        assert bool(re.search(r"\bvfn?m[as]\b|\bvfn?m[as]\.f32", asm)) is fused_expected, asm[-1500:]


# --------------------------------------------------------------------------- op_resolver.h and main.cc on stubs

# Each MicroMutableOpResolver Add method and the BuiltinOperator it registers, transcribed from TFLite-Micro's
# tensorflow/lite/micro/micro_mutable_op_resolver.h (2025). The stub below declares these and nothing else, so a
# wrong method name in the firmware's table does not compile.
TFLM_ADD_METHODS = """
AddAbs ABS AddAdd ADD AddAddN ADD_N AddArgMax ARG_MAX AddArgMin ARG_MIN AddAssignVariable ASSIGN_VARIABLE
AddAveragePool2D AVERAGE_POOL_2D AddBatchMatMul BATCH_MATMUL AddBatchToSpaceNd BATCH_TO_SPACE_ND
AddBroadcastArgs BROADCAST_ARGS AddBroadcastTo BROADCAST_TO AddCallOnce CALL_ONCE AddCast CAST AddCeil CEIL
AddConcatenation CONCATENATION AddConv2D CONV_2D AddCos COS AddCumSum CUMSUM AddDepthToSpace DEPTH_TO_SPACE
AddDepthwiseConv2D DEPTHWISE_CONV_2D AddDequantize DEQUANTIZE AddDiv DIV AddEmbeddingLookup EMBEDDING_LOOKUP
AddElu ELU AddEqual EQUAL AddExp EXP AddExpandDims EXPAND_DIMS AddFill FILL AddFloor FLOOR AddFloorDiv FLOOR_DIV
AddFloorMod FLOOR_MOD AddFullyConnected FULLY_CONNECTED AddGather GATHER AddGatherNd GATHER_ND AddGreater GREATER
AddGreaterEqual GREATER_EQUAL AddHardSwish HARD_SWISH AddIf IF AddL2Normalization L2_NORMALIZATION
AddL2Pool2D L2_POOL_2D AddLeakyRelu LEAKY_RELU AddLess LESS AddLessEqual LESS_EQUAL AddLog LOG
AddLogicalAnd LOGICAL_AND AddLogicalNot LOGICAL_NOT AddLogicalOr LOGICAL_OR AddLogistic LOGISTIC
AddLogSoftmax LOG_SOFTMAX AddMaximum MAXIMUM AddMaxPool2D MAX_POOL_2D AddMirrorPad MIRROR_PAD AddMean MEAN
AddMinimum MINIMUM AddMul MUL AddNeg NEG AddNotEqual NOT_EQUAL AddPack PACK AddPad PAD AddPadV2 PADV2
AddPrelu PRELU AddQuantize QUANTIZE AddReadVariable READ_VARIABLE AddReduceMax REDUCE_MAX AddReduceMin REDUCE_MIN
AddRelu RELU AddRelu6 RELU6 AddReshape RESHAPE AddResizeBilinear RESIZE_BILINEAR
AddResizeNearestNeighbor RESIZE_NEAREST_NEIGHBOR AddReverseV2 REVERSE_V2 AddRound ROUND AddRsqrt RSQRT
AddSelectV2 SELECT_V2 AddShape SHAPE AddSin SIN AddSlice SLICE AddSoftmax SOFTMAX AddSpaceToBatchNd SPACE_TO_BATCH_ND
AddSpaceToDepth SPACE_TO_DEPTH AddSplit SPLIT AddSplitV SPLIT_V AddSqueeze SQUEEZE AddSqrt SQRT AddSquare SQUARE
AddSquaredDifference SQUARED_DIFFERENCE AddStridedSlice STRIDED_SLICE AddSub SUB AddSum SUM AddSvdf SVDF
AddTanh TANH AddTransposeConv TRANSPOSE_CONV AddTranspose TRANSPOSE AddUnpack UNPACK
AddUnidirectionalSequenceLSTM UNIDIRECTIONAL_SEQUENCE_LSTM AddVarHandle VAR_HANDLE AddWhile WHILE
AddZerosLike ZEROS_LIKE
"""

_COMMON_H = r"""
#pragma once
#include <cstddef>
#include <cstdint>
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
typedef enum { kTfLiteNoType = 0, kTfLiteFloat32 = 1, kTfLiteInt32 = 2, kTfLiteUInt8 = 3, kTfLiteInt8 = 9 } TfLiteType;
typedef union { int8_t* int8; uint8_t* uint8; float* f; void* data; } TfLitePtrUnion;
typedef struct { TfLiteType type; TfLitePtrUnion data; size_t bytes; } TfLiteTensor;
"""


def _resolver_stub() -> str:
    pairs = TFLM_ADD_METHODS.split()
    methods = "\n".join(f'  TfLiteStatus {m}() {{ return AddBuiltin("{op}"); }}' for m, op in zip(pairs[::2], pairs[1::2]))
    return f"""
#pragma once
#include <cstring>
#include "tensorflow/lite/c/common.h"
namespace tflite {{
class MicroOpResolver {{}};
// Like TFLite-Micro's: an op added twice or beyond tOpCount is kTfLiteError.
template <unsigned int tOpCount>
class MicroMutableOpResolver : public MicroOpResolver {{
 public:
{methods}
  unsigned int registered = 0;
  const char* names[tOpCount];
 private:
  TfLiteStatus AddBuiltin(const char* op) {{
    for (unsigned int i = 0; i < registered; ++i)
      if (std::strcmp(names[i], op) == 0) return kTfLiteError;
    if (registered >= tOpCount) return kTfLiteError;
    names[registered++] = op;
    return kTfLiteOk;
  }}
}};
}}  // namespace tflite
"""


_INTERPRETER_STUBS = {
    "tensorflow/lite/schema/schema_generated.h": r"""
#pragma once
namespace tflite {
struct Model { int version() const; };
const Model* GetModel(const void* buf);
}  // namespace tflite
""",
    "tensorflow/lite/micro/micro_interpreter.h": r"""
#pragma once
#include <cstddef>
#include <cstdint>
#include "tensorflow/lite/c/common.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/schema/schema_generated.h"
#define TFLITE_SCHEMA_VERSION (3)
namespace tflite {
class MicroResourceVariables;
class MicroProfilerInterface;
class MicroInterpreter {
 public:
  MicroInterpreter(const Model* model, const MicroOpResolver& op_resolver, uint8_t* tensor_arena,
                   size_t tensor_arena_size, MicroResourceVariables* resource_variables = nullptr,
                   MicroProfilerInterface* profiler = nullptr, bool preserve_all_tensors = false);
  TfLiteStatus AllocateTensors();
  TfLiteStatus Invoke();
  TfLiteTensor* input(size_t index);
  TfLiteTensor* output(size_t index);
  size_t arena_used_bytes() const;
 private:
  size_t arena_size_;
};
}  // namespace tflite
""",
    "tensorflow/lite/micro/micro_log.h": "#pragma once\nvoid MicroPrintf(const char* format, ...);\n",
    "tensorflow/lite/micro/system_setup.h": "#pragma once\nnamespace tflite {\nvoid InitializeTarget();\n}\n",
}

# A fake interpreter: its output is the host's expected output shifted by FAKE_SHIFT steps; AllocateTensors fails
# when the arena is smaller than the measured one (or FAKE_ALLOC_FAIL is set).
_FAKE_IMPL = r"""
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "model_settings.h"
#include "sample_data.h"
namespace {
int8_t in_buf[MODEL_INPUT_SIZE];
int8_t out_buf[MODEL_OUTPUT_SIZE];
TfLiteTensor in_t, out_t;
tflite::Model the_model;
int env(const char* name) { const char* v = std::getenv(name); return v ? std::atoi(v) : 0; }
}  // namespace
void MicroPrintf(const char* format, ...) {
  va_list args; va_start(args, format); std::vprintf(format, args); va_end(args); std::printf("\n");
}
namespace tflite {
void InitializeTarget() {}
int Model::version() const { return 3; }
const Model* GetModel(const void* buf) { return buf ? &the_model : nullptr; }
MicroInterpreter::MicroInterpreter(const Model*, const MicroOpResolver&, uint8_t*, size_t tensor_arena_size,
                                   MicroResourceVariables*, MicroProfilerInterface*, bool)
    : arena_size_(tensor_arena_size) {}
TfLiteStatus MicroInterpreter::AllocateTensors() {
  if (env("FAKE_ALLOC_FAIL") || arena_size_ < MODEL_ARENA_MEASURED_BYTES) return kTfLiteError;
  in_t.type = kTfLiteInt8; in_t.data.int8 = in_buf; in_t.bytes = sizeof in_buf;
  out_t.type = kTfLiteInt8; out_t.data.int8 = out_buf; out_t.bytes = sizeof out_buf;
  return kTfLiteOk;
}
TfLiteStatus MicroInterpreter::Invoke() {
  for (int i = 0; i < MODEL_OUTPUT_SIZE; ++i) {
    int v = g_sample_expected_output[i] + (i == 0 ? env("FAKE_SHIFT") : 0);
    out_buf[i] = static_cast<int8_t>(v < -128 ? -128 : (v > 127 ? 127 : v));
  }
  return kTfLiteOk;
}
TfLiteTensor* MicroInterpreter::input(size_t) { return &in_t; }
TfLiteTensor* MicroInterpreter::output(size_t) { return &out_t; }
size_t MicroInterpreter::arena_used_bytes() const { return MODEL_ARENA_MEASURED_BYTES; }
}  // namespace tflite
"""


def _stubs(root: Path, with_interpreter: bool = False) -> Path:
    files = {"tensorflow/lite/c/common.h": _COMMON_H,
             "tensorflow/lite/micro/micro_mutable_op_resolver.h": _resolver_stub()}
    if with_interpreter:
        files.update(_INTERPRETER_STUBS)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


_RESOLVER_MAIN = r"""
#include <cstdio>
#include "op_resolver.h"
int main() {
  static ModelOpResolver resolver;
  const TfLiteStatus status = RegisterModelOps(resolver);
  std::printf("%u %d\n", kModelOpCount, static_cast<int>(status));
  for (unsigned int i = 0; i < resolver.registered; ++i) std::printf("%s\n", resolver.names[i]);
  return 0;
}
"""


def _registered(folder: Path, tmp: Path) -> tuple[int, int, list[str]]:
    gxx = _tool("g++")
    stubs = _stubs(tmp / "stubs")
    (tmp / "resolver_main.cc").write_text(_RESOLVER_MAIN)
    exe = tmp / "resolver_main"
    _run([gxx, "-std=c++11", "-Wall", "-Wextra", "-Werror", f"-I{stubs}", f"-I{folder}", tmp / "resolver_main.cc",
          "-o", exe])
    first, *names = _run([exe], text=True).stdout.split("\n")
    n, status = (int(v) for v in first.split())
    return n, status, [v for v in names if v]


def test_op_resolver_registers_exactly_the_models_ops(m4, tmp_path):
    ops = inspect(m4.model).ops
    n, status, names = _registered(m4.fw, tmp_path)
    assert status == 0 and n == len(ops) == len(names)
    assert sorted(names) == sorted(ops)  # every op of the model, each once


def test_every_resolver_method_in_the_table_exists_in_tflite_micro(tmp_path):
    """The whole table (not just refcnn's ops) against the transcribed TFLite-Micro API."""
    ops = list(fw.RESOLVER_METHODS)
    folder = tmp_path / "all"
    folder.mkdir()
    ctx = dict(model_spec="all ops", target="t", device="d", tflite="m.tflite", model_bytes=1, sha256="0")
    (folder / "op_resolver.h").write_text(fw.op_resolver_h(ctx, fw.resolver_methods(ops), {o: 1 for o in ops}))
    n, status, names = _registered(folder, tmp_path)
    assert status == 0 and n == len(ops) and sorted(names) == sorted(ops)


def test_an_op_without_a_tflite_micro_method_is_one_line():
    from pipeline.runtime.micro import MicroUnsupportedError
    with pytest.raises(MicroUnsupportedError) as e:
        fw.resolver_methods(["CONV_2D", "GELU", "CONV_2D"])
    assert "GELU" in str(e.value) and "\n" not in str(e.value) and e.value.exit_status == 1


def _main_exe(m4, tmp: Path) -> Path:
    gxx = _tool("g++")
    stubs = _stubs(tmp / "stubs", with_interpreter=True)
    (tmp / "fake_tflm.cc").write_text(_FAKE_IMPL)
    exe = tmp / "firmware_main"
    _run([gxx, "-std=c++11", "-Wall", "-Wextra", "-Werror", f"-I{stubs}", f"-I{m4.fw}", m4.fw / "main.cc",
          m4.fw / "model_data.cc", tmp / "fake_tflm.cc", "-o", exe])
    return exe


def test_main_passes_within_one_step_and_fails_beyond(m4, tmp_path):
    exe = _main_exe(m4, tmp_path)

    def run(**env):
        r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        return r.returncode, r.stdout

    for shift in ("0", "1", "-1"):
        status, text = run(FAKE_SHIFT=shift)
        assert status == 0 and text.rstrip().endswith("PASS"), text
        assert "preprocessing: 0 of 784 input values differ" in text
    status, text = run(FAKE_SHIFT="2")
    assert status == 1 and "FAIL: the output differs" in text and "max difference 2 step(s)" in text
    status, text = run(FAKE_ALLOC_FAIL="1")
    assert status == 1 and "FAIL: AllocateTensors" in text


def test_main_and_resolver_compile_for_the_core_against_the_stubs(m4, tmp_path):
    gxx = _tool("arm-none-eabi-g++")
    stubs = _stubs(tmp_path / "stubs", with_interpreter=True)
    _run([gxx, *M4, "-std=c++11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", f"-I{stubs}", f"-I{m4.fw}",
          m4.fw / "main.cc"])


# --------------------------------------------------------------------------- helpers and small units

def test_arena_size_adds_the_margin_and_rounds_to_16():
    assert fw.tensor_arena_size(55_808, 0.25) == 69_760
    assert fw.tensor_arena_size(1000, 0.25) == 1264  # 1250 -> 1264
    assert fw.tensor_arena_size(1000, 0.0) == 1008
    assert fw.tensor_arena_size(1024, 0.0) == 1024


def test_float_constants_are_exact_in_c(tmp_path):
    """Every literal c_float writes converts, in C, to exactly the float32 numpy holds."""
    rng = np.random.default_rng(1)
    values = [1 / 255, 0.286, 0.353, 0.0111092599, 1e-10, 3e9, -0.5, 1.0, 0.0, 123456.7,
              *rng.standard_normal(200) * 10.0 ** rng.integers(-6, 6, 200)]
    body = "\n".join(f'  std::printf("%08x\\n", bits({fw.c_float(v)}));' for v in values)
    (tmp_path / "f.cc").write_text("#include <cstdio>\n#include <cstring>\n#include <stdint.h>\n"
                                   "static uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }\n"
                                   f"int main() {{\n{body}\n}}\n")
    _run([_tool("g++"), "-std=c++98", "-Wall", "-Werror", "-pedantic", tmp_path / "f.cc", "-o", tmp_path / "f"])
    got = [int(v, 16) for v in _run([tmp_path / "f"], text=True).stdout.split()]
    assert got == [int(np.float32(v).view(np.uint32)) for v in values]


def test_flash_without_a_working_toolchain_is_not_measured_and_says_why(m4, monkeypatch):
    from pipeline.targets import CORES
    monkeypatch.setattr(fw, "toolchain", lambda: None)
    r = fw.measure_flash(m4.fw, CORES["cortex-m4"])
    assert r["measured"] is False and "gcc-arm-none-eabi" in r["reason"] and "compile_failed" not in r
    false = shutil.which("false")
    monkeypatch.setattr(fw, "toolchain", lambda: {"g++": false, "gcc": false, "size": false})
    r = fw.measure_flash(m4.fw, CORES["cortex-m4"])
    assert r["measured"] is False and r["compile_failed"] is True and "false exited 1" in r["reason"]


def test_export_writes_lists_the_firmware_files():
    for name in outdir.FIRMWARE_FILES:
        assert outdir.export_writes(PurePosixPath("firmware") / name, is_dir=False)
    assert outdir.export_writes(PurePosixPath("firmware"), is_dir=True)
    assert outdir.export_writes(PurePosixPath("firmware.zip"), is_dir=False)
    assert not outdir.export_writes(PurePosixPath("firmware/my_notes.txt"), is_dir=False)
    assert not outdir.export_writes(PurePosixPath("firmware/sub"), is_dir=True)


def test_litert_targets_write_no_firmware(tiny_export):
    status, out = tiny_export
    assert status == 0 and not (out / "firmware").exists() and not (out / "firmware.zip").exists()
    r = json.loads((out / "report.json").read_text())
    assert "firmware" not in r and "firmware" not in r["artifacts"] and "firmware" in r["timings_s"]


def _c_array(text: str, name: str) -> list[int]:
    body = re.search(rf"{name}\[[A-Z_]+\][^=]*= \{{(.*?)\}};", text, re.S).group(1)
    return [int(v) for v in re.findall(r"-?\d+", body)]
