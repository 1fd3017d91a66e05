"""The ``emulated`` parallel runner: every rank of a DDP, FSDP2 or ZeRO step predicted in this one process.

torch's own wrappers (``DistributedDataParallel``, ``fully_shard``, ``ZeroRedundancyOptimizer``) run on meta
tensors over torch's fake process group, whose collectives return at once and move no data. Every buffer the
wrappers allocate goes through the dispatcher (DDP's gradient buckets; FSDP2's all-gather buffers, unsharded
parameters, reduce-scatter buffers and the next unit's backward prefetch), so the rank's tracker sees it as on
a real rank, in program order (CUDA's side streams are not modelled: the allocator sees one stream).
The model and optimizer are copied to meta outside the tracker, then laid out in the setup phase, so a rank
holds its shard as after meta-device initialisation, never the whole model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import sys
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .._compat import TorchDispatchMode, ddp_meta_patches, dtensor_local, fake_store, fsdp2_meta_patches
from .._core.results import RankInfo, StepReport
from .._emulation.devices import resolve as resolve_device
from .._measure.backends import CpuBackend, EmulatedBackend
from .._measure.twins import optimizer_twin
from .clean_child import ChildCannotRunBackward, can_fork, report_from_child
from .rank_step import measure_rank_step
from .runners import ParallelStep, parallel_runner
from .strategies import FSDP, ZeRO

_COPY = torch.ops.aten.copy_.default


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """The default process group for the duration: torch's fake backend, this process rank ``rank``."""
    if dist.is_initialized():
        raise RuntimeError(
            "a torch.distributed process group is already initialised in this process; the emulated parallel step "
            "runs its own fake one: measure outside torchrun/init_process_group, or use backend='cpu' (gloo ranks)")
    hook = sys.excepthook  # init_process_group prefixes it with "[rankN]" and never puts it back
    dist.init_process_group("fake", store=fake_store(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def echo_allreduce(state, bucket):  # unannotated: DDP checks the annotations, which this module makes strings
    """DDP comm hook for the fake group: the bucket all-reduced in place, as the default hook leaves it (the fake
    backend's own future carries no tensor, which DDP's reducer refuses); the collective still runs, so whoever
    watches collectives sees the bucket."""
    dist.all_reduce(bucket.buffer())
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _ddp_init_with_echo(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.register_comm_hook(None, echo_allreduce)

    return __init__


@contextlib.contextmanager
def wrappers_on_meta() -> Iterator[None]:
    """FSDP2 and DDP accept meta-device models (``_compat``), DDP all-reduces through ``echo_allreduce``;
    every original is put back on exit."""
    ddp = nn.parallel.DistributedDataParallel
    patches = [*fsdp2_meta_patches(), *ddp_meta_patches(), (ddp, "__init__", _ddp_init_with_echo(ddp.__init__))]
    saved = []
    try:
        for owner, attr, replacement in patches:
            saved.append((owner, attr, owner.__dict__.get(attr, _MISSING)))
            setattr(owner, attr, replacement)
        yield
    finally:
        for owner, attr, original in reversed(saved):
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


_MISSING = object()


def _reduce_scatter_through_a_copy(original):
    @functools.wraps(original)
    def reduce_scatter(output, input, *args, **kwargs):  # noqa: A002 - torch's own argument name
        staged = input.clone()  # gloo has no reduce-scatter: it all-reduces a copy of the input, then slices it
        result = original(output, input, *args, **kwargs)
        del staged
        return result

    return reduce_scatter


@contextlib.contextmanager
def gloo_collectives() -> Iterator[None]:
    """The fake group's reduce-scatter allocates what gloo's does: a copy of the whole input for the time of the
    call (ProcessGroupGloo all-reduces a copy and keeps its slice; seen in the allocation log of real gloo ranks).
    NCCL allocates nothing through the caching allocator there, so only the ``cpu`` semantics use this."""
    names = [n for n in ("reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, n)]
    saved = [(n, getattr(dist, n)) for n in names]
    try:
        for name, original in saved:
            setattr(dist, name, _reduce_scatter_through_a_copy(original))
        yield
    finally:
        for name, original in saved:
            setattr(dist, name, original)


class RankZeroReadback(TorchDispatchMode):
    """A collective's meta result read back into a CPU tensor leaves that tensor as it was.

    DDP's reducer broadcasts its rebuilt bucket order from rank 0 through a device tensor and copies it back to
    the CPU, which meta cannot (no data); every rank computed the same order, so keeping its own is exact.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _COPY and args[0].device.type == "cpu" and args[1].device.type == "meta":
            return args[0]
        return func(*args, **(kwargs or {}))


def meta_twin(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Fresh meta copies of the model and optimizer, made untracked (the user's, even on meta, stay as they are)."""
    mapping: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in mapping:
            data = torch.empty_like(t, device="meta")
            mapping[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    return copy.deepcopy(model, dict(mapping)), optimizer_twin(optimizer, mapping, torch.device("meta"))


@contextlib.contextmanager
def stepping_local_shards(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """``optimizer.step()`` over the local shards of its DTensor parameters, their grads and state; put back after.

    A DTensor op runs the same op on the local shards (elementwise: no communication), so the allocations are
    the same; what is saved is DTensor's sharding propagation for foreach ops over hundreds of parameters
    (~12 s for the first step of an 8-rank Llama-3-8B here, 0.4 s on local shards).
    """
    swapped: list[tuple[dict, int, torch.Tensor, torch.Tensor]] = []
    try:
        for group in optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                local = dtensor_local(param)
                if local is None:
                    continue
                grad = dtensor_local(param.grad) if param.grad is not None else None
                local.grad = grad
                if param in optimizer.state:
                    optimizer.state[local] = {k: dtensor_local(v) if dtensor_local(v) is not None else v
                                              for k, v in optimizer.state.pop(param).items()}
                group["params"][index] = local
                swapped.append((group, index, param, local))
        yield
    finally:
        for group, index, param, local in reversed(swapped):
            group["params"][index] = param
            local.grad = None  # the grad stays the DTensor's (zero_grad drops it there)
            if local in optimizer.state:
                optimizer.state[param] = optimizer.state.pop(local)


class _IgnoresWholeModel:
    """Backend mixin: its tracker ignores the whole-model copy a sharded layout is made from (FSDP, ZeRO-2), as a
    rank initialised on meta and sharded before ``to_empty`` never holds it; DDP and ZeRO-1 keep it (it is theirs)."""

    whole_model: tuple = ()

    def optimizer_context(self, optimizer) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(super().optimizer_context(optimizer))  # type: ignore[misc]
        if optimizer is not None:
            stack.enter_context(stepping_local_shards(optimizer))
        return stack

    def make_tracker(self):
        tracker = super().make_tracker()  # type: ignore[misc]
        tracker.ignore(self.whole_model)
        return tracker


@dataclasses.dataclass
class EmulatedRankBackend(_IgnoresWholeModel, EmulatedBackend):
    """The emulated backend (CUDA kernels and allocator on meta) for one rank."""


@dataclasses.dataclass
class MetaCpuRankBackend(_IgnoresWholeModel, CpuBackend):
    """One rank on meta tensors with the CPU's kernels and raw bytes (compared with real gloo ranks)."""

    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("meta"))

    def forward_context(self) -> contextlib.AbstractContextManager:
        from .._estimate.kernel_mode import KernelMode  # meta's SDPA saves what the CPU's flash kernel saves

        return KernelMode("cpu", on_scratch=lambda output, shape: None)  # the CPU's kernels report no scratch


def _shards_parameters(strategy) -> bool:
    return isinstance(strategy, FSDP) or isinstance(strategy, ZeRO) and strategy.stage == 2


def rank_groups(step: ParallelStep) -> list[list[int]]:
    """Ranks that hold the same bytes, grouped (one is measured per group).

    DDP: every rank alike. FSDP (and ZeRO-2): ranks alike when each parameter's dim-0 chunk has the same length
    on them (padding gives every rank the same storage, but the real rows of the last ranks differ, and so do the
    views FSDP2 makes of them). ZeRO-1: each rank updates its own parameters, so each is its own group.
    """
    strategy = step.strategy
    world = strategy.world_size
    if isinstance(strategy, ZeRO) and strategy.stage == 1:
        return [[rank] for rank in range(world)]
    if not _shards_parameters(strategy):
        return [list(range(world))]
    rows = [p.shape[0] if p.dim() else 1 for p in step.model.parameters()]
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world):
        signature = tuple(max(0, min(-(-n // world), n - rank * -(-n // world))) for n in rows)
        groups.setdefault(signature, []).append(rank)
    return list(groups.values())


def emulate_rank(step: ParallelStep, rank: int, backend: Any) -> StepReport:
    """Rank ``rank``'s StepReport, its step run in this process on meta tensors over a fake process group."""
    gloo = gloo_collectives() if isinstance(backend, MetaCpuRankBackend) else contextlib.nullcontext()
    # DDP alone reads a broadcast back (its bucket order); a dispatch mode costs every op, so only there
    readback = contextlib.nullcontext() if _shards_parameters(step.strategy) else RankZeroReadback()
    with fake_world(step.strategy.world_size, rank), wrappers_on_meta(), readback, gloo:
        model, optimizer = meta_twin(step.model, step.optimizer)
        if _shards_parameters(step.strategy):
            backend.whole_model = tuple(model.parameters())
        report = measure_rank_step(dataclasses.replace(step, model=model, optimizer=optimizer), rank, backend)
    note = (f"emulated: torch's {step.strategy.name} wrappers on meta tensors over the fake process group "
            "(collectives move no data; side streams not modelled)")
    return dataclasses.replace(report, notes=(*report.notes, note))


def emulate_ranks(step: ParallelStep, *, semantics: str = "cuda") -> tuple[StepReport, ...]:
    """One StepReport per rank, one rank measured per group of alike ranks. ``semantics="cuda"`` predicts a GPU
    (CUDA kernels and caching allocator on meta); ``"cpu"`` keeps the CPU's kernels, raw bytes and gloo's
    collectives, to compare with real gloo ranks."""
    kinds = {"cuda": EmulatedRankBackend, "cpu": MetaCpuRankBackend}
    if semantics not in kinds:
        raise ValueError(f"semantics must be one of {sorted(kinds)}, got {semantics!r}")
    reports: dict[int, StepReport] = {}
    for group in rank_groups(step):
        backend = EmulatedRankBackend(profile=resolve_device(step.device)) if semantics == "cuda" else kinds[semantics]()
        measured = _measure_apart(step, functools.partial(emulate_rank, step, group[0], backend))
        for rank in group:
            reports[rank] = measured if rank == group[0] else _same_as(measured, rank, group[0])
    return tuple(reports[rank] for rank in range(step.strategy.world_size))


def _measure_apart(step: ParallelStep, measure: Callable[[], StepReport]) -> StepReport:
    """A sharded step runs in a forked child: FSDP's DTensors would stop this process from forking gloo ranks
    later (see clean_child). Where this process can no longer fork children that run backward anyway (it ran a
    backward with a CUDA device present, or a DTensor step before), there is nothing left to protect: run here."""
    if not (_shards_parameters(step.strategy) and can_fork()):
        return measure()
    try:
        return report_from_child(measure, step.timeout_s)
    except ChildCannotRunBackward:
        return measure()


def _same_as(report: StepReport, rank: int, measured: int) -> StepReport:
    """The measured rank's report for a rank that holds the same bytes, labelled with its own rank."""
    assert report.parallel is not None
    info = RankInfo(report.parallel.strategy, report.parallel.world_size, rank, report.parallel.settings)
    note = f"rank {rank} holds what rank {measured} holds (same shard lengths): rank {measured}'s figures"
    return dataclasses.replace(report, parallel=info, notes=(*report.notes, note))


@parallel_runner("emulated")
def run_emulated(step: ParallelStep) -> tuple[StepReport, ...]:
    """The ``emulated`` backend's runner (CUDA semantics)."""
    return emulate_ranks(step, semantics="cuda")
