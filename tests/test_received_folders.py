"""A received export folder or device bundle is data: never code, never a path outside itself.

Every hostile case: exit status 2, exactly one ``error:`` line on stderr, no traceback, nothing written into the
folder, and no payload ran (``evil.py`` writes a marker file when imported; the marker never appears).
Real exports, real LiteRT and real subprocesses; the folders are copies of the session's exports, then tampered.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--corruptions", "none", "--workers", "1", "--val-size", "40"]
PI_SCRIPT = ROOT / "benchmarks" / "pi_benchmark.py"


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def exported(tiny_export):
    status, out = tiny_export
    assert status == 0
    return out


@pytest.fixture(scope="module")
def zoo_export(tmp_path_factory):
    """A small export of zoo:refcnn (256 test images), whose report names a zoo model evaluate may load itself."""
    from pipeline.export import main
    out = tmp_path_factory.mktemp("zoo_export") / "out"
    assert main(["--model", "zoo:refcnn", "--eval-limit", "256", "--calib-size", "64", "--out", str(out)]) == 0
    return out


@pytest.fixture()
def export_copy(exported, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(exported, dst)
    return dst


@pytest.fixture()
def own_flags(tinynet_dir, tiny_npz):
    """What the user passes for the tiny export (a factory model, weights and data outside the folder)."""
    return ["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz)]


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _write_report(folder: Path, rep) -> None:
    (folder / "report.json").write_text(json.dumps(rep))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.is_symlink(), hashlib.sha256(p.read_bytes()).hexdigest()
                                         if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def _one_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _main(args, capsys):
    from pipeline.evaluate import main
    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.err


def _cli(args, cwd, timeout=180):
    return subprocess.run([sys.executable, "-m", "pipeline.evaluate", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def refused(folder: Path, args, capsys, *needles: str) -> str:
    """In-process evaluate of ``folder``: exit 2, one line naming ``needles``, the folder unchanged."""
    before = snapshot(folder)
    status, err = _main([folder, *args], capsys)
    assert status == 2, err
    line = _one_line(err, *needles)
    assert snapshot(folder) == before
    return line


EVIL = """
from pathlib import Path
Path({marker!r}).write_text("the payload ran")
import torch.nn as nn
def factory():
    return nn.Linear(1, 1)
