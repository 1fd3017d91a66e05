"""Text tables for people: a step's phase x category table and the session's --gpumem-report summary."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .._core.categories import CATEGORIES, Category
from .._core.results import StepMeasurement, StepReport
from .._core.text_table import render_table
from .._core.units import format_bytes

_SHORT = {
    Category.PARAMS: "params", Category.GRADS: "grads", Category.OPTIMIZER: "optim", Category.BATCH: "batch",
    Category.ACTIVATIONS: "activ", Category.TEMPORARIES: "temps", Category.OTHER: "other",
}


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


_LARGER = {
    "first": "the first step needs more than the steady ones",
    "steady": "steady steps need more than the first",
    "equal": "first and steady steps peak alike",
}

#: what the rows and columns of ``step_table`` mean, printed under it
STEP_LEGEND = (
    "rows: step/phase (first = step 0, where the optimizer state is created; steady = later steps); "
    "peak: most bytes allocated during the phase; retained: allocated when it ended; "
    "the category columns split the phase's peak"
)


def step_table(report: StepReport, *, verbose: bool = False) -> str:
    """Per phase: peak, retained, and the category mix at the phase's peak."""
    steps = report.steps if verbose else (report.peak_step,)
    header = ["step/phase", "peak", "retained", *[c.value for c in CATEGORIES], ""]
    rows = [row for step in steps for row in _step_rows(step)]
    title = (
        f"{report.backend} backend, {report.device}: peak {format_bytes(report.peak)} during "
        f"{report.peak_phase.value} of the {report.peak_step.label} step ({_LARGER[report.larger_step]})"
    )
    if report.reserved_peak is not None:
        title += f"; reserved peak {format_bytes(report.reserved_peak)} (allocator segments)"
    if not verbose and len(report.steps) > 1:
        title += f"; showing the {report.peak_step.label} step (-v: all {len(report.steps)} steps)"
    notes = "".join(f"\nnote: {n}" for n in report.notes)
    return f"{title}\n{render_table(header, rows)}\n{STEP_LEGEND}{notes}"


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
    kind: str = "allocated"  #: what the budget and headroom are on: "allocated" (the peak) or "reserved"


def summary_table(rows: Sequence[SummaryRow], *, phases: dict[str, list[tuple[str, int]]] | None = None) -> str:
    """The --gpumem-report table: a row per test; with ``phases``, an indented row per phase under it.

    The "max batch" column appears only when a test asked for one (``gpumem.max_batch_size``).
    """
    with_batch = any(r.max_batch is not None for r in rows)
    header = ["test", "backend", "budget", "peak", "headroom", "peak in", *[_SHORT[c] for c in CATEGORIES],
              *(["max batch"] if with_batch else []), "status"]
    body = []
    for r in rows:
        budget = "-" if r.budget is None else format_bytes(r.budget) + (" reserved" if r.kind == "reserved" else "")
        body.append([
            r.nodeid, r.backend, budget, format_bytes(r.peak),
            f"{r.headroom * 100:.1f}%" if r.headroom is not None else "-", r.peak_phase,
            *[format_bytes(r.split.get(c, 0)) if r.split.get(c, 0) else "0" for c in CATEGORIES],
            *([str(r.max_batch) if r.max_batch is not None else "-"] if with_batch else []), r.status,
        ])
        for name, peak in (phases or {}).get(r.nodeid, []):
            body.append([f"  {name}", "", "", format_bytes(peak), "", "", *[""] * len(CATEGORIES),
                         *([""] if with_batch else []), ""])
    legend = [
        "peak: most bytes allocated at any instant of the measured step(s); peak in: the phase where it happened; "
        "budget: the test's gpu_budget (- = none); headroom: share of the budget left unused (negative = over)",
        "the category columns split the peak: params (and buffers), grads, optim (optimizer state), batch (inputs), "
        "activ (activations saved for backward), temps (temporaries), other (allocator rounding, workspaces)",
    ]
    if any(r.kind == "reserved" for r in rows):
        legend.append("reserved: that budget and its headroom are on reserved memory (allocator segments), not on peak")
    if any(r.backend == "emulated" for r in rows):
        legend.append("backend emulated: no GPU used; the figures predict what CUDA would allocate")
    if phases:
        legend.append("indented rows: the peak of each step/phase (first = step 0, steady = later steps)")
    if with_batch:
        legend.append("max batch: the largest batch that fits the budget (gpumem.max_batch_size)")
    return "\n".join([render_table(header, body), *legend])
