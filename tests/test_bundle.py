"""The device bundle written by the export: contents, the tarball, and --check round trips on real kernels."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.inputs import preprocessing
from pipeline.device.bundle import BUNDLE_DIR, BUNDLE_TAR, write_bundle
from pipeline.errors import OutputError

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_FILES = {"README.txt", "bundle.json", "expected_outputs.npz", "model_int8.tflite", "pi_benchmark.py",
                "preprocessing.json", "requirements.txt", "samples.npz"}


@pytest.fixture(scope="module")
def bundle(tiny_export) -> Path:
    status, out = tiny_export
    assert status == 0
    return out / BUNDLE_DIR


def test_export_writes_the_bundle_and_records_it(tiny_export, bundle):
    _, out = tiny_export
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    r = json.loads((out / "report.json").read_text())
    art = r["artifacts"]["bundle"]
    assert art["path"] == "bundle/" and art["tar"] == BUNDLE_TAR
    assert art["tar_bytes"] == (out / BUNDLE_TAR).stat().st_size
    assert art["files"] == {p.name: p.stat().st_size for p in bundle.iterdir()}
    assert set(art["expected_outputs"]) == {"xnnpack", "builtin", "ref"}
    assert "bundle" in r["timings_s"]
    assert (bundle / "model_int8.tflite").read_bytes() == (out / "model_int8.tflite").read_bytes()
    assert (bundle / "pi_benchmark.py").read_bytes() == (ROOT / "benchmarks" / "pi_benchmark.py").read_bytes()
    pre = json.loads((bundle / "preprocessing.json").read_text())
    assert pre == r["preprocessing"]  # one deployment record: the report's, the bundle's and the .tflite's
    from pipeline.inputs.preprocessing import METADATA_NAME
    from pipeline.tflite.metadata import read
    assert read(bundle / "model_int8.tflite", METADATA_NAME) == pre
    reqs = [ln.split(";")[0].strip() for ln in (bundle / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert {r.split("==")[0] for r in reqs} == {"ai-edge-litert", "numpy"} and all("==" in r for r in reqs)


def test_tarball_holds_the_same_folder(tiny_export, bundle):
    _, out = tiny_export
    with tarfile.open(out / BUNDLE_TAR) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {BUNDLE_DIR} | {f"{BUNDLE_DIR}/{n}" for n in BUNDLE_FILES}
        for n in BUNDLE_FILES:
            assert tar.extractfile(members[f"{BUNDLE_DIR}/{n}"]).read() == (bundle / n).read_bytes()


def test_samples_and_expected_outputs_are_real(tiny_export, bundle, tiny_npz):
    """Inputs are the preprocessing record applied to the raw test images; outputs are LiteRT's."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from pipeline.runtime.litert import quantize
    _, out = tiny_export
    man = json.loads((bundle / "bundle.json").read_text())
    s = np.load(bundle / "samples.npz", allow_pickle=False)
    e = np.load(bundle / "expected_outputs.npz", allow_pickle=False)
    n = man["samples"]["count"]
    assert n == 64 == len(s["raw"]) == len(s["input_int8"]) == len(s["labels"])
    z = np.load(tiny_npz)
    np.testing.assert_array_equal(s["raw"][:, 0], z["x_test"][:n])
    np.testing.assert_array_equal(s["labels"], z["y_test"][:n])
    pre = preprocessing.Preprocessing.from_dict(json.loads((bundle / "preprocessing.json").read_text()))
    x = preprocessing.nchw_to_nhwc(preprocessing.apply(s["raw"], pre))
    q = man["input"]
    np.testing.assert_array_equal(s["input_int8"], quantize(x, q["scale"], q["zero_point"], np.int8))

    # The recorded outputs are what a fresh interpreter gives on each kernel family, batch 1.
    resolvers = {"xnnpack": OpResolverType.BUILTIN, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                 "ref": OpResolverType.BUILTIN_REF}
    for k, res in resolvers.items():
        rec = man["expected_outputs"]["kernels"][k]
        it = Interpreter(model_path=str(bundle / "model_int8.tflite"), num_threads=1,
                         experimental_op_resolver_type=res)
        it.allocate_tensors()
        i, o = it.get_input_details()[0], it.get_output_details()[0]
        got = []
        for j in range(rec["samples"]):
            it.set_tensor(i["index"], s["input_int8"][j:j + 1])
            it.invoke()
            got.append(it.get_tensor(o["index"])[0])
        np.testing.assert_array_equal(e[k], np.stack(got))
    # ... and agree with the export's own int8 predictions (xnnpack, 4 threads, batched) within one step.
    p = np.load(out / "predictions.npz", allow_pickle=False)
    assert np.abs(e["xnnpack"].astype(int) - p["int8_raw"][:n].reshape(n, -1).astype(int)).max() <= 1
    assert man["model"]["sha256"] == __import__("hashlib").sha256((bundle / "model_int8.tflite").read_bytes()).hexdigest()


# --------------------------------------------------------------------------- --check round trips

def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(bundle, dest)
    return dest


def _rehash(folder: Path, name: str) -> None:
    """Record the edited file's sha256 in bundle.json (the script refuses files that differ from their digest,
    see README "Bad input"): the test then reaches the comparison it is about."""
    man = json.loads((folder / "bundle.json").read_text())
    man["sha256"][name] = __import__("hashlib").sha256((folder / name).read_bytes()).hexdigest()
    (folder / "bundle.json").write_text(json.dumps(man))


