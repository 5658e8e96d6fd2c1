"""Hostile and damaged user files: every loader answers with one PipelineError line (exit 2), never a
MemoryError, a numpy ValueError or a traceback; and ONNX models with external data export end to end.

The loaders are fuzzed in-process with hypothesis (random bytes, truncations, byte flips, random .npy
headers); the worst cases then go through ``python -m pipeline.export`` in a subprocess.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.inputs import data

from pipeline.inputs import safe_arrays
from pipeline.errors import CalibrationError, DataError, ModelError, PipelineError

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SMALL_MEMORY = 1 << 22  # in-process fuzzing never allocates more than this


def one_line_exit_2(call):
    """Run ``call``; return its result, or None when it raised a one-line PipelineError with exit status 2."""
    try:
        return call()
    except PipelineError as e:
        assert e.exit_status == 2, e
        assert e.message and "\n" not in e.message, e.message
        assert "; " in e.message, f"no fix given: {e.message}"
        return None


def npy_bytes(header: str, payload: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy file with a literal header string (which may lie) followed by ``payload``."""
    h = header.encode("latin1")
    head_len = 10 if version == (1, 0) else 12
    pad = (-(head_len + len(h) + 1)) % 64
    h = h + b" " * pad + b"\n"
    size = struct.pack("<H", len(h)) if version == (1, 0) else struct.pack("<I", len(h))
    return b"\x93NUMPY" + bytes(version) + size + h + payload


def header(descr: str = "'|u1'", fortran="False", shape="(2, 3)") -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"


def zip_of(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, b in members.items():
            z.writestr(name, b)
    return buf.getvalue()


def npy_of(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def valid_npz(compressed: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(
        buf, a=rng.integers(0, 255, (3, 5, 5)).astype(np.uint8), b=np.arange(3, dtype=np.int64))
    return buf.getvalue()


def load_both(path: Path):
    """Every entry point that reads a user .npz/.npy: the checked results (None for a clean refusal)."""
    return (one_line_exit_2(lambda: safe_arrays.load_npz(path, ["a", "b"], memory=SMALL_MEMORY)),
            one_line_exit_2(lambda: safe_arrays.load_array(path, ["a"], error=CalibrationError, memory=SMALL_MEMORY)),
            one_line_exit_2(lambda: safe_arrays.load_npy(path, memory=SMALL_MEMORY)))


# --------------------------------------------------------------------------- fuzzing the array loaders

@FUZZ
@given(blob=st.binary(max_size=600))
def test_random_bytes_are_refused_cleanly(tmp_path, blob):
    p = tmp_path / "r.npz"
    p.write_bytes(blob)
    load_both(p)
    one_line_exit_2(lambda: data.load_npz(p))


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000), compressed=st.booleans())
def test_truncated_npz_and_npy_are_refused(tmp_path, cut, compressed):
    full = valid_npz(compressed)
    cut = cut % len(full)
    p = tmp_path / "t.npz"
    p.write_bytes(full[:cut])
    assert all(r is None for r in load_both(p))  # a cut zip has no directory: always refused
    arr = np.arange(40, dtype=np.float32).reshape(4, 10)
    whole = npy_of(arr)
    q = tmp_path / "t.npy"
    q.write_bytes(whole[:cut % len(whole)])
    assert one_line_exit_2(lambda: safe_arrays.load_npy(q)) is None


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
       compressed=st.booleans())
def test_byte_flips_in_an_npz_load_or_are_refused(tmp_path, flips, compressed):
    b = bytearray(valid_npz(compressed))
    for i, v in flips:
        b[i % len(b)] = v
    p = tmp_path / "f.npz"
    p.write_bytes(bytes(b))
    got, _, _ = load_both(p)
    if got is not None:
        assert got["a"].dtype.kind in "biuf" and got["b"].dtype.kind in "biuf"


_DESCRS = ["'|u1'", "'<f4'", "'>i2'", "'|b1'", "'<f2'", "'O'", "'|O'", "'<c8'", "'<U3'", "'|S2'", "'|V4'",
           "'<M8[s]'", "[('a', '<f4'), ('b', '|u1')]", "[('o', 'O')]", "'zz'", "42", "'<f4', 'extra': 1"]
_dims = st.one_of(st.integers(0, 6), st.integers(-3, -1), st.integers(2 ** 20, 2 ** 70))


