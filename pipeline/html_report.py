"""``report.html``: one self-contained page (inline SVG charts, inline CSS, no scripts, no network).

Written for someone who did not run the tool: the verdict first, then each finding with a sentence on
how to read it. Every number comes from ``report.json``; the page says how it was measured.
"""
from __future__ import annotations

import html
import math
import os
from pathlib import Path

FP32_COLOR = "#1f77b4"
INT8_COLOR = "#d62728"
GAP_COLOR = "#ff9896"


def pct(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v * 100:.{digits}f}%"


def num(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def pp(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:+.{digits}f} pp"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


# --------------------------------------------------------------------------- SVG charts

def _axes(w, h, left, bottom, top, right, y_ticks, y_fmt, x_labels, x_pos, title, x_title, y_title) -> list[str]:
    ph = h - top - bottom
    out = [f'<text x="{w / 2:.1f}" y="14" text-anchor="middle" class="ct">{_e(title)}</text>']
    for t in y_ticks:
        y = top + ph * (1 - t[0])
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 4}" y="{y + 3.5:.1f}" text-anchor="end" class="tk">{_e(y_fmt(t[1]))}</text>')
    for lbl, x in zip(x_labels, x_pos):
        out.append(f'<text x="{x:.1f}" y="{h - bottom + 13}" text-anchor="middle" class="tk">{_e(lbl)}</text>')
    out.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" class="ax"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" class="ax"/>')
    if x_title:
        out.append(f'<text x="{(left + w - right) / 2:.1f}" y="{h - 3}" text-anchor="middle" class="tk">{_e(x_title)}</text>')
    if y_title:
        out.append(f'<text x="11" y="{top + ph / 2:.1f}" text-anchor="middle" class="tk" '
                   f'transform="rotate(-90 11 {top + ph / 2:.1f})">{_e(y_title)}</text>')
    return out


