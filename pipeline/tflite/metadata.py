"""A model's deployment record carried inside the .tflite as TFLite model metadata.

The record (a small JSON object: preprocessing, input quantization, ...; its contents are the caller's) is
stored the way LiteRT's metadata and ultralytics store theirs: one entry of the Model table's ``metadata``
vector, a ``name`` plus a ``buffer`` index into ``buffers``, that buffer holding the record as UTF-8 JSON
(canonical: sorted keys, compact separators).

- :func:`embed` returns a new model holding the record. It goes through the flatbuffers object API of the
  TFLite schema that ``ai_edge_litert`` ships (``ai_edge_litert.schema_py_generated``, the module
  :mod:`pipeline.tflite.inspect` already reads models with): unpack, change ``metadata`` and ``buffers``,
  pack. Everything else (operator codes, subgraphs, tensors, buffers, signature defs, other metadata such as
  ``min_runtime_version`` and ``CONVERSION_METADATA``) is unpacked and packed unchanged and keeps its indices;
  buffer data is packed 16-byte aligned (the TFLite converter's buffer alignment), never less aligned than
  the original. A model whose tensor data lies past the flatbuffer (the >2 GB layout: ``Buffer.offset`` /
  ``Operator.large_custom_options_offset`` counted from the start of the file) keeps that data byte for
  byte after the new flatbuffer, its offsets moved by the same multiple of 16.
- :func:`read` and :func:`names` never unpack the model: a small reader follows root -> Model ->
  ``metadata`` -> ``buffers`` -> one Buffer, bounds-checking every offset against the file size, after
  checking that the Model's top-level tables, their vectors and every buffer's data lie inside the file (a
  truncated model is an error even when its metadata survived). A file is read with ``pread``, a few bytes
  at a time (no mmap: a file truncated meanwhile is an error, not SIGBUS). The record is at most
  :data:`MAX_RECORD_BYTES` and is parsed with :func:`pipeline.jsonio.loads_object` (depth-limited, no
  NaN, must be an object). Nothing read is ever executed.

Every failure is a :class:`MetadataError` (a :class:`pipeline.errors.ModelError`, exit 2) with a one-line
message.
"""
from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

from pipeline.errors import ModelError

MAX_RECORD_BYTES = 64 << 10  # a deployment record is a few hundred bytes
MAX_RECORD_DEPTH = 16  # a deployment record nests about 3 deep
MAX_NAME_BYTES = 256
MAX_ENTRIES = 4096  # metadata entries a model may list (converters write 2)
MAX_TABLES = 1 << 20  # buffers, subgraphs, operator codes or signature defs (real models: thousands at most)
IDENTIFIER = b"TFL3"
BUFFER_ALIGNMENT = 16  # the TFLite converter's alignment of buffer data
FLATBUFFER_LIMIT = (1 << 31) - 1  # flatbuffers' 32-bit signed offsets: the flatbuffer itself stays below 2 GiB
_MODEL_FIELDS = 10  # fields of the Model table in the schema used here (version ... external_buffers)
_FIX = "re-export the model, or fetch the file again if it was copied"


class MetadataError(ModelError):
    """A .tflite whose metadata cannot be read or written, or a record that cannot be stored."""


# --------------------------------------------------------------------------------------------- encoding
def encode_record(record: dict) -> bytes:
    """The canonical bytes of ``record``: UTF-8 JSON, sorted keys, compact; refused when :func:`read` would
    refuse it (too large, too deep, NaN/Infinity, not an object)."""
    from pipeline.jsonio import nesting_depth
    if not isinstance(record, dict):
        raise MetadataError(f"a metadata record must be a dict, not {type(record).__name__}")
    try:
        text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise MetadataError(f"the metadata record is not JSON-serialisable ({type(e).__name__}: {e})") from None
    raw = text.encode("utf-8")
    if len(raw) > MAX_RECORD_BYTES:
        raise MetadataError(f"the metadata record is {len(raw):,} bytes of JSON, above the limit of "
                            f"{MAX_RECORD_BYTES:,}; keep large data out of the model file")
    depth = nesting_depth(raw)
    if depth > MAX_RECORD_DEPTH:
        raise MetadataError(f"the metadata record nests {depth} levels deep (the limit is {MAX_RECORD_DEPTH})")
    return raw


