"""Artifacts shared by the exports of one multi-target call (``--target a,b,c``)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path


class Reuse:
    """The ONNX model once, and one conversion per (route, precision, weight granularity). Each is kept in this
    call's own folder and copied into every export that uses it, so every export folder stays complete and
    self-contained."""

    NOTE = ("made once for an earlier target of the same multi-target call (same model, representative dataset, "
            "converter, precision and weight granularity) and copied here; its timings are that run's")

    def __init__(self, folder: Path):
        self.folder = folder
        self.items: dict = {}
        self.used: dict = {}  # key -> how many exports took it from here

    def get(self, key, dest: Path):
        art = self.items.get(key)
        if art is None:
            return None
        shutil.copyfile(art.path, dest)
        self.used[key] = self.used.get(key, 0) + 1
        return dataclasses.replace(art, path=dest, reused=True)

    def put(self, key, art) -> None:
        if Path(str(art.path) + ".data").exists():  # a model over 2 GB with external data: not copied around
            return
        keep = self.folder / f"{len(self.items)}-{art.path.name}"
        shutil.copyfile(art.path, keep)
        self.items[key] = dataclasses.replace(art, path=keep)


def conversion_key(converter: str, target) -> tuple:
    """What a conversion depends on besides the ONNX model and the representative dataset (the same for every
    target of one call): targets that agree on it share one .tflite."""
    return ("convert", converter, target.precision, target.per_channel_weights, target.allow_float_fallback)