def svg_reliability(bins: dict, title: str, color: str, w: int = 300, h: int = 270) -> str:
    """Accuracy per confidence bin (bars), the gap to the bin's mean confidence (light), and the diagonal."""
    left, bottom, top, right = 40, 34, 22, 8
    pw, ph = w - left - right, h - top - bottom
    edges = bins["edges"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{_e(title)}">']
    parts += _axes(w, h, left, bottom, top, right, [(t, t) for t in (0, .25, .5, .75, 1)], lambda v: f"{v:.2f}",
                   ["0", "0.5", "1"], [left, left + pw / 2, left + pw], title, "confidence", "accuracy")
    total = sum(bins["count"]) or 1
    for i, (acc, conf, n) in enumerate(zip(bins["accuracy"], bins["confidence"], bins["count"])):
        if not n:
            continue
        x0 = left + pw * edges[i]
        bw = pw * (edges[i + 1] - edges[i])
        ya = top + ph * (1 - acc)
        yc = top + ph * (1 - conf)
        parts.append(f'<rect x="{x0 + .5:.1f}" y="{ya:.1f}" width="{bw - 1:.1f}" height="{top + ph - ya:.1f}" '
                     f'fill="{color}" opacity="{0.35 + 0.65 * min(1.0, 8 * n / total):.2f}">'
                     f'<title>confidence {edges[i]:.2f}-{edges[i + 1]:.2f}: {n} images, accuracy {acc:.3f}, '
                     f'mean confidence {conf:.3f}</title></rect>')
        lo, hi = sorted((ya, yc))
        parts.append(f'<rect x="{x0 + .5:.1f}" y="{lo:.1f}" width="{bw - 1:.1f}" height="{max(hi - lo, .5):.1f}" '
                     f'fill="{GAP_COLOR}" opacity="0.7" stroke="{INT8_COLOR}" stroke-width="0.4"/>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top}" stroke="#444" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(edges, series: list[tuple[str, list[int], str]], title: str, w: int = 420, h: int = 270) -> str:
    """Share of images per confidence bin, one bar per series side by side."""
    left, bottom, top, right = 44, 34, 22, 8
    pw, ph = w - left - right, h - top - bottom
    shares = [[c / (sum(counts) or 1) for c in counts] for _, counts, _ in series]
    ymax = max(0.05, max(max(s) for s in shares))
    ymax = min(1.0, (int(ymax * 10) + 1) / 10)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{_e(title)}">']
    parts += _axes(w, h, left, bottom, top, right, [(t / ymax, t) for t in _ticks(ymax)], lambda v: f"{v:.0%}",
                   ["0", "0.5", "1"], [left, left + pw / 2, left + pw], title, "confidence (top-1 probability)",
                   "share of images")
    k = len(series)
    for i in range(len(edges) - 1):
        x0 = left + pw * edges[i]
        bw = pw * (edges[i + 1] - edges[i]) / k
        for j, (name, _, color) in enumerate(series):
            v = shares[j][i]
            y = top + ph * (1 - v / ymax)
            parts.append(f'<rect x="{x0 + j * bw + .3:.1f}" y="{y:.1f}" width="{bw - .6:.1f}" '
                         f'height="{top + ph - y:.1f}" fill="{color}"><title>{_e(name)} {edges[i]:.2f}-'
                         f'{edges[i + 1]:.2f}: {v:.1%}</title></rect>')
    parts += _legend(left + 8, top + 6, [(n, c, "") for n, _, c in series])
    parts.append("</svg>")
    return "".join(parts)


def _ticks(ymax: float) -> list[float]:
    step = 0.05 if ymax <= 0.2 else (0.1 if ymax <= 0.5 else 0.25)
    n = int(ymax / step + 1e-9)
    return [round(i * step, 4) for i in range(n + 1)]


def _legend(x, y, items) -> list[str]:
    out = []
    for i, (name, color, dash) in enumerate(items):
        yy = y + 13 * i
        out.append(f'<line x1="{x}" y1="{yy}" x2="{x + 16}" y2="{yy}" stroke="{color}" stroke-width="3" '
                   f'{f"stroke-dasharray={chr(34)}{dash}{chr(34)}" if dash else ""}/>')
        out.append(f'<text x="{x + 20}" y="{yy + 3.5}" class="tk">{_e(name)}</text>')
    return out


def svg_lines(xs, series: list[tuple[str, list, str, str]], title: str, y_fmt, y_min: float | None = None,
              y_max: float | None = None, w: int = 185, h: int = 150, legend: bool = False) -> str:
    """A small line chart: value against severity (0 = clean) for each series."""
    left, bottom, top, right = 42, 30, 20, 6
    pw, ph = w - left - right, h - top - bottom
    vals = [v for _, ys, _, _ in series for v in ys if v is not None]
    lo = min(vals) if y_min is None else y_min
    hi = max(vals) if y_max is None else y_max
    if hi - lo < 1e-9:
        hi = lo + 1e-3
    pad = (hi - lo) * 0.08
    lo, hi = (lo - pad if y_min is None else lo), (hi + pad if y_max is None else hi)
    xpos = [left + pw * i / max(1, len(xs) - 1) for i in range(len(xs))]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{_e(title)}">']
    ticks = [lo + (hi - lo) * t for t in (0, 0.5, 1)]
    parts += _axes(w, h, left, bottom, top, right, [((t - lo) / (hi - lo), t) for t in ticks], y_fmt,
                   [str(x) for x in xs], xpos, title, "severity (0 = clean)", "")
    for name, ys, color, dash in series:
        pts = [(xpos[i], top + ph * (1 - (v - lo) / (hi - lo))) for i, v in enumerate(ys) if v is not None]
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2" '
                     f'{f"stroke-dasharray={chr(34)}{dash}{chr(34)}" if dash else ""}/>')
        for (x, y), v in zip(pts, [v for v in ys if v is not None]):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{color}"><title>{_e(name)}: '
                         f'{_e(y_fmt(v))}</title></circle>')
    if legend:
        parts += _legend(left + 6, top + ph - 8 - 13 * (len(series) - 1), [(n, c, d) for n, _, c, d in series])
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- page

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1240px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:18px;margin:30px 0 6px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 4px}
p,li{font-size:14px;line-height:1.45}.muted{color:#666;font-size:12.5px}
.verdict{border-radius:8px;padding:14px 18px;margin:12px 0;color:#fff}
.pass{background:#2e7d32}.fail{background:#c62828}
.verdict .big{font-size:26px;font-weight:700}.verdict p{margin:4px 0 0;font-size:14px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:150px}
.card .v{font-size:19px;font-weight:600}.card .k{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:13px;background:#fff;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td.l,th.l{text-align:left}tr.bad td{background:#fdecea}tr.ok td{background:#edf7ed}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.grid3{display:grid;grid-template-columns:repeat(auto-fill,minmax(585px,1fr));gap:8px}
.corr .row{gap:6px}
.corr{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:4px 8px}
.corr h3{margin:4px 0}
svg{background:#fff}svg .ct{font-size:12px;font-weight:600}svg .tk{font-size:10px;fill:#444}
svg .grid{stroke:#eee}svg .ax{stroke:#888}
code{background:#eee;padding:0 3px;border-radius:3px;font-size:12.5px}
details{margin:6px 0}summary{cursor:pointer;font-size:14px}
"""


def render(report: dict) -> str:
    """The page for a report dict that holds the reliability sections."""
    cd, ts, fl = report["calibration_drift"], report["temperature_scaling"], report["flips"]
    pc, sh, rel = report["per_class"], report["shifts"], report.get("reliability", {})
    gates = report.get("gates", {})
    model = report.get("model", {}).get("spec", "model")
    target = report.get("target", {}).get("name", "")
    data = report.get("data", {})
    failed = [k for k, g in gates.items() if not g.get("passed", True)]
    passed = report.get("passed", not failed)
    f, q, d = cd["fp32"], cd["int8"], cd["delta"]
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>Reliability report: {_e(model)} ({_e(target)})</title><style>{_CSS}</style></head><body><main>",
           f"<h1>Reliability of the int8 model: {_e(model)} &rarr; {_e(target)}</h1>",
           f'<p class="muted">Data: {_e(data.get("name", ""))} test split, {cd["n"]} images; '
           f'{_e(rel.get("how", ""))}.</p>']
    # -- verdict
    sentences = [
        f"On clean test images the int8 model scores {pct(q['top1'])} top-1 against {pct(f['top1'])} for FP32 "
        f"({pp((f['top1'] - q['top1']) * 100)} drop) and changes the prediction of {fl['count']} of {fl['n']} "
        f"images ({pct(fl['rate'])}).",
        f"Calibration: ECE {num(f['ece'])} (FP32) &rarr; {num(q['ece'])} (int8), a change of {d['ece']:+.4f}.",
    ]
    if sh.get("records"):
        w = sh["worst_by_int8_drop"]
        wf = sh["worst_by_flip_rate"]
        sentences.append(
            f"Under {sh['sets']} shifted test sets the int8 model loses {pp(sh['mean']['drop_pp'])} on average "
            f"against FP32; the worst set is <b>{_e(w['corruption'])} severity {w['severity']}</b> "
            f"({pp(w['drop_pp'])}), and the most flips happen on <b>{_e(wf['corruption'])} severity "
            f"{wf['severity']}</b> ({pct(wf['flip_rate'])} of images).")
    if fl.get("best_detector"):
        b = fl["best_detector"]
        sentences.append(f"The best cheap flag for flipped predictions is <b>{_e(b)}</b> (AUROC "
                         f"{num(fl['detectors'][b]['auroc'], 3)}).")
    out.append(f'<div class="verdict {"pass" if passed else "fail"}"><div class="big">'
               f'{"PASS" if passed else "FAIL"}</div>'
               + (f"<p>Failed gates: {_e(', '.join(failed))}.</p>" if failed else "<p>All gates passed.</p>")
               + "".join(f"<p>{s}</p>" for s in sentences) + "</div>")
    cards = [("FP32 top-1", pct(f["top1"])), ("int8 top-1", pct(q["top1"])),
             ("top-1 drop", pp((f["top1"] - q["top1"]) * 100)), ("agreement", pct(1 - fl["rate"])),
             ("flips", f"{fl['count']} / {fl['n']}"), ("ECE FP32 → int8", f"{num(f['ece'])} → {num(q['ece'])}"),
             ("worst class", f"{pc['worst_class']['name']} ({pp(pc['worst_class']['drop_pp'])})")]
    if sh.get("records"):
        cards.append(("worst shifted set", f"{sh['worst_by_int8_drop']['corruption']} s{sh['worst_by_int8_drop']['severity']} "
                                           f"({pp(sh['worst_by_int8_drop']['drop_pp'])})"))
    out.append('<div class="cards">' + "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}'
                                               f"</div></div>" for k, v in cards) + "</div>")
    # -- gates
    out.append("<h2>Gates</h2><table><tr><th class='l'>gate</th><th>value</th><th>limit</th><th class='l'>result</th>"
               "<th class='l'>what it checks</th></tr>")
    for k, g in gates.items():
        val = g.get("value")
        val_s = num(val) if isinstance(val, float) else _e(val)
        out.append(f"<tr class='{'ok' if g.get('passed') else 'bad'}'><td class='l'><code>{_e(k)}</code></td>"
                   f"<td>{val_s}</td><td>{_e(g.get('limit', g.get('limit_steps', '')))}</td>"
                   f"<td class='l'>{'pass' if g.get('passed') else 'FAIL'}</td>"
                   f"<td class='l'>{_e(g.get('reason', ''))}</td></tr>")
    out.append("</table>")
    # -- calibration
    out.append("<h2>Calibration: is the confidence still honest after quantization?</h2>"
               "<p>Each bar is the accuracy of the test images whose top-1 confidence falls in that bin; a perfectly "
               "calibrated model follows the dashed diagonal. The light boxes mark the gap between accuracy and "
               "mean confidence: boxes above a bar mean over-confidence. Bar shade grows with the number of "
               "images in the bin.</p><div class='row'>")
    out.append(svg_reliability(cd["reliability_diagram"]["fp32"], f"FP32: ECE {num(f['ece'])}", FP32_COLOR))
    out.append(svg_reliability(cd["reliability_diagram"]["int8"], f"int8: ECE {num(q['ece'])}", INT8_COLOR))
    h = cd["confidence_histogram"]
    out.append(svg_histogram(h["edges"], [("FP32", h["fp32"], FP32_COLOR), ("int8", h["int8"], INT8_COLOR)],
                             "Confidence histogram"))
    out.append("</div><table><tr><th class='l'>metric</th><th>FP32</th><th>int8</th><th>int8 − FP32</th>"
               "<th class='l'>definition</th></tr>")
    defs = cd.get("definitions", {})
    for k in ("top1", "ece", "ace", "mce", "nll", "brier"):
        fmt = pct if k == "top1" else num
        dv = pp(d[k] * 100) if k == "top1" else f"{d[k]:+.4f}"
        out.append(f"<tr><td class='l'>{k}</td><td>{fmt(f[k])}</td><td>{fmt(q[k])}</td><td>{dv}</td>"
                   f"<td class='l'>{_e(defs.get(k, 'top-1 accuracy'))}</td></tr>")
    out.append("</table>")
    # -- temperature
    v = ts["validation"]
    out.append("<h2>Temperature scaling</h2>"
               f"<p>A single temperature T divides the logits before the softmax; T &gt; 1 softens over-confident "
               f"predictions. T is fitted by minimising NLL on {v['size']} images of the <b>training</b> split "
               f"(never the test split), separately for FP32 and int8; metrics below are on the test split. The "
               f"last row applies the FP32 temperature to the int8 model: if it matches the int8 row, a "
               f"temperature fitted before quantization still holds after it.</p>")
    if v.get("note"):
        out.append(f"<p class='muted'>Validation split: {_e(v['note'])}.</p>")
    out.append("<table><tr><th class='l'>model</th><th>T</th><th>ECE before</th><th>ECE after</th><th>NLL before</th>"
               "<th>NLL after</th><th>Brier before</th><th>Brier after</th><th>top-1</th></tr>")
    for name, s in (("FP32", ts["fp32"]), ("int8", ts["int8"])):
        b, a = s["test_before"], s["test_after"]
        out.append(f"<tr><td class='l'>{name} (own T)</td><td>{num(s['temperature'], 3)}</td><td>{num(b['ece'])}</td>"
                   f"<td>{num(a['ece'])}</td><td>{num(b['nll'])}</td><td>{num(a['nll'])}</td><td>{num(b['brier'])}</td>"
                   f"<td>{num(a['brier'])}</td><td>{pct(a['top1'])}</td></tr>")
    t = ts["int8_with_fp32_temperature"]
    b = ts["int8"]["test_before"]
    out.append(f"<tr><td class='l'>int8 with the FP32 T</td><td>{num(t['temperature'], 3)}</td><td>{num(b['ece'])}</td>"
               f"<td>{num(t['test']['ece'])}</td><td>{num(b['nll'])}</td><td>{num(t['test']['nll'])}</td>"
               f"<td>{num(b['brier'])}</td><td>{num(t['test']['brier'])}</td><td>{pct(t['test']['top1'])}</td></tr>"
               "</table>")
    # -- flips
    out.append("<h2>Prediction flips and how to flag them</h2>"
               f"<p>{fl['count']} of {fl['n']} clean test images ({pct(fl['rate'])}) get a different top-1 class "
               "from the int8 model than from FP32. Each score below is computed from the deployed int8 outputs "
               "alone, so a device could use it to flag inputs whose prediction may have flipped. AUROC 0.5 is "
               f"chance; the AUPR of a random score is the flip rate ({pct(fl.get('aupr_random'))}).</p>")
    out.append("<table><tr><th class='l'>score</th><th>AUROC</th><th>AUPR</th><th>TNR at TPR 95%</th></tr>")
    for k, dd in fl["detectors"].items():
        out.append(f"<tr{' class=ok' if k == fl.get('best_detector') else ''}><td class='l'>{_e(k)}</td>"
                   f"<td>{num(dd['auroc'], 3)}</td><td>{num(dd['aupr'], 3)}</td><td>{num(dd['tnr_at_tpr95'], 3)}</td></tr>")
    out.append("</table>")
    if fl.get("note"):
        out.append(f"<p class='muted'>{_e(fl['note'])}</p>")
    # -- shifts
    if sh.get("records"):
        out.append(_shifts_html(sh))
    # -- per class
    out.append("<h2>Per class</h2><p>Averages can hide a class that quantization hurts. The worst class (largest "
               "drop) is highlighted.</p><table><tr><th class='l'>class</th><th>images</th><th>FP32 top-1</th>"
               "<th>int8 top-1</th><th>drop</th><th>flips</th></tr>")
    for r in pc["classes"]:
        cls = " class=bad" if r["class"] == pc["worst_class"]["class"] else ""
        out.append(f"<tr{cls}><td class='l'>{_e(r['name'])}</td><td>{r['n']}</td><td>{pct(r['fp32_top1'])}</td>"
                   f"<td>{pct(r['int8_top1'])}</td><td>{pp(r['drop_pp'])}</td><td>{r['flips']}</td></tr>")
    out.append("</table>")
    # -- provenance
    out.append("<h2>How these numbers were obtained</h2><ul>")
    out.append(f"<li>{_e(rel.get('how', ''))}.</li>")
    if rel:
        out.append(f"<li>{rel.get('images_evaluated', 0):,} images through both models in "
                   f"{rel.get('seconds', {}).get('engine', 0):.1f} s ({rel.get('images_per_s')} images/s, "
                   f"{_e(rel.get('throughput_note', ''))}).</li>")
        out.append(f"<li>Clean-test outputs: {_e(rel.get('clean_outputs', ''))}.</li>")
    if sh.get("records"):
        out.append(f"<li>Shifted sets: {len(sh['corruptions'])} corruptions × severities "
                   f"{', '.join(map(str, sh['severities']))} of the {sh['images_per_set']} test images, generated on "
                   f"the fly from the raw pixels with seed {rel.get('seed', 0)} (pipeline/corruptions.py, in the "
                   "spirit of CIFAR-10-C and MNIST-C; not the published files), each set generated once and fed to "
                   "both models.</li>")
    vers = report.get("versions", {})
    if vers:
        out.append("<li>Versions: " + _e(", ".join(f"{k} {v}" for k, v in vers.items() if v)) + ".</li>")
    out.append("</ul></main></body></html>")
    return "\n".join(out)


def _severity_list(sev) -> str:
    """'severities 1 to 5', 'severities 1, 3 and 5' or 'severity 2'."""
    sev = [int(v) for v in sev]
    if len(sev) == 1:
        return f"severity {sev[0]}"
    if len(sev) > 2 and sev == list(range(sev[0], sev[-1] + 1)):
        return f"severities {sev[0]} to {sev[-1]}"
    return "severities " + ", ".join(map(str, sev[:-1])) + f" and {sev[-1]}"


def _shifts_html(sh: dict) -> str:
    clean = sh.get("clean")
    sev = sh["severities"]
    xs = ([0] if clean else []) + list(sev)
    out = ["<h2>Distribution shift: accuracy, flips and ECE against severity</h2>",
           f"<p>Each corruption is applied at {_severity_list(sev)} to the test images; both models see "
           "the same shifted images. Left: top-1 accuracy of FP32 (blue) and int8 (red); middle: flip rate "
           "(share of images whose top-1 differs between the two); right: ECE. Severity 0 is the clean test set.</p>"]
    m = sh["mean"]
    fr = sh.get("flip_rate_clean_vs_shifted", {})
    out.append("<table><tr><th class='l'></th><th>FP32 top-1</th><th>int8 top-1</th><th>drop</th><th>flip rate</th>"
               "<th>FP32 ECE</th><th>int8 ECE</th></tr>")
    rows = []
    if clean:
        rows.append(("clean test set", clean))
    rows.append((f"mean over the {sh['sets']} shifted sets", m))
    w, wf = sh["worst_by_int8_drop"], sh["worst_by_flip_rate"]
    rows.append((f"worst by int8 drop: {w['corruption']} s{w['severity']}", w))
    rows.append((f"worst by flip rate: {wf['corruption']} s{wf['severity']}", wf))
    for name, r in rows:
        out.append(f"<tr><td class='l'>{_e(name)}</td><td>{pct(r['fp32_top1'])}</td><td>{pct(r['int8_top1'])}</td>"
                   f"<td>{pp(r['drop_pp'])}</td><td>{pct(1 - r['agreement'])}</td><td>{num(r['fp32_ece'])}</td>"
                   f"<td>{num(r['int8_ece'])}</td></tr>")
    out.append("</table>")
    if fr.get("ratio") is not None:
        out.append(f"<p class='muted'>Flip rate: clean {pct(fr['clean'])}, shifted mean {pct(fr['shifted_mean'])} "
                   f"({fr['ratio']:.1f}×), shifted max {pct(fr['shifted_max'])}.</p>")
    out.append(f"<p class='muted'><span style='color:{FP32_COLOR}'>&#9473;&#9473; FP32</span> &nbsp; "
               f"<span style='color:{INT8_COLOR}'>&#9476;&#9476; int8</span> &nbsp; "
               f"<span style='color:#9467bd'>&#9473;&#9473; flip rate</span> &nbsp; axes are shared by all "
               "corruptions; hover a point for its value.</p><div class='grid3'>")
    by = {}
    for r in sh["records"]:
        by.setdefault(r["corruption"], {})[r["severity"]] = r
    all_acc = [v for r in sh["records"] for v in (r["fp32_top1"], r["int8_top1"])] + \
              ([clean["fp32_top1"], clean["int8_top1"]] if clean else [])
    acc_lo = max(0.0, math.floor((min(all_acc) - 0.02) * 10) / 10)
    flip_hi = max([1 - r["agreement"] for r in sh["records"]] + [1 - clean["agreement"] if clean else 0]) * 1.05 + 1e-4
    ece_hi = max([max(r["fp32_ece"], r["int8_ece"]) for r in sh["records"]]) * 1.05 + 1e-4
    for c in sh["corruptions"]:
        rs = [by[c][s] for s in sev]
        seq = ([clean] if clean else []) + rs

        def col(key, fn=lambda v: v):
            return [fn(r[key]) for r in seq]

        out.append(f"<div class='corr'><h3>{_e(c)}</h3><div class='row'>")
        out.append(svg_lines(xs, [("FP32", col("fp32_top1"), FP32_COLOR, ""), ("int8", col("int8_top1"), INT8_COLOR, "4 2")],
                             "top-1 accuracy", lambda v: f"{v:.1%}" if v < 0.9995 else "100%", acc_lo, 1.0))
        out.append(svg_lines(xs, [("flip rate", col("agreement", lambda v: 1 - v), "#9467bd", "")],
                             "flip rate", lambda v: f"{v:.1%}", 0.0, flip_hi))
        out.append(svg_lines(xs, [("FP32", col("fp32_ece"), FP32_COLOR, ""), ("int8", col("int8_ece"), INT8_COLOR, "4 2")],
                             "ECE", lambda v: f"{v:.3f}", 0.0, ece_hi))
        out.append("</div></div>")
    out.append("</div><details><summary>All shifted sets (table)</summary><table><tr><th class='l'>corruption</th>"
               "<th>severity</th><th>FP32 top-1</th><th>int8 top-1</th><th>drop</th><th>agreement</th>"
               "<th>FP32 ECE</th><th>int8 ECE</th></tr>")
    for r in sh["records"]:
        out.append(f"<tr><td class='l'>{_e(r['corruption'])}</td><td>{r['severity']}</td><td>{pct(r['fp32_top1'])}</td>"
                   f"<td>{pct(r['int8_top1'])}</td><td>{pp(r['drop_pp'])}</td><td>{pct(r['agreement'])}</td>"
                   f"<td>{num(r['fp32_ece'])}</td><td>{num(r['int8_ece'])}</td></tr>")
    out.append("</table></details>")
    return "\n".join(out)


def write(report: dict, path: Path) -> Path:
    """Write the page atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(render(report), encoding="utf-8")
    os.replace(tmp, path)
    return path