def _check_name(name) -> bytes:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise MetadataError(f"a metadata name must be a non-empty string without NUL, not {name!r}")
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        raise MetadataError(f"the metadata name is {len(raw)} bytes long (at most {MAX_NAME_BYTES})")
    return raw


# --------------------------------------------------------------------------------- bounds-checked reader
class _Source:
    """Bytes of a model, from memory or from a file read with pread; every read is bounds-checked."""

    def __init__(self, where: str, data=None, fd: int | None = None, size: int = 0):
        self.where, self.data, self.fd = where, data, fd
        self.size = len(data) if data is not None else size

    def corrupt(self, detail: str) -> MetadataError:
        return MetadataError(f"{self.where} is not a readable TFLite flatbuffer ({detail}); {_FIX}")

    def check(self, pos: int, n: int, what: str) -> None:
        if pos < 0 or n < 0 or pos + n > self.size:
            raise self.corrupt(f"{what} at byte {pos:,} (+{n:,}) lies outside the {self.size:,}-byte file")

    def get(self, pos: int, n: int, what: str) -> bytes:
        self.check(pos, n, what)
        if self.data is not None:
            return bytes(self.data[pos:pos + n])
        try:
            got = os.pread(self.fd, n, pos)
        except OSError as e:
            raise MetadataError(f"cannot read {self.where} ({e.strerror or type(e).__name__}); {_FIX}") from None
        if len(got) != n:
            raise self.corrupt(f"the file got shorter while being read ({what})")
        return got

    def u16(self, pos, what):
        return struct.unpack("<H", self.get(pos, 2, what))[0]

    def u32(self, pos, what):
        return struct.unpack("<I", self.get(pos, 4, what))[0]

    def i32(self, pos, what):
        return struct.unpack("<i", self.get(pos, 4, what))[0]

    def u64(self, pos, what):
        return struct.unpack("<Q", self.get(pos, 8, what))[0]


class _Table:
    """One flatbuffer table: its position, vtable and the byte sizes both declare."""

    def __init__(self, src: _Source, pos: int, what: str):
        if pos % 4:
            raise src.corrupt(f"{what} table at byte {pos:,} is not 4-byte aligned")
        self.src, self.pos, self.what = src, pos, what
        self.vt = pos - src.i32(pos, f"{what} table")
        if self.vt % 2:
            raise src.corrupt(f"{what} vtable at byte {self.vt:,} is not 2-byte aligned")
        self.vt_size = src.u16(self.vt, f"{what} vtable")
        self.size = src.u16(self.vt + 2, f"{what} vtable")
        if self.vt_size < 4 or self.vt_size % 2 or self.size < 4:
            raise src.corrupt(f"{what} vtable declares {self.vt_size} vtable bytes and {self.size} table bytes")
        src.check(self.vt, self.vt_size, f"{what} vtable")
        src.check(pos, self.size, f"{what} table")

    def field(self, fid: int, width: int) -> int | None:
        """Absolute position of field ``fid`` (``width`` bytes), or None when absent."""
        slot = 4 + 2 * fid
        if slot + 2 > self.vt_size:
            return None
        off = self.src.u16(self.vt + slot, f"{self.what} vtable")
        if off == 0:
            return None
        if off + width > self.size:
            raise self.src.corrupt(f"{self.what} field {fid} lies outside its {self.size}-byte table")
        return self.pos + off

    def ref(self, fid: int) -> int | None:
        """Where the offset field ``fid`` points (a table, vector or string), or None when absent."""
        p = self.field(fid, 4)
        if p is None:
            return None
        target = p + self.src.u32(p, f"{self.what} field {fid}")
        if target >= self.src.size:
            raise self.src.corrupt(f"{self.what} field {fid} points past the end of the file")
        return target

    def scalar(self, fid: int, fmt: str, default=0):
        p = self.field(fid, struct.calcsize(fmt))
        if p is None:
            return default
        return struct.unpack(fmt, self.src.get(p, struct.calcsize(fmt), f"{self.what} field {fid}"))[0]

    def vector(self, fid: int, elem: int, limit: int | None = None) -> tuple[int, int] | None:
        """(position of the first element, length) of vector field ``fid``, at most ``limit`` long."""
        pos = self.ref(fid)
        if pos is None:
            return None
        n = self.src.u32(pos, f"{self.what} field {fid} length")
        if limit is not None and n > limit:
            raise _TooLong(n)
        self.src.check(pos + 4, n * elem, f"{self.what} field {fid} ({n:,} elements)")
        return pos + 4, n


