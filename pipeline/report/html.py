"""``report.html``: one self-contained page (inline SVG charts, inline PNG thumbnails, inline CSS; no scripts, no
network), written by every export and by ``pipeline.evaluate``.

Written for someone who did not run the tool: the verdict and every gate first, then what was built (sizes, ops,
quantization, preprocessing, calibration set, latency on this host, the microcontroller budget), then - when they
ran - the reliability sections. Every number comes from ``report.json``; the page says how it was measured. A
received ``report.json`` is data: every value is escaped, and a section whose fields are malformed is replaced by
one line saying so instead of failing the page.
"""
from __future__ import annotations

import html
import math
import os
import re
from pathlib import Path

FP32_COLOR = "#1f77b4"
INT8_COLOR = "#d62728"
OVER_COLOR = "#ff7f0e"   # reliability diagram: confidence above accuracy (over-confident bin)
UNDER_COLOR = "#2ca02c"  # reliability diagram: accuracy above confidence (under-confident bin)
GAP_COLOR = OVER_COLOR  # kept for callers of the old name
DROP_COLOR = "#8c564b"
AGREE_COLOR = "#9467bd"
ECE_COLOR = "#17becf"
WORSE_RGB = (214, 39, 40)  # confusion cells where int8 does worse than FP32
BETTER_RGB = (44, 160, 44)


def pct(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v * 100:.{digits}f}%"


def num(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def pp(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:+.{digits}f} pp"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _bytes(b) -> str:
    if b is None:
        return "n/a"
    b = float(b)
    for unit, n in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= n:
            return f"{b / n:.1f} {unit}"
    return f"{int(b):,} B"


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- ticks

def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Tick values at a 1-2-5 step (…, 0.1, 0.2, 0.5, 1, 2, 5, 10, …) covering [lo, hi]: the first tick is at or
    below ``lo``, the last at or above ``hi``, at most ``max_ticks`` ticks (at least 2)."""
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    max_ticks = max(2, int(max_ticks))
    mag = 10.0 ** math.floor(math.log10((hi - lo) / (max_ticks - 1)))
    for m in (1, 2, 5, 10, 20, 50, 100):
        step = m * mag
        start = math.floor(lo / step + 1e-9)
        end = math.ceil(hi / step - 1e-9)
        if end - start + 1 <= max_ticks:
            break
    digits = max(0, -math.floor(math.log10(step)) + 1)
    return [round(i * step, digits) + 0.0 for i in range(start, end + 1)]


def tick_label(v: float, step: float, percent: bool = False, suffix: str = "") -> str:
    """A tick value with as many decimals as the step needs: 0.2, 0.4 (not 0.200); 2%, 4% (not 2.0%)."""
    if percent:
        v, step = v * 100, step * 100
    digits = max(0, -math.floor(math.log10(abs(step)) + 1e-9)) if step else 0
    s = f"{v:.{digits}f}"
    if s.startswith("-") and float(s) == 0:
        s = s[1:]
    return s + ("%" if percent else "") + suffix


# --------------------------------------------------------------------------- SVG charts

def _svg_open(w, h, title) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="{_e(title)}">')


def _axes(w, h, left, bottom, top, right, y_ticks, y_fmt, x_labels, x_pos, title, x_title, y_title) -> list[str]:
    """``y_ticks``: [(fraction of the plot height, value)]."""
    ph = h - top - bottom
    out = [f'<text x="{w / 2:.1f}" y="14" text-anchor="middle" class="ct">{_e(title)}</text>']
    for frac, v in y_ticks:
        y = top + ph * (1 - frac)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 4}" y="{y + 3.5:.1f}" text-anchor="end" class="tk">{_e(y_fmt(v))}</text>')
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


def _swatches(x, y, items) -> list[str]:
    out = []
    for i, (name, color) in enumerate(items):
        yy = y + 13 * i
        out.append(f'<rect x="{x}" y="{yy - 7}" width="10" height="9" fill="{color}" stroke="#333" stroke-width="0.4"/>')
        out.append(f'<text x="{x + 14}" y="{yy + 1}" class="tk">{_e(name)}</text>')
    return out


def svg_reliability(bins: dict, title: str, color: str, w: int = 300, h: int = 270) -> str:
    """Accuracy per confidence bin (bars), the gap to the bin's mean confidence, and the diagonal.

    The gap box is orange when the bin is over-confident (mean confidence above accuracy: the box sits above the
    bar) and green when it is under-confident (accuracy above mean confidence: the box is the top of the bar)."""
    left, bottom, top, right = 40, 34, 22, 8
    pw, ph = w - left - right, h - top - bottom
    edges = bins["edges"]
    ticks = nice_ticks(0, 1, 6)
    step = ticks[1] - ticks[0]
    parts = [_svg_open(w, h, title)]
    parts += _axes(w, h, left, bottom, top, right, [(t, t) for t in ticks], lambda v: tick_label(v, step),
                   [tick_label(t, step) for t in ticks], [left + pw * t for t in ticks], title, "confidence",
                   "accuracy")
    total = sum(c for c in bins["count"] if c) or 1
    for i, (acc, conf, n) in enumerate(zip(bins["accuracy"], bins["confidence"], bins["count"])):
        if not n or acc is None or conf is None:
            continue
        x0 = left + pw * edges[i]
        bw = pw * (edges[i + 1] - edges[i])
        ya = top + ph * (1 - acc)
        yc = top + ph * (1 - conf)
        parts.append(f'<rect class="bar" x="{x0 + .5:.1f}" y="{ya:.1f}" width="{bw - 1:.1f}" height="{top + ph - ya:.1f}" '
                     f'fill="{color}" opacity="{0.35 + 0.65 * min(1.0, 8 * n / total):.2f}">'
                     f'<title>confidence {edges[i]:.2f}-{edges[i + 1]:.2f}: {n} images, accuracy {acc:.3f}, '
                     f'mean confidence {conf:.3f}</title></rect>')
        under = acc > conf
        kind = "under" if under else "over"
        lo, hi = sorted((ya, yc))
        parts.append(f'<rect class="gap {kind}" data-accuracy="{acc:.4f}" data-confidence="{conf:.4f}" '
                     f'x="{x0 + .5:.1f}" y="{lo:.1f}" width="{bw - 1:.1f}" height="{max(hi - lo, .5):.1f}" '
                     f'fill="{UNDER_COLOR if under else OVER_COLOR}" fill-opacity="0.75" stroke="#333" '
                     f'stroke-width="0.4"><title>{kind}-confident: accuracy {acc:.3f}, mean confidence {conf:.3f}'
                     f'</title></rect>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top}" stroke="#444" stroke-dasharray="4 3"/>')
    parts += _swatches(left + 6, top + 12, [("over-confident", OVER_COLOR), ("under-confident", UNDER_COLOR)])
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(edges, series: list[tuple[str, list[int], str]], title: str, w: int = 420, h: int = 270) -> str:
    """Share of images per confidence bin, one bar per series side by side."""
    left, bottom, top, right = 44, 34, 22, 8
    pw, ph = w - left - right, h - top - bottom
    shares = [[c / (sum(counts) or 1) for c in counts] for _, counts, _ in series]
    ticks = nice_ticks(0, max(0.05, max(max(s) for s in shares)), 6)
    ymax, step = ticks[-1], ticks[1] - ticks[0]
    xt = nice_ticks(0, 1, 6)
    parts = [_svg_open(w, h, title)]
    parts += _axes(w, h, left, bottom, top, right, [(t / ymax, t) for t in ticks],
                   lambda v: tick_label(v, step, percent=True), [tick_label(t, xt[1]) for t in xt],
                   [left + pw * t for t in xt], title, "confidence (top-1 probability)", "share of images")
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


def _legend(x, y, items) -> list[str]:
    out = []
    for i, (name, color, dash) in enumerate(items):
        yy = y + 13 * i
        out.append(f'<line x1="{x}" y1="{yy}" x2="{x + 16}" y2="{yy}" stroke="{color}" stroke-width="3" '
                   f'{f"stroke-dasharray={chr(34)}{dash}{chr(34)}" if dash else ""}/>')
        out.append(f'<text x="{x + 20}" y="{yy + 3.5}" class="tk">{_e(name)}</text>')
    return out


def svg_lines(xs, series: list[tuple[str, list, str, str]], title: str, ticks: list[float], fmt,
              w: int = 185, h: int = 150, legend: bool = False, zero_line: bool = False) -> str:
    """A small line chart: value against severity (0 = clean) for each series; the y axis spans ``ticks``
    (from :func:`nice_ticks`) and ``fmt(value, step)`` labels them."""
    left, bottom, top, right = 42, 30, 20, 6
    pw, ph = w - left - right, h - top - bottom
    lo, hi = ticks[0], ticks[-1]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    xpos = [left + pw * i / max(1, len(xs) - 1) for i in range(len(xs))]
    parts = [_svg_open(w, h, title)]
    parts += _axes(w, h, left, bottom, top, right, [((t - lo) / (hi - lo), t) for t in ticks],
                   lambda v: fmt(v, step), [str(x) for x in xs], xpos, title, "severity (0 = clean)", "")
    if zero_line and lo < 0 < hi:
        y0 = top + ph * (1 - (0 - lo) / (hi - lo))
        parts.append(f'<line x1="{left}" y1="{y0:.1f}" x2="{w - right}" y2="{y0:.1f}" stroke="#888" stroke-width="1"/>')
    for name, ys, color, dash in series:
        pts = [(xpos[i], top + ph * (1 - (v - lo) / (hi - lo)), v) for i, v in enumerate(ys) if v is not None]
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
        parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2" '
                     f'{f"stroke-dasharray={chr(34)}{dash}{chr(34)}" if dash else ""}/>')
        for x, y, v in pts:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.4" fill="{color}"><title>{_e(name)}: '
                         f'{_e(fmt(v, step / 10))}</title></circle>')
    if legend:
        parts += _legend(left + 6, top + ph - 8 - 13 * (len(series) - 1), [(n, c, d) for n, _, c, d in series])
    parts.append("</svg>")
    return "".join(parts)


def svg_budget(rows: list[tuple[str, float, float, float, str]], title: str, w: int = 560) -> str:
    """Horizontal bars: for each (label, measured, required with margin, budget, note) the measured bytes, the
    margin on top, against the budget (the full bar width)."""
    left, right, top, row_h = 120, 70, 22, 34
    h = top + row_h * len(rows) + 10
    pw = w - left - right
    parts = [_svg_open(w, h, title), f'<text x="{w / 2:.1f}" y="14" text-anchor="middle" class="ct">{_e(title)}</text>']
    for i, (label, need, required, budget, note) in enumerate(rows):
        y = top + i * row_h + 4
        scale = pw / max(budget, required, 1)
        parts.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end" class="tk">{_e(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{budget * scale:.1f}" height="16" fill="#eee" stroke="#999"/>')
        parts.append(f'<rect x="{left}" y="{y}" width="{need * scale:.1f}" height="16" fill="{FP32_COLOR}">'
                     f'<title>measured {need:,.0f} B</title></rect>')
        parts.append(f'<rect x="{left + need * scale:.1f}" y="{y}" width="{max(0.0, required - need) * scale:.1f}" '
                     f'height="16" fill="{FP32_COLOR}" fill-opacity="0.4"><title>with margin {required:,.0f} B'
                     f'</title></rect>')
        parts.append(f'<text x="{left + budget * scale + 4:.1f}" y="{y + 12}" class="tk">'
                     f'{_e(f"{required / budget:.1%}" if budget else "")}</text>')
        parts.append(f'<text x="{left}" y="{y + 28}" class="tk">{_e(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- page

# the stylesheet of every page the project writes (report.html, study.html)
CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1240px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:18px;margin:30px 0 6px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 4px}
p,li{font-size:14px;line-height:1.45}.muted{color:#666;font-size:12.5px}
.verdict{border-radius:8px;padding:14px 18px;margin:12px 0;color:#fff}
.pass{background:#2e7d32}.fail{background:#c62828}
.verdict .big{font-size:26px;font-weight:700}.verdict p{margin:4px 0 0;font-size:14px}
.alarm{border:3px solid #b71c1c;background:#ffebee;color:#b71c1c;border-radius:8px;padding:12px 16px;margin:12px 0;
font-size:17px;font-weight:700}.alarm p{font-size:14px;font-weight:400;color:#5d1010;margin:4px 0 0}
.warn{border-left:5px solid #ef6c00;background:#fff3e0;padding:8px 12px;margin:10px 0}.warn li{margin:2px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:150px}
.card .v{font-size:19px;font-weight:600}.card .k{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:13px;background:#fff;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td.l,th.l{text-align:left}tr.bad td{background:#fdecea}tr.ok td{background:#edf7ed}
td.why{max-width:560px;font-size:12px;color:#333}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.grid3{display:grid;grid-template-columns:repeat(auto-fill,minmax(585px,1fr));gap:8px}
.corr .row{gap:6px}
.corr{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:4px 8px}
.corr h3{margin:4px 0}.corr h3 span{font-weight:400;color:#666;font-size:12px}
svg{background:#fff}svg .ct{font-size:12px;font-weight:600}svg .tk{font-size:10px;fill:#444}
svg .grid{stroke:#eee}svg .ax{stroke:#888}
code{background:#eee;padding:0 3px;border-radius:3px;font-size:12.5px}
details{margin:6px 0}summary{cursor:pointer;font-size:14px}
nav{font-size:13px;margin:6px 0 0}nav a{margin-right:10px;color:#1565c0;text-decoration:none}
table.cm td{width:34px;padding:2px 3px;font-size:12px}table.cm td.d{outline:2px solid #555;outline-offset:-2px}
table.cm th{font-size:11px;font-weight:600}table.cm th.c{writing-mode:vertical-rl;transform:rotate(180deg);
text-align:left;padding:4px 2px;white-space:nowrap}
.flips{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.flip{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;width:150px;font-size:12px;text-align:center}
.flip img{image-rendering:pixelated;width:56px;height:56px;border:1px solid #ccc;display:block;margin:0 auto 4px}
.flip .f{color:#1f77b4}.flip .q{color:#d62728;font-weight:600}
"""

_SECTION_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError, OverflowError)


