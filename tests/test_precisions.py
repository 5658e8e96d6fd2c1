"""The precision registry: every registered precision converts a tiny model, and its contract
checker accepts that model and refuses the models of the other rungs.

A new precision is tested by being registered (pipeline/precisions.py): the tests below
parametrize over the registry. The conversions (one per precision, in process) are shared by
the module.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.conversion import get_converter
from pipeline import targets
from pipeline.conversion import onnx2tf_tflite as convert
from pipeline.tflite import inspect as inspect_tflite
from pipeline.inputs import models
from pipeline.inputs import preprocessing
from pipeline.errors import ConversionError, UsageError
from pipeline.conversion.onnx_export import export_onnx
from pipeline.precisions import PRECISIONS, PrecisionCheck, get_precision

NAMES = list(PRECISIONS)
PRE = preprocessing.Preprocessing(input_shape=(1, 12, 12), source_layout="NHW", source_dtype="uint8",
                                  scale=1 / 255, mean=(0.5,), std=(0.25,))


def _tiny_cnn():
    # The linear layer has 1440 weights: over the 1024 elements below which dynamic-range
    # quantization keeps a weight in float32, so every rung has something to quantize.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """precision name -> (TfliteArtifact, TfliteInspection); each precision converted once, on first use."""
    d = tmp_path_factory.mktemp("precisions")
    raw = np.random.default_rng(0).integers(0, 256, (120, 1, 12, 12)).astype(np.uint8)
    x = preprocessing.apply(raw, PRE)
    model = models.LoadedModel(spec="tiny", kind="factory", module=_tiny_cnn(), input_shape=(1, 12, 12))
    onnx_art = export_onnx(model, x[:16], d / "model.onnx")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            tfl = get_converter("onnx2tf").convert(onnx_art, x[:100], PRE, per_channel=True,
                                                          out_path=d / f"model_{name}.tflite", precision=name)
            cache[name] = (tfl, inspect_tflite.inspect(tfl.path))
        return cache[name]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_each_precision_accepts_its_own_model_and_refuses_the_others(name, converted):
    precision = PRECISIONS[name]
    tfl, insp = converted(name)
    chk = precision.checker(insp)
    assert isinstance(chk, PrecisionCheck)
    assert chk.precision_ok, chk.reason
    assert chk.precision == name and chk.rule == precision.rule and chk.reason == f"meets the {name} contract"
    assert chk.to_dict() == inspect_tflite.check_precision(insp, name).to_dict()  # the wrapper is the lookup
    # What the entry says the converter makes.
    assert (insp.input_dtype, insp.output_dtype) == (precision.input_dtype, precision.output_dtype)
    assert tfl.calibration_samples == (100 if precision.representative_dataset else 0)
    assert insp.fully_int8 is precision.fully_int8_required
    for other in NAMES:
        if other != name:
            refused = PRECISIONS[other].checker(insp)
            assert not refused.precision_ok, f"{name} model accepted as {other}"
            assert refused.offending and refused.reason.startswith(f"not {other}:")


def test_every_entry_is_complete_and_every_target_names_one():
    ladder = ["fp32", "fp16", "dynamic", "int16x8", "int8"]
    assert [n for n in NAMES if n in ladder] == ladder  # widest first
    for p in PRECISIONS.values():
        assert p.description and p.rule and p.converter.summary and callable(p.contract)
        assert p.input_dtype and p.output_dtype
    assert [p.name for p in PRECISIONS.values() if p.fully_int8_required] == ["int8"]
    for t in map(targets.get_target, targets.list_targets()):
        p = get_precision(t.precision)
        assert (t.input_dtype, t.output_dtype) == (p.input_dtype, p.output_dtype), t.name


def test_unknown_precision_fails_with_a_suggestion():
    with pytest.raises(UsageError, match=r"unknown precision 'int4'; did you mean int8"):
        get_precision("int4")
    with pytest.raises(UsageError, match=r"unknown precision 'float32'; did you mean fp32\?"):
        get_precision("float32")
    with pytest.raises(UsageError, match="choose one of fp32, fp16, dynamic, int16x8, int8"):
        get_precision("xyz")
    # The stages keep their own error classes: a conversion or contract check is a ConversionError.
    with pytest.raises(ConversionError, match="unknown precision 'int3'; did you mean int8"):
        inspect_tflite.check_precision(None, "int3")
