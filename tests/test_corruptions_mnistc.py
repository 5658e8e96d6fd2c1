"""The corruptions added for the mnist-c preset (stripe, zigzag, dotted_line, canny_edges, spatter) and the preset.

Same contract as the default suite (tests/test_corruptions.py, which is parametrized over the default suite only):
shape, dtype, range, determinism, growth with severity; plus what these five promise on top: a higher severity is
the same corruption of the same image made stronger, and canny_edges finds the edges of simple shapes.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import DataError, UsageError
from pipeline.reliability.corruptions import CORRUPTIONS, MNIST_C, PRESETS, REGISTERED, corrupt
from pipeline.reliability.suite import ReliabilityConfig, parse_corruptions

NEW = ("stripe", "zigzag", "dotted_line", "canny_edges", "spatter")
RANDOM = ("stripe", "zigzag", "dotted_line", "spatter")  # canny_edges draws nothing

# The default suite as measured in the README; the new corruptions must not join it.
DEFAULT_SUITE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
                 "motion_blur", "glass_blur", "zoom_blur", "contrast", "brightness", "fog", "pixelate", "jpeg",
                 "rotate", "shear", "translate", "zoom")


def _digits(n: int, channels: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Digit-like images: a bright stroke ring and bar of random size and place on a dark, slightly noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((n, channels, h, w), dtype=np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.4, 0.6) * h, rng.uniform(0.4, 0.6) * w
        r = rng.uniform(0.2, 0.3) * min(h, w)
        ring = np.clip(1.5 - np.abs(np.hypot(yy - cy, xx - cx) - r), 0, 1)
        bar = (np.abs(xx - cx - r) < 1.0) & (yy > cy) & (yy < cy + 1.8 * r)
        img = np.maximum(ring, bar) * rng.uniform(0.7, 1.0) + rng.uniform(0, 0.05, (h, w))
        for c in range(channels):
            out[i, c] = img * rng.uniform(0.8, 1.0)
    return np.clip(out, 0, 1).astype(np.float32)


SHAPES = [(1, 28, 28), (3, 32, 32), (1, 9, 13)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def images(request):
    return _digits(32, *request.param)


# --------------------------------------------------------------------------- registry, default suite, preset

def test_new_corruptions_are_registered_but_not_in_the_default_suite():
    assert CORRUPTIONS == DEFAULT_SUITE
    assert ReliabilityConfig().corruptions == DEFAULT_SUITE
    assert parse_corruptions("all") == DEFAULT_SUITE
    assert set(CORRUPTIONS) < set(REGISTERED) and len(set(REGISTERED)) == len(REGISTERED)
    for name in NEW:
        assert name in REGISTERED and name not in CORRUPTIONS


def test_mnist_c_preset():
    assert PRESETS["mnist-c"] == MNIST_C
    assert len(MNIST_C) == 15 and len(set(MNIST_C)) == 15
    assert set(MNIST_C) <= set(REGISTERED)
    assert set(NEW) <= set(MNIST_C)
    # MNIST-C's other ten, by our names (scale -> zoom).
    assert {"shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "zoom", "rotate", "brightness",
            "translate", "fog"} <= set(MNIST_C)
    assert parse_corruptions("mnist-c") == MNIST_C
    assert parse_corruptions(" mnist-c ") == MNIST_C


def test_parse_corruptions_takes_new_names_and_rejects_mixed_presets():
    assert parse_corruptions("stripe, fog") == ("stripe", "fog")
    with pytest.raises(UsageError, match="did you mean zigzag"):
        parse_corruptions("zigzg")
    with pytest.raises(UsageError, match="did you mean mnist-c"):
        parse_corruptions("mnistc")
    with pytest.raises(UsageError, match="stands alone"):
        parse_corruptions("mnist-c,fog")


def test_unknown_name_suggests_new_corruptions():
    with pytest.raises(DataError, match="did you mean stripe"):
        corrupt(_digits(2, 1, 28, 28), "strpe", 1)


# --------------------------------------------------------------------------- the contract

@pytest.mark.parametrize("name", NEW)
def test_shape_dtype_range_and_determinism(images, name):
    before = images.copy()
    for severity in (1, 5):
        a = corrupt(images, name, severity, seed=3)
        assert a.shape == images.shape and a.dtype == np.float32
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and np.isfinite(a).all()
        np.testing.assert_array_equal(a, corrupt(images, name, severity, seed=3))
    np.testing.assert_array_equal(images, before)  # never in place


@pytest.mark.parametrize("name", NEW)
def test_change_grows_with_severity_and_is_never_identity(images, name):
    change = [float(np.abs(corrupt(images, name, s, seed=1) - images).mean()) for s in range(1, 6)]
    assert change[0] > 1e-3, f"{name} at severity 1 barely changes the images: {change}"
    assert all(b > a for a, b in zip(change, change[1:])), f"{name} is not monotone in severity: {change}"


@pytest.mark.parametrize("name", NEW)
def test_higher_severity_is_the_same_corruption_made_stronger(name):
    """The draws do not depend on the severity: every pixel's change only grows from severity to severity, and the
    pixels a weak severity touches are all touched by the strongest one."""
    x = _digits(24, 1, 28, 28, seed=5)
    changes = [np.abs(corrupt(x, name, s, seed=7) - x) for s in range(1, 6)]
    for weak, strong in zip(changes, changes[1:]):
        assert (strong >= weak - 1e-5).all()
    assert not ((changes[0] > 1e-4) & (changes[4] <= 1e-4)).any()


@pytest.mark.parametrize("name", RANDOM)
def test_seed_changes_random_corruptions(name):
    x = _digits(16, 1, 28, 28)
    assert not np.array_equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1))


@pytest.mark.parametrize("name", ("stripe", "zigzag", "dotted_line", "spatter"))
def test_every_image_gets_marks_at_severity_one(name):
    x = np.zeros((64, 1, 28, 28), dtype=np.float32)
    out = corrupt(x, name, 1, seed=2)
    inked = (out > 0.25).reshape(64, -1).sum(axis=1)
    assert (inked > 0).all(), f"{name}: some images are left blank: {inked}"
    assert (inked < 0.4 * 28 * 28).all(), f"{name}: some images are mostly covered: {inked}"


def test_marks_are_the_same_on_every_channel():
    x = _digits(8, 3, 32, 32)
    for name in ("stripe", "zigzag", "dotted_line", "spatter", "canny_edges"):
        gray = np.zeros((8, 3, 32, 32), np.float32)
        out = corrupt(gray, name, 4, seed=1)
        np.testing.assert_array_equal(out[:, 0], out[:, 1])
        np.testing.assert_array_equal(out[:, 0], out[:, 2])
        assert corrupt(x, name, 4).shape == x.shape


# --------------------------------------------------------------------------- canny_edges, checked on known shapes

def _square(channels: int = 1) -> np.ndarray:
    x = np.zeros((1, channels, 28, 28), dtype=np.float32)
    x[:, :, 8:20, 8:20] = 1.0  # rows and columns 8..19
    return x


def test_canny_edges_of_a_square_lie_on_its_outline():
    edges = corrupt(_square(), "canny_edges", 5)[0, 0]
    assert set(np.unique(edges)) <= {0.0, 1.0}
    on = edges > 0.5
    # A thin outline: about the square's perimeter (44 pixels), a small share of the image.
    assert 30 <= on.sum() <= 60, on.sum()
    assert on.mean() < 0.1
    # Every edge pixel is within one pixel of the square's border (rows/columns 7..8 or 19..20) and none is inside
    # or far outside it.
    yy, xx = np.nonzero(on)
    inside_dist = np.minimum.reduce([np.abs(yy - 7.5), np.abs(yy - 19.5), np.abs(xx - 7.5), np.abs(xx - 19.5)])
    assert (inside_dist <= 0.5).all()
    assert (yy >= 7).all() and (yy <= 20).all() and (xx >= 7).all() and (xx <= 20).all()
    assert not on[10:18, 10:18].any()
    # All four sides are found along their straight middle parts, one pixel thick.
    for k in range(11, 17):
        assert on[k, 7:10].sum() == 1 and on[k, 18:21].sum() == 1, k
        assert on[7:10, k].sum() == 1 and on[18:21, k].sum() == 1, k


def test_canny_edges_of_a_step_is_one_column():
    x = np.zeros((1, 1, 20, 24), dtype=np.float32)
    x[..., 12:] = 0.8
    on = corrupt(x, "canny_edges", 5)[0, 0] > 0.5
    cols = np.nonzero(on.any(axis=0))[0]
    assert set(cols) <= {11, 12} and len(cols) == 1
    assert (on.sum(axis=1) == 1).all()  # every row, borders included, has exactly one edge pixel


def test_canny_edges_ignore_flat_images_and_faint_noise():
    flat = np.full((2, 1, 16, 16), 0.6, dtype=np.float32)
    np.testing.assert_array_equal(corrupt(flat, "canny_edges", 5), np.zeros_like(flat))
    faint = (0.5 + 0.02 * np.random.default_rng(0).standard_normal((2, 1, 16, 16))).astype(np.float32)
    assert corrupt(faint, "canny_edges", 5).max() == 0.0


def test_canny_edges_severity_blends_the_edge_map():
    x = _square()
    edges = corrupt(x, "canny_edges", 5)
    np.testing.assert_allclose(corrupt(x, "canny_edges", 2), 0.6 * x + 0.4 * edges, atol=1e-6)
    # Colour images: the edge map of the channel mean, on every channel.
    np.testing.assert_array_equal(corrupt(_square(3), "canny_edges", 5), np.repeat(edges, 3, axis=1))


def test_canny_edges_independent_of_batch_and_seed():
    x = _digits(12, 1, 28, 28)
    np.testing.assert_array_equal(corrupt(x, "canny_edges", 4)[5:9], corrupt(x[5:9], "canny_edges", 4))
    np.testing.assert_array_equal(corrupt(x, "canny_edges", 4, seed=0), corrupt(x, "canny_edges", 4, seed=9))