@FUZZ
@given(descr=st.sampled_from(_DESCRS), fortran=st.sampled_from(["False", "True", "0", "'x'"]),
       shape=st.one_of(st.lists(_dims, max_size=4).map(lambda d: repr(tuple(d))),
                       st.sampled_from(["[2, 3]", "(2.5,)", "'abc'", "(True,)", "((((((1,),),),),),)"])),
       extra=st.integers(0, 64), in_zip=st.booleans(), version=st.sampled_from([(1, 0), (2, 0), (3, 0), (9, 9)]))
def test_random_npy_headers_load_exactly_or_are_refused(tmp_path, descr, fortran, shape, extra, in_zip, version):
    hdr = header(descr, fortran, shape)
    try:  # as many payload bytes as the header declares (when it parses), plus some
        dt = np.dtype(eval(descr)) if "extra" not in descr else None  # noqa: S307 - our own literals
        n = int(np.prod(eval(shape))) * dt.itemsize if isinstance(eval(shape), tuple) else 0  # noqa: S307
    except Exception:
        n = 0
    payload = bytes(min(max(n, 0), 4096) + extra)
    blob = npy_bytes(hdr, payload, version)
    if in_zip:
        p = tmp_path / "h.npz"
        p.write_bytes(zip_of({"x.npy": blob}))
        a = one_line_exit_2(lambda: safe_arrays.load_array(p, ["x"], memory=SMALL_MEMORY))
        a = a[0] if a is not None else None
    else:
        p = tmp_path / "h.npy"
        p.write_bytes(blob)
        a = one_line_exit_2(lambda: safe_arrays.load_npy(p, memory=SMALL_MEMORY))
    if a is not None:
        assert a.dtype.kind in "biuf" and a.shape == eval(shape)  # noqa: S307


# --------------------------------------------------------------------------- what each refusal says

def _msg(call) -> str:
    with pytest.raises(PipelineError) as e:
        call()
    assert e.value.exit_status == 2 and "\n" not in e.value.message
    return e.value.message


@pytest.mark.parametrize("hdr,needle", [
    (header(shape="(100000, 100000, 1000)"), "truncated or its header is damaged"),
    (header(shape="(3, -4)"), "negative dimension"),
    (header(descr="'O'"), "pickled Python objects"),
    (header(descr="'<c8'"), "complex numbers"),
    (header(descr="[('a', '<f4')]"), "structured dtype"),
    (header(descr="'<U3'"), "strings"),
    (header(descr="'|V4'"), "raw bytes"),
    (header(descr="'<M8[s]'"), "dates/times"),
    (header(fortran="'yes'"), "malformed .npy header"),
    (header(shape="'abc'"), "malformed .npy header"),
])
def test_npy_header_problems_are_named(tmp_path, hdr, needle):
    p = tmp_path / "x.npy"
    p.write_bytes(npy_bytes(hdr, bytes(6)))
    assert needle in _msg(lambda: safe_arrays.load_npy(p))
    z = tmp_path / "x.npz"
    z.write_bytes(zip_of({"x_calib.npy": npy_bytes(hdr, bytes(6))}))
    assert needle in _msg(lambda: safe_arrays.load_array(z, ["x_calib"]))


def test_huge_shape_names_the_size(tmp_path):
    p = tmp_path / "x.npy"
    p.write_bytes(npy_bytes(header(shape="(100000, 100000, 1000)"), bytes(10)))
    assert "(10 TB)" in _msg(lambda: safe_arrays.load_npy(p))


def test_an_array_larger_than_memory_is_refused_before_allocating(tmp_path):
    p = tmp_path / "big.npy"
    p.write_bytes(npy_bytes(header(descr="'<f4'", shape="(1000, 1000)")))
    with open(p, "r+b") as f:  # a sparse file that really holds the 4 MB it declares
        f.truncate(p.stat().st_size + 4_000_000)
    msg = _msg(lambda: safe_arrays.load_npy(p, memory=1_000_000))
    assert "4 MB" in msg and "1 MB of memory available" in msg
    assert safe_arrays.load_npy(p).shape == (1000, 1000)
    z = tmp_path / "big.npz"
    z.write_bytes(zip_of({"x.npy": p.read_bytes()}, zipfile.ZIP_DEFLATED))
    assert "memory available" in _msg(lambda: safe_arrays.load_npz(z, ["x"], memory=1_000_000))
    # Two arrays that fit one by one but not together.
    two = tmp_path / "two.npz"
    two.write_bytes(zip_of({"x.npy": p.read_bytes(), "y.npy": p.read_bytes()}, zipfile.ZIP_DEFLATED))
    assert "together" in _msg(lambda: safe_arrays.load_npz(two, ["x", "y"], memory=6_000_000))


