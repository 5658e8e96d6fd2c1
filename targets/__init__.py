"""Target profiles: a format/precision plus the device it emulates.

Adding a target is adding one profile with ``@register_target`` in :mod:`targets.profiles`;
the CLI's ``--target`` choices and the tests read this registry.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

from pipeline.errors import TargetError


@dataclass(frozen=True)
class Target:
    """One deployment target and the contract an exported model must meet on it."""

    name: str
    description: str
    format: str  # "tflite"
    precision: str  # "int8", ...
    runtime: str  # "litert" or "tflite-micro"
    kernels: str  # "xnnpack", "builtin", "ref" or "tflm-reference"
    threads: int
    input_dtype: str  # graph input dtype the device is fed
    output_dtype: str
    allow_float_fallback: bool = False
    per_channel_weights: bool = True
    # The smallest representative dataset the target accepts without warning. The TFLite
    # docs suggest 100-500 samples; ultralytics warns below 300; we warn below 100.
    min_calibration_samples: int = 100
    ram_bytes: int | None = None
    flash_bytes: int | None = None
    clock_mhz: int | None = None
    references: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["references"] = list(self.references)
        return d


_REGISTRY: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    if target.name in _REGISTRY:
        raise ValueError(f"target {target.name!r} is registered twice")
    _REGISTRY[target.name] = target
    return target


def list_targets() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get_target(name: str) -> Target:
    _load()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(sorted(_REGISTRY))}"
        raise TargetError(f"unknown target {name!r}; {hint} (python -m pipeline.export --list-targets)")
    return _REGISTRY[name]


def _load() -> None:
    from . import profiles  # noqa: F401  (registers the built-in profiles)
