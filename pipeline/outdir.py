"""The export's output folder (``--out``): checked before any stage, locked, built beside it, swapped in whole.

What ``--out`` may be, checked before the first stage and again right before publishing:

- a path that does not exist: it is created (with any missing parent folders);
- an empty folder: it is used;
- a folder holding an earlier export of this tool (its ``report.json`` is a JSON object with
  ``"kind": "export"``): replaced as a whole, only with ``--overwrite``, and only when every file and folder
  in it (at any depth) is one an export writes (``export_writes``); a user's file is never deleted;
- anything else (another non-empty folder, a file, a dangling symlink) is refused with an ``OutputError``.

A symlink to a folder is resolved: the folder it points to is checked, locked and replaced, and the link
itself is left as it is (it then points to the new export).

The export is built in a hidden staging folder beside ``--out`` (same file system):

    .OUT.tmp-PID-START-XXXX/    PID and process start time of the run that owns it
      export/                   what becomes --out
      tmp/                      TMPDIR of the run and of its conversion worker (onnx2tf, TensorFlow, ...)

and published with one rename (a new or empty ``--out``) or one ``renameat2(RENAME_EXCHANGE)`` (an earlier
export; two renames where the kernel lacks it), after which the old tree is deleted from the staging
folder. The staging folder's name is ASCII (the converters' C++ code takes paths as UTF-8), so an ``--out``
named with any bytes works as long as the folder holding it has a UTF-8 name.

An exclusive ``flock`` on ``.OUT.lock`` (beside ``--out``, holding the owner's PID) keeps two exports from
writing the same ``--out``; staging folders of runs that died (SIGKILL, a power cut) are removed by the next
run to the same ``--out``; a live run's are never touched.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.errors import OutputError

# What an export writes at the top of --out (model_*.tflite besides, one per precision). model.onnx.data: a given
# ONNX model over 2 GB keeps its tensors there; model_recovered.onnx: the graph --recover repaired; firmware/ and firmware.zip: TFLite-Micro targets only.
EXPORT_ARTIFACTS = ("model.onnx", "model.onnx.data", "model_recovered.onnx", "report.json", "report.html",
                    "predictions.npz", "bundle",
                    "bundle.tar.gz", "firmware", "firmware.zip")
# What pipeline/device/bundle.py writes into bundle/ (model_*.tflite besides): tests/test_out_folder.py checks this
# list against a real export.
BUNDLE_FILES = ("preprocessing.json", "samples.npz", "expected_outputs.npz", "requirements.txt", "README.txt",
                "bundle.json", "pi_benchmark.py")
_MODEL = re.compile(r"model_[A-Za-z0-9]+\.tflite")
# What pipeline/device/firmware.py writes into firmware/ (tests/test_firmware.py checks it against a real export).
FIRMWARE_FILES = ("model_data.h", "model_data.cc", "op_resolver.h", "model_settings.h", "sample_data.h", "main.cc",
                  "README.txt")
_FOLDERS = {"bundle": lambda n: n in BUNDLE_FILES or bool(_MODEL.fullmatch(n)),
            "firmware": lambda n: n in FIRMWARE_FILES}


def export_writes(rel: PurePosixPath, is_dir: bool) -> bool:
    """Whether ``rel`` (a path inside --out) is a file or folder an export writes."""
    parts = rel.parts
    if len(parts) == 1:
        name = parts[0]
        if name in _FOLDERS:
            return is_dir
        return not is_dir and (name in EXPORT_ARTIFACTS or bool(_MODEL.fullmatch(name)))
    if len(parts) == 2 and parts[0] in _FOLDERS:
        return not is_dir and _FOLDERS[parts[0]](parts[1])
    return False


def shown(path: Path | str) -> str:
    """A path for messages: bytes that are not UTF-8 escaped (out\\xff), never a UnicodeEncodeError."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- checks

NEW, EMPTY, EARLIER_EXPORT = "new", "empty", "earlier export"


def is_export_folder(folder: Path) -> bool:
    from pipeline.errors import PipelineError
    from pipeline.jsonio import read_object
    try:
        report = read_object(folder / "report.json", "")
    except (OSError, PipelineError):  # unreadable, not JSON, too large or too deep: not an export's report
        return False
    return report.get("kind") == "export"