def _guard(title: str, fn, *args) -> str:
    """One section; a malformed field (a received report.json is data) gives one line, not a broken page."""
    try:
        return fn(*args)
    except _SECTION_ERRORS as e:
        return (f"<h2>{_e(title)}</h2><p class='muted'>This section could not be drawn: report.json has a "
                f"malformed field ({_e(type(e).__name__)}: {_e(str(e)[:120])}).</p>")


def _d(v) -> dict:
    return v if isinstance(v, dict) else {}


GATE_HELP = {
    "fp32_above_chance": "the FP32 reference itself works: its top-1 is well above chance on these images",
    "fully_int8": "every op and tensor in the .tflite is int8 (int32 only for biases and shapes)",
    "precision_ok": "the converted model meets the target's precision contract",
    "max_drop_pp": "FP32 top-1 minus int8 top-1, in percentage points, at most the limit",
    "min_agreement": "share of test images whose top-1 class is the same for FP32 and int8, at least the limit",
    "arena_fits_ram": "TFLite-Micro tensor arena (plus margin) fits the board's RAM",
    "model_fits_flash": "the .tflite flatbuffer (plus margin) fits the board's flash",
    "tflm_matches_litert": "TFLite-Micro outputs match LiteRT within the limit (output steps)",
    "max_ece_increase": "int8 ECE minus FP32 ECE on the clean test split, at most the limit",
    "max_worst_drop_pp": "largest top-1 drop over every class and every shifted set, at most the limit",
}


def _val(v, key: str = "") -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if key in ("min_agreement", "fp32_above_chance"):
            return pct(v)
        if key.endswith("_pp"):
            return pp(v)
        return f"{v:.4g}"
    return _e(v) if v is not None else ""


