"""The contradiction check of a distributed step: each rank's measured model states against the closed form.

Parameters after the last zero_grad, gradients after the last backward, optimizer state after the first
optimizer step: shapes and dtypes fix them, so they must agree to the byte (the same rule as one device).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._core.categories import Category, Phase
from .._core.results import StepReport
from .._core.text_table import render_table
from .._core.units import format_bytes
from .._tools.contradiction import Comparison, Row
from .model_states import ModelStates, model_states
from .strategies import Strategy


def measured_model_states(report: StepReport) -> ModelStates:
    """The model states a rank's report shows (rank from its RankInfo)."""
    first, last = report.steps[0], report.steps[-1]

    def retained(step, phase: Phase, category: Category) -> int:
        stats = step.phases.get(phase)
        return stats.retained_split.get(category, 0) if stats is not None else 0

    rank = report.parallel.rank if report.parallel is not None else 0
    return ModelStates(rank, retained(last, Phase.ZERO_GRAD, Category.PARAMS),
                       retained(last, Phase.BACKWARD, Category.GRADS),
                       retained(first, Phase.OPTIMIZER, Category.OPTIMIZER))


@dataclass(frozen=True)
class ModelStateEstimate:
    """Closed-form model states of every rank; ``compare`` is what the plugin's contradiction check calls."""

    strategy: dict[str, Any]
    ranks: tuple[ModelStates, ...]
    device: str

    def compare(self, report: StepReport, rtol: float = 0.0, atol: int = 0) -> Comparison:
        """Params, grads and optimizer of ``report``'s rank against the closed form, exact (rtol/atol unused)."""
        got = measured_model_states(report)
        want = self.ranks[got.rank]
        rows = tuple(Row(name, getattr(want, name), getattr(got, name), getattr(want, name) == getattr(got, name),
                         "exact") for name in ("params", "grads", "optimizer"))
        table = render_table(["", "closed form", "measured", ""], [
            [r.name, format_bytes(r.estimated), format_bytes(r.measured), "" if r.ok else "<-- differs"] for r in rows],
            left=(3,))
        message = (f"rank {got.rank} of {self.strategy.get('strategy')} x{len(self.ranks)}: model states against the "
                   f"closed form ({self.device}; params after zero_grad, grads after backward, optimizer after the "
                   f"first step; exact):\n{table}")
        return Comparison(all(r.ok for r in rows), rows, message)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "model_states", "device": self.device, "strategy": dict(self.strategy),
                "ranks": [r.to_dict() for r in self.ranks]}


def model_state_estimate(model: Any, optimizer: Any, strategy: Strategy, *, device: str = "cpu") -> ModelStateEstimate:
    """The closed form the plugin compares every rank of a distributed step with."""
    return ModelStateEstimate(strategy.to_dict(), model_states(model, optimizer, strategy, device=device), device)
