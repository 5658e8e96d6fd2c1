"""The one preprocessing record that travels with a model.

Calibration, evaluation, the report and any device bundle read this record; nothing
else normalises data. Raw images are turned into model input by
``(x * scale - mean[c]) / std[c]`` exactly once, in :func:`apply`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pipeline.errors import DataError


RECORD_VERSION = 1  # of the dict form below (report.json "preprocessing", bundle's preprocessing.json, .tflite metadata)
METADATA_NAME = "edge_int8_pipeline.preprocessing"  # the .tflite metadata entry holding the record
FORMULA = "x = (raw * scale - mean[c]) / std[c]; int8 = round(x / in_scale) + in_zero_point"


@dataclass(frozen=True)
class InputQuantization:
    """How the deployed model's input tensor is quantized (a float input: dtype float32, scale 0)."""

    dtype: str
    scale: float
    zero_point: int

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become the float32 model input (NCHW for the PyTorch/ONNX model), and, once converted, how
    that input is fed to the .tflite model: its input layout and quantization (:meth:`deployed`).

    The one deployment record: the report's ``preprocessing`` section, the bundle's preprocessing.json, the
    ``.tflite`` metadata entry ``METADATA_NAME`` and what evaluate and the Pi script read are all :meth:`to_dict`
    of this object (versioned by ``record_version``)."""

    input_shape: tuple[int, int, int]  # C, H, W of one sample, as the PyTorch model sees it
    source_layout: str  # layout the data arrived in: "NHW", "NCHW" or "NHWC"
    source_dtype: str  # "uint8" or "float32"
    scale: float  # multiply raw values by this first (1/255 for uint8)
    mean: tuple[float, ...]  # per channel, after scaling
    std: tuple[float, ...]  # per channel, after scaling
    raw_range: tuple[float, float] = (0.0, 255.0)  # range of the raw values (uint8: 0..255)
    tflite_input_layout: str | None = None  # "NHWC" or "NCHW" once converted
    input_quantization: InputQuantization | None = None  # once converted

    def __post_init__(self):
        c = len(self.input_shape) == 3 and self.input_shape[0]
        problems = [
            (len(self.input_shape) != 3 or min(self.input_shape) < 1, f"input_shape {self.input_shape} is not C,H,W"),
            (self.source_layout not in LAYOUTS, f"source_layout {self.source_layout!r} is not one of {LAYOUTS}"),
            (len(self.mean) != c or len(self.std) != c, f"mean/std need one value per channel ({c})"),
            (not all(v > 0 for v in self.std), f"std {self.std} must be positive"),
            (not self.scale > 0, f"scale {self.scale} must be positive"),
            (self.tflite_input_layout not in (None, "NHWC", "NCHW"),
             f"tflite_input_layout {self.tflite_input_layout!r} is not NHWC or NCHW"),
        ]
        for bad, what in problems:
            if bad:
                raise DataError(f"preprocessing record: {what}")

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    def value_range(self) -> tuple[float, float]:
        """The range model inputs can take once raw data in [0, 1/scale] is normalised."""
        raw_lo, raw_hi = self.raw_range[0] * self.scale, self.raw_range[1] * self.scale
        lo = min((raw_lo - m) / s for m, s in zip(self.mean, self.std))
        hi = max((raw_hi - m) / s for m, s in zip(self.mean, self.std))
        return float(lo), float(hi)

    def deployed(self, tflite_input_layout: str, quantization: InputQuantization) -> "Preprocessing":
        """This record completed with how the converted model takes its input."""
        return replace(self, tflite_input_layout=tflite_input_layout, input_quantization=quantization)

    def to_dict(self) -> dict:
        d = {"record_version": RECORD_VERSION, "input_shape": list(self.input_shape),
             "source_layout": self.source_layout, "source_dtype": self.source_dtype, "scale": self.scale,
             "mean": list(self.mean), "std": list(self.std), "raw_range": list(self.raw_range)}
        if self.tflite_input_layout is not None:
            d["tflite_input_layout"] = self.tflite_input_layout
        if self.input_quantization is not None:
            d["input_quantization"] = self.input_quantization.to_dict()
            d["formula"] = FORMULA
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """A record this process wrote; one read from a file goes through :func:`from_record`."""
        q = d.get("input_quantization")
        return cls(
            input_shape=tuple(int(v) for v in d["input_shape"]),
            source_layout=str(d["source_layout"]),
            source_dtype=str(d["source_dtype"]),
            scale=float(d["scale"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            raw_range=tuple(float(v) for v in d.get("raw_range", (0.0, 255.0))),
            tflite_input_layout=d.get("tflite_input_layout"),
            input_quantization=InputQuantization(str(q["dtype"]), float(q["scale"]), int(q["zero_point"]))
            if isinstance(q, dict) else None,
        )


# Limits of a preprocessing record read from a file (a report or a bundle someone sent): far above any image
# classifier this pipeline targets (ImageNet 3x224x224 = 150,528 values), far below what exhausts a host.
MAX_CHANNELS = 16
MAX_SIDE = 4096
MAX_INPUT_VALUES = 1 << 22  # values per image: 16 MiB of float32
LAYOUTS = ("NHW", "NCHW", "NHWC")
DTYPES = ("uint8", "float32")


def from_record(d: dict, where: str, fix: str) -> Preprocessing:
    """A preprocessing record read from a file, every field checked for type and range (DataError naming
    ``preprocessing.<key>`` otherwise)."""
    from pipeline.jsonio import Fields
    f = Fields(d, where, fix, "preprocessing.")
    shape = f.numbers("input_shape", 3, 3, 1, MAX_SIDE, required=True, integer=True)
    c, h, w = shape
    if c > MAX_CHANNELS:
        raise f.fail("input_shape", f"{shape} has {c} channels (at most {MAX_CHANNELS}); it is not C,H,W")
    if c * h * w > MAX_INPUT_VALUES:
        raise f.fail("input_shape", f"{shape} is {c * h * w:,} values per image, above the limit of "
                                    f"{MAX_INPUT_VALUES:,}")
    mean = f.numbers("mean", 1, MAX_CHANNELS, -1e6, 1e6, required=True)
    std = f.numbers("std", 1, MAX_CHANNELS, -1e6, 1e6, required=True)
    for name, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, c):
            raise f.fail(name, f"has {len(v)} values for {c}-channel inputs")
    if not all(v > 0 for v in std):
        raise f.fail("std", f"{std} must be positive")
    raw_range = f.numbers("raw_range", 2, 2, -1e12, 1e12) or [0.0, 255.0]
    if not raw_range[0] < raw_range[1]:
        raise f.fail("raw_range", f"{raw_range} is not [low, high]")
    layout = f.str("tflite_input_layout", choices=("NHWC", "NCHW"))
    q = d.get("input_quantization")
    quant = None
    if q is not None:
        qf = Fields(q if isinstance(q, dict) else {}, where, fix, "preprocessing.input_quantization.")
        if not isinstance(q, dict):
            raise f.fail("input_quantization", "is not an object")
        quant = InputQuantization(dtype=qf.str("dtype", required=True, choices=("int8", "uint8", "int16", "float32")),
                                  scale=qf.number("scale", 0.0, 1e12, required=True),
                                  zero_point=qf.int("zero_point", -32768, 65535, required=True))
    return Preprocessing(
        input_shape=(c, h, w),
        source_layout=f.str("source_layout", required=True, choices=LAYOUTS),
        source_dtype=f.str("source_dtype", required=True, choices=DTYPES),
        scale=f.number("scale", 1e-12, 1e12, required=True),
        mean=tuple(mean) * (c if len(mean) == 1 else 1), std=tuple(std) * (c if len(std) == 1 else 1),
        raw_range=(raw_range[0], raw_range[1]), tflite_input_layout=layout, input_quantization=quant,
    )


def check_batch_fits_memory(input_shape, batch: int, what: str) -> None:
    """Refuse a batch of ``input_shape`` images that cannot fit in this host's free memory (about eight float32
    copies of a batch are alive at once: raw, scaled, normalised, transposed, quantized, outputs)."""
    import os
    need = 8 * 4 * int(batch) * int(np.prod(np.asarray(input_shape, np.int64)))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if free > 0 and need > free:
        raise DataError(f"{what}: batches of {batch} images of {'x'.join(map(str, input_shape))} need about "
                        f"{need / 2 ** 30:.1f} GiB but {free / 2 ** 30:.1f} GiB is free; pass a smaller --batch-size")


def per_channel(values: tuple[float, ...] | None, channels: int, default: float, name: str) -> tuple[float, ...]:
    """Broadcast a --mean/--std value list to one value per channel."""
    if values is None or len(values) == 0:
        return (float(default),) * channels
    if len(values) == 1:
        return (float(values[0]),) * channels
    if len(values) != channels:
        raise DataError(
            f"--{name} has {len(values)} values but the model input has {channels} channels; "
            f"give one value or one per channel"
        )
    return tuple(float(v) for v in values)


def apply(images_nchw: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Raw images already in NCHW order (uint8 or float) -> normalised float32 model input."""
    x = images_nchw.astype(np.float32) * np.float32(pre.scale)
    mean = np.asarray(pre.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32, copy=False)


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))
