"""Reading project JSON (report.json, bundle.json, ...) that may come from someone else.

A received export folder or bundle is data: never code, never a path outside itself. Everything read
from it goes through here:

- :func:`read_object` reads a file of at most ``max_bytes``, nested at most ``max_depth`` deep (checked
  before parsing, so 200k nested brackets never reach the recursive parser), without NaN/Infinity, and
  holding a JSON object;
- :class:`Fields` gets typed fields out of it, with the key path (``artifacts.tflite.path``) in the message;
- :meth:`Fields.inside` turns a path recorded in it into a path inside the folder (relative, no ``..``
  out, no symlink out);
- :func:`sha256_file` digests a file without reading it into memory at once.

Errors are :class:`pipeline.errors.DataError` (exit 2) unless the caller passes another class.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

from pipeline.errors import DataError

MAX_BYTES = 64 << 20  # a report with every tensor of a large model is a few MiB
MAX_DEPTH = 64  # reports nest about 8 deep
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_MISSING = object()


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text (brackets inside strings do not count). Iterative."""
    import numpy as np
    stripped = _STRING.sub(b'""', raw)
    a = np.frombuffer(stripped, np.uint8)
    step = (np.isin(a, (ord("["), ord("{"))).astype(np.int64) - np.isin(a, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(step).max()) if len(step) else 0


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def loads_object(raw: bytes, where: str, fix: str, max_depth: int = MAX_DEPTH, error=DataError) -> dict:
    """Parse JSON text that must be one object of bounded depth."""
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise error(f"{where} nests {depth} levels deep (the limit is {max_depth}); {fix}")
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(f"{where} is not readable JSON ({type(e).__name__}); {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{where} holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def read_object(path: Path, fix: str, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH,
                error=DataError) -> dict:
    """Read ``path``: at most ``max_bytes``, one JSON object nested at most ``max_depth`` deep."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror or type(e).__name__}); {fix}") from None
    if len(raw) > max_bytes:
        raise error(f"{path} is larger than {max_bytes >> 20} MiB, too large for this kind of file; {fix}")
    return loads_object(raw, str(path), fix, max_depth, error)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def inside(folder: Path, rel: str) -> Path | None:
    """``folder/rel`` when ``rel`` is a relative path that stays inside ``folder`` once every symlink is
    resolved; None otherwise (absolute, ``..`` out of it, a symlink pointing out, a NUL byte)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel) or rel.startswith("~"):
        return None
    base = Path(folder).resolve()
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop
        return None
    if target != base and base not in target.parents:
        return None
    return target


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class Fields:
    """Typed access to a JSON object; every message names the file and the key path."""

    def __init__(self, obj: dict, where: str, fix: str, prefix: str = "", error=DataError):
        self.obj, self.where, self.fix, self.prefix, self.error = obj, where, fix, prefix, error

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str, problem: str):
        return self.error(f"{self.where}: {self.key(name)} {problem}; {self.fix}")

    def _get(self, name, required):
        v = self.obj.get(name, _MISSING)
        if v is _MISSING or v is None:
            if required:
                raise self.fail(name, "is missing")
            return _MISSING
        return v

    def has(self, name: str) -> bool:
        return self.obj.get(name) is not None

    def section(self, name: str, required: bool = True) -> "Fields | None":
        v = self._get(name, required)
        if v is _MISSING:
            return None
        if not isinstance(v, dict):
            raise self.fail(name, f"is {_show(v)}, not an object")
        return Fields(v, self.where, self.fix, f"{self.key(name)}.", self.error)

    def str(self, name: str, required: bool = False, choices=None, max_len: int = 4096) -> str | None:
        """A string; absent, null or "" give None (or fail when required)."""
        v = self._get(name, required)
        if v is _MISSING or v == "":
            if required:
                raise self.fail(name, "is empty")
            return None
        if not isinstance(v, str):
            raise self.fail(name, f"is {_show(v)}, not a string")
        if len(v) > max_len or "\x00" in v:
            raise self.fail(name, f"is not a plausible value ({len(v)} characters)")
        if choices is not None and v not in choices:
            raise self.fail(name, f"is {_show(v)}, not one of {', '.join(choices)}")
        return v

    def int(self, name: str, lo: int, hi: int, required: bool = False) -> int | None:
        v = self._get(name, required)
        if v is _MISSING:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(name, f"is {_show(v)}, not an integer")
        if not lo <= v <= hi:
            raise self.fail(name, f"is {v}, outside {lo}..{hi}")
        return v

    def number(self, name: str, lo: float = -math.inf, hi: float = math.inf, required: bool = False) -> float | None:
        v = self._get(name, required)
        if v is _MISSING:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise self.fail(name, f"is {_show(v)}, not a finite number")
        if not lo <= v <= hi:
            raise self.fail(name, f"is {v}, outside {lo}..{hi}")
        return float(v)

    def numbers(self, name: str, min_len: int, max_len: int, lo: float = -math.inf, hi: float = math.inf,
                required: bool = False, integer: bool = False) -> list | None:
        v = self._get(name, required)
        if v is _MISSING:
            return None
        kind = "integers" if integer else "finite numbers"
        if not isinstance(v, list) or not min_len <= len(v) <= max_len:
            size = f"{min_len}" if min_len == max_len else f"{min_len} to {max_len}"
            raise self.fail(name, f"is {_show(v)}, not a list of {size} {kind}")
        for x in v:
            ok = (isinstance(x, int) if integer else isinstance(x, (int, float)) and math.isfinite(x))
            if not ok or isinstance(x, bool):
                raise self.fail(name, f"is {_show(v)}, not a list of {kind}")
            if not lo <= x <= hi:
                raise self.fail(name, f"holds {x}, outside {lo}..{hi}")
        return [int(x) if integer else float(x) for x in v]

    def path_inside(self, name: str, folder: Path, required: bool = False) -> Path | None:
        """A path recorded relative to ``folder`` that must stay inside it (symlinks resolved)."""
        rel = self.str(name, required=required)
        if rel is None:
            return None
        p = inside(folder, rel)
        if p is None:
            raise self.error(f"{self.where}: {self.key(name)} {_show(rel)} leaves the folder {folder} (absolute, "
                             f"'..' or a symlink out); paths in a received folder must stay inside it: {self.fix}")
        return p

    def sha256(self, name: str, required: bool = True) -> str | None:
        v = self.str(name, required=required)
        if v is not None and not is_sha256(v):
            raise self.fail(name, f"is {_show(v)}, not a sha256 digest (64 lowercase hex digits)")
        return v
