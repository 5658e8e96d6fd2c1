"""``report.html`` section "Layer-wise error": where in the graph int8 loses accuracy, from the report's
``layer_errors`` section (:meth:`pipeline.debug.layers.LayerErrors.describe`).

One inline SVG bar chart of each compared activation's SQNR (dB, higher is better) along the graph in execution
order, the worst layers (lowest SQNR, largest growth) highlighted and named with their ONNX names, and a table
of the ten lowest-SQNR layers. Self-contained like the rest of the page (no scripts, no external resources);
every value from ``report.json`` is escaped, and a malformed section is one line (the page's ``_guard``).
"""
from __future__ import annotations

from pipeline.debug.layers import COARSE_CHANNEL_STEPS
from pipeline.report.html import INT8_COLOR, _e, _guard, _is_num, _svg_open, nice_ticks, tick_label

BAR_COLOR = "#9fb7cc"
GROWTH_COLOR = "#ff7f0e"  # the largest-growth layers (not already among the lowest SQNR)
HIGHLIGHT = 3  # lowest-SQNR and largest-growth layers named on the chart, each
TABLE_ROWS = 10


def layers_html(report: dict) -> str:
    """The section for ``report`` (the whole report dict), or "" when it has no ``layer_errors`` section."""
    sec = report.get("layer_errors") if isinstance(report, dict) else None
    if not sec:
        return ""
    return _guard("Layer-wise error", _section, sec)


def _rows(sec: dict) -> list[dict]:
    return [r for r in sec["rows"] if isinstance(r, dict) and _is_num(r.get("sqnr_db"))]


def _name(r: dict) -> str:
    return str(r.get("layer") or r.get("tflite_name") or "?")


def _section(sec: dict) -> str:
    rows = _rows(sec)
    counts = sec.get("counts") if isinstance(sec.get("counts"), dict) else {}
    unmatched = counts.get("unmatched") if isinstance(counts.get("unmatched"), dict) else {}
    out = ["<h2 id='layers'>Layer-wise error</h2>",
           f"<p class='muted'>Each activation of the int8 model, dequantized, against the float32 model converted "
           f"from the same ONNX by the same route, on {_e(sec.get('samples', '?'))} test inputs "
           f"({_e(sec.get('kernels', ''))}). SQNR = 10&nbsp;log10(signal / quantization noise), higher is better; "
           f"growth = lowest SQNR of the op's inputs minus its own (the error the op added). "
           f"Layers are named by their ONNX nodes ({_e(counts.get('onnx_named', '?'))} of "
           f"{_e(counts.get('compared', '?'))}); not compared: "
           + _e(", ".join(f"{k} {v}" for k, v in unmatched.items() if v) or "none")
           + f"; {_e(sec.get('seconds', '?'))} s.</p>"]
    if not rows:
        return out[0] + "<p class='muted'>No activation could be compared.</p>"
    low = sorted(rows, key=lambda r: r["sqnr_db"])
    grown = sorted((r for r in rows if _is_num(r.get("growth_db"))), key=lambda r: -r["growth_db"])
    worst_ids = {id(r) for r in low[:HIGHLIGHT]}
    growth_ids = {id(r) for r in grown[:HIGHLIGHT] if r["growth_db"] > 0} - worst_ids
    out.append(_chart(rows, worst_ids, growth_ids))
    out.append("<h3>Lowest SQNR</h3><table><tr><th>#</th><th class='l'>layer (ONNX)</th><th class='l'>ONNX op</th>"
               "<th class='l'>TFLite op</th><th>SQNR dB</th><th>growth dB</th><th>RMSE (steps)</th>"
               "<th>clipped</th><th>steps / channel</th><th>largest channel</th></tr>")
    for r in low[:TABLE_ROWS]:
        g = r.get("growth_db")
        clip = r.get("clip_share")
        out.append(f"<tr><td>{_e(r.get('index', ''))}</td><td class='l'>{_e(_name(r))}</td>"
                   f"<td class='l'>{_e(r.get('layer_op') or '')}</td><td class='l'>{_e(r.get('op', ''))}</td>"
                   f"<td>{r['sqnr_db']:.1f}</td><td>{f'{g:+.1f}' if _is_num(g) else ''}</td>"
                   f"<td>{_num(r.get('rmse_steps'))}</td>"
                   f"<td>{f'{clip:.2%}' if _is_num(clip) else ''}</td><td>{_num(r.get('channel_steps'))}</td>"
                   f"<td>{_spread(r.get('channel_spread'))}</td></tr>")
    out.append("</table>")
    coarse = sorted((r for r in rows if _is_num(r.get("channel_steps"))), key=lambda r: r["channel_steps"])
    if coarse and coarse[0]["channel_steps"] < COARSE_CHANNEL_STEPS:
        out.append("<p>Coarse channels (a few large channels set the tensor's one int8 step; its SQNR hides it): "
                   + _e("; ".join(f"{_name(r)}: median channel {r['channel_steps']:.1f} steps, largest "
                                  f"{_spread(r.get('channel_spread'))} the median"
                                  for r in coarse[:3] if r["channel_steps"] < COARSE_CHANNEL_STEPS)) + "</p>")
    return "\n".join(out)


