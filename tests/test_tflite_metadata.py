"""The deployment record embedded in a .tflite as model metadata (pipeline/tflite/metadata.py).

Subjects: the committed golden models (real fully-int8 conversions of zoo models, with their golden inputs)
and one tiny seeded CNN converted here once per module, as an export would.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import flatbuffers
import numpy as np
import pytest

from pipeline.conversion import get_converter
from pipeline.inputs import preprocessing
from pipeline.tflite import metadata as tm
from pipeline.errors import ModelError, PipelineError

GOLDEN = Path(__file__).resolve().parent / "golden"
NAME = "deployment"
RECORD = {"preprocessing": {"input_shape": [1, 28, 28], "source_layout": "NHW", "source_dtype": "uint8",
                            "scale": 1 / 255, "mean": [0.2860], "std": [0.3530], "raw_range": [0, 255],
                            "layout": "NCHW"},
          "input": {"dtype": "int8", "layout": "NHWC", "scale": 0.0215, "zero_point": -14},
          "format": 1, "note": "Fashion-MNIST \u00e9"}
# ghostnet is left out: its RELU_0_TO_1 has no TFLite-Micro kernel.
TFLM_GOLDEN = ["refcnn", "mobileone", "mobilenetv2", "resnet8", "shufflenetv2"]


def schema():
    from ai_edge_litert import schema_py_generated
    return schema_py_generated


# the two metadata entries TFLiteConverter writes into every model (the onnx2tf route's); the direct route writes
# none: the golden model gets exactly these here, so the tests embed a record beside entries of another tool's
CONVERTER_ENTRIES = [("min_runtime_version", b"1.14.0" + b"\0" * 10),
                     ("CONVERSION_METADATA", bytes(range(8)) * 4)]


def golden(name: str) -> tuple[bytes, np.ndarray]:
    """A zoo golden model whose metadata is TFLiteConverter's two entries (CONVERTER_ENTRIES), whichever route
    wrote it and whatever record the export embedded."""
    model = (GOLDEN / name / "model.tflite").read_bytes()
    m = schema().ModelT.InitFromPackedBuf(model, 0)
    if [e.name.decode() if isinstance(e.name, bytes) else e.name for e in (m.metadata or [])] != \
            [n for n, _ in CONVERTER_ENTRIES]:
        model = with_metadata(model, CONVERTER_ENTRIES, keep=False)
    return model, np.load(GOLDEN / name / "inputs.npy")


def pack(model) -> bytes:
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def with_metadata(tflite: bytes, entries: list[tuple[str, bytes]], keep: bool = True) -> bytes:
    """A copy of ``tflite`` with raw metadata entries added (plain generated packer, no checks)."""
    s = schema()
    m = s.ModelT.InitFromPackedBuf(tflite, 0)
    m.metadata = list(m.metadata or []) if keep else []
    for name, raw in entries:
        b = s.BufferT()
        b.data = np.frombuffer(raw, np.uint8)
        m.buffers.append(b)
        e = s.MetadataT()
        e.name, e.buffer = name, len(m.buffers) - 1
        m.metadata.append(e)
    return pack(m)


def metadata_data_pos(tflite: bytes, name: str) -> int:
    """Byte position of the length prefix of metadata ``name``'s data vector."""
    m = schema().Model.GetRootAs(tflite, 0)
    idx = next(m.Metadata(i).Buffer() for i in range(m.MetadataLength()) if m.Metadata(i).Name() == name.encode())
    buf = m.Buffers(idx)
    return buf._tab.Vector(buf._tab.Offset(4)) - 4


def quantize_nhwc(x_nchw: np.ndarray, detail: dict) -> np.ndarray:
    scale, zp = detail["quantization"] if "quantization" in detail else (
        detail["quantization_parameters"]["scales"][0], detail["quantization_parameters"]["zero_points"][0])
    x = np.transpose(x_nchw, (0, 2, 3, 1))
    return np.clip(np.round(x / np.float32(scale)) + zp, -128, 127).astype(np.int8)


