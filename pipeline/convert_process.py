"""The conversion stage in a worker process whose slow imports start with the export.

The onnx2tf route spends about 5 s importing TensorFlow and onnx2tf before it converts anything (the
``import_s`` timing in the report). ``python -m pipeline.export`` starts this worker before it loads the
model and the data, so those imports run on another core while this process prepares the inputs and
exports ONNX; the ``convert`` stage then waits only for the conversion itself. The worker runs the same
``Converter.convert`` as an in-process conversion (same bytes out: ``tests/test_stages.py`` checks it).

- A ``PipelineError`` raised in the worker is raised again here, same class and message.
- A worker that dies (a crash in TensorFlow, the OOM killer) is reported as a ``ConversionError`` naming
  its exit code.
- The worker converts one model and exits; ``close()`` ends it at once when the export fails earlier.
- The worker dies with the export: the kernel sends it SIGKILL when its parent dies (``PR_SET_PDEATHSIG``,
  even when the parent is SIGKILLed mid-conversion), and it exits on EOF of its pipe while waiting.
- Its temporary files (onnx2tf's folder, TensorFlow's) go to the TMPDIR it inherits: ``export()`` points
  TMPDIR into the export's staging folder, which the next run sweeps if this one is killed.
"""
from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing as mp
import os
import signal
import time

import numpy as np

from . import errors
from .convert import TfliteArtifact, _short, get_converter
from .errors import ConversionError, PipelineError


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the parent dies; exit now if it died already (before the prctl took effect)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe's EOF still ends the wait for a request
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _serve(name: str, verbose: bool, conn, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    try:
        from . import quiet
        quiet.configure(verbose)
        converter = get_converter(name)
        t0 = time.perf_counter()
        preload_error = None
        try:
            converter.preload(verbose)
        except Exception as e:  # reported when (if) a conversion is asked for
            preload_error = e
        preload_s = time.perf_counter() - t0
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the export ended (or was killed) before it needed a conversion
            return
        if msg is None:
            return
        onnx, representative, pre, kwargs = msg
        try:
            if preload_error is not None:
                raise ConversionError(f"cannot import the {name} converter: {_short(preload_error)}; "
                                      "re-run ./setup.sh to reinstall the pinned packages")
            art = converter.convert(onnx, representative, pre, **kwargs)
            # worker_import_s: spent in the worker while this export was still preparing (overlapped)
            timings = {"worker_import_s": round(preload_s, 3),
                       **{k: v for k, v in art.timings_s.items() if k != "import_s"}}
            conn.send(("ok", dataclasses.replace(art, timings_s=timings)))
        except PipelineError as e:
            conn.send(("error", (type(e).__name__, str(e))))
        except Exception as e:
            conn.send(("error", ("ConversionError", f"ONNX -> TFLite conversion failed: {_short(e)}")))
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C reaches the whole group: the parent reports it
        return


class ConverterProcess:
    """One conversion in a spawned worker that imports the converter's dependencies at once."""

    def __init__(self, name: str, verbose: bool = False):
        self.name = get_converter(name).name  # unknown names fail here, in this process
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(name, verbose, child, os.getpid()), name="pipeline-convert",
                                 daemon=True)
        self._proc.start()
        child.close()

    def convert(self, onnx, representative: np.ndarray, pre, **kwargs) -> TfliteArtifact:
        try:
            self._conn.send((onnx, np.ascontiguousarray(representative), pre, kwargs))
            status, payload = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(10)
            raise ConversionError(
                f"the conversion process died (exit code {self._proc.exitcode}) while converting "
                f"{onnx.path.name}; re-run with -v to see its output") from None
        finally:
            self.close()
        if status == "ok":
            return payload
        cls_name, message = payload
        cls = getattr(errors, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, PipelineError)):
            cls = ConversionError
        raise cls(message)

    def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(10)
        self._conn.close()
        self._proc = None
