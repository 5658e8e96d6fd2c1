#!/usr/bin/env python3
"""Benchmark and check a TFLite model on the device it runs on (made for a Raspberry Pi).

Standalone: Python >= 3.9 with numpy and ai-edge-litert (or tflite-runtime); no torch, no
tensorflow, nothing from the pipeline. Copy the export's ``bundle.tar.gz`` to the device and run

    python3 pi_benchmark.py --check --threads 1,2,4 --kernels xnnpack,builtin,ref --json pi.json

The figures follow TFLite's ``benchmark_model``:

- ``init_us``: the Interpreter constructor plus ``allocate_tensors()``;
- ``first_us``: the first ``invoke()``; warm-up runs (``--warmup`` runs and at least
  ``--warmup-secs``) include it, as in ``benchmark_model``, and give ``warmup_mean_us``;
- steady state: at least ``--runs`` runs and at least ``--min-secs`` seconds (at most
  ``--max-secs``): count, mean, std, min, p50, p90, p99, max in microseconds, throughput;
- only ``invoke()`` is timed; the input is set once before (one real bundled sample when a
  bundle is present, else seeded random values);
- ``rss_peak_kib``: the peak resident memory (VmHWM) of a fresh process that ran only that
  setting: each (kernels, threads) setting runs in its own subprocess of this script.

Kernels: ``xnnpack`` = OpResolverType.BUILTIN (built-in kernels with the default XNNPACK
delegate), ``builtin`` = BUILTIN_WITHOUT_DEFAULT_DELEGATES (plain optimized built-in kernels),
``ref`` = BUILTIN_REF (reference kernels, for numerical checks, not a deployment choice).

``--check`` runs the bundle's sample inputs and compares the outputs with those recorded on the
host (same kernels): top-1 agreement and the largest difference in output quantization steps.
It also rebuilds the int8 inputs from the raw images with the bundle's preprocessing record.
Exit status: 0 ok, 1 a check failed (or the interpreter crashed), 2 bad input.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

SCHEMA_VERSION = "1.0"
KIND = "pi_benchmark"
KERNELS = {  # our name -> LiteRT OpResolverType member
    "xnnpack": "BUILTIN",
    "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
    "ref": "BUILTIN_REF",
}
BUNDLE_MANIFEST = "bundle.json"
TIMED = "Interpreter.invoke() only, batch as in the model (input set once before timing), as benchmark_model"

# /proc/cpuinfo "CPU part" of Arm-designed cores (implementer 0x41).
ARM_CORES = {
    "0xb76": "ARM1176", "0xc07": "Cortex-A7", "0xd03": "Cortex-A53", "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77",
    "0xd41": "Cortex-A78", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
    "0xd4b": "Cortex-A78C",
}
THROTTLE_BITS = {  # vcgencmd get_throttled
    0: "under-voltage detected", 1: "arm frequency capped", 2: "currently throttled",
    3: "soft temperature limit active", 16: "under-voltage has occurred",
    17: "arm frequency capping has occurred", 18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}


class BadInput(Exception):
    """Bad input: one line, exit 2."""

    exit_status = 2


class CheckFailed(Exception):
    """A check failed or the interpreter crashed: exit 1."""

    exit_status = 1


# --------------------------------------------------------------------------- small helpers

def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00 \n\t")
    except OSError:
        return None


def _run(cmd, timeout=3.0):
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return None
    return p.stdout.decode("utf-8", "replace").strip()


def _status_kib(field):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None off Linux."""
    text = _read("/proc/self/status")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def _peak_rss_kib():
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM from /proc/self/status"
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak // 1024 if sys.platform == "darwin" else peak), "ru_maxrss from getrusage"
    except Exception:
        return None, "unavailable"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path, obj):
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _clean(v):
    """JSON-safe values: numpy scalars to Python, NaN/inf to None."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# --------------------------------------------------------------------------- runtime

def load_runtime():
    """(package name, version, interpreter module): ai-edge-litert, else tflite-runtime."""
    try:
        from ai_edge_litert import interpreter as mod
        name, top = "ai-edge-litert", "ai_edge_litert"
    except ImportError:
        try:
            from tflite_runtime import interpreter as mod
            name, top = "tflite-runtime", "tflite_runtime"
        except ImportError:
            raise BadInput("neither ai-edge-litert nor tflite-runtime can be imported; "
                           "install them with pip install -r requirements.txt") from None
    version = None
    try:
        from importlib import metadata
        version = metadata.version(name)
    except Exception:
        version = getattr(sys.modules.get(top), "__version__", None)
    import numpy as np
    if name == "tflite-runtime" and int(np.__version__.split(".")[0]) >= 2:
        # tflite-runtime (last release 2.14.0) is built against numpy 1.x and fails on numpy 2.
        raise BadInput("tflite-runtime %s needs numpy < 2 but numpy %s is installed; pip install 'numpy<2', "
                       "or use ai-edge-litert instead" % (version, np.__version__))
    return name, version, mod


def make_interpreter(mod, model_path, kernels, threads):
    resolver = getattr(mod.OpResolverType, KERNELS[kernels])
    return mod.Interpreter(model_path=model_path, num_threads=int(threads),
                           experimental_op_resolver_type=resolver)


def tensor_facts(d):
    q = d.get("quantization", (0.0, 0))
    return {"name": d.get("name"), "shape": [int(v) for v in d["shape"]],
            "shape_signature": [int(v) for v in d.get("shape_signature", d["shape"])],
            "dtype": _dtype_name(d["dtype"]), "scale": float(q[0]), "zero_point": int(q[1])}


def _dtype_name(dt):
    import numpy as np
    return np.dtype(dt).name


# --------------------------------------------------------------------------- device facts

def device_facts():
    cpuinfo = _read("/proc/cpuinfo") or ""
    fields = {}
    parts = set()
    for line in cpuinfo.splitlines():
        if ":" not in line:
            continue
        k, v = (s.strip() for s in line.split(":", 1))
        fields.setdefault(k, v)
        if k == "CPU part":
            parts.add(v.lower())
    cores = sorted({ARM_CORES.get(p, p) for p in parts}) if parts else []
    cpu = fields.get("model name") or (", ".join(cores) if cores else None) or platform.processor() or None
    os_name = None
    osr = _read("/etc/os-release")
    if osr:
        for line in osr.splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    meminfo = _read("/proc/meminfo") or ""
    mem_total = None
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1])
    freq = lambda name: _khz_to_mhz(_read("/sys/devices/system/cpu/cpu0/cpufreq/" + name))  # noqa: E731
    board = _read("/proc/device-tree/model") or fields.get("Model")  # Raspberry Pi kernels also put it in cpuinfo
    return {
        "board": board,
        "is_raspberry_pi": bool(board and board.startswith("Raspberry Pi")),
        "cpu": cpu,
        "cpu_cores": cores or None,
        "cpu_hardware": fields.get("Hardware"),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "cpu_max_mhz": freq("cpuinfo_max_freq"),
        "cpu_scaling_max_mhz": freq("scaling_max_freq"),
        "governor": _governors(),
        "memory_total_kib": mem_total,
        "os": os_name,
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "libc": " ".join(v for v in platform.libc_ver() if v) or None,
    }


def _khz_to_mhz(text):
    try:
        return round(int(text) / 1000.0, 1)
    except (TypeError, ValueError):
        return None


def _governors():
    base = "/sys/devices/system/cpu"
    try:
        cpus = sorted(d for d in os.listdir(base) if d.startswith("cpu") and d[3:].isdigit())
    except OSError:
        return None
    govs = {}
    for c in cpus:
        g = _read(os.path.join(base, c, "cpufreq", "scaling_governor"))
        if g:
            govs[c] = g
    if not govs:
        return None
    uniq = sorted(set(govs.values()))
    return uniq[0] if len(uniq) == 1 else govs


def conditions():
    """What changes during a run: temperature, throttling, clock, load."""
    temp = None
    zone_type = None
    base = "/sys/class/thermal"
    try:
        zones = sorted(z for z in os.listdir(base) if z.startswith("thermal_zone"))
    except OSError:
        zones = []
    for z in zones:  # prefer the CPU zone
        t = _read(os.path.join(base, z, "temp"))
        typ = _read(os.path.join(base, z, "type"))
        if t and t.lstrip("-").isdigit():
            if temp is None or (typ and "cpu" in typ.lower()):
                temp, zone_type = int(t) / 1000.0, typ
    throttled = None
    raw = _run(["vcgencmd", "get_throttled"])
    if raw and "=" in raw:
        try:
            bits = int(raw.split("=", 1)[1], 16)
            throttled = {"raw": hex(bits), "flags": [m for b, m in sorted(THROTTLE_BITS.items()) if bits >> b & 1]}
        except ValueError:
            throttled = {"raw": raw, "flags": None}
    vc_temp = _run(["vcgencmd", "measure_temp"])
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "temperature_c": temp,
        "thermal_zone": zone_type,
        "vcgencmd_temp": vc_temp,
        "throttled": throttled,
        "cpu_cur_mhz": _khz_to_mhz(_read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")),
        "load_average": load,
    }


# --------------------------------------------------------------------------- bundle

def find_bundle(model_path, script_dir):
    """The bundle folder: the model's folder when it holds bundle.json, else this script's."""
    for d in (os.path.dirname(os.path.abspath(model_path)), script_dir):
        if os.path.isfile(os.path.join(d, BUNDLE_MANIFEST)):
            return d
    return None


MAX_JSON_BYTES = 16 << 20  # bundle.json and preprocessing.json are a few KiB
MAX_JSON_DEPTH = 32
BUNDLE_FIX = "copy the whole bundle folder again (bundle.tar.gz from the export)"


def _json_depth(raw):
    """Deepest [ / { nesting of JSON text, brackets in strings not counted (no recursion)."""
    import re
    import numpy as np
    a = np.frombuffer(re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', raw), np.uint8)
    if not len(a):
        return 0
    step = np.isin(a, (91, 123)).astype(np.int64) - np.isin(a, (93, 125)).astype(np.int64)
    return int(np.cumsum(step).max())


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def read_json_object(path):
    """A JSON object from a bundle file: bounded size and depth, no NaN, else one-line BadInput."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise BadInput("cannot read %s (%s); %s" % (path, e.strerror or type(e).__name__, BUNDLE_FIX)) from None
    if len(raw) > MAX_JSON_BYTES:
        raise BadInput("%s is larger than %d MiB; %s" % (path, MAX_JSON_BYTES >> 20, BUNDLE_FIX))
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise BadInput("%s nests %d levels deep (limit %d); %s" % (path, depth, MAX_JSON_DEPTH, BUNDLE_FIX))
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise BadInput("cannot read %s (%s); %s" % (path, type(e).__name__, BUNDLE_FIX)) from None
    if not isinstance(obj, dict):
        raise BadInput("%s holds a JSON %s, not an object; %s" % (path, type(obj).__name__, BUNDLE_FIX))
    return obj


def _bad(where, key, problem):
    return BadInput("%s: %s %s; %s" % (where, key, problem, BUNDLE_FIX))


def _show(v):
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _field(obj, key, where, kind, required=True):
    """obj[a][b]... for key 'a.b': of type ``kind`` ('object', 'string', 'number', 'sha256'), else BadInput."""
    v = obj
    for part in key.split("."):
        if not isinstance(v, dict):
            raise _bad(where, key, "is missing")
        v = v.get(part)
    if v is None:
        if required:
            raise _bad(where, key, "is missing")
        return None
    ok = {"object": isinstance(v, dict),
          "string": isinstance(v, str) and 0 < len(v) <= 4096 and "\x00" not in v,
          "number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "int": isinstance(v, int) and not isinstance(v, bool),
          "sha256": isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)}[kind]
    if not ok:
        raise _bad(where, key, "is %s, not %s" % (_show(v), {"object": "an object", "int": "an integer"}.get(
            kind, "a " + kind)))
    return v


def path_inside(folder, rel):
    """folder/rel when rel is relative and stays inside folder with every symlink resolved, else None."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel) or rel.startswith("~"):
        return None
    base = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(base, rel))
    if target != base and os.path.commonpath([base, target]) != base:
        return None
    return target


# The bundle files this script reads besides bundle.json (the keys that name them).
BUNDLE_FILES = ("model.path", "preprocessing", "samples.path", "expected_outputs.path")


def read_manifest(bundle_dir):
    """bundle.json, every field this script uses checked; adds ``_files``: key -> absolute path inside the bundle."""
    path = os.path.join(bundle_dir, BUNDLE_MANIFEST)
    m = read_json_object(path)
    if m.get("kind") != "device_bundle" or "samples" not in m or "expected_outputs" not in m:
        raise BadInput("%s is not a device bundle manifest; %s" % (path, BUNDLE_FIX))
    files = {}
    for key in BUNDLE_FILES:
        rel = _field(m, key, path, "string")
        p = path_inside(bundle_dir, rel)
        if p is None:
            raise _bad(path, key, "%s leaves the bundle folder (absolute, '..' or a symlink out); paths in a "
                       "bundle must stay inside it" % _show(rel))
        files[key] = p
    _field(m, "model.sha256", path, "sha256", required=False)
    digests = _field(m, "sha256", path, "object")
    for key in BUNDLE_FILES:
        _field({"d": digests.get(m_key(m, key))}, "d", path, "sha256", required=False)
        if digests.get(m_key(m, key)) is None:
            raise _bad(path, "sha256", "records no digest for %s (the %s); a bundle of this version records every "
                       "file this script reads" % (m_key(m, key), key))
    for key in ("samples", "expected_outputs", "model"):
        _field(m, key, path, "object")
    for key in ("output", "expected_outputs.recorded_with"):
        _field(m, key, path, "object", required=False)
    for key in ("created_by", "model_spec"):
        _field(m, key, path, "string", required=False)
    tol = _field(m, "check_tolerance_steps", path, "number", required=False)
    if tol is not None and not 0 <= tol <= 1e6:
        raise _bad(path, "check_tolerance_steps", "is %r, outside 0..1e6" % tol)
    m["class_names"] = class_names_field(m, path)
    m["_files"] = files
    return m


MAX_CLASSES = 100000
MAX_CLASS_NAME_CHARS = 256


def class_names_field(m, path):
    """bundle.json ``class_names`` (optional): a list of distinct, printable, non-empty strings, one per output."""
    names = m.get("class_names")
    if names is None:
        return None
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES:
        raise _bad(path, "class_names", "is %s, not a list of 1 to %d names" % (_show(names), MAX_CLASSES))
    for i, n in enumerate(names):
        if not (isinstance(n, str) and 0 < len(n) <= MAX_CLASS_NAME_CHARS and n.strip() == n and n.isprintable()):
            raise _bad(path, "class_names[%d]" % i, "is %s, not a printable name of 1 to %d characters"
                       % (_show(n), MAX_CLASS_NAME_CHARS))
    if len(set(names)) != len(names):
        raise _bad(path, "class_names", "names a class twice")
    shape = (m.get("output") or {}).get("shape")
    if isinstance(shape, list) and len(shape) >= 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                           for d in shape[1:]):
        k = 1
        for d in shape[1:]:
            k *= d
        if k != len(names):
            raise _bad(path, "class_names", "holds %d names but the model has %d outputs (output.shape %s)"
                       % (len(names), k, shape))
    return names


def class_label(names, c):
    """Class ``c`` as printed: its index, and its name when the bundle records one."""
    c = int(c)
    if names is not None and 0 <= c < len(names):
        return "%d (%s)" % (c, names[c])
    return str(c)


def _pct(v):
    """A fraction printed as a percentage ("n/a" when missing)."""
    return "n/a" if v is None else "%.2f%%" % (100.0 * v)


def m_key(m, key):
    """The file name a BUNDLE_FILES key names (the key of the manifest's sha256 map)."""
    v = m
    for part in key.split("."):
        v = v[part]
    return v


def verify_file(manifest, key, bundle_dir):
    """The bundle file ``key`` names, after checking its sha256 against bundle.json; BadInput naming it otherwise."""
    p = manifest["_files"][key]
    name = m_key(manifest, key)
    if not os.path.isfile(p):
        raise BadInput("the bundle's %s (%s in bundle.json) does not exist; %s" % (name, key, BUNDLE_FIX))
    try:
        got = _sha256(p)
    except OSError as e:
        raise BadInput("cannot read the bundle's %s (%s); %s" % (name, e.strerror or e, BUNDLE_FIX)) from None
    if got != manifest["sha256"][name]:
        raise BadInput("the bundle's %s changed: its sha256 is not the one bundle.json records; %s"
                       % (name, BUNDLE_FIX))
    return p


def load_npz(path, what):
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise BadInput("cannot read the bundle's %s %s (%s); copy the bundle again" % (what, path, type(e).__name__)) from None
    except Exception as e:  # zipfile.BadZipFile and friends
        raise BadInput("cannot read the bundle's %s %s (%s); copy the bundle again" % (what, path, type(e).__name__)) from None


# --------------------------------------------------------------------------- worker (one setting per process)

def worker(spec):
    """Runs in a fresh process: one (kernels, threads) setting; writes its result JSON."""
    import numpy as np
    rss_start = _status_kib("VmRSS")
    rt_name, rt_version, mod = load_runtime()
    rss_baseline = _status_kib("VmRSS")
    kernels, threads = spec["kernels"], spec["threads"]
    result = {"kernels": kernels, "op_resolver": KERNELS[kernels], "threads": threads}
    try:
        t0 = time.perf_counter_ns()
        interp = make_interpreter(mod, spec["model"], kernels, threads)
        interp.allocate_tensors()
        init_ns = time.perf_counter_ns() - t0
    except Exception as e:
        result["error"] = "load: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return result
    rss_init = _status_kib("VmRSS")
    inputs = interp.get_input_details()
    out_d = interp.get_output_details()[0]

    if spec["mode"] == "check":
        x = np.load(spec["inputs"], allow_pickle=False)
        ys = []
        for i in range(len(x)):
            interp.set_tensor(inputs[0]["index"], x[i:i + 1])
            interp.invoke()
            ys.append(interp.get_tensor(out_d["index"]).reshape(-1).copy())
        np.save(spec["outputs"], np.stack(ys) if ys else np.zeros((0, 0)))
        result["samples"] = int(len(x))
        return result

    rng = np.random.default_rng(0)
    sample = None
    if spec.get("sample"):
        sample = np.load(spec["sample"], allow_pickle=False)
    described = []
    for j, d in enumerate(inputs):
        shape, dtype = tuple(int(v) for v in d["shape"]), np.dtype(d["dtype"])
        if j == 0 and sample is not None and tuple(sample.shape) == shape and sample.dtype == dtype:
            x, how = sample, "bundle sample 0"
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            x, how = rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype), "random (seed 0)"
        else:
            x, how = rng.standard_normal(shape).astype(dtype), "random normal (seed 0)"
        interp.set_tensor(d["index"], x)
        described.append(how)

    def timed_runs(min_runs, min_secs, max_secs):
        times = []
        start = time.perf_counter()
        while True:
            t = time.perf_counter_ns()
            interp.invoke()
            times.append(time.perf_counter_ns() - t)
            elapsed = time.perf_counter() - start
            if elapsed >= max_secs or (len(times) >= min_runs and elapsed >= min_secs):
                return times

    warm = timed_runs(spec["warmup"], spec["warmup_secs"], spec["max_secs"])
    steady = np.asarray(timed_runs(spec["runs"], spec["min_secs"], spec["max_secs"]), dtype=np.float64) / 1e3
    interp.get_tensor(out_d["index"])
    peak, peak_source = _peak_rss_kib()
    p50, p90, p99 = (float(v) for v in np.percentile(steady, [50, 90, 99]))
    batch = int(inputs[0]["shape"][0]) if len(inputs[0]["shape"]) else 1
    try:  # a private API: None when it is not there
        ops = interp._get_ops_details()
        delegated = sum(1 for o in ops if o.get("op_name") == "DELEGATE")
    except Exception:
        ops, delegated = None, None
    result.update({
        "batch": batch,
        "input": ", ".join(sorted(set(described))),
        "init_us": round(init_ns / 1e3, 1),
        "first_us": round(warm[0] / 1e3, 1),
        "warmup_count": len(warm),
        "warmup_mean_us": round(float(np.mean(warm)) / 1e3, 1),
        "count": int(len(steady)),
        "mean_us": round(float(steady.mean()), 1),
        "std_us": round(float(steady.std()), 1),
        "min_us": round(float(steady.min()), 1),
        "p50_us": round(p50, 1),
        "p90_us": round(p90, 1),
        "p99_us": round(p99, 1),
        "max_us": round(float(steady.max()), 1),
        "throughput_per_s": round(1e6 / float(steady.mean()), 2),
        "images_per_s": round(batch * 1e6 / float(steady.mean()), 2),
        "rss_peak_kib": peak,
        "rss_baseline_kib": rss_baseline,
        "rss_after_init_kib": rss_init,
        "rss_at_start_kib": rss_start,
        "rss_source": peak_source,
        "delegate_applied": None if delegated is None else delegated > 0,
        "ops": None if ops is None else len(ops),
        "pid": os.getpid(),
        "runtime": rt_name,
        "runtime_version": rt_version,
    })
    return result


def run_worker(script, spec, timeout):
    """Run one setting in a fresh subprocess of this script; return (result, runtime log lines)."""
    with tempfile.TemporaryDirectory(prefix="pi_benchmark-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        spec = dict(spec, result=result_path)
        try:
            flags = subprocess._args_from_interpreter_flags()  # keep -S/-I/-E etc. of this run
        except Exception:
            flags = []
        cmd = [sys.executable] + flags + [script, "--_worker", json.dumps(spec)]
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CheckFailed("kernels=%s threads=%s did not finish within %d s; pass a smaller --max-secs"
                              % (spec["kernels"], spec["threads"], timeout)) from None
        log = [ln.strip() for ln in (p.stdout + p.stderr).decode("utf-8", "replace").splitlines() if ln.strip()]
        if p.returncode < 0 or not os.path.isfile(result_path):
            how = ("was killed by signal %d" % -p.returncode) if p.returncode < 0 else ("exited with status %d" % p.returncode)
            tail = " | ".join(log[-2:])[:300]
            raise CheckFailed("the interpreter process for kernels=%s threads=%s %s%s"
                              % (spec["kernels"], spec["threads"], how, (": " + tail) if tail else ""))
        with open(result_path) as f:
            result = json.load(f)
        if spec["mode"] == "check" and os.path.isfile(spec.get("outputs", "")):
            import numpy as np
            result["_outputs"] = np.load(spec["outputs"], allow_pickle=False)
    if "error" in result:
        raise BadInput("the runtime cannot load %s with kernels=%s (%s); use a newer runtime "
                       "(pip install -U ai-edge-litert) or re-export the model"
                       % (os.path.basename(spec["model"]), spec["kernels"], result["error"]))
    return result, [ln for ln in log if "delegate" in ln.lower() or "xnnpack" in ln.lower()][:5]


# --------------------------------------------------------------------------- check

def check(args, model_path, bundle_dir, manifest, script):
    import numpy as np
    samples = load_npz(verify_file(manifest, "samples.path", bundle_dir), "samples")
    expected = load_npz(verify_file(manifest, "expected_outputs.path", bundle_dir), "expected outputs")
    if "input_int8" not in samples:
        raise BadInput("the bundle's samples lack input_int8; copy the bundle again")
    x = samples["input_int8"]
    labels = samples.get("labels")
    if x.ndim < 2 or x.dtype.kind not in "iuf" or (labels is not None and (labels.ndim != 1 or labels.dtype.kind not in "iu")):
        raise BadInput("the bundle's samples are malformed (input_int8 %s %s); %s" % (x.dtype, list(x.shape), BUNDLE_FIX))
    for k, v in expected.items():
        if v.ndim < 1 or v.dtype.kind not in "iuf":
            raise BadInput("the bundle's expected outputs %s are malformed (%s %s); %s"
                           % (k, v.dtype, list(v.shape), BUNDLE_FIX))
    tol = float(args.tolerance_steps if args.tolerance_steps is not None
                else manifest.get("check_tolerance_steps", 1))
    out_q = manifest.get("output") or {}
    report = {
        "samples": int(len(x)),
        "tolerance_steps": tol,
        "threads": args.threads[0],
        "batch": 1,
        "expected_recorded_with": manifest["expected_outputs"].get("recorded_with"),
        "rule": ("per kernel: largest output difference <= tolerance_steps quantization steps, and no top-1 "
                 "change except where the host's top-2 margin is within 2 x tolerance_steps"),
    }
    failures = []
    want_sha = manifest["model"].get("sha256")
    got_sha = _sha256(model_path)
    report["model_sha256"] = got_sha
    report["model_matches_bundle"] = (want_sha == got_sha) if want_sha else None
    if want_sha and want_sha != got_sha:
        failures.append("the model is not the one the expected outputs were recorded with (sha256 differs)")

    report["preprocessing"] = check_preprocessing(bundle_dir, manifest, samples)
    if report["preprocessing"] is not None and not report["preprocessing"]["passed"]:
        failures.append("the preprocessing record does not rebuild the int8 inputs from the raw images "
                        "(%s steps off)" % report["preprocessing"]["max_diff_steps"])

    per_kernel = []
    with tempfile.TemporaryDirectory(prefix="pi_check-") as tmp:
        for k in args.kernels:
            key = k if k in expected else ("xnnpack" if "xnnpack" in expected else None)
            if key is None:
                raise BadInput("the bundle records no expected outputs for kernels %s; copy the bundle again" % k)
            exp = expected[key]
            n = min(len(exp), len(x))
            inp = os.path.join(tmp, "inputs_%s.npy" % k)
            np.save(inp, x[:n])
            spec = {"mode": "check", "model": model_path, "kernels": k, "threads": args.threads[0],
                    "inputs": inp, "outputs": os.path.join(tmp, "outputs_%s.npy" % k)}
            res, _ = run_worker(script, spec, timeout=600)
            got = res["_outputs"]
            row = compare_outputs(got, exp[:n].reshape(n, -1), tol, out_q, labels[:n] if labels is not None else None)
            row.update({"kernels": k, "compared_with": "host %s" % key})
            per_kernel.append(row)
            if "predictions" not in report and got.ndim == 2 and len(got):
                report["predictions"] = predictions(got, labels, manifest.get("class_names"), k)
            if not row["passed"]:
                failures.append("kernels=%s: %d of %d top-1 differ beyond tolerance, largest difference %s steps "
                                "(tolerance %s)" % (k, row["flips_beyond_tolerance"], n, row["max_diff_steps"], tol))
    report["kernels"] = per_kernel
    report["failures"] = failures
    report["passed"] = not failures
    return report


SHOWN_PREDICTIONS = 5


def predictions(got, labels, names, kernels):
    """The device's top-1 class on the first SHOWN_PREDICTIONS samples, with its name and the true label."""
    top = got.argmax(axis=1)
    rows = []
    for i in range(min(SHOWN_PREDICTIONS, len(top))):
        r = {"sample": i, "class": int(top[i]), "name": names[int(top[i])] if names and int(top[i]) < len(names) else None}
        if labels is not None and i < len(labels):
            r["label"] = int(labels[i])
            r["label_name"] = names[int(labels[i])] if names and 0 <= int(labels[i]) < len(names) else None
        rows.append(r)
    return {"kernels": kernels, "samples": rows}


def compare_outputs(got, exp, tol, out_q, labels):
    import numpy as np
    if got.shape != exp.shape:
        return {"samples": int(len(exp)), "passed": False, "error": "output shape %s differs from the recorded %s"
                % (list(got.shape), list(exp.shape)), "flips_beyond_tolerance": len(exp), "max_diff_steps": None}
    if np.issubdtype(exp.dtype, np.integer):
        step, unit = 1.0, "output quantization steps (int8 units)"
    else:  # float output: one 8-bit step of the recorded output range
        span = float(exp.max() - exp.min()) if exp.size else 0.0
        step, unit = (span / 255.0 if span > 0 else 1.0), "1/255 of the recorded output range"
    diff = np.abs(got.astype(np.float64) - exp.astype(np.float64)) / step
    g1, e1 = got.argmax(axis=1), exp.argmax(axis=1)
    flips = np.flatnonzero(g1 != e1)
    ef = exp.astype(np.float64) / step
    margins = ef[flips, e1[flips]] - ef[flips, g1[flips]]
    beyond = int(np.sum(margins > 2 * tol))
    max_diff = float(diff.max()) if diff.size else 0.0
    row = {
        "samples": int(len(exp)),
        "top1_agreement": round(float(np.mean(g1 == e1)), 6) if len(exp) else None,
        "flips": int(len(flips)),
        "flips_beyond_tolerance": beyond,
        "max_diff_steps": round(max_diff, 3),
        "mean_diff_steps": round(float(diff.mean()), 4) if diff.size else 0.0,
        "values_differing": round(float(np.mean(diff > 0)), 6) if diff.size else 0.0,
        "unit": unit,
        "passed": bool(max_diff <= tol and beyond == 0),
    }
    if labels is not None and len(labels) == len(g1):
        row["top1_vs_labels"] = round(float(np.mean(g1 == labels)), 6)
    return row


def check_preprocessing(bundle_dir, manifest, samples):
    """Rebuild the int8 inputs from the raw images with the preprocessing record."""
    import numpy as np
    if "raw" not in samples:
        return None
    where = verify_file(manifest, "preprocessing", bundle_dir)
    pre = read_json_object(where)
    q = _field(pre, "input_quantization", where, "object")
    _field(q, "dtype", where + " input_quantization", "string")
    for key in ("scale", "input_quantization.scale"):
        if not _field(pre, key, where, "number") > 0:
            raise _bad(where, key, "must be positive")
    _field(pre, "input_quantization.zero_point", where, "int")
    for key in ("mean", "std"):
        v = pre.get(key)
        if not (isinstance(v, list) and 1 <= len(v) <= 64 and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                          and math.isfinite(a) for a in v)):
            raise _bad(where, key, "is %s, not a list of 1 to 64 finite numbers" % _show(v))
    if not all(a > 0 for a in pre["std"]):
        raise _bad(where, "std", "must be positive")
    if pre.get("tflite_input_layout", "NHWC") not in ("NHWC", "NCHW"):
        raise _bad(where, "tflite_input_layout", "is %s, not NHWC or NCHW" % _show(pre.get("tflite_input_layout")))
    if samples["raw"].ndim != 4:
        raise BadInput("the bundle's raw samples are %s, not N×C×H×W; %s" % (list(samples["raw"].shape), BUNDLE_FIX))
    try:
        raw = samples["raw"].astype(np.float32)  # N, C, H, W
        x = raw * np.float32(pre["scale"])
        mean = np.asarray(pre["mean"], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(pre["std"], np.float32).reshape(1, -1, 1, 1)
        x = ((x - mean) / std).astype(np.float32)
        if pre.get("tflite_input_layout", "NHWC") == "NHWC":
            x = np.transpose(x, (0, 2, 3, 1))
        dtype = np.dtype(q["dtype"])
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            qx = np.clip(np.round(x / np.float32(q["scale"])) + int(q["zero_point"]), info.min, info.max)
            step = 1.0
        else:  # a float model input: no quantization; compare in units of 1/255 of the raw scale
            qx, step = x, float(pre["scale"]) / float(min(pre["std"])) / 255.0 if pre["std"] else 1.0
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput("cannot apply the bundle's preprocessing record (%s: %s); copy the bundle again"
                       % (type(e).__name__, e)) from None
    want = samples["input_int8"].astype(np.float64)
    if qx.shape != want.shape:
        return {"samples": int(len(raw)), "passed": False, "max_diff_steps": None,
                "error": "rebuilt inputs are %s, the bundled int8 inputs %s" % (list(qx.shape), list(want.shape))}
    d = np.abs(qx.astype(np.float64) - want) / step
    return {"samples": int(len(raw)), "max_diff_steps": float(d.max()) if d.size else 0.0,
            "values_differing": round(float(np.mean(d > 0)), 6) if d.size else 0.0,
            "formula": pre.get("formula"), "passed": bool(d.size == 0 or d.max() <= 1)}


# --------------------------------------------------------------------------- CLI

def _int_list(text, flag):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput("%s %r is not a comma-separated list of positive integers (e.g. 1,2,4)" % (flag, text)) from None
    if not vals or any(v < 1 for v in vals):
        raise BadInput("%s %r is not a comma-separated list of positive integers (e.g. 1,2,4)" % (flag, text))
    return list(dict.fromkeys(vals))


def _kernel_list(text):
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    if names == ["all"]:
        return list(KERNELS)
    bad = [n for n in names if n not in KERNELS]
    if not names or bad:
        raise BadInput("--kernels %r: unknown %s; choose from %s (or all)"
                       % (text, ", ".join(bad) or "empty list", ",".join(KERNELS)))
    return list(dict.fromkeys(names))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput("%s; see %s --help" % (message, self.prog))


def build_parser():
    p = _Parser(prog="pi_benchmark.py", description=__doc__.split("\n\n")[0],
                epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="the .tflite model (default: the bundle's model beside this script)")
    p.add_argument("--threads", default="1,2,4", help="comma-separated thread counts (default 1,2,4)")
    p.add_argument("--kernels", default="xnnpack,builtin",
                   help="comma-separated: xnnpack (BUILTIN + default XNNPACK delegate), builtin "
                        "(BUILTIN_WITHOUT_DEFAULT_DELEGATES), ref (BUILTIN_REF), or all (default xnnpack,builtin)")
    p.add_argument("--warmup", type=int, default=1, help="minimum warm-up runs, the first included (default 1)")
    p.add_argument("--warmup-secs", type=float, default=0.5, help="minimum warm-up seconds (default 0.5)")
    p.add_argument("--runs", type=int, default=50, help="minimum timed runs (default 50)")
    p.add_argument("--min-secs", type=float, default=1.0, help="minimum timed seconds (default 1)")
    p.add_argument("--max-secs", type=float, default=150.0, help="cap on warm-up and timed seconds each (default 150)")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--check", action="store_true",
                   help="first run the bundle's samples and compare with the host's recorded outputs")
    p.add_argument("--check-only", action="store_true", help="run the check and skip the timing sweep")
    p.add_argument("--tolerance-steps", type=float, default=None,
                   help="largest allowed output difference in quantization steps for --check (default: the bundle's, 1)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def _validate(args):
    args.threads = _int_list(args.threads, "--threads")
    args.kernels = _kernel_list(args.kernels)
    if args.warmup < 1:
        raise BadInput("--warmup must be at least 1 (the first inference is a warm-up run)")
    if args.runs < 1:
        raise BadInput("--runs must be at least 1")
    for flag, v in (("--warmup-secs", args.warmup_secs), ("--min-secs", args.min_secs)):
        if not (v >= 0 and math.isfinite(v)):
            raise BadInput("%s must be a number of seconds >= 0" % flag)
    if not (args.max_secs > 0 and math.isfinite(args.max_secs)):
        raise BadInput("--max-secs must be a positive number of seconds")
    if args.tolerance_steps is not None and not (args.tolerance_steps >= 0):
        raise BadInput("--tolerance-steps must be >= 0")
    if args.check_only:
        args.check = True
    script_dir = os.path.dirname(os.path.abspath(__file__))
    if args.model is None:
        if not os.path.isfile(os.path.join(script_dir, BUNDLE_MANIFEST)):
            raise BadInput("no model given and no bundle.json beside this script; pass path/to/model.tflite")
        args.model = read_manifest(script_dir)["_files"]["model.path"]
    m = args.model
    if not os.path.exists(m):
        raise BadInput("model %s does not exist; pass path/to/model.tflite" % m)
    if not os.path.isfile(m):
        raise BadInput("model %s is not a file; pass path/to/model.tflite" % m)
    try:
        with open(m, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise BadInput("cannot read model %s (%s); fix its permissions" % (m, e.strerror or e)) from None
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise BadInput("%s is not a TFLite flatbuffer (no TFL3 identifier); pass a .tflite model" % m)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json)) or "."
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise BadInput("cannot write --json %s: folder %s is missing or not writable" % (args.json, d))
        if os.path.isdir(args.json):
            raise BadInput("--json %s is a folder; pass a file path" % args.json)
    args.bundle = find_bundle(m, script_dir)
    if args.check and args.bundle is None:
        raise BadInput("--check needs the bundle (bundle.json, samples.npz, expected_outputs.npz) beside the model "
                       "or this script; copy the whole bundle folder")
    return args


def model_facts(mod, path):
    interp = make_interpreter(mod, path, "builtin", 1)
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "sha256": _sha256(path),
        "inputs": [tensor_facts(d) for d in interp.get_input_details()],
        "outputs": [tensor_facts(d) for d in interp.get_output_details()],
    }


