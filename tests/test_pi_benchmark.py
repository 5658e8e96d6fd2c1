"""benchmarks/pi_benchmark.py: standalone (numpy + ai-edge-litert only), all figures, a stable JSON schema.

The script runs in a subprocess started with ``python -S`` (no site-packages) whose PYTHONPATH
holds only numpy and ai_edge_litert, so ``import torch`` and ``import tensorflow`` fail there;
the tests check that they really do.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pi_benchmark.py"
ALLOWED_THIRD_PARTY = {"numpy", "ai_edge_litert", "tflite_runtime"}

TOP_KEYS = {"kind", "schema_version", "device", "versions", "model", "bundle", "config", "conditions", "results",
            "check", "passed", "measured_on"}
RESULT_KEYS = {"kernels", "op_resolver", "threads", "batch", "input", "init_us", "first_us", "warmup_count",
               "warmup_mean_us", "count", "mean_us", "std_us", "min_us", "p50_us", "p90_us", "p99_us", "max_us",
               "throughput_per_s", "images_per_s", "rss_peak_kib", "rss_baseline_kib", "rss_after_init_kib",
               "rss_at_start_kib", "rss_source", "delegate_applied", "ops", "pid", "runtime", "runtime_version",
               "runtime_log"}
DEVICE_KEYS = {"board", "is_raspberry_pi", "cpu", "cpu_cores", "cpu_hardware", "machine", "logical_cpus",
               "cpu_max_mhz", "cpu_scaling_max_mhz", "governor", "memory_total_kib", "os", "kernel",
               "kernel_version", "libc"}
CONDITION_KEYS = {"time_utc", "temperature_c", "thermal_zone", "vcgencmd_temp", "throttled", "cpu_cur_mhz",
                  "load_average"}
CHECK_KEYS = {"samples", "tolerance_steps", "threads", "batch", "expected_recorded_with", "rule", "model_sha256",
              "model_matches_bundle", "preprocessing", "kernels", "failures", "passed", "predictions"}
CHECK_ROW_KEYS = {"samples", "top1_agreement", "flips", "flips_beyond_tolerance", "max_diff_steps", "mean_diff_steps",
                  "values_differing", "unit", "passed", "top1_vs_labels", "kernels", "compared_with"}


# --------------------------------------------------------------------------- an environment without torch/tensorflow

@pytest.fixture(scope="session")
def pi_env(tmp_path_factory):
    """(command prefix, env) for a Python that can import numpy and ai_edge_litert and nothing else third-party."""
    import ai_edge_litert
    import numpy
    site = tmp_path_factory.mktemp("pi_site")
    for mod in (numpy, ai_edge_litert):
        pkg = Path(mod.__file__).resolve().parent
        (site / pkg.name).symlink_to(pkg)
        for extra in list(pkg.parent.glob(pkg.name + ".libs")) + list(pkg.parent.glob(pkg.name + "-*.dist-info")):
            (site / extra.name).symlink_to(extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    return [sys.executable, "-S"], env


def run_py(pi_env, args, cwd=None, timeout=600):
    prefix, env = pi_env
    return subprocess.run(prefix + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_isolated_environment_really_lacks_torch_and_tensorflow(pi_env):
    # Both are installed in the test's own environment, so the isolation is what keeps them out.
    assert importlib.util.find_spec("torch") is not None
    assert importlib.util.find_spec("tensorflow") is not None
    for mod in ("torch", "tensorflow"):
        p = run_py(pi_env, ["-c", f"import {mod}"])
        assert p.returncode != 0 and f"No module named '{mod}'" in p.stderr, p.stderr
    p = run_py(pi_env, ["-c", "import numpy, ai_edge_litert.interpreter; print('ok')"])
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_script_imports_only_stdlib_numpy_and_the_runtime():
    tree = ast.parse(SCRIPT.read_text(), feature_version=(3, 9))  # also: nothing newer than Python 3.9 syntax
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            tops.add(node.module.split(".")[0])
    third_party = {m for m in tops if m not in sys.stdlib_module_names}
    assert third_party <= ALLOWED_THIRD_PARTY, third_party
    assert "numpy" in third_party and "ai_edge_litert" in third_party


# --------------------------------------------------------------------------- one real run from the shipped tarball

@pytest.fixture(scope="module")
def extracted_bundle(tiny_export, tmp_path_factory) -> Path:
    status, out = tiny_export
    dest = tmp_path_factory.mktemp("pi_device")
    with tarfile.open(out / "bundle.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    return dest / "bundle"


@pytest.fixture(scope="module")
def sweep(pi_env, extracted_bundle, tmp_path_factory):
    js = tmp_path_factory.mktemp("pi_json") / "pi.json"
    p = run_py(pi_env, [extracted_bundle / "pi_benchmark.py", "--check", "--threads", "1,2", "--kernels", "all",
                        "--runs", "5", "--min-secs", "0.05", "--warmup-secs", "0.01", "--json", js],
               cwd=extracted_bundle)
    return p, js


def test_sweep_runs_in_the_isolated_environment(sweep):
    p, js = sweep
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "check    PASS" in p.stdout
    for k in ("xnnpack", "builtin", "ref"):
        assert any(line.startswith(k) for line in p.stdout.splitlines())
    assert js.is_file()


def test_json_schema_is_stable(sweep):
    _, js = sweep
    d = json.loads(js.read_text())
    assert set(d) == TOP_KEYS
    assert d["kind"] == "pi_benchmark" and d["schema_version"] == "1.0"
    assert set(d["device"]) == DEVICE_KEYS
    assert set(d["conditions"]) == {"before", "after"}
    assert set(d["conditions"]["before"]) == set(d["conditions"]["after"]) == CONDITION_KEYS
    assert set(d["check"]) == CHECK_KEYS
    for row in d["check"]["kernels"]:
        assert set(row) == CHECK_ROW_KEYS
    for r in d["results"]:
        assert set(r) == RESULT_KEYS
    assert d["versions"]["runtime"] == "ai-edge-litert" and d["versions"]["runtime_version"]
    assert d["versions"]["numpy"] and d["versions"]["python"]


def test_every_figure_is_measured(sweep, tiny_export):
    _, js = sweep
    d = json.loads(js.read_text())
    rows = d["results"]
    assert [(r["kernels"], r["threads"]) for r in rows] == [(k, t) for k in ("xnnpack", "builtin", "ref") for t in (1, 2)]
    assert d["config"]["op_resolvers"] == {"xnnpack": "BUILTIN", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
                                           "ref": "BUILTIN_REF"}
    for r in rows:
        assert r["count"] >= 5 and r["warmup_count"] >= 1 and r["batch"] == 1
        assert r["init_us"] > 0 and r["first_us"] > 0 and r["warmup_mean_us"] > 0
        assert 0 < r["min_us"] <= r["p50_us"] <= r["p90_us"] <= r["p99_us"] <= r["max_us"]
        assert r["min_us"] <= r["mean_us"] <= r["max_us"] and r["std_us"] >= 0
        # mean_us is rounded to 0.1 us: on a tiny model (~4 us) that alone moves 1e6 / mean_us by over 1%
        assert 1e6 / r["throughput_per_s"] == pytest.approx(r["mean_us"], rel=1e-3, abs=0.051)
        assert r["input"] == "bundle sample 0"
        assert r["rss_source"].startswith("VmHWM")
        assert r["rss_peak_kib"] >= r["rss_after_init_kib"] >= r["rss_baseline_kib"] > r["rss_at_start_kib"] > 0
        # The XNNPACK setting really runs the delegate; the others really do not.
        assert r["delegate_applied"] is (r["kernels"] == "xnnpack")
    # Each setting ran in its own fresh process, so each peak is its own.
    assert len({r["pid"] for r in rows}) == len(rows)
    m = d["model"]
    _, out = tiny_export
    assert m["bytes"] == (out / "model_int8.tflite").stat().st_size
    assert m["inputs"][0]["dtype"] == "int8" and m["outputs"][0]["dtype"] == "int8"
    assert d["device"]["machine"] and d["device"]["kernel"] and d["device"]["logical_cpus"] >= 1
    assert d["passed"] is True


def test_check_section(sweep):
    _, js = sweep
    c = json.loads(js.read_text())["check"]
    assert c["passed"] is True and c["failures"] == [] and c["model_matches_bundle"] is True
    assert c["preprocessing"]["passed"] and c["preprocessing"]["max_diff_steps"] <= 1
    assert {r["kernels"] for r in c["kernels"]} == {"xnnpack", "builtin", "ref"}
    for r in c["kernels"]:
        assert r["compared_with"] == f"host {r['kernels']}"
        assert r["max_diff_steps"] <= c["tolerance_steps"] and r["flips_beyond_tolerance"] == 0


# --------------------------------------------------------------------------- bad input: one line, exit 2

@pytest.fixture(scope="module")
def model_path(tiny_export) -> Path:
    return tiny_export[1] / "model_int8.tflite"


@pytest.mark.parametrize("args, needle", [
    (["{missing}"], "does not exist"),
    (["{notflite}"], "not a TFLite flatbuffer"),
    (["{folder}"], "is not a file"),
    (["{model}", "--threads", "0"], "positive integers"),
    (["{model}", "--threads", "a,b"], "positive integers"),
    (["{model}", "--kernels", "gpu"], "unknown gpu"),
    (["{model}", "--warmup", "0"], "--warmup must be at least 1"),
    (["{model}", "--runs", "0"], "--runs must be at least 1"),
    (["{model}", "--min-secs", "-1"], "--min-secs"),
    (["{model}", "--check"], "--check needs the bundle"),
    (["{model}", "--json", "{folder}/missing/out.json"], "missing or not writable"),
    (["{model}", "--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(pi_env, tmp_path, model_path, args, needle):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(model_path, lone / "model.tflite")  # no bundle.json beside it
    (tmp_path / "notes.tflite").write_text("not a model at all")
    subs = {"missing": tmp_path / "nope.tflite", "notflite": tmp_path / "notes.tflite", "folder": tmp_path,
            "model": lone / "model.tflite"}
    argv = [a.format(**subs) for a in args]
    p = run_py(pi_env, [SCRIPT, *argv], timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


# --------------------------------------------------------------------------- the comparison rule

def _script_module():
    spec = importlib.util.spec_from_file_location("pi_benchmark_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_rule_in_quantization_steps():
    import numpy as np
    compare = _script_module().compare_outputs
    exp = np.array([[10, 11, -50], [40, -20, -30], [0, 5, 90]], np.int8)
    same = compare(exp.copy(), exp, 1.0, {}, np.array([1, 0, 2]))
    assert same["passed"] and same["max_diff_steps"] == 0 and same["top1_agreement"] == 1 and same["top1_vs_labels"] == 1
    # One step of kernel noise turns a 1-step near-tie around: allowed, and counted as a flip.
    tie = exp.copy()
    tie[0, 1] -= 1
    tie[0, 0] += 1
    r = compare(tie, exp, 1.0, {}, None)
    assert r["passed"] and r["flips"] == 1 and r["flips_beyond_tolerance"] == 0 and r["max_diff_steps"] == 1
    # Two steps off on one value: beyond a 1-step tolerance.
    off = exp.copy()
    off[2, 0] += 2
    r = compare(off, exp, 1.0, {}, None)
    assert not r["passed"] and r["max_diff_steps"] == 2 and r["flips"] == 0
    # A wide-margin top-1 change is a flip no step noise explains.
    wide = exp.copy()
    wide[1, 0], wide[1, 1] = -20, 40
    r = compare(wide, exp, 25.0, {}, None)
    assert not r["passed"] and r["flips"] == 1 and r["flips_beyond_tolerance"] == 1 and r["max_diff_steps"] == 60
    # A shape mismatch never passes.
    assert not compare(exp[:, :2].copy(), exp, 1.0, {}, None)["passed"]
