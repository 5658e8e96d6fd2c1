"""The CLI kit shared by every ``python -m pipeline.*``: argument types, one parser and one ``main`` wrapper.

- argument types (``floats``, ``shape``, ``finite_float``, ``seed_int``, ``severities``, ``class_names``,
  ``emulated_device``) refuse a bad value with one line that names it, through argparse;
- ``Parser`` turns every argparse error into a ``UsageError`` (one line, exit 2, no usage dump) pointing at the
  command's own ``--help`` (a subcommand's parser points at the subcommand's);
- ``run_main`` runs a command's work and maps what ends it to one ``error:`` line on stderr and an exit status:
  a ``PipelineError`` to its ``exit_status``, Ctrl-C to 130, SIGTERM to 143 (through ``errors.raise_on_sigterm``).

Only the CLIs print and exit; library code raises (see errors.py).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable, TypeVar

from pipeline.errors import DataError, PipelineError, Terminated, UsageError, raise_on_sigterm

T = TypeVar("T")

INTERRUPTED_STATUS = 130  # 128 + SIGINT
TERMINATED_STATUS = 143  # 128 + SIGTERM


# --------------------------------------------------------------------------- argument types

def floats(text: str) -> tuple[float, ...]:
    """argparse type: a comma-separated list of finite numbers (``--mean 0.5,0.5,0.5``)."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r} holds a value that is not a finite number")
    return vals


def shape(text: str) -> tuple[int, int, int]:
    """argparse type: ``C,H,W``, three positive integers."""
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not C,H,W (three positive integers)") from None
    if len(vals) != 3 or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r} is not C,H,W (three positive integers)")
    return vals  # type: ignore[return-value]


def finite_float(text: str) -> float:
    """argparse type: a finite number (a NaN limit would make every gate comparison false)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; pass a plain value such as 1.5")
    return v


def seed_int(text: str) -> int:
    """argparse type: a seed, 0 to 2**32 - 1 (what numpy's generators take)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not 0 <= v < 2 ** 32:
        raise argparse.ArgumentTypeError(f"seed {v} is out of range; pass an integer from 0 to {2 ** 32 - 1}")
    return v


def severities(text: str) -> tuple[int, ...]:
    """argparse type: distinct corruption severities 1..5, comma-separated; returned sorted."""
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of severities 1..5") from None
    if not vals or any(v < 1 or v > 5 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"{text!r}: severities must be distinct integers from 1 to 5")
    return tuple(sorted(vals))


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (``--workers``)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def retries(text: str) -> int:
    """argparse type: how often a cell whose worker died is run again, 0..10."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= v <= 10:
        raise argparse.ArgumentTypeError(f"{v} is out of range; pass 0 to 10")
    return v


_RAY_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def ray_address(text: str) -> str:
    """argparse type: ``--ray auto`` (a local Ray instance) or a running cluster's HOST:PORT / ray://HOST:PORT."""
    if text == "auto" or _RAY_ADDRESS.match(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a Ray address; pass auto (a local Ray instance) or HOST:PORT "
                                     "or ray://HOST:PORT of a running cluster's head")


def emulated_device(text: str) -> str:
    """argparse type: a device ``--emulate`` knows (pipeline/device/emulate.py), with a "did you mean"."""
    from pipeline.device.emulate import get_device
    try:
        return get_device(text).name
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def class_names(text: str) -> tuple[str, ...]:
    """argparse type: ``--class-names a,b,...`` (non-empty, distinct, printable names)."""
    from pipeline.inputs.data import parse_class_names
    try:
        return parse_class_names(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--class-names", repr(text), 1)) from None


# --------------------------------------------------------------------------- parser

class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: a ``UsageError`` (exit 2) naming ``PROG --help``.

    Subparsers made with ``add_subparsers(parser_class=Parser)`` get their own prog (``python -m pipeline.study
    precision``), so their errors point at the subcommand's help."""

    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(f"{message}; see {self.prog} --help")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one (an option whose help says its default in words has none)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


# --------------------------------------------------------------------------- main

def _ignore_further_interrupts() -> None:
    """The run is over and exits 130: a second Ctrl-C (or one still on its way) must not kill the process while
    it shuts down, with SIGINT's default action (status -2) instead of that status."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_main(run: Callable[[], T], *, interrupted_note: str = "", then: Callable[[T], int] | None = None) -> int:
    """Run a command's work and return its exit status; the one place that turns failures into ``error:`` lines.

    ``run()`` does the work (parsing included). A ``PipelineError`` prints ``error: MESSAGE`` and returns its
    ``exit_status``; Ctrl-C prints ``error: interrupted`` and returns 130; SIGTERM prints ``error: terminated
    (SIGTERM)`` and returns 143; both followed by ``interrupted_note`` (e.g. ``"; nothing was written to the
    output folder"``), which must stay true wherever the work is stopped. Without ``then``, ``run()``'s result is
    the exit status; with it, ``then(result)`` runs after the work (printing the summary, outside the mapping:
    the note does not hold there) and returns the status.
    """
    raise_on_sigterm()
    try:
        result = run()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print(f"error: interrupted{interrupted_note}", file=sys.stderr)
        return INTERRUPTED_STATUS
    except Terminated:
        print(f"error: terminated (SIGTERM){interrupted_note}", file=sys.stderr)
        return TERMINATED_STATUS
    return then(result) if then is not None else result  # type: ignore[return-value]


def exit_program(status: int):
    """End a command run as a program (``python -m pipeline.export``) with ``status``, as ``SystemExit`` would,
    without the interpreter's teardown: unloading PyTorch's modules and libraries at exit took about 0.6 s here
    (median of 5: ``python -c "import torch"`` 1.89 s, the same ending in ``os._exit`` 1.29 s), paid after the
    work is done. What SystemExit's teardown does that matters still runs: other non-daemon threads are joined,
    the ``atexit`` handlers run (multiprocessing reaps its children, temporary folders are removed), Python's and
    C's buffered output is flushed. Only for ``__main__``: never call it from code that a test or a caller imports.
    """
    import atexit
    import ctypes
    import os
    import threading
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head): nothing more can be shown
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # output a C library buffered
    except (OSError, AttributeError):
        pass
    os._exit(status)
