"""Class names: ``--class-names`` on export and evaluate, a ``class_names`` array in the user's .npz, the
ten Fashion-MNIST names by default; carried into report.json (``data.class_names``), the per-class table, the device
bundle (bundle.json) and printed by the Pi script next to the class index. A count that does not match the model's
classes is one ``error:`` line, exit 2, nothing written. Real exports, real LiteRT kernels."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")  # tiny.npz: a bright square in one quadrant
FAST = ["--corruptions", "none", "--workers", "1"]


def _one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def _with_names(src: Path, dst: Path, names) -> Path:
    z = dict(np.load(src))
    z["class_names"] = names
    np.savez(dst, **z)
    return dst


@pytest.fixture(scope="module")
def named_npz(tiny_npz, tmp_path_factory) -> Path:
    return _with_names(tiny_npz, tmp_path_factory.mktemp("named") / "named.npz", np.array(NAMES))


@pytest.fixture(scope="module")
def named_export(tinynet_dir, named_npz, tmp_path_factory) -> Path:
    """One export of the tiny factory model on the toy data whose .npz holds class_names."""
    from pipeline.export import main
    out = tmp_path_factory.mktemp("named_export") / "out"
    with contextlib.chdir(tinynet_dir):
        status = main(["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"),
                       "--data", str(named_npz), "--calib-size", "100", "--out", str(out)])
    assert status == 0
    return out


def _own(tinynet_dir, data) -> list[str]:
    return ["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(data)]


def _evaluate(args, capsys, cwd):
    from pipeline.evaluate import main
    with contextlib.chdir(cwd):
        status = main([str(a) for a in args])
    cap = capsys.readouterr()
    return status, cap.out, cap.err


# --------------------------------------------------------------------------- data: the .npz array, the defaults

def test_fashion_mnist_names_are_known_by_default(fmnist):
    assert fmnist.class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                  "Sneaker", "Bag", "Ankle boot")
    d = fmnist.describe()
    assert d["class_names"] == list(fmnist.class_names) and d["class_names_source"] == "the Fashion-MNIST names"


def test_builtin_names_are_dropped_for_a_model_with_other_classes_but_given_ones_must_fit(fmnist):
    from pipeline.inputs import data
    from pipeline.errors import DataError
    assert data.check_class_count(fmnist, 10) is fmnist
    assert data.check_class_count(fmnist, 12).class_names is None  # not the user's: shown by index, no error
    given = fmnist.with_class_names(["a", "b"], "--class-names")
    with pytest.raises(DataError, match=r"--class-names gives 2 class names but the model has 10 classes") as e:
        data.check_class_count(given, 10)
    assert e.value.exit_status == 2


def test_npz_class_names_are_read_as_unicode_only(named_npz, tiny_npz, tmp_path):
    from pipeline.inputs import data
    from pipeline.errors import DataError
    ds = data.load_npz(named_npz)
    assert ds.class_names == NAMES and "class_names" in ds.class_names_source
    assert data.load_npz(tiny_npz).class_names is None
    bad = {
        "object": (np.array(list(NAMES), dtype=object), "object dtype"),
        "bytes": (np.array([n.encode() for n in NAMES]), "byte strings"),
        "2d": (np.array([NAMES[:2], NAMES[2:]]), "not a 1-D list of names"),
        "numbers": (np.arange(4), "holds numbers"),
        "empty-name": (np.array(["a", " ", "c", "d"]), "name 1 is empty"),
        "duplicate": (np.array(["a", "b", "a", "d"]), "both 'a'"),
    }
    for key, (arr, needle) in bad.items():
        p = _with_names(tiny_npz, tmp_path / f"{key}.npz", arr)
        with pytest.raises(DataError, match=needle.replace("(", r"\(")) as e:
            data.load_npz(p)
        assert e.value.exit_status == 2
    # A string array under any other key is still refused as before.
    z = dict(np.load(tiny_npz))
    z["y_test"] = np.array(["0"] * len(z["y_test"]))
    np.savez(tmp_path / "strlabels.npz", **z)
    with pytest.raises(DataError, match="holds strings"):
        data.load_npz(tmp_path / "strlabels.npz")


# --------------------------------------------------------------------------- export: report.json, bundle

def test_npz_names_flow_into_report_json(named_export):
    rep = json.loads((named_export / "report.json").read_text())
    assert rep["data"]["class_names"] == list(NAMES)
    assert rep["data"]["class_names_source"].endswith("array class_names")


def test_npz_names_flow_into_the_exported_bundle(named_export):
    manifest = json.loads((named_export / "bundle" / "bundle.json").read_text())
    assert manifest["class_names"] == list(NAMES)


@pytest.mark.parametrize("args, needles", [
    (["--class-names", "a,b"], ["--class-names gives 2 class names", "the model has 4 classes"]),
    (["--class-names", "a,,c,d"], ["name 1 is empty"]),
    (["--class-names", "a,b,a,d"], ["both 'a'"]),
])
def test_export_wrong_class_names_are_one_line_exit_2(tinynet_dir, tiny_npz, tmp_path, capsys, args, needles):
    from pipeline.export import main
    out = tmp_path / "out"
    with contextlib.chdir(tinynet_dir):
        status = main(_own(tinynet_dir, tiny_npz) + ["--calib-size", "20", "--out", str(out), *args])
    assert status == 2
    _one_error_line(capsys.readouterr().err, *needles)
    assert not out.exists()


def test_export_npz_with_the_wrong_count_is_one_line_exit_2(tinynet_dir, tiny_npz, tmp_path, capsys):
    from pipeline.export import main
    p = _with_names(tiny_npz, tmp_path / "three.npz", np.array(["a", "b", "c"]))
    out = tmp_path / "out"
    with contextlib.chdir(tinynet_dir):
        status = main(_own(tinynet_dir, p) + ["--calib-size", "20", "--out", str(out)])
    assert status == 2
    _one_error_line(capsys.readouterr().err, "three.npz: array class_names gives 3 class names", "has 4 classes")
    assert not out.exists()


def test_export_class_names_flag_reaches_the_config():
    from pipeline.export import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["--class-names", " cat, dog ,bird"]))
    assert cfg.class_names == ("cat", "dog", "bird")
    assert config_from_args(build_parser().parse_args([])).class_names is None


# --------------------------------------------------------------------------- the bundle and the Pi script

@pytest.fixture(scope="module")
def named_bundle(named_export, named_npz, tmp_path_factory) -> Path:
    """The device bundle of the named export's .tflite, written by bundle.write_bundle with the class names."""
    from pipeline.inputs import data
    from pipeline.inputs import preprocessing
    from pipeline.device.bundle import write_bundle
    rep = json.loads((named_export / "report.json").read_text())
    ds = data.load_npz(named_npz)
    pre = preprocessing.from_record(rep["preprocessing"], "report.json", "re-export")
    n = 16
    work = tmp_path_factory.mktemp("named_bundle")
    write_bundle(work, named_export / "model_int8.tflite", rep["preprocessing"]["tflite_input_layout"],
                 rep["preprocessing"], ds.x_test[:n], preprocessing.apply(ds.x_test[:n], pre), ds.y_test[:n],
                 model_spec="tinynet:tinynet", target="tflite-int8", n_samples=n, class_names=ds.class_names)
    return work / "bundle"


