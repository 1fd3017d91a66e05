"""Contradiction check: does a measured StepReport agree with the analytical Estimate?

``compare`` is pure (the plugin calls it); ``assert_matches_estimate`` raises with the table.
Categories are compared by the most bytes each held at any phase peak (``category_peak`` on both
sides: the same definition), the peak against the peak. The model states (params, grads, optimizer
state) are shapes times dtypes, so they must agree to the byte; the batch, activations and the peak
within ``rtol`` or ``atol`` bytes, whichever is larger, so a tiny model's few hundred bytes of allocator
order do not flap. When they disagree, the message says what in the user's code usually causes it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .._core.categories import Category
from .._core.results import StepReport
from .._core.text_table import render_table
from .._core.units import format_bytes, format_percent
from .._estimate import Estimate
from .contradiction_causes import likely_causes, step_growth

#: Categories with an estimated total to compare (temporaries and other are part of the peak only).
COMPARED: tuple[Category, ...] = (
    Category.PARAMS, Category.GRADS, Category.OPTIMIZER, Category.BATCH, Category.ACTIVATIONS,
)
#: compared to the byte: parameters, gradients and optimizer state follow from shapes and dtypes alone
EXACT: frozenset[Category] = frozenset({Category.PARAMS, Category.GRADS, Category.OPTIMIZER})
#: the default absolute floor of the tolerance: differences below it never fail (256 KiB)
DEFAULT_ATOL = 256 * 1024


@dataclass(frozen=True)
class Row:
    """One line of the comparison: what, estimated, measured, relative difference, within tolerance?"""

    name: str
    estimated: int
    measured: int
    ok: bool
    note: str = ""  #: why the row is not judged, or how ("exact")

    @property
    def rel(self) -> float:
        """(estimated - measured) / measured; 0 when both are 0."""
        if self.measured == 0:
            return 0.0 if self.estimated == 0 else float("inf")
        return (self.estimated - self.measured) / self.measured


@dataclass(frozen=True)
class Comparison:
    """Result of comparing a report with an estimate."""

    ok: bool
    rows: tuple[Row, ...]
    message: str
    causes: tuple[str, ...] = ()  #: likely causes in the user's code, when the measurement exceeds the estimate


def _within(estimated: int, measured: int, rtol: float, atol: int = 0) -> bool:
    return abs(estimated - measured) <= max(rtol * max(abs(measured), 1), atol)


def _category_row(c: Category, report: StepReport, estimate: Estimate, rtol: float, atol: int) -> Row:
    est, got = estimate.category_peak(c), report.category_peak(c)
    if c.value in getattr(estimate, "unestimated", ()):
        return Row(c.value, est, got, True, "not estimated")
    if c in EXACT:
        return Row(c.value, est, got, est == got, "exact")
    return Row(c.value, est, got, _within(est, got, rtol, atol))


def _peak_row(report: StepReport, estimate: Estimate, rtol: float, atol: int) -> Row:
    # allocator artefacts (512-B rounding, unsplit block remainders, cuBLAS/cuDNN workspaces) are 'other' on
    # both sides and are not the estimate's to predict: the peak is compared without them
    est_tracked = estimate.peak - estimate.peak_split.get(Category.OTHER, 0)
    got_tracked = report.tracked_peak()  # library workspaces can move the peak's instant: compared without them
    # ... unless the allocated peaks themselves agree: on a tiny step several instants hold the same 512-B
    # blocks, and which one is 'the peak' (so its tracked bytes) follows the exact alloc/free order
    # (an 8-8-2 MLP at batch 1: 7.00 KiB allocated on both sides, 472 B vs 560 B tracked)
    if not _within(est_tracked, got_tracked, rtol) and _within(estimate.peak, report.peak, rtol):
        return Row("peak", estimate.peak, report.peak, True)
    return Row("peak", est_tracked, got_tracked, _within(est_tracked, got_tracked, rtol, atol))


def compare(report: StepReport, estimate: Estimate, rtol: float = 0.05, atol: int = DEFAULT_ATOL) -> Comparison:
    """Compare per category and peak; the message is a table, with the likely causes when they differ."""
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol!r}, atol={atol!r}")
    rows = [_category_row(c, report, estimate, rtol, atol) for c in COMPARED]
    rows.append(_peak_row(report, estimate, rtol, atol))
    if len(report.steps) > 1:
        # a lean step leaves what it found (the first also its optimizer state): the estimate's growth is 0
        growth = step_growth(report)
        rows.append(Row("growth", 0, growth, growth <= atol, "left by later steps beyond the first"))
    ok = all(r.ok for r in rows)
    causes = tuple(likely_causes(report, estimate, atol)) if not ok else ()
    table = render_table(["", "estimated", "measured", "diff", ""], [
        [r.name, format_bytes(r.estimated), format_bytes(r.measured),
         format_percent(r.rel) if r.rel != float("inf") else "inf",
         "<-- differs" if not r.ok else ("(not estimated)" if r.note == "not estimated" else "")] for r in rows],
        left=(4,))
    lines = [f"estimate ({estimate.device}) vs measured ({report.backend}), rtol {rtol:.0%}, atol "
             f"{format_bytes(atol)}; params, grads and optimizer exact:", table]
    lines.append(f"peak without 'other' (allocator rounding and workspaces); with it: estimated "
                 f"{format_bytes(estimate.peak)}, measured {format_bytes(report.peak)}")
    lines.append(f"peak phase: estimated {estimate.peak_phase.value}, measured {report.peak_phase.value}")
    if not next(r for r in rows if r.name == Category.ACTIVATIONS.value).ok:
        top = sorted(estimate.layers, key=lambda layer: -layer.activation_bytes)[:5]
        lines.append("layers with the most activation bytes (estimate): " + ", ".join(
            f"{layer.name} ({layer.type}, {format_bytes(layer.activation_bytes)}, {layer.method})" for layer in top))
    if causes:
        lines.append("likely cause" + ("s" if len(causes) > 1 else "") + ":")
        lines.extend(f"  - {c}" for c in causes)
    return Comparison(ok, tuple(rows), "\n".join(lines), causes)


def assert_matches_estimate(report: StepReport, estimate: Estimate, rtol: float = 0.05,
                            atol: int = DEFAULT_ATOL) -> None:
    """Raise AssertionError with the estimate-vs-measured table when any row is outside the tolerance."""
    result = compare(report, estimate, rtol, atol)
    if not result.ok:
        raise AssertionError(result.message)
