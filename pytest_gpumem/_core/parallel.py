"""Per-rank results of a data-parallel or sharded step: which rank a StepReport describes, and all of them.

The strategy travels as its ``to_dict()`` (plain JSON), so this room needs nothing from ``_parallel``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .categories import Category, Phase
from .results import RankInfo, StepReport  # noqa: F401  (RankInfo re-exported)
from .text_table import render_table
from .units import format_bytes


@dataclass(frozen=True)
class ParallelReport:
    """Every rank's StepReport of one data-parallel or sharded step; the budget applies to each rank.

    The StepReport-like properties (``peak``, ``peak_split``, ``table()``) are those of the rank with the
    largest peak (the first on ties), the rank a per-GPU budget is decided by.
    """

    strategy: Mapping[str, Any]          #: the strategy's ``to_dict()``
    ranks: tuple[StepReport, ...]        #: index = rank

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def peak_rank(self) -> int:
        return max(range(len(self.ranks)), key=lambda r: (self.ranks[r].peak, -r))

    @property
    def peak_report(self) -> StepReport:
        return self.ranks[self.peak_rank]

    @property
    def peak(self) -> int:
        return self.peak_report.peak

    @property
    def peak_phase(self) -> Phase:
        return self.peak_report.peak_phase

    @property
    def peak_split(self) -> dict[Category, int]:
        return self.peak_report.peak_split

    @property
    def backend(self) -> str:
        return self.peak_report.backend

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": dict(self.strategy), "peak_rank": self.peak_rank,
                "ranks": [r.to_dict() for r in self.ranks]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ParallelReport":
        return cls(dict(data["strategy"]), tuple(StepReport.from_dict(r) for r in data["ranks"]))

    def table(self, *, verbose: bool = False) -> str:
        """One line per rank, then the peak rank's phase x category table."""
        rows = [[str(rank), format_bytes(r.peak), r.peak_phase.value, r.peak_step.label,
                 "<- peak" if rank == self.peak_rank else ""] for rank, r in enumerate(self.ranks)]
        head = render_table(["rank", "peak", "phase", "step", ""], rows)
        return f"{head}\n{self.peak_report.table(verbose=verbose)}"

    def __str__(self) -> str:
        return (f"ParallelReport({self.strategy.get('strategy')} x{self.world_size}: peak {format_bytes(self.peak)} "
                f"on rank {self.peak_rank} during {self.peak_phase.value})")
