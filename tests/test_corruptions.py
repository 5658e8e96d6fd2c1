"""The corruption suite: shapes, ranges, determinism, severity monotonicity, errors."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.reliability.corruptions import CORRUPTIONS, corrupt
from pipeline.errors import DataError


def _images(n: int, channels: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Clothing-like test images: a bright textured blob on a dark background, with edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, channels, h, w), dtype=np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        ry, rx = rng.uniform(0.2, 0.35) * h, rng.uniform(0.2, 0.35) * w
        blob = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0
        texture = 0.5 + 0.4 * np.sin(xx * rng.uniform(0.5, 1.5)) * np.cos(yy * rng.uniform(0.5, 1.5))
        for c in range(channels):
            out[i, c] = blob * texture * rng.uniform(0.6, 1.0)
    return np.clip(out, 0, 1)


SHAPES = [(1, 28, 28), (3, 32, 32), (1, 9, 13)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def images(request):
    c, h, w = request.param
    return _images(64, c, h, w)


def test_at_least_fifteen_corruptions():
    assert len(CORRUPTIONS) >= 15
    assert len(set(CORRUPTIONS)) == len(CORRUPTIONS)
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur",
                 "defocus_blur", "motion_blur", "contrast", "brightness", "fog", "pixelate", "jpeg",
                 "rotate", "shear", "translate", "zoom"):
        assert name in CORRUPTIONS


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_range_and_determinism(images, name):
    for severity in (1, 5):
        a = corrupt(images, name, severity, seed=3)
        assert a.shape == images.shape and a.dtype == np.float32
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert np.isfinite(a).all()
        b = corrupt(images, name, severity, seed=3)
        np.testing.assert_array_equal(a, b)
    # The input is never modified in place.
    np.testing.assert_array_equal(images, _images(64, *images.shape[1:]))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_change_grows_with_severity_and_is_never_identity(images, name):
    change = [float(np.abs(corrupt(images, name, s, seed=1) - images).mean()) for s in range(1, 6)]
    # Identity of nothing: every corruption changes the images at severity 1 by at least 1/255 on average
    # somewhere (a mean change well above float rounding).
    assert change[0] > 1e-3, f"{name} at severity 1 barely changes the images: {change}"
    assert all(b > a for a, b in zip(change, change[1:])), f"{name} is not monotone in severity: {change}"


RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur",
          "fog", "rotate", "shear", "translate")


@pytest.mark.parametrize("name", RANDOM)
def test_seed_changes_random_corruptions(name):
    x = _images(32, 1, 28, 28)
    assert not np.array_equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1))


def test_batch_independent_of_position():
    """Corrupting a sub-batch on its own gives the same images for the deterministic corruptions."""
    x = _images(16, 3, 32, 32)
    for name in ("gaussian_blur", "defocus_blur", "contrast", "brightness", "pixelate", "jpeg", "zoom", "zoom_blur"):
        np.testing.assert_array_equal(corrupt(x, name, 4)[5:9], corrupt(x[5:9], name, 4))


def test_grayscale_brightness_adds_value():
    x = np.full((2, 1, 8, 8), 0.25, dtype=np.float32)
    out = corrupt(x, "brightness", 1)
    # Severity 1 adds 0.1 to the value channel, which for one channel is the pixel itself.
    np.testing.assert_allclose(out, 0.35, atol=1e-6)


def test_rgb_brightness_keeps_hue():
    x = np.zeros((1, 3, 8, 8), dtype=np.float32)
    x[:, 0], x[:, 1], x[:, 2] = 0.4, 0.2, 0.1
    out = corrupt(x, "brightness", 2)
    np.testing.assert_allclose(out[0, :, 0, 0], np.array([0.6, 0.3, 0.15]), atol=1e-6)


def test_empty_batch():
    x = np.zeros((0, 1, 28, 28), dtype=np.float32)
    assert corrupt(x, "fog", 2).shape == (0, 1, 28, 28)


def test_unknown_name_suggests():
    x = _images(2, 1, 28, 28)
    with pytest.raises(DataError, match="did you mean gaussian_noise"):
        corrupt(x, "gaussian_nosie", 1)
    with pytest.raises(DataError, match="choose one of"):
        corrupt(x, "xyzzy", 1)


@pytest.mark.parametrize("severity", [0, 6, 2.5, True])
def test_bad_severity(severity):
    with pytest.raises(DataError, match="from 1 to 5"):
        corrupt(_images(2, 1, 28, 28), "fog", severity)


@pytest.mark.parametrize("bad", [
    np.zeros((2, 28, 28), np.float32),            # no channel axis
    np.zeros((2, 2, 28, 28), np.float32),         # two channels
    np.zeros((2, 1, 4, 28), np.float32),          # too small
    np.zeros((2, 1, 28, 28), np.uint8),           # not float
    np.full((2, 1, 28, 28), 255.0, np.float32),   # not scaled to [0, 1]
])
def test_bad_images(bad):
    with pytest.raises(DataError):
        corrupt(bad, "contrast", 1)
