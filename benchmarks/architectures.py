"""torchvision and timm classification architectures through this pipeline and the plain onnx2tf CLI.

Needs the ``bench`` extra (torchvision 0.28.0, timm 1.0.31; no CUDA packages come along and torch stays 2.13.0
CPU, checked with ``pip install --dry-run -e '.[bench]'``):

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/architectures.py --archs resnet18,googlenet --train-steps 60
    .venv/bin/python benchmarks/architectures.py --quick          # 3 architectures, small eval
    .venv/bin/python benchmarks/architectures.py --archs all      # every entry of benchmarks/arch_models.py

For each architecture (``benchmarks/arch_models.py``; 3x64x64 RGB, 10 classes):

1. optionally (``--train-steps N``) a brief fine-tune on Fashion-MNIST (RGB 64x64) in a fresh process, saving a
   plain state dict, so agreement means something; without it the factory's seeded random init is exported
   (no ``--weights``) and its agreement says little (random nets often output near-constant logits);
2. for each ``--converters`` name (default: the pipeline's converter registry, plus ``auto`` if it offers one):
   ``python -m pipeline.export --model benchmarks.arch_models:NAME --input-shape 3,64,64 --data <npz>`` in a fresh
   process with a timeout; ``report.json`` gives fully_int8, converter, agreement, max error in output steps;
3. the peers (``--peers``, default both): the onnx2tf 1.28 CLI (TensorFlow's converter), ``onnx2tf -i model.onnx
   -oiqt -cind input calib.npy MEAN STD``, and the onnx2tf 2.x CLI (``.venv/routes/onnx2tf2``, its default
   TensorFlow-free ``flatbuffer_direct`` backend) with the same flags, run network-locked the way the pipeline's
   own onnx2tf 2.x child runs (its ``sitecustomize`` plus ``unshare -n``); each with the network
   blocked on the SAME ``model.onnx`` the export wrote (when the export failed before writing its
   folder, the ONNX is written by the pipeline's own stage-1 code ``pipeline.conversion.onnx_export.export_onnx`` in a fresh
   process, from the same seeded factory and weights), calibrated on the export's own representative set (rebuilt
   with ``calib_data.build`` from the same source, size and seed); its ``*_full_integer_quant.tflite`` is inspected
   with ``pipeline.tflite.inspect`` and run (in a fresh process) with ``pipeline.runtime.litert.TfliteRunner`` against
   onnxruntime FP32 on the same test images.

A run that dies of a signal is recorded with the signal's name; the benchmark goes on. At most one conversion runs
at a time. Results: ``--json`` and ``--md`` (default under ``--work``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
QUICK_ARCHS = "mobilenet_v2,resnet18,shufflenet_v2_x1_0"
DEFAULT_ARCHS = ("resnet18,googlenet,shufflenet_v2_x1_0,mobilevit_xxs,efficientformerv2_s0,levit_128s,fastvit_t8,"
                 "edgenext_xx_small,mobilenet_v2,mobilenet_v3_small,efficientnet_b0,squeezenet1_1,mnasnet0_5,"
                 "mobilenetv4_conv_small,mobileone_s0,repvgg_a0")
MEAN, STD = 0.286, 0.353
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # --imagenet


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# --------------------------------------------------------------------------- helpers

def available_converters(repo: Path) -> list[str]:
    """The names ``--converter`` accepts (the pipeline's registry), ``auto`` included when offered."""
    code = "import json; from pipeline.conversion import AUTO, routes; print(json.dumps([AUTO, *routes()]))"
    p = subprocess.run([PY, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    try:
        names = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception:
        names = ["onnx2tf"]
    helptext = subprocess.run([PY, "-m", "pipeline.export", "--help"], cwd=repo, capture_output=True,
                              text=True, timeout=120).stdout
    if "auto" not in names and re.search(r"--converter[^\n]*\n?[^\n]*\bauto\b", helptext):
        names.append("auto")
    return names


def build_data(cache: Path, n_train: int, n_test: int, size: int = 64) -> Path:
    """Fashion-MNIST as RGB size x size uint8 NCHW in an npz (built once)."""
    import numpy as np
    path = cache / f"fmnist_rgb{size}_{n_train}_{n_test}.npz"
    if path.is_file():
        return path
    from benchmarks.arch_models import fmnist_rgb
    cache.mkdir(parents=True, exist_ok=True)
    xtr, ytr = fmnist_rgb("train", size, limit=n_train)
    xte, yte = fmnist_rgb("test", size, limit=n_test)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    tmp.replace(path)
    return path


def run_proc(cmd: list[str], cwd: Path, timeout: float, logfile: Path, env: dict | None = None) -> dict:
    """Run a command in a fresh process group; returncode, signal name, seconds, timed_out; output into logfile."""
    t0 = time.perf_counter()
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out, peak = False, 0
        while True:  # sampled every 0.2 s: the summed RSS of the process and its children (conversion workers)
            try:
                rc = p.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                peak = max(peak, _tree_rss(p.pid))
                if time.perf_counter() - t0 > timeout:
                    timed_out = True
                    os.killpg(p.pid, signal.SIGKILL)
                    rc = p.wait()
                    break
    sig = None
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
    return {"returncode": rc, "signal": sig, "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(peak / 2 ** 20)}


def _tree_rss(pid: int) -> int:
    import psutil
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


NOISE = re.compile(r"^(\s*$|\[\d/\d\]|Traceback|  File |    |WARNING: All log messages|I0000|W0000|E0000)")



def _failure(pr: dict, log, timeout: float, otherwise) -> str:
    """One line for a run that wrote no model: the signal that killed it, the timeout, or ``otherwise()``."""
    if pr["signal"]:
        return f"killed by {pr['signal']}: " + failure_line(log)
    if pr["timed_out"]:
        return f"timed out after {timeout:.0f}s"
    return otherwise()

def failure_line(logfile: Path) -> str:
    """The line that says why a run failed: the pipeline's own one-line error, a signal, or the last message."""
    try:
        lines = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keys = ("error", "failed", "fail", "abort", "signal", "not supported", "neither", "cannot", "killed", "died",
            "exception")
    for ln in reversed(lines):
        s = ln.strip()
        if s and not NOISE.match(ln) and any(k in s.lower() for k in keys):
            return s[:400]
    for ln in reversed(lines):
        if ln.strip() and not NOISE.match(ln):
            return ln.strip()[:400]
    return ""


def peer_failure_line(logfile: Path) -> str:
    """onnx2tf CLI: the exception behind 'Full INT8 Quantization tflite output failed', else its first real error
    (its FileNotFoundError for the onnxsim binary it cannot find is skipped: it only skips simplification)."""
    try:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in logfile.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    err = re.compile(r"^[\w.]*(Error|Exception)\b.*:")
    for i, ln in enumerate(lines):
        if "Full INT8 Quantization tflite output failed" in ln:
            for prev in reversed(lines[:i]):
                if err.match(prev):
                    if len(prev) > 300:  # keep the end too: "... Node number 45 (FlexConv2D) failed to prepare."
                        prev = prev[:120] + " ... " + prev[-160:]
                    return prev + " (then: " + ln + ")"
            return ln
    for ln in lines:
        if err.match(ln) and "onnxsim" not in ln:
            return ln[:400]
    return failure_line(logfile)


def onnx_ops(path: Path) -> dict:
    import onnx
    g = onnx.load(str(path), load_external_data=False).graph
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return dict(sorted(ops.items()))


# --------------------------------------------------------------------------- child modes (fresh processes)

def child_onnx(name: str, weights: str | None, data: str, out: str) -> int:
    """Write the model's ONNX exactly as the export's stage 1 does (used when the export wrote nothing)."""
    import numpy as np
    from pipeline.inputs import models
    from pipeline.inputs import preprocessing
    from pipeline.conversion.onnx_export import export_onnx
    with np.load(data, allow_pickle=False) as z:
        x = z["x_train"][:32]
    pre = preprocessing.Preprocessing(input_shape=(3, 64, 64), source_layout="NCHW", source_dtype="uint8",
                                      scale=1 / 255, mean=(MEAN,) * 3, std=(STD,) * 3)
    sample = preprocessing.apply(x, pre).astype(np.float32)
    loaded = models.load(f"benchmarks.arch_models:{name}", weights)
    art = export_onnx(loaded, sample, Path(out))
    print(json.dumps({"max_abs_error_vs_pytorch": art.max_abs_error}))
    return 0


def child_calib(report_path: str, data: str, out: str, calib_size: int) -> int:
    """The export's representative set (same source, size, seed) as the raw [0,1] NHWC float32 .npy -cind wants."""
    import numpy as np
    from pipeline.calib_data import CalibContext, build
    from pipeline.inputs import data as data_mod
    from pipeline.inputs import preprocessing
    if report_path and Path(report_path).is_file():
        rep = json.loads(Path(report_path).read_text())
        pre = preprocessing.Preprocessing.from_dict(rep["preprocessing"])
        spec, size, seed = rep["config"]["calib"], rep["config"]["calib_size"], rep["config"]["seed"]
    else:
        pre = preprocessing.Preprocessing(input_shape=(3, 64, 64), source_layout="NCHW", source_dtype="uint8",
                                          scale=1 / 255, mean=(MEAN,) * 3, std=(STD,) * 3)
        spec, size, seed = "balanced", calib_size, 0
    ds = data_mod.load(data, None, (3, 64, 64))
    src = build(spec, CalibContext(x_train=ds.x_train, y_train=ds.y_train, preprocessing=pre, dataset_name=ds.name),
                size, seed)
    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    raw01 = src.array() * std[None, :, None, None] + mean[None, :, None, None]
    np.save(out, np.ascontiguousarray(raw01.transpose(0, 2, 3, 1)).astype(np.float32), allow_pickle=False)
    print(json.dumps({"calibration": src.describe().get("source"), "samples": int(len(raw01))}))
    return 0


def child_peer_eval(tflite: str, onnx_path: str, data: str, out: str, limit: int) -> int:
    """Inspect the peer's int8 file and run it on LiteRT against onnxruntime FP32 (separate process: may abort)."""
    import numpy as np
    import onnxruntime as ort
    from pipeline.inputs import preprocessing
    from pipeline.tflite.inspect import inspect
    from pipeline.runtime.litert import TfliteRunner
    res: dict = {}
    insp = inspect(Path(tflite))
    res["fully_int8"] = bool(insp.fully_int8)
    res["offending"] = list(insp.offending)[:8]
    res["ops"] = dict(insp.ops)
    res["io"] = f"{insp.input_dtype}->{insp.output_dtype}"
    Path(out).write_text(json.dumps(res))  # what is known even if running aborts
    with np.load(data, allow_pickle=False) as z:
        x, y = z["x_test"][:limit], z["y_test"][:limit]
    pre = preprocessing.Preprocessing(input_shape=(3, 64, 64), source_layout="NCHW", source_dtype="uint8",
                                      scale=1 / 255, mean=(MEAN,) * 3, std=(STD,) * 3)
    xn = preprocessing.apply(x, pre).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    fp32 = np.concatenate([sess.run(None, {iname: xn[i:i + 250]})[0] for i in range(0, len(xn), 250)])
    shape = [int(v) for v in insp.inputs[0].shape]
    layout = "NHWC" if shape[-1] == 3 else "NCHW"
    runner = TfliteRunner(Path(tflite), kernels="xnnpack", threads=1, batch_size=250, input_layout=layout)
    r = runner.run(xn)
    q = r.outputs
    scale = float(runner.out_scale) if np.issubdtype(runner.out["dtype"], np.integer) else None
    err = float(np.abs(q - fp32).max())
    res.update({
        "agreement": float((q.argmax(1) == fp32.argmax(1)).mean()),
        "fp32_top1": float((fp32.argmax(1) == y).mean()), "int8_top1": float((q.argmax(1) == y).mean()),
        "max_abs_error": err, "max_error_steps": (err / scale) if scale else None, "batch_size": r.batch_size,
        "input_layout": layout, "evaluated": int(len(xn)),
    })
    Path(out).write_text(json.dumps(res))
    return 0


# --------------------------------------------------------------------------- one architecture

def train_weights(name: str, steps: int, work: Path, repo: Path, timeout: float) -> tuple[str | None, dict]:
    wdir = work / "weights"
    w = wdir / f"{name}-{steps}-bnrecal.pt"  # the name changes with the recipe (BN recalibrated after training)
    meta = wdir / f"{name}-{steps}-bnrecal.json"
    if w.is_file() and meta.is_file():
        return str(w), json.loads(meta.read_text())
    code = (f"import json,sys; sys.path.insert(0, {str(repo)!r}); from benchmarks.arch_models import train;"
            f"r = train({name!r}, {steps}, __import__('pathlib').Path({str(w)!r}), log=lambda m: None);"
            f"open({str(meta)!r}, 'w').write(json.dumps(r))")
    pr = run_proc([PY, "-c", code], repo, timeout, work / "logs" / f"{name}.train.log")
    if pr["returncode"] != 0 or not meta.is_file():
        return None, {"failed": failure_line(work / "logs" / f"{name}.train.log"), **pr}
    return str(w), json.loads(meta.read_text())


def bench_export(name: str, conv: str, weights: str | None, data: Path, args, work: Path, repo: Path) -> dict:
    out = work / "runs" / name / conv
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.imagenet else ((MEAN,) * 3, (STD,) * 3)
    cmd = [PY, "-m", "pipeline.export", "--model", f"benchmarks.arch_models:{name}", "--input-shape",
           f"3,{args.size},{args.size}", "--data", str(data), "--mean", ",".join(map(str, mean)),
           "--std", ",".join(map(str, std)),
           "--calib-size", str(args.calib_size), "--eval-limit", str(args.eval_limit), "--converter", conv,
           "--calib-cache", "off", "--out", str(out)]
    if weights:
        cmd += ["--weights", weights]
    if args.verbose_tools:
        cmd.append("-v")
    lf = work / "logs" / f"{name}.{conv}.log"
    pr = run_proc(cmd, repo, args.timeout, lf)
    row = {"arch": name, "route": f"pipeline --converter {conv}", "kind": "pipeline",
           "input": f"3x{args.size}x{args.size}" + (" (ImageNet mean/std)" if args.imagenet else ""),
           "weights": "fine-tuned" if weights else "random-init", "returncode": pr["returncode"],
           "signal": pr["signal"], "timed_out": pr["timed_out"], "time_s": pr["seconds"],
           "peak_rss_mib": pr["peak_rss_mib"], "log": str(lf)}
    rep_path = out / "report.json"
    if rep_path.is_file():
        row.update(from_report(rep_path))
    else:
        row["fully_int8"] = False
        row["failure"] = _failure(pr, lf, args.timeout, lambda: with_signal_name(failure_line(lf)))
    return row


def from_report(rep_path: Path) -> dict:
    """A pipeline row's figures from its report.json: route kept, rewrites, recovery, accuracy, gates."""
    rep = json.loads(rep_path.read_text())
    acc, q, conv = rep.get("accuracy", {}), rep.get("quantization", {}), rep.get("conversion", {})
    rewrites = [r["name"] for r in [*rep.get("onnx", {}).get("rewrites", []), *conv.get("rewrites", [])]]
    row = {
        "fully_int8": q.get("fully_int8"), "converter": conv.get("converter"),
        "routes_tried": [f"{r.get('route')}: {'kept' if r.get('kept') else r.get('reason', '')}"
                         for r in conv.get("routes_tried", [])],
        "rewrites": rewrites, "recovered": (rep.get("recovery") or {}).get("kept"),
        "agreement": acc.get("agreement"), "max_error_steps": acc.get("max_error_steps"),
        "fp32_top1": acc.get("fp32_top1"), "int8_top1": acc.get("int8_top1"),
        "tflite_ops": q.get("ops"), "onnx": str(rep_path.parent / "model.onnx"), "report": str(rep_path),
        "gates_failed": [k for k, g in rep.get("gates", {}).items() if isinstance(g, dict) and not g.get("passed")],
        "pipeline_time_s": rep.get("timings_s", {}).get("total"),
    }
    if row["gates_failed"]:
        row["note"] = "gates failed: " + ",".join(row["gates_failed"])
    return row


def with_signal_name(line: str) -> str:
    """'... died (exit code -6) ...' -> '... died (exit code -6 = SIGABRT) ...' (a worker killed by a signal)."""
    def name(m):
        try:
            return f"{m.group(0)} = {signal.Signals(int(m.group(1))).name}"
        except ValueError:
            return m.group(0)
    return re.sub(r"exit code -(\d+)(?! =)", name, line)


PEERS = {"1.28": "peer: onnx2tf 1.28 CLI -oiqt", "2.x": "peer: onnx2tf 2.x CLI -oiqt (flatbuffer_direct)"}


def peer_command(peer: str, argv: list[str], pdir: Path) -> tuple[list[str], dict, str]:
    """(command, environment, how the network is blocked) for one onnx2tf CLI peer."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="2")
    if peer == "2.x":
        from pipeline.conversion.onnx2tf_flatbuffer import DEFAULT_ROUTE_DIR, child_command
        if not (DEFAULT_ROUTE_DIR / "onnx2tf" / "__main__.py").is_file():
            raise FileNotFoundError(f"onnx2tf 2.x is not installed in {DEFAULT_ROUTE_DIR} (./setup.sh --install-only)")
        cmd, lock_env = child_command(["-m", "onnx2tf", *argv], pdir / "lock")
        env.update(lock_env)
        env["PYTHONPATH"] = os.pathsep.join([str(DEFAULT_ROUTE_DIR), lock_env["PYTHONPATH"]])
        env["PATH"] = os.pathsep.join([str(DEFAULT_ROUTE_DIR / "bin"), env.get("PATH", os.defpath)])
        how = "blocked (sitecustomize" + (" + unshare -n)" if cmd[0] == "unshare" else ")")
        return cmd, env, how
    cmd = [str(Path(PY).with_name("onnx2tf")), *argv]
    if shutil.which("unshare"):
        return ["unshare", "-n"] + cmd, env, "blocked (unshare -n)"  # onnx2tf must not fetch its sample data
    return cmd, env, "not blocked (no unshare)"


def bench_peer(name: str, onnx_path: Path, report: Path | None, data: Path, args, work: Path, repo: Path,
               peer: str = "1.28") -> dict:
    tag = "" if peer == "1.28" else "-2x"
    pdir = work / "runs" / name / f"peer-onnx2tf{tag}"
    if pdir.exists():
        shutil.rmtree(pdir)
    pdir.mkdir(parents=True)
    row = {"arch": name, "route": PEERS[peer], "kind": "peer", "input": "3x64x64", "onnx": str(onnx_path)}
    calib = pdir / "calib_nhwc.npy"
    pr = run_proc([PY, str(Path(__file__).resolve()), "--_child", "calib", str(report or ""), str(data), str(calib),
                   str(args.calib_size)], repo, 600, work / "logs" / f"{name}.peer-calib.log")
    if pr["returncode"] != 0:
        row.update(fully_int8=False, failure="calibration set: " + failure_line(work / "logs" / f"{name}.peer-calib.log"))
        return row
    import onnx
    iname = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name
    m, s = json.dumps([[[[MEAN] * 3]]]), json.dumps([[[[STD] * 3]]])
    try:
        cmd, env, row["network"] = peer_command(peer, ["-i", str(onnx_path), "-o", str(pdir / "out"), "-oiqt",
                                                       "-cind", iname, str(calib), m, s], pdir)
    except FileNotFoundError as e:
        row.update(fully_int8=False, failure=str(e))
        return row
    lf = work / "logs" / f"{name}.peer{tag}.log"
    pr = run_proc(cmd, pdir, args.timeout, lf, env=env)
    row.update(returncode=pr["returncode"], signal=pr["signal"], timed_out=pr["timed_out"], time_s=pr["seconds"],
               log=str(lf))
    files = sorted((pdir / "out").glob("*full_integer_quant.tflite")) if (pdir / "out").exists() else []
    files = [f for f in files if "with_int16_act" not in f.name]
    if not files:
        row["fully_int8"] = False
        row["failure"] = _failure(pr, lf, args.timeout,
                                  lambda: "no *_full_integer_quant.tflite: " + peer_failure_line(lf))
        return row
    row["tflite"] = str(files[0])
    res_path = pdir / "eval.json"
    lf2 = work / "logs" / f"{name}.peer{tag}-eval.log"
    pe = run_proc([PY, str(Path(__file__).resolve()), "--_child", "peer_eval", str(files[0]), str(onnx_path),
                   str(data), str(res_path), str(args.eval_limit)], repo, args.timeout, lf2)
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    row.update({k: res.get(k) for k in ("fully_int8", "agreement", "max_error_steps", "fp32_top1", "int8_top1", "io")})
    row["tflite_ops"] = res.get("ops")
    if res.get("offending"):
        row["note"] = "not int8: " + "; ".join(res["offending"][:3])
    if pe["returncode"] != 0:
        why = f"killed by {pe['signal']}" if pe["signal"] else f"exit {pe['returncode']}"
        row["failure"] = f"running the peer's int8 file on LiteRT: {why}: " + failure_line(lf2)
    return row


# --------------------------------------------------------------------------- tables

def fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def markdown(rows: list[dict], meta: dict) -> str:
    head = ["arch", "input", "weights", "route/peer", "fully int8", "kept route", "rewrites", "agreement",
            "max error steps", "time s", "peak RSS MiB", "FP32 top-1", "failure reason"]
    out = [f"Measured {meta['date']} on {meta['host']}; pipeline checkout {meta['repo']}; eval {meta['eval_limit']} "
           f"test images, {meta['calib_size']} calibration images (Fashion-MNIST as RGB {meta.get('size', 64)}x"
           f"{meta.get('size', 64)}{', ImageNet mean/std' if meta.get('imagenet') else ''}); peak RSS: the export "
           "and its workers together, sampled every 0.2 s; weights: "
           f"{'fine-tuned ' + str(meta['train_steps']) + ' steps' if meta.get('train_steps') else 'seeded random init'}"
           " (an FP32 top-1 near 10% makes agreement meaningless).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        why = r.get("failure") or r.get("note") or ""
        why = why.replace("|", "\\|").replace("\n", " ")[:220]
        kept = (r.get("converter") or "-") + (f" (recovered: {r['recovered']})" if r.get("recovered") else "")
        out.append("| " + " | ".join([r["arch"], r.get("input", ""), r.get("weights", "-"), r["route"],
                                       fmt(r.get("fully_int8")), kept, ", ".join(r.get("rewrites") or []) or "-",
                                       fmt(r.get("agreement")),
                                       fmt(r.get("max_error_steps"), 1), fmt(r.get("time_s"), 1),
                                       fmt(r.get("peak_rss_mib")), fmt(r.get("fp32_top1")), why]) + " |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main

def render(json_path: Path) -> int:
    """The markdown table of a results file; rows whose report.json is still there are refreshed from it."""
    res = json.loads(json_path.read_text())
    rows = res["rows"]
    for r in rows:
        if r.get("kind") == "pipeline" and r.get("report") and Path(r["report"]).is_file():
            r.update(from_report(Path(r["report"])))
    print(markdown(rows, res["meta"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        mode, rest = argv[1], argv[2:]
        if mode == "onnx":
            return child_onnx(rest[0], rest[1] or None, rest[2], rest[3])
        if mode == "calib":
            return child_calib(rest[0], rest[1], rest[2], int(rest[3]))
        if mode == "peer_eval":
            return child_peer_eval(rest[0], rest[1], rest[2], rest[3], int(rest[4]))
        raise SystemExit(f"unknown child mode {mode}")

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=DEFAULT_ARCHS, help="comma-separated names from benchmarks/arch_models.py, "
                   "or 'all' (default: the 8 known failures and 8 known successes)")
    p.add_argument("--converters", default=None, help="comma-separated --converter names (default: every one "
                   "the pipeline offers, plus auto if offered)")
    p.add_argument("--no-peer", action="store_true", help="skip the onnx2tf CLI peers")
    p.add_argument("--peers", default="1.28,2.x", help="which onnx2tf CLIs run as peers: 1.28, 2.x (default both)")
    p.add_argument("--train-steps", type=int, default=0, help="fine-tune N steps on Fashion-MNIST first (0: "
                   "seeded random init)")
    p.add_argument("--calib-size", type=int, default=200)
    p.add_argument("--eval-limit", type=int, default=1000)
    p.add_argument("--n-train", type=int, default=2000, help="training images in the cached npz")
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64; the peers and "
                   "--train-steps run at 64 only)")
    p.add_argument("--imagenet", action="store_true", help="ImageNet mean/std per channel instead of "
                   "Fashion-MNIST's")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--repo", default=str(ROOT), help="pipeline checkout to run (default: this one)")
    p.add_argument("--work", default="/tmp/arch-bench")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--verbose-tools", action="store_true", help="pass -v to the export (tools' own output in logs)")
    p.add_argument("--quick", action="store_true", help=f"preset: --archs {QUICK_ARCHS} --eval-limit 256 "
                   "--calib-size 100")
    p.add_argument("--render", metavar="JSON", help="print the table of an earlier run's results file, each "
                   "pipeline row re-read from its report.json (no run)")
    args = p.parse_args(argv)
    if args.render:
        return render(Path(args.render))
    if args.quick:
        args.archs, args.eval_limit, args.calib_size = QUICK_ARCHS, 256, 100

    from benchmarks import arch_models
    names = list(arch_models.ARCHS) if args.archs == "all" else [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [n for n in names if n not in arch_models.SPECS]
    if unknown:
        p.error(f"unknown architectures {unknown}; see python benchmarks/arch_models.py --list")
    repo, work = Path(args.repo).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if str(repo) != str(ROOT):  # run the benchmark's model registry from the checkout being measured
        for f in ("torchvision_shim.py", "arch_models.py", "architectures.py"):
            shutil.copy2(ROOT / "benchmarks" / f, repo / "benchmarks" / f)
    converters = ([c.strip() for c in args.converters.split(",") if c.strip()] if args.converters
                  else available_converters(repo))
    if args.size != 64 and (args.train_steps or not args.no_peer):
        p.error("--size other than 64 runs random-init exports only: add --no-peer and drop --train-steps")
    data = build_data(work / "data", args.n_train, args.eval_limit, args.size)
    json_path = Path(args.json) if args.json else work / "architectures.json"
    md_path = Path(args.md) if args.md else work / "architectures.md"
    from pipeline.runtime.litert import host_description
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": host_description(), "repo": str(repo),
            "converters": converters, "eval_limit": args.eval_limit, "calib_size": args.calib_size,
            "size": args.size, "imagenet": args.imagenet,
            "train_steps": args.train_steps, "data": str(data)}
    rows: list[dict] = []
    peers = [] if args.no_peer else [v.strip() for v in args.peers.split(",") if v.strip()]
    if any(v not in PEERS for v in peers):
        p.error(f"--peers takes {', '.join(PEERS)}, not {args.peers!r}")
    log(f"{len(names)} architectures x converters {converters} + peers {peers or 'none'}")
    for name in names:
        weights, train_info = None, None
        if args.train_steps > 0:
            log(f"{name}: fine-tuning {args.train_steps} steps")
            weights, train_info = train_weights(name, args.train_steps, work, repo, args.timeout)
        onnx_path, report = None, None
        for conv in converters:
            log(f"{name}: export --converter {conv}")
            row = bench_export(name, conv, weights, data, args, work, repo)
            if train_info:
                row["training"] = train_info
            rows.append(row)
            log(f"  -> fully_int8={row.get('fully_int8')} agreement={row.get('agreement')} "
                f"{row.get('failure') or ''} ({row['time_s']}s, peak {row.get('peak_rss_mib')} MiB)")
            if onnx_path is None and row.get("onnx") and Path(row["onnx"]).is_file():
                onnx_path, report = Path(row["onnx"]), Path(row["report"])
        if onnx_path is None:
            onnx_path = work / "runs" / name / "stage1" / "model.onnx"
            onnx_path.parent.mkdir(parents=True, exist_ok=True)
            pr = run_proc([PY, str(Path(__file__).resolve()), "--_child", "onnx", name, weights or "", str(data),
                           str(onnx_path)], repo, args.timeout, work / "logs" / f"{name}.onnx.log")
            if pr["returncode"] != 0:
                onnx_path = None
        if onnx_path is not None:
            try:
                for r in rows:
                    if r["arch"] == name:
                        r["onnx_ops"] = onnx_ops(onnx_path)
            except Exception:
                pass
        for peer in peers:
            if onnx_path is None:
                rows.append({"arch": name, "route": PEERS[peer], "kind": "peer",
                             "input": "3x64x64", "fully_int8": False, "failure": "no ONNX file to give it"})
            else:
                log(f"{name}: {PEERS[peer]}")
                row = bench_peer(name, onnx_path, report, data, args, work, repo, peer)
                row["weights"] = "fine-tuned" if weights else "random-init"
                rows.append(row)
                log(f"  -> fully_int8={row.get('fully_int8')} agreement={row.get('agreement')} "
                    f"{row.get('failure') or ''} ({row.get('time_s')}s)")
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        md_path.write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