def print_table(rows, out=sys.stdout):
    head = ("kernels", "thr", "init ms", "first ms", "warm ms", "count", "mean us", "std us", "min us", "p50 us",
            "p90 us", "p99 us", "max us", "inf/s", "peak RSS MiB")
    lines = [head]
    for r in rows:
        mib = "%.1f" % (r["rss_peak_kib"] / 1024.0) if r.get("rss_peak_kib") else "-"
        lines.append((r["kernels"], str(r["threads"]), "%.2f" % (r["init_us"] / 1e3), "%.2f" % (r["first_us"] / 1e3),
                      "%.2f" % (r["warmup_mean_us"] / 1e3), str(r["count"])) +
                     tuple("%.1f" % r[k] for k in ("mean_us", "std_us", "min_us", "p50_us", "p90_us", "p99_us", "max_us"))
                     + ("%.1f" % r["throughput_per_s"], mib))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        out.write("  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--_worker":
        spec = json.loads(argv[1])
        result = worker(spec)
        _write_json_atomic(spec["result"], _clean(result))
        return 0
    try:
        try:
            import numpy  # noqa: F401
        except ImportError:
            raise BadInput("numpy cannot be imported; install it with pip install -r requirements.txt") from None
        args = _validate(build_parser().parse_args(argv))
        rt_name, rt_version, mod = load_runtime()
        return run(args, rt_name, rt_version, mod)
    except (BadInput, CheckFailed) as e:
        print("error: %s" % " ".join(str(e).split()), file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run(args, rt_name, rt_version, mod):
    import numpy as np
    script = os.path.abspath(__file__)
    manifest = read_manifest(args.bundle) if args.bundle else None
    if manifest is not None and os.path.realpath(args.model) == manifest["_files"]["model.path"]:
        verify_file(manifest, "model.path", args.bundle)  # the bundle's own model: exactly the one it records
    try:
        model = model_facts(mod, os.path.abspath(args.model))
    except Exception as e:
        raise BadInput("%s cannot load %s (%s); use a newer runtime (pip install -U ai-edge-litert) or re-export "
                       "the model" % (rt_name, args.model, (str(e).strip().splitlines() or [type(e).__name__])[0][:200])) from None
    doc = {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "device": device_facts(),
        "versions": {"python": platform.python_version(), "python_implementation": platform.python_implementation(),
                     "numpy": np.__version__, "runtime": rt_name, "runtime_version": rt_version,
                     "script": SCHEMA_VERSION},
        "model": model,
        "bundle": ({"path": args.bundle, "created_by": manifest.get("created_by"), "model_spec": manifest.get("model_spec"),
                    "class_names": manifest.get("class_names")}
                   if manifest else None),
        "config": {"threads": args.threads, "kernels": args.kernels, "op_resolvers": {k: KERNELS[k] for k in args.kernels},
                   "warmup": args.warmup, "warmup_secs": args.warmup_secs, "runs": args.runs, "min_secs": args.min_secs,
                   "max_secs": args.max_secs, "timed": TIMED,
                   "isolation": "each (kernels, threads) setting runs in a fresh subprocess of this script, so "
                                "rss_peak_kib (VmHWM) is that setting's own peak, including Python, numpy and the runtime",
                   "check": bool(args.check)},
        "conditions": {"before": conditions(), "after": None},
        "results": [],
        "check": None,
        "passed": None,
        "measured_on": "this device (%s)" % (doc_board() or platform.machine()),
    }
    d = doc["device"]
    print("device   %s | %s | %s | kernel %s | governor %s" % (
        d["board"] or "unknown board", d["cpu"] or d["machine"], d["os"] or "unknown OS", d["kernel"],
        d["governor"] if isinstance(d["governor"], str) else ("unknown" if d["governor"] is None else "mixed")))
    print("runtime  %s %s, Python %s, numpy %s" % (rt_name, rt_version, platform.python_version(), np.__version__))
    print("model    %s (%d bytes, input %s %s)" % (os.path.basename(args.model), model["bytes"],
                                                  model["inputs"][0]["dtype"], model["inputs"][0]["shape"]))
    status = 0
    if args.check:
        doc["check"] = check(args, os.path.abspath(args.model), args.bundle, manifest, script)
        c = doc["check"]
        pp = c["preprocessing"]
        print("check    %d samples, tolerance %s steps, threads %d%s" % (
            c["samples"], c["tolerance_steps"], c["threads"],
            "" if pp is None else ", preprocessing record rebuilds the int8 inputs: %s (max %s steps)"
            % ("yes" if pp["passed"] else "NO", pp["max_diff_steps"])))
        for r in c["kernels"]:
            print("         %-8s vs %-12s top-1 agreement %s  max diff %s steps  values differing %s  %s" % (
                r["kernels"], r["compared_with"], _pct(r.get("top1_agreement")), r.get("max_diff_steps"),
                _pct(r.get("values_differing")), "ok" if r["passed"] else "FAIL"))
        pr = c.get("predictions")
        if pr:
            names = manifest.get("class_names")
            print("predict  first %d samples on %s: %s" % (
                len(pr["samples"]), pr["kernels"], "; ".join(
                    "#%d %s%s" % (r["sample"], class_label(names, r["class"]),
                                  "" if "label" not in r else (" = label" if r["label"] == r["class"]
                                                               else ", label %s" % class_label(names, r["label"])))
                    for r in pr["samples"])))
        print("check    %s" % ("PASS" if c["passed"] else "FAIL: " + "; ".join(c["failures"])))
        if not c["passed"]:
            status = 1
    if not args.check_only and status == 0:
        sample_path = None
        with tempfile.TemporaryDirectory(prefix="pi_bench-") as tmp:
            if args.bundle:
                s = load_npz(verify_file(manifest, "samples.path", args.bundle), "samples")
                if "input_int8" in s and s["input_int8"].ndim >= 1 and len(s["input_int8"]):
                    sample_path = os.path.join(tmp, "sample.npy")
                    np.save(sample_path, s["input_int8"][:1])
            timeout = args.warmup_secs + 2 * args.max_secs + 300
            for k in args.kernels:
                for t in args.threads:
                    spec = {"mode": "bench", "model": os.path.abspath(args.model), "kernels": k, "threads": t,
                            "warmup": args.warmup, "warmup_secs": args.warmup_secs, "runs": args.runs,
                            "min_secs": args.min_secs, "max_secs": args.max_secs, "sample": sample_path}
                    res, log = run_worker(script, spec, timeout)
                    res["runtime_log"] = log
                    doc["results"].append(res)
                    sys.stdout.flush()
                    sys.stderr.write("  measured kernels=%s threads=%d: mean %.1f us\n" % (k, t, res["mean_us"]))
                    sys.stderr.flush()
        print()
        print_table(doc["results"])
        print("(us per invoke(), batch %s; each setting in its own process; peak RSS = that process's VmHWM)"
              % (doc["results"][0]["batch"] if doc["results"] else "?"))
        if any(r["kernels"] == "xnnpack" and r["delegate_applied"] is False for r in doc["results"]):
            print("note: with kernels=xnnpack, %s %s did not apply the XNNPACK delegate to this model: those rows "
                  "ran the built-in kernels" % (rt_name, rt_version))
    doc["conditions"]["after"] = conditions()
    thr = doc["conditions"]["after"]["throttled"]
    if thr and thr["flags"]:
        print("warning: the board reports %s; timings may be throttled" % ", ".join(thr["flags"]), file=sys.stderr)
    doc["passed"] = status == 0
    if args.json:
        _write_json_atomic(args.json, _clean(doc))
        print("wrote %s" % args.json)
    return status


def doc_board():
    return _read("/proc/device-tree/model")


if __name__ == "__main__":
    sys.exit(main())