def test_archive_problems_are_named(tmp_path):
    ok = npy_of(np.zeros((2, 3), np.uint8))
    cases = {
        "notzip": (b"just some text", "not a readable .npz archive (not a zip file)"),
        "pickle": (b"\x80\x04\x95" + bytes(20), "Python pickle, which is never loaded"),
        "gz": (gzip.compress(b"x"), "gzip-compressed"),
        "empty": (b"", "it is empty"),
        "cut": (valid_npz()[:-30], "damaged or truncated .npz archive"),
        "notnpy": (zip_of({"a.npy": b"hello world", "b.npy": ok}), "not a .npy array"),
    }
    for name, (blob, needle) in cases.items():
        p = tmp_path / f"{name}.npz"
        p.write_bytes(blob)
        assert needle in _msg(lambda: safe_arrays.load_npz(p, ["a", "b"])), name
    # The same name twice (numpy would silently pick one), also as x and x.npy.
    for names in (("a.npy", "a.npy"), ("a", "a.npy")):
        buf = io.BytesIO()
        with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            for n in names:
                z.writestr(n, ok)
        p = tmp_path / "dup.npz"
        p.write_bytes(buf.getvalue())
        assert "two arrays named 'a'" in _msg(lambda: safe_arrays.load_npz(p, ["a"]))
    # Altered data: the CRC no longer matches.
    good = bytearray(zip_of({"a.npy": npy_of(np.arange(50, dtype=np.uint8))}))
    i = good.index(bytes(range(10, 30)))
    good[i] ^= 0xFF
    p = tmp_path / "crc.npz"
    p.write_bytes(bytes(good))
    assert "bad CRC-32" in _msg(lambda: safe_arrays.load_npz(p, ["a"]))
    # A zip bomb: a tiny array padded with 50 MB of zeros that compress to almost nothing.
    p = tmp_path / "bomb.npz"
    p.write_bytes(zip_of({"a.npy": ok + bytes(50_000_000)}, zipfile.ZIP_DEFLATED))
    assert p.stat().st_size < 200_000
    assert "zip bomb" in _msg(lambda: safe_arrays.load_npz(p, ["a"]))
    # Damaged compressed data.
    raw = bytearray(zip_of({"a.npy": npy_of(np.arange(5000, dtype=np.int64))}, zipfile.ZIP_DEFLATED))
    mid = len(raw) // 2
    raw[mid:mid + 40] = bytes(40)
    p = tmp_path / "zlib.npz"
    p.write_bytes(bytes(raw))
    assert "damaged" in _msg(lambda: safe_arrays.load_npz(p, ["a"])) or "corrupt" in _msg(
        lambda: safe_arrays.load_npz(p, ["a"]))


def test_valid_files_still_load_exactly(tmp_path):
    arrays = {"a": np.arange(24, dtype=">i4").reshape(2, 3, 4), "b": np.asfortranarray(np.eye(3, dtype=np.float16)),
              "c": np.zeros((0, 5), np.uint8), "d": np.array(True)}
    for compressed in (False, True):
        p = tmp_path / f"ok{compressed}.npz"
        (np.savez_compressed if compressed else np.savez)(p, **arrays)
        got = safe_arrays.load_npz(p, list(arrays))
        for k, v in arrays.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            np.testing.assert_array_equal(got[k], v)
    np.save(tmp_path / "f.npy", arrays["b"])
    np.testing.assert_array_equal(safe_arrays.load_npy(tmp_path / "f.npy"), arrays["b"])


