"""What an estimate returns: the step's peak, its split, per-phase peaks and per-layer rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._core.categories import CATEGORIES, PHASES, Category, Phase
from .._core.results import split_to_dict
from .._core.units import format_bytes


@dataclass(frozen=True)
class LayerEstimate:
    """One module call (or the loss): its output shape, own parameters and bytes it saved first."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int               #: parameter elements owned directly by the module (0 on a repeated call)
    activation_bytes: int     #: bytes first saved by this call (after dedup), as the device allocates them
    method: str               #: "formula", "traced" or "hook"
    depth: int = 0
    formula_bytes: int | None = None  #: the closed-form figure where the peak rests on the trace (cross-check)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "type": self.type,
            "output_shape": list(self.output_shape) if self.output_shape is not None else None,
            "params": self.params, "activation_bytes": self.activation_bytes, "method": self.method,
            "formula_bytes": self.formula_bytes,
        }


@dataclass(frozen=True)
class Estimate:
    """The estimated step: peak, where it falls, its category mix, per-phase peaks and per-layer figures."""

    device: str
    peak: int
    peak_phase: Phase
    peak_step: int
    peak_split: dict[Category, int]
    phases: dict[Phase, int]          #: peak per phase, over all steps
    params: int                       #: parameters and buffers (raw bytes)
    grads: int
    optimizer: int
    batch: int
    activations: int
    layers: tuple[LayerEstimate, ...]
    notes: tuple[str, ...] = ()
    step_peaks: tuple[int, ...] = ()
    categories: dict[Category, int] = field(default_factory=dict)  #: category totals, as a dict
    category_peaks: dict[Category, int] = field(default_factory=dict)  #: most bytes per category at any phase peak
    unestimated: tuple[str, ...] = ()  #: categories the estimate cannot give (an optimizer without a rule)
    #: (count, bytes) of tensors the optimizer steps that are not the model's parameters
    foreign_optimizer_params: tuple[int, int] = (0, 0)
    autocast_inside: str | None = None  #: an autocast region the model or loss entered itself, as written

    def category_peak(self, category: Category) -> int:
        """Like StepReport.category_peak: the most bytes ``category`` held at any phase peak."""
        return self.category_peaks.get(category, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "peak_bytes": self.peak,
            "peak_phase": self.peak_phase.value,
            "peak_step": self.peak_step,
            "peak_split": split_to_dict(self.peak_split),
            "phases": {p.value: self.phases[p] for p in PHASES if p in self.phases},
            "totals": {c.value: v for c, v in self.categories.items()},
            "category_peaks": {c.value: v for c, v in self.category_peaks.items()},
            "step_peaks": list(self.step_peaks),
            "layers": [layer.to_dict() for layer in self.layers],
            "notes": list(self.notes),
            "unestimated": list(self.unestimated),
            "foreign_optimizer_params": list(self.foreign_optimizer_params),
        }

    def table(self) -> str:
        """Per-category totals, the peak split and per-phase peaks, for people."""
        lines = [f"estimate ({self.device}): peak {format_bytes(self.peak)} during {self.peak_phase.value} "
                 f"of step {self.peak_step}"]
        lines.append(f"{'category':<13}{'total':>14}{'at peak':>14}")
        for c in CATEGORIES:
            lines.append(f"{c.value:<13}{format_bytes(self.categories.get(c, 0)):>14}"
                         f"{format_bytes(self.peak_split.get(c, 0)):>14}")
        lines.append("phase peaks: " + ", ".join(f"{p.value} {format_bytes(v)}" for p, v in self.phases.items()))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def __str__(self) -> str:
        return f"Estimate({self.device}: peak {format_bytes(self.peak)} during {self.peak_phase.value})"
