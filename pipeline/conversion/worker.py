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

from pipeline import errors
from pipeline.conversion import TfliteArtifact, get_converter
from pipeline.conversion.onnx2tf_tflite import _short
from pipeline.errors import ConversionError, PipelineError
from pipeline.execution.local import STOP_SIGNALS, stop_signals_deferred


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


def _serve(name: str, verbose: bool, conn, parent_pid: int | None = None, low_priority: bool = False) -> None:
    # Started with SIGINT and SIGTERM held (stop_signals_deferred): Ctrl-C is the parent's, which reports it and
    # terminates this process; then the held signals are let through.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if low_priority:  # an early worker that may not be needed: its imports yield the CPU to the export's own work
        try:
            os.nice(10)
        except OSError:
            pass
    from pipeline.conversion.offline import block_network
    block_network()  # a conversion never touches the network (conversion/offline.py)
    try:
        from pipeline import quiet
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
        if low_priority:  # needed after all: back to the export's priority where allowed (root; else stays niced)
            try:
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
            except OSError:
                pass
        onnx, representative, pre, kwargs, source, check = msg
        try:
            if preload_error is not None:
                raise ConversionError(f"cannot import the {name} converter: {_short(preload_error)}; "
                                      "re-run ./setup.sh to reinstall the pinned packages")
            if getattr(converter, "needs", "onnx") == "torch":
                art = converter.convert_torch(torch_module(name, source), representative, pre, **kwargs)
            else:
                art = converter.convert(onnx, representative, pre, **kwargs)
            # worker_import_s: spent in the worker while this export was still preparing (overlapped)
            timings = {"worker_import_s": round(preload_s, 3),
                       **{k: v for k, v in art.timings_s.items() if k != "import_s"}}
            art = dataclasses.replace(art, timings_s=timings)
            # The check run: on LiteRT, here, so a model whose kernels abort (seen: a PADV2 with a 1e36 scale)
            # kills this worker, not the export.
            outputs = check_run(art, check) if check is not None else None
            conn.send(("ok", (art, outputs)))
        except PipelineError as e:
            conn.send(("error", (type(e).__name__, str(e))))
        except Exception as e:
            conn.send(("error", ("ConversionError", f"ONNX -> TFLite conversion failed: {_short(e)}")))
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C reaches the whole group: the parent reports it
        return


def torch_module(route: str, source):
    """The PyTorch module of the model the user named on the command line. ``source``: (spec, weights, state):
    ``state`` holds the export's own parameters as arrays (a factory built without --weights is a random
    initialisation, different in every process)."""
    import torch

    from pipeline.inputs import models
    if source is None:
        raise ConversionError(f"the {route} route converts the PyTorch model itself; none was given")
    spec, weights, state = source
    model = models.load(spec, weights)
    if model.module is None or model.kind == "torchscript":
        raise ConversionError(f"the {route} route converts a PyTorch nn.Module (zoo:NAME or package.module:factory); "
                              f"{model.spec} is a {model.kind} model")
    if state is not None:
        model.module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model.module.eval()


def check_run(art, check) -> np.ndarray:
    """The converted model's float outputs on ``check`` = (inputs N×C×H×W, kernels, batch size)."""
    from pipeline.runtime.litert import TfliteRunner
    inputs, kernels, batch = check
    runner = TfliteRunner(art.path, kernels=kernels, threads=1, batch_size=batch, input_layout=art.input_layout)
    return runner.run(inputs).outputs


def signal_text(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"died with {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"died with signal {-exitcode}"
    return f"died (exit code {exitcode})"


class ConverterProcess:
    """One conversion in a spawned worker that imports the converter's dependencies at once."""

    def __init__(self, name: str, verbose: bool = False, low_priority: bool = False):
        self.name = get_converter(name).name  # unknown names fail here, in this process
        self.route = name  # the registry key (routes())
        self._answered = False
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(name, verbose, child, os.getpid(), low_priority),
                                 name="pipeline-convert",
                                 daemon=True)
        with stop_signals_deferred():  # a Ctrl-C while it starts up would end it with a traceback (see _serve)
            self._proc.start()
        child.close()

    def convert(self, onnx, representative: np.ndarray, pre, **kwargs) -> TfliteArtifact:
        try:
            return self.convert_checked(onnx, representative, pre, **kwargs)[0]
        finally:
            self.close()

    def convert_checked(self, onnx, representative: np.ndarray, pre, *, source=None, check=None, **kwargs):
        """(TfliteArtifact, outputs on ``check`` or None). ``source``: (model spec, weights) for routes that
        convert the PyTorch model; ``check``: (inputs, kernels, batch) run on LiteRT in the worker.

        After an answer the worker exits by itself (its TensorFlow teardown takes about a second and a half):
        the caller's ``close()``, at the end of the export, reaps it instead of waiting here."""
        try:
            self._conn.send((onnx, np.ascontiguousarray(representative), pre, kwargs, source, check))
            status, payload = self._conn.recv()
            self._answered = True
        except (EOFError, OSError):
            self._proc.join(10)
            during = f"converting {onnx.path.name}" + (" or running the converted model on LiteRT (the quick "
                                                          "check)" if check is not None else "")
            message = (f"the {self.name} conversion process {signal_text(self._proc.exitcode)} while {during}; "
                       "re-run with -v to see its output")
            self.close()
            raise ConversionError(message) from None
        if status == "ok":
            return payload
        self.close()
        cls_name, message = payload
        cls = getattr(errors, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, PipelineError)):
            cls = ConversionError
        raise cls(message)

    def get(self, route: str) -> "ConverterProcess | None":
        """This worker when it runs ``route``."""
        return self if route == self.route else None

    def close(self, keep: str | None = None) -> None:
        """End the worker (not when it runs route ``keep``)."""
        if self._proc is None or keep == self.route:
            return
        if self._answered:  # it has sent its result and is exiting: let it finish (its exit handlers release the
            self._proc.join(30)  # semaphores it made; killed there, the resource tracker reports them leaked)
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(10)
        self._conn.close()
        self._proc = None


class EarlyWorkers:
    """The workers an export starts before anything else, one per route (``--converter auto``: the direct writer's,
    light, and the onnx2tf route's, niced): each route's imports overlap the first stages."""

    def __init__(self, procs: list[ConverterProcess]):
        self.procs = {p.route: p for p in procs}

    def get(self, route: str) -> ConverterProcess | None:
        return self.procs.get(route)

    def close(self, keep: str | None = None) -> None:
        for p in self.procs.values():
            p.close(keep)