def _spread(v) -> str:
    return f"{v:.0f}x" if _is_num(v) else ""


def _num(v) -> str:
    return f"{v:.2f}" if _is_num(v) else ""


def _chart(rows: list[dict], worst_ids: set, growth_ids: set) -> str:
    n = len(rows)
    left, right, top, bottom = 44, 12, 24, 30
    label_room = 150  # names of the highlighted layers, written upwards above their bars
    w = max(560, min(1180, left + right + 14 * n))
    h = top + label_room + 200 + bottom
    pw, ph = w - left - right, 200
    base = top + label_room + ph
    vals = [float(r["sqnr_db"]) for r in rows]
    ticks = nice_ticks(min(0.0, min(vals)), max(vals))
    lo, hi = ticks[0], ticks[-1]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0

    def y(v: float) -> float:
        return base - ph * (v - lo) / (hi - lo)
    title = "SQNR per activation, int8 vs float32 (dB, higher is better)"
    parts = [_svg_open(w, h, title),
             f'<text x="{w / 2:.1f}" y="14" text-anchor="middle" class="ct" font-size="12">{_e(title)}</text>']
    for v in ticks:
        parts.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{w - right}" y2="{y(v):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{y(v) + 3.5:.1f}" text-anchor="end" class="tk" font-size="10">'
                     f'{_e(tick_label(v, step))}</text>')
    slot = pw / n
    bar = max(1.0, slot * 0.8)
    zero = y(max(lo, 0.0))
    for i, r in enumerate(rows):
        x = left + i * slot + (slot - bar) / 2
        v = float(r["sqnr_db"])
        top_y, height = min(y(v), zero), abs(zero - y(v))
        color = INT8_COLOR if id(r) in worst_ids else GROWTH_COLOR if id(r) in growth_ids else BAR_COLOR
        g = r.get("growth_db")
        tip = (f"{_name(r)} ({r.get('layer_op') or r.get('op', '')}; TFLite {r.get('op', '')} #{r.get('index', '')})"
               f": SQNR {v:.1f} dB" + (f", growth {g:+.1f} dB" if _is_num(g) else ""))
        parts.append(f'<rect x="{x:.1f}" y="{top_y:.1f}" width="{bar:.1f}" height="{max(height, 0.5):.1f}" '
                     f'fill="{color}"><title>{_e(tip)}</title></rect>')
        if color != BAR_COLOR:
            cx, ty = x + bar / 2, min(y(v), zero) - 4
            parts.append(f'<text x="{cx:.1f}" y="{ty:.1f}" class="tk" font-size="10" '
                         f'transform="rotate(-60 {cx:.1f} {ty:.1f})">{_e(_name(r)[-40:])} {v:.1f}</text>')
    parts.append(f'<line x1="{left}" y1="{base}" x2="{w - right}" y2="{base}" stroke="#888"/>')
    parts.append(f'<line x1="{left}" y1="{top + label_room}" x2="{left}" y2="{base}" stroke="#888"/>')
    parts.append(f'<text x="{(left + w - right) / 2:.1f}" y="{h - 16}" text-anchor="middle" class="tk" '
                 f'font-size="10">layers in execution order (input first)</text>')
    for k, (name, color) in enumerate((("lowest SQNR", INT8_COLOR), ("largest growth", GROWTH_COLOR),
                                       ("other layers", BAR_COLOR))):
        x = left + k * 120
        parts.append(f'<rect x="{x}" y="{h - 10}" width="10" height="9" fill="{color}"/>'
                     f'<text x="{x + 14}" y="{h - 2}" class="tk" font-size="10">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
