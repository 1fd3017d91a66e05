"""Measure one rank of a data-parallel or sharded step, inside an initialised process group.

The step runs as ``measure_step`` runs it (setup, batch, forward, backward, optimizer, zero_grad), with
the strategy's layout applied during setup so DDP's gradient buckets and FSDP's shards are measured.
``RankSession`` classifies DTensor shards by their local tensors, marks FSDP2's unsharded parameters,
and watches the collectives to name the communication buffers (``PhaseStats.peak_parts`` at each phase's
peak, ``PhaseStats.part_peaks`` at their own most; closed forms in ``comm_buffers.py``):

- ``params: unsharded``       FSDP2's all-gathered parameters of the units that are gathered now
- ``params: all-gather buffer`` the flat buffer the all-gather writes into (freed after the copy-out)
- ``params: prefetched``      the all-gather buffer of the next unit, gathered ahead of time (FSDP2 prefetches
  one unit in backward by default; its unsharded parameters are copied out when that unit starts)
- ``grads: reduce-scatter input`` the flat, padded unsharded gradients FSDP2 reduce-scatters
- ``grads: gradient buckets`` DDP's bucket buffers (the ``.grad`` storage itself with gradient_as_bucket_view)

Whatever started the rank (gloo processes, a fake process group on meta tensors) calls ``measure_rank_step``.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterator

import torch

from .._compat import (TorchDispatchMode, fsdp_prefetch_patch_target, fsdp_unsharded_params,
                       storage_resize_patch_target, tree_flatten)
from .._core.categories import Category, Phase
from .._core.results import RankInfo, StepReport
from .._core.step_calls import default_loss
from .._core.tensors import map_tensors
from .._measure.backends import Backend
from .._measure.step import Session, older_objects_frozen, one_step, optimizer_state_tensors
from .._measure.tracker import StorageTracker
from .runners import ParallelStep
from .settled_collectives import settling_collectives
from .strategies import DDP, FSDP, ZeRO
from .wrapping import lay_out

#: c10d op name -> (which argument holds the buffer, its category, its part)
_COLLECTIVE_BUFFERS: dict[str, tuple[int, Category, str]] = {
    "_allgather_base_": (0, Category.PARAMS, "all-gather buffer"),
    "allgather_into_tensor_coalesced_": (0, Category.PARAMS, "all-gather buffer"),
    "_reduce_scatter_base_": (1, Category.GRADS, "reduce-scatter input"),
    "reduce_scatter_tensor_coalesced_": (1, Category.GRADS, "reduce-scatter input"),
}


class RankSession(Session):
    """A Session that sees through DTensors and names FSDP2's unsharded parameters."""

    def classify(self) -> None:
        super().classify()  # DTensor parameters, grads and state: the tracker observes their local shards
        local = getattr(self.optimizer, "optim", None)  # ZeroRedundancyOptimizer: the state lives in its shard's optimizer
        if isinstance(local, torch.optim.Optimizer):
            self.tracker.mark(optimizer_state_tensors(local), Category.OPTIMIZER)
        if self.model is not None:
            unsharded = fsdp_unsharded_params(self.model)
            self.tracker.mark(unsharded, Category.PARAMS)
            self.tracker.mark_part(unsharded, "unsharded")


class CollectiveWatcher(TorchDispatchMode):
    """Names the buffers collectives work on: DDP's buckets (all-reduce), FSDP2's all-gather/reduce-scatter."""

    def __init__(self, tracker: StorageTracker, bucketed: bool) -> None:
        super().__init__()
        self.tracker = tracker
        self.bucketed = bucketed  #: DDP: what all-reduce reduces are its gradient buckets
        self.prefetching = 0      #: > 0 inside FSDP2's prefetch of another unit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        namespace = getattr(func, "namespace", "")
        if namespace != "c10d":
            return out
        name = func.__name__.split(".")[0]
        if name in _COLLECTIVE_BUFFERS:
            index, category, part = _COLLECTIVE_BUFFERS[name]
            if self.prefetching and part == "all-gather buffer":
                part = "prefetched"
            self._name(args[index], category, part)
        elif name == "allreduce_" and self.bucketed:
            self._name(args[0], Category.GRADS, "gradient buckets")
        return out

    def _name(self, value: Any, category: Category, part: str) -> None:
        tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        self.tracker.mark(tensors, category)
        self.tracker.mark_part(tensors, part)