def test_bundle_json_records_the_names_and_its_digests_still_hold(named_bundle):
    import hashlib
    m = json.loads((named_bundle / "bundle.json").read_text())
    assert m["class_names"] == list(NAMES)
    for name, digest in m["sha256"].items():  # no new file: the names live in the manifest itself
        assert hashlib.sha256((named_bundle / name).read_bytes()).hexdigest() == digest


def test_write_bundle_refuses_a_name_count_unlike_the_outputs(named_export, tmp_path):
    from pipeline.device.bundle import write_bundle
    from pipeline.errors import OutputError
    raw = np.zeros((2, 1, 12, 12), np.uint8)
    with pytest.raises(OutputError, match="3 class names for a model with 4 outputs"):
        write_bundle(tmp_path, named_export / "model_int8.tflite", "NHWC", {}, raw, raw.astype(np.float32),
                     np.zeros(2, np.int64), model_spec="m", target="t", class_names=("a", "b", "c"))
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle.tar.gz").exists()


def _pi(bundle: Path, *args, timeout=300):
    return subprocess.run([sys.executable, str(bundle / "pi_benchmark.py"), *map(str, args)], cwd=bundle,
                          capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})


def test_pi_script_prints_the_label_next_to_the_class_index_and_percentages(named_bundle, tmp_path):
    js = tmp_path / "pi.json"
    p = _pi(named_bundle, "--check-only", "--kernels", "xnnpack,builtin", "--json", js)
    assert p.returncode == 0, p.stderr
    labels = np.load(named_bundle / "samples.npz")["labels"]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("predict"))
    for i in range(5):  # the tiny model is right on every bundled sample: "#i c (name) = label"
        c = int(labels[i])
        assert f"#{i} {c} ({NAMES[c]}) = label" in line, line
    rows = [ln for ln in p.stdout.splitlines() if "top-1 agreement" in ln]
    assert len(rows) == 2
    for ln in rows:  # percentages throughout, never a bare fraction
        assert "top-1 agreement 100.00%" in ln and "values differing 0.00%" in ln, ln
    d = json.loads(js.read_text())
    assert d["bundle"]["class_names"] == list(NAMES)
    pr = d["check"]["predictions"]
    assert pr["kernels"] == "xnnpack" and pr["samples"][0]["name"] == NAMES[pr["samples"][0]["class"]]
    assert d["check"]["kernels"][0]["top1_agreement"] == 1.0  # the JSON keeps fractions (schema unchanged)


