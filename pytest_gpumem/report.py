"""Text tables for people: a step's phase x category table and the session's --gpumem-report summary."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .categories import CATEGORIES, Category
from .results import StepMeasurement, StepReport
from .units import format_bytes

_SHORT = {
    Category.PARAMS: "params", Category.GRADS: "grads", Category.OPTIMIZER: "optim", Category.BATCH: "batch",
    Category.ACTIVATIONS: "activ", Category.TEMPORARIES: "temps", Category.OTHER: "other",
}


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, align_left: int = 1) -> str:
    """Columns padded to their widest cell; the first ``align_left`` columns left-aligned, the rest right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < align_left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _step_rows(step: StepMeasurement) -> list[list[str]]:
    rows = []
    for phase, stats in step.phases.items():
        mark = " <- peak" if phase is step.peak_phase else ""
        rows.append(
            [f"{step.label}/{phase.value}", format_bytes(stats.peak), format_bytes(stats.retained)]
            + [format_bytes(stats.peak_split.get(c, 0)) for c in CATEGORIES]
            + [mark.strip()]
        )
    return rows


def step_table(report: StepReport, *, verbose: bool = False) -> str:
    """Per phase: peak, retained, and the category mix at the phase's peak."""
    steps = report.steps if verbose else (report.peak_step,)
    header = ["step/phase", "peak", "retained", *[c.value for c in CATEGORIES], ""]
    rows = [row for step in steps for row in _step_rows(step)]
    title = (
        f"{report.backend} backend, {report.device}: peak {format_bytes(report.peak)} during "
        f"{report.peak_phase.value} of the {report.peak_step.label} step (larger step: {report.larger_step})"
    )
    if report.reserved_peak is not None:
        title += f"; reserved peak {format_bytes(report.reserved_peak)}"
    notes = "".join(f"\nnote: {n}" for n in report.notes)
    return f"{title}\n{render_table(header, rows)}{notes}"


@dataclass(frozen=True)
class SummaryRow:
    """One measured test in the --gpumem-report table."""

    nodeid: str
    backend: str
    budget: int | None
    peak: int
    headroom: float | None
    peak_phase: str
    split: dict[Category, int]
    max_batch: int | None = None
    status: str = "ok"


def summary_table(rows: Sequence[SummaryRow], *, phases: dict[str, list[tuple[str, int]]] | None = None) -> str:
    """The --gpumem-report table: a row per test; with ``phases``, an indented row per phase under it."""
    header = ["test", "backend", "budget", "peak", "headroom", "peak in", *[_SHORT[c] for c in CATEGORIES], "max batch", "status"]
    body = []
    for r in rows:
        body.append([
            r.nodeid, r.backend, format_bytes(r.budget) if r.budget is not None else "-", format_bytes(r.peak),
            f"{r.headroom * 100:.1f}%" if r.headroom is not None else "-", r.peak_phase,
            *[format_bytes(r.split.get(c, 0)) if r.split.get(c, 0) else "0" for c in CATEGORIES],
            str(r.max_batch) if r.max_batch is not None else "-", r.status,
        ])
        for name, peak in (phases or {}).get(r.nodeid, []):
            body.append([f"  {name}", "", "", format_bytes(peak), "", "", *[""] * len(CATEGORIES), "", ""])
    legend = (
        "peak: max allocated bytes over the step; headroom: budget left unused; the category columns split the "
        "peak (params+buffers, grads, optimizer state, input batch, activations saved for backward, temporaries, "
        "other = allocator rounding/workspaces)"
    )
    return f"{render_table(header, body)}\n{legend}"