class _TooLong(Exception):
    def __init__(self, n):
        self.n = n


def _model(src: _Source) -> _Table:
    if src.size < 8:
        raise src.corrupt(f"{src.size} bytes is shorter than a flatbuffer header")
    ident = src.get(4, 4, "file identifier")
    if ident != IDENTIFIER:
        raise src.corrupt(f"file identifier {ident!r}, not {IDENTIFIER!r}")
    return _Table(src, src.u32(0, "root offset"), "Model")


# Vector and string fields (field id -> element bytes) checked in each OperatorCode (1), SubGraph (2) and
# SignatureDef (7) table: custom_code; tensors, inputs, outputs, operators, name; inputs, outputs, signature_key.
_CHECKED_VECTORS = {1: {1: 1}, 2: {0: 4, 1: 4, 2: 4, 3: 4, 4: 1}, 7: {0: 4, 1: 4, 2: 1}}


def _check_complete(src: _Source, model: _Table) -> None:
    """Every top-level vector of the Model and every buffer's data lies inside the file: a truncated model
    (whose weights fill most of the file) is an error even when its metadata happens to survive."""
    for fid, what in ((1, "operator code"), (2, "subgraph"), (4, "buffer"), (7, "signature def")):
        try:
            model.vector(fid, 4, MAX_TABLES)
        except _TooLong as e:
            raise src.corrupt(f"it declares {e.n:,} {what}s (at most {MAX_TABLES:,})") from None
    for fid, what in ((1, "operator code"), (2, "subgraph"), (7, "signature def")):
        vec = model.vector(fid, 4)
        for i in range(vec[1] if vec else 0):
            slot = vec[0] + 4 * i
            table = _Table(src, slot + src.u32(slot, f"{what} offset"), f"{what} {i}")
            for f, elem in _CHECKED_VECTORS[fid].items():  # its vectors and strings are inside the file too
                table.vector(f, elem)
    vec = model.vector(4, 4)
    for i in range(vec[1] if vec else 0):
        slot = vec[0] + 4 * i
        buf = _Table(src, slot + src.u32(slot, "buffer offset"), f"buffer {i}")
        offset, size = buf.scalar(1, "<Q"), buf.scalar(2, "<Q")
        if offset > 1:
            src.check(offset, size, f"buffer {i} data stored past the flatbuffer")
        else:
            buf.vector(0, 1)


def _entries(src: _Source) -> tuple[_Table, list[tuple[str, int]]]:
    """The Model table and its metadata entries as (name, buffer index), after checking the model is whole."""
    model = _model(src)
    _check_complete(src, model)
    try:
        vec = model.vector(6, 4, MAX_ENTRIES)
    except _TooLong as e:
        raise src.corrupt(f"it declares {e.n:,} metadata entries (at most {MAX_ENTRIES:,})") from None
    out = []
    for i in range(vec[1] if vec else 0):
        slot = vec[0] + 4 * i
        entry = _Table(src, slot + src.u32(slot, "metadata entry"), f"metadata entry {i}")
        try:
            nv = entry.vector(0, 1, MAX_NAME_BYTES)
        except _TooLong as e:
            raise src.corrupt(f"metadata entry {i} has a {e.n:,}-byte name (at most {MAX_NAME_BYTES})") from None
        name = src.get(nv[0], nv[1], f"metadata entry {i} name").decode("utf-8", "replace") if nv else ""
        out.append((name, entry.scalar(1, "<I")))
    return model, out


def _buffer_bytes(src: _Source, model: _Table, index: int, what: str, limit: int) -> bytes:
    """The bytes of buffer ``index`` (inline data, or past the flatbuffer at offset/size), at most ``limit``."""
    vec = model.vector(4, 4)
    count = vec[1] if vec else 0
    if not 0 <= index < count:
        raise src.corrupt(f"{what} names buffer {index:,} of {count:,}")
    slot = vec[0] + 4 * index
    buf = _Table(src, slot + src.u32(slot, "buffer offset"), f"buffer {index}")
    offset, size = buf.scalar(1, "<Q"), buf.scalar(2, "<Q")

    def too_large(n):
        return MetadataError(f"{what} in {src.where} is {n:,} bytes, above the {limit:,}-byte limit for a "
                             "metadata record; refusing to read it")
    if offset > 1:  # data stored after the flatbuffer (models above 2 GB)
        if size > limit:
            raise too_large(size)
        return src.get(offset, size, f"{what} data")
    try:
        vec = buf.vector(0, 1, limit)
    except _TooLong as e:
        raise too_large(e.n) from None
    return src.get(vec[0], vec[1], f"{what} data") if vec else b""


