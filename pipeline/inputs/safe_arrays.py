"""Reading the user's ``.npy``/``.npz`` files without trusting them.

Every loader of user arrays (``--data x.npz``, ``--calib npz:PATH``, the calibration cache) goes
through here, so a hostile or damaged file gets one clear error instead of a ``MemoryError`` or a
numpy ``ValueError``:

- the ``.npy`` header of each array is read and checked first (version, shape, dtype, order);
- the bytes it declares are checked against what the file (or the zip member) really holds
  (truncated) and against the memory available (too large) before anything is allocated;
- only plain numeric dtypes (bool, int, uint, float) are read; object arrays (pickles) are never
  loaded, and structured, complex, string, void and date dtypes are refused by name; the one exception is
  a ``.npz``'s ``class_names`` (:data:`TEXT_KEYS`): a 1-D numpy unicode (``U``) array, never object dtype;
- a zip that is not a zip, members that are not ``.npy``, duplicate names, members that expand far
  beyond their array (zip bombs), bad CRCs and damaged compressed data are refused.

Errors are raised as the caller's :class:`~pipeline.errors.PipelineError` subclass (``DataError``
by default), all with exit status 2.
"""
from __future__ import annotations

import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, PipelineError

NUMERIC_KINDS = "biuf"
# .npz keys that hold text: a 1-D numpy unicode array (dtype '<U..'), never object dtype (pickles). Bounded so that
# a hostile header cannot declare huge names: at most MAX_TEXT_ITEMS entries of at most MAX_TEXT_CHARS characters.
TEXT_KEYS = ("class_names",)
MAX_TEXT_ITEMS = 100_000
MAX_TEXT_CHARS = 256
# A zip member may hold at most this many bytes beyond its array before it is refused as padded
# (a member that declares gigabytes but whose array needs kilobytes is a zip bomb, not an array).
MAX_TRAILING_BYTES = 1 << 20
_CHUNK = 16 << 20
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
# Archive and decompression failures that mean "this file is damaged".
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, ValueError)
try:  # optional compressors zipfile may use
    import lzma
    _READ_ERRORS += (lzma.LZMAError,)
