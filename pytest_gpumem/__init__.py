"""pytest-gpumem: GPU memory budgets for PyTorch training steps, measured on CUDA or emulated on the CPU.

Names are imported on first use (PEP 562), so loading the pytest plugin in a run without GPU-memory
tests imports neither torch nor hypothesis.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "BatchAdvice": "_tools.advisor", "advise_batch_size": "_tools.advisor", "max_batch_size": "_tools.advisor",
    "Category": "_core.categories", "Phase": "_core.categories",
    "assert_matches_estimate": "_tools.contradiction", "compare": "_tools.contradiction",
    "Estimate": "_estimate", "LayerEstimate": "_estimate", "estimate_step": "_estimate",
    "FuzzFailure": "_tools.fuzz", "FuzzResult": "_tools.fuzz", "fuzz": "_tools.fuzz",
    "PhaseStats": "_core.results", "StepMeasurement": "_core.results", "StepReport": "_core.results",
    "OutOfMemory": "_measure.step", "StepFailed": "_measure.step", "measure_step": "_measure.step",
    "track": "_measure.step",
    "summary": "_tools.summary",
    "format_bytes": "_core.units", "parse_bytes": "_core.units",
    # data-parallel and sharded steps (README: Data-parallel and sharded training)
    "DDP": "_parallel.strategies", "FSDP": "_parallel.strategies", "ZeRO": "_parallel.strategies",
    "model_states": "_parallel.model_states", "ModelStates": "_parallel.model_states",
    "ParallelReport": "_core.parallel", "RankInfo": "_core.results", "measure_parallel_step": "_parallel.measure",
    # extension points: hook implementations and the formula registries (docs/extending.md)
    "SavedItem": "_estimate.layer_formulas", "activation_formula": "_estimate.layer_formulas",
    "StateTensor": "_estimate.optimizer_rules", "optimizer_rule": "_estimate.optimizer_rules",
    "register_formulas": "_estimate", "hookimpl": "hookspecs",
    "DeviceProfile": "_cuda_facts.devices",
}
_MODULES = ("strategies",)

__all__ = sorted([*_EXPORTS, *_MODULES])
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from . import strategies  # noqa: F401
    from ._core.categories import Category, Phase  # noqa: F401
    from ._cuda_facts.devices import DeviceProfile  # noqa: F401
    from ._core.results import PhaseStats, StepMeasurement, StepReport  # noqa: F401
    from ._core.units import format_bytes, parse_bytes  # noqa: F401
    from ._core.parallel import ParallelReport  # noqa: F401
    from ._core.results import RankInfo  # noqa: F401
    from ._parallel.measure import measure_parallel_step  # noqa: F401
    from ._parallel.model_states import ModelStates, model_states  # noqa: F401
    from ._parallel.strategies import DDP, FSDP, ZeRO  # noqa: F401
    from ._estimate import Estimate, LayerEstimate, estimate_step, register_formulas  # noqa: F401
    from ._estimate.layer_formulas import SavedItem, activation_formula  # noqa: F401
    from ._estimate.optimizer_rules import StateTensor, optimizer_rule  # noqa: F401
    from ._measure.step import OutOfMemory, StepFailed, measure_step, track  # noqa: F401
    from ._tools.advisor import BatchAdvice, advise_batch_size, max_batch_size  # noqa: F401
    from ._tools.contradiction import assert_matches_estimate, compare  # noqa: F401
    from ._tools.fuzz import FuzzFailure, FuzzResult, fuzz  # noqa: F401
    from ._tools.summary import summary  # noqa: F401
    from .hookspecs import hookimpl  # noqa: F401
