"""Stage ``micro``: TFLite-Micro targets only: load on TFLite-Micro, measure arena_bytes and flash_bytes
against the board's budgets, and compare TFLite-Micro's outputs with LiteRT's (:mod:`pipeline.runtime.micro`)."""
from __future__ import annotations

import numpy as np

from pipeline.quiet import progress as _progress


def micro(tflite, x_test: np.ndarray, litert_raw: np.ndarray, target, *, limit: int, progress: bool):
    if not target.is_micro:
        return None
    from pipeline.runtime.micro import check
    n = min(limit, len(x_test))
    with _progress(n, "run TFLite-Micro", progress) as bar:
        return check(tflite.path, x_test[:n], tflite.input_layout, litert_raw[:n], target, limit=n, progress=bar)


def gates(result) -> dict:
    """The three device gates of a TFLite-Micro target."""
    from pipeline.report import Gate
    if result is None:
        return {}
    ram, flash = result.ram, result.flash
    return {
        "arena_fits_ram": Gate(passed=ram.fits, value=ram.required_bytes, limit=ram.budget_bytes, reason=ram.reason),
        "model_fits_flash": Gate(passed=flash.fits, value=flash.required_bytes, limit=flash.budget_bytes,
                                 reason=flash.reason),
        # TFLite-Micro's kernels and LiteRT's implement the same int8 arithmetic (the TFLite int8 spec) but
        # may round differently by one step (optimized vs reference kernels, notes devices.md); a larger
        # difference in any output means the two runtimes disagree on the model.
        "tflm_matches_litert": Gate(
            passed=result.max_diff_steps <= 1, value=result.max_diff_steps,
            reason=f"TFLite-Micro vs LiteRT {result.litert_kernels} kernels on the first {result.images} test inputs: "
                   f"max difference {result.max_diff_steps} output step(s), top-1 agreement {result.agreement:.2%}",
            details={"limit_steps": 1, "top1_agreement": result.agreement, "images": result.images}),
    }
