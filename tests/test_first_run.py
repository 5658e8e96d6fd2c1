"""What a new user hits first: their own ONNX from torch's default exporter, a small folder of
calibration images, and the default output folder's name."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from pipeline.export import main
from pipeline.outdir import default_out_name


def _tiny_module(tinynet_dir):
    import importlib
    import sys

    import torch
    sys.path.insert(0, str(tinynet_dir))
    m = importlib.import_module("tinynet").tinynet()
    m.load_state_dict(torch.load(tinynet_dir / "tinynet.pt", weights_only=True))
    return m.eval()


def test_torch_default_dynamo_onnx_goes_through_the_export(tmp_path, tinynet_dir, tiny_npz):
    """``torch.onnx.export(model, x, path)`` as the PyTorch docs show it: torch 2.13's default dynamo exporter,
    which needs onnxscript (pinned in pyproject.toml); it writes external data and a fixed batch of 1."""
    import torch
    m = _tiny_module(tinynet_dir)
    path = tmp_path / "mine.onnx"
    with contextlib.redirect_stdout(None):  # the exporter prints its progress
        torch.onnx.export(m, (torch.zeros(1, 1, 12, 12),), str(path), dynamo=True)
    out = tmp_path / "o"
    assert main(["--model", str(path), "--data", str(tiny_npz), "--calib-size", "100", "--eval-limit", "200",
                 "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["model"]["kind"] == "onnx" and r["quantization"]["fully_int8"] is True and r["passed"]
    z = np.load(out / "predictions.npz")
    x = np.load(tiny_npz)["x_test"][:200, None].astype(np.float32) / 255
    with torch.no_grad():
        np.testing.assert_allclose(z["fp32_logits"], m(torch.from_numpy(x)).numpy(), atol=1e-4)


# --------------------------------------------------------------------------- --calib folder:DIR, few images

@pytest.fixture()
def few_images(tmp_path):
    from PIL import Image
    d = tmp_path / "calib_images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L").save(d / f"{i}.png")
    return d


def test_calib_folder_with_fewer_images_than_the_default_uses_them_all(few_images, tmp_path, tinynet_dir,
                                                                      tiny_npz, in_dir, capsys):
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data",
                   str(tiny_npz), "--calib", f"folder:{few_images}", "--eval-limit", "50", "--out", str(out)])
    err = capsys.readouterr().err
    assert status in (0, 1), err  # the gates may fail on random calibration images; the export ran
    c = json.loads((out / "report.json").read_text())["calibration"]
    assert c["source"] == "folder" and c["size"] == 30 and c["files_found"] == 30 and c["selection"] == "all files"
    assert "only 30 calibration samples" in err  # the under-100 warning


def test_calib_folder_with_explicit_larger_size_is_still_an_error(few_images, tmp_path, tinynet_dir, tiny_npz,
                                                                 in_dir, capsys):
    in_dir(tinynet_dir)
    out = tmp_path / "o"
    status = main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data",
                   str(tiny_npz), "--calib", f"folder:{few_images}", "--calib-size", "31", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: --calib-size 31 is larger than the calibration folder") and "30 samples" in err
    assert "pass --calib-size 30 or fewer" in err
    assert not out.exists()


def test_calib_size_default_is_500_capped_by_what_a_source_holds():
    from pipeline.calib_data import DEFAULT_SIZE, generated_size, resolve_size
    from pipeline.errors import CalibrationError
    assert DEFAULT_SIZE == 500
    assert resolve_size("x", None, 30) == 30 and resolve_size("x", None, 10_000) == 500
    assert resolve_size("x", 30, 30) == 30 and generated_size(None) == 500 and generated_size(7) == 7
    with pytest.raises(CalibrationError, match="--calib-size 31 is larger than x"):
        resolve_size("x", 31, 30)
    with pytest.raises(CalibrationError, match="holds no samples"):
        resolve_size("x", None, 0)


@pytest.mark.parametrize("argv", [["--calib-size", "0"], ["--calib-size", "-3"]])
def test_calib_size_not_positive_is_refused_before_anything_loads(argv, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--model", "no_such_module:factory", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --calib-size {argv[1]} gives an empty representative dataset") and not out.exists()


# --------------------------------------------------------------------------- default output folder

@pytest.mark.parametrize("spec, weights, name", [
    ("zoo:refcnn", None, "refcnn-tflite-int8"),  # setup.sh and the README rely on this exact name
    ("zoo:refcnn", "finetuned.pt", "refcnn-finetuned-tflite-int8"),
    ("mymodels:factory", "run3.pt", "mymodels-factory-run3-tflite-int8"),
    ("mymodels:factory", "runs/run4.pth", "mymodels-factory-run4-tflite-int8"),
    ("othermodels:factory", "run3.pt", "othermodels-factory-run3-tflite-int8"),
    ("pkg.sub.models:build", None, "pkg-sub-models-build-tflite-int8"),
    ("path/to/model.onnx", None, "model-tflite-int8"),
    ("exports/net.v2.pt", None, "net.v2-tflite-int8"),
    ("weird name$:fa ctory", "a b.pt", "weird_name_-fa_ctory-a_b-tflite-int8"),
])
def test_default_out_name(spec, weights, name):
    assert default_out_name(spec, "tflite-int8", weights) == name


def test_factories_named_alike_get_their_own_folders(tmp_path, tinynet_dir, tiny_npz, in_dir):
    """Without --out, two factories both called ``factory`` (and one model with two weight files) no longer write
    the same folder."""
    import shutil
    in_dir(tmp_path)
    (tmp_path / "mymodels.py").write_text((tinynet_dir / "tinynet.py").read_text() + "\nfactory = tinynet\n")
    w = tmp_path / "run3.pt"
    shutil.copy(tinynet_dir / "tinynet.pt", w)
    base = ["--data", str(tiny_npz), "--calib-size", "50", "--eval-limit", "50", "--calib-cache", "off"]
    assert main(["--model", "mymodels:factory", "--weights", "run3.pt", *base]) == 0
    assert (tmp_path / "mymodels-factory-run3-tflite-int8" / "report.json").is_file()
