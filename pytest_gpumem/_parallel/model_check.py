"""The contradiction check of a distributed step: each rank's measured model states and communication buffers
against the closed forms.

Parameters after the last zero_grad, gradients after the last backward, optimizer state after the first
optimizer step: shapes and dtypes fix them, so they must agree to the byte (the same rule as one device).
Each communication buffer (``comm_buffers.py``) by the most bytes it held at any instant of the last step
(``PhaseStats.part_peaks``): what FSDP2 and DDP allocate, and when they free it, follows from the units and
dtypes alone, whereas its share of a phase's peak depends on what else is alive then. Exact on every backend:
on gloo ranks each collective settles before the step goes on (settled_collectives.py), so a buffer gloo's worker
thread held a moment longer is no longer measured one unit's buffer above its closed form, as it was now and then
before they settled (torch 2.14: the all-gather buffer in 3 of 20 sharded runs of the agreement cases).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._core.categories import Category, Phase
from .._core.results import StepReport
from .._core.text_table import render_table
from .._core.units import format_bytes
from .._tools.contradiction import Comparison, Row
from .comm_buffers import ALL_GATHER, BUCKETS, PREFETCHED, REDUCE_SCATTER, UNSHARDED, comm_buffers
from .model_states import ModelStates, model_states
from .strategies import Strategy

#: named part -> what in the strategy or the model usually makes it differ from its closed form
LIKELY_CAUSES: dict[str, str] = {
    UNSHARDED: "more (or fewer) parameters gathered at once than the units allow: reshard_after_forward "
               "(False/ZeRO-2 keeps every unit gathered), units larger than wrap= gives (a unit wrapped around "
               "others), or param_dtype",
    ALL_GATHER: "unit sizes (wrap=), param_dtype, or units that run in another order than they are registered "
                "(the closed form takes module order; forward keeps the previous unit's buffer while the next "
                "one gathers)",
    PREFETCHED: "backward prefetching (FSDP2 gathers the unit that ran before in forward; explicit "
                "set_modules_to_backward_prefetch changes it; the closed form takes module order), "
                "reshard_after_forward, or unit sizes (wrap=)",
    REDUCE_SCATTER: "reduce_dtype/param_dtype, unit sizes (wrap=), or frozen parameters (requires_grad=False "
                    "parameters send no gradient)",
    BUCKETS: "DDP's buckets hold every trainable parameter's gradient once: parameters without gradients, "
             "gradient_as_bucket_view, or a model changed after wrapping",
}
COMM_PARTS: tuple[str, ...] = tuple(LIKELY_CAUSES)


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


def measured_buffer_peaks(report: StepReport) -> dict[str, int]:
    """The most bytes each communication buffer held at any instant of the report's last step."""
    peaks: dict[str, int] = {}
    for stats in report.steps[-1].phases.values():
        for name, size in stats.part_peaks.items():
            if name in COMM_PARTS:
                peaks[name] = max(peaks.get(name, 0), size)
    return peaks


@dataclass(frozen=True)
class ModelStateEstimate:
    """Closed-form model states and communication buffers of every rank; ``compare`` is what the plugin's
    contradiction check calls."""

    strategy: dict[str, Any]
    ranks: tuple[ModelStates, ...]
    device: str
    #: per rank: communication part -> the most bytes it reaches in a step (``comm_buffers``)
    buffers: tuple[dict[str, int], ...] = ()

    def compare(self, report: StepReport, rtol: float = 0.0, atol: int = 0) -> Comparison:
        """Params, grads, optimizer and each communication buffer of ``report``'s rank against the closed form,
        to the byte (rtol/atol unused)."""
        got = measured_model_states(report)
        want = self.ranks[got.rank]
        rows = [Row(name, getattr(want, name), getattr(got, name), getattr(want, name) == getattr(got, name),
                    "exact") for name in ("params", "grads", "optimizer")]
        rows += self._buffer_rows(got.rank, measured_buffer_peaks(report))
        table = render_table(["", "closed form", "measured", ""], [
            [r.name, format_bytes(r.estimated), format_bytes(r.measured), r.note if r.ok else "<-- differs"]
            for r in rows], left=(3,))
        settings = ", ".join(f"{k}={v!r}" for k, v in self.strategy.items() if k != "strategy")
        message = (f"rank {got.rank} of {self.strategy.get('strategy')}({settings}): model states and "
                   f"communication buffers against the closed form ({self.device}; params after zero_grad, grads "
                   f"after backward, optimizer after the first step, each buffer at its most in the last step):"
                   f"\n{table}")
        causes = tuple(f"{r.name}: {LIKELY_CAUSES[r.name]}" for r in rows if not r.ok and r.name in LIKELY_CAUSES)
        if causes:
            plural = "s" if len(causes) > 1 else ""
            message += f"\nlikely cause{plural}:\n" + "\n".join(f"  - {c}" for c in causes)
        return Comparison(all(r.ok for r in rows), tuple(rows), message, causes)

    def _buffer_rows(self, rank: int, measured: dict[str, int]) -> list[Row]:
        if not self.buffers:
            return []
        want = self.buffers[rank]
        rows = []
        for name in COMM_PARTS:
            if name not in want and name not in measured:
                continue
            est, got = want.get(name, 0), measured.get(name, 0)
            rows.append(Row(name, est, got, est == got, "exact"))
        return rows

    def to_dict(self) -> dict[str, Any]:
        ranks = [{**r.to_dict(), "comm_buffers": dict(b)} for r, b in zip(self.ranks, self.buffers)] if self.buffers \
            else [r.to_dict() for r in self.ranks]
        return {"kind": "model_states", "device": self.device, "strategy": dict(self.strategy), "ranks": ranks}


def model_state_estimate(model: Any, optimizer: Any, strategy: Strategy, *, device: str = "cpu") -> ModelStateEstimate:
    """The closed forms the plugin compares every rank of a distributed step with."""
    states = model_states(model, optimizer, strategy, device=device)
    return ModelStateEstimate(strategy.to_dict(), states, device, comm_buffers(model, strategy, states))