def litert_raw(tflite: bytes, x_nchw: np.ndarray, kernels: str, folder: Path) -> np.ndarray:
    """Raw int8 outputs of LiteRT on the model file, one batch (the models have a dynamic batch) or one at a time."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = {"xnnpack": OpResolverType.BUILTIN, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    path = folder / f"run_{kernels}_{abs(hash(tflite))}.tflite"
    path.write_bytes(tflite)
    it = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=resolver[kernels])
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    xs = [x_nchw] if int(inp["shape_signature"][0]) == -1 else [x_nchw[i:i + 1] for i in range(len(x_nchw))]
    outs = []
    for x in xs:
        if int(inp["shape_signature"][0]) == -1:
            it.resize_tensor_input(inp["index"], [len(x), *inp["shape"][1:]], strict=True)
        it.allocate_tensors()
        it.set_tensor(inp["index"], quantize_nhwc(x, inp))
        it.invoke()
        outs.append(it.get_tensor(out["index"]).copy())
    return np.concatenate(outs)


def tflm_raw(tflite: bytes, x_nchw: np.ndarray) -> np.ndarray:
    pytest.importorskip("tflite_micro", reason="tflite-micro ships x86_64 Linux wheels only")
    from tflite_micro import runtime
    it = runtime.Interpreter.from_bytes(tflite, arena_size=4 << 20)
    d = it.get_input_details(0)
    outs = []
    for i in range(len(x_nchw)):
        it.set_input(quantize_nhwc(x_nchw[i:i + 1], d), 0)
        it.invoke()
        outs.append(np.array(it.get_output(0), copy=True))
    return np.concatenate(outs)


def same_tree(a, b, where="model"):
    """Field-by-field equality of two object-API trees (numpy vectors compared element-wise)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert np.array_equal(np.asarray(a), np.asarray(b)), where
    elif isinstance(a, list) or isinstance(b, list):
        assert isinstance(a, list) and isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):
        assert hasattr(b, "__dict__") and vars(a).keys() == vars(b).keys(), where
        for k in vars(a):
            same_tree(getattr(a, k), getattr(b, k), f"{where}.{k}")
    else:
        assert a == b, (where, a, b)


def one_line_error(fn, match: str):
    with pytest.raises(tm.MetadataError, match=match) as e:
        fn()
    assert "\n" not in str(e.value) and isinstance(e.value, ModelError) and e.value.exit_status == 2
    return str(e.value)


# ---------------------------------------------------------------------------------------------- round trip
def test_read_returns_the_record_stored_canonically():
    model, _ = golden("refcnn")
    out = tm.embed(model, NAME, RECORD)
    assert tm.read(out, NAME) == RECORD
    assert tm.read_bytes(out, NAME) == json.dumps(RECORD, sort_keys=True, separators=(",", ":"),
                                                  ensure_ascii=False).encode("utf-8")
    assert tm.names(out) == ["min_runtime_version", "CONVERSION_METADATA", NAME]
    for other in ("min_runtime_version", "CONVERSION_METADATA"):  # existing entries: same bytes
        assert tm.read_bytes(out, other) == tm.read_bytes(model, other)
    assert tm.read(out, "absent") is None
    # Measured overhead: the record plus a Buffer, a Metadata entry and 16-byte alignment of the buffers.
    assert 0 < len(out) - len(model) <= len(tm.read_bytes(out, NAME)) + 1024, len(out) - len(model)


def test_everything_but_the_new_entry_is_unchanged():
    s = schema()
    model, _ = golden("mobileone")
    out = tm.embed(model, NAME, RECORD)
    a, b = s.ModelT.InitFromPackedBuf(model, 0), s.ModelT.InitFromPackedBuf(out, 0)
    assert a.signatureDefs and a.metadata
    for field in ("version", "operatorCodes", "subgraphs", "description", "metadataBuffer", "signatureDefs",
                  "externalBufferGroups", "externalBuffers"):
        same_tree(getattr(a, field), getattr(b, field), field)
    n = len(a.buffers)
    same_tree(a.buffers, b.buffers[:n], "buffers")
    same_tree(a.metadata, b.metadata[:len(a.metadata)], "metadata")
    assert len(b.buffers) == n + 1 and len(b.metadata) == len(a.metadata) + 1
    assert b.metadata[-1].name == NAME.encode() and b.metadata[-1].buffer == n


