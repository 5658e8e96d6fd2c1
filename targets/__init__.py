"""Target profiles: a format/precision plus the device it emulates.

Adding a target is adding one profile with ``@register_target`` in :mod:`targets.profiles`;
the CLI's ``--target`` choices and the tests read this registry.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

from pipeline.errors import TargetError
from pipeline.precisions import PRECISIONS, get_precision  # noqa: F401  (PRECISIONS: the ladder, re-exported)


@dataclass(frozen=True)
class Target:
    """One deployment target and the contract an exported model must meet on it."""

    name: str
    description: str
    precision: str  # a name in pipeline.precisions.PRECISIONS: "fp32", "fp16", "dynamic", "int16x8" or "int8"
    format: str = "tflite"
    runtime: str = "litert"  # "litert" or "tflite-micro"
    kernels: str = "xnnpack"  # "xnnpack", "builtin", "ref" or "tflm-reference"
    threads: int = 4
    allow_float_fallback: bool = False
    per_channel_weights: bool = True
    # The smallest representative dataset the target accepts without warning. The TFLite
    # docs suggest 100-500 samples; ultralytics warns below 300; we warn below 100.
    min_calibration_samples: int = 100
    ram_bytes: int | None = None
    flash_bytes: int | None = None
    clock_mhz: int | None = None
    references: tuple[str, ...] = field(default_factory=tuple)
    # The hardware the profile stands for, in one short phrase (shown by --list-targets).
    device: str = "generic 64-bit CPU"
    # LiteRT kernels for the full test-set run when ``runtime`` is not LiteRT itself
    # (microcontroller targets cross-check TFLite-Micro against these); None: ``kernels``.
    litert_kernels: str | None = None
    # Headroom required on top of the measured need before it counts as fitting the budget:
    # fits when need * (1 + margin) <= budget. Only checked where the budget is checked
    # (microcontroller targets); the reason for each margin is in ``references``.
    arena_margin: float = 0.0
    flash_margin: float = 0.0
    # Published figures for this device class with their source, as "figure: source" lines.
    # They are shown for context, never as a measurement of the exported model.
    published: tuple[str, ...] = field(default_factory=tuple)
    # Microcontroller targets: the Arm core (a key of CORES: the firmware package's compiler flags) and the
    # TFLite-Micro kernels its firmware is built with ("cmsis-nn" or "reference"; the host always measures with
    # the tflite-micro wheel's reference kernels, see ``kernels``).
    core: str | None = None
    firmware_kernels: str | None = None
    # Where ram_bytes/flash_bytes come from: "profile" (this registry entry and its references) or "user"
    # (--ram/--flash or --target-file, pipeline/targets/user.py); ``budget_given_by`` then says how.
    budget_source: str = "profile"
    budget_given_by: str | None = None

    @property
    def input_dtype(self) -> str:
        """The graph input dtype the device is fed: the precision's (pipeline/precisions.py)."""
        from pipeline.precisions import get_precision
        return get_precision(self.precision).input_dtype

    @property
    def output_dtype(self) -> str:
        from pipeline.precisions import get_precision
        return get_precision(self.precision).output_dtype

    @property
    def run_kernels(self) -> str:
        """The LiteRT kernels the run stage uses for this target."""
        return self.litert_kernels or self.kernels

    @property
    def is_micro(self) -> bool:
        return self.runtime == "tflite-micro"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(input_dtype=self.input_dtype, output_dtype=self.output_dtype)
        d["references"] = list(self.references)
        d["published"] = list(self.published)
        return d


@dataclass(frozen=True)
class Core:
    """An Arm Cortex-M core a microcontroller target names: how arm-none-eabi-gcc compiles for it and the
    TARGET_ARCH of TFLite-Micro's cortex_m_generic Makefile (tensorflow/lite/micro/tools/make/targets/
    cortex_m_generic_makefile.inc)."""

    name: str
    gcc_flags: tuple[str, ...]
    tflm_target_arch: str
    fpu: str  # in words, for the firmware README


# The cores a board may name. The FPU flags are the usual parts' (an M7 with a double-precision FPU, as the
# STM32H7; an M33 or M4 with a single-precision one); a core without an FPU builds soft-float.
CORES: dict[str, Core] = {c.name: c for c in (
    Core("cortex-m0plus", ("-mcpu=cortex-m0plus", "-mthumb", "-mfloat-abi=soft"), "cortex-m0plus", "no FPU"),
    Core("cortex-m3", ("-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft"), "cortex-m3", "no FPU"),
    Core("cortex-m4", ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"), "cortex-m4+fp",
         "single-precision FPU (FPv4-SP)"),
    Core("cortex-m7", ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"), "cortex-m7+fp",
         "double-precision FPU (FPv5)"),
    Core("cortex-m33", ("-mcpu=cortex-m33", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-sp-d16"), "cortex-m33",
         "single-precision FPU (FPv5-SP)"),
    Core("cortex-m55", ("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard", "-mfpu=auto"), "cortex-m55",
         "FPU and Helium (MVE)"),
)}
FIRMWARE_KERNELS = ("cmsis-nn", "reference")

# The precision ladder, widest first, is the registry of pipeline/precisions.py (PRECISIONS: name ->
# Precision). "dynamic" = int8 weights with float32 activations (dynamic-range quantization);
# "int16x8" = int16 activations with int8 weights.
RUNTIMES = ("litert", "tflite-micro")

_REGISTRY: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    if target.name in _REGISTRY:
        raise ValueError(f"target {target.name!r} is registered twice")
    _check(target)
    _REGISTRY[target.name] = target
    return target


def _check(target: Target) -> None:
    """The rules every target meets, registered or a user's board (ValueError: a programming error)."""
    if target.precision not in PRECISIONS:
        raise ValueError(f"target {target.name!r}: precision {target.precision!r} is not one of {tuple(PRECISIONS)}")
    if target.runtime not in RUNTIMES:
        raise ValueError(f"target {target.name!r}: runtime {target.runtime!r} is not one of {RUNTIMES}")
    if target.runtime == "tflite-micro":
        if not get_precision(target.precision).fully_int8_required:
            raise ValueError(f"target {target.name!r}: TFLite-Micro targets are int8 (no hybrid or float16 kernels)")
        if target.core not in CORES or target.firmware_kernels not in FIRMWARE_KERNELS:
            raise ValueError(f"target {target.name!r}: a TFLite-Micro target names its core (one of {tuple(CORES)}) "
                             f"and firmware kernels (one of {FIRMWARE_KERNELS})")
    if target.budget_source not in ("profile", "user"):
        raise ValueError(f"target {target.name!r}: budget_source {target.budget_source!r} is not profile or user")


def list_targets() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get_target(name: str, user=None) -> Target:
    """The registered target ``name``; with ``user`` (a :class:`pipeline.targets.user.UserBudget`, from --ram,
    --flash or --target-file), that target with the user's budgets, or the user's own board."""
    _load()
    if user is not None:
        from pipeline.targets.user import apply
        return apply(name, user, _REGISTRY.get(name))
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(sorted(_REGISTRY))}"
        raise TargetError(f"unknown target {name!r}; {hint} (python -m pipeline.export --list-targets)")
    return _REGISTRY[name]


def _load() -> None:
    from pipeline.targets import profiles  # noqa: F401  (registers the built-in profiles)
