"""``--calib gan`` (calib_data/gan.py, pipeline/gan.py) and ``--calib fractal-raw`` (calib_data/fractal_raw.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import gan as gan_mod
from pipeline.calib_data import CalibContext, build
from pipeline.calib_data import fractal_raw, gan as gan_source  # importing them registers the sources
from pipeline.errors import CalibrationError
from pipeline.inputs.preprocessing import Preprocessing

FMNIST = Path("/usr/share/datasets/fashion-mnist")
PRE = Preprocessing(input_shape=(1, 28, 28), source_layout="NHW", source_dtype="uint8", scale=1 / 255,
                    mean=(0.286,), std=(0.353,), raw_range=(0.0, 255.0))
MICRO = gan_mod.GanConfig(z_dim=16, width=8, epochs=2, batch_size=16, lr=2e-3, subset=320)  # 40 steps


@pytest.fixture(scope="module")
def fmnist():
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    from pipeline.inputs import data
    return data.load("fashion-mnist")


def ctx_of(ds, cache_dir, n=600):
    return CalibContext(x_train=ds.x_train[:n], y_train=ds.y_train[:n], preprocessing=PRE,
                        dataset_name="fashion-mnist-head", cache_dir=cache_dir)


@pytest.fixture
def micro_preset(monkeypatch):
    """The source's mechanics on a generator that trains in a second (the real presets take longer)."""
    monkeypatch.setitem(gan_mod.PRESETS, "micro", MICRO)
    return "gan:micro"


