"""The session's --gpumem-report table: a row per measured test, 120 columns by default, every column when wide.

The step table (phase x category of one measurement) belongs to the result itself: ``StepReport.table()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .._core.budget import headroom
from .._core.categories import CATEGORIES, Category
from .._core.records import TestRecord
from .._core.results import STEP_LEGEND, step_table  # noqa: F401  (re-exported: the step table's home is results)
from .._core.text_table import render_table, shorten_left, wrap_lines
from .._core.units import format_bytes

#: The default report fits this many columns; -v or --gpumem-report-wide lifts the limit.
REPORT_WIDTH = 120
#: The test column never gets narrower than this when the report is fitted to REPORT_WIDTH.
MIN_TEST_WIDTH = 28

_SHORT = {
    Category.PARAMS: "params", Category.GRADS: "grads", Category.OPTIMIZER: "optim", Category.BATCH: "batch",
    Category.ACTIVATIONS: "activ", Category.TEMPORARIES: "temps", Category.OTHER: "other",
}


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
    leak: int | None = None  #: bytes still allocated after the test ended

    @classmethod
    def from_record(cls, record: TestRecord) -> "SummaryRow":
        rep = record.report
        assert rep is not None, "only measured tests have a row"
        budget = record.budget
        return cls(
            nodeid=record.nodeid, backend=rep.backend, budget=budget.total if budget is not None else None,
            peak=rep.peak, headroom=headroom(rep, budget), peak_phase=rep.peak_phase.value, split=rep.peak_split,
            max_batch=record.max_batch, status="FAILED" if record.outcome == "failed" else "ok",
            kind=budget.kind if budget is not None else "allocated", leak=record.leak_bytes,
        )

    @property
    def largest(self) -> str:
        """The category holding most of the peak and its share: 'activ 41%'."""
        category, nbytes = max(((c, self.split.get(c, 0)) for c in CATEGORIES), key=lambda cb: cb[1])
        return f"{_SHORT[category]} {nbytes / self.peak * 100:.0f}%" if self.peak and nbytes else "-"


def _budget_cell(r: SummaryRow) -> str:
    if r.budget is None:
        return "-"
    return format_bytes(r.budget) + (" reserved" if r.kind == "reserved" else "")


def _headroom_cell(r: SummaryRow) -> str:
    return f"{r.headroom * 100:.1f}%" if r.headroom is not None else "-"


def summary_table(rows: Sequence[SummaryRow], *, phases: dict[str, list[tuple[str, int]]] | None = None,
                  wide: bool = False) -> str:
    """The --gpumem-report table: a row per test; with ``phases``, an indented row per phase under it.

    By default it fits ``REPORT_WIDTH`` columns: the category split shrinks to its largest category, the
    backend column appears only when tests ran on several, and long test ids keep their ends. ``wide``
    shows every column however wide. "max batch" and "leak" appear only when a test has one.
    """
    header, body = (_wide if wide else _compact)(rows, phases or {})
    table = render_table(header, body)
    if not wide and max(map(len, table.splitlines())) > REPORT_WIDTH:
        others = max(map(len, table.splitlines())) - max(len(header[0]), *(len(b[0]) for b in body))
        room = max(MIN_TEST_WIDTH, REPORT_WIDTH - others)
        table = render_table(header, [[shorten_left(b[0], room), *b[1:]] for b in body])
    return "\n".join([table, *wrap_lines(_legend(rows, phases, wide), None if wide else REPORT_WIDTH)])


def _optional(rows: Sequence[SummaryRow]) -> tuple[bool, bool]:
    return any(r.max_batch is not None for r in rows), any(r.leak for r in rows)


def _compact(rows: Sequence[SummaryRow], phases: dict[str, list[tuple[str, int]]]):
    with_batch, with_leak = _optional(rows)
    with_backend = len({r.backend for r in rows}) > 1
    header = ["test", *(["backend"] if with_backend else []), "budget", "peak", "headroom", "peak in", "largest",
              *(["max batch"] if with_batch else []), *(["leak"] if with_leak else []), "status"]
    body = [[r.nodeid, *([r.backend] if with_backend else []), _budget_cell(r), format_bytes(r.peak),
             _headroom_cell(r), r.peak_phase, r.largest,
             *([str(r.max_batch) if r.max_batch is not None else "-"] if with_batch else []),
             *([format_bytes(r.leak) if r.leak else "-"] if with_leak else []), r.status] for r in rows]
    return header, body


def _wide(rows: Sequence[SummaryRow], phases: dict[str, list[tuple[str, int]]]):
    with_batch, with_leak = _optional(rows)
    header = ["test", "backend", "budget", "peak", "headroom", "peak in", *[_SHORT[c] for c in CATEGORIES],
              *(["max batch"] if with_batch else []), *(["leak"] if with_leak else []), "status"]
    body = []
    for r in rows:
        body.append([
            r.nodeid, r.backend, _budget_cell(r), format_bytes(r.peak), _headroom_cell(r), r.peak_phase,
            *[format_bytes(r.split.get(c, 0)) if r.split.get(c, 0) else "0" for c in CATEGORIES],
            *([str(r.max_batch) if r.max_batch is not None else "-"] if with_batch else []),
            *([format_bytes(r.leak) if r.leak else "-"] if with_leak else []), r.status,
        ])
        for name, peak in phases.get(r.nodeid, []):
            body.append([f"  {name}", "", "", format_bytes(peak), "", "", *[""] * len(CATEGORIES),
                         *([""] if with_batch else []), *([""] if with_leak else []), ""])
    return header, body


def _legend(rows: Sequence[SummaryRow], phases: dict[str, list[tuple[str, int]]] | None, wide: bool) -> list[str]:
    with_batch, with_leak = _optional(rows)
    legend = [
        "peak: most bytes allocated at any instant of the measured step(s); peak in: the phase where it happened; "
        "budget: the test's gpu_budget (- = none); headroom: share of the budget left unused (negative = over)",
    ]
    if wide:
        legend.append("the category columns split the peak: params (and buffers), grads, optim (optimizer state), "
                      "batch (inputs), activ (activations saved for backward), temps (temporaries), other "
                      "(allocator rounding, workspaces)")
    else:
        legend.append("largest: the category holding most of the peak (params, grads, optim, batch, activ, temps, "
                      "other); -v or --gpumem-report-wide: every category and each phase")
    if any(r.kind == "reserved" for r in rows):
        legend.append("reserved: that budget and its headroom are on reserved memory (allocator segments), not on peak")
    if any(r.backend == "emulated" for r in rows):
        legend.append("backend emulated: no GPU used; the figures predict what CUDA would allocate")
    if wide and phases:
        legend.append("indented rows: the peak of each step/phase (first = step 0, steady = later steps)")
    if with_batch:
        legend.append("max batch: the largest batch that fits the budget (gpumem.max_batch_size)")
    if with_leak:
        legend.append("leak: bytes measured in the test still allocated after it ended")
    return legend
