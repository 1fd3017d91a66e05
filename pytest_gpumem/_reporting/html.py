"""The --gpumem-html report: one self-contained HTML file with inline SVG plots we draw ourselves."""
from __future__ import annotations

import datetime
import html
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .._core.categories import CATEGORIES
from .._core.records import TestRecord
from .._core.results import split_to_dict
from .._core.units import IEC_UNITS, format_bytes
from .atomic_files import write_text_atomic

#: One colour per category (Okabe-Ito, readable with colour-blindness), in canonical category order.
COLORS: dict[str, str] = {
    "params": "#0072B2",
    "grads": "#56B4E9",
    "optimizer": "#009E73",
    "batch": "#F0E442",
    "activations": "#E69F00",
    "temporaries": "#CC79A7",
    "other": "#999999",
}
BUDGET_COLOR = "#C0392B"
ESTIMATE_COLOR = "#222222"

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}h3{font-size:14px;margin:22px 0 4px;word-break:break-all}
.meta{color:#666;font-size:12px}.note{color:#666;font-size:12px;margin:2px 0}
ul.legend{list-style:none;padding:0;margin:8px 0;display:flex;flex-wrap:wrap;gap:6px 16px;font-size:12px}
ul.legend li{display:flex;align-items:center;gap:5px}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #0003}
.line{display:inline-block;width:14px;height:0;border-top:2px solid}
table{border-collapse:collapse;font-size:12px;margin-top:8px}th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.id,th.id{text-align:left;max-width:420px;word-break:break-all}
.over{color:#C0392B;font-weight:600}.ok{color:#1e7e34}.fail{color:#C0392B;font-size:12px;margin:2px 0}
svg text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _stack(split: Mapping[str, int]) -> list[tuple[str, int]]:
    """The non-zero categories of a split, in canonical order."""
    return [(c.value, int(split.get(c.value, 0))) for c in CATEGORIES if split.get(c.value, 0)]


def _on_scale(budget: int | None, highest: int) -> int | None:
    """The budget when it fits a plot of ``highest`` bytes (at most 2x it), else None: drawn at the edge instead."""
    return budget if budget is not None and budget <= 2 * highest else None


def legend_html() -> str:
    """The legend: one swatch per category, then the budget line, the estimate marker and the retained line."""
    items = [f'<li data-category="{c.value}"><span class="swatch" style="background:{COLORS[c.value]}"></span>{c.value}</li>'
             for c in CATEGORIES]
    items.append(f'<li><span class="line" style="border-color:{BUDGET_COLOR}"></span>budget</li>')
    items.append(f'<li><span style="color:{ESTIMATE_COLOR}">&#9660;</span>estimate (peak)</li>')
    items.append('<li><span class="line" style="border-color:#000;border-top-style:dashed"></span>retained after phase</li>')
    return f'<ul class="legend">{"".join(items)}</ul>'


def overview_svg(records: Sequence[TestRecord], *, width: int = 1100) -> str:
    """Stacked bars of the peak split, one row per test, each scaled to its own max(peak, budget, estimate)."""
    label_w, text_w, row_h, bar_h, top = 330, 230, 34, 18, 8
    bar_w = width - label_w - text_w
    height = top + row_h * len(records) + 8
    out = [f'<svg class="overview" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="peak per test by category">']
    for i, record in enumerate(records):
        report = record.report
        assert report is not None
        peak, budget, estimate = report.peak, record.budget_total, record.estimate_peak
        shown = _on_scale(budget, max(peak, estimate or 0))
        scale = bar_w / (max(peak, shown or 0, estimate or 0, 1) * 1.05)
        y = top + i * row_h
        by = y + (row_h - bar_h) / 2
        nodeid = record.nodeid
        label = nodeid if len(nodeid) <= 46 else "\u2026" + nodeid[-45:]
        out.append(f'<g class="bar" data-nodeid="{_e(nodeid)}"><title>{_e(nodeid)}</title>')
        out.append(f'<text x="{label_w - 8}" y="{by + bar_h - 4}" font-size="12" text-anchor="end">{_e(label)}</text>')
        out.append(f'<rect x="{label_w}" y="{by}" width="{bar_w}" height="{bar_h}" fill="#f3f3f3"/>')
        x = float(label_w)
        for cat, nbytes in _stack(split_to_dict(report.peak_split)):
            w = nbytes * scale
            out.append(f'<rect class="segment" data-category="{cat}" x="{x:.2f}" y="{by}" width="{w:.2f}" '
                       f'height="{bar_h}" fill="{COLORS[cat]}"><title>{cat}: {format_bytes(nbytes)}</title></rect>')
            x += w
        if estimate is not None:
            ex = label_w + estimate * scale
            out.append(f'<path class="estimate" d="M{ex - 5:.2f},{by - 4} L{ex + 5:.2f},{by - 4} L{ex:.2f},{by + 3} Z" '
                       f'fill="{ESTIMATE_COLOR}"><title>estimate {format_bytes(estimate)}</title></path>')
        if budget is not None:
            bx = label_w + (shown if shown is not None else bar_w / scale) * scale
            dash = "" if shown is not None else ' stroke-dasharray="3,2"'  # off the scale: drawn at the right end
            out.append(f'<line class="budget" x1="{bx:.2f}" x2="{bx:.2f}" y1="{by - 5}" y2="{by + bar_h + 5}" '
                       f'stroke="{BUDGET_COLOR}" stroke-width="2.5"{dash}><title>budget {format_bytes(budget)}</title></line>')
        text = format_bytes(peak)
        over = budget is not None and peak > budget
        if budget is not None:
            text += f" / {format_bytes(budget)} ({peak / budget * 100:.0f}%)" if budget else f" / {format_bytes(budget)}"
        color = BUDGET_COLOR if over else "#222"
        out.append(f'<text x="{label_w + bar_w + 8}" y="{by + bar_h - 4}" font-size="12" fill="{color}">{_e(text)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def _nice_ticks(top: float, count: int = 4) -> list[tuple[float, str]]:
    """(bytes, label) ticks from 0 to ``top`` at round steps of a binary unit: 0, 512 KiB, 1 MiB, ..."""
    if top <= 0:
        return [(0.0, "0 B")]
    unit, size = next(((u, z) for u, z in IEC_UNITS if top >= z and u != "TiB"), ("B", 1))
    raw = top / size / count
    mag = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [(i * step * size, f"{i * step:g} {unit}" if i else "0") for i in range(int(top / size // step) + 1)]


def timeline_svg(record: TestRecord, *, width: int = 1100, height: int = 260) -> str:
    """Per-phase bars for each step: the peak split stacked by category, retained as a dashed step line."""
    assert record.report is not None
    report = record.report.to_dict()  # the plain figures, as the JSON document has them
    slots = [(step, ps) for step in report["steps"] for ps in step["phases"]]
    budget = record.budget_total
    left, right, top, bottom = 80, 20, 26, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    highest = max([int(ps["peak_bytes"]) for _, ps in slots] + [1])
    shown = _on_scale(budget, highest)
    ymax = max(highest, shown or 0) * 1.08
    sy = plot_h / ymax
    slot_w = plot_w / max(len(slots), 1)
    bar_w = slot_w * 0.62
    base = top + plot_h
    out = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="per-phase memory of {_e(record.nodeid)}">']
    for tick, label in _nice_ticks(ymax):
        ty = base - tick * sy
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{ty:.2f}" y2="{ty:.2f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{ty + 4:.2f}" font-size="11" text-anchor="end" fill="#555">{label}</text>')
    retained_pts: list[str] = []
    previous_step = None
    for i, (step, ps) in enumerate(slots):
        x0 = left + i * slot_w
        if step["index"] != previous_step:
            if previous_step is not None:
                out.append(f'<line x1="{x0:.2f}" x2="{x0:.2f}" y1="{top - 18}" y2="{base + 40}" stroke="#999" stroke-dasharray="2,3"/>')
            out.append(f'<text x="{x0 + 4:.2f}" y="{top - 8}" font-size="12" font-weight="600">{_e(step["label"])} step (#{step["index"]})</text>')
            previous_step = step["index"]
        bx = x0 + (slot_w - bar_w) / 2
        y = float(base)
        tip = f'{ps["phase"]}: peak {format_bytes(int(ps["peak_bytes"]))}, retained {format_bytes(int(ps["retained_bytes"]))}'
        out.append(f'<g class="phase" data-phase="{_e(ps["phase"])}"><title>{_e(tip)}</title>')
        for cat, nbytes in _stack(ps["peak_split"]):
            h = nbytes * sy
            y -= h
            out.append(f'<rect data-category="{cat}" x="{bx:.2f}" y="{y:.2f}" width="{bar_w:.2f}" height="{h:.2f}" fill="{COLORS[cat]}"/>')
        out.append("</g>")
        out.append(f'<text x="{x0 + slot_w / 2:.2f}" y="{base + 16}" font-size="11" text-anchor="middle">{_e(ps["phase"])}</text>')
        ry = base - int(ps["retained_bytes"]) * sy
        retained_pts += [f"{x0:.2f},{ry:.2f}", f"{x0 + slot_w:.2f},{ry:.2f}"]
    if retained_pts:
        out.append(f'<polyline class="retained" points="{" ".join(retained_pts)}" fill="none" stroke="#000" '
                   f'stroke-width="1.5" stroke-dasharray="5,3"/>')
    if budget is not None:
        y = base - (shown if shown is not None else ymax) * sy
        label = f"budget {format_bytes(budget)}" + ("" if shown is not None else
                                                     f" (off the scale: peak uses {highest / budget * 100:.1f}%)")
        dash = "" if shown is not None else ' stroke-dasharray="6,4"'
        out.append(f'<line class="budget" x1="{left}" x2="{left + plot_w}" y1="{y:.2f}" y2="{y:.2f}" '
                   f'stroke="{BUDGET_COLOR}" stroke-width="2"{dash}/>')
        ty = y - 5 if shown is not None else y + 14  # off the scale: below the line, clear of the step titles
        out.append(f'<text x="{left + plot_w - 4}" y="{ty:.2f}" font-size="11" text-anchor="end" '
                   f'fill="{BUDGET_COLOR}">{_e(label)}</text>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}" stroke="#333"/>')
    out.append("</svg>")
    return "".join(out)


def _summary_table(records: Sequence[TestRecord]) -> str:
    """One row per test: outcome, peak, budget use, estimate, max batch."""
    head = ("<tr><th class='id'>test</th><th>outcome</th><th>backend</th><th>peak</th><th>peak phase</th>"
            "<th>budget</th><th>used</th><th>estimate</th><th>estimate / peak</th><th>max batch</th></tr>")
    rows = []
    for r in records:
        report = r.report
        peak = report.peak if report is not None else None
        budget, estimate = r.budget_total, r.estimate_peak
        used = "" if budget is None or peak is None or not budget else f"{peak / budget * 100:.1f}%"
        cls = "over" if budget is not None and peak is not None and peak > budget else ""
        ratio = "" if estimate is None or not peak else f"{estimate / peak:.2f}x"
        cells = [
            f"<td class='id'>{_e(r.nodeid)}</td>", f"<td>{_e(r.outcome)}</td>",
            f"<td>{_e(report.backend if report is not None else '')}</td>",
            f"<td>{format_bytes(peak) if peak is not None else 'not measured'}</td>",
            f"<td>{_e(report.peak_phase.value if report is not None else '')}</td>",
            f"<td>{format_bytes(budget) if budget is not None else ''}</td>", f"<td class='{cls}'>{used}</td>",
            f"<td>{format_bytes(estimate) if estimate is not None else ''}</td>", f"<td>{ratio}</td>",
            f"<td>{_e(r.max_batch if r.max_batch is not None else '')}</td>",
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class='summary'>{head}{''.join(rows)}</table>"


def render_html(
    records: Iterable[TestRecord],
    *,
    title: str = "pytest-gpumem report",
    regressions: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The whole report as one HTML string: summary table, overview bars, a timeline per test; no external assets."""
    rows = sorted(records, key=lambda r: r.nodeid)
    measured = [r for r in rows if r.report is not None]
    regressions = regressions or {}
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='generator' content='pytest-gpumem'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1><p class='meta'>{len(measured)} measured of {len(rows)} tests &middot; {created}</p>",
        _summary_table(rows),
        "<h2>Peak per test, by category</h2>",
        "<p class='note'>Each bar is the category mix at the step's peak, scaled to its own test "
        "(the largest of peak, budget and estimate; a dotted budget line at the right end means a budget more "
        "than twice the peak, off the scale); the figures on the right are absolute.</p>",
        legend_html(),
        overview_svg(measured) if measured else "<p>No test was measured.</p>",
        "<h2>Per-phase timeline</h2>",
        "<p class='note'>Bars: peak of each phase by category; dashed line: bytes retained when the phase ended.</p>",
    ]
    for r in measured:
        report = r.report
        assert report is not None
        parts.append(f"<section class='test' data-nodeid='{_e(r.nodeid)}'><h3>{_e(r.nodeid)}</h3>")
        parts.append(f"<p class='meta'>{_e(report.backend)} &middot; {_e(report.device)} &middot; "
                     f"torch {_e(report.torch_version)}</p>")
        if r.leak_bytes:
            parts.append(f"<p class='fail'>{format_bytes(r.leak_bytes)} measured in this test was still allocated "
                         f"after it ended</p>")
        message = (regressions.get(r.nodeid) or {}).get("message")
        if message:
            parts.append(f"<p class='fail'>{_e(message)}</p>")
        parts.append(timeline_svg(r))
        parts += [f"<p class='note'>{_e(n)}</p>" for n in report.notes]
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(path: str | os.PathLike[str], records: Iterable[TestRecord], **kwargs: Any) -> Path:
    """Render the report and write it atomically to ``path``."""
    text = render_html(records, **kwargs)
    return write_text_atomic(path, lambda stream: stream.write(text))
