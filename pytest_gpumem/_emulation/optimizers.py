"""Make an optimizer take the implementation CUDA would default to (foreach)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


from .._cuda_facts.optimizers import FOREACH_BY_DEFAULT as _FOREACH_OPTIMIZERS
from .._cuda_facts.optimizers import LOOP_WITH_TENSOR_LR as _LOOP_WITH_TENSOR_LR


def _cuda_picks_foreach(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether CUDA's default (foreach=None) resolves to foreach for this group."""
    if group.get("foreach", False) is not None or group.get("fused") or group.get("differentiable"):
        return False
    tensor_lr = isinstance(group.get("lr"), torch.Tensor) and not group.get("capturable", False)
    return not (tensor_lr and type(optimizer).__name__ in _LOOP_WITH_TENSOR_LR)


@contextlib.contextmanager
def predict_cuda_optimizer(optimizer: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """Make ``optimizer`` take the implementation CUDA would default to: foreach, where foreach is unset.

    On CUDA, _default_to_fused_or_foreach picks foreach for groups with foreach=None, fused not set and
    differentiable=False, except Adam/AdamW with a Tensor lr and capturable=False, which keep the loop
    (torch 2.4-2.14 adam.py); on the CPU or meta it picks the per-parameter loop. Restored on exit.
    """
    changed = []
    if type(optimizer).__name__ in _FOREACH_OPTIMIZERS and isinstance(optimizer, torch.optim.Optimizer):
        for group in optimizer.param_groups:
            if _cuda_picks_foreach(optimizer, group):
                group["foreach"] = True
                changed.append(group)
    try:
        yield optimizer
    finally:
        for group in changed:
            group["foreach"] = None
