"""Microcontroller check: the int8 model on the TFLite-Micro interpreter (``tflite-micro`` wheel).

For targets whose runtime is ``tflite-micro`` this stage

1. loads the model into TFLite-Micro; a model it cannot load (an op without a TFLite-Micro
   kernel, a hybrid or float16 graph, a type a kernel rejects in Prepare) fails the export
   with the ops named;
2. measures ``arena_bytes`` with the RecordingMicroAllocator ("Arena allocation total N
   bytes" from ``print_allocations()``, which writes to the process's native stderr, so
   fd 2 is captured), then reloads the model into an arena of exactly that size (+16 bytes
   of alignment slack, as TFLite-Micro's ``arena_used_bytes`` docs advise) to prove it is
   enough, and runs the inputs in that arena;
3. takes ``flash_bytes`` as the .tflite size (the flatbuffer is linked into flash as is);
4. checks both against the target's RAM and flash budgets with the target's margin:
   fits when need × (1 + margin) ≤ budget;
5. runs a fixed subset of the test inputs (the first ``limit``; the interpreter is batch-1
   and slow on a host) and compares the outputs with LiteRT's on the same inputs: top-1
   agreement and the largest difference in output quantization steps.

The wheel links TFLite-Micro's reference kernels; a CMSIS-NN build asks for extra scratch
buffers in the arena, which is what the target's ``arena_margin`` covers. Host TFLite-Micro
timings say nothing about a microcontroller's latency and are labelled as such.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import quiet
from pipeline.errors import ConversionError, RuntimeStageError

ALIGNMENT_SLACK = 16  # TFLite-Micro: "the optimal arena size would be arena_used_bytes() + 16" if unaligned
PROBE_ARENA_BYTES = 16 * 1024 * 1024  # generous arena for the first load, so the need can be measured

_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
_HEAD = re.compile(r"Arena allocation head (\d+) bytes")
_TAIL = re.compile(r"Arena allocation tail (\d+) bytes")
_CATEGORY = re.compile(r"'([^']+)' used (\d+) bytes")
_MISSING_OP = re.compile(r"Didn't find op for builtin opcode '([^']+)'(?: version '(\d+)')?")
_FAILED_NODE = re.compile(r"Node (\S+) \(number (\d+)\) failed to (prepare|invoke)")
_ALLOC_FAIL = re.compile(r"Failed to allocate (?:tail|head|temp)? ?memory\. Requested: (\d+)")


class MicroUnsupportedError(ConversionError):
    """TFLite-Micro cannot load or run the model (exit 1: the model cannot meet the target's contract)."""


@dataclass(frozen=True)
class ArenaUse:
    """What TFLite-Micro's RecordingMicroAllocator reports after AllocateTensors and an invoke."""

    total_bytes: int
    head_bytes: int  # planned non-persistent tensors (the memory planner's arena)
    tail_bytes: int  # persistent allocations
    categories: dict = field(default_factory=dict)  # category -> bytes used (with alignment overhead)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "head_bytes": self.head_bytes, "tail_bytes": self.tail_bytes,
                "categories": dict(self.categories)}


def parse_allocations(text: str) -> ArenaUse:
    """Parse the text of ``print_allocations()``; raise when there is no "Arena allocation total" line."""
    m = _TOTAL.search(text)
    if not m:
        raise RuntimeStageError("TFLite-Micro printed no 'Arena allocation total' line; the interpreter must be "
                                "built with InterpreterConfig.kAllocationRecording")
    head, tail = _HEAD.search(text), _TAIL.search(text)
    return ArenaUse(total_bytes=int(m.group(1)), head_bytes=int(head.group(1)) if head else 0,
                    tail_bytes=int(tail.group(1)) if tail else 0,
                    categories={k: int(v) for k, v in _CATEGORY.findall(text)})