"""


@pytest.fixture()
def evil(tmp_path, export_copy):
    """evil.py (writes a marker when imported) inside the export folder and in the folder config.cwd names; the
    report names evil:factory as its model."""
    marker = tmp_path / "MARKER"
    elsewhere = tmp_path / "cwd_of_the_sender"
    elsewhere.mkdir()
    for d in (export_copy, elsewhere):
        (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    rep = _report(export_copy)
    rep["model"]["spec"] = "evil:factory"
    rep["config"].update(model="evil:factory", cwd=str(elsewhere))
    _write_report(export_copy, rep)
    yield export_copy, marker
    sys.modules.pop("evil", None)


# --------------------------------------------------------------------------- 1. no code runs because a folder names it

def test_a_factory_named_by_the_report_is_never_imported(evil, tmp_path, capsys):
    folder, marker = evil
    line = refused(folder, FAST, capsys, "evil:factory", "pass --model evil:factory")
    assert "config.cwd" not in line
    assert not marker.exists() and "evil" not in sys.modules


def test_a_factory_named_by_the_report_is_never_imported_from_inside_the_folder(evil, tmp_path):
    """Run from inside the received folder (python -m puts the current folder on sys.path): still nothing runs."""
    folder, marker = evil
    before = snapshot(folder)
    p = _cli([".", *FAST], cwd=folder)
    assert p.returncode == 2, p.stderr
    _one_line(p.stderr, "pass --model evil:factory")
    assert not marker.exists() and snapshot(folder) == before


def test_a_user_model_spec_is_not_resolved_from_the_export_folder(evil, tmp_path, capsys, tinynet_dir, tiny_npz):
    """--model evil:factory given by the user: not importable from the export folder nor from config.cwd, and
    refused outright when the current folder is the export folder."""
    folder, marker = evil
    flags = ["--model", "evil:factory", "--weights", tinynet_dir / "tinynet.pt", "--data", tiny_npz, *FAST]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with contextlib.chdir(elsewhere):
        refused(folder, flags, capsys, "cannot import module 'evil'")
    before = snapshot(folder)
    p = _cli([".", *flags], cwd=folder)
    assert p.returncode == 2, p.stderr
    _one_line(p.stderr, "inside the export folder")
    assert snapshot(folder) == before
    assert not marker.exists()


# --------------------------------------------------------------------------- 2. paths stay inside the folder

@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_a_tflite_path_leaving_the_folder_is_refused(export_copy, tmp_path, capsys, own_flags, how):
    other = tmp_path / "other_export"
    shutil.copytree(export_copy, other)
    rep = _report(export_copy)
    if how == "absolute":
        rep["artifacts"]["tflite"]["path"] = "/etc/passwd"
    elif how == "dotdot":
        rep["artifacts"]["tflite"]["path"] = "../other_export/model_int8.tflite"
    else:
        (export_copy / "link.tflite").symlink_to(other / "model_int8.tflite")
        rep["artifacts"]["tflite"]["path"] = "link.tflite"
    _write_report(export_copy, rep)
    refused(export_copy, [*own_flags, *FAST], capsys, "artifacts.tflite.path", "leaves the folder")


@pytest.mark.parametrize("key, flag", [("data", "--data"), ("weights", "--weights"), ("data_dir", "--data-dir")])
def test_recorded_data_and_weights_outside_the_folder_need_the_flag(export_copy, capsys, tinynet_dir, tiny_npz,
                                                                  key, flag):
    rep = _report(export_copy)
    rep["config"].update({key: "/etc/passwd"}, **({"data": "fashion-mnist"} if key == "data_dir" else {}))
    _write_report(export_copy, rep)
    given = {"--model": "tinynet:tinynet", "--weights": str(tinynet_dir / "tinynet.pt"), "--data": str(tiny_npz)}
    given.pop(flag, None)
    if key == "data_dir":
        given.pop("--data")
    args = [a for kv in given.items() for a in kv]
    refused(export_copy, [*args, *FAST], capsys, f"config.{key} records {flag} /etc/passwd",
            f"pass {flag} PATH")


def test_the_session_export_says_which_flags_to_pass(export_copy, capsys, tinynet_dir, tiny_npz):
    """The tiny export recorded --weights and --data outside its folder: evaluate names each, one at a time."""
    refused(export_copy, ["--model", "tinynet:tinynet", *FAST], capsys, "config.weights", "pass --weights PATH",
            str(tinynet_dir / "tinynet.pt"))
    refused(export_copy, ["--model", "tinynet:tinynet", "--weights", tinynet_dir / "tinynet.pt", *FAST], capsys,
            "config.data", "pass --data PATH", str(tiny_npz))


# --------------------------------------------------------------------------- 3. artifacts are the recorded ones

def test_a_swapped_tflite_is_refused(export_copy, zoo_export, capsys, own_flags):
    shutil.copyfile(zoo_export / "model_int8.tflite", export_copy / "model_int8.tflite")  # a valid, other model
    refused(export_copy, [*own_flags, *FAST], capsys, "model_int8.tflite", "changed after the export",
            "artifacts.tflite.sha256")


def test_edited_predictions_are_refused(export_copy, capsys, own_flags):
    z = dict(np.load(export_copy / "predictions.npz", allow_pickle=False))
    z["fp32_logits"] = z["fp32_logits"] + 1
    np.savez_compressed(export_copy / "predictions.npz", **z)
    refused(export_copy, [*own_flags, *FAST], capsys, "predictions.npz", "changed after the export")


def test_a_report_whose_model_was_changed_to_another_zoo_model_is_caught(zoo_export, tmp_path, capsys):
    folder = tmp_path / "zoo"
    shutil.copytree(zoo_export, folder)
    rep = _report(folder)
    rep["model"]["spec"] = rep["config"]["model"] = "zoo:resnet8"
    _write_report(folder, rep)
    refused(folder, FAST, capsys, "zoo:resnet8 does not reproduce the export's FP32 logits", "predictions.npz")


def test_the_untouched_exports_still_evaluate(export_copy, zoo_export, tmp_path, capsys, own_flags):
    """The checks above pass on the real folders: the confirming flags are not overrides."""
    status, err = _main([export_copy, *own_flags, "--out", tmp_path / "o", *FAST], capsys)
    assert status in (0, 1), err
    rep = _report(tmp_path / "o")
    assert "evaluate_overrides" not in rep and rep["model"]["spec"] == "tinynet:tinynet"


# --------------------------------------------------------------------------- 4. malformed JSON: one line, exit 2

def test_200k_nested_brackets(export_copy, capsys):
    (export_copy / "report.json").write_text("[" * 200_000 + "]" * 200_000)
    refused(export_copy, FAST, capsys, "nests 200000 levels deep")
    (export_copy / "report.json").write_text('{"a": ' + "{" * 200_000)
    refused(export_copy, FAST, capsys, "levels deep")


@pytest.mark.parametrize("shape, needle", [
    ([1, 1e6, 1e6], "not a list of integers"),
    ([1, 100000, 100000], "outside 1..4096"),
    ([3, 4096, 4096], "values per image, above the limit"),
    ([1000, 12, 12], "channels"),
    ([1, 12, True], "integers"),
])
def test_absurd_input_shapes(export_copy, capsys, own_flags, shape, needle):
    rep = _report(export_copy)
    rep["preprocessing"]["input_shape"] = shape
    _write_report(export_copy, rep)
    refused(export_copy, [*own_flags, *FAST], capsys, "preprocessing.input_shape", needle)


def test_random_report_mutations_never_give_a_traceback(exported, tmp_path_factory, tinynet_dir, tiny_npz):
    """Random JSON values at random keys of report.json: exit 0/1, or 2 with one line; never a traceback."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from pipeline.evaluate import main
    values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
                          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=8)
    rep0 = _report(exported)
    keys = [(s, k) for s in ("preprocessing", "config", "target", "artifacts", "model") for k in rep0[s]]
    keys += [(s, None) for s in ("preprocessing", "config", "target", "artifacts", "model", "gates", "timings_s")]
    flags = ["--model", "tinynet:tinynet", "--weights", str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz)]

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.sampled_from(keys), values)
    def run(where, value):
        folder = tmp_path_factory.mktemp("mut") / "export"
        shutil.copytree(exported, folder)
        rep = json.loads(json.dumps(rep0))
        section, key = where
        if key is None:
            rep[section] = value
        else:
            rep[section][key] = value
        _write_report(folder, rep)
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main([str(folder), *flags, "--out", str(folder.parent / "o"), *FAST])
        assert status in (0, 1, 2), status
        assert "Traceback" not in err.getvalue()
        if status == 2:
            _one_line(err.getvalue())

    run()


