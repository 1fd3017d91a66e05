"""Closed forms: the bytes of parameters, gradients and optimizer state one rank holds, per strategy.

Pure functions of shapes, dtypes and the optimizer's per-parameter state rule (``_estimate.optimizer_rules``).
What each strategy divides, as torch does it (checked against gloo ranks, tests/test_parallel_model_states.py):

- DDP: everything whole on every rank; gradient buckets hold a second copy of every gradient
  (``gradient_as_bucket_view=False``) or are the gradients' storage (True).
- ZeRO-1: DDP, and the optimizer state of whole parameters assigned to ranks greedily by size
  (``ZeroRedundancyOptimizer``: largest first, each to the rank with the fewest elements so far).
- FSDP / ZeRO-2 (FSDP2): parameter p on dim 0 in ceil(p.shape[0] / N) rows per rank, padded up to that
  on every rank (its own storage); gradients likewise (views of one padded reduce-scatter output per unit);
  optimizer state of the rank's unpadded rows. Buffers stay whole on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._estimate.optimizer_rules import rule_for
from .strategies import DDP, FSDP, ZeRO, Strategy


@dataclass(frozen=True)
class ModelStates:
    """Model-state bytes of one rank: what sits in params, grads and optimizer between steps."""

    rank: int
    params: int     #: parameters (this rank's shards, padded) and buffers
    grads: int      #: the grads category after backward: ``.grad`` plus separate gradient buckets
    optimizer: int  #: optimizer state after the first step (on ``device``)
    buckets: int = 0  #: DDP's bucket buffers, part of ``grads`` (the ``.grad`` storage itself with bucket views)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def to_dict(self) -> dict[str, int]:
        return {"rank": self.rank, "params_bytes": self.params, "grads_bytes": self.grads,
                "optimizer_bytes": self.optimizer, "buckets_bytes": self.buckets}


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """(padded rows every rank allocates, rows this rank really holds) of a dim 0 of ``rows`` over the ranks."""
    padded = math.ceil(rows / world_size)
    return padded, max(0, min(padded, rows - rank * padded))


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _sharded_shape(shape: tuple[int, ...], world_size: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(padded local shape, real local shape) of a parameter of ``shape`` under FSDP2."""
    shape = shape or (1,)
    padded, real = shard_rows(shape[0], world_size, rank)
    return (padded, *shape[1:]), (real, *shape[1:])


def zero_partition(sizes: list[list[int]], world_size: int) -> list[list[int]]:
    """ZeroRedundancyOptimizer's default partition: per param group, indices (into the group) per rank.

    Each group's parameters by element count, largest first (stable), each to the rank with the fewest
    elements so far over all groups (the lowest rank on ties).
    """
    totals = [0] * world_size
    owners: list[list[int]] = []
    for group in sizes:
        owner = [0] * len(group)
        for index in sorted(range(len(group)), key=lambda i: -group[i]):
            rank = totals.index(min(totals))
            owner[index] = rank
            totals[rank] += group[index]
        owners.append(owner)
    return owners


def _state_bytes(optimizer: torch.optim.Optimizer, group: dict[str, Any], shape: tuple[int, ...],
                 dtype: torch.dtype, device: str) -> int:
    rule = rule_for(optimizer)
    if rule is None:
        raise ValueError(f"no optimizer rule for {type(optimizer).__name__}: its per-rank state has no closed form "
                         "(register one with @optimizer_rule, docs/extending.md)")
    stand_in = torch.empty(shape, dtype=dtype, device="meta")
    return sum(t.nbytes for t in rule.state(group, stand_in) if t.on_param_device or device == "cpu")


def model_states(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy, *,
                 device: str = "cpu") -> tuple[ModelStates, ...]:
    """Per-rank model states of ``model`` trained with ``optimizer`` under ``strategy`` (index = rank).

    ``device`` is where the ranks run: 'cpu' counts the optimizers' CPU ``step`` counters, 'cuda' does not.
    """
    return tuple(_rank_states(model, optimizer, strategy, rank, device) for rank in range(strategy.world_size))


def _rank_states(model, optimizer, strategy: Strategy, rank: int, device: str) -> ModelStates:
    buffers = sum(b.nbytes for b in model.buffers())
    params = list(model.parameters())
    grad_bytes = sum(p.nbytes for p in params if p.requires_grad)
    groups = [g for g in optimizer.param_groups]
    if isinstance(strategy, DDP) or isinstance(strategy, ZeRO) and strategy.stage == 1:
        ddp = strategy if isinstance(strategy, DDP) else DDP(strategy.world_size)
        grads = grad_bytes if ddp.gradient_as_bucket_view else 2 * grad_bytes
        if isinstance(strategy, ZeRO):
            owners = zero_partition([[p.numel() for p in g["params"]] for g in groups], strategy.world_size)
            state = sum(_state_bytes(optimizer, g, tuple(p.shape), p.dtype, device)
                        for g, owner in zip(groups, owners) for p, r in zip(g["params"], owner) if r == rank)
        else:
            state = sum(_state_bytes(optimizer, g, tuple(p.shape), p.dtype, device) for g in groups for p in g["params"])
        return ModelStates(rank, sum(p.nbytes for p in params) + buffers, grads, state, grad_bytes)
    fsdp = strategy.as_fsdp() if isinstance(strategy, ZeRO) else strategy
    assert isinstance(fsdp, FSDP)
    ws = fsdp.world_size
    sharded = sum(_nbytes(_sharded_shape(tuple(p.shape), ws, rank)[0], p.dtype) for p in params)
    grads = sum(_nbytes(_sharded_shape(tuple(p.shape), ws, rank)[0], p.dtype) for p in params if p.requires_grad)
    state = sum(_state_bytes(optimizer, g, _sharded_shape(tuple(p.shape), ws, rank)[1], p.dtype, device)
                for g in groups for p in g["params"])
    return ModelStates(rank, sharded + buffers, grads, state)


def deepspeed_zero_bytes(stage: int, n_params: int, world_size: int, *, k: int = 12, param_bytes: int = 2,
                         grad_bytes: int = 2) -> float:
    """DeepSpeed's published per-rank model states (ZeRO paper, section 3 and figure 1) for Ψ = ``n_params``:
    stage 0 (plain data parallel) (2+2+K)Ψ, 1: 2Ψ+2Ψ+KΨ/N, 2: 2Ψ+(2+K)Ψ/N, 3: (2+2+K)Ψ/N, with K = 12 for
    mixed-precision Adam (fp32 master weights, momentum and variance); ``param_bytes``/``grad_bytes`` = 2 (fp16)."""
    psi, n, p, g = n_params, world_size, param_bytes, grad_bytes
    return {0: (p + g + k) * psi, 1: (p + g) * psi + k * psi / n, 2: p * psi + (g + k) * psi / n,
            3: (p + g + k) * psi / n}[stage]