def test_gan_source_shape_range_determinism_and_cache(fmnist, tmp_path, micro_preset):
    ctx = ctx_of(fmnist, tmp_path)
    a = build(micro_preset, ctx, 40, seed=3)
    x = a.array()
    assert x.dtype == np.float32 and x.shape == (40, 1, 28, 28)
    lo, hi = PRE.value_range()
    assert lo - 1e-5 <= float(x.min()) and float(x.max()) <= hi + 1e-5
    assert float(x.std()) > 0.05  # not a constant image
    assert a.describe()["cache"]["hit"] is False
    assert a.describe()["generator"]["weights"]["hit"] is False  # the generator was trained now
    # The generator is a plain state_dict on disk, readable with weights_only=True.
    (pt,) = (tmp_path / "gan").glob("gan-s3-1x28x28-*.pt")
    import torch
    state = torch.load(pt, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # Built again: the cached set, identical.
    b = build(micro_preset, ctx, 40, seed=3)
    assert b.describe()["cache"]["hit"] is True
    np.testing.assert_array_equal(b.array(), x)


def test_gan_source_same_seed_same_set_without_cache(fmnist, micro_preset):
    ctx = ctx_of(fmnist, None)
    a = build(micro_preset, ctx, 30, seed=5).array()
    b = build(micro_preset, ctx, 30, seed=5).array()  # trained again from scratch: the same bits
    c = build(micro_preset, ctx, 30, seed=6).array()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_gan_cached_generator_is_reused(fmnist, tmp_path, micro_preset):
    ctx = ctx_of(fmnist, tmp_path)
    build(micro_preset, ctx, 20, seed=0)
    # Another size is another calibration-cache entry, but the same trained generator.
    again = build(micro_preset, ctx, 30, seed=0)
    assert again.describe()["cache"]["hit"] is False
    assert again.describe()["generator"]["weights"]["hit"] is True


def test_gan_unknown_preset_and_empty_split(fmnist):
    with pytest.raises(CalibrationError, match="tiny"):
        build("gan:tyni", ctx_of(fmnist, None), 10, 0)
    empty = CalibContext(x_train=fmnist.x_train[:0], y_train=fmnist.y_train[:0], preprocessing=PRE,
                         dataset_name="none")
    with pytest.raises(CalibrationError, match="empty"):
        build("gan:tiny", empty, 10, 0)


def test_gan_needs_integer_labels(fmnist):
    ctx = CalibContext(x_train=fmnist.x_train[:10], y_train=np.linspace(0, 1, 10), preprocessing=PRE, dataset_name="f")
    with pytest.raises(CalibrationError, match="integer class labels"):
        gan_source.gan_context(ctx)
    y, k = gan_source.gan_context(ctx_of(fmnist, None))
    assert y.dtype == np.int64 and k == 10


def test_conditioned_labels_are_balanced():
    lab = gan_mod.conditioned_labels(25, 10)
    assert lab.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2 + [0, 1, 2, 3, 4]


def test_stratified_subset_takes_every_class_equally():
    y = np.repeat(np.arange(4), [50, 10, 30, 40])
    idx = gan_mod.stratified_subset(y, 20, seed=0)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert np.bincount(y[idx], minlength=4).tolist() == [5, 5, 5, 5]


def test_unit_range_round_trip():
    raw = np.array([0.0, 127.5, 255.0])
    u = gan_mod.to_unit(raw, (0.0, 255.0))
    np.testing.assert_allclose(u, [-1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(gan_mod.from_unit(u, (0.0, 255.0)), raw, atol=1e-4)


@pytest.mark.slow
def test_tiny_gan_learns_the_classes(fmnist, tmp_path):
    """gan:tiny (1 epoch on 6000 training images, 187 steps): the FP32 refcnn puts its samples in the class they
    were conditioned on well above chance (10%). Measured when written: 45.2% on 1000 samples (seed 0)."""
    import torch
    from pipeline.inputs import models
    cfg = gan_mod.PRESETS["tiny"]
    G, info = gan_mod.trained_generator(fmnist.x_train, fmnist.y_train, "fashion-mnist", (0.0, 255.0), 0, cfg,
                                        tmp_path)
    assert info["training"]["steps"] == 187
    lab = gan_mod.conditioned_labels(1000, 10)
    raw = gan_mod.from_unit(gan_mod.sample(G, lab, 0), (0.0, 255.0))
    net = models.load("zoo:refcnn", None).module.eval()
    x = ((raw / 255 - 0.286) / 0.353).astype(np.float32)
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    acc = float(np.mean(pred == lab))
    assert acc > 0.3, acc  # chance is 0.1
    # and the pixel statistics are in the data's neighbourhood (real: mean 72.9, std 90.0)
    assert 40 < raw.mean() < 110 and 50 < raw.std() < 120


# --------------------------------------------------------------------------- fractal-raw

def test_fractal_raw_shape_range_and_determinism(fmnist, tmp_path):
    ctx = ctx_of(fmnist, tmp_path)
    a = build("fractal-raw", ctx, 50, 1)
    x = a.array()
    assert x.dtype == np.float32 and x.shape == (50, 1, 28, 28)
    lo, hi = PRE.value_range()
    assert lo - 1e-5 <= float(x.min()) and float(x.max()) <= hi + 1e-5
    np.testing.assert_array_equal(build("fractal-raw", ctx_of(fmnist, None), 50, 1).array(), x)
    assert build("fractal-raw", ctx, 50, 1).describe()["cache"]["hit"] is True
    assert not np.array_equal(build("fractal-raw", ctx, 50, 2).array(), x)


def test_fractal_raw_is_not_matched_to_the_data(fmnist):
    """Random backgrounds: the raw form's median pixel is far from Fashion-MNIST's (0, a black background), while
    the matched fractal source follows the data's quantiles."""
    ctx = ctx_of(fmnist, None)
    raw_form = build("fractal-raw", ctx, 50, 0).array() * 0.353 + 0.286
    matched = build("fractal", ctx, 50, 0).array() * 0.353 + 0.286
    data = fmnist.x_train[:600] / 255.0
    assert abs(np.median(matched) - np.median(data)) < 0.05
    assert np.median(raw_form) > np.median(data) + 0.1
    # the background (each image's most common value) varies from image to image
    backgrounds = [np.bincount(np.rint(im.ravel() * 255).astype(int)).argmax() for im in raw_form]
    assert len(set(backgrounds)) > 10


def test_fractal_raw_colours_grey_is_bt601():
    rng = np.random.default_rng(0)
    fg, bg = fractal_raw.colours(rng, 4, 1)
    rng = np.random.default_rng(0)
    rgb_fg = rng.uniform(0, 1, (4, 3))
    np.testing.assert_allclose(fg[:, 0], rgb_fg[:, 0] * 0.299 + rgb_fg[:, 1] * 0.587 + rgb_fg[:, 2] * 0.114)
    assert fg.shape == bg.shape == (4, 1)


def test_fractal_raw_rejects_an_argument(fmnist):
    with pytest.raises(CalibrationError, match="no argument"):
        build("fractal-raw:x", ctx_of(fmnist, None), 10, 0)
