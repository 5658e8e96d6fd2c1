"""Stage ``report``: the typed Report (pipeline/report.py) of an export, with its gates in order: the FP32
sanity gate first (when it fails, the gates after it compare two broken models), then the precision contract,
the accuracy gates and, on TFLite-Micro targets, the device gates."""
from __future__ import annotations

from pipeline.report import Gate, Report

def build(cfg, inputs, onnx, tflite, insp, ran, micro, cmp, sane, lat, timings: dict, setup_s: float) -> Report:
    """Every argument is a stage's artifact (``cfg``: ExportConfig, ``inputs``: prepare's Inputs)."""
    from pipeline.jsonio import sha256_file
    from pipeline.reliability.metrics import accuracy_gates
    from pipeline.precisions import contract_check, float_ops, get_precision
    from pipeline.stages.micro import gates as device_gates
    target, n = inputs.target, inputs.n
    precision = get_precision(target.precision)
    prec = precision.name
    chk = contract_check(target.precision, target.allow_float_fallback, insp)
    gates = {
        "fp32_above_chance": sane.gate,
        "fully_int8": Gate(passed=bool(insp.fully_int8), value=insp.fully_int8)
        if precision.fully_int8_required and not target.allow_float_fallback
        else Gate(passed=True, value=insp.fully_int8, required=False,
                  details={"applies": False, "note": f"int8 targets only; this target is {prec} (see precision_ok)"}
                  if not target.allow_float_fallback else
                  {"applies": False, "note": f"target {target.name} allows float fallback: "
                   f"{len(float_ops(insp))} op(s) not int8, listed in quantization.float_ops (see precision_ok)"}),
        "precision_ok": Gate(passed=chk.precision_ok, value=chk.precision_ok, reason=chk.reason,
                             details={"precision": prec, "rule": chk.rule}),
        **accuracy_gates(cmp, cfg.max_drop_pp, cfg.min_agreement),
        **device_gates(micro),
    }
    from pipeline.report.figures import confusion_and_flip_examples  # report.html's confusion and flip thumbnails
    measured = ran.tflite.describe()
    tfl_sha256 = sha256_file(tflite.path)
    return Report(
        kind="export",
        target=target.to_dict(),
        model=inputs.model.describe() | {"weights_missing": sane.weights_missing},
        warnings=sane.warnings() + ([f"batched evaluation fell back: {ran.tflite.batch_fallback}"]
                                    if ran.tflite.batch_fallback else []),
        data={**inputs.dataset.describe(), "evaluated": n, "split": "test"},
        preprocessing=tflite.preprocessing.to_dict(),  # the deployment record, as embedded in the .tflite
        calibration=inputs.calib.describe(),
        onnx=onnx.describe(),
        conversion=tflite.describe(),
        quantization=insp.to_dict(with_tensors=True) | {"precision": chk.to_dict()}
        | ({"float_ops": float_ops(insp), "float_nodes": list(tflite.float_nodes)} if target.allow_float_fallback
           else {}),
        runtime={
            "int8": measured,
            "fp32": {"runtime": ran.fp32_runtime, "images": n, "seconds": round(ran.fp32_seconds, 4),
                     "images_per_s": round(n / ran.fp32_seconds, 1) if ran.fp32_seconds else None,
                     "measured_on": measured["measured_on"]}
            | ({"measured_while": f"{ran.fp32_beside} ran beside it: a throughput on a shared CPU"}
               if ran.fp32_beside else {}),
            "note": "host measurements on this machine's CPU, not device latency",
            "latency": _latency(lat),
        },
        artifacts={  # sha256: pipeline.evaluate and the Pi script refuse a file that changed after the export
            "onnx": {"path": "model.onnx", "bytes": onnx.bytes, "sha256": sha256_file(onnx.path)},
            f"tflite_{prec}": {"path": tflite.path.name, "bytes": tflite.bytes, "sha256": tfl_sha256},
            "tflite": {"path": tflite.path.name, "bytes": tflite.bytes, "precision": prec, "sha256": tfl_sha256},
            "size_ratio_onnx_to_int8": round(onnx.bytes / tflite.bytes, 3) if tflite.bytes else None,
            "report": {"path": "report.json"},
            "report_html": {"path": "report.html"},
        },
        # The keys say int8 for every precision (readers depend on them); "precision" and "tflite_top1" say what
        # the figures hold.
        accuracy=cmp.to_dict() | {"precision": prec, "tflite_top1": cmp.int8_top1,
                                  "evaluated_on": f"{inputs.dataset.name} test split, {n} images; {prec} TFLite on "
                                                  f"LiteRT {target.run_kernels} kernels with {target.threads} threads, "
                                                  f"FP32 on {ran.fp32_runtime}" + precision.int8_fields_note},
        timings_s={"setup": round(setup_s, 3), **timings, **{f"convert.{k}": v for k, v in tflite.timings_s.items()}},
        gates=gates,
        config=cfg.to_dict(),
        sections={"device": _device(target, micro), "preprocessing_probe": sane.probe,
                  "fp32_vs_int8": confusion_and_flip_examples(
                      inputs.raw_test, inputs.labels, ran.fp32, ran.tflite.outputs,
                      class_names=inputs.dataset.class_names, raw_range=inputs.pre.raw_range)},
    )


def _latency(lat: dict | None) -> dict:
    if not lat:
        return {"measured": False, "reason": "host timings say nothing about a microcontroller; see target.published"}
    return {"measured": True, "batch_size": 1, "note": "host measurements (this machine's CPU), never device latency",
            "kernels": {k: v.describe() for k, v in lat.items()}}


def _device(target, micro) -> dict:
    d = {"device": target.device, "clock_mhz": target.clock_mhz, "ram_bytes": target.ram_bytes,
         "flash_bytes": target.flash_bytes, "published": list(target.published), "references": list(target.references),
         "device_latency": "not estimated: no anchor in the notes scales to this model honestly; published "
                           "figures for reference models are in 'published'"}
    if micro is not None:
        d["tflite_micro"] = micro.describe()
    return d