def _diagnose(text: str, model_ops: list[str], arena_size: int) -> str:
    """One line naming why TFLite-Micro refused the model, from its native log."""
    missing = sorted({f"{op} (version {v})" if v else op for op, v in _MISSING_OP.findall(text)})
    if missing:
        return (f"TFLite-Micro has no kernel for {', '.join(missing)} (the interpreter stops at the first missing "
                f"op; the model's ops: {', '.join(model_ops)})")
    lines = [ln.strip() for ln in text.replace("\r", "").splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        m = _FAILED_NODE.search(ln)
        if m:
            why = lines[i - 1] if i > 0 else ""
            why = re.sub(r"^\S+\.cc:?\d*\s*", "", why)  # drop the source-file prefix
            return f"TFLite-Micro rejects {m.group(1)} (node {m.group(2)}) in {m.group(3)}: {why or 'no reason printed'}"
    if _ALLOC_FAIL.search(text):
        return f"the model needs more than the {arena_size:,}-byte probe arena"
    return "TFLite-Micro failed to allocate tensors: " + (quiet.tail(text) or "no message")


def load(model_path: Path, arena_size: int, model_ops: list[str] | None = None):
    """A TFLite-Micro interpreter with the recording allocator; raise MicroUnsupportedError naming the cause."""
    try:
        from tflite_micro import runtime
    except ImportError:
        from pipeline.errors import TargetError
        raise TargetError("microcontroller targets need the tflite-micro package (x86_64 Linux wheels only): "
                          "pip install -e '.[micro]'") from None
    with quiet.captured(verbose=False) as cap:  # TFLite-Micro logs to the native stdout/stderr
        try:
            interp = runtime.Interpreter.from_file(
                str(model_path), arena_size=int(arena_size),
                intrepreter_config=runtime.InterpreterConfig.kAllocationRecording)  # (sic) the package's spelling
        except Exception:
            interp = None
    if interp is None:
        reason = _diagnose(cap.text, model_ops or [], arena_size)
        raise MicroUnsupportedError(f"{reason}; replace those ops with ones TFLite-Micro supports in int8 "
                                    "or choose a LiteRT target (python -m pipeline.export --list-targets)")
    return interp


def arena_use(interp) -> ArenaUse:
    """Capture ``print_allocations()`` from the native stderr and parse it."""
    with quiet.captured(verbose=False) as cap:
        interp.print_allocations()
    return parse_allocations(cap.text)


def _quantize_input(interp, x_model_layout: np.ndarray) -> np.ndarray:
    d = interp.get_input_details(0)
    dtype = np.dtype(d["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return np.ascontiguousarray(x_model_layout, dtype)
    q = d["quantization_parameters"]
    from pipeline.runtime.litert import quantize
    return quantize(x_model_layout, float(q["scales"][0]), int(q["zero_points"][0]), dtype)


def _invoke(interp, x: np.ndarray) -> np.ndarray:
    interp.set_input(x, 0)
    interp.invoke()
    return np.array(interp.get_output(0), copy=True)


@dataclass(frozen=True)
class BudgetCheck:
    name: str  # "ram" or "flash"
    need_bytes: int  # measured need (arena_bytes or flash_bytes)
    margin: float
    required_bytes: int  # ceil(need * (1 + margin))
    budget_bytes: int | None
    fits: bool
    reason: str

    def to_dict(self) -> dict:
        return {"need_bytes": self.need_bytes, "margin": self.margin, "required_bytes": self.required_bytes,
                "budget_bytes": self.budget_bytes, "fits": self.fits, "reason": self.reason}


def check_budget(name: str, need: int, margin: float, budget: int | None, what: str, board: str) -> BudgetCheck:
    required = int(math.ceil(need * (1.0 + margin)))
    if budget is None:
        return BudgetCheck(name, need, margin, required, None, True, f"no {name} budget in the target profile")
    fits = required <= budget
    verdict = "fits" if fits else "does not fit"
    reason = (f"{what} {need:,} B x (1 + {margin:g} margin) = {required:,} B {verdict} the {budget:,} B {name} "
              f"budget of {board} ({100.0 * required / budget:.1f}% used)")
    return BudgetCheck(name, need, margin, required, budget, fits, reason)


@dataclass(frozen=True)
class MicroResult:
    arena: ArenaUse
    arena_bytes: int
    arena_verified: bool  # reloaded into exactly arena_bytes (+16) and ran every input there
    flash_bytes: int
    ram: BudgetCheck
    flash: BudgetCheck
    images: int
    agreement: float  # top-1 agreement, TFLite-Micro vs LiteRT on the same inputs
    max_diff_steps: int  # largest |TFLM - LiteRT| over all outputs, in output quantization steps
    differing_values: float  # fraction of output values that differ at all
    litert_kernels: str
    raw_outputs: np.ndarray
    seconds: float
    model_ops: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return self.ram.fits and self.flash.fits

    def describe(self) -> dict:
        return {
            "runtime": "tflite-micro (Python wheel, reference kernels, on this host)",
            "arena_bytes": self.arena_bytes,
            "arena": self.arena.to_dict(),
            "arena_measured_by": "RecordingMicroAllocator print_allocations() 'Arena allocation total', captured "
                                 "from native stderr, after AllocateTensors and one invoke",
            "arena_verified": self.arena_verified,
            "arena_verified_how": f"reloaded with arena_size = arena_bytes + {ALIGNMENT_SLACK} and ran every "
                                  "compared input in that arena",
            "flash_bytes": self.flash_bytes,
            "flash_measured_by": ".tflite file size (the flatbuffer as linked into flash; code not included)",
            "ram_check": self.ram.to_dict(),
            "flash_check": self.flash.to_dict(),
            "cmsis_nn_caveat": "the wheel runs TFLite-Micro's reference kernels; CMSIS-NN conv/depthwise/fully-"
                               "connected kernels request extra scratch buffers, so a CMSIS-NN build can need "
                               "more arena than measured here (covered by the margin, not measured)",
            "compared_with_litert": {
                "images": self.images,
                "subset": f"the first {self.images} test inputs (TFLite-Micro is batch-1 and slow on a host)",
                "litert_kernels": self.litert_kernels,
                "top1_agreement": self.agreement,
                "max_diff_steps": self.max_diff_steps,
                "differing_values": self.differing_values,
            },
            "host_seconds": round(self.seconds, 3),
            "host_images_per_s": round(self.images / self.seconds, 1) if self.seconds > 0 else None,
            "host_timing_note": "TFLite-Micro reference kernels on this host's CPU; says nothing about "
                                "microcontroller latency",
            "ops": list(self.model_ops),
        }


def check(model_path: Path, x_nchw: np.ndarray, input_layout: str, litert_raw: np.ndarray, target,
          limit: int = 1000, progress=None) -> MicroResult:
    """Load, measure and run ``model_path`` on TFLite-Micro; compare with LiteRT's raw outputs.

    ``x_nchw`` are normalised float inputs (the preprocessing record's output); ``litert_raw``
    are LiteRT's raw (integer) outputs for the same inputs, in the same order.
    """
    from pipeline.tflite.inspect import inspect
    model_path = Path(model_path)
    flash_bytes = model_path.stat().st_size
    model_ops = tuple(inspect(model_path).ops)
    probe = max(PROBE_ARENA_BYTES, 10 * flash_bytes)
    interp = load(model_path, probe, list(model_ops))
    n = int(min(limit, len(x_nchw), len(litert_raw)))
    if n <= 0:
        raise RuntimeStageError("no inputs to run on TFLite-Micro; pass --micro-limit of at least 1")
    x = np.transpose(x_nchw[:n], (0, 2, 3, 1)) if input_layout == "NHWC" else np.asarray(x_nchw[:n])
    in_shape = tuple(int(v) for v in interp.get_input_details(0)["shape"])
    if in_shape[0] != 1 or tuple(in_shape[1:]) != tuple(x.shape[1:]):
        raise RuntimeStageError(f"TFLite-Micro sees input shape {in_shape}, expected (1, {', '.join(map(str, x.shape[1:]))})")
    xq = _quantize_input(interp, x)
    try:
        _invoke(interp, xq[:1])
    except Exception as e:
        raise MicroUnsupportedError(f"TFLite-Micro cannot run the model: {str(e).strip()[:200]}") from None
    arena = arena_use(interp)
    del interp

    arena_bytes = arena.total_bytes
    try:
        tight = load(model_path, arena_bytes + ALIGNMENT_SLACK, list(model_ops))
    except MicroUnsupportedError as e:
        raise RuntimeStageError(f"TFLite-Micro reported an arena of {arena_bytes:,} bytes but cannot allocate the "
                                f"model in {arena_bytes + ALIGNMENT_SLACK:,} bytes ({e}); report this with the model") from None
    raw = None
    t0 = time.perf_counter()
    try:
        for i in range(n):
            y = _invoke(tight, xq[i:i + 1])
            if raw is None:
                raw = np.empty((n, *y.shape[1:]), y.dtype)
            raw[i] = y[0]
            if progress:
                progress(1)
    except Exception as e:
        raise RuntimeStageError(f"TFLite-Micro failed to run input {i} in a {arena_bytes + ALIGNMENT_SLACK:,}-byte "
                                f"arena: {str(e).strip()[:200]}") from None
    seconds = time.perf_counter() - t0

    ref = np.asarray(litert_raw[:n]).reshape(raw.shape)
    if ref.dtype != raw.dtype:
        raise RuntimeStageError(f"TFLite-Micro outputs {raw.dtype}, LiteRT {ref.dtype}: not the same model")
    diff = np.abs(raw.astype(np.int64) - ref.astype(np.int64))
    flat_m, flat_r = raw.reshape(n, -1), ref.reshape(n, -1)
    board = target.device
    return MicroResult(
        arena=arena, arena_bytes=arena_bytes, arena_verified=True, flash_bytes=flash_bytes,
        ram=check_budget("RAM", arena_bytes, target.arena_margin, target.ram_bytes, "arena_bytes", board),
        flash=check_budget("flash", flash_bytes, target.flash_margin, target.flash_bytes, "flash_bytes", board),
        images=n, agreement=float(np.mean(flat_m.argmax(1) == flat_r.argmax(1))),
        max_diff_steps=int(diff.max()), differing_values=float(np.mean(diff > 0)),
        litert_kernels=target.run_kernels, raw_outputs=raw, seconds=seconds, model_ops=model_ops,
    )