def test_dataset_and_calibration_loaders_use_the_checks(tmp_path):
    from conftest import make_tiny_npz
    p = make_tiny_npz(tmp_path / "d.npz", n_train=20, n_test=10)
    assert len(data.load_npz(p).y_train) == 20
    bad = tmp_path / "bad.npz"
    bad.write_bytes(zip_of({f"{k}.npy": npy_bytes(header(shape="(99999999, 28, 28)"), bytes(100))
                            for k in data.NPZ_KEYS}))
    with pytest.raises(DataError, match="truncated or its header is damaged"):
        data.load_npz(bad)
    for k, shape in (("x_train", "()"), ("x_train", "(4, 0, 5)")):
        arrays = dict(np.load(p))
        arrays[k] = np.zeros(eval(shape), np.uint8)  # noqa: S307
        q = tmp_path / "s.npz"
        np.savez(q, **arrays)
        with pytest.raises(DataError, match="x_train has shape"):
            data.load_npz(q)
    arrays = dict(np.load(p))
    arrays["y_train"] = np.full(20, 1e300)
    np.savez(tmp_path / "big_label.npz", **arrays)
    with pytest.raises(DataError, match="labels up to 1e"):
        data.load_npz(tmp_path / "big_label.npz")


# --------------------------------------------------------------------------- IDX files

def idx_bytes(dims, payload_len=None, ndim=None) -> bytes:
    head = bytes([0, 0, 8, len(dims) if ndim is None else ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    n = int(np.prod(dims)) if payload_len is None else payload_len
    return head + bytes(n)


@pytest.mark.parametrize("blob,needle", [
    (idx_bytes([60000, 28, 28], payload_len=1000), "truncated, or its header is wrong"),
    (idx_bytes([10, 28, 28], payload_len=10 * 28 * 28 + 5), "more than it declares"),
    (idx_bytes([4294967295, 4294967295, 4294967295], payload_len=10), "truncated, or its header is wrong"),
    (idx_bytes([3, 2]), "declares a 2-D array but must hold a 3-D one"),
    (idx_bytes([3, 2, 2])[:9], "truncated inside its header"),
    (b"\x00\x00\x0d\x03", "not an unsigned-byte IDX file"),
])
def test_idx_problems(tmp_path, blob, needle):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(blob)
    assert needle in _msg(lambda: data._read_idx(p, 3))


def test_gzipped_idx_problems(tmp_path):
    good = idx_bytes([5, 4, 4])
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(good))
    assert data._read_idx(p, 3).shape == (5, 4, 4)
    for blob, needle in ((gzip.compress(good)[:-12], "cannot read IDX file"),
                         (gzip.compress(idx_bytes([5, 4, 4], payload_len=40)), "is truncated"),
                         (gzip.compress(idx_bytes([5, 4, 4], payload_len=80 + 30_000_000)), "more data than"),
                         (b"\x1f\x8b garbage", "cannot read IDX file")):
        p.write_bytes(blob)
        assert needle in _msg(lambda: data._read_idx(p, 3))
    # A huge declared size in a small gzip is refused before allocating (more than any memory).
    p.write_bytes(gzip.compress(idx_bytes([2 ** 32 - 1] * 3, payload_len=10)))
    assert "memory available" in _msg(lambda: data._read_idx(p, 3))


@FUZZ
@given(blob=st.binary(max_size=200), gz=st.booleans())
def test_random_idx_bytes_are_refused_cleanly(tmp_path, blob, gz):
    p = tmp_path / ("r.gz" if gz else "r")
    p.write_bytes(gzip.compress(blob) if gz else blob)
    one_line_exit_2(lambda: data._read_idx(p, 3))


# --------------------------------------------------------------------------- calibration images

def png_declaring(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h grey pixels, with almost no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(w + 1)))
            + chunk(b"IEND", b""))


def _gray_ctx():
    from pipeline.calib_data import CalibContext
    from pipeline.inputs.preprocessing import Preprocessing
    x = np.random.default_rng(0).integers(0, 256, (40, 1, 12, 12), dtype=np.uint8)
    pre = Preprocessing(input_shape=(1, 12, 12), source_layout="NHW", source_dtype="uint8", scale=1 / 255,
                        mean=(0.0,), std=(1.0,), raw_range=(0.0, 255.0))
    return CalibContext(x_train=x, y_train=np.arange(40) % 4, preprocessing=pre, dataset_name="toy")


@pytest.mark.parametrize("w,h,needle", [(30000, 30000, "900000000 pixels"), (10000, 9000, "10000x9000 pixels"),
                                        (0, 5, "cannot read calibration image")])
