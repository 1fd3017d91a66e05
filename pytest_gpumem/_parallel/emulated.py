"""One rank of a parallel step emulated in one process: torch's own DDP, FSDP2 and ZeroRedundancyOptimizer on
meta tensors, over torch's fake process group (collectives return at once; no data, no other ranks).

Every buffer the wrappers allocate (DDP's gradient buckets, FSDP2's all-gather inputs and outputs, unsharded
parameters, reduce-scatter inputs and outputs, the next block's backward prefetch) goes through the dispatcher,
so the step's tracker sees it as it would on one rank of a real job. The model and optimizer are copied to meta
outside the tracker, then wrapped inside the setup phase: what a rank holds is its shard, as after meta init.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .._compat import TorchDispatchMode, ddp_meta_patches, fake_store, fsdp2_meta_patches
from .._measure.backends import CpuBackend, EmulatedBackend
from .._measure.twins import optimizer_twin
from .rank_wrappers import wrap_for_rank


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """The default process group for the duration: torch's fake backend, this process rank 0 of ``world_size``."""
    if dist.is_initialized():
        raise RuntimeError(
            "a torch.distributed process group is already initialised in this process; the emulated parallel "
            "step runs its own fake one: measure it outside torchrun/init_process_group, or use the real ranks")
    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def wrappers_on_meta() -> Iterator[None]:
    """FSDP2 and DDP accept meta-device models for the duration (see ``_compat``); originals put back after."""
    saved = []
    try:
        for owner, attr, replacement in [*fsdp2_meta_patches(), *ddp_meta_patches()]:
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, replacement)
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


class RankZeroReadback(TorchDispatchMode):
    """A collective's meta result read back into a CPU tensor leaves that tensor as it was: rank 0 broadcast it.

    DDP's reducer broadcasts its rebuilt bucket order from rank 0 through a device tensor and copies it back
    to the CPU, which meta cannot (no data); on rank 0 the copy-back changes nothing, so nothing is copied.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _COPY and args[0].device.type == "cpu" and args[1].device.type == "meta":
            return args[0]
        return func(*args, **(kwargs or {}))


_COPY = torch.ops.aten.copy_.default


def echo_allreduce(state, bucket):  # unannotated: DDP checks the annotations, which this module makes strings
    """DDP comm hook for the fake group: the bucket reduced in place, as the default all-reduce hook leaves it
    (the fake backend's future carries no tensor, which DDP's reducer refuses)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def meta_twin(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Fresh meta copies of the model and optimizer (the user's, even on meta, are never wrapped or changed)."""
    mapping: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in mapping:
            data = torch.empty_like(t, device="meta")
            mapping[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    twin = copy.deepcopy(model, dict(mapping))
    return twin, optimizer_twin(optimizer, mapping, torch.device("meta"))


@dataclass
class _RankPreparation:
    """Wraps the placed model and optimizer for one rank of ``strategy``, inside the setup phase."""

    strategy: Any = None

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, notes: list[str]):
        wrapped, optimizer = wrap_for_rank(self.strategy, model, optimizer)
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(None, echo_allreduce)
        note = (f"{type(self.strategy).__name__} rank 0 of {self.strategy.world_size}, emulated: torch's wrapper on "
                f"meta tensors over the fake process group (collectives move no data)")
        if note not in notes:
            notes.append(note)
        return wrapped, optimizer


@dataclass
class EmulatedRankBackend(EmulatedBackend):
    """The emulated backend (CUDA's kernels and allocator on meta) for one rank of a parallel strategy."""

    strategy: Any = None
    _rank: _RankPreparation = field(default_factory=_RankPreparation)

    def prepare(self, model, optimizer):
        self._rank.strategy = self.strategy
        return self._rank.wrap(model, optimizer, self.notes)


@dataclass
class MetaCpuRankBackend(CpuBackend):
    """One rank on meta tensors with the CPU's rules (no CUDA kernels, no allocator rounding): the emulation
    that real gloo ranks on the CPU are compared with."""

    name: str = "cpu"
    device: torch.device = field(default_factory=lambda: torch.device("meta"))
    strategy: Any = None
    _rank: _RankPreparation = field(default_factory=_RankPreparation)

    def describe(self) -> str:
        return "cpu (emulated on meta tensors)"

    def prepare(self, model, optimizer):
        self._rank.strategy = self.strategy
        return self._rank.wrap(model, optimizer, self.notes)


def measure_rank_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, *, parallel: Any,
                      semantics: str = "cuda", **step_options: Any):
    """The StepReport of rank 0 of ``parallel`` (DDP, FSDP, ZeRO) training ``model``, emulated in this process.

    ``semantics="cuda"`` predicts a GPU (CUDA kernels and caching allocator on meta); ``"cpu"`` follows the
    CPU's kernels and raw bytes, to compare with real gloo ranks. Other options go to ``measure_step``.
    """
    from .._measure.step import measure_step

    kinds = {"cuda": EmulatedRankBackend, "cpu": MetaCpuRankBackend}
    if semantics not in kinds:
        raise ValueError(f"semantics must be one of {sorted(kinds)}, got {semantics!r}")
    backend = kinds[semantics](strategy=parallel)
    with fake_world(parallel.world_size), wrappers_on_meta(), RankZeroReadback():
        twin, twin_optimizer = meta_twin(model, optimizer)
        return measure_step(twin, twin_optimizer, batch, backend=backend, **step_options)
