"""Keep TensorFlow, absl, onnx2tf and the TFLite converter quiet unless -v is given.

Much of their chatter is printed by native code straight to file descriptors 1 and 2,
so Python-level redirection is not enough: :func:`captured` swaps the descriptors for a
temporary file and hands back what was printed (shown on failure or with -v).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings


def configure(verbose: bool) -> None:
    """Set log levels before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # bit-stable float results across runs
    os.environ.setdefault("GLOG_minloglevel", "0" if verbose else "3")
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        for name in ("tensorflow", "absl", "onnx2tf", "h5py", "jax"):
            logging.getLogger(name).setLevel(logging.ERROR)


class Captured:
    def __init__(self):
        self.text = ""


@contextlib.contextmanager
def captured(verbose: bool = False):
    """Redirect native stdout/stderr to a temp file unless verbose; yields a Captured."""
    cap = Captured()
    if verbose:
        yield cap
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    # Python-level prints too: where sys.stdout is not file descriptor 1 (Jupyter, pytest's capture) they would
    # bypass the redirection, and onnx2tf prints the failing node's name with print()
    py = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as tmp, \
            contextlib.redirect_stdout(py), contextlib.redirect_stderr(py):
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield cap
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:
                pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            cap.text = tmp.read().decode(errors="replace") + py.getvalue()


def tail(text: str, lines: int = 3) -> str:
    """The last meaningful lines of captured tool output, joined on one line."""
    keep = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("I0000", "W0000", "WARNING: All log"))]
    return " | ".join(keep[-lines:])[:400]


class progress:
    """A tqdm bar on stderr when ``enabled`` (a terminal); yields its ``update`` callable, or None."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.bar = total, desc, enabled, None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=self.desc, unit="img", leave=False, file=sys.stderr)
            return self.bar.update
        return None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