def render(report: dict) -> str:
    """The page for an export's report dict, with the reliability sections when they ran."""
    model = _d(report.get("model")).get("spec", "model")
    target = _d(report.get("target")).get("name", "")
    rel = "calibration_drift" in report
    what = "Export and reliability report" if rel else "Export report"
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{what}: {_e(model)} ({_e(target)})</title><style>{CSS}</style></head><body><main>",
           f"<h1>{_e(model)} &rarr; {_e(target)}: {what.lower()}</h1>",
           _guard("Summary", _intro, report)]
    nav = [("gates", "Gates"), ("accuracy", "FP32 vs int8"), ("model", "Model and sizes"),
           ("quantization", "Quantization"), ("preprocessing", "Preprocessing"), ("calibration-set", "Calibration set"),
           ("latency", "Latency (host)")]
    if _d(_d(report.get("device")).get("tflite_micro")):
        nav.append(("device", "Microcontroller budget"))
    if _d(report.get("firmware")):
        nav.append(("firmware", "Firmware package"))
    if _d(report.get("layer_errors")):
        nav.append(("layers", "Layer-wise error"))
    if _d(report.get("recovery")):
        nav.append(("recovery", "Recovery"))
    if rel:
        nav += [("calibration", "Calibration drift"), ("temperature", "Temperature"), ("flips", "Flip flags"),
                ("shifts", "Distribution shift"), ("per-class", "Per class")]
    out.append("<nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav) + "</nav>")
    out.append(_guard("Gates", _gates_html, report))
    out.append(_guard("FP32 vs int8", _accuracy_html, report))
    out.append(_guard("Model and sizes", _model_html, report))
    out.append(_guard("Quantization", _quantization_html, report))
    out.append(_guard("Preprocessing", _preprocessing_html, report))
    out.append(_guard("Calibration set", _calibration_set_html, report))
    out.append(_guard("Latency", _latency_html, report))
    out.append(_guard("Device", _device_html, report))
    out.append(_guard("Firmware package", _firmware_html, report))
    from pipeline.report.layers_html import layers_html
    out.append(_guard("Layer-wise error", layers_html, report))
    out.append(_guard("Recovery", _recovery_html, report))
    if rel:
        out.append(_guard("Calibration drift", _calibration_html, report))
        out.append(_guard("Temperature scaling", _temperature_html, report))
        out.append(_guard("Prediction flips", _flip_detectors_html, report))
        sh = _d(report.get("shifts"))
        if sh.get("records"):
            out.append(_guard("Distribution shift", _shifts_html, sh))
        out.append(_guard("Per class", _per_class_html, report))
    out.append(_guard("How these numbers were obtained", _provenance_html, report))
    out.append("</main></body></html>")
    return "\n".join(out)


def _intro(report: dict) -> str:
    m, a, data = _d(report.get("model")), _d(report.get("accuracy")), _d(report.get("data"))
    gates = _d(report.get("gates"))
    failed = [k for k, g in gates.items() if isinstance(g, dict) and not g.get("passed", True)]
    passed = bool(report.get("passed", not failed))
    prec = _d(report.get("target")).get("precision", "int8")
    out = [f'<p class="muted">{_e(m.get("description", ""))}{"; " if m.get("description") else ""}data: '
           f'{_e(data.get("name", ""))} {_e(data.get("split", "test"))} split, {_e(data.get("evaluated", a.get("n", "")))} '
           f'images; schema {_e(report.get("schema_version", ""))}.</p>']
    if m.get("weights_missing"):
        out.append('<div class="alarm">Built without --weights: random initialisation.'
                   "<p>The model factory was called without trained weights, so every accuracy figure below measures "
                   "an untrained network. Pass <code>--weights</code> with the trained state dict and export "
                   "again.</p></div>")
    sentences = []
    if _is_num(a.get("fp32_top1")) and _is_num(a.get("int8_top1")):
        sentences.append(
            f"On {a.get('n')} test images the {_e(prec)} model scores {pct(a['int8_top1'])} top-1 against "
            f"{pct(a['fp32_top1'])} for FP32 ({pp(a.get('drop_pp'))} drop) and agrees with FP32 on "
            f"{pct(a.get('agreement'))} of them ({a.get('flips', 0)} flipped).")
    art = _d(report.get("artifacts"))
    onnx_b, tfl_b = _d(art.get("onnx")).get("bytes"), _d(art.get("tflite")).get("bytes")
    if _is_num(onnx_b) and _is_num(tfl_b) and tfl_b:
        sentences.append(f"Size: ONNX {_bytes(onnx_b)} &rarr; TFLite {_bytes(tfl_b)} ({onnx_b / tfl_b:.1f}&times; smaller).")
    mic = _d(_d(report.get("device")).get("tflite_micro"))
    if mic:
        rc, fc = _d(mic.get("ram_check")), _d(mic.get("flash_check"))
        sentences.append(f"On the board: arena {_bytes(mic.get('arena_bytes'))} "
                         f"({'fits' if rc.get('fits') else 'does NOT fit'} {_bytes(rc.get('budget_bytes'))} RAM), "
                         f"flash {_bytes(mic.get('flash_bytes'))} ({'fits' if fc.get('fits') else 'does NOT fit'} "
                         f"{_bytes(fc.get('budget_bytes'))}), both with a {pct(rc.get('margin'), 0)} margin"
                         + (f" (budget given by you: {_e(t.get('budget_given_by') or '')})"
                            if (t := _d(report.get("target"))).get("budget_source") == "user" else "") + ".")
    if "calibration_drift" in report:
        sentences += _reliability_sentences(report)
    out.append(f'<div class="verdict {"pass" if passed else "fail"}"><div class="big">{"PASS" if passed else "FAIL"}</div>'
               + (f"<p>Failed gates: {_e(', '.join(failed))}.</p>" if failed else f"<p>All {len(gates)} gates passed.</p>")
               + "".join(f"<p>{s}</p>" for s in sentences) + "</div>")
    warns = [w for w in report.get("warnings") or [] if isinstance(w, str)]
    if warns:
        out.append('<div class="warn"><b>Warnings</b><ul>' + "".join(f"<li>{_e(w)}</li>" for w in warns) + "</ul></div>")
    cards = []
    if a:
        cards += [("FP32 top-1", pct(a.get("fp32_top1"))), (f"{prec} top-1", pct(a.get("int8_top1"))),
                  ("top-1 drop", pp(a.get("drop_pp"))), ("agreement", pct(a.get("agreement"))),
                  ("flips", f"{a.get('flips')} / {a.get('n')}")]
    if _is_num(onnx_b) and _is_num(tfl_b):
        cards.append(("ONNX → TFLite", f"{_bytes(onnx_b)} → {_bytes(tfl_b)}"))
    lat = _d(_d(report.get("runtime")).get("latency"))
    if lat.get("measured"):
        k, v = next(iter(_d(lat.get("kernels")).items()))
        cards.append((f"median latency, {k} (host CPU)", f"{v['median_ms']:.3f} ms"))
    if mic:
        cards.append(("arena / RAM budget", f"{_bytes(mic.get('arena_bytes'))} / {_bytes(_d(mic.get('ram_check')).get('budget_bytes'))}"))
    if "calibration_drift" in report:
        cd, pc, sh = report["calibration_drift"], _d(report.get("per_class")), _d(report.get("shifts"))
        cards.append(("ECE FP32 → int8", f"{num(cd['fp32']['ece'])} → {num(cd['int8']['ece'])}"))
        if pc.get("worst_class"):
            wc = pc["worst_class"]
            cards.append(("worst class", f"{wc.get('label', wc['name'])} ({pp(wc['drop_pp'])})"))
        if sh.get("records"):
            w = sh["worst_by_int8_drop"]
            cards.append(("worst shifted set", f"{w['corruption']} s{w['severity']} ({pp(w['drop_pp'])})"))
    out.append('<div class="cards">' + "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}'
                                               f"</div></div>" for k, v in cards) + "</div>")
    return "\n".join(out)


def _reliability_sentences(report: dict) -> list[str]:
    cd, fl, sh = report["calibration_drift"], report["flips"], _d(report.get("shifts"))
    f, q, d = cd["fp32"], cd["int8"], cd["delta"]
    out = [f"Calibration: ECE {num(f['ece'])} (FP32) &rarr; {num(q['ece'])} (int8), a change of {d['ece']:+.4f}."]
    if sh.get("records"):
        w, wf = sh["worst_by_int8_drop"], sh["worst_by_flip_rate"]
        mean = sh["mean"]["drop_pp"]
        change = ("matches FP32 on average" if round(mean, 2) == 0 else
                  f"{'loses' if mean > 0 else 'gains'} {abs(mean):.2f} pp on average against FP32")
        out.append(f"Under {sh['sets']} shifted test sets the int8 model {change}; the worst set is <b>{_e(w['corruption'])} severity {_e(w['severity'])}</b> "
                   f"({pp(w['drop_pp'])}), and the most flips happen on <b>{_e(wf['corruption'])} severity "
                   f"{_e(wf['severity'])}</b> ({pct(wf['flip_rate'])} of images).")
    if fl.get("best_detector"):
        b = fl["best_detector"]
        out.append(f"The best cheap flag for flipped predictions is <b>{_e(b)}</b> (AUROC "
                   f"{num(fl['detectors'][b]['auroc'], 3)}).")
    return out