def test_image_bombs_are_refused_before_decoding(tmp_path, w, h, needle):
    from pipeline.calib_data.user import read_image
    p = tmp_path / "bomb.png"
    p.write_bytes(png_declaring(w, h))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a DecompressionBombWarning escapes
        msg = _msg(lambda: read_image(p, 1, (12, 12)))
    assert needle in msg and str(p) in msg


@FUZZ
@given(cut=st.integers(0, 10_000), flip=st.tuples(st.integers(0), st.integers(0, 255)),
       fmt=st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF"]))
def test_damaged_images_name_the_file(tmp_path, cut, flip, fmt):
    from PIL import Image
    from pipeline.calib_data.user import read_image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, fmt)
    b = bytearray(buf.getvalue())
    b[flip[0] % len(b)] = flip[1]
    p = tmp_path / f"img.{fmt.lower()}"
    p.write_bytes(bytes(b[:cut % (len(b) + 1)]))
    try:
        a, _ = read_image(p, 1, (12, 12))
        assert a.shape == (1, 12, 12) and a.dtype == np.uint8
    except CalibrationError as e:
        assert str(p) in e.message and "\n" not in e.message


# --------------------------------------------------------------------------- the calibration cache

def test_tampered_cache_entries_are_rebuilt(tmp_path):
    from pipeline.calib_data import build
    from dataclasses import replace
    ctx = replace(_gray_ctx(), cache_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = build("noise", ctx, 20, 0).array()
    npy = next(tmp_path.glob("*.npy"))
    meta = next(tmp_path.glob("*.json"))
    good_meta = meta.read_text()
    tampered = {
        "huge header": lambda: npy.write_bytes(npy_bytes(header(descr="'<f4'", shape="(10**9, 1, 12, 12)"))),
        "object dtype": lambda: npy.write_bytes(npy_bytes(header(descr="'O'"), b"\x80\x04N.")),
        "wrong dtype": lambda: np.save(npy, ref.astype(np.float64)),
        "NaN": lambda: np.save(npy, np.full_like(ref, np.nan)),
        "out of range": lambda: np.save(npy, ref * 1000),
        "truncated": lambda: npy.write_bytes(npy_bytes(header(descr="'<f4'", shape="(20, 1, 12, 12)"), bytes(99))),
        "json list": lambda: meta.write_text("[1, 2]"),
        "json garbage": lambda: meta.write_bytes(b"\xff\xfe{"),
        "json bad fields": lambda: meta.write_text(json.dumps({**json.loads(good_meta), "extra": [1], "name": 3})),
    }
    for what, tamper in tampered.items():
        tamper()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = build("noise", ctx, 20, 0)
        assert src.describe()["cache"]["hit"] is False, what
        np.testing.assert_array_equal(src.array(), ref)
        np.testing.assert_array_equal(np.load(npy, allow_pickle=False), ref)  # rewritten
        assert json.loads(meta.read_text()) == json.loads(good_meta) | {"generation_s": json.loads(meta.read_text())["generation_s"]}, what


# --------------------------------------------------------------------------- the CLI on the worst cases

def tiny_onnx(path: Path, *, external: str | None = None) -> Path:
    """A 1x12x12 -> 4 classifier; its weights in ``external`` (relative to its folder) when given."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "B"),
             numpy_helper.from_array(rng.normal(0, 1, (4, 4)).astype(np.float32), "L")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "L"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        (path.parent / external).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=external,
                        size_threshold=0)
    else:
        onnx.save_model(m, str(path))
    return path


def _cli(args, cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.export", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_refused(r, cwd: Path, before: set, needle: str):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert {p.name for p in cwd.iterdir()} == before  # no output folder, no temp folder, nothing written


@pytest.fixture()
def cli_case(tmp_path, tiny_npz):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    model = tiny_onnx(tmp_path / "m" / "model.onnx")
    base = ["--model", str(model), "--data", str(tiny_npz), "--calib-size", "4", "--eval-limit", "20",
            "--out", str(cwd / "out"), "--calib-cache", "off"]
    return cwd, base


def test_cli_npz_with_a_huge_header(tmp_path, cli_case):
    cwd, base = cli_case
    p = tmp_path / "huge.npz"
    p.write_bytes(zip_of({f"{k}.npy": npy_bytes(header(shape="(100000, 100000, 100000)"), bytes(64))
                          for k in data.NPZ_KEYS}))
    before = {q.name for q in cwd.iterdir()}
    r = _cli(base + ["--data", str(p)], cwd)
    _assert_refused(r, cwd, before, "1 PB")


def test_cli_png_bomb_in_a_calibration_folder(tmp_path, cli_case):
    from PIL import Image
    cwd, base = cli_case
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((12, 12), 60 * i, np.uint8)).save(folder / f"ok{i}.png")
    (folder / "zz_bomb.png").write_bytes(png_declaring(30000, 30000))
    before = {q.name for q in cwd.iterdir()}
    r = _cli(base + ["--calib", f"folder:{folder}"], cwd)
    _assert_refused(r, cwd, before, "zz_bomb.png declares 900000000 pixels")


def test_cli_idx_with_a_lying_header(tmp_path, cli_case):
    cwd, base = cli_case
    d = tmp_path / "fmnist"
    d.mkdir()
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes([60000, 28, 28], payload_len=5 * 28 * 28))
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes([5]))
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes([5, 28, 28]))
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes([5]))
    before = {q.name for q in cwd.iterdir()}
    r = _cli(base + ["--data", "fashion-mnist", "--data-dir", str(d)], cwd)
    _assert_refused(r, cwd, before, "train-images-idx3-ubyte declares 60000x28x28 bytes")


# --------------------------------------------------------------------------- ONNX with external data

def test_onnx_with_external_data_exports_end_to_end(tmp_path, tiny_npz):
    import onnx
    import onnxruntime as ort
    from pipeline.export import main
    src = tiny_onnx(tmp_path / "src" / "model.onnx", external="weights/all.bin")
    assert (tmp_path / "src" / "weights" / "all.bin").is_file()
    out = tmp_path / "out"
    status = main(["--model", str(src), "--data", str(tiny_npz), "--calib-size", "50", "--eval-limit", "50",
                   "--out", str(out), "--calib-cache", "off"])
    assert status in (0, 1)  # a random tiny model may miss an accuracy gate; the export itself must succeed
    r = json.loads((out / "report.json").read_text())
    assert r["model"]["external_data"] == {"files": ["weights/all.bin"], "bytes": 224}
    assert r["onnx"]["source"] == "given" and r["quantization"]["fully_int8"] is True
    assert (out / "model_int8.tflite").is_file()
    # The exported model.onnx holds its weights inline: it still runs after the folder is moved.
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
    assert sorted(p.name for p in out.glob("model.onnx*")) == ["model.onnx"]
    moved = out.rename(tmp_path / "moved")
    x = np.load(tiny_npz)["x_test"][:50, None].astype(np.float32) / 255
    got = ort.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(np.load(moved / "predictions.npz")["fp32_logits"], ref, atol=1e-6)


def _relocate(model: Path, location: str) -> None:
    import onnx
    proto = onnx.load(str(model), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(model))


def test_external_data_outside_the_model_folder_is_refused(tmp_path, tiny_npz, capsys):
    from pipeline.inputs import models
    from pipeline.export import main
    model = tiny_onnx(tmp_path / "m" / "model.onnx", external="w.bin")
    (tmp_path / "outside.bin").write_bytes((tmp_path / "m" / "w.bin").read_bytes())
    cases = {"../outside.bin": "leaves the model's folder", str(tmp_path / "outside.bin"): "an absolute path",
             "missing.bin": "which is missing", "w.bin": "truncated", "link.bin": "a symbolic link"}
    (tmp_path / "m" / "copy.bin").write_bytes((tmp_path / "m" / "w.bin").read_bytes())
    (tmp_path / "m" / "link.bin").symlink_to(tmp_path / "m" / "copy.bin")  # inside, but onnx refuses links
    for location, needle in cases.items():
        _relocate(model, location)
        if location == "w.bin":
            (tmp_path / "m" / "w.bin").write_bytes(bytes(100))
        with pytest.raises(ModelError, match=needle):
            models.load(str(model))
    _relocate(model, "../outside.bin")
    out = tmp_path / "out"
    assert main(["--model", str(model), "--data", str(tiny_npz), "--calib-size", "50", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "leaves the model's folder" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