def _check(folder: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    js = folder / "check.json"
    p = subprocess.run([sys.executable, str(folder / "pi_benchmark.py"), "--check-only", "--kernels", "all",
                        "--json", str(js), *extra], cwd=folder, capture_output=True, text=True, timeout=600)
    return p, (json.loads(js.read_text()) if js.is_file() else {})


def test_check_passes_on_the_host(bundle, tmp_path):
    p, d = _check(_copy(bundle, tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert d["check"]["passed"] is True and d["results"] == []
    assert all(r["max_diff_steps"] == 0 for r in d["check"]["kernels"])  # same host, same kernels: bit-identical


def test_corrupted_expected_outputs_fail_the_check(bundle, tmp_path):
    folder = _copy(bundle, tmp_path)
    e = dict(np.load(folder / "expected_outputs.npz", allow_pickle=False))
    e["builtin"] = e["builtin"].copy()
    v = int(e["builtin"][3, 1])
    e["builtin"][3, 1] = v - 3 if v > 0 else v + 3  # three output steps off on one value
    np.savez(folder / "expected_outputs.npz", **e)
    _rehash(folder, "expected_outputs.npz")
    p, d = _check(folder)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "check    FAIL" in p.stdout and "Traceback" not in p.stderr
    rows = {r["kernels"]: r for r in d["check"]["kernels"]}
    assert rows["builtin"]["passed"] is False and rows["builtin"]["max_diff_steps"] == 3
    assert rows["xnnpack"]["passed"] is True and rows["ref"]["passed"] is True
    assert d["passed"] is False


def test_a_flipped_top1_fails_the_check(bundle, tmp_path):
    """Swap the top-2 outputs of the sample with the widest margin: top-1 changes where no step noise explains it."""
    folder = _copy(bundle, tmp_path)
    e = dict(np.load(folder / "expected_outputs.npz", allow_pickle=False))
    x = e["xnnpack"].astype(int)
    top2 = np.sort(x, axis=1)[:, -2:]
    j = int(np.argmax(top2[:, 1] - top2[:, 0]))
    a, b = np.argsort(x[j])[-2:]
    e["xnnpack"] = e["xnnpack"].copy()
    e["xnnpack"][j, [a, b]] = e["xnnpack"][j, [b, a]]
    np.savez(folder / "expected_outputs.npz", **e)
    _rehash(folder, "expected_outputs.npz")
    p, d = _check(folder)
    assert p.returncode == 1
    row = next(r for r in d["check"]["kernels"] if r["kernels"] == "xnnpack")
    assert row["flips"] == 1 and row["flips_beyond_tolerance"] == 1
    assert row["top1_agreement"] == pytest.approx(1 - 1 / row["samples"])
    assert row["max_diff_steps"] == top2[j, 1] - top2[j, 0]


def test_another_model_fails_the_check(bundle, tmp_path):
    folder = _copy(bundle, tmp_path)
    man = json.loads((folder / "bundle.json").read_text())
    man["model"]["sha256"] = "0" * 64
    (folder / "bundle.json").write_text(json.dumps(man))
    p, d = _check(folder)
    assert p.returncode == 1 and "sha256 differs" in p.stdout
    assert d["check"]["model_matches_bundle"] is False


def test_a_wrong_preprocessing_record_fails_the_check(bundle, tmp_path):
    folder = _copy(bundle, tmp_path)
    pre = json.loads((folder / "preprocessing.json").read_text())
    pre["mean"] = [0.5]  # the double-normalisation family of bugs
    (folder / "preprocessing.json").write_text(json.dumps(pre))
    _rehash(folder, "preprocessing.json")
    p, d = _check(folder)
    assert p.returncode == 1 and "preprocessing record" in p.stdout
    assert d["check"]["preprocessing"]["passed"] is False


# --------------------------------------------------------------------------- writing

def test_bad_input_leaves_nothing(tmp_path, tiny_export):
    _, out = tiny_export
    work = tmp_path / "work"
    work.mkdir()
    empty = np.zeros((0, 1, 12, 12), np.float32)
    with pytest.raises(OutputError, match="at least one test image"):
        write_bundle(work, out / "model_int8.tflite", "NHWC", {}, empty.astype(np.uint8), empty,
                     np.zeros(0, np.int64), model_spec="x", target="tflite-int8")
    assert list(work.iterdir()) == []


def test_a_failing_interpreter_removes_the_partial_bundle(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    raw = np.zeros((2, 1, 4, 4), np.uint8)
    with pytest.raises(Exception):
        write_bundle(work, junk, "NHWC", {}, raw, raw.astype(np.float32), np.zeros(2, np.int64),
                     model_spec="x", target="tflite-int8")
    assert list(work.iterdir()) == []


def test_publish_replaces_a_bundle_from_an_earlier_export(tmp_path):
    """--overwrite: an earlier export's bundle/ goes with the whole earlier export (pipeline/outdir.py)."""
    import json
    from pipeline.outdir import OutputFolder
    out = tmp_path / "out"
    (out / "bundle").mkdir(parents=True)
    (out / "report.json").write_text(json.dumps({"kind": "export"}))
    (out / "bundle" / "samples.npz").write_bytes(b"old")
    with OutputFolder.claim(out, overwrite=True) as folder:
        (folder.work / "bundle").mkdir()
        (folder.work / "bundle" / "bundle.json").write_text("{}")
        (folder.work / "bundle.tar.gz").write_bytes(b"new")
        folder.publish()
    assert sorted(p.name for p in out.iterdir()) == ["bundle", "bundle.tar.gz"]
    assert [p.name for p in (out / "bundle").iterdir()] == ["bundle.json"]