def test_buffer_data_is_16_byte_aligned():
    model, _ = golden("refcnn")
    out = tm.embed(model, NAME, RECORD)
    m = schema().Model.GetRootAs(out, 0)
    starts = [m.Buffers(i)._tab.Vector(m.Buffers(i)._tab.Offset(4)) for i in range(m.BuffersLength())
              if m.Buffers(i)._tab.Offset(4)]
    assert len(starts) > 10 and all(p % 16 == 0 for p in starts)


@pytest.mark.parametrize("kernels", ["builtin", "xnnpack"])
@pytest.mark.parametrize("zoo", ["refcnn", "mobileone", "ghostnet", "mobilenetv2", "resnet8", "shufflenetv2"])
def test_litert_outputs_are_bit_identical(zoo, kernels, tmp_path):
    model, x = golden(zoo)
    out = tm.embed(model, NAME, RECORD)
    before, after = litert_raw(model, x, kernels, tmp_path), litert_raw(out, x, kernels, tmp_path)
    assert before.dtype == np.int8 and before.shape == (len(x), 10)
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("zoo", TFLM_GOLDEN)
def test_tflite_micro_runs_it_bit_identically(zoo):
    model, x = golden(zoo)
    out = tm.embed(model, NAME, RECORD)
    before = tflm_raw(model, x[:8])
    np.testing.assert_array_equal(before, tflm_raw(out, x[:8]))