def _gates_html(report: dict) -> str:
    out = ["<h2 id='gates'>Gates</h2><p>The export passes when every gate passes. <i>Why</i> is the gate's own "
           "reason (or rule) as recorded in report.json.</p><table><tr><th class='l'>gate</th><th>value</th>"
           "<th>limit</th><th class='l'>result</th><th class='l'>what it checks</th><th class='l'>why</th></tr>"]
    for k, g in _d(report.get("gates")).items():
        if not isinstance(g, dict):
            continue
        limit = g.get("limit", g.get("limit_steps", g.get("required", "")))
        if k == "fp32_above_chance" and _is_num(g.get("chance")):
            limit_s = f"{pct(limit)} (chance {pct(g['chance'])})" if _is_num(limit) else _val(limit)
        else:
            limit_s = _val(limit, k)
        why = g.get("reason") or g.get("note") or ""
        rule = g.get("rule") if g.get("rule") and g.get("rule") != why else ""
        group = f" ({g['group']})" if isinstance(g.get("group"), str) else ""
        out.append(f"<tr class='{'ok' if g.get('passed') else 'bad'}'><td class='l'><code>{_e(k)}</code></td>"
                   f"<td>{_val(g.get('value'), k)}{_e(group)}</td><td>{limit_s}</td>"
                   f"<td class='l'>{'pass' if g.get('passed') else 'FAIL'}</td>"
                   f"<td class='l why'>{_e(GATE_HELP.get(k, ''))}</td>"
                   f"<td class='l why'>{_e(why)}{'<br>' if why and rule else ''}"
                   f"{f'<span class=muted>{_e(rule)}</span>' if rule else ''}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


_PNG_B64 = re.compile(r"iVBORw0KGgo[A-Za-z0-9+/]*={0,2}")


def _class_names(report: dict, k: int) -> list[str]:
    names = _d(report.get("data")).get("class_names")
    conf_names = _d(_d(report.get("fp32_vs_int8")).get("confusion")).get("names")
    for cand in (names, conf_names):
        if isinstance(cand, list) and len(cand) >= k:
            return [str(c) for c in cand[:k]]
    return [str(i) for i in range(k)]


def _cell_style(v: int, diagonal: bool, vmax: int) -> str:
    if not v:
        return ""
    worse = (v < 0) if diagonal else (v > 0)
    r, g, b = WORSE_RGB if worse else BETTER_RGB
    a = 0.15 + 0.75 * min(1.0, abs(v) / max(1, vmax))
    return f" style='background:rgba({r},{g},{b},{a:.2f})'"


def _accuracy_html(report: dict) -> str:
    a = _d(report.get("accuracy"))
    prec = _d(report.get("target")).get("precision", "int8")
    out = ["<h2 id='accuracy'>FP32 vs int8 on the test images</h2>",
           f"<p class='muted'>{_e(a.get('evaluated_on', ''))}.</p><table><tr><th class='l'></th><th>value</th>"
           "<th class='l'>meaning</th></tr>"]
    rows = [("FP32 top-1", pct(a.get("fp32_top1")), "the reference model"),
            (f"{prec} top-1", pct(a.get("int8_top1")), "the deployed model on the target's kernels"),
            ("top-1 drop", pp(a.get("drop_pp")), "FP32 minus deployed, percentage points"),
            ("agreement", pct(a.get("agreement")), "share of images with the same top-1 class"),
            ("flips", f"{a.get('flips')} of {a.get('n')}", "images whose top-1 class changed")]
    if _is_num(a.get("max_error_steps")):
        rows.append(("max |int8 − FP32|", f"{a['max_error_steps']:.1f} steps",
                     f"largest output difference in output quantization steps (scale {a.get('output_scale', 0):.4g}); "
                     f"mean {a.get('mean_error_steps', 0):.2f} steps"))
    for k, v, m in rows:
        out.append(f"<tr><td class='l'>{_e(k)}</td><td>{_e(v)}</td><td class='l'>{_e(m)}</td></tr>")
    out.append("</table>")
    fv = _d(report.get("fp32_vs_int8"))
    if fv:
        out.append(_confusion_html(report, _d(fv.get("confusion"))))
        out.append(_flip_examples_html(fv.get("flip_examples") or []))
    return "\n".join(out)


def _confusion_html(report: dict, c: dict) -> str:
    if not c:
        return ""
    k = int(c.get("classes", 0))
    names = _class_names(report, k)
    out = ["<h3>Where the int8 model's predictions differ: confusion matrix, int8 minus FP32</h3>",
           "<p>Each cell counts test images of the true class (row) predicted as the column's class, int8 count "
           "minus FP32 count. <span style='color:#b71c1c'>Red</span>: the int8 model does worse (a mistake made more "
           "often, or a correct diagonal cell lost); <span style='color:#1b5e20'>green</span>: it does better; "
           "blank: no change. Diagonal cells are outlined.</p>"]
    delta = c.get("delta")
    if c.get("flips") == 0:
        return out[0] + "<p>No cell changed: on every test image both models predict the same class.</p>"
    if isinstance(delta, list) and len(delta) == k:
        vmax = max([abs(int(v)) for r in delta for v in r] + [1])
        out.append("<table class='cm'><tr><th class='l'>true \\ predicted</th>"
                   + "".join(f"<th class='c'>{_e(n)}</th>" for n in names) + "</tr>")
        for i, r in enumerate(delta):
            cells = []
            for j, v in enumerate(r):
                v = int(v)
                cls = " class='d'" if i == j else ""
                cells.append(f"<td{cls}{_cell_style(v, i == j, vmax)} title='true {_e(names[i])}, predicted "
                             f"{_e(names[j])}: int8 − FP32 = {v:+d}'>{f'{v:+d}' if v else ''}</td>")
            out.append(f"<tr><th class='l'>{_e(names[i])}</th>{''.join(cells)}</tr>")
        out.append("</table>")
    elif c.get("top_delta"):
        out.append(f"<p class='muted'>{_e(c.get('matrices_omitted', ''))}</p><table><tr><th class='l'>true class</th>"
                   "<th class='l'>predicted</th><th>int8 − FP32</th></tr>")
        for cell in c["top_delta"]:
            out.append(f"<tr><td class='l'>{_e(names[cell['row']])}</td><td class='l'>{_e(names[cell['col']])}</td>"
                       f"<td>{int(cell['count']):+d}</td></tr>")
        out.append("</table>")
    tf = c.get("top_flips") or []
    if tf:
        out.append("<p>Most common flips (FP32 class &rarr; int8 class): " + ", ".join(
            f"{_e(names[t['row']])} &rarr; {_e(names[t['col']])} ({int(t['count'])})" for t in tf[:8]) + ".</p>")
    else:
        out.append("<p>No test image changed its top-1 class.</p>")
    return "\n".join(out)


def _flip_examples_html(examples: list) -> str:
    if not examples:
        return ""
    out = ["<h3>The most confident flips</h3><p>Flipped test images, the highest int8 confidence first: the "
           "deployed model is sure, and disagrees with FP32. Confidence is the softmax top-1 probability.</p>"
           "<div class='flips'>"]
    for ex in examples[:8]:
        if not isinstance(ex, dict):
            continue
        png = ex.get("png")
        img = (f"<img alt='test image {_e(ex.get('index'))}' src='data:image/png;base64,{png}'>"
               if isinstance(png, str) and len(png) < 400_000 and _PNG_B64.fullmatch(png) else "")
        f, q = _d(ex.get("fp32")), _d(ex.get("int8"))
        out.append(f"<div class='flip'>{img}<div>#{_e(ex.get('index'))} true <b>{_e(ex.get('label_name', ex.get('label')))}</b></div>"
                   f"<div class='f'>FP32 {_e(f.get('name'))} {pct(f.get('confidence'), 0)}</div>"
                   f"<div class='q'>int8 {_e(q.get('name'))} {pct(q.get('confidence'), 0)}</div></div>")
    out.append("</div>")
    return "\n".join(out)


def _kv_table(rows: list[tuple[str, str]], head=("", "")) -> str:
    top = ("<tr>" + "".join(f"<th class='l'>{_e(h)}</th>" for h in head) + "</tr>") if any(head) else ""
    return ("<table>" + top
            + "".join(f"<tr><td class='l'>{_e(k)}</td><td class='l'>{v}</td></tr>" for k, v in rows) + "</table>")


def _model_html(report: dict) -> str:
    m, art, onnx, conv = (_d(report.get(k)) for k in ("model", "artifacts", "onnx", "conversion"))
    onnx_b, tfl_b = _d(art.get("onnx")).get("bytes"), _d(art.get("tflite")).get("bytes")
    out = ["<h2 id='model'>Model and sizes</h2><div class='row'>"]
    rows = [("model", _e(m.get("spec", ""))), ("kind", _e(m.get("kind", ""))),
            ("parameters", f"{m['parameters']:,}" if _is_num(m.get("parameters")) else "n/a"),
            ("weights", _e(m.get("weights") or "none") + (" <b style='color:#b71c1c'>(random initialisation)</b>"
                                                         if m.get("weights_missing") else "")),
            ("classes", _e(m.get("num_classes", ""))),
            ("ONNX", f"{_bytes(onnx_b)}, opset {_e(onnx.get('opset', ''))}, max |ONNX − PyTorch| "
                     f"{onnx.get('max_abs_error_vs_pytorch', 0):.2g} on {_e(onnx.get('compared_samples', ''))} inputs"),
            ("converter", _e(conv.get("converter", "")) + f", input layout {_e(conv.get('input_layout', ''))}")]
    if _is_num(onnx_b) and _is_num(tfl_b) and tfl_b:
        r = onnx_b / tfl_b
        rows.append(("ONNX → TFLite", f"{_bytes(onnx_b)} → {_bytes(tfl_b)} "
                                      f"({f'{r:.2f}× smaller' if r >= 1 else f'{1 / r:.2f}× larger'})"))
    b = _d(art.get("bundle"))
    if _is_num(b.get("tar_bytes")):
        rows.append(("device bundle", f"bundle/ and bundle.tar.gz ({_bytes(b['tar_bytes'])})"))
    out.append(_kv_table(rows, ("", "")))
    if _is_num(onnx_b) and _is_num(tfl_b) and max(onnx_b, tfl_b) > 0:
        w, left = 380, 90
        sc = (w - left - 80) / max(onnx_b, tfl_b)
        svg = [_svg_open(w, 80, "file sizes"), f'<text x="{w / 2}" y="14" text-anchor="middle" class="ct">File size</text>']
        for i, (lbl, v, col) in enumerate((("ONNX (FP32)", onnx_b, FP32_COLOR), ("TFLite", tfl_b, INT8_COLOR))):
            y = 24 + 26 * i
            svg.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end" class="tk">{lbl}</text>'
                       f'<rect x="{left}" y="{y}" width="{v * sc:.1f}" height="16" fill="{col}"/>'
                       f'<text x="{left + v * sc + 4:.1f}" y="{y + 12}" class="tk">{_e(_bytes(v))}</text>')
        out.append("".join(svg) + "</svg>")
    out.append("</div>")
    return "\n".join(out)


