"""Closed forms: the most bytes each named communication buffer reaches on one rank during a training step.

Pure functions of shapes, dtypes, the strategy and its wrapping units; the names are those ``rank_step.py``
gives the measured parts (``PhaseStats.part_peaks``). What torch allocates (read from FSDP2's
``_fsdp_collectives.py``/``_fsdp_param_group.py``; the same on torch 2.11 and 2.14; checked against gloo
and emulated ranks, tests/test_parallel_comm_buffers.py):

- FSDP2, per unit (the root's own parameters, then each unit in module order, an inner unit's hooks running
  within its outer unit's: module order is taken for forward order, the one assumption about the model's code):
  one flat all-gather output of world_size x the unit's padded shards (each parameter's dim 0 padded up to a
  multiple of world_size), in ``param_dtype`` when given; the unsharded parameters are views of per-parameter
  outputs of the same padded sizes, so a unit's unsharded bytes equal its buffer. Forward keeps a unit's
  all-gather output until the next unit's copy-out (overlap), so two consecutive units' buffers are alive
  together. Backward replays the hooks in reverse and gathers one unit ahead ("prefetched"): the unit whose
  forward ended just before. Each unit's gradients are copied into one flat padded reduce-scatter input in
  ``reduce_dtype`` (default: the gradients' dtype, ``param_dtype`` when given), freed before the next unit's
  is allocated.
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
    parent: int = -1     #: index of the nearest enclosing unit in the list, -1 at the top


def padded_numel(shape: tuple[int, ...], world_size: int) -> int:
    """Elements of a parameter of ``shape`` once FSDP2 pads dim 0 up to a multiple of ``world_size``."""
    shape = shape or (1,)
    return math.ceil(shape[0] / world_size) * world_size * math.prod(shape[1:])


def unit_buffers(model: nn.Module, strategy: FSDP) -> list[UnitBuffers]:
    """The units FSDP2 builds for ``model`` in module order (the root's own parameters first, then ``fsdp_units``),
    each parameter in the innermost unit holding it; units without parameters of their own are left out."""
    modules = [model, *fsdp_units(model, strategy.wrap)]
    owner: dict[int, int] = {}
    inside: list[set[int]] = []
    for index, unit in enumerate(modules):  # module order: an inner unit comes after its outer one
        inside.append({id(m) for m in unit.modules()})
        for p in unit.parameters():
            owner[id(p)] = index
    names = {id(m): name for name, m in model.named_modules()}
    ws, kept, out = strategy.world_size, {}, []
    for index, unit in enumerate(modules):
        params = [p for p in unit.parameters() if owner[id(p)] == index]
        if not params:
            continue
        gather = sum(padded_numel(tuple(p.shape), ws) * (strategy.param_dtype or p.dtype).itemsize for p in params)
        reduce = sum(padded_numel(tuple(p.shape), ws) * _reduce_dtype(strategy, p.dtype).itemsize
                     for p in params if p.requires_grad)
        outer = [kept[i] for i in kept if i != index and id(unit) in inside[i]]
        kept[index] = len(out)
        out.append(UnitBuffers(names[id(unit)], gather, reduce, max(outer, default=-1)))
    return out


def _reduce_dtype(strategy: FSDP, dtype: torch.dtype) -> torch.dtype:
    return strategy.reduce_dtype or strategy.param_dtype or dtype


def forward_events(units: list[UnitBuffers]) -> list[tuple[str, int]]:
    """("pre", i) / ("post", i) of each unit's forward hooks, in the order they run: a unit's forward encloses
    its inner units' (units run in module order: the closed form's one assumption about the model's code)."""
    events: list[tuple[str, int]] = []
    open_units: list[int] = []
    for index, unit in enumerate(units):
        while open_units and open_units[-1] != unit.parent:
            events.append(("post", open_units.pop()))
        events.append(("pre", index))
        open_units.append(index)
    events += [("post", i) for i in reversed(open_units)]
    return events


class _Parts:
    """Running bytes of each named part and the most each reached."""

    def __init__(self) -> None:
        self.now: dict[str, int] = {}
        self.most: dict[str, int] = {}

    def add(self, part: str, size: int) -> None:
        self.now[part] = self.now.get(part, 0) + size
        self.most[part] = max(self.most.get(part, 0), self.now[part])


def fsdp_buffer_peaks(units: list[UnitBuffers], world_size: int, reshard_after_forward: bool) -> dict[str, int]:
    """The most bytes each FSDP2 buffer part reaches in one training step (every unit sharded at its start).

    Forward: a unit's pre-forward gathers it (its output kept until the next unit's copy-out), its post-forward
    reshards it (``reshard_after_forward``). Backward replays the forward hooks in reverse: a unit's pre-backward
    (its post-forward reversed) gathers it unless prefetched, then prefetches the unit whose forward ended just
    before its own; its post-backward reshards it and reduce-scatters its gradients (the previous input freed first).
    """
    if not units:
        return {}
    sizes = [u.all_gather for u in units]
    events = forward_events(units)
    order = [i for kind, i in events if kind == "post"]  # FSDP2's post-forward order
    parts, unsharded, pending, deferred = _Parts(), set(), set(), 0
    for kind, i in events:
        if kind == "pre":
            parts.add(ALL_GATHER, sizes[i])
            parts.add(ALL_GATHER, -deferred)
            deferred = sizes[i]
            unsharded.add(i)
            parts.add(UNSHARDED, sizes[i])
        elif reshard_after_forward:
            unsharded.discard(i)
            parts.add(UNSHARDED, -sizes[i])
    parts.add(ALL_GATHER, -deferred)  # the root's post-forward lets go of the last output
    reducing = 0
    for kind, i in reversed(events):
        if kind == "post":  # pre-backward
            if i in pending:
                pending.discard(i)
                parts.add(PREFETCHED, -sizes[i])
            elif i not in unsharded:
                parts.add(ALL_GATHER, sizes[i])
                parts.add(ALL_GATHER, -sizes[i])
            if i not in unsharded:
                unsharded.add(i)
                parts.add(UNSHARDED, sizes[i])
            before = order.index(i) - 1
            if before >= 0 and order[before] not in unsharded and order[before] not in pending:
                pending.add(order[before])
                parts.add(PREFETCHED, sizes[order[before]])
        else:  # post-backward
            unsharded.discard(i)
            parts.add(UNSHARDED, -sizes[i])
            if units[i].reduce_scatter:
                parts.add(REDUCE_SCATTER, units[i].reduce_scatter - reducing)
                reducing = units[i].reduce_scatter
    if world_size == 1:  # no collectives: only the unsharded copies are allocated
        return {UNSHARDED: parts.most[UNSHARDED]}
    return {k: v for k, v in parts.most.items() if v}


def comm_buffers(model: nn.Module, strategy: Strategy, states: tuple[ModelStates, ...]) -> tuple[dict[str, int], ...]:
    """Per rank (index = rank): named communication part -> the most bytes it reaches in a steady step."""
    if isinstance(strategy, DDP) or isinstance(strategy, ZeRO) and strategy.stage == 1:
        return tuple({BUCKETS: s.buckets} if s.buckets else {} for s in states)
    fsdp = strategy.as_fsdp() if isinstance(strategy, ZeRO) else strategy
    assert isinstance(fsdp, FSDP)
    peaks = fsdp_buffer_peaks(unit_buffers(model, fsdp), fsdp.world_size, fsdp.reshard_after_forward)
    return tuple(dict(peaks) for _ in states)
