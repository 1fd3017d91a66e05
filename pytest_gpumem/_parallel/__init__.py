"""Data-parallel and sharded training steps: strategies, per-rank runners, closed-form model states.

``measure_parallel_step`` checks the arguments and hands a ``ParallelStep`` to the runner registered for
the backend (``runners.py``); ``rank_step.py`` measures one rank inside an initialised process group,
whatever started it (gloo processes here, a fake process group on meta tensors for ``emulated``).
"""
from __future__ import annotations

from .measure import measure_parallel_step
from .runners import ParallelStep, parallel_runner, runner_for
from .strategies import DDP, FSDP, ZeRO, Strategy

__all__ = ["DDP", "FSDP", "ParallelStep", "Strategy", "ZeRO", "measure_parallel_step", "parallel_runner",
           "runner_for"]
