"""Built-in reference models (``--model zoo:NAME``).

Each entry is a factory registered with ``@register_model`` plus the facts the pipeline
needs: input shape, class count, the dataset it was trained on, its normalisation and the
file of its shipped weights (a plain state dict, loaded with ``weights_only=True``).

The factory builds the deployed form, the one that is exported and whose weights are
shipped. A model trained in another form (MobileOne's over-parameterised branches) also
registers ``train_factory`` (the form ``python -m pipeline.train`` trains) and ``to_deploy``
(turns the trained module into the factory's form, e.g. by re-parameterisation).
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn as nn

from pipeline.errors import ModelError

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    train_factory: Callable[[], nn.Module] | None = None
    to_deploy: Callable[[nn.Module], nn.Module] | None = None
    # The regression suite's bound on |int8 - FP32| per output, in output quantization steps, on
    # fixed test inputs (tests/test_zoo_regression.py); set from the measured value with headroom.
    int8_max_steps: float | None = None
    # A hard case of README "When int8 hurts": what makes int8 hurt it, in words. Hard cases are zoo models
    # (zoo:NAME works everywhere) that the zoo's lists, table and regression suite leave out: they are meant to fail.
    hard_case: str | None = None

    def build_for_training(self) -> nn.Module:
        return (self.train_factory or self.factory)()

    @property
    def weights_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.pt"

    @property
    def record_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.json"

    def training_record(self) -> dict | None:
        if self.record_path.is_file():
            return json.loads(self.record_path.read_text())
        return None


_REGISTRY: dict[str, ZooEntry] = {}

# What every shipped model was trained on: Fashion-MNIST, 1x28x28, ten classes, its training split's statistics.
FASHION_MNIST = dict(input_shape=(1, 28, 28), num_classes=10, dataset="fashion-mnist", mean=(0.2860,), std=(0.3530,))


def register_model(name: str, *, input_shape, num_classes, dataset, mean, std, description,
                   train_factory=None, to_deploy=None, int8_max_steps=None, hard_case=None):
    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"zoo model {name!r} is registered twice")
        _REGISTRY[name] = ZooEntry(
            name=name, factory=factory, input_shape=tuple(input_shape), num_classes=num_classes,
            dataset=dataset, mean=tuple(mean), std=tuple(std), description=description,
            train_factory=train_factory, to_deploy=to_deploy, int8_max_steps=int8_max_steps,
            hard_case=hard_case,
        )
        return factory
    return deco


def _load() -> None:
    from pipeline.zoo import ghostnet, hard, mobilenetv2, mobileone, refcnn, resnet8, shufflenetv2  # noqa: F401


def list_models(include_unshipped: bool = False, hard_cases: bool = False) -> list[str]:
    """The zoo: registered models whose trained weights ship with the project.

    An architecture registered without weights yet (imported by its own tests, or being trained) is listed
    only with ``include_unshipped=True``, so what the zoo lists never depends on what was imported first.
    The hard cases of "When int8 hurts" are listed only with ``hard_cases=True`` (then only they are).
    """
    _load()
    return sorted(n for n, e in _REGISTRY.items() if (include_unshipped or e.weights_path.is_file())
                  and bool(e.hard_case) == hard_cases)


def get_entry(name: str) -> ZooEntry:
    _load()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean zoo:{' or zoo:'.join(close)}?" if close else f"choose one of zoo:{', zoo:'.join(sorted(_REGISTRY))}"
        raise ModelError(f"unknown zoo model {name!r}; {hint}")
    return _REGISTRY[name]
