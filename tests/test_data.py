"""Data loading: IDX, .npz layouts and the bad inputs that must be caught."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.inputs import data

from pipeline.inputs import preprocessing
from pipeline.errors import DataError


def test_fashion_mnist_idx(fmnist):
    assert fmnist.x_train.shape == (60000, 1, 28, 28) and fmnist.x_train.dtype == np.uint8
    assert fmnist.x_test.shape == (10000, 1, 28, 28)
    assert set(np.unique(fmnist.y_test)) == set(range(10))
    assert np.bincount(fmnist.y_test).tolist() == [1000] * 10
    assert fmnist.source_layout == "NHW"


@pytest.mark.parametrize("layout,shape", [("NHW", (5, 8, 9)), ("NCHW", (5, 3, 8, 9)), ("NHWC", (5, 8, 9, 3)),
                                          ("NCHW", (5, 1, 8, 9)), ("NHWC", (5, 8, 9, 1))])
def test_detect_layout(layout, shape):
    assert data.detect_layout(shape) == layout


def test_detect_layout_uses_model_shape_when_ambiguous():
    assert data.detect_layout((5, 3, 4, 3), expected_chw=(3, 4, 3)) == "NCHW"
    assert data.detect_layout((5, 3, 4, 3), expected_chw=(3, 3, 4)) == "NHWC"


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
def test_npz_layouts_give_the_same_nchw(tmp_path, layout):
    from conftest import make_tiny_npz
    ref = data.load_npz(make_tiny_npz(tmp_path / "a.npz", layout="NHW"))
    ds = data.load_npz(make_tiny_npz(tmp_path / "b.npz", layout=layout))
    assert ds.source_layout == layout
    np.testing.assert_array_equal(ds.x_train, ref.x_train)
    assert ds.x_train.shape[1:] == (1, 12, 12)


def test_float_npz_keeps_scale_one(tmp_path):
    x = np.random.default_rng(0).random((6, 3, 5, 5), dtype=np.float32)
    np.savez(tmp_path / "f.npz", x_train=x, y_train=np.arange(6) % 2, x_test=x, y_test=np.arange(6) % 2)
    ds = data.load_npz(tmp_path / "f.npz")
    assert ds.source_dtype == "float32" and ds.scale == 1.0


def _save(tmp_path, **over):
    base = dict(x_train=np.zeros((4, 6, 6), np.uint8), y_train=np.array([0, 1, 2, 3]),
                x_test=np.zeros((2, 6, 6), np.uint8), y_test=np.array([0, 1]))
    base.update(over)
    base = {k: v for k, v in base.items() if v is not None}
    np.savez(tmp_path / "d.npz", **base)
    return tmp_path / "d.npz"


@pytest.mark.parametrize("over,needle", [
    ({"y_test": None}, "lacks y_test"),
    ({"x_train": np.array([{"a": 1}] * 4, dtype=object)}, "Python objects"),
    ({"x_test": np.full((2, 6, 6), np.nan, np.float32)}, "NaN or inf"),
    ({"x_test": np.full((2, 6, 6), np.inf, np.float32)}, "NaN or inf"),
    ({"y_train": np.array([0, 1, -1, 3])}, "negative labels"),
    ({"y_train": np.array([0, 1, 2])}, "must match"),
    ({"x_test": np.zeros((2, 7, 7), np.uint8)}, "must match"),
    ({"x_train": np.zeros((4, 6, 6, 6, 6), np.uint8)}, "expected N×H×W"),
])
def test_npz_bad_inputs(tmp_path, over, needle):
    with pytest.raises(DataError, match=needle):
        data.load_npz(_save(tmp_path, **over))


def test_npz_not_a_zip(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not a readable .npz"):
        data.load_npz(p)


def test_labels_out_of_range_for_model(tmp_path):
    ds = data.load_npz(_save(tmp_path, y_train=np.array([0, 1, 2, 9])))
    with pytest.raises(DataError, match="labels go up to 9"):
        data.check_fits(ds, (1, 6, 6), num_classes=4)


def test_image_size_must_fit_model(tmp_path):
    ds = data.load_npz(_save(tmp_path))
    with pytest.raises(DataError, match="model takes 1x28x28"):
        data.check_fits(ds, (1, 28, 28), num_classes=10)


def test_preprocessing_applies_scale_mean_std_once():
    pre = preprocessing.Preprocessing(input_shape=(2, 1, 1), source_layout="NCHW", source_dtype="uint8",
                                      scale=1 / 255, mean=(0.5, 0.0), std=(0.5, 2.0))
    x = np.array([[[[255]], [[51]]]], np.uint8)
    y = preprocessing.apply(x, pre)
    np.testing.assert_allclose(y.ravel(), [1.0, 0.1], rtol=1e-6)
    lo, hi = pre.value_range()
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(1.0)
    assert preprocessing.Preprocessing.from_dict(pre.to_dict()) == pre


def test_labels_beyond_the_outputs_name_the_split_and_a_one_output_model_is_explained():
    from pipeline.inputs.data import Dataset, check_fits
    x = np.zeros((4, 1, 8, 8), np.uint8)
    ds = Dataset(name="mine.npz", origin="mine.npz", x_train=x, y_train=np.array([0, 1, 2, 1]), x_test=x,
                 y_test=np.array([0, 1, 1, 7]), source_layout="NCHW")
    with pytest.raises(DataError, match=r"^mine.npz: y_test labels go up to 7 but the model has 3 outputs"):
        check_fits(ds, (1, 8, 8), 3)
    with pytest.raises(DataError, match=r"the model has 1 output per image; .*torch.zeros_like\(z\), z\], 1\)"):
        check_fits(ds, (1, 8, 8), 1)