def _quant(t: dict) -> tuple[str, str]:
    q = _d(t.get("quantization"))
    sc, zp = q.get("scale") or [], q.get("zero_point") or []
    s = ", ".join(f"{v:.6g}" for v in sc[:4]) + (" …" if len(sc) > 4 else "")
    z = ", ".join(str(v) for v in zp[:4]) + (" …" if len(zp) > 4 else "")
    return s or "–", z or "–"


def _quantization_html(report: dict) -> str:
    q = _d(report.get("quantization"))
    prec = _d(q.get("precision"))
    out = ["<h2 id='quantization'>Quantization: ops and tensors</h2>",
           f"<p>fully_int8: <b>{_val(q.get('fully_int8'))}</b>; input {_e(q.get('input_dtype'))}, output "
           f"{_e(q.get('output_dtype'))}; weights per channel: {_val(q.get('weights_per_channel'))}. "
           f"{_e(prec.get('reason', ''))}.</p>",
           "<p class='muted'>A quantized tensor stores q; the real value is scale × (q − zero point).</p>"
           "<div class='row'><table><tr><th class='l'>op</th><th>count</th></tr>"]
    ops = _d(q.get("ops"))
    for k, v in sorted(ops.items(), key=lambda kv: (-kv[1] if _is_num(kv[1]) else 0, kv[0])):
        out.append(f"<tr><td class='l'><code>{_e(k)}</code></td><td>{_val(v)}</td></tr>")
    out.append(f"<tr><th class='l'>total</th><th>{sum(v for v in ops.values() if _is_num(v))}</th></tr></table>")
    td = _d(q.get("tensor_dtypes"))
    if td:
        out.append("<table><tr><th class='l'>tensor dtype</th><th>tensors</th></tr>" + "".join(
            f"<tr><td class='l'>{_e(k)}</td><td>{_val(v)}</td></tr>" for k, v in td.items()) + "</table>")
    out.append("<table><tr><th class='l'>graph</th><th class='l'>name</th><th class='l'>dtype</th><th class='l'>shape</th>"
               "<th>scale</th><th>zero point</th></tr>")
    for kind in ("inputs", "outputs"):
        for t in q.get(kind) or []:
            t = _d(t)
            s, z = _quant(t)
            shape = t.get("shape_signature") or t.get("shape") or []
            out.append(f"<tr><td class='l'>{kind[:-1]}</td><td class='l'><code>{_e(t.get('name', ''))}</code></td>"
                       f"<td class='l'>{_e(t.get('dtype', ''))}</td><td class='l'>{_e(list(shape))}</td>"
                       f"<td>{_e(s)}</td><td>{_e(z)}</td></tr>")
    out.append("</table></div>")
    off = q.get("offending_ops") or []
    if off:
        out.append("<p><b>Not int8:</b> " + _e("; ".join(map(str, off[:10]))) + "</p>")
    return "\n".join(out)


def _floats(v) -> str:
    return ", ".join(f"{x:.4g}" for x in v) if isinstance(v, list) else _e(v)


def _preprocessing_html(report: dict) -> str:
    pre, q = _d(report.get("preprocessing")), _d(report.get("quantization"))
    scale = pre.get("scale")
    scale_s = "1/255" if _is_num(scale) and abs(scale - 1 / 255) < 1e-9 else _e(scale)
    qi = _d(_d((q.get("inputs") or [{}])[0]).get("quantization"))
    rows = [("formula", f"<code>{_e(pre.get('formula', 'x = (raw * scale - mean[c]) / std[c]'))}</code>"),
            ("scale", scale_s), ("mean", _floats(pre.get("mean"))), ("std", _floats(pre.get("std"))),
            ("layout", f"{_e(pre.get('source_layout', ''))} {_e(pre.get('source_dtype', ''))} data &rarr; model "
                       f"{_e(pre.get('layout', 'NCHW'))} {_e(pre.get('input_shape', ''))} &rarr; TFLite "
                       f"{_e(pre.get('tflite_input_layout', ''))} {_e(q.get('input_dtype', ''))}"),
            ("raw range", _floats(pre.get("raw_range")))]
    if qi.get("scale"):
        rows.append(("TFLite input quantization", f"scale {qi['scale'][0]:.6g}, zero point {_e(qi.get('zero_point', [''])[0])}"))
    out = ["<h2 id='preprocessing'>Preprocessing in use</h2><p>The same record is used for calibration, evaluation, "
           "the device bundle and the Raspberry Pi script.</p>", _kv_table(rows, ("", ""))]
    g = _d(_d(report.get("gates")).get("fp32_above_chance"))
    if g:
        out.append(f"<p>FP32 sanity: top-1 {pct(g.get('value'))} against chance {pct(g.get('chance'))} (must exceed "
                   f"{pct(g.get('limit'))}): <b>{'pass' if g.get('passed') else 'FAIL'}</b>. "
                   f"{_e(g.get('reason', ''))}</p>")
    probe = _d(report.get("preprocessing_probe"))
    if probe.get("candidates"):
        out.append(f"<h3>Preprocessing probe</h3><p>FP32 top-1 on the first {_e(probe.get('images'))} test images "
                   "under the preprocessing in use and the usual alternatives. A much better alternative means the "
                   "mean/std (or channel order) in use is probably wrong.</p><table><tr><th class='l'>candidate</th>"
                   "<th class='l'>mean</th><th class='l'>std</th><th class='l'>channels reversed</th><th>FP32 top-1</th>"
                   "<th class='l'>clearly better</th></tr>")
        for c in probe["candidates"]:
            c = _d(c)
            cls = " class=ok" if c.get("name") == "in use" else (" class=bad" if c.get("clearly_better") else "")
            out.append(f"<tr{cls}><td class='l'>{_e(c.get('name'))}</td><td class='l'>{_floats(c.get('mean'))}</td>"
                       f"<td class='l'>{_floats(c.get('std'))}</td><td class='l'>{_val(bool(c.get('channels_reversed')))}</td>"
                       f"<td>{pct(c.get('top1'), 1)}</td><td class='l'>"
                       f"{'' if 'clearly_better' not in c else ('YES' if c['clearly_better'] else 'no')}</td></tr>")
        out.append(f"</table><p class='muted'>{_e(probe.get('rule', ''))}</p>")
        b = _d(probe.get("better"))
        if b:
            out.append(f"<div class='warn'><b>Another preprocessing is clearly better:</b> {_e(b.get('name', ''))} "
                       f"(mean {_floats(b.get('mean'))}, std {_floats(b.get('std'))}, FP32 top-1 "
                       f"{pct(b.get('top1'), 1)}). Check <code>--mean</code>/<code>--std</code>.</div>")
    return "\n".join(out)