def foreign_entries(folder: Path) -> list[str]:
    """Files and folders (at any depth) inside an earlier export that no export writes, sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in sorted(dirs) + sorted(files):
            p = base / name
            rel = PurePosixPath(os.fsdecode(p.relative_to(folder)))
            is_dir = p.is_dir() and not p.is_symlink()  # a symlink: an export never writes one
            if p.is_symlink() or not export_writes(rel, is_dir):
                found.append(str(rel) + ("/" if is_dir else ""))
        dirs[:] = [d for d in dirs if not (base / d).is_symlink() and export_writes(
            PurePosixPath(os.fsdecode((base / d).relative_to(folder))), True)]
    return sorted(found)


def resolve(out: Path) -> Path:
    """The folder ``--out`` names: a symlink to a folder is followed; a dangling one or a file is refused."""
    name = shown(out)
    if out.is_symlink() and not out.exists():
        raise OutputError(f"--out {name} is a symlink to {shown(os.readlink(out))}, which does not exist; "
                          "create that folder or pass another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {name} exists and is not a folder; pass a folder path")
    try:
        real = Path(os.path.realpath(out))
    except OSError as e:
        raise OutputError(f"cannot resolve --out {name} ({e.strerror or e}); pass another --out") from None
    try:
        str(real.parent).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(f"the folder holding --out {name} has a name that is not valid UTF-8, which the "
                          "converters cannot open; pass an --out inside a folder with a UTF-8 name") from None
    return real


def check(out: Path, real: Path, overwrite: bool) -> str:
    """What ``real`` (``--out`` resolved) holds now: NEW, EMPTY or EARLIER_EXPORT; refuses anything else."""
    name = shown(out)
    if real.is_symlink() or (real.exists() and not real.is_dir()):  # changed since resolve()
        raise OutputError(f"--out {name} is no longer a folder; pass a folder path")
    if not real.exists():
        return NEW
    try:
        entries = sorted(os.listdir(real))
    except OSError as e:
        raise OutputError(f"cannot read the output folder {name} ({e.strerror or e}); pass a readable --out") \
            from None
    if not entries:
        state = EMPTY
    elif is_export_folder(real):
        if not overwrite:
            raise OutputError(f"--out {name} holds an earlier export (report.json); pass --overwrite to replace "
                              "it as a whole, or another --out")
        foreign = foreign_entries(real)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputError(f"--out {name} holds an earlier export but also {shown(foreign[0])}{more}, which no "
                              f"export writes; --overwrite never deletes your files: move it out of {name} or "
                              "pass another --out")
        state = EARLIER_EXPORT
    else:
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise OutputError(f"--out {name} is a folder that is not empty and holds no earlier export "
                          f"({shown(entries[0])}{more}); pass a new or empty folder as --out")
    if not os.access(real, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {name} is not writable; pass a writable --out")
    return state


# --------------------------------------------------------------------------- processes

def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None when no such process runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        if not Path("/proc/self/stat").exists():  # no procfs: PID liveness only
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return 0
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(pid: int, start: int) -> bool:
    now = _start_time(pid)
    return now is not None and (now == start or now == 0 or start == 0)


_STAGING = re.compile(r"\.tmp-(\d+)-(\d+)-[^/]*")


def _ascii_name(name: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name) or "out"


# --------------------------------------------------------------------------- the lock

class _Lock:
    def __init__(self, path: Path, out_shown: str):
        self.path, self.fd = path, None
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise OutputError(f"another export (PID {pid or 'unknown'}) is writing --out {out_shown} now; wait "
                                  "for it to finish or pass another --out") from None
            try:  # the previous owner may have unlinked the file between our open and flock: retry then
                same = os.stat(path, follow_symlinks=False)
                mine = os.fstat(fd)
                if (same.st_dev, same.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiter that opened it re-checks the path
        os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> str:
    for _ in range(20):  # the owner writes its PID right after taking the lock
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return ""


# --------------------------------------------------------------------------- the staging folder

@dataclass
class OutputFolder:
    """``--out`` claimed for one export: use as a context manager around the whole export."""

    out: Path  # as given (messages)
    real: Path  # resolved
    overwrite: bool
    staging: Path = None  # type: ignore[assignment]
    _lock: _Lock | None = None
    _made: list = field(default_factory=list)  # parent folders this run created
    published: bool = False

    @property
    def work(self) -> Path:
        """Where the export writes its files (becomes --out)."""
        return self.staging / "export"

    @property
    def tmp(self) -> Path:
        """TMPDIR of the export and its workers."""
        return self.staging / "tmp"

    @classmethod
    def claim(cls, out: Path | str, overwrite: bool = False) -> "OutputFolder":
        out = Path(out)
        real = resolve(out)
        check(out, real, overwrite)  # cheap refusals first, before anything is created
        self = cls(out=out, real=real, overwrite=overwrite)
        try:
            for attempt in range(3):
                self._mkparents()
                try:
                    self._lock = _Lock(real.parent / f".{real.name}.lock", shown(out))
                    break
                except FileNotFoundError:  # a concurrent export that made the parent failed and removed it
                    if attempt == 2:
                        raise
            check(out, real, overwrite)  # again, now that no other export can change it
            self._sweep()
            me = os.getpid()  # the owner, for the sweep: PID and start time (a reused PID is another process)
            prefix = f".{_ascii_name(real.name)}.tmp-{me}-{_start_time(me) or 0}-"
            self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=real.parent))
            self.work.mkdir()
            self.tmp.mkdir()
        except OSError as e:
            self.close()
            raise OutputError(f"cannot write the output folder {shown(out)} ({e.strerror or e}); pass a writable "
                              "--out") from None
        except BaseException:
            self.close()
            raise
        return self

    def _mkparents(self) -> None:
        missing = []
        p = self.real.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:  # another export (a study's next cell) made it just now: shared, not ours
                if not p.is_dir():
                    raise
                continue
            self._made.append(p)

    def _sweep(self) -> None:
        prefix = f".{_ascii_name(self.real.name)}.tmp-"
        for p in self.real.parent.iterdir():
            m = _STAGING.fullmatch(p.name[len(prefix) - 5:]) if p.name.startswith(prefix) else None
            if m and p.is_dir() and not p.is_symlink() and not _alive(int(m[1]), int(m[2])):
                shutil.rmtree(p, ignore_errors=True)

    @contextlib.contextmanager
    def temp_files_inside(self):
        """TMPDIR (and ``tempfile``'s default) inside the staging folder while the export runs, so whatever a
        library leaves there (onnxruntime's .ses, onnx2tf's folders, autograph files) goes with it."""
        saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
        os.environ["TMPDIR"] = str(self.tmp)
        tempfile.tempdir = str(self.tmp)
        try:
            yield self.tmp
        finally:
            tempfile.tempdir = saved_tempdir
            if saved_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_env

    @contextlib.contextmanager
    def writing(self, what: str, only_full_disk: bool = False):
        """Turn an OSError (a full disk, above all) while writing ``what`` into one OutputError line;
        ``only_full_disk``: other errors pass (the stages, whose own errors name their cause)."""
        try:
            yield
        except OSError as e:
            if only_full_disk and e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                try:
                    n = shutil.disk_usage(self.real.parent).free
                    free = f"{n / 2**20:.1f} MiB free now" if n >= 2**20 else f"{n // 1024} KiB free now"
                except OSError:
                    free = "free space unknown"
                raise OutputError(f"no space left on the disk of --out {shown(self.out)} while writing {what} "
                                  f"({free}); free some space or pass an --out on another disk; nothing was "
                                  "written") from None
            raise OutputError(f"cannot write {what} for --out {shown(self.out)} ({e.strerror or e}); pass a "
                              "writable --out; nothing was written") from None
        except UnicodeEncodeError as e:  # a C locale without UTF-8 mode (PYTHONUTF8=0 PYTHONCOERCECLOCALE=0)
            raise OutputError(f"cannot write {what}: the locale's encoding ({e.encoding}) cannot encode "
                              f"{e.object[e.start:e.end]!r}; run with a UTF-8 locale (e.g. LC_ALL=C.UTF-8) or "
                              "PYTHONUTF8=1; nothing was written") from None

    def publish(self) -> None:
        """Check --out again, then move the export in: one rename, or one atomic exchange with an earlier
        export (deleted afterwards)."""
        state = check(self.out, self.real, self.overwrite)
        try:
            if state in (NEW, EMPTY):
                os.rename(self.work, self.real)  # replaces an empty folder atomically, fails on a non-empty one
            else:
                _exchange(self.work, self.real)  # the earlier export is now at self.work
                foreign = foreign_entries(self.work)  # a file dropped in between the check and the swap
                if foreign:
                    _exchange(self.work, self.real)  # swap back: the earlier export stays, with that file
                    raise OutputError(f"--out {shown(self.out)} changed while the export ran (it now holds "
                                      f"{shown(foreign[0])}, which no export writes); nothing was replaced: move "
                                      "that file out and run again")
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(f"--out {shown(self.out)} changed while the export ran (it is no longer empty); "
                                  "nothing was written: run again") from None
            raise OutputError(f"cannot move the export into {shown(self.out)} ({e.strerror or e}); pass a "
                              "writable --out; nothing was written") from None
        self.published = True

    def close(self) -> None:
        """Remove the staging folder (with an earlier export swapped out of --out), the lock and any parent
        folder this run created for an --out it did not write."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if not self.published:
            for p in reversed(self._made):
                with contextlib.suppress(OSError):
                    p.rmdir()
        self._made = []

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders: ``renameat2(RENAME_EXCHANGE)`` (one atomic step, Linux 3.15+), else two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), os.fsdecode(b))
    old = a.with_name(a.name + ".old")
    os.rename(b, old)
    try:
        os.rename(a, b)
    except OSError:
        os.rename(old, b)
        raise
    os.rename(old, a)


def default_out_name(model_spec: str, target: str, weights: str | None = None) -> str:
    """The folder an export writes when --out is not given, in the current folder: what the model is, then the
    target. zoo:NAME -> NAME (zoo:refcnn -> refcnn-tflite-int8); an ONNX or TorchScript file -> its stem;
    package.module:factory -> package-module-factory; --weights adds its stem (mymodels:factory --weights run3.pt
    -> mymodels-factory-run3-tflite-int8), so two factories named alike, or two weight files, do not collide."""
    if model_spec.startswith("zoo:"):
        parts = [model_spec[4:]]
    elif model_spec.lower().endswith((".onnx", ".pt", ".pth", ".ptl", ".torchscript")) or ":" not in model_spec:
        parts = [Path(model_spec).stem]
    else:
        module, _, attr = model_spec.rpartition(":")
        parts = [*module.split("."), attr]
    if weights:
        parts.append(Path(weights).stem)
    clean = ["".join(c if c.isalnum() or c in "-_." else "_" for c in part).strip(".") for part in parts]
    return "-".join([c for c in clean if c] or ["model"]) + f"-{target}"

