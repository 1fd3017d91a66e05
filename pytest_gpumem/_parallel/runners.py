"""Who runs a data-parallel or sharded step, per gpumem backend: a registry filled by ``@parallel_runner``.

A runner takes a ``ParallelStep`` and returns one StepReport per rank (index = rank, each with its
``RankInfo``). ``cpu`` runs real processes with gloo (``gloo_ranks.py``); ``emulated`` runs the ranks in
one process on meta tensors with a fake process group (its module registers itself the same way). Each
backend's module is imported only when a step asks for it.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from .._core.results import StepReport
from .strategies import Strategy

#: default seconds a distributed step may take before its ranks are stopped
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ParallelStep:
    """Everything a runner needs to measure one step on every rank (arguments as ``measure_step`` takes them)."""

    model: Any
    optimizer: Any
    batch: Any
    strategy: Strategy
    loss_fn: Any = None
    target: Any = None
    steps: int = 2
    set_to_none: bool = True
    autocast_dtype: Any = None
    scaler: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    device: Any = None  #: the GPU the emulated ranks predict (a name or DeviceProfile); None: none named


ParallelRunner = Callable[[ParallelStep], "tuple[StepReport, ...]"]

_RUNNERS: dict[str, ParallelRunner] = {}
#: backend -> module that registers its runner when imported
RUNNER_MODULES: dict[str, str] = {
    "cpu": "pytest_gpumem._parallel.gloo_ranks",
    "emulated": "pytest_gpumem._parallel.emulated_ranks",
}


def parallel_runner(backend: str) -> Callable[[ParallelRunner], ParallelRunner]:
    """Register the function that measures distributed steps on ``backend`` (one per backend)."""

    def register(fn: ParallelRunner) -> ParallelRunner:
        if backend in _RUNNERS and _RUNNERS[backend] is not fn:
            raise ValueError(f"a parallel runner for backend {backend!r} is registered already: {_RUNNERS[backend]!r}")
        _RUNNERS[backend] = fn
        return fn

    return register


def runner_for(backend: str) -> ParallelRunner:
    """The runner of ``backend`` (importing its module); ValueError naming the backends that have one."""
    if backend not in _RUNNERS and backend in RUNNER_MODULES:
        try:
            importlib.import_module(RUNNER_MODULES[backend])
        except ModuleNotFoundError as exc:
            if exc.name != RUNNER_MODULES[backend]:
                raise
    runner = _RUNNERS.get(backend)
    if runner is None:
        have = sorted(set(_RUNNERS) | {b for b in RUNNER_MODULES if _module_exists(RUNNER_MODULES[b])})
        raise ValueError(
            f"parallel= is not supported on the {backend!r} backend"
            + (" (one GPU per rank under torchrun; this plugin measures one process)" if backend == "cuda" else "")
            + f"; use backend= one of {', '.join(map(repr, have))}: 'cpu' runs real gloo ranks on the CPU, "
            "'emulated' predicts CUDA per rank on meta tensors")
    return runner


def parallel_backend(name: str | None) -> str:
    """The backend a distributed step runs on: 'auto' is 'emulated' when it has a runner, else 'cpu'."""
    name = (name or "auto").lower()
    if name != "auto":
        return name
    return "emulated" if "emulated" in _RUNNERS or _module_exists(RUNNER_MODULES["emulated"]) else "cpu"


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
