"""Typed errors. Library code raises these; only the CLI prints them and exits.

Each error carries an exit status and a one-line message saying what is wrong and
what to do about it.
"""
from __future__ import annotations


class PipelineError(Exception):
    """Base error: ``exit_status`` 2 means bad input, 1 means a check failed."""

    exit_status = 2

    def __init__(self, message: str):
        # Keep the message on one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(PipelineError):
    """A flag or argument that cannot be used as given."""


class ModelError(PipelineError):
    """A model that cannot be found, read or built."""


class DataError(PipelineError):
    """A dataset that cannot be read or does not fit the model."""


class CalibrationError(PipelineError):
    """A representative dataset that is empty, too small or does not fit the model."""


class TargetError(PipelineError):
    """An unknown target or a target that cannot be used here."""


class OutputError(PipelineError):
    """An output folder that cannot be written."""


class ExportError(PipelineError):
    """PyTorch -> ONNX failed or the ONNX model does not reproduce PyTorch (exit 1: a check failed)."""

    exit_status = 1


class ConversionError(PipelineError):
    """ONNX -> TFLite failed (exit 1: the model cannot meet the target's contract)."""

    exit_status = 1


class NotFullyInt8Error(ConversionError):
    """The converted model still computes in float somewhere."""


class RuntimeStageError(PipelineError):
    """The interpreter could not load or run the converted model."""


class EmulatorError(PipelineError):
    """The emulated device (qemu-user with an aarch64 root, pipeline/device/emulate.py) cannot be built or
    started: a missing tool, no network for the one-time build, a cache folder that cannot be written."""


class Terminated(BaseException):
    """SIGTERM (``timeout``, CI, ``docker stop``) turned into an exception, so clean-up code runs."""


def raise_on_sigterm() -> None:
    """Make SIGTERM raise ``Terminated`` in the main thread (the CLIs catch it like Ctrl-C)."""
    import signal

    def _handler(signum, frame):
        raise Terminated()

    try:
        signal.signal(signal.SIGTERM, _handler)
    except ValueError:  # not the main thread: leave the default
        pass
