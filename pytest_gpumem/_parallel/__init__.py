"""Data-parallel and sharded training steps: strategies, per-rank runners, closed-form model states.

``measure_parallel_step`` checks the arguments and hands a ``ParallelStep`` to the runner registered for
the backend (``runners.py``); ``rank_step.py`` measures one rank inside an initialised process group,
whatever started it (gloo processes here, a fake process group on meta tensors for ``emulated``).
"""
from __future__ import annotations

from .measure import measure_parallel_step
from .model_check import ModelStateEstimate, model_state_estimate
from .model_states import ModelStates, model_states
from .runners import ParallelStep, parallel_runner, runner_for
from .strategies import DDP, FSDP, ZeRO, Strategy

__all__ = ["DDP", "FSDP", "ModelStateEstimate", "ModelStates", "ParallelStep", "Strategy", "ZeRO",
           "measure_parallel_step", "model_state_estimate", "model_states", "parallel_runner", "runner_for"]
