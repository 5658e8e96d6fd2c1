"""Export wall time: this pipeline (export + verification + evaluation) vs plain onnx2tf ``-oiqt``.

Both run as fresh processes in the same run, on the same ONNX file and the same calibration
images (the pipeline's own balanced set, handed to onnx2tf as the NHWC float .npy plus mean/std
that its ``-cind`` flag wants). The pipeline's time includes what onnx2tf does not do at all:
PyTorch -> ONNX, the onnx.checker/onnxruntime check, flatbuffer inspection, the int8 and FP32
runs over the whole test split and the report.

    python benchmarks/export_vs_onnx2tf.py [--model zoo:refcnn] [--repeats 1] [--json out.json]
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
    p.add_argument("--repeats", type=int, default=1)
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
            files = sorted(f.name for f in o2t_out.glob("*.tflite")) if o2t_out.exists() else []
            full = next((o2t_out / f for f in files if f.endswith("_full_integer_quant.tflite")), None)
            pipe_out = work / f"pipeline-{rep_i}"
            t_pipe, pproc = _timed([sys.executable, "-m", "pipeline.export", "--model", args.model,
                                    "--calib-size", str(args.calib_size), "--out", str(pipe_out)], cwd=ROOT)
            prep_rep = json.loads((pipe_out / "report.json").read_text())
            row = {"repeat": rep_i, "onnx2tf_s": round(t_o2t, 2), "onnx2tf_exit": proc.returncode,
                   "onnx2tf_tflite_files": files, "pipeline_s": round(t_pipe, 2), "pipeline_exit": pproc.returncode,
                   "pipeline_over_onnx2tf": round(t_pipe / t_o2t, 3)}
            if full is not None:
                insp = inspect(full)
                x = preprocessing.apply(ds.x_test, prep)
                res = TfliteRunner(full, kernels="xnnpack", threads=4, batch_size=1).run(x)
                row["onnx2tf_full_int8"] = {"fully_int8": insp.fully_int8,
                                            "top1": float(np.mean(res.outputs.argmax(1) == ds.y_test)),
                                            "dynamic_batch": insp.dynamic_batch, "bytes": insp.bytes}
            row["pipeline_int8"] = {"fully_int8": prep_rep["quantization"]["fully_int8"],
                                    "top1": prep_rep["accuracy"]["int8_top1"],
                                    "fp32_top1": prep_rep["accuracy"]["fp32_top1"],
                                    "agreement": prep_rep["accuracy"]["agreement"],
                                    "bytes": prep_rep["artifacts"]["tflite_int8"]["bytes"],
                                    "timings_s": prep_rep["timings_s"]}
            rows.append(row)

        print(f"Export wall time, {args.model}, {args.calib_size} calibration images, measured on {host_description()}")
        print(f"onnx2tf {rep.versions.get('onnx2tf')} (onnxsim installed: {onnxsim_present}); each run is a fresh process")
        print(f"{'run':>3}  {'plain onnx2tf -oiqt':>20}  {'pipeline (export+verify+eval)':>30}  {'pipeline/onnx2tf':>16}")
        for r in rows:
            print(f"{r['repeat']:>3}  {r['onnx2tf_s']:>19.1f}s  {r['pipeline_s']:>29.1f}s  {r['pipeline_over_onnx2tf']:>15.2f}x")
        r = rows[-1]
        print(f"onnx2tf wrote {len(r['onnx2tf_tflite_files'])} .tflite files: {', '.join(r['onnx2tf_tflite_files'])}")
        if "onnx2tf_full_int8" in r:
            f = r["onnx2tf_full_int8"]
            print(f"onnx2tf full-int8: fully_int8={f['fully_int8']} top-1 {f['top1'] * 100:.2f}% dynamic batch={f['dynamic_batch']}")
        pi = r["pipeline_int8"]
        print(f"pipeline int8:     fully_int8={pi['fully_int8']} top-1 {pi['top1'] * 100:.2f}% "
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
