"""Export wall time: this pipeline (export + verification + evaluation) vs the plain onnx2tf CLIs ``-oiqt``.

Three fresh processes per repeat, alternating, in the same run, on the same ONNX file and the same calibration
images (the pipeline's own balanced set, handed to onnx2tf as the NHWC float .npy plus mean/std that its
``-cind`` flag wants):

- onnx2tf 1.28 (the venv's; TensorFlow's converter);
- onnx2tf 2.x (``.venv/routes/onnx2tf2``, installed by setup.sh; its default ``flatbuffer_direct`` backend,
  TensorFlow-free), run as ``python -m onnx2tf`` with that folder first on PYTHONPATH and its bin/ on PATH;
- ``python -m pipeline.export`` (its default ``--converter auto``, or ``--converter NAME``).

The pipeline's time includes what the CLIs do not do at all: PyTorch -> ONNX, the onnx.checker/onnxruntime
check, flatbuffer inspection, the int8 and FP32 runs over the whole test split, host latency and the report.
The onnx2tf 2.x process runs network-locked exactly as the pipeline's own onnx2tf 2.x child does (its sitecustomize,
plus ``unshare -n`` where that works); refcnn's dynamic-batch graph makes neither CLI fetch sample data.

    python benchmarks/export_vs_onnx2tf.py [--model zoo:refcnn] [--repeats 3] [--converter auto] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(cmd: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:refcnn")
    p.add_argument("--calib-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--converter", default="auto", help="the pipeline's --converter (default: auto)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    import numpy as np

    from pipeline import quiet
    quiet.configure(False)
    from pipeline.export import ExportConfig, export
    from pipeline.tflite.inspect import inspect
    from pipeline.report import Report
    from pipeline.runtime.litert import TfliteRunner, host_description

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        # Reference run (also gives the exact ONNX file and calibration set to hand to onnx2tf).
        status, out, rep = export(ExportConfig(model=args.model, calib_size=args.calib_size,
                                               out=str(work / "ref")), log=lambda *a, **k: None)
        onnx_path = out / "model.onnx"
        pre = rep.preprocessing
        from pipeline.calib_data import CalibContext, build
        from pipeline.inputs import data as data_mod
        from pipeline.inputs import preprocessing
        ds = data_mod.load("fashion-mnist")
        prep = preprocessing.Preprocessing.from_dict(pre)
        calib = build("balanced", CalibContext(ds.x_train, ds.y_train, prep, ds.name), args.calib_size, 0)
        mean = np.asarray(prep.mean, np.float32)
        std = np.asarray(prep.std, np.float32)
        raw01 = calib.array() * std[None, :, None, None] + mean[None, :, None, None]  # undo the normalisation
        np.save(work / "calib_nhwc.npy", np.ascontiguousarray(raw01.transpose(0, 2, 3, 1)).astype(np.float32))
        m = json.dumps([[[[float(v) for v in mean]]]])
        s = json.dumps([[[[float(v) for v in std]]]])

        o2t_bin = str(Path(sys.executable).with_name("onnx2tf"))
        from pipeline.conversion.onnx2tf_flatbuffer import DEFAULT_ROUTE_DIR, ONNX2TF_VERSION, child_command
        have_v2 = (DEFAULT_ROUTE_DIR / "onnx2tf" / "__main__.py").is_file()

        def locked(argv: list[str]) -> tuple[list[str], dict]:
            """``python argv...`` the way the pipeline's onnx2tf 2.x child runs: network locked."""
            cmd, env = child_command(argv, work / "lock")
            env["PYTHONPATH"] = os.pathsep.join([str(DEFAULT_ROUTE_DIR), env["PYTHONPATH"]])
            env["PATH"] = os.pathsep.join([str(DEFAULT_ROUTE_DIR / "bin"), env.get("PATH", os.defpath)])
            return cmd, env
        try:
            import onnxsim  # noqa: F401
            onnxsim_present = True
        except ImportError:
            onnxsim_present = False
        rows = []
        for rep_i in range(args.repeats):
            o2t_out = work / f"onnx2tf-{rep_i}"
            t_o2t, proc = _timed([o2t_bin, "-i", str(onnx_path), "-o", str(o2t_out), "-oiqt",
                                  "-cind", "input", str(work / "calib_nhwc.npy"), m, s], cwd=work)
            v2 = {}
            if have_v2:
                v2_out = work / f"onnx2tf2-{rep_i}"
                cmd, env = locked(["-m", "onnx2tf", "-i", str(onnx_path), "-o", str(v2_out), "-oiqt",
                                   "-cind", "input", str(work / "calib_nhwc.npy"), m, s])
                t0 = time.perf_counter()
                p2 = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
                t_v2 = time.perf_counter() - t0
                v2_files = sorted(f.name for f in v2_out.glob("*.tflite")) if v2_out.exists() else []
                v2 = {"onnx2tf2_s": round(t_v2, 2), "onnx2tf2_exit": p2.returncode, "onnx2tf2_tflite_files": v2_files}
                v2_full = next((v2_out / f for f in v2_files if f.endswith("_full_integer_quant.tflite")), None)
            files = sorted(f.name for f in o2t_out.glob("*.tflite")) if o2t_out.exists() else []
            full = next((o2t_out / f for f in files if f.endswith("_full_integer_quant.tflite")), None)
            pipe_out = work / f"pipeline-{rep_i}"
            t_pipe, pproc = _timed([sys.executable, "-m", "pipeline.export", "--model", args.model,
                                    "--calib-size", str(args.calib_size), "--converter", args.converter,
                                    "--out", str(pipe_out)], cwd=ROOT)
            prep_rep = json.loads((pipe_out / "report.json").read_text())
            row = {"repeat": rep_i, "onnx2tf_s": round(t_o2t, 2), "onnx2tf_exit": proc.returncode,
                   "onnx2tf_tflite_files": files, "pipeline_s": round(t_pipe, 2), "pipeline_exit": pproc.returncode,
                   "pipeline_over_onnx2tf": round(t_pipe / t_o2t, 3), **v2}
            if v2:
                row["pipeline_over_onnx2tf2"] = round(t_pipe / v2["onnx2tf2_s"], 3)
            x = preprocessing.apply(ds.x_test, prep)
            if v2 and v2_full is not None:
                insp = inspect(v2_full)
                res = TfliteRunner(v2_full, kernels="xnnpack", threads=4, batch_size=1).run(x)
                row["onnx2tf2_full_int8"] = {"fully_int8": insp.fully_int8,
                                             "top1": float(np.mean(res.outputs.argmax(1) == ds.y_test)),
                                             "dynamic_batch": insp.dynamic_batch, "bytes": insp.bytes}
            if full is not None:
                insp = inspect(full)
                res = TfliteRunner(full, kernels="xnnpack", threads=4, batch_size=1).run(x)
                row["onnx2tf_full_int8"] = {"fully_int8": insp.fully_int8,
                                            "top1": float(np.mean(res.outputs.argmax(1) == ds.y_test)),
                                            "dynamic_batch": insp.dynamic_batch, "bytes": insp.bytes}
            row["pipeline_int8"] = {"fully_int8": prep_rep["quantization"]["fully_int8"],
                                    "top1": prep_rep["accuracy"]["int8_top1"],
                                    "fp32_top1": prep_rep["accuracy"]["fp32_top1"],
                                    "agreement": prep_rep["accuracy"]["agreement"],
                                    "bytes": prep_rep["artifacts"]["tflite_int8"]["bytes"],
                                    "converter": prep_rep["conversion"]["converter"],
                                    "timings_s": prep_rep["timings_s"]}
            rows.append(row)

        print(f"Export wall time, {args.model}, {args.calib_size} calibration images, measured on {host_description()}")
        print(f"onnx2tf {rep.versions.get('onnx2tf')} (onnxsim installed: {onnxsim_present}) and onnx2tf "
              f"{ONNX2TF_VERSION if have_v2 else '2.x (not installed: ./setup.sh --install-only)'}; each run is a fresh "
              f"process, in this order per repeat; pipeline --converter {args.converter}")
        print(f"{'run':>3}  {'onnx2tf 1.28 -oiqt':>19}  {'onnx2tf 2.x -oiqt':>18}  {'pipeline (export+verify+eval)':>30}  "
              f"{'/1.28':>6}  {'/2.x':>6}")
        for r in rows:
            v2s = f"{r['onnx2tf2_s']:>17.1f}s" if "onnx2tf2_s" in r else f"{'-':>18}"
            v2r = f"{r['pipeline_over_onnx2tf2']:>5.2f}x" if "pipeline_over_onnx2tf2" in r else f"{'-':>6}"
            print(f"{r['repeat']:>3}  {r['onnx2tf_s']:>18.1f}s  {v2s}  {r['pipeline_s']:>29.1f}s  "
                  f"{r['pipeline_over_onnx2tf']:>5.2f}x  {v2r}")
        import statistics
        med = {k: statistics.median(r[k] for r in rows) for k in ("onnx2tf_s", "pipeline_s", "onnx2tf2_s")
               if all(k in r for r in rows)}
        print("median: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in med.items())
              + (f"; pipeline/onnx2tf 2.x {med['pipeline_s'] / med['onnx2tf2_s']:.2f}x" if "onnx2tf2_s" in med else ""))
        r = rows[-1]
        if "onnx2tf2_full_int8" in r:
            f = r["onnx2tf2_full_int8"]
            print(f"onnx2tf 2.x full-int8: fully_int8={f['fully_int8']} top-1 {f['top1'] * 100:.2f}% "
                  f"dynamic batch={f['dynamic_batch']} ({', '.join(r['onnx2tf2_tflite_files'])})")
        elif "onnx2tf2_exit" in r:
            print(f"onnx2tf 2.x wrote no full-int8 file (exit {r['onnx2tf2_exit']})")
        print(f"onnx2tf wrote {len(r['onnx2tf_tflite_files'])} .tflite files: {', '.join(r['onnx2tf_tflite_files'])}")
        if "onnx2tf_full_int8" in r:
            f = r["onnx2tf_full_int8"]
            print(f"onnx2tf full-int8: fully_int8={f['fully_int8']} top-1 {f['top1'] * 100:.2f}% dynamic batch={f['dynamic_batch']}")
        pi = r["pipeline_int8"]
        print(f"pipeline int8 ({pi['converter']}): fully_int8={pi['fully_int8']} top-1 {pi['top1'] * 100:.2f}% "
              f"(FP32 {pi['fp32_top1'] * 100:.2f}%, agreement {pi['agreement'] * 100:.2f}%), verified on the 10k test split")
        if args.json:
            Report(kind="benchmark", model={"spec": args.model},
                   runtime={"measured_on": host_description()},
                   sections={"export_vs_onnx2tf": {"rows": rows, "onnxsim_installed": onnxsim_present}}).write_json(Path(args.json))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