def _open(path_or_bytes, fn):
    """Run ``fn(source)`` over model bytes or a model file (read with pread, closed afterwards)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return fn(_Source("the model", data=memoryview(path_or_bytes).cast("B")))
    if not isinstance(path_or_bytes, (str, os.PathLike)):
        raise MetadataError(f"expected a .tflite path or its bytes, not {type(path_or_bytes).__name__}")
    path = Path(path_or_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the read
    except OSError as e:
        raise MetadataError(f"cannot read {path} ({e.strerror or type(e).__name__}); check the path") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MetadataError(f"{path} is not a regular file; pass a .tflite file")
        return fn(_Source(str(path), fd=fd, size=st.st_size))
    finally:
        os.close(fd)


def names(path_or_bytes) -> list[str]:
    """The names of the metadata entries of a model, in file order ([] when it has none)."""
    return _open(path_or_bytes, lambda src: [n for n, _ in _entries(src)[1]])


def read_bytes(path_or_bytes, name: str, max_bytes: int = MAX_RECORD_BYTES) -> bytes | None:
    """The raw bytes of metadata entry ``name`` (at most ``max_bytes``), or None when there is no such entry."""
    _check_name(name)

    def _read(src):
        model, entries = _entries(src)
        hits = [b for n, b in entries if n == name]
        if not hits:
            return None
        if len(hits) > 1:
            raise src.corrupt(f"it holds {len(hits)} metadata entries named {name!r}")
        return _buffer_bytes(src, model, hits[0], f"metadata {name!r}", max_bytes)
    return _open(path_or_bytes, _read)


def read(path_or_bytes, name: str, max_bytes: int = MAX_RECORD_BYTES, max_depth: int = MAX_RECORD_DEPTH) -> dict | None:
    """The JSON object stored as metadata ``name``, or None when the model has no such entry.

    Refused with a one-line :class:`MetadataError`: a corrupt or truncated flatbuffer, a record above
    ``max_bytes``, nested deeper than ``max_depth``, not UTF-8 JSON, or not a JSON object."""
    from pipeline.jsonio import loads_object
    raw = read_bytes(path_or_bytes, name, max_bytes)
    if raw is None:
        return None
    label = path_or_bytes if isinstance(path_or_bytes, (str, os.PathLike)) else "the model"
    where = f"metadata {name!r} of {label}"
    return loads_object(raw, where, _FIX, max_depth=max_depth, error=MetadataError)


# ---------------------------------------------------------------------------------------------- writing
def _schema():
    from ai_edge_litert import schema_py_generated as schema
    return schema


def _aligned_buffer_class(schema):
    class AlignedBufferT(schema.BufferT):
        """A Buffer whose data vector is packed ``BUFFER_ALIGNMENT``-aligned (the generated Pack aligns to 1)."""

        def Pack(self, builder):
            import numpy as np
            data = None
            if self.data is not None:
                raw = np.asarray(self.data, dtype=np.uint8).ravel().tobytes()
                builder.StartVector(1, len(raw), BUFFER_ALIGNMENT)
                builder.head -= len(raw)
                builder.Bytes[builder.head:builder.head + len(raw)] = raw
                builder.vectorNumElems = len(raw)
                data = builder.EndVector()
            schema.BufferStart(builder)
            if data is not None:
                schema.BufferAddData(builder, data)
            schema.BufferAddOffset(builder, self.offset)
            schema.BufferAddSize(builder, self.size)
            return schema.BufferEnd(builder)
    return AlignedBufferT


def _as_text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else ("" if v is None else str(v))


def _pack(schema, model) -> bytes:
    import flatbuffers
    builder = flatbuffers.Builder(1 << 16)
    try:
        builder.Finish(model.Pack(builder), file_identifier=IDENTIFIER)
    except flatbuffers.builder.BuilderSizeError:
        raise MetadataError("the model's flatbuffer would exceed 2 GiB with the metadata; store its tensor data "
                            "past the flatbuffer (the converter's large-model layout) first") from None
    return bytes(builder.Output())


def embed(tflite: bytes, name: str, record: dict) -> bytes:
    """A copy of the model ``tflite`` holding ``record`` as metadata ``name`` (replacing an entry of that name).

    Operator codes, subgraphs, tensors, buffers (same indices), signature defs and the other metadata
    entries are kept; see the module docstring for how."""
    blob = encode_record(record)
    key = _check_name(name).decode("utf-8")
    if not isinstance(tflite, (bytes, bytearray, memoryview)):
        raise MetadataError(f"embed takes the model's bytes, not {type(tflite).__name__}")
    tflite = bytes(tflite)
    src = _Source("the model", data=memoryview(tflite))
    model_table, entries = _entries(src)  # a clean one-line error for what is not a TFLite model
    unknown = [f for f in range(_MODEL_FIELDS, (model_table.vt_size - 4) // 2) if model_table.field(f, 0)]
    if unknown:
        raise MetadataError(f"the model's Model table has fields {unknown} that the installed TFLite schema "
                            "does not know (a newer converter wrote it); embedding would drop them")
    schema = _schema()
    import numpy as np
    try:
        model = schema.ModelT.InitFromPackedBuf(tflite, 0)
    except Exception as e:  # the generated unpacker raises whatever a bad offset leads to
        raise src.corrupt(f"{type(e).__name__} while unpacking it") from None
    buffers = list(model.buffers or [])
    metadata = list(model.metadata or [])

    # Buffer indices something other than the entries being replaced refers to: those are never reused.
    hits = [i for i, m in enumerate(metadata) if _as_text(m.name) == key]
    used = {int(b) for b in np.asarray(model.metadataBuffer if model.metadataBuffer is not None else [], np.int64)}
    used |= {int(m.buffer) for i, m in enumerate(metadata) if i not in hits}
    for sg in model.subgraphs or []:
        used |= {int(t.buffer) for t in sg.tensors or []}
    reuse = [metadata[i].buffer for i in hits if 0 < metadata[i].buffer < len(buffers)
             and metadata[i].buffer not in used]
    new_buffer = schema.BufferT()
    new_buffer.data = np.frombuffer(blob, np.uint8)
    if reuse:
        index = int(reuse[0])
        buffers[index] = new_buffer
    else:
        index = len(buffers)
        buffers.append(new_buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = key, index
    if hits:
        metadata[hits[0]] = entry
        metadata = [m for i, m in enumerate(metadata) if i not in hits[1:]]
    else:
        metadata.append(entry)

    aligned = _aligned_buffer_class(schema)
    for i, b in enumerate(buffers):
        a = aligned()
        a.data, a.offset, a.size = b.data, b.offset, b.size
        buffers[i] = a
    model.buffers, model.metadata = buffers, metadata

    # Data stored past the flatbuffer (offsets from the start of the file): keep it, moved as a block.
    external = [(b, "offset", b.size) for b in buffers if b.offset > 1]
    external += [(op, "largeCustomOptionsOffset", op.largeCustomOptionsSize)
                 for sg in model.subgraphs or [] for op in sg.operators or [] if op.largeCustomOptionsOffset > 1]
    if not external:
        return _pack(schema, model)
    for obj, attr, size in external:
        if getattr(obj, attr) + size > len(tflite):
            raise src.corrupt(f"data at byte {getattr(obj, attr):,} (+{size:,}) lies past the end of the file")
    start = min(getattr(obj, attr) for obj, attr, _ in external)
    start -= start % BUFFER_ALIGNMENT
    first = _pack(schema, model)
    new_start = -(-len(first) // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT
    for obj, attr, _ in external:
        setattr(obj, attr, getattr(obj, attr) - start + new_start)
    packed = _pack(schema, model)
    if len(packed) != len(first):  # pragma: no cover - the offsets are present either way, so sizes match
        raise MetadataError("the model's external data could not be relocated (the flatbuffer changed size)")
    return packed + bytes(new_start - len(packed)) + tflite[start:]


def embed_file(path, name: str, record: dict, out_path=None) -> Path:
    """Embed ``record`` into the .tflite at ``path``, writing ``out_path`` (default: ``path``) atomically."""
    path = Path(path)
    out = Path(out_path) if out_path is not None else path
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MetadataError(f"cannot read {path} ({e.strerror or type(e).__name__}); check the path") from None
    new = embed(data, name, record)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(new)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MetadataError(f"cannot write {out} ({e.strerror or type(e).__name__})") from None
    return out