# ---------------------------------------------------------------------------------------- a fresh export
PRE = preprocessing.Preprocessing(input_shape=(1, 8, 8), source_layout="NHW", source_dtype="uint8",
                                  scale=1 / 255, mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A tiny seeded CNN exported to ONNX and converted to fully-int8 TFLite, as the export does (once)."""
    import torch
    import torch.nn as nn
    from pipeline.conversion import onnx2tf_tflite as convert
    from pipeline.inputs import models
    from pipeline.conversion.onnx_export import export_onnx
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 10)).eval()
    d = tmp_path_factory.mktemp("tflite_metadata")
    raw = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8)).astype(np.uint8)
    x = preprocessing.apply(raw, PRE)
    lm = models.LoadedModel(spec="tiny", kind="factory", module=net, input_shape=(1, 8, 8))
    art = get_converter("onnx2tf").convert(export_onnx(lm, x[:8], d / "m.onnx"), x[:32], PRE,
                                                  per_channel=True, out_path=d / "m.tflite")
    return art.path.read_bytes(), x


def test_a_fresh_conversion_carries_its_deployment_record(fresh, tmp_path):
    from ai_edge_litert.interpreter import Interpreter
    model, x = fresh
    inp = Interpreter(model_content=model).get_input_details()[0]
    scale, zp = inp["quantization"]
    record = {"preprocessing": PRE.to_dict(),
              "input": {"dtype": "int8", "layout": "NHWC", "scale": float(scale), "zero_point": int(zp)}}
    path = tmp_path / "model.tflite"
    path.write_bytes(model)
    assert tm.embed_file(path, NAME, record) == path
    out = path.read_bytes()
    back = tm.read(path, NAME)
    assert back == json.loads(json.dumps(record))
    assert preprocessing.from_record(back["preprocessing"], "metadata", "fix") == PRE
    assert back["input"]["scale"] == float(np.float32(scale))  # the float32 scale survives JSON exactly
    for kernels in ("builtin", "xnnpack"):
        np.testing.assert_array_equal(litert_raw(model, x, kernels, tmp_path), litert_raw(out, x, kernels, tmp_path))
    np.testing.assert_array_equal(tflm_raw(model, x[:16]), tflm_raw(out, x[:16]))


# --------------------------------------------------------------------------------------- replace / absent
def test_replacing_keeps_one_entry_and_reuses_its_buffer():
    model, _ = golden("refcnn")
    once = tm.embed(model, NAME, RECORD)
    twice = tm.embed(once, NAME, {"format": 2})
    assert tm.names(twice) == ["min_runtime_version", "CONVERSION_METADATA", NAME]
    assert tm.read(twice, NAME) == {"format": 2}
    s = schema()
    assert len(s.ModelT.InitFromPackedBuf(twice, 0).buffers) == len(s.ModelT.InitFromPackedBuf(once, 0).buffers)
    assert len(twice) < len(once)  # the old record is gone, not left behind
    assert tm.embed(tm.embed(twice, NAME, RECORD), NAME, RECORD) == tm.embed(twice, NAME, RECORD)  # stable
    # Duplicated names (another tool's doing) are refused on read and collapse to one entry on embed.
    dup = with_metadata(model, [(NAME, b'{"a":1}'), (NAME, b'{"a":2}')])
    one_line_error(lambda: tm.read(dup, NAME), "holds 2 metadata entries named 'deployment'")
    fixed = tm.embed(dup, NAME, {"a": 3})
    assert tm.names(fixed).count(NAME) == 1 and tm.read(fixed, NAME) == {"a": 3}


def test_a_model_without_metadata_reads_none_and_takes_a_record(tmp_path):
    model, x = golden("resnet8")
    s = schema()
    m = s.ModelT.InitFromPackedBuf(model, 0)
    m.metadata = None
    bare = pack(m)
    assert tm.names(bare) == [] and tm.read(bare, NAME) is None
    (tmp_path / "bare.tflite").write_bytes(bare)
    assert tm.read(tmp_path / "bare.tflite", NAME) is None
    out = tm.embed(bare, NAME, RECORD)
    assert tm.names(out) == [NAME] and tm.read(out, NAME) == RECORD
    np.testing.assert_array_equal(litert_raw(bare, x, "builtin", tmp_path), litert_raw(out, x, "builtin", tmp_path))


# ------------------------------------------------------------------------------------ the >2 GB layout
def external_layout(model: bytes) -> tuple[bytes, int]:
    """The model with its largest weight buffer stored past the flatbuffer (Buffer.offset/size), the layout the
    converter uses above 2 GB; returns it and the offset of the moved data."""
    s = schema()
    m = s.ModelT.InitFromPackedBuf(model, 0)
    big = max(range(len(m.buffers)), key=lambda i: 0 if m.buffers[i].data is None else len(m.buffers[i].data))
    data = m.buffers[big].data.tobytes()
    m.buffers[big].data, m.buffers[big].offset, m.buffers[big].size = None, 1 << 40, len(data)
    size = len(pack(m))
    at = -(-size // 16) * 16 + 16
    m.buffers[big].offset = at
    fb = pack(m)
    assert len(fb) == size
    return fb + bytes(at - len(fb)) + data, at


def test_data_stored_past_the_flatbuffer_is_kept_and_moved(tmp_path):
    model, x = golden("refcnn")
    ext, at = external_layout(model)
    reference = litert_raw(model, x, "builtin", tmp_path)
    np.testing.assert_array_equal(litert_raw(ext, x, "builtin", tmp_path), reference)
    # LiteRT really reads the moved data: zeroing it changes the outputs.
    zeroed = ext[:at] + bytes(len(ext) - at)
    assert not np.array_equal(litert_raw(zeroed, x, "builtin", tmp_path), reference)
    out = tm.embed(ext, NAME, RECORD)
    assert tm.read(out, NAME) == RECORD
    m = schema().ModelT.InitFromPackedBuf(out, 0)
    moved = [b for b in m.buffers if b.offset > 1]
    assert len(moved) == 1 and moved[0].offset % 16 == 0 and moved[0].offset + moved[0].size == len(out)
    assert out[moved[0].offset:] == ext[at:]
    for kernels in ("builtin", "xnnpack"):  # each kernel set against itself (they may differ by a step)
        np.testing.assert_array_equal(litert_raw(out, x, kernels, tmp_path), litert_raw(model, x, kernels, tmp_path))
    # An offset past the end of the file is refused, not followed.
    bad = ext[:-100]
    one_line_error(lambda: tm.embed(bad, NAME, RECORD), r"buffer \d+ data stored past the flatbuffer .* lies outside")
    one_line_error(lambda: tm.read(bad, NAME), r"buffer \d+ data stored past the flatbuffer .* lies outside")


# -------------------------------------------------------------------------------------------- hostile
def test_not_a_model_and_truncated_files_are_one_line_errors(tmp_path):
    model, _ = golden("refcnn")
    out = tm.embed(model, NAME, RECORD)
    one_line_error(lambda: tm.read(b"\x00" * 64, NAME), "file identifier")
    one_line_error(lambda: tm.read(b"TF", NAME), "shorter than a flatbuffer header")
    one_line_error(lambda: tm.names(out[:len(out) // 2]), "outside the|past the end")
    one_line_error(lambda: tm.read(tmp_path / "missing.tflite", NAME), "cannot read")
    one_line_error(lambda: tm.read(tmp_path, NAME), "cannot read|not a regular file")
    os.mkfifo(tmp_path / "fifo.tflite")  # must not block waiting for a writer
    one_line_error(lambda: tm.read(tmp_path / "fifo.tflite", NAME), "not a regular file")
    one_line_error(lambda: tm.embed(b"\x00" * 64, NAME, RECORD), "file identifier")
    one_line_error(lambda: tm.embed(out[:len(out) // 2], NAME, RECORD), "not a readable TFLite flatbuffer")
    (tmp_path / "cut.tflite").write_bytes(out[:-40])
    one_line_error(lambda: tm.read(tmp_path / "cut.tflite", NAME), "not a readable TFLite flatbuffer")
    # Every truncation and every corrupted byte gives the record, None or a MetadataError: nothing else.
    rng = np.random.default_rng(0)
    cuts = list(range(0, 64)) + list(rng.integers(0, len(out), 300))
    for cut in cuts:
        try:
            tm.read(out[:cut], NAME)
        except tm.MetadataError as e:
            assert "\n" not in str(e)
    arr = np.frombuffer(out, np.uint8)
    hot = list(range(0, 64)) + list(range(metadata_data_pos(out, NAME) - 64, len(out)))  # header, record, tables
    for i in rng.choice(hot, 400):
        bad = arr.copy()
        bad[i] ^= np.uint8(1 << int(rng.integers(0, 8)))
        try:
            tm.read(bad.tobytes(), NAME)
            tm.names(bad.tobytes())
        except tm.MetadataError as e:
            assert "\n" not in str(e)


def test_huge_declared_sizes_are_refused_before_reading():
    model, _ = golden("refcnn")
    out = bytearray(tm.embed(model, NAME, RECORD))
    at = metadata_data_pos(bytes(out), NAME)
    assert at + 4 + 70000 < len(out)
    out[at:at + 4] = struct.pack("<I", 70000)  # inside the file, above the limit
    one_line_error(lambda: tm.read(bytes(out), NAME), "70,000 bytes, above the 65,536-byte limit")
    out[at:at + 4] = struct.pack("<I", 0xFFFFFFF0)  # past the end of the file
    one_line_error(lambda: tm.read(bytes(out), NAME), r"\(\+4,294,967,280\) lies outside the")
    one_line_error(lambda: tm.names(bytes(out)), r"\(\+4,294,967,280\) lies outside the")
    # A record really stored above the limit.
    big = with_metadata(model, [(NAME, b'{"x":"' + b"a" * 70000 + b'"}')])
    one_line_error(lambda: tm.read(big, NAME), "70,008 bytes, above the 65,536-byte limit")
    assert tm.read(big, NAME, max_bytes=1 << 17) == {"x": "a" * 70000}
    # A metadata vector declaring 10**9 entries.
    m = schema().Model.GetRootAs(model, 0)
    vec = m._tab.Vector(m._tab.Offset(16)) - 4  # Model field 6: metadata
    patched = bytearray(model)
    patched[vec:vec + 4] = struct.pack("<I", 10 ** 9)
    one_line_error(lambda: tm.names(bytes(patched)), "declares 1,000,000,000 metadata entries")
    # A buffer stored past the flatbuffer with a huge size, or an offset beyond the file.
    s = schema()
    mt = s.ModelT.InitFromPackedBuf(with_metadata(model, [(NAME, b"{}")]), 0)
    mt.buffers[-1].data, mt.buffers[-1].offset, mt.buffers[-1].size = None, 64, 70000  # inside the file
    one_line_error(lambda: tm.read(pack(mt), NAME), "70,000 bytes, above the 65,536-byte limit")
    mt.buffers[-1].size = 1 << 60
    one_line_error(lambda: tm.read(pack(mt), NAME), r"\(\+1,152,921,504,606,846,976\) lies outside the")
    mt.buffers[-1].offset, mt.buffers[-1].size = 1 << 20, 100
    one_line_error(lambda: tm.read(pack(mt), NAME), "at byte 1,048,576 .* lies outside the")
    mt.buffers[-1].offset = 64
    mt.metadata[-1].buffer = 10 ** 6
    one_line_error(lambda: tm.read(pack(mt), NAME), "names buffer 1,000,000 of")


def test_metadata_that_is_not_a_json_object_is_refused():
    model, _ = golden("refcnn")
    one_line_error(lambda: tm.read(model, "min_runtime_version"), "is not readable JSON")  # "1.14.0\0..."
    cases = {"bin": b"\xff\xfe\x00binary", "list": b"[1,2]", "nan": b'{"a":NaN}', "empty": b"",
             "deep": b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", "code": b"__import__('os').system('x')"}
    bad = with_metadata(model, list(cases.items()))
    one_line_error(lambda: tm.read(bad, "bin"), "not readable JSON")
    one_line_error(lambda: tm.read(bad, "list"), "holds a JSON list, not an object")
    one_line_error(lambda: tm.read(bad, "nan"), "not readable JSON")
    one_line_error(lambda: tm.read(bad, "empty"), "not readable JSON")
    one_line_error(lambda: tm.read(bad, "deep"), "nests 5001 levels deep")
    one_line_error(lambda: tm.read(bad, "code"), "not readable JSON")


def test_model_fields_unknown_to_the_schema_are_not_dropped_silently():
    """A Model table written by a newer schema (a field id past external_buffers) is refused by embed."""
    b = flatbuffers.Builder(64)
    b.StartObject(12)
    b.PrependUint32Slot(0, 3, 0)  # version
    b.PrependUint32Slot(11, 7, 0)  # a field the installed schema does not know
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    newer = bytes(b.Output())
    assert tm.names(newer) == [] and tm.read(newer, NAME) is None
    one_line_error(lambda: tm.embed(newer, NAME, RECORD), r"Model table has fields \[11\] that the installed")


def test_records_and_names_that_cannot_be_stored_are_refused():
    model, _ = golden("refcnn")
    one_line_error(lambda: tm.embed(model, NAME, [1, 2]), "must be a dict")
    one_line_error(lambda: tm.embed(model, NAME, {"a": float("nan")}), "not JSON-serialisable")
    one_line_error(lambda: tm.embed(model, NAME, {"a": object()}), "not JSON-serialisable")
    one_line_error(lambda: tm.embed(model, NAME, {"a": "x" * (70 << 10)}), "above the limit")
    deep: dict = {}
    for _ in range(40):
        deep = {"a": deep}
    one_line_error(lambda: tm.embed(model, NAME, deep), "nests 41 levels deep")
    one_line_error(lambda: tm.embed(model, "", RECORD), "non-empty string")
    one_line_error(lambda: tm.embed(model, "x" * 300, RECORD), "300 bytes long")
    one_line_error(lambda: tm.read(model, None), "non-empty string")
    one_line_error(lambda: tm.read(12, NAME), "expected a .tflite path or its bytes")
    assert issubclass(tm.MetadataError, PipelineError)
