"""Why a measurement exceeds its estimate: the user-code patterns that do it, read off the report.

The estimate is a lean step: every tensor it makes is gone when the step ends, saved tensors are freed by
backward, the optimizer steps the model's own parameters, tensors have the dtypes the trace gave them. When
the measurement disagrees, one of these usually did not hold; each finding names the pattern and the bytes.
"""
from __future__ import annotations

from typing import Any

from .._core.categories import Category, Phase
from .._core.results import StepReport
from .._core.units import format_bytes

#: what a step's saved tensors, outputs and transients are filed under
_STEP_TENSORS = (Category.ACTIVATIONS, Category.TEMPORARIES)


def likely_causes(report: StepReport, estimate: Any, atol: int) -> list[str]:
    """Findings, most specific first; empty when nothing in the report points at a cause."""
    out = []
    growth = step_growth(report)
    if growth > atol:
        out.append(f"memory grows step over step ({format_bytes(growth)} more is allocated after each step than "
                   "after the first): tensors made in a step outlive it - a loss summed or appended without "
                   ".item(), outputs kept in a list or by a forward hook")
    left = _left_after_backward(report)
    if left > atol:
        out.append(f"{format_bytes(left)} of activations and temporaries are still allocated when backward ends: "
                   "something keeps the graph or the outputs alive (retain_graph=True, outputs stored by a hook, "
                   "a loss or output kept past the step)")
    foreign = getattr(estimate, "foreign_optimizer_params", (0, 0))
    if foreign[0]:
        out.append(f"the optimizer holds {foreign[0]} tensor(s) ({format_bytes(foreign[1])}) that are not the "
                   "model's parameters (an optimizer built over another model, or over copies of this one): the "
                   "step moves and updates them too, while the estimate holds the model's own")
    inside = getattr(estimate, "autocast_inside", None)
    if inside is not None:
        out.append(f"an unexpected dtype: the model or loss enters {inside} itself, so the step runs in lower "
                   "precision than the estimate traced; pass autocast_dtype=... to train_step instead")
    return out


def step_growth(report: StepReport) -> int:
    """Bytes the last step leaves allocated beyond what the first left, optimizer state aside (the first step
    creates it)."""
    steps = report.steps
    if len(steps) < 2:
        return 0
    return _retained_without(steps[-1], Category.OPTIMIZER) - _retained_without(steps[0], Category.OPTIMIZER)


def _retained_without(step: Any, category: Category) -> int:
    phases = [p for p in (Phase.ZERO_GRAD, Phase.OPTIMIZER, Phase.BACKWARD) if p in step.phases]
    if not phases:
        return 0
    stats = step.phases[phases[0]]
    return stats.retained - stats.retained_split.get(category, 0)


def _left_after_backward(report: StepReport) -> int:
    """Activations and temporaries allocated when the first step's backward ended (a lean step: none)."""
    stats = report.steps[0].phases.get(Phase.BACKWARD) if report.steps else None
    if stats is None:
        return 0
    return sum(stats.retained_split.get(c, 0) for c in _STEP_TENSORS)