def _calibration_set_html(report: dict) -> str:
    c = _d(report.get("calibration"))
    st = _d(c.get("statistics"))
    rows = [("source", f"<code>{_e(c.get('spec', c.get('source', '')))}</code>"),
            ("samples", _e(c.get("size", ""))), ("seed", _e(c.get("seed", ""))),
            ("origin", _e(c.get("origin", "")) + (f" ({_e(c.get('split'))} split)" if c.get("split") else ""))]
    if _is_num(c.get("coverage_of_training_range")):
        rows.append(("coverage of the training range", pct(c["coverage_of_training_range"], 1)))
    if _is_num(st.get("fraction_of_input_range")):
        rows.append(("share of the model input range", pct(st["fraction_of_input_range"], 1)))
    if st:
        rows.append(("statistics (" + _e(st.get("space", "")) + ")",
                     f"min {st.get('min', 0):.4g}, max {st.get('max', 0):.4g}, mean {st.get('mean', 0):.4g}, "
                     f"std {st.get('std', 0):.4g}"))
    pc = c.get("per_class")
    if isinstance(pc, list) and pc:
        rows.append(("per class", _e(", ".join(map(str, pc)))))
    for k, v in c.items():  # whatever else a source describes (synthetic, shifted, folder, ...)
        if k not in ("source", "spec", "size", "seed", "origin", "split", "statistics", "per_class",
                     "coverage_of_training_range") and isinstance(v, (str, int, float)) and not isinstance(v, bool):
            rows.append((k, _e(v)))
    return ("<h2 id='calibration-set'>Calibration set (representative dataset)</h2><p>The images the converter "
            "saw to choose the int8 activation ranges. Coverage says how much of the value range seen in training "
            "they span.</p>" + _kv_table(rows, ("", "")))


def _latency_html(report: dict) -> str:
    rt = _d(report.get("runtime"))
    lat, i8, f32 = _d(rt.get("latency")), _d(rt.get("int8")), _d(rt.get("fp32"))
    out = ["<h2 id='latency'>Latency and throughput on this host's CPU (not device latency)</h2>",
           f"<p><b>Host figures:</b> measured on {_e(i8.get('measured_on', 'this host'))} with the target's LiteRT "
           "kernels. They rank kernels and catch regressions; they are never a device's latency.</p>"]
    if lat.get("measured"):
        out.append("<table><tr><th class='l'>kernels</th><th>threads</th><th>median</th><th>p90</th><th>mean</th>"
                   "<th>min</th><th>first run</th><th>runs</th></tr>")
        for k, v in _d(lat.get("kernels")).items():
            v = _d(v)
            ms = lambda x: f"{v[x]:.3f} ms" if _is_num(v.get(x)) else "n/a"  # noqa: E731
            out.append(f"<tr><td class='l'>{_e(k)}</td><td>{_e(v.get('threads'))}</td><td>{ms('median_ms')}</td>"
                       f"<td>{ms('p90_ms')}</td><td>{ms('mean_ms')}</td><td>{ms('min_ms')}</td><td>{ms('first_ms')}</td>"
                       f"<td>{_e(v.get('runs'))}</td></tr>")
        out.append(f"</table><p class='muted'>Batch {_e(lat.get('batch_size', 1))}; {_e(lat.get('note', ''))}.</p>")
        for v in _d(lat.get("kernels")).values():
            if _d(v).get("label"):
                out.append(f"<p class='muted'>{_e(v['label'])}.</p>")
                break
    elif lat:
        out.append(f"<p>Batch-1 latency not measured: {_e(lat.get('reason', ''))}.</p>")
    if _is_num(i8.get("images_per_s")):
        out.append(f"<p>Throughput (batch {_e(i8.get('batch_size'))}, host): deployed model {i8['images_per_s']:,.0f} "
                   f"images/s on LiteRT {_e(i8.get('kernels'))} with {_e(i8.get('threads'))} thread(s); FP32 "
                   f"{_fmt_rate(f32.get('images_per_s'))} images/s on {_e(f32.get('runtime', ''))}"
                   + (f" ({_e(f32['measured_while'])})" if f32.get("measured_while") else "") + ".</p>")
    dl = _d(report.get("device")).get("device_latency")
    if dl:
        out.append(f"<p class='muted'>Device latency: {_e(dl)}.</p>")
    return "\n".join(out)


def _fmt_rate(v) -> str:
    return f"{v:,.0f}" if _is_num(v) else "n/a"


def _device_html(report: dict) -> str:
    dev = _d(report.get("device"))
    m = _d(dev.get("tflite_micro"))
    if not m:
        return ""
    rc, fc, c = _d(m.get("ram_check")), _d(m.get("flash_check")), _d(m.get("compared_with_litert"))
    gates = _d(report.get("gates"))
    out = [f"<h2 id='device'>Microcontroller budget: {_e(dev.get('device', ''))}</h2>",
           f"<p>TFLite-Micro runs the model in one tensor arena; the .tflite flatbuffer sits in flash. Measured with "
           f"{_e(m.get('runtime', 'TFLite-Micro'))}; both are checked against the board's budget with a margin.</p>",
           _budget_source_html(_d(report.get("target"))),
           svg_budget([("arena → RAM", m["arena_bytes"], rc["required_bytes"], rc["budget_bytes"],
                        f"arena {_bytes(m['arena_bytes'])} + {pct(rc.get('margin'), 0)} margin of {_bytes(rc['budget_bytes'])} RAM"),
                       ("model → flash", m["flash_bytes"], fc["required_bytes"], fc["budget_bytes"],
                        f"flatbuffer {_bytes(m['flash_bytes'])} + {pct(fc.get('margin'), 0)} margin of {_bytes(fc['budget_bytes'])} flash")],
                      "Share of the board's budget (dark: measured, light: margin)"),
           "<table><tr><th class='l'>gate</th><th class='l'>result</th><th class='l'>reason</th></tr>"]
    for k in ("arena_fits_ram", "model_fits_flash", "tflm_matches_litert"):
        g = _d(gates.get(k))
        if g:
            out.append(f"<tr class='{'ok' if g.get('passed') else 'bad'}'><td class='l'><code>{k}</code></td>"
                       f"<td class='l'>{'pass' if g.get('passed') else 'FAIL'}</td><td class='l why'>{_e(g.get('reason', ''))}</td></tr>")
    out.append("</table>")
    if c:
        out.append(f"<p>TFLite-Micro against LiteRT {_e(c.get('litert_kernels', ''))} kernels on {_e(c.get('subset', ''))}: "
                   f"top-1 agreement {pct(c.get('top1_agreement'))}, max difference {_e(c.get('max_diff_steps'))} "
                   "output step(s).</p>")
    if m.get("cmsis_nn_caveat"):
        out.append(f"<p class='muted'>{_e(m['cmsis_nn_caveat'])}.</p>")
    pub = dev.get("published") or []
    if pub:
        out.append("<details><summary>Published figures for reference models on this board</summary><ul>"
                   + "".join(f"<li>{_e(p)}</li>" for p in pub) + "</ul></details>")
    return "\n".join(out)


