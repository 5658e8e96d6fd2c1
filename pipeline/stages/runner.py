"""Times the steps of a line into ``timings_s`` and prints one progress line per step."""
from __future__ import annotations

import sys
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class Steps:
    """``steps(name, fn, *args)`` runs one step, times it and logs ``[i/N] name  1.23s``.

    ``names`` is the line's literal list of step names; a step run out of that order is a programming error
    (the test suite runs the line, so a stage added to the code but not to the list fails there)."""

    def __init__(self, names: tuple[str, ...], log: Callable = print, writing=None):
        self.names, self.log, self.writing = names, log, writing
        self.timings: dict[str, float] = {}
        self._next = 0

    def __call__(self, name: str, fn: Callable[..., T], *args, **kwargs) -> T:
        self._advance(name)
        t0 = time.perf_counter()
        if self.writing is not None:  # a full disk during a stage is one OutputError line
            with self.writing(f"the {name} stage's files", only_full_disk=True):
                out = fn(*args, **kwargs)
        else:
            out = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - t0, 3)
        shown = "skipped (not this target)" if out is None else f"{self.timings[name]:6.2f}s"
        self.log(f"[{self._next}/{len(self.names)}] {name:<12} {shown}", file=sys.stderr)
        return out

    def skip(self, name: str, why: str = "not this target") -> None:
        self._advance(name)
        self.log(f"[{self._next}/{len(self.names)}] {name:<12} skipped ({why})", file=sys.stderr)
        return None

    def _advance(self, name: str) -> None:
        if self._next >= len(self.names) or self.names[self._next] != name:
            expected = self.names[self._next] if self._next < len(self.names) else "nothing"
            raise RuntimeError(f"step {name!r} ran where the line lists {expected!r}")
        self._next += 1
