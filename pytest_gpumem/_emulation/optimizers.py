"""Make an optimizer take the implementation CUDA would take: foreach by default, fused when asked for."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .._compat import fused_devices_patch_target, tree_flatten
from .._cuda_facts.optimizers import FOREACH_BY_DEFAULT as _FOREACH_OPTIMIZERS
from .._cuda_facts.optimizers import FUSED_KERNELS_ALLOCATE_NOTHING
from .._cuda_facts.optimizers import LOOP_WITH_TENSOR_LR as _LOOP_WITH_TENSOR_LR
from .substitutions import _patched
from .value_ops import _SPECIAL


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
    (torch 2.4-2.14 adam.py); on the CPU or meta it picks the per-parameter loop. Groups with ``fused=True``
    run the fused kernels, whose device check is told that meta stands for CUDA. Restored on exit.
    """
    fused = isinstance(optimizer, torch.optim.Optimizer) and any(g.get("fused") for g in optimizer.param_groups)
    owner, name = fused_devices_patch_target()
    with _patched(((owner, name, _with_meta),) if fused else ()), _foreach_where_cuda_would(optimizer), \
            _lbfgs_worst_case(optimizer):
        yield optimizer


#: the report note of an emulated LBFGS step (see :func:`_lbfgs_worst_case`)
LBFGS_NOTE = ("LBFGS on the emulated backend runs its longest step: the stopping tests read values it does not "
              "know (gradient norm, descent direction, loss change), so they are switched off and every step makes "
              "max_iter closure evaluations, each keeping a curvature pair up to history_size (an upper bound; a "
              "real step stops when it converges; strong_wolfe line searches run to max_ls)")


@contextlib.contextmanager
def _lbfgs_worst_case(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Set LBFGS's tolerances to -inf for the step: no stopping test can pass on the neutral answers (an unknown
    gradient read as ones would otherwise look like an ascent direction and end the loop after one evaluation),
    so the loop and its history take their maximum length. Restored on exit."""
    saved = []
    if isinstance(optimizer, torch.optim.LBFGS):
        for group in optimizer.param_groups:
            saved.append((group, group["tolerance_grad"], group["tolerance_change"]))
            group["tolerance_grad"] = group["tolerance_change"] = float("-inf")
    try:
        yield
    finally:
        for group, grad, change in saved:
            group["tolerance_grad"], group["tolerance_change"] = grad, change


def _with_meta(supported):
    def devices() -> list[str]:
        return [*supported(), "meta"]
    return devices


@contextlib.contextmanager
def _foreach_where_cuda_would(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    changed = []
    if type(optimizer).__name__ in _FOREACH_OPTIMIZERS and isinstance(optimizer, torch.optim.Optimizer):
        for group in optimizer.param_groups:
            if _cuda_picks_foreach(optimizer, group):
                group["foreach"] = True
                changed.append(group)
    try:
        yield
    finally:
        for group in changed:
            group["foreach"] = None


def _fused_in_place(mode: Any, func: Any, args: tuple, kwargs: dict) -> Any:
    """A fused optimizer kernel on meta tensors: in place, nothing allocated (``_cuda_facts.optimizers``); torch
    has meta kernels for the Adam ones only."""
    flat, _ = tree_flatten((args, kwargs))
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in flat):
        return None
    return func(*args, **kwargs)


for _name in FUSED_KERNELS_ALLOCATE_NOTHING:
    _packet = getattr(torch.ops.aten, _name, None)
    for _overload in (_packet.overloads() if _packet is not None else ()):
        _SPECIAL[getattr(_packet, _overload)] = _fused_in_place
