"""Rules for optimizers whose state is not a copy of each parameter: Adafactor (factored), SparseAdam.

Registered into :data:`optimizer_rules.OPTIMIZER_RULES` on import, like the table's own rules.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .optimizer_rules import Group, StateTensor, _step, optimizer_rule

_SMALL = 0  #: row and column means are (rows + cols) elements: below the peak's resolution, left out


def _trainable(group: Group) -> list[torch.Tensor]:
    return [p for p in group["params"] if p.requires_grad]


def _adafactor_temporaries(group: Group, sizes: Sequence[int], foreach: bool) -> int:
    """torch.optim.Adafactor's per-parameter loop (its default; the foreach path is not modelled apart):
    a matrix makes ``var_estimate = row_var @ col_var`` (1 x p; ``update`` is it, rsqrt_ and mul_ in place);
    a vector makes ``grad_squared = grad * grad`` and ``var_estimate = variance.clone()`` (2 x p). Locals
    stay bound until the next parameter rebinds them, so the previous parameter's var_estimate (and the last
    vector's grad_squared) are alive beside the new one."""
    held = {"var_estimate": 0, "grad_squared": 0}
    peak = 0
    for p, size in zip(_trainable(group), sizes):
        if p.dim() > 1:
            peak = max(peak, sum(held.values()) + size)
            held["var_estimate"] = size
        else:
            peak = max(peak, sum(held.values()) + size)
            held["grad_squared"] = size
            peak = max(peak, sum(held.values()) + size)
            held["var_estimate"] = size
    return peak


@optimizer_rule(torch.optim.Adafactor, temporaries=_adafactor_temporaries)
def adafactor_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """A CPU ``step`` counter; a matrix keeps its second moment factored as a row vector (shape with the last
    dim 1) and a column vector (the second-to-last dim 1), anything else a full ``variance``."""
    if p.dim() > 1:
        rows = p.numel() // p.shape[-1]
        cols = p.numel() // p.shape[-2]
        return (_step(group), StateTensor("row_var", rows, p.dtype), StateTensor("col_var", cols, p.dtype))
    return (_step(group), StateTensor("variance", p.numel(), p.dtype))


def _sparse_adam_temporaries(group: Group, sizes: Sequence[int], foreach: bool) -> int:
    """SparseAdam's temporaries scale with the gradient's unique rows (coalesce(), values), which depend on the
    batch's values, not on shapes: not estimated (counted as 0)."""
    return 0


@optimizer_rule(torch.optim.SparseAdam, temporaries=_sparse_adam_temporaries)
def sparse_adam_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """Dense ``exp_avg`` and ``exp_avg_sq`` of the parameter's shape; ``step`` is a Python int (no tensor)."""
    return (StateTensor("exp_avg", p.numel(), p.dtype), StateTensor("exp_avg_sq", p.numel(), p.dtype))