# --------------------------------------------------------------------------- the Pi script and its bundle

def _pi(folder: Path, *args):
    return subprocess.run([sys.executable, str(PI_SCRIPT), str(folder / "model_int8.tflite"), "--check-only",
                           "--kernels", "builtin", *args], cwd=folder, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def bundle_copy(exported, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(exported / "bundle", dst)
    return dst


def _edit_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / "bundle.json").read_text())
    edit(m)
    (folder / "bundle.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(samples="samples.npz"), "samples.path is missing"),
    (lambda m: m["samples"].update(path=["samples.npz"]), "samples.path is ['samples.npz'], not a string"),
    (lambda m: m["samples"].update(path="/etc/passwd"), "samples.path '/etc/passwd' leaves the bundle folder"),
    (lambda m: m["expected_outputs"].update(path="../outside/expected_outputs.npz"), "leaves the bundle folder"),
    (lambda m: m.update(model=7), "model.path is missing"),
    (lambda m: m.update(check_tolerance_steps="1"), "check_tolerance_steps is '1', not a number"),
    (lambda m: m.update(check_tolerance_steps=-3), "outside 0..1e6"),
    (lambda m: m.update(preprocessing=None), "preprocessing is missing"),
    (lambda m: m.update(sha256={}), "records no digest for model_int8.tflite"),
    (lambda m: m["sha256"].update({"samples.npz": "abc"}), "not a sha256"),
    (lambda m: m.update(output=[1]), "output is [1], not an object"),
    (lambda m: m.clear(), "is not a device bundle manifest"),
])
def test_pi_script_refuses_a_malformed_manifest(bundle_copy, edit, needle):
    _edit_manifest(bundle_copy, edit)
    before = snapshot(bundle_copy)
    p = _pi(bundle_copy)
    assert p.returncode == 2, p.stdout + p.stderr
    _one_line(p.stderr, needle)
    assert snapshot(bundle_copy) == before


def test_pi_script_refuses_deep_json_and_symlinks_out(bundle_copy, tmp_path):
    (tmp_path / "outside.npz").write_bytes((bundle_copy / "samples.npz").read_bytes())
    (bundle_copy / "link.npz").symlink_to(tmp_path / "outside.npz")
    _edit_manifest(bundle_copy, lambda m: m["samples"].update(path="link.npz"))
    p = _pi(bundle_copy)
    assert p.returncode == 2
    _one_line(p.stderr, "samples.path 'link.npz' leaves the bundle folder")
    (bundle_copy / "bundle.json").write_text("{" * 200_000)
    p = _pi(bundle_copy)
    assert p.returncode == 2
    _one_line(p.stderr, "nests 200000 levels deep")


@pytest.mark.parametrize("name", ["model_int8.tflite", "samples.npz", "expected_outputs.npz", "preprocessing.json"])
def test_pi_script_refuses_a_tampered_file(bundle_copy, name):
    p = bundle_copy / name
    if name.endswith(".npz"):
        z = dict(np.load(p, allow_pickle=False))
        k = next(iter(z))
        z[k] = z[k].copy()
        z[k].flat[0] = z[k].flat[0] + 1 if z[k].flat[0] < 100 else 0
        np.savez_compressed(p, **z)
    elif name.endswith(".json"):
        pre = json.loads(p.read_text())
        pre["mean"] = [0.5]
        p.write_text(json.dumps(pre))
    else:
        p.write_bytes(p.read_bytes() + b"\0")
    r = _pi(bundle_copy)
    assert r.returncode == 2, r.stdout + r.stderr
    _one_line(r.stderr, f"the bundle's {name} changed")
