"""Make an optimizer take the implementation CUDA would default to (foreach)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .._cuda_facts.optimizers import FOREACH_BY_DEFAULT as _FOREACH_OPTIMIZERS


@contextlib.contextmanager
def predict_cuda_optimizer(optimizer: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """Make ``optimizer`` take the implementation CUDA would default to: foreach, where foreach is unset.

    On CUDA, _default_to_fused_or_foreach picks foreach for groups with foreach=None, fused not set and
    differentiable=False; on the CPU or meta it picks the per-parameter loop. Restored on exit.
    """
    changed = []
    if type(optimizer).__name__ in _FOREACH_OPTIMIZERS and isinstance(optimizer, torch.optim.Optimizer):
        for group in optimizer.param_groups:
            if "foreach" in group and group["foreach"] is None and not group.get("fused") \
                    and not group.get("differentiable"):
                group["foreach"] = True
                changed.append(group)
    try:
        yield optimizer
    finally:
        for group in changed:
            group["foreach"] = None
