"""What the export prints: the one-screen summary of a report, the table of a multi-target call, and the target
registry (``--list-targets``)."""
from __future__ import annotations

import math
import re
from pathlib import Path


def print_targets() -> None:
    from pipeline import targets
    def size(b):
        if b is None:
            return "-"
        for unit, n in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if b >= n and b % n == 0:
                return f"{b // n} {unit}"
        return f"{b:,} B"

    rows = [("name", "precision", "I/O", "runtime", "kernels", "threads", "device", "clock", "RAM", "flash",
             "margin")]
    for name in targets.list_targets():
        t = targets.get_target(name)
        rows.append((t.name, t.precision, t.input_dtype, t.runtime, t.kernels, str(t.threads), t.device,
                     f"{t.clock_mhz} MHz" if t.clock_mhz else "-", size(t.ram_bytes), size(t.flash_bytes),
                     f"arena +{t.arena_margin:.0%}, flash +{t.flash_margin:.0%}" if t.is_micro else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\nRAM/flash: board budgets (checked with the margins on TFLite-Micro targets only); "
          "sources in each profile's references (report.json target.references)")


def summary(report, out: Path) -> str:
    a, art, q = report.accuracy, report.artifacts, report.quantization
    p = report.target["precision"]
    failed = report.failed()
    verdict = "PASS" if report.passed else "FAIL (" + ", ".join(failed) + ")"
    reasons = [f"           {k}: {report.gates[k].reason}" for k in failed if report.gates[k].reason]
    from pipeline.precisions import get_precision
    return "\n".join([
        f"model      {report.model['spec']}  ->  target {report.target['name']}",
        f"{p:<10} {get_precision(p).contract_text(q)}"
        + f"  input {q['input_dtype']}  output {q['output_dtype']}  ops {sum(q['ops'].values())} ({', '.join(q['ops'])})",
        f"sizes      ONNX {art['onnx']['bytes'] / 1024:.1f} KiB  ->  {p} TFLite {art['tflite']['bytes'] / 1024:.1f} KiB "
        + (f"({art['size_ratio_onnx_to_int8']}x smaller)" if art['size_ratio_onnx_to_int8'] >= 1 else
           f"({1 / art['size_ratio_onnx_to_int8']:.2f}x larger)"),
        *(["convert    converted twice: the first model broke the batch axis (a computed pad or reshape), the "
           "second is from the constant-folded graph (report.json: conversion.constant_folded)"]
          if report.conversion.get("constant_folded") else []),
        f"accuracy   FP32 {a['fp32_top1'] * 100:.2f}%  {p} {a['int8_top1'] * 100:.2f}%  drop {a['drop_pp']:+.2f} pp  "
        f"agreement {a['agreement'] * 100:.2f}%  ({a['n']} test images)",
        _steps_line(a),
        _preprocessing_line(report),
        f"throughput {p} {report.runtime['int8']['images_per_s']:.0f} img/s on LiteRT {report.runtime['int8']['kernels']}, "
        f"{_threads(report.runtime['int8']['threads'])} (host)",
        *_device_lines(report),
        *[f"WARNING    {w}" for w in report.warnings],
        f"verdict    {verdict}  in {report.timings_s['total']:.1f}s",
        *reasons,
        *_reliability_lines(report),
        f"files      {out}/ (model.onnx, {'model_recovered.onnx, ' if _recovered_graph(report) else ''}{art['tflite']['path']}, report.json, report.html, predictions.npz, bundle/, "
        "bundle.tar.gz" + (", firmware/, firmware.zip)" if "firmware" in art else ")"),
    ])


def _threads(n) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _steps_line(a: dict) -> str:
    """The output error in quantization steps: what a regression test's max_steps must allow."""
    if not a.get("output_scale"):
        return f"errors     max |quantized - FP32| {a['max_abs_error']:.4g} (float outputs: no quantization steps)"
    worst = a["max_error_steps"]
    return (f"errors     max |int8 - FP32| {worst:.1f} output steps (mean {a['mean_error_steps']:.2f}) on these "
            f"inputs: a regression test (pipeline.testing.assert_tflite_matches_torch) wants max_steps a little "
            f"above it, e.g. {max(2, math.ceil(worst * 1.5))}")


def _preprocessing_line(report) -> str:
    pre, q = report.preprocessing, report.quantization
    fmt = lambda v: ",".join(f"{x:.4g}" for x in v)  # noqa: E731
    scale = pre.get("scale")
    scale_s = "1/255" if scale and abs(scale - 1 / 255) < 1e-9 else f"{scale:.4g}"
    qi = (q.get("inputs") or [{}])[0].get("quantization", {})
    qin = (f", input scale {qi['scale'][0]:.4g} zero point {qi['zero_point'][0]}"
           if qi.get("scale") and qi.get("zero_point") else "")
    return (f"preproc    x = (raw * {scale_s} - mean) / std, mean {fmt(pre['mean'])} std {fmt(pre['std'])}; "
            f"{pre.get('source_layout')} data -> TFLite {pre.get('tflite_input_layout')} {q['input_dtype']}{qin}")


def _reliability_lines(report) -> list[str]:
    s = report.sections
    if "calibration_drift" not in s:
        return []
    cd, fl, sh = s["calibration_drift"], s["flips"], s["shifts"]
    lines = [f"reliability ECE {cd['fp32']['ece']:.4f} -> {cd['int8']['ece']:.4f}  flips {fl['count']}/{fl['n']}  "
             f"worst class {s['per_class']['worst_class'].get('label', s['per_class']['worst_class']['name'])} "
             f"{s['per_class']['worst_class']['drop_pp']:+.2f} pp"]
    if sh.get("records"):
        w = sh["worst_by_int8_drop"]
        lines.append(f"shifts     {sh['sets']} sets: mean drop {sh['mean']['drop_pp']:+.2f} pp, mean flip rate "
                     f"{1 - sh['mean']['agreement']:.2%}, worst {w['corruption']} s{w['severity']} {w['drop_pp']:+.2f} pp")
    return lines


def _device_lines(report) -> list[str]:
    lat = report.runtime.get("latency", {})
    lines = []
    if lat.get("measured"):
        ks = lat["kernels"]
        first = next(iter(ks.values()))
        lines.append("latency    " + "  ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in ks.items())
                     + f"  (median, batch 1, {_threads(first['threads'])}; host measurement, not device latency)")
    m = report.sections.get("device", {}).get("tflite_micro")
    if m:
        c = m["compared_with_litert"]
        lines.append(f"tflm       arena_bytes {m['arena_bytes']:,}  flash_bytes {m['flash_bytes']:,}  "
                     f"RAM {m['ram_check']['required_bytes']:,}/{m['ram_check']['budget_bytes']:,} B  "
                     f"flash {m['flash_check']['required_bytes']:,}/{m['flash_check']['budget_bytes']:,} B "
                     f"(margins: arena +{m['ram_check']['margin']:.0%}, flash +{m['flash_check']['margin']:.0%})")
        lines.append(f"tflm/LiteRT top-1 agreement {c['top1_agreement']:.2%}, max diff {c['max_diff_steps']} step(s) "
                     f"on the first {c['images']} test inputs (TFLite-Micro reference kernels on this host)")
        t = report.target
        if t.get("budget_source") == "user":
            lines.append(f"budget     given by you: {t.get('budget_given_by')} (RAM {t.get('ram_bytes'):,} B, flash "
                         f"{t.get('flash_bytes'):,} B, core {t.get('core')})")
    fw = report.sections.get("firmware")
    if fw:
        fl = fw["flash"]
        tool = re.sub(r"^(\S+) \(.*\) (\S+).*$", r"\1 \2", fl.get("toolchain") or "")  # arm-none-eabi-g++ 12.2.1
        flash = (f"model {fl['model_section_bytes']:,} B in {fl['model_section']} ({tool}, {fw['core']})"
                 if fl.get("measured") else f"model flash not measured ({fl['reason']})")
        lines.append(f"firmware   {fw['path']} + {fw['zip']}: {flash}; MicroMutableOpResolver<"
                     f"{fw['op_resolver']['op_count']}>; tensor arena {fw['arena']['tensor_arena_size']:,} B "
                     f"(measured {fw['arena']['measured_bytes']:,} B + {fw['arena']['margin']:.0%}, 16-byte rounded)")
    le = report.sections.get("layer_errors")
    if le:
        if le.get("error"):
            lines.append(f"layers     not measured ({le['ran_because']}): {le['error']}")
        else:
            from pipeline.debug.layers import summary_line
            lines.append(summary_line(le) + f"  ({le['ran_because']}; report.html 'Layer-wise error')")
    rc = report.sections.get("recovery")
    if rc:
        b = rc.get("before") or {}
        tries = "; ".join(f"{a['attempt']}: " + (f"drop {a['drop_pp']:+.2f} pp, agreement {a['agreement']:.2%}"
                                                 if a.get("converted") else a.get("error") or a.get("note", "-"))
                          for a in rc["attempts"])
        lines.append(f"recover    before: drop {b.get('drop_pp', float('nan')):+.2f} pp, agreement "
                     f"{b.get('agreement', float('nan')):.2%}; {tries or 'no attempt'}; kept: {rc['kept'] or 'none'}")
    em = report.sections.get("emulation")
    if em:
        from pipeline.device_check import _pct
        dev, emu, rt = em["device"], em["emulator"], em["runtime"]
        lines.append(f"emulated   {dev['name']} (qemu -cpu {emu.get('cpu')}, {rt.get('runtime')} "
                     f"{rt.get('runtime_version')} aarch64, Python {rt.get('python')}): "
                     + ", ".join(f"{k['kernels']} top-1 {_pct(k['top1_agreement'])} max {k['max_diff_steps']} step(s)"
                                 for k in em["kernels"])
                     + f" vs the host's outputs: {'PASS' if em['passed'] else 'FAIL'} (outputs only, no timings)")
    return lines



def targets_table(rows: list[dict], root: Path) -> str:
    """The one summary of a multi-target export: a row per target."""
    from pipeline.precisions import get_precision
    head = ("target", "precision", "contract", "FP32", "quantized", "drop pp", "agreement", "TFLite KiB",
            "converted", "verdict")
    table, notes = [head], []
    for r in rows:
        rep = r.get("report")
        if rep is None:
            table.append((r["target"], "-", "-", "-", "-", "-", "-", "-", "-", "FAIL (error)"))
            notes.append(f"{r['target']}: {r['error']}")
            continue
        a, q, p = rep.accuracy, rep.quantization, rep.target["precision"]
        contract = get_precision(p).contract_text(q)
        failed = rep.failed()
        table.append((r["target"], p, contract, f"{a['fp32_top1']:.2%}", f"{a['int8_top1']:.2%}",
                      f"{a['drop_pp']:+.2f}", f"{a['agreement']:.2%}", f"{rep.artifacts['tflite']['bytes'] / 1024:.1f}",
                      "reused" if rep.conversion.get("reused") else "here",
                      "PASS" if rep.passed else "FAIL (" + ", ".join(failed) + ")"))
        notes += [f"{r['target']}: {k}: {rep.gates[k].reason}" for k in failed if rep.gates[k].reason]
        notes += [f"{r['target']}: WARNING {w}" for w in rep.warnings]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines + notes + [f"files      {root}/<target>/ (one export folder per target, each with its "
                                      "report.json)"])


def _recovered_graph(report) -> bool:
    """Whether --recover kept a repaired graph (model_recovered.onnx); float fallback keeps the original one."""
    kept = (report.sections.get("recovery") or {}).get("kept")
    return bool(kept) and not kept.startswith("float_fallback")