@contextlib.contextmanager
def watching_resizes(tracker: StorageTracker) -> Iterator[None]:
    """Tell the tracker about ``UntypedStorage.resize_`` (FSDP2 frees unsharded parameters that way)."""
    owner, name = storage_resize_patch_target()
    own = name in owner.__dict__
    original = getattr(owner, name)

    def resize_(storage, size):
        result = original(storage, size)
        tracker.storage_resized(storage)
        return result

    setattr(owner, name, resize_)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def watching_prefetch(watcher: CollectiveWatcher, strategy) -> Iterator[None]:
    """Tell the watcher when FSDP2 gathers a unit ahead of its turn (``_prefetch_unshard``)."""
    if not isinstance(strategy, FSDP) and not (isinstance(strategy, ZeRO) and strategy.stage == 2):
        yield
        return
    owner, name = fsdp_prefetch_patch_target()
    original = owner.__dict__[name]  # a staticmethod object
    inner = original.__func__ if isinstance(original, staticmethod) else original

    def prefetch(*args, **kwargs):
        watcher.prefetching += 1
        try:
            return inner(*args, **kwargs)
        finally:
            watcher.prefetching -= 1

    setattr(owner, name, staticmethod(prefetch))
    try:
        yield
    finally:
        setattr(owner, name, original)


def rank_slice(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's slice of dim 0 of every batched tensor, as its own storage (scalars as they are)."""
    return map_tensors(lambda t: t.chunk(world_size)[rank].clone() if t.dim() else t, batch)


def measure_rank_step(step: ParallelStep, rank: int, backend: Backend, *, settle: bool = False) -> StepReport:
    """Lay out, then measure ``step.steps`` steps on this rank; the report carries its RankInfo.

    ``settle``: each collective returns only once its buffers are freed (real gloo ranks; settled_collectives).
    """
    strategy = step.strategy
    session = RankSession(backend)
    inputs, target = rank_slice((step.batch, step.target), rank, strategy.world_size)
    loss_fn = step.loss_fn or default_loss
    watcher = CollectiveWatcher(session.tracker, _bucketed(strategy))
    settling = settling_collectives(session.tracker, backend.notes) if settle else contextlib.nullcontext()
    with older_objects_frozen(), session, watching_resizes(session.tracker), watching_prefetch(watcher, strategy), \
            settling, watcher:
        session.phase(0, Phase.SETUP)
        model, optimizer = step.model, step.optimizer
        if _needs_placing(model, backend):
            model, optimizer = session.place_model(model, optimizer)
        model, optimizer = lay_out(model, optimizer, strategy)
        session.model, session.optimizer = model, optimizer
        session.classify()
        session.adopt_batch((inputs, target))
        backend.after_placement(session.tracker)
        session.phase(0, Phase.BATCH)
        inputs, target = session.place_batch((inputs, target))
        for index in range(step.steps):
            one_step(session, index, model, optimizer, inputs, target, loss_fn, step.set_to_none,
                     step.autocast_dtype, None)
        del model, optimizer, inputs, target
        gc.collect()
    report = session.close()
    info = RankInfo(strategy.name, strategy.world_size, rank, strategy.to_dict())
    return StepReport(report.backend, report.device, report.torch_version, report.cuda_version, report.steps,
                      report.notes, info)


def _bucketed(strategy) -> bool:
    return isinstance(strategy, DDP) or isinstance(strategy, ZeRO) and strategy.stage == 1


def _needs_placing(model: Any, backend: Backend) -> bool:
    param = next(model.parameters(), None)
    return param is not None and param.device.type != backend.device.type