def _g(v) -> str:
    return f"{v:.2g}" if _is_num(v) else _e(v if v is not None else "-")


def _recovery_html(report: dict) -> str:
    rc = _d(report.get("recovery"))
    if not rc:
        return ""
    b = _d(rc.get("before"))
    rows = ["<tr><th>attempt</th><th>int8 top-1</th><th>drop (pp)</th><th>agreement</th><th>FP32 change (max rel)</th>"
            "<th>seconds</th><th>gates</th></tr>",
            f"<tr><td>as first converted</td><td>{pct(b.get('int8_top1'))}</td><td>{_e(b.get('drop_pp'))}</td>"
            f"<td>{pct(b.get('agreement'))}</td><td>-</td><td>-</td><td>FAIL</td></tr>"]
    for a in rc.get("attempts") or []:
        rec = _d(a.get("record"))
        if a.get("converted"):
            rows.append(f"<tr><td>{_e(a.get('attempt'))}</td><td>{pct(a.get('int8_top1'))}</td>"
                        f"<td>{_e(a.get('drop_pp'))}</td><td>{pct(a.get('agreement'))}</td>"
                        f"<td>{_g(rec.get('fp32_max_rel_diff'))}</td><td>{_e(a.get('seconds'))}</td>"
                        f"<td>{'pass' if a.get('passed_gates') else 'FAIL'}</td></tr>")
        else:
            rows.append(f"<tr><td>{_e(a.get('attempt'))}</td><td colspan='6'>"
                        f"{_e(a.get('error') or a.get('note') or 'not converted')}</td></tr>")
    nt = "".join(f"<li>{_e(n.get('tool'))}: {_e(n.get('why'))}</li>" for n in rc.get("not_tried") or [])
    kept = rc.get("kept")
    return "\n".join([
        "<h2 id='recovery'>Recovery (--recover)</h2>",
        f"<p>Tools applied {_e(rc.get('applied', ''))}; each attempt converted again and compared with "
        f"{_e(rc.get('compared_with', ''))}. "
        + (f"<b>Kept: {_e(kept)}</b> (" + ("the original graph with the layers named in its record kept in float "
                                             "(quantization.float_ops lists the ops)" if kept.startswith("float_fallback")
                                             else "its graph is model_recovered.onnx") + ")." if kept else
           "<b>No attempt passed the gates</b>; the first model is kept.") + "</p>",
        "<table>" + "".join(rows) + "</table>",
        f"<p>Not tried:</p><ul>{nt}</ul>" if nt else ""])


def _budget_source_html(t: dict) -> str:
    """Where the RAM and flash budgets come from: the target profile, or the user (flags or a board file)."""
    if t.get("budget_source") == "user":
        return (f"<p><b>Budget given by you</b>: <code>{_e(t.get('budget_given_by') or '')}</code> (RAM "
                f"{_bytes(t.get('ram_bytes'))}, flash {_bytes(t.get('flash_bytes'))}, core "
                f"{_e(t.get('core') or 'n/a')}); not checked against a datasheet.</p>")
    return (f"<p class='muted'>Budget from the {_e(t.get('name', ''))} profile (its sources are listed in report.json "
            "target.references).</p>")


def _firmware_html(report: dict) -> str:
    fw = _d(report.get("firmware"))
    if not fw:
        return ""
    ar, fl, op, sm = (_d(fw.get(k)) for k in ("arena", "flash", "op_resolver", "sample"))
    rows = [("files", f"<code>{_e(fw.get('path', ''))}</code> and <code>{_e(fw.get('zip', ''))}</code> "
                      f"({_bytes(fw.get('zip_bytes'))}): " + ", ".join(f"<code>{_e(k)}</code>" for k in _d(fw.get('files')))),
            ("core", f"{_e(fw.get('core', ''))} (<code>{_e(' '.join(fw.get('gcc_flags') or []))}</code>), TFLite-Micro "
                     f"TARGET_ARCH={_e(fw.get('tflm_target_arch', ''))}, kernels {_e(fw.get('firmware_kernels', ''))}"),
            ("op resolver", f"MicroMutableOpResolver&lt;{_e(op.get('op_count', ''))}&gt;: "
                            + ", ".join(f"<code>{_e(m)}</code>" for m in op.get("methods") or [])),
            ("tensor arena", f"{ar.get('tensor_arena_size', 0):,} B: {_e(ar.get('how', ''))}")]
    if fl.get("measured"):
        rows.append(("model in flash", f"{fl.get('model_section_bytes', 0):,} B in <code>{_e(fl.get('model_section', ''))}"
                                       f"</code>, compiled with {_e(fl.get('toolchain', ''))}: <code>"
                                       f"{_e((fl.get('commands') or [''])[0])}</code>"))
        rows.append(("preprocessing + sample", f"{fl.get('preprocess_and_sample_bytes', 0):,} B (C99, -Os)"))
    else:
        rows.append(("model in flash", f"not measured: {_e(fl.get('reason', ''))}"))
    rows.append(("sample check", f"main.cc runs test image {_e(sm.get('index', ''))} (label {_e(sm.get('label', ''))}) "
                                 f"and passes when within {_e(sm.get('tolerance_steps', ''))} step of "
                                 f"{_e(sm.get('expected_output_from', ''))}"))
    return "\n".join([
        "<h2 id='firmware'>Firmware package</h2>",
        "<p>What a TFLite-Micro project needs to run this model on the board: the model as a C array, its op "
        "resolver, the settings and the preprocessing as C (bit-identical to the host's), one sample and a main that "
        "checks it (README.txt inside says how to build it).</p>",
        _kv_table(rows),
        f"<p class='muted'>{_e(fw.get('tflm_headers', ''))}.</p>"])


# --------------------------------------------------------------------------- reliability sections

def _calibration_html(report: dict) -> str:
    cd = report["calibration_drift"]
    f, q, d = cd["fp32"], cd["int8"], cd["delta"]
    out = ["<h2 id='calibration'>Calibration: is the confidence still honest after quantization?</h2>"
           f"<p>Each bar is the accuracy of the test images whose top-1 confidence falls in that bin ({cd['n']} "
           "images); a perfectly calibrated model follows the dashed diagonal. The box on each bar marks the gap "
           f"between accuracy and mean confidence: <b style='color:{OVER_COLOR}'>orange</b> boxes (above the bar) "
           f"are over-confident bins, confidence above accuracy; <b style='color:{UNDER_COLOR}'>green</b> boxes (the "
           "top of the bar) are under-confident bins, accuracy above confidence. Bar shade grows with the number "
           "of images in the bin.</p><div class='row'>"]
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
    return "\n".join(out)


def _temperature_html(report: dict) -> str:
    ts = report["temperature_scaling"]
    v = ts["validation"]
    out = ["<h2 id='temperature'>Temperature scaling</h2>"
           f"<p>A single temperature T divides the logits before the softmax: T &gt; 1 softens an over-confident "
           f"model's probabilities, T &lt; 1 sharpens an under-confident one's (top-1 never changes). T is fitted by minimising NLL on {v['size']} images of the <b>training</b> split "
           f"(never the test split), separately for FP32 and int8; metrics below are on the test split. The "
           f"last row applies the FP32 temperature to the int8 model: if it matches the int8 row, a "
           f"temperature fitted before quantization still holds after it.</p>"]
    if v.get("note"):
        out.append(f"<p class='muted'>Validation split: {_e(v['note'])}.</p>")
    readings = [f"{name}: {_e(ts[k]['reading'])}" for name, k in (("FP32", "fp32"), ("int8", "int8"))
                if isinstance(ts.get(k), dict) and ts[k].get("reading")]
    if readings:
        out.append("<p>" + "; ".join(readings) + ".</p>")
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
    return "\n".join(out)


