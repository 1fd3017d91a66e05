"""Closed forms: the most bytes each named communication buffer reaches on one rank during a training step.

Pure functions of shapes, dtypes, the strategy and its wrapping units; the names are those ``rank_step.py``
gives the measured parts (``PhaseStats.part_peaks``). What torch allocates (read from FSDP2's
``_fsdp_collectives.py``/``_fsdp_param_group.py``; the same on torch 2.11 and 2.14; checked against gloo
and emulated ranks, tests/test_parallel_comm_buffers.py):

- FSDP2, per unit: one flat all-gather output of world_size x the unit's padded shards (each parameter's
  dim 0 padded up to a multiple of world_size), in ``param_dtype`` when given; the unsharded parameters are
  views of per-parameter outputs of the same padded sizes, so a unit's unsharded bytes equal its buffer.
  Forward keeps a unit's all-gather output until the next unit's copy-out (overlap), so two consecutive
  units' buffers are alive together. Backward gathers one unit ahead ("prefetched"): the unit that ran before
  in forward. Each unit's gradients are copied into one flat padded reduce-scatter input in ``reduce_dtype``
  (default: the gradients' dtype, ``param_dtype`` when given), freed before the next unit's is allocated.
  ``reshard_after_forward=False`` (ZeRO-2) keeps every unit unsharded from forward to the end of backward:
  no gather in backward, nothing prefetched. One rank alone (world_size 1) gathers and reduce-scatters nothing.
- DDP and ZeRO-1: the gradient buckets (``ModelStates.buckets``), every phase. ZeroRedundancyOptimizer
  broadcasts the updated parameters in place (``parameters_as_bucket_view=False``, torch's default), so it
  adds no buffer of its own.

Every rank's buffers have the same size (padding makes each shard as large as rank 0's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .model_states import ModelStates
from .strategies import DDP, FSDP, ZeRO, Strategy
from .wrapping import fsdp_units

ALL_GATHER = "params: all-gather buffer"
UNSHARDED = "params: unsharded"
PREFETCHED = "params: prefetched"
REDUCE_SCATTER = "grads: reduce-scatter input"
BUCKETS = "grads: gradient buckets"


@dataclass(frozen=True)
class UnitBuffers:
    """One FSDP2 unit's buffers on every rank: bytes of its all-gather output and reduce-scatter input."""

    name: str            #: the unit's module path ('' for the root's own parameters)
    all_gather: int      #: world_size x padded shards, in the gather dtype (= its unsharded parameters)
    reduce_scatter: int  #: its padded gradients in the reduce dtype (0 without trainable parameters)


def padded_numel(shape: tuple[int, ...], world_size: int) -> int:
    """Elements of a parameter of ``shape`` once FSDP2 pads dim 0 up to a multiple of ``world_size``."""
    shape = shape or (1,)
    return math.ceil(shape[0] / world_size) * world_size * math.prod(shape[1:])


def unit_buffers(model: nn.Module, strategy: FSDP) -> list[UnitBuffers]:
    """The units FSDP2 builds for ``model`` in forward order (root first, then ``fsdp_units`` in module
    order), each parameter in the innermost unit holding it; units without parameters are left out."""
    units = fsdp_units(model, strategy.wrap)
    owner: dict[int, int] = {}
    for index, unit in enumerate([model, *units]):  # module order: an inner unit comes after its outer one
        for p in unit.parameters():
            owner[id(p)] = index
    names = {id(m): name for name, m in model.named_modules()}
    ws = strategy.world_size
    out = []
    for index, unit in enumerate([model, *units]):
        params = [p for p in unit.parameters() if owner[id(p)] == index]
        if not params:
            continue
        gather = sum(padded_numel(tuple(p.shape), ws) * (strategy.param_dtype or p.dtype).itemsize for p in params)
        reduce = sum(padded_numel(tuple(p.shape), ws) * _reduce_dtype(strategy, p.dtype).itemsize
                     for p in params if p.requires_grad)
        out.append(UnitBuffers(names[id(unit)], gather, reduce))
    return out


def _reduce_dtype(strategy: FSDP, dtype: torch.dtype) -> torch.dtype:
    return strategy.reduce_dtype or strategy.param_dtype or dtype


def fsdp_buffer_peaks(units: list[UnitBuffers], world_size: int, reshard_after_forward: bool,
                      root_has_params: bool) -> dict[str, int]:
    """The most bytes each FSDP2 buffer part reaches in one steady training step, for ``units`` in forward order
    (the root's own unit first when ``root_has_params``)."""
    gathers = [u.all_gather for u in units]
    if not gathers:
        return {}
    if world_size == 1:  # no collective: the unsharded parameters are copies of the (whole) local shards
        return {UNSHARDED: sum(gathers) if not reshard_after_forward else _unsharded_one_at_a_time(
            gathers, root_has_params)}
    # forward: unit i's output lives until unit i+1's copy-out, after unit i+1's own output is allocated
    forward_gather = max(a + b for a, b in zip(gathers, gathers[1:])) if len(gathers) > 1 else gathers[0]
    peaks = {ALL_GATHER: forward_gather, REDUCE_SCATTER: max(u.reduce_scatter for u in units)}
    if not reshard_after_forward:
        peaks[UNSHARDED] = sum(gathers)  # every unit gathered by the forward's end, resharded one by one in backward
        return {k: v for k, v in peaks.items() if v}
    peaks[UNSHARDED] = _unsharded_one_at_a_time(gathers, root_has_params)
    # backward: each unit prefetches the one that ran before it in forward; the first to run backward (the
    # root when it holds parameters, else the last unit) gathers itself, unprefetched
    children = gathers[1:] if root_has_params else gathers
    prefetched = children if root_has_params else children[:-1]
    peaks[ALL_GATHER] = max(peaks[ALL_GATHER], gathers[0] if root_has_params else gathers[-1])
    if prefetched:
        peaks[PREFETCHED] = max(prefetched)
    return {k: v for k, v in peaks.items() if v}


def _unsharded_one_at_a_time(gathers: list[int], root_has_params: bool) -> int:
    """Resharded after each unit: one unit gathered at a time, beside the root's own parameters (gathered from
    the root's pre-forward to its post-forward, and through all of backward)."""
    if not root_has_params:
        return max(gathers)
    return gathers[0] + max(gathers[1:], default=0)


def comm_buffers(model: nn.Module, strategy: Strategy, states: tuple[ModelStates, ...]) -> tuple[dict[str, int], ...]:
    """Per rank (index = rank): named communication part -> the most bytes it reaches in a steady step."""
    if isinstance(strategy, DDP) or isinstance(strategy, ZeRO) and strategy.stage == 1:
        return tuple({BUCKETS: s.buckets} if s.buckets else {} for s in states)
    fsdp = strategy.as_fsdp() if isinstance(strategy, ZeRO) else strategy
    assert isinstance(fsdp, FSDP)
    units = unit_buffers(model, fsdp)
    root_has_params = bool(units) and units[0].name == ""
    peaks = fsdp_buffer_peaks(units, fsdp.world_size, fsdp.reshard_after_forward, root_has_params)
    return tuple(dict(peaks) for _ in states)