def test_pi_script_without_names_prints_the_index_only(tiny_export):
    _, out = tiny_export
    p = _pi(out / "bundle", "--check-only", "--kernels", "xnnpack")
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("predict"))
    assert "(" not in line.split(":", 1)[1] and "#0 " in line


@pytest.mark.parametrize("names, needle", [
    (["a", "b", "c"], "class_names holds 3 names but the model has 4 outputs"),
    ("top-left", "not a list of 1 to"),
    (["a", "b", 3, "d"], "class_names[2] is 3"),
    (["a", "b", "a", "d"], "names a class twice"),
    (["a", "b", "c\nd", "e"], "not a printable name"),
])
def test_pi_script_refuses_bad_class_names(named_bundle, tmp_path, names, needle):
    b = tmp_path / "bundle"
    shutil.copytree(named_bundle, b)
    m = json.loads((b / "bundle.json").read_text())
    m["class_names"] = names
    (b / "bundle.json").write_text(json.dumps(m))
    p = _pi(b, "--check-only", "--kernels", "xnnpack", timeout=120)
    assert p.returncode == 2, p.stderr
    _one_error_line(p.stderr, needle)
    assert p.stdout == ""


# --------------------------------------------------------------------------- evaluate

def test_evaluate_uses_the_recorded_names(named_export, named_npz, tinynet_dir, tmp_path, capsys):
    status, out, err = _evaluate([named_export, "--out", tmp_path / "o", *FAST, *_own(tinynet_dir, named_npz)],
                                 capsys, tinynet_dir)
    assert status in (0, 1), err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["data"]["class_names"] == list(NAMES)
    rows = rep["per_class"]["classes"]
    assert [r["name"] for r in rows] == list(NAMES)
    w = rep["per_class"]["worst_class"]
    assert w["label"] == f"{w['class']} ({NAMES[w['class']]})"
    assert f"per class  worst {w['label']}" in out


def test_evaluate_class_names_flag_overrides_and_is_checked(named_export, named_npz, tinynet_dir, tmp_path, capsys):
    status, _, err = _evaluate([named_export, "--out", tmp_path / "bad", *FAST, *_own(tinynet_dir, named_npz),
                                "--class-names", "x,y,z"], capsys, tinynet_dir)
    assert status == 2
    _one_error_line(err, "--class-names gives 3 class names", "the model has 4 classes")
    assert not (tmp_path / "bad").exists()
    status, _, err = _evaluate([named_export, "--out", tmp_path / "o", *FAST, *_own(tinynet_dir, named_npz),
                                "--class-names", "w,x,y,z"], capsys, tinynet_dir)
    assert status in (0, 1), err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["data"]["class_names"] == ["w", "x", "y", "z"] and rep["data"]["class_names_source"] == "--class-names"
    assert [r["name"] for r in rep["per_class"]["classes"]] == ["w", "x", "y", "z"]


def test_evaluate_refuses_edited_recorded_names(named_export, named_npz, tinynet_dir, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(named_export, folder)
    rep = json.loads((folder / "report.json").read_text())
    rep["data"]["class_names"] = ["a", "b"]
    (folder / "report.json").write_text(json.dumps(rep))
    status, _, err = _evaluate([folder, "--out", tmp_path / "o", *FAST, *_own(tinynet_dir, named_npz)], capsys,
                               tinynet_dir)
    assert status == 2
    _one_error_line(err, "data.class_names gives 2 class names", "4 classes")
    assert not (tmp_path / "o").exists()
