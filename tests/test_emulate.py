"""The emulated Arm check: ``python -m pipeline.device_check OUT --emulate DEVICE`` and the export's ``emulate`` stage
(pipeline/device/emulate.py). The slow tests run the real emulator (qemu-aarch64-static) on a real aarch64 root,
built once per session from Debian's arm64 packages and PyPI's aarch64 wheels (network to the registries)."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

from pipeline.device import emulate
from pipeline.errors import DataError, TargetError, UsageError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="session")
def export_dir(tiny_export) -> Path:
    status, out = tiny_export
    assert status == 0
    return out


@pytest.fixture(scope="session")
def emu_cache(tmp_path_factory, export_dir):
    """(cache folder, Userspace): the aarch64 root for the tiny export's wheels, built once for the session."""
    if shutil.which("qemu-aarch64-static") is None:
        pytest.fail("qemu-aarch64-static is missing: apt-get install qemu-user-static (./setup.sh does)")
    cache = tmp_path_factory.mktemp("emulate-cache")
    wheels = emulate.read_bundle(export_dir / "bundle").wheels
    us = emulate.ensure_userspace(wheels, cache)
    assert us.built
    return cache, us


def device_check(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.device_check", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def _copy_export(export_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(export_dir, out, symlinks=True)
    return out


def _rehash(bundle: Path, name: str) -> None:
    from pipeline.jsonio import sha256_file
    man = json.loads((bundle / "bundle.json").read_text())
    man["sha256"][name] = sha256_file(bundle / name)
    (bundle / "bundle.json").write_text(json.dumps(man, indent=2))


TIMING_KEY = re.compile(r"latency|_us$|_ms$|throughput|per_s$|mean|p50|p90|p99|init|first")


def _timing_keys(doc, path="") -> list[str]:
    """Keys that would hold a timing; only the labelled wall-clock section may name seconds."""
    found = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if TIMING_KEY.search(str(k)):
                found.append(f"{path}{k}")
            found += _timing_keys(v, f"{path}{k}.")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _timing_keys(v, f"{path}{i}.")
    return found


def assert_no_latency(doc: dict, stdout: str) -> None:
    assert _timing_keys(doc) == []
    assert set(doc["wall_seconds"]) == {"root", "check"} and "not a latency" in doc["wall_seconds_are"]
    for line in stdout.splitlines():  # any printed time is labelled as emulator time, never a latency
        if re.search(r"\d\s*(s|ms|us|µs)\b", line):
            assert "not a latency" in line, line
    assert " us " not in stdout and "inf/s" not in stdout


# --------------------------------------------------------------------------- the check on emulated devices

@pytest.mark.slow
@pytest.mark.parametrize("device,core,part", [("rpi4", "Cortex-A72", "0xd08"), ("rpi5", "Cortex-A76", "0xd0b")])
def test_bundle_check_passes_on_the_emulated_pi(export_dir, emu_cache, tmp_path, device, core, part):
    cache, us = emu_cache
    before = sorted(p.relative_to(export_dir) for p in export_dir.rglob("*"))
    js = tmp_path / "check.json"
    p = device_check(export_dir, "--emulate", device, "--cache-dir", cache, "--json", js)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    doc = json.loads(js.read_text())
    assert doc["passed"] is True and doc["failures"] == []
    assert doc["device"]["name"] == device and doc["device"]["core"] == core
    assert doc["device"]["cpuinfo"]["part"] == part and doc["emulator"]["cpu"] == core.lower()
    # the emulated process ran the aarch64 wheels the bundle pins, on the cached root (not rebuilt)
    pins = dict(emulate.requirements_pins(export_dir / "bundle" / "requirements.txt"))
    assert doc["runtime"]["machine"] == "aarch64" and doc["runtime"]["python"].startswith("3.11.")
    assert doc["runtime"]["runtime"] == "ai-edge-litert" and doc["runtime"]["runtime_version"] == pins["ai-edge-litert"]
    assert doc["runtime"]["numpy"] == pins["numpy"]
    assert {w["name"]: w["version"] for w in doc["wheels"]} == pins
    assert all(w["file"].endswith("_aarch64.whl") for w in doc["wheels"])
    assert doc["userspace"]["built_now"] is False and doc["userspace"]["root"] == str(us.root)
    # A76 announces the dot-product instructions XNNPACK's int8 kernels use; the A72 does not
    assert ("asimddp" in doc["emulator"]["hwcaps_seen"]) == (device == "rpi5")
    rows = {r["kernels"]: r for r in doc["kernels"]}
    assert set(rows) == {"xnnpack", "builtin", "ref"}
    for r in rows.values():
        assert r["passed"] and r["top1_agreement"] == 1.0 and r["max_diff_steps"] <= doc["tolerance_steps"] == 1
    # measured: XNNPACK and the reference kernels give the host's outputs bit for bit on aarch64
    assert rows["xnnpack"]["max_diff_steps"] == 0 and rows["ref"]["max_diff_steps"] == 0
    assert rows["ref"]["samples"] == 8 and rows["xnnpack"]["samples"] == rows["builtin"]["samples"] > 8
    assert doc["script"]["ran"].startswith("the bundle's pi_benchmark.py")
    assert "check      PASS" in p.stdout and re.search(r"^xnnpack\s+\d+\s+100\.00%\s+0\.0 ", p.stdout, re.M)
    assert_no_latency(doc, p.stdout)
    assert sorted(p.relative_to(export_dir) for p in export_dir.rglob("*")) == before  # nothing written into OUT


@pytest.mark.slow
def test_android_runs_the_linux_wheel_and_says_it_is_not_android(export_dir, emu_cache, tmp_path):
    cache, _ = emu_cache
    js = tmp_path / "android.json"
    p = device_check(export_dir, "--emulate", "android-arm64", "--kernels", "xnnpack", "--cache-dir", cache,
                     "--json", js)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(js.read_text())
    assert doc["device"]["label"].startswith("NOT Android") and "NOT Android" in p.stdout
    assert doc["emulator"]["cpu"] == "cortex-a76" and [r["kernels"] for r in doc["kernels"]] == ["xnnpack"]
    assert_no_latency(doc, p.stdout)


@pytest.mark.slow
def test_outputs_that_differ_from_the_host_fail_with_exit_1(export_dir, emu_cache, tmp_path):
    """An intact bundle (digests updated) whose recorded xnnpack outputs are 3 steps off on one value."""
    cache, _ = emu_cache
    out = _copy_export(export_dir, tmp_path)
    b = out / "bundle"
    e = dict(np.load(b / "expected_outputs.npz", allow_pickle=False))
    e["xnnpack"] = e["xnnpack"].copy()
    v = int(e["xnnpack"][2, 1])
    e["xnnpack"][2, 1] = v - 3 if v > 0 else v + 3
    np.savez(b / "expected_outputs.npz", **e)
    _rehash(b, "expected_outputs.npz")
    js = tmp_path / "fail.json"
    p = device_check(out, "--emulate", "rpi4", "--kernels", "xnnpack", "--cache-dir", cache, "--json", js)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "check      FAIL" in p.stdout
    doc = json.loads(js.read_text())
    assert doc["passed"] is False and doc["kernels"][0]["max_diff_steps"] == 3 and not doc["kernels"][0]["passed"]
    assert "kernels=xnnpack" in doc["failures"][0]


@pytest.mark.slow
def test_the_fake_cpuinfo_is_what_makes_litert_work(export_dir, emu_cache, tmp_path):
    """The same emulated Python and wheels: with the host's (x86) /proc/cpuinfo, LiteRT's Interpreter constructor
    dies of SIGSEGV; with the layer's Cortex-A72 cpuinfo it loads and runs the model."""
    cache, us = emu_cache
    layer = emulate.ensure_layer(emulate.get_device("rpi4"), us, cache, emulate.qemu_binary())
    assert layer.probe["cpu_parts"] == ["0xd08"] and layer.probe["possible"] == "0-3"  # redirected into the root
    model = next((export_dir / "bundle").glob("*.tflite"))
    code = ("from ai_edge_litert import interpreter as m; i = m.Interpreter(model_path=%r, num_threads=1); "
            "i.allocate_tensors(); i.invoke(); print('ran')" % str(model))
    env = emulate._guest_env(str(tmp_path))
    bare = subprocess.run([str(emulate.qemu_binary()), "-L", str(us.root), "-cpu", "cortex-a72",
                           str(us.root / "usr/bin/python3.11"), "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, preexec_fn=emulate._no_core_dumps, timeout=300)
    assert bare.returncode == -11 and "ran" not in bare.stdout, (bare.returncode, bare.stderr[-500:])
    faked = subprocess.run([str(layer.python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                           preexec_fn=emulate._no_core_dumps, timeout=300)
    assert faked.returncode == 0 and faked.stdout.strip() == "ran", faked.stderr[-500:]


@pytest.mark.slow
def test_export_stage_result_gate_and_report_section(export_dir, emu_cache):
    from pipeline.report import Report
    from pipeline.stages import emulate as stage
    cache, _ = emu_cache
    target = types.SimpleNamespace(name="rpi5")
    assert stage.emulate(None, export_dir / "bundle", target, cache_dir=cache) is None
    res = stage.emulate("rpi5", export_dir / "bundle", target, cache_dir=cache)
    with pytest.raises(Exception):
        res.passed = False  # frozen
    assert res.passed and res.device.name == "rpi5" and [k.kernels for k in res.kernels] == list(emulate.KERNELS)
    g = stage.gates(res)["emulated_device_matches_host"]
    assert g.passed and g.limit == 1 and g.value == res.max_diff_steps <= 1
    assert set(g.details["kernels"]) == set(emulate.KERNELS) and "rpi5 emulated" in g.reason
    rep = Report(kind="export")
    stage.attach(rep, res)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["emulation"]["device"]["name"] == "rpi5" and d["emulation"]["passed"] is True
    assert d["gates"]["emulated_device_matches_host"]["passed"] is True
    assert _timing_keys(d["emulation"]) == []
    rep2 = Report(kind="export")
    stage.attach(rep2, None)
    assert "emulation" not in rep2.to_dict() and stage.gates(None) == {}


@pytest.mark.slow
def test_export_with_emulate_records_the_gate_and_section(tinynet_dir, tiny_npz, emu_cache, tmp_path):
    """``python -m pipeline.export ... --emulate rpi4``: the emulate step runs on the bundle it just wrote, its gate
    decides the verdict with the others, and the summary says outputs only."""
    cache, _ = emu_cache
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "pipeline.export", "--model", "tinynet:tinynet", "--weights",
                        str(tinynet_dir / "tinynet.pt"), "--data", str(tiny_npz), "--calib-size", "100",
                        "--target", "rpi4", "--emulate", "rpi4", "--emulate-cache", str(cache), "--out", str(out)],
                       cwd=tinynet_dir, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r"\[15/17\] emulate", p.stderr), p.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["gates"]["emulated_device_matches_host"]["passed"] is True
    em = rep["emulation"]
    assert em["device"]["name"] == "rpi4" and em["emulator"]["cpu"] == "cortex-a72" and em["passed"] is True
    assert [k["kernels"] for k in em["kernels"]] == list(emulate.KERNELS)
    assert all(k["max_diff_steps"] <= 1 and k["samples"] > 0 for k in em["kernels"])
    assert _timing_keys(em) == []
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("emulated"))
    assert "rpi4" in line and "PASS" in line and "no timings" in line


def test_export_emulate_on_a_microcontroller_target_is_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, needle in ((["--target", "cortex-m4", "--emulate", "rpi4"], "cortex-m4 is not one"),
                         (["--target", "rpi4,cortex-m4", "--emulate", "rpi4"], "cortex-m4 is not one"),
                         (["--emulate", "rpi44"], "did you mean")):
        p = subprocess.run([sys.executable, "-m", "pipeline.export", *args, "--out", str(out),
                            "--emulate-cache", str(tmp_path / "cache")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and needle in _one_error_line(p), (args, p.stderr)
        assert not out.exists() and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- bad input: one line, nothing run

def test_not_an_export_folder_is_refused(tmp_path):
    cache = tmp_path / "cache"
    empty = tmp_path / "empty"
    empty.mkdir()
    p = device_check(empty, "--emulate", "rpi4", "--cache-dir", cache)
    assert p.returncode == 2 and "report.json does not exist" in _one_error_line(p)
    f = tmp_path / "file.txt"
    f.write_text("x")
    p = device_check(f, "--emulate", "rpi4", "--cache-dir", cache)
    assert p.returncode == 2 and "is not a folder" in _one_error_line(p)
    assert not cache.exists()  # nothing built for bad input


def test_unknown_device_gets_a_suggestion(tmp_path):
    p = device_check(tmp_path, "--emulate", "rpi3")
    assert p.returncode == 2 and re.search(r"did you mean .*rpi4", _one_error_line(p))
    p = device_check(tmp_path)
    assert p.returncode == 2 and "--emulate" in _one_error_line(p)


def test_an_export_without_a_bundle_is_refused(export_dir, tmp_path):
    out = _copy_export(export_dir, tmp_path)
    shutil.rmtree(out / "bundle")
    p = device_check(out, "--emulate", "rpi4", "--cache-dir", tmp_path / "cache")
    assert p.returncode == 2 and "holds no device bundle" in _one_error_line(p)


@pytest.mark.parametrize("name", ["model_int8.tflite", "samples.npz", "expected_outputs.npz", "preprocessing.json"])
def test_a_tampered_bundle_is_refused_before_anything_runs(export_dir, tmp_path, name):
    out = _copy_export(export_dir, tmp_path)
    f = out / "bundle" / name
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    p = device_check(out, "--emulate", "rpi5", "--cache-dir", tmp_path / "cache")
    line = _one_error_line(p)
    assert p.returncode == 2 and f"the bundle's {name} changed" in line
    assert not (tmp_path / "cache").exists()


def test_a_bundle_path_leaving_the_folder_is_refused(export_dir, tmp_path):
    out = _copy_export(export_dir, tmp_path)
    man = json.loads((out / "bundle/bundle.json").read_text())
    man["sha256"]["../report.json"] = "0" * 64
    (out / "bundle/bundle.json").write_text(json.dumps(man))
    p = device_check(out, "--emulate", "rpi4", "--cache-dir", tmp_path / "cache")
    assert p.returncode == 2 and "leaves the bundle folder" in _one_error_line(p)


def test_unpinned_requirements_are_refused(export_dir, tmp_path):
    out = _copy_export(export_dir, tmp_path)
    (out / "bundle/requirements.txt").write_text("ai-edge-litert>=2\nnumpy\n")
    with pytest.raises(DataError, match="pins no ai-edge-litert and no numpy version"):
        emulate.read_bundle(out / "bundle")


def test_requirements_pins_follow_the_python_version(tmp_path):
    from pipeline.device.bundle import REQUIREMENTS
    f = tmp_path / "requirements.txt"
    f.write_text(REQUIREMENTS)
    assert emulate.requirements_pins(f) == (("ai-edge-litert", "2.3.0"), ("numpy", "2.4.6"))
    assert emulate.requirements_pins(f, "3.10") == (("ai-edge-litert", "2.3.0"), ("numpy", "2.2.6"))


def test_stage_refuses_a_target_that_is_not_an_arm_litert_one():
    from pipeline.stages.emulate import ARM_TARGETS, check_target
    for t in ARM_TARGETS:
        check_target("rpi4", t)
    check_target(None, "cortex-m4")
    with pytest.raises(TargetError, match="cortex-m4 is not one"):
        check_target("rpi4", "cortex-m4")
    with pytest.raises(UsageError, match="did you mean rpi5"):
        check_target("rpi55", "rpi5")


# --------------------------------------------------------------------------- the root: unpacking and caching

def _deb(members: list[tuple[str, str, bytes | str]]) -> bytes:
    """A minimal .deb (ar archive with data.tar.xz): (kind, name, content or link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for kind, name, data in members:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                tar.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o4755 if kind == "suid" else 0o644
                tar.addfile(ti, io.BytesIO(data))
    out = b"!<arch>\n"
    for name, blob in (("debian-binary", b"2.0\n"), ("data.tar.xz", buf.getvalue())):
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += head + blob + (b"\n" if len(blob) % 2 else b"")
    return out


def test_a_deb_unpacks_merged_usr_with_every_link_inside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    emulate.extract_deb(_deb([
        ("dir", "./", b""), ("dir", "./lib/aarch64-linux-gnu", b""),
        ("file", "./lib/aarch64-linux-gnu/libx.so.1", b"elf"),
        ("sym", "./lib/ld-x.so.1", "aarch64-linux-gnu/libx.so.1"),
        ("sym", "./usr/lib/python3.11/sitecustomize.py", "/etc/python3.11/sitecustomize.py"),
        ("sym", "./bin/sh", "../usr/bin/dash"),
        ("suid", "./usr/bin/tool", b"#!"),
        ("sym", "./usr/share/escape", "../../../../../../etc/passwd"),
    ]), root, "test.deb")
    assert (root / "usr/lib/aarch64-linux-gnu/libx.so.1").read_bytes() == b"elf"
    assert not (root / "lib").exists()  # /lib -> usr/lib (the build adds the top-level links)
    assert os.readlink(root / "usr/lib/ld-x.so.1") == "aarch64-linux-gnu/libx.so.1"
    assert os.readlink(root / "usr/lib/python3.11/sitecustomize.py") == "../../../etc/python3.11/sitecustomize.py"
    assert os.readlink(root / "usr/bin/sh") == "dash"
    assert not (root / "usr/bin/tool").stat().st_mode & 0o7000  # no setuid
    target = (root / "usr/share/escape").resolve(strict=False)
    assert root.resolve() in target.parents  # a '..' beyond / stops at the root, as in a chroot
    for link in root.rglob("*"):
        if link.is_symlink():
            assert not os.readlink(link).startswith("/")


def test_dependencies_resolve_through_alternatives_and_provides():
    pkgs = emulate.parse_packages(
        "Package: app\nDepends: libA (>= 1), mime-support | media-types, virt\n\n"
        "Package: libA\nPre-Depends: libc6:any\n\n"
        "Package: media-types\n\nPackage: libc6\n\nPackage: real-virt\nProvides: virt (= 2)\n\n"
        "Package: unused\n")
    assert emulate.resolve(pkgs, ["app"]) == ["app", "libA", "media-types", "real-virt", "libc6"]
    with pytest.raises(emulate.EmulatorError, match="cannot resolve app's dependency 'missing'"):
        emulate.resolve(emulate.parse_packages("Package: app\nDepends: missing\n"), ["app"])


def _fake_build(calls: list):
    def build(tmp, key, wheels, log):
        calls.append(key)
        r = tmp / "root"
        r.mkdir()
        for e in emulate._ESSENTIAL:
            (r / e).parent.mkdir(parents=True, exist_ok=True)
            (r / e).write_text(e)
        n, size = emulate._tree_size(r)
        return {"kind": "emulated_userspace", "schema_version": emulate.SCHEMA_VERSION, "key": key,
                "files": n, "bytes": size, "wheels": [], "packages": []}
    return build


def test_the_root_is_built_once_and_rebuilt_only_when_missing_or_corrupt(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(emulate, "_build", _fake_build(calls))
    wheels = (("ai-edge-litert", "2.3.0"), ("numpy", "2.4.6"))
    us = emulate.ensure_userspace(wheels, tmp_path)
    assert us.built and len(calls) == 1 and emulate.userspace_state(us.root, us.key)[0] == "ok"
    assert not emulate.ensure_userspace(wheels, tmp_path).built and len(calls) == 1  # cached
    (us.root / "usr/lib/python3.11/__pycache__").mkdir()  # bytecode of a Python run by hand is no change
    (us.root / "usr/lib/python3.11/__pycache__/os.cpython-311.pyc").write_bytes(b"pyc")
    assert emulate.userspace_state(us.root, us.key)[0] == "ok"
    (us.root / emulate._ESSENTIAL[2]).write_text("truncated")  # a file of another size: corrupt
    assert emulate.userspace_state(us.root, us.key)[0] == "corrupt"
    assert emulate.ensure_userspace(wheels, tmp_path).built and len(calls) == 2
    (us.root / emulate._MANIFEST).unlink()  # a root without its manifest never counts as complete
    assert emulate.userspace_state(us.root, us.key)[0] == "corrupt"
    assert emulate.ensure_userspace(wheels, tmp_path, rebuild=False).built and len(calls) == 3
    assert emulate.ensure_userspace(wheels, tmp_path, rebuild=True).built and len(calls) == 4
    assert [p.name for p in (tmp_path / "userspace").iterdir()] == [us.key]  # no temporary folder left


def test_a_killed_build_leaves_no_half_root(tmp_path, monkeypatch):
    def dies(tmp, key, wheels, log):
        (tmp / "root" / "usr/bin").mkdir(parents=True)
        (tmp / "root/usr/bin/python3.11").write_text("half")
        raise KeyboardInterrupt
    monkeypatch.setattr(emulate, "_build", dies)
    wheels = (("ai-edge-litert", "2.3.0"), ("numpy", "2.4.6"))
    with pytest.raises(KeyboardInterrupt):
        emulate.ensure_userspace(wheels, tmp_path)
    assert list((tmp_path / "userspace").iterdir()) == []
    # a build killed with SIGKILL leaves its temporary folder: the next build removes it (its process is gone)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "userspace" / f".build-{emulate.userspace_key(wheels)}-{dead.pid}-abcdef"
    (stale / "root/usr").mkdir(parents=True)
    calls: list = []
    monkeypatch.setattr(emulate, "_build", _fake_build(calls))
    us = emulate.ensure_userspace(wheels, tmp_path)
    assert us.built and not stale.exists()
    assert [p.name for p in (tmp_path / "userspace").iterdir()] == [us.key]


def test_build_failures_are_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(emulate, "MIRROR", "http://127.0.0.1:9/debian")  # nothing listens on the discard port
    with pytest.raises(emulate.EmulatorError, match=r"cannot download the Debian index .* check the network"):
        emulate.ensure_userspace((("ai-edge-litert", "2.3.0"), ("numpy", "2.4.6")), tmp_path)
    assert list((tmp_path / "userspace").iterdir()) == []
    monkeypatch.setattr(emulate.shutil, "which", lambda name: None)
    with pytest.raises(emulate.EmulatorError, match="apt-get install qemu-user-static"):
        emulate.qemu_binary()
