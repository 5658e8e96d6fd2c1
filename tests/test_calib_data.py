"""Representative datasets (calib_data/): every source's shape, value range and determinism, the on-disk
cache, the mismatch errors, and the export CLI with generated sources on a tiny model."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from pipeline import calib_data
from pipeline.calib_data import ArraySource, CalibContext, build, check_source, list_sources
from pipeline.errors import CalibrationError
from pipeline.inputs.preprocessing import Preprocessing, apply

N = 40  # small sets keep the file fast; the warning below 100 is silenced where it is not the subject

SHAPES = {"gray": (1, 16, 16), "rgb": (3, 20, 24)}


def make_ctx(shape, cache_dir=None, n=120, seed=0) -> CalibContext:
    """A toy uint8 training split: a bright rectangle per class on a dark, noisy background."""
    c, h, w = shape
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.integers(0, 40, (n, c, h, w)).astype(np.int64)
    for i, k in enumerate(y):
        x[i, :, (k // 2) * h // 2:(k // 2 + 1) * h // 2, (k % 2) * w // 2:(k % 2 + 1) * w // 2] += 200
    x = np.clip(x, 0, 255).astype(np.uint8)
    pre = Preprocessing(input_shape=shape, source_layout="NCHW", source_dtype="uint8", scale=1 / 255,
                        mean=(0.3,) * c, std=(0.35,) * c, raw_range=(0.0, 255.0))
    return CalibContext(x_train=x, y_train=y.astype(np.int64), preprocessing=pre, dataset_name="toy",
                        cache_dir=cache_dir)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """An image folder (mixed sizes and modes) and an .npz of raw arrays, for each context shape."""
    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(1)
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(60):
        size = (int(rng.integers(10, 40)), int(rng.integers(10, 40)))
        mode = ("L", "RGB", "RGBA")[i % 3]
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    npz = {}
    for key, (c, h, w) in SHAPES.items():
        npz[key] = root / f"{key}.npz"
        np.savez(npz[key], x=rng.integers(0, 256, (60, h, w, c), dtype=np.uint8))  # NHWC, raw
    return folder, npz


def specs(user_files, shape_key):
    folder, npz = user_files
    return {"balanced": "balanced", "real": "real", "first": "first", "fractal": "fractal",
            "fractal-raw": "fractal-raw", "noise": "noise:gaussian", "noise:uniform": "noise:uniform", "shifted": "shifted:gaussian_noise:2",
            "shifted:contrast": "shifted:contrast", "folder": f"folder:{folder}", "npz": f"npz:{npz[shape_key]}"}


def quiet_build(spec, ctx, size, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build(spec, ctx, size, seed)


def test_every_registered_source_is_tested(user_files):
    names = {s.split(":", 1)[0] for s in specs(user_files, "gray").values()}
    names.add("gan")  # trains a GAN on the training split: tests/test_calib_gan.py tests it on its own
    assert set(list_sources()) == names, "add a spec for each new source to specs() so it is tested"


@pytest.mark.parametrize("shape_key", list(SHAPES))
@pytest.mark.parametrize("name", ["balanced", "real", "first", "fractal", "fractal-raw", "noise", "noise:uniform", "shifted",
                                  "shifted:contrast", "folder", "npz"])
def test_source_shape_range_and_determinism(name, shape_key, user_files):
    ctx = make_ctx(SHAPES[shape_key])
    pre = ctx.preprocessing
    spec = specs(user_files, shape_key)[name]
    src = quiet_build(spec, ctx, N, seed=0)
    x = src.array()
    assert isinstance(src, calib_data.CalibrationSource)
    assert x.shape == (N, *SHAPES[shape_key]) and x.dtype == np.float32 and len(src) == N
    assert len(list(src)) == N
    lo, hi = pre.value_range()
    eps = 1e-5
    assert x.min() >= lo - eps and x.max() <= hi + eps
    # Normalised exactly once: undoing the preprocessing gives whole grey levels 0..255, as in the data.
    raw = (x * np.asarray(pre.std, np.float32)[:, None, None] + np.asarray(pre.mean, np.float32)[:, None, None]) * 255
    np.testing.assert_allclose(raw, np.rint(raw), atol=1e-3)
    assert x.std() > 0.05 * (hi - lo)  # not constant
    d = src.describe()
    assert d["source"].split(":")[0] == spec.split(":")[0] and d["size"] == N and d["origin"]
    assert d["spec"] == spec and d["build_s"] >= 0
    st = d["statistics"]
    assert st["min"] == pytest.approx(float(x.min())) and st["max"] == pytest.approx(float(x.max()))
    assert st["mean"] == pytest.approx(float(x.mean()), abs=1e-6)
    assert len(st["per_channel_mean"]) == SHAPES[shape_key][0]
    json.dumps(d)  # the report must be able to hold it

    again = quiet_build(spec, ctx, N, seed=0)
    np.testing.assert_array_equal(again.array(), x)
    if name != "first":  # the first N images do not depend on the seed
        other = quiet_build(spec, ctx, N, seed=1)
        assert not np.array_equal(other.array(), x)
        assert other.describe()["seed"] == 1


def test_real_sources_pick_training_images():
    ctx = make_ctx(SHAPES["gray"])
    first = quiet_build("first", ctx, N, 0)
    np.testing.assert_array_equal(first.array(), apply(ctx.x_train[:N], ctx.preprocessing))
    bal = quiet_build("balanced", ctx, N, 0).describe()
    assert bal["per_class"] == [N // 4] * 4 and bal["split"] == "train"


def test_fractal_sizing_and_weights_follow_fractaldb():
    from pipeline.calib_data import fractal
    # Datumaro's categories x 25 weights x instances (research notes, section E).
    assert fractal.sizing(5000) == (14, 25, 15)
    assert fractal.sizing(500) == (4, 25, 5)
    assert fractal.sizing(300) == (3, 25, 4)
    assert fractal.sizing(100) == (2, 25, 2)
    assert fractal.sizing(10) == (1, 10, 1)
    w = fractal.weight_vectors()
    assert w.shape == (25, 6) and np.all(w[0] == 1) and len(np.unique(w, axis=0)) == 25
    assert sorted(set(np.round(w.ravel(), 6))) == [0.2, 0.6, 1.0, 1.4, 1.8]


def test_fractal_covers_the_data_range_and_varies():
    ctx = make_ctx(SHAPES["gray"])
    src = quiet_build("fractal", ctx, 60, 0)
    x = src.array()
    data = apply(ctx.x_train, ctx.preprocessing)
    # Pixel values follow the data's quantiles: the set spans the data's range (input quantization sees it).
    assert x.min() == pytest.approx(data.min()) and x.max() == pytest.approx(data.max())
    flat = x.reshape(len(x), -1)
    assert len(np.unique(flat, axis=0)) == len(x)  # no duplicate images
    g = src.describe()["generator"]
    assert g["categories"] * g["weight_variants"] * g["instances"] >= 60
    assert all(2 <= m <= 7 for m in g["maps_per_category"])


def test_fractal_refuses_tiny_images():
    with pytest.raises(CalibrationError, match="at least 8 pixels"):
        quiet_build("fractal", make_ctx((1, 6, 6)), 10, 0)


# --------------------------------------------------------------------------- cache

def test_cache_reads_back_instead_of_regenerating(tmp_path, monkeypatch):
    from pipeline.calib_data import fractal
    ctx = make_ctx(SHAPES["gray"], cache_dir=tmp_path / "cache")
    first = quiet_build("fractal", ctx, N, 0)
    assert first.describe()["cache"] == {"used": True, "hit": False, "path": first.describe()["cache"]["path"]}
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    assert not any(".part" in f for f in files)

    def boom(*a, **k):
        raise AssertionError("the cached set was regenerated")
    monkeypatch.setattr(fractal, "generate", boom)
    second = quiet_build("fractal", ctx, N, 0)
    d = second.describe()
    assert d["cache"]["hit"] is True and d["origin"] == first.describe()["origin"]
    np.testing.assert_array_equal(second.array(), first.array())
    # It really comes from the file: change the file and the source follows.
    npy = tmp_path / "cache" / files[1]
    np.save(npy, first.array()[::-1].copy())
    np.testing.assert_array_equal(quiet_build("fractal", ctx, N, 0).array(), first.array()[::-1])
    # Another seed, size or input shape is another entry (here: would regenerate).
    for spec, size, seed, c in (("fractal", N, 1, ctx), ("fractal", N + 1, 0, ctx),
                                ("fractal", N, 0, make_ctx((1, 16, 20), tmp_path / "cache"))):
        with pytest.raises(AssertionError, match="regenerated"):
            quiet_build(spec, c, size, seed)


def test_cache_key_includes_preprocessing_and_data(tmp_path):
    from pipeline.calib_data.cache import cache_key, entry_paths
    ctx = make_ctx(SHAPES["gray"], cache_dir=tmp_path)
    key = cache_key(ctx, "noise:gaussian", 10, 0, 1)
    other_pre = CalibContext(ctx.x_train, ctx.y_train, Preprocessing(**{**ctx.preprocessing.__dict__, "mean": (0.5,)}),
                             "toy", tmp_path)
    other_data = make_ctx(SHAPES["gray"], tmp_path, seed=5)
    paths = {entry_paths(tmp_path, k)[0] for k in (key, cache_key(other_pre, "noise:gaussian", 10, 0, 1),
                                                   cache_key(other_data, "noise:gaussian", 10, 0, 1),
                                                   cache_key(ctx, "noise:uniform", 10, 0, 1))}
    assert len(paths) == 4


def test_broken_cache_entry_is_regenerated(tmp_path):
    ctx = make_ctx(SHAPES["gray"], cache_dir=tmp_path)
    ref = quiet_build("noise", ctx, N, 0)
    npy = next(tmp_path.glob("*.npy"))
    npy.write_bytes(b"not a npy file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = build("noise", ctx, N, 0)
    assert any("unreadable calibration cache" in str(w.message) for w in caught)
    np.testing.assert_array_equal(again.array(), ref.array())
    assert again.describe()["cache"]["hit"] is False
    np.testing.assert_array_equal(np.load(npy, allow_pickle=False), ref.array())  # rewritten


def test_unwritable_cache_warns_and_still_builds(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ctx = make_ctx(SHAPES["gray"], cache_dir=blocker / "cache")  # a folder inside a file: cannot be made
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = build("noise", ctx, N, 0)
    assert len(src) == N
    assert any("cannot write the calibration cache" in str(w.message) for w in caught)


def test_no_cache_dir_means_no_cache():
    src = quiet_build("fractal", make_ctx(SHAPES["gray"]), 10, 0)
    assert src.describe()["cache"] == {"used": False}


# --------------------------------------------------------------------------- errors

def test_too_few_warns_and_empty_or_too_many_fail(user_files):
    ctx = make_ctx(SHAPES["gray"])
    with pytest.warns(UserWarning, match="only 40 calibration samples"):
        build("real", ctx, N, 0)
    with pytest.raises(CalibrationError, match="empty representative dataset"):
        build("fractal", ctx, 0, 0)
    with pytest.raises(CalibrationError, match="yielded no samples"):
        check_source(ArraySource("x", np.zeros((0, 1, 16, 16), np.float32), 0, "test"), ctx.preprocessing)
    folder, npz = user_files
    for spec, holds in (("real", 120), ("balanced", 120), ("shifted:contrast", 120),
                        (f"folder:{folder}", 60), (f"npz:{npz['gray']}", 60)):
        with pytest.raises(CalibrationError, match=f"larger than .*{holds} samples.*--calib-size {holds} or fewer"):
            build(spec, ctx, holds + 1, 0)


@pytest.mark.parametrize("samples, match", [
    (np.zeros((4, 1, 14, 14), np.float32), r"1x14x14 but the model takes 1x16x16"),
    (np.zeros((4, 3, 16, 16), np.float32), r"3 channels but the model takes 1"),
    (np.zeros((4, 1, 16, 16), np.float64), r"float64 samples"),
    (np.full((4, 1, 16, 16), np.nan, np.float32), r"NaN or inf"),
])
def test_shape_and_channel_mismatch_is_an_error(samples, match):
    with pytest.raises(CalibrationError, match=match):
        check_source(ArraySource("bad", samples, 0, "test"), make_ctx(SHAPES["gray"]).preprocessing)


def test_value_range_mismatch_is_an_error():
    ctx = make_ctx(SHAPES["gray"])
    pre = ctx.preprocessing
    once = apply(ctx.x_train[:N], pre)
    twice = apply(once * 255, pre)  # normalised twice
    with pytest.raises(CalibrationError, match="normalised twice or not at all"):
        check_source(ArraySource("bad", twice, 0, "test"), pre)
    raw = ctx.x_train[:N].astype(np.float32)  # not normalised at all
    with pytest.raises(CalibrationError, match="normalised twice or not at all"):
        check_source(ArraySource("bad", raw, 0, "test"), pre)
    scaled_twice = apply(ctx.x_train[:N].astype(np.float32) / 255, pre)  # divided by 255 twice
    with pytest.raises(CalibrationError, match="scaled twice"):
        check_source(ArraySource("bad", scaled_twice, 0, "test"), pre)


def test_set_missing_part_of_the_input_range_warns():
    ctx = make_ctx(SHAPES["gray"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        low = build("shifted:contrast:5", ctx, 100, 0)
        full = build("balanced", ctx, 100, 0)
    msgs = [str(w.message) for w in caught]
    assert any("of the training data's range" in m for m in msgs)
    assert low.describe()["coverage_of_training_range"] < 0.9
    assert full.describe()["coverage_of_training_range"] == pytest.approx(1.0)


def test_unknown_names_get_did_you_mean():
    ctx = make_ctx(SHAPES["gray"])
    with pytest.raises(CalibrationError, match="did you mean fractal"):
        build("fractl", ctx, N, 0)
    with pytest.raises(CalibrationError, match="did you mean gaussian"):
        build("noise:gausian", ctx, N, 0)
    with pytest.raises(CalibrationError, match="did you mean gaussian_noise"):
        build("shifted:gausian_noise", ctx, N, 0)
    with pytest.raises(CalibrationError, match="severity '7' is not one of 1, 2, 3, 4, 5"):
        build("shifted:contrast:7", ctx, N, 0)
    with pytest.raises(CalibrationError, match="needs a corruption"):
        build("shifted", ctx, N, 0)
    with pytest.raises(CalibrationError, match="takes no argument"):
        build("balanced:5", ctx, N, 0)


def test_folder_converts_channels_and_resizes(tmp_path):
    ctx = make_ctx(SHAPES["gray"])
    Image.new("RGB", (40, 30), (255, 255, 255)).save(tmp_path / "white.png")
    Image.new("RGB", (9, 50), (0, 0, 0)).save(tmp_path / "black.jpg")
    pattern = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pattern, "L").save(tmp_path / "pattern.png")
    src = quiet_build(f"folder:{tmp_path}", ctx, 3, 0)
    x = src.array()  # files sorted by name: black, pattern, white
    lo, hi = ctx.preprocessing.value_range()
    assert np.allclose(x[0], lo) and np.allclose(x[2], hi)
    np.testing.assert_array_equal(x[1], apply(pattern[None, None], ctx.preprocessing)[0])  # no resize: exact
    d = src.describe()
    assert d["resized"] == 2 and d["converted_to"] == "L" and d["files_found"] == 3


def test_folder_errors(tmp_path):
    ctx = make_ctx(SHAPES["gray"])
    with pytest.raises(CalibrationError, match="does not exist"):
        build(f"folder:{tmp_path / 'nope'}", ctx, 1, 0)
    with pytest.raises(CalibrationError, match="holds no image files"):
        build(f"folder:{tmp_path}", ctx, 1, 0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CalibrationError, match="cannot read calibration image .*broken.png"):
        build(f"folder:{tmp_path}", ctx, 1, 0)


def test_npz_keys_layouts_and_errors(tmp_path):
    ctx = make_ctx(SHAPES["gray"])
    pre = ctx.preprocessing
    x = np.random.default_rng(0).integers(0, 256, (30, 16, 16, 1), dtype=np.uint8)
    p = tmp_path / "a.npz"
    np.savez(p, x_train=x[::-1], x_calib=x)  # x_calib wins over x_train
    src = quiet_build(f"npz:{p}", ctx, 30, 0)
    np.testing.assert_array_equal(src.array(), apply(np.transpose(x, (0, 3, 1, 2)), pre))
    assert src.describe()["key"] == "x_calib" and src.describe()["layout"] == "NHWC"
    assert src.describe()["seed"] is None  # all arrays used, nothing drawn

    cases = {
        "rgb.npz": (dict(x=np.zeros((5, 3, 16, 16), np.uint8)), "3-channel images but the model takes 1"),
        "small.npz": (dict(x=np.zeros((5, 12, 12), np.uint8)), "12x12 images but the model takes 16x16"),
        "unit.npz": (dict(x=np.linspace(0, 1, 5 * 256, dtype=np.float32).reshape(5, 16, 16)), "already scaled to"),
        "normed.npz": (dict(x=np.linspace(-2, 2, 5 * 256, dtype=np.float32).reshape(5, 16, 16)), "not normalised"),
        "nokey.npz": (dict(images=np.zeros((5, 16, 16), np.uint8)), "no x_calib, x, x_train"),
        "objs.npz": (dict(x=np.array([object()] * 5, dtype=object)), "Python objects"),
    }
    for name, (arrays, match) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(CalibrationError, match=match):
            build(f"npz:{tmp_path / name}", ctx, 5, 0)
    with pytest.raises(CalibrationError, match="does not exist"):
        build(f"npz:{tmp_path / 'missing.npz'}", ctx, 5, 0)


# --------------------------------------------------------------------------- CLI

def _run(args, tinynet_dir, tiny_npz, in_dir):
    from pipeline.export import main
    in_dir(tinynet_dir)
    return main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz),
                 *args])


@pytest.mark.slow
def test_cli_fractal_is_described_and_cached(tmp_path, tinynet_dir, tiny_npz, in_dir, capsys):
    cache = tmp_path / "cache"
    reports = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        status = _run(["--calib", "fractal", "--calib-size", "100", "--calib-cache", str(cache), "--out", str(out)],
                      tinynet_dir, tiny_npz, in_dir)
        assert status in (0, 1)
        reports.append(json.loads((out / "report.json").read_text()))
    c0, c1 = reports[0]["calibration"], reports[1]["calibration"]
    assert c0["source"] == "fractal" and c0["size"] == 100 and c0["seed"] == 0 and "IFS" in c0["origin"]
    assert c0["split"] is None and c0["generator"]["categories"] == 2
    assert c0["cache"]["hit"] is False and c1["cache"]["hit"] is True and c0["cache"]["path"] == c1["cache"]["path"]
    assert c0["statistics"] == c1["statistics"]
    assert reports[0]["conversion"]["calibration_samples"] == 100
    # The same calibration set gives the same activation quantization.
    q0, q1 = ([t["quantization"] for t in r["quantization"]["tensors"]] for r in reports)
    assert q0 == q1 and reports[0]["quantization"]["inputs"] == reports[1]["quantization"]["inputs"]
    assert len(list(cache.glob("*.npy"))) == 1


def test_cli_npz_source(tmp_path, tinynet_dir, tiny_npz, in_dir):
    x = np.load(tiny_npz)["x_test"][:120]
    p = tmp_path / "mine.npz"
    np.savez(p, x=x)
    out = tmp_path / "out"
    status = _run(["--calib", f"npz:{p}", "--calib-size", "120", "--calib-cache", "off", "--out", str(out)],
                  tinynet_dir, tiny_npz, in_dir)
    r = json.loads((out / "report.json").read_text())
    assert status == 0 and r["passed"]
    c = r["calibration"]
    assert c["source"] == "npz" and c["size"] == 120 and c["key"] == "x" and c["path"] == str(p)
    assert r["config"]["calib_cache"] is None


@pytest.mark.parametrize("calib, match", [
    (["--calib", "shifted:gausian_noise"], "did you mean gaussian_noise"),
    (["--calib", "noise:pink"], "unknown noise kind 'pink'"),
    (["--calib", "real", "--calib-size", "100000"], "larger than the tiny training split"),
    (["--calib", "npz:/nonexistent.npz"], "does not exist"),
])
def test_cli_bad_calibration_exits_2_without_output(calib, match, tmp_path, tinynet_dir, tiny_npz, in_dir, capsys):
    out = tmp_path / "out"
    status = _run([*calib, "--calib-cache", str(tmp_path / "c"), "--out", str(out)], tinynet_dir, tiny_npz, in_dir)
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
