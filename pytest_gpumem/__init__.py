"""pytest-gpumem: GPU memory budgets for PyTorch training steps, measured on CUDA or emulated on the CPU."""
from __future__ import annotations

from . import strategies
from ._core.categories import Category, Phase
from ._core.results import PhaseStats, StepMeasurement, StepReport
from ._core.units import format_bytes, parse_bytes
from ._estimate import Estimate, LayerEstimate, estimate_step, register_formulas
from ._estimate.layer_formulas import SavedItem, activation_formula
from ._estimate.optimizer_rules import StateTensor, optimizer_rule
from ._measure.step import OutOfMemory, StepFailed, measure_step, track
from ._tools.advisor import BatchAdvice, advise_batch_size, max_batch_size
from ._tools.contradiction import assert_matches_estimate, compare
from ._tools.fuzz import FuzzFailure, FuzzResult, fuzz
from ._tools.summary import summary
from .hookspecs import hookimpl

__all__ = [
    "BatchAdvice",
    "FuzzFailure",
    "FuzzResult",
    "advise_batch_size",
    "fuzz",
    "max_batch_size",
    "strategies",
    "Category",
    "Estimate",
    "LayerEstimate",
    "assert_matches_estimate",
    "compare",
    "estimate_step",
    "summary",
    "OutOfMemory",
    "Phase",
    "PhaseStats",
    "StepFailed",
    "StepMeasurement",
    "StepReport",
    "format_bytes",
    "measure_step",
    "parse_bytes",
    "track",
    # extension points: hook implementations and the formula registries (docs/extending.md)
    "SavedItem",
    "StateTensor",
    "activation_formula",
    "hookimpl",
    "optimizer_rule",
    "register_formulas",
]
__version__ = "0.1.0"