except ImportError:  # pragma: no cover
    pass


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header declares, validated: shape, dtype, order and where the data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int  # bytes before the array data

    @property
    def count(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000.0
    return f"{n:.3g} PB"  # pragma: no cover


def available_memory() -> int:
    """Bytes of memory this process can still allocate (psutil's ``available``; a large guess without psutil)."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil missing or /proc unreadable
        return 1 << 62


def _dtype_problem(dtype: np.dtype, text: bool = False) -> str | None:
    """Why ``dtype`` cannot be loaded (None: a plain numeric dtype, or with ``text`` a unicode one)."""
    if text and dtype.kind == "U" and dtype.fields is None and dtype.subdtype is None:
        return None
    if text and dtype.kind == "S":
        return f"holds byte strings ({dtype}), not unicode text"
    if text and not dtype.hasobject and dtype.kind in NUMERIC_KINDS:
        return f"holds numbers ({dtype}), not names"
    if dtype.hasobject:
        return "holds pickled Python objects (object dtype), which are never loaded (allow_pickle is off)"
    if dtype.fields is not None or dtype.names is not None:
        return f"has a structured dtype {dtype}, not plain numbers"
    if dtype.subdtype is not None:
        return f"has a sub-array dtype {dtype}, not plain numbers"
    kind = dtype.kind
    if kind == "c":
        return f"holds complex numbers ({dtype})"
    if kind in "SUa":
        return f"holds strings ({dtype})"
    if kind == "V":
        return f"holds raw bytes ({dtype})"
    if kind in "mM":
        return f"holds dates/times ({dtype})"
    if kind not in NUMERIC_KINDS:
        return f"has dtype {dtype}, not plain numbers"
    return None


def read_header(f, where: str, error: type[PipelineError] = DataError) -> NpyHeader:
    """Read and validate the ``.npy`` magic and header at the start of ``f`` (no data is read)."""
    fix = "save it with numpy.save / numpy.savez from a plain numeric array"
    try:
        major, minor = np.lib.format.read_magic(f)
    except (ValueError, EOFError, OSError) as e:
        raise error(f"{where} is not a .npy array ({_short(e)}); {fix}") from None
    try:
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif (major, minor) == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        elif (major, minor) == (3, 0):
            from numpy.lib._format_impl import _read_array_header  # the public API reads 1.0 and 2.0 only
            shape, fortran, dtype = _read_array_header(f, (3, 0))
        else:
            raise ValueError(f"unknown .npy format version {major}.{minor}")
    except ImportError:
        raise error(f"{where} is a .npy version 3.0 file, which this numpy cannot check; {fix}") from None
    except Exception as e:  # a hostile header can make numpy's parser raise almost anything
        raise error(f"{where} has a malformed .npy header ({_short(e)}); {fix}") from None
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise error(f"{where} has a malformed .npy header (shape {shape!r}); {fix}")
    if any(d < 0 for d in shape):
        raise error(f"{where} declares a negative dimension in its shape {shape}; the file is damaged - {fix}")
    if not isinstance(fortran, bool):
        raise error(f"{where} has a malformed .npy header (fortran_order {fortran!r}); {fix}")
    if not isinstance(dtype, np.dtype):
        raise error(f"{where} has a malformed .npy header (dtype {dtype!r}); {fix}")
    try:
        offset = f.tell()
    except (OSError, AttributeError, ValueError):
        offset = -1
    return NpyHeader(shape=shape, dtype=dtype, fortran_order=fortran, offset=offset)


def check_header(h: NpyHeader, where: str, error: type[PipelineError] = DataError, *,
                 holds: int | None = None, memory: int | None = None, text: bool = False) -> None:
    """Refuse a non-numeric dtype, an array larger than ``memory`` or than the ``holds`` bytes after the header.
    ``text`` (a :data:`TEXT_KEYS` member): a 1-D unicode array of bounded size is accepted instead."""
    problem = _dtype_problem(h.dtype, text)
    if problem and text:
        raise error(f"{where} {problem}; store the names as a 1-D unicode array, e.g. "
                    "numpy.savez(path, ..., class_names=numpy.array(['cat', 'dog']))")
    if problem:
        raise error(f"{where} {problem}; store plain numeric arrays (uint8 or float32 images, integer labels)")
    if text:
        fix = "store the names as a 1-D unicode array, e.g. class_names=numpy.array(['cat', 'dog'])"
        if len(h.shape) != 1:
            raise error(f"{where} has shape {h.shape}, not a 1-D list of names; {fix}")
        if h.shape[0] > MAX_TEXT_ITEMS:
            raise error(f"{where} declares {h.shape[0]} names (at most {MAX_TEXT_ITEMS}); {fix}")
        if h.dtype.itemsize // 4 > MAX_TEXT_CHARS:
            raise error(f"{where} has names of up to {h.dtype.itemsize // 4} characters (dtype {h.dtype}; at most "
                        f"{MAX_TEXT_CHARS}); {fix}")
    if h.dtype.itemsize == 0:
        raise error(f"{where} has a zero-size dtype {h.dtype}; store plain numeric arrays")
    shape = "x".join(map(str, h.shape)) or "scalar"
    if holds is not None and holds < h.nbytes:
        raise error(f"{where} is truncated or its header is damaged: the header declares a {shape} {h.dtype} array "
                    f"({human_bytes(h.nbytes)}) but only {human_bytes(max(holds, 0))} of data follow; re-save or "
                    "re-copy the file")
    memory = available_memory() if memory is None else memory
    if h.nbytes > memory:
        raise error(f"{where} declares a {shape} {h.dtype} array of {human_bytes(h.nbytes)}, more than the "
                    f"{human_bytes(memory)} of memory available; use a smaller subset of the data")


def _short(e: BaseException) -> str:
    s = " ".join(str(e).split())[:120]
    return f"{type(e).__name__}: {s}" if s else type(e).__name__


def _read_data(f, h: NpyHeader, where: str, error: type[PipelineError]) -> np.ndarray:
    """The array data after a checked header, read in chunks straight into the array (no second copy)."""
    count = h.count
    try:
        flat = np.empty(count, dtype=h.dtype)
    except (MemoryError, ValueError):
        raise error(f"{where} needs {human_bytes(h.nbytes)} of memory, which cannot be allocated; "
                    "use a smaller subset of the data") from None
    buf = memoryview(flat.view(np.uint8).reshape(-1)) if count else memoryview(b"")
    pos, total = 0, len(buf)
    while pos < total:
        n = f.readinto(buf[pos:pos + _CHUNK])
        if not n:
            raise error(f"{where} is truncated: {human_bytes(pos)} of its {human_bytes(total)} of array data "
                        "are present; re-save or re-copy the file")
        pos += n
    if h.fortran_order and len(h.shape) > 1:
        return flat.reshape(h.shape[::-1]).transpose()
    return flat.reshape(h.shape)


def _open_regular(path: Path, where: str, error: type[PipelineError]):
    if not path.exists():
        raise error(f"{where} does not exist; check the path")
    if path.is_dir():
        raise error(f"{where} is a folder, not a file; pass the file's path")
    if not path.is_file():
        raise error(f"{where} is not a regular file; pass a .npz/.npy file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise error(f"cannot read {where} ({e.strerror or e}); check its permissions") from None


def load_npy(path: Path | str, what: str | None = None, error: type[PipelineError] = DataError,
             memory: int | None = None) -> np.ndarray:
    """A ``.npy`` file as an array, after checking its header against the file size and the memory."""
    path = Path(path)
    where = what or str(path)
    with _open_regular(path, where, error) as f:
        h = read_header(f, where, error)
        size = os.fstat(f.fileno()).st_size
        check_header(h, where, error, holds=size - h.offset, memory=memory)
        try:
            return _read_data(f, h, where, error)
        except OSError as e:
            raise error(f"cannot read {where} ({_short(e)}); re-copy the file") from None


class SafeNpz:
    """An ``.npz`` archive opened for checked reading: ``files`` (keys without ``.npy``), ``header(key)``
    and ``load(key)``. Use as a context manager."""

    def __init__(self, path: Path | str, what: str | None = None, error: type[PipelineError] = DataError):
        self.path = Path(path)
        self.where = what or str(self.path)
        self.error = error
        f = _open_regular(self.path, self.where, error)
        try:
            head = f.read(8)
            f.seek(0)
        except OSError as e:
            f.close()
            raise error(f"cannot read {self.where} ({e.strerror or e}); check the file") from None
        if not head.startswith(_ZIP_MAGICS):
            f.close()
            raise error(f"{self.where} is not a readable .npz archive ({_what_is(head)}); save the arrays with "
                        "numpy.savez(path, name=array, ...)")
        try:
            self._zip = zipfile.ZipFile(f)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            f.close()
            raise error(f"{self.where} is a damaged or truncated .npz archive ({_short(e)}); re-save or re-copy "
                        "the file") from None
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if key in self._members:
                self.close()
                raise error(f"{self.where} holds two arrays named {key!r}; an .npz must name each array once - "
                            "re-save it with numpy.savez")
            self._members[key] = info
        self._headers: dict[str, NpyHeader] = {}

    @property
    def files(self) -> list[str]:
        return list(self._members)

    def __contains__(self, key: str) -> bool:
        return key in self._members

    def __enter__(self) -> "SafeNpz":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        fp = getattr(self._zip, "fp", None)
        self._zip.close()
        if fp is not None:
            fp.close()

    def _where(self, key: str) -> str:
        return f"{self.where}: array {key}"

    def _open_member(self, key: str):
        info = self._members[key]
        if info.flag_bits & 0x1:
            raise self.error(f"{self._where(key)} is encrypted; save the archive without a password")
        return self._zip.open(info)

    def header(self, key: str) -> NpyHeader:
        """The checked header of ``key`` (dtype and size against the member; not yet against memory)."""
        if key not in self._headers:
            where = self._where(key)
            info = self._members[key]
            try:
                with self._open_member(key) as f:
                    h = read_header(_Prefix(f), where, self.error)
            except PipelineError:
                raise
            except _READ_ERRORS as e:
                raise self._damaged(where, e) from None
            holds = info.file_size - h.offset
            check_header(h, where, self.error, holds=holds, memory=1 << 62, text=key in TEXT_KEYS)
            if holds - h.nbytes > MAX_TRAILING_BYTES:
                raise self.error(f"{where} expands to {human_bytes(info.file_size)} but its array needs only "
                                 f"{human_bytes(h.nbytes)} (a zip bomb or a damaged archive); re-save the file "
                                 "with numpy.savez")
            self._headers[key] = h
        return self._headers[key]

    def check_memory(self, keys, memory: int | None = None) -> None:
        """Refuse when the arrays ``keys`` together need more memory than is available."""
        memory = available_memory() if memory is None else memory
        total = 0
        for k in keys:
            h = self.header(k)
            check_header(h, self._where(k), self.error, memory=memory, text=k in TEXT_KEYS)
            total += h.nbytes
        if total > memory:
            raise self.error(f"{self.where}: arrays {', '.join(keys)} need {human_bytes(total)} together, more than "
                             f"the {human_bytes(memory)} of memory available; use a smaller subset of the data")

    def load(self, key: str, memory: int | None = None) -> np.ndarray:
        h = self.header(key)
        where = self._where(key)
        check_header(h, where, self.error, memory=memory, text=key in TEXT_KEYS)
        try:
            with self._open_member(key) as f:
                f.read(h.offset)
                a = _read_data(f, h, where, self.error)
                rest = self._members[key].file_size - h.offset - h.nbytes
                while rest > 0:  # read to the end so that zipfile checks the CRC
                    got = f.read(min(rest, _CHUNK))
                    if not got:
                        break
                    rest -= len(got)
                f.read(1)
        except PipelineError:
            raise
        except _READ_ERRORS as e:
            raise self._damaged(where, e) from None
        return a

    def _damaged(self, where: str, e: BaseException) -> PipelineError:
        if isinstance(e, zipfile.BadZipFile) and "CRC" in str(e):
            return self.error(f"{where} is corrupt (bad CRC-32: its bytes were altered); re-save or re-copy the file")
        return self.error(f"{where} cannot be read: the archive is damaged ({_short(e)}); re-save or re-copy the file")


class _Prefix(io.RawIOBase):
    """Reads from a zip member; ``tell()`` counts the bytes read (zip members cannot always tell)."""

    def __init__(self, f):
        self._f, self._pos = f, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._pos += len(b)
        return b

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def tell(self) -> int:
        return self._pos


def _what_is(head: bytes) -> str:
    if head.startswith(_NPY_MAGIC):
        return "it is a single .npy array"
    if head[:1] == b"\x80":
        return "it looks like a Python pickle, which is never loaded"
    if head[:2] == b"\x1f\x8b":
        return "it is gzip-compressed"
    if not head:
        return "it is empty"
    return "not a zip file"


def load_npz(path: Path | str, keys, what: str | None = None, error: type[PipelineError] = DataError,
             memory: int | None = None, optional=()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` archive, each checked (header, size, dtype, CRC); all of them must
    be present, and together fit in memory, before any is read. ``optional`` keys are read too when present
    (e.g. ``class_names``, a :data:`TEXT_KEYS` member)."""
    keys = list(keys)
    with SafeNpz(path, what, error) as z:
        missing = [k for k in keys if k not in z]
        if missing:
            raise error(f"{z.where} lacks {', '.join(missing)}; it must hold arrays {', '.join(keys)} "
                        f"(it holds {', '.join(z.files) or 'none'})")
        keys += [k for k in optional if k in z and k not in keys]
        z.check_memory(keys, memory)
        return {k: z.load(k, memory) for k in keys}


def load_array(path: Path | str, keys, what: str | None = None, error: type[PipelineError] = DataError,
               memory: int | None = None) -> tuple[np.ndarray, str]:
    """A ``.npy`` file, or the first of ``keys`` present in an ``.npz`` archive: ``(array, key)``
    (key ``"(.npy array)"`` for a ``.npy`` file)."""
    path = Path(path)
    where = what or str(path)
    f = _open_regular(path, where, error)
    try:
        head = f.read(8)
    except OSError as e:
        raise error(f"cannot read {where} ({e.strerror or e}); check the file") from None
    finally:
        f.close()
    if head.startswith(_NPY_MAGIC):
        return load_npy(path, where, error, memory), "(.npy array)"
    if not head.startswith(_ZIP_MAGICS):
        raise error(f"{where} is neither an .npz archive nor a .npy array ({_what_is(head)}); save the images with "
                    "numpy.savez(path, x=images)")
    with SafeNpz(path, where, error) as z:
        key = next((k for k in keys if k in z), None)
        if key is None:
            raise error(f"{where} has arrays {', '.join(z.files) or '(none)'} but no {', '.join(keys)}; store the "
                        f"images under the key {' or '.join(keys[:2])}")
        return z.load(key, memory), key