def _flip_detectors_html(report: dict) -> str:
    fl = report["flips"]
    out = ["<h2 id='flips'>Prediction flips and how to flag them</h2>"
           f"<p>{fl['count']} of {fl['n']} clean test images ({pct(fl['rate'])}) get a different top-1 class "
           "from the int8 model than from FP32. Each score below is computed from the deployed int8 outputs "
           "alone, so a device could use it to flag inputs whose prediction may have flipped. AUROC 0.5 is "
           f"chance; the AUPR of a random score is the flip rate ({pct(fl.get('aupr_random'))}).</p>",
           "<table><tr><th class='l'>score</th><th>AUROC</th><th>AUPR</th><th>TNR at TPR 95%</th></tr>"]
    for k, dd in fl["detectors"].items():
        out.append(f"<tr{' class=ok' if k == fl.get('best_detector') else ''}><td class='l'>{_e(k)}</td>"
                   f"<td>{num(dd['auroc'], 3)}</td><td>{num(dd['aupr'], 3)}</td><td>{num(dd['tnr_at_tpr95'], 3)}</td></tr>")
    out.append("</table>")
    if fl.get("note"):
        out.append(f"<p class='muted'>{_e(fl['note'])}</p>")
    return "\n".join(out)


def _per_class_html(report: dict) -> str:
    pc = report["per_class"]
    out = ["<h2 id='per-class'>Per class</h2><p>Averages can hide a class that quantization hurts. The worst class "
           "(largest drop) is highlighted.</p><table><tr><th class='l'>class</th><th>images</th><th>FP32 top-1</th>"
           "<th>int8 top-1</th><th>drop</th><th>flips</th></tr>"]
    for r in pc["classes"]:
        cls = " class=bad" if r["class"] == pc["worst_class"]["class"] else ""
        out.append(f"<tr{cls}><td class='l'>{_e(r.get('label', r['name']))}</td><td>{r['n']}</td><td>{pct(r['fp32_top1'])}</td>"
                   f"<td>{pct(r['int8_top1'])}</td><td>{pp(r['drop_pp'])}</td><td>{r['flips']}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _provenance_html(report: dict) -> str:
    rel, sh = _d(report.get("reliability")), _d(report.get("shifts"))
    out = ["<h2>How these numbers were obtained</h2><ul>"]
    a = _d(report.get("accuracy"))
    if a.get("evaluated_on"):
        out.append(f"<li>Accuracy and agreement: {_e(a['evaluated_on'])}.</li>")
    rt = _d(report.get("runtime"))
    if rt.get("note"):
        out.append(f"<li>Timings: {_e(rt['note'])}.</li>")
    if rel:
        out.append(f"<li>Reliability: {_e(rel.get('how', ''))}.</li>")
        out.append(f"<li>{rel.get('images_evaluated', 0):,} images through both models in "
                   f"{_d(rel.get('seconds')).get('engine', 0):.1f} s ({_e(rel.get('images_per_s'))} images/s, "
                   f"{_e(rel.get('throughput_note', ''))}).</li>")
        out.append(f"<li>Clean-test outputs: {_e(rel.get('clean_outputs', ''))}.</li>")
    if sh.get("records"):
        out.append(f"<li>Shifted sets: {len(sh['corruptions'])} corruptions × severities "
                   f"{_e(', '.join(map(str, sh['severities'])))} of the {_e(sh['images_per_set'])} test images, "
                   f"generated on the fly from the raw pixels with seed {_e(rel.get('seed', 0))} "
                   "(pipeline/reliability/corruptions.py, in the spirit of CIFAR-10-C and MNIST-C; not the published files), each "
                   "set generated once and fed to both models.</li>")
    ts = _d(report.get("timings_s"))
    if _is_num(ts.get("total")):
        out.append("<li>Stage timings: " + _e(", ".join(f"{k} {v:.2f} s" for k, v in ts.items()
                                                         if _is_num(v) and "." not in k)) + ".</li>")
    vers = _d(report.get("versions"))
    if vers:
        out.append("<li>Versions: " + _e(", ".join(f"{k} {v}" for k, v in vers.items() if v)) + ".</li>")
    out.append("</ul>")
    return "\n".join(out)


def _severity_list(sev) -> str:
    """'severities 1 to 5', 'severities 1, 3 and 5' or 'severity 2'."""
    sev = [int(v) for v in sev]
    if len(sev) == 1:
        return f"severity {sev[0]}"
    if len(sev) > 2 and sev == list(range(sev[0], sev[-1] + 1)):
        return f"severities {sev[0]} to {sev[-1]}"
    return "severities " + ", ".join(map(str, sev[:-1])) + f" and {sev[-1]}"


def _fmt_pp(v, step):
    return tick_label(v, step, suffix=" pp")


def _fmt_pct(v, step):
    return tick_label(v, step, percent=True)


def _fmt_plain(v, step):
    s = tick_label(v, step)
    return s if not s[0].isdigit() or v == 0 else "+" + s


def _shifts_html(sh: dict) -> str:
    clean = sh.get("clean")
    sev = sh["severities"]
    xs = ([0] if clean else []) + list(sev)
    out = ["<h2 id='shifts'>Distribution shift: what quantization costs on shifted inputs</h2>",
           f"<p>Each corruption is applied at {_severity_list(sev)} to the test images; both models see "
           "the same shifted images. FP32 and int8 accuracies are usually too close to tell apart on one axis, so "
           f"each corruption shows their differences: <b style='color:{DROP_COLOR}'>left</b>, the int8 top-1 drop "
           f"(FP32 minus int8, percentage points; above 0 int8 is worse); <b style='color:{AGREE_COLOR}'>middle</b>, "
           "the agreement (share of images with the same top-1 class in both models); "
           f"<b style='color:{ECE_COLOR}'>right</b>, the ECE change (int8 minus FP32). Severity 0 is the clean test "
           "set. The heading gives FP32 top-1 per severity, for how hard the corruption is. Axes are shared by all "
           "corruptions; hover a point for its value.</p>"]
    m = sh["mean"]
    fr = sh.get("flip_rate_clean_vs_shifted", {})
    out.append("<table><tr><th class='l'></th><th>FP32 top-1</th><th>int8 top-1</th><th>drop</th><th>agreement</th>"
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
                   f"<td>{pp(r['drop_pp'])}</td><td>{pct(r['agreement'])}</td><td>{num(r['fp32_ece'])}</td>"
                   f"<td>{num(r['int8_ece'])}</td></tr>")
    out.append("</table>")
    if fr.get("ratio") is not None:
        out.append(f"<p class='muted'>Flip rate: clean {pct(fr['clean'])}, shifted mean {pct(fr['shifted_mean'])} "
                   f"({fr['ratio']:.1f}×), shifted max {pct(fr['shifted_max'])}.</p>")
    out.append("<div class='grid3'>")
    by = {}
    for r in sh["records"]:
        by.setdefault(r["corruption"], {})[r["severity"]] = r
    seq_all = sh["records"] + ([clean] if clean else [])
    drops = [r["drop_pp"] for r in seq_all]
    agree = [r["agreement"] for r in seq_all]
    dece = [r["int8_ece"] - r["fp32_ece"] for r in seq_all]
    drop_t = nice_ticks(min(0.0, min(drops)), max(0.0, max(drops), 0.1), 5)
    agree_t = nice_ticks(min(agree), 1.0, 5)
    ece_t = nice_ticks(min(0.0, min(dece)), max(0.0, max(dece), 1e-3), 5)
    for c in sh["corruptions"]:
        rs = [by[c][s] for s in sev]
        seq = ([clean] if clean else []) + rs
        acc = " &rarr; ".join(pct(r["fp32_top1"], 0) for r in seq)
        out.append(f"<div class='corr'><h3>{_e(c)} <span>FP32 top-1 {acc}</span></h3><div class='row'>")
        out.append(svg_lines(xs, [("int8 drop", [r["drop_pp"] for r in seq], DROP_COLOR, "")],
                             "int8 top-1 drop (pp)", drop_t, _fmt_pp, zero_line=True))
        out.append(svg_lines(xs, [("agreement", [r["agreement"] for r in seq], AGREE_COLOR, "")],
                             "agreement", agree_t, _fmt_pct))
        out.append(svg_lines(xs, [("ECE int8 − FP32", [r["int8_ece"] - r["fp32_ece"] for r in seq], ECE_COLOR, "")],
                             "ECE change (int8 − FP32)", ece_t, _fmt_plain, zero_line=True))
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
