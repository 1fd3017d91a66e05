"""What one rank trains under a strategy: torch's own wrappers applied to a model and its optimizer.

The same code wraps a real CPU model over gloo and a meta model over torch's fake process group, so the
two measure the same allocations; a process group must be initialised before ``wrap_for_rank`` runs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .._measure.twins import _constructor_defaults

Wrapper = Callable[[Any, nn.Module, torch.optim.Optimizer], tuple[nn.Module, torch.optim.Optimizer]]

#: strategy class name -> the function that wraps a model and optimizer for one rank
WRAPPERS: dict[str, Wrapper] = {}


def _wrapper(name: str) -> Callable[[Wrapper], Wrapper]:
    def register(fn: Wrapper) -> Wrapper:
        if name in WRAPPERS:
            raise ValueError(f"a rank wrapper for {name} is registered already")
        WRAPPERS[name] = fn
        return fn

    return register


def wrap_for_rank(strategy: Any, model: nn.Module, optimizer: torch.optim.Optimizer):
    """``(model, optimizer)`` as one rank of ``strategy`` trains them (the group: the default process group)."""
    name = type(strategy).__name__
    if name not in WRAPPERS:
        raise TypeError(f"unknown parallel strategy {name}; expected one of {', '.join(sorted(WRAPPERS))}")
    if not dist.is_initialized():
        raise RuntimeError(f"{name} needs a process group: initialise one (gloo, or the fake one) first")
    if dist.get_world_size() != strategy.world_size:
        raise ValueError(f"{name}(world_size={strategy.world_size}) but the process group has "
                         f"{dist.get_world_size()} ranks")
    return WRAPPERS[name](strategy, model, optimizer)


def _ddp_module(strategy: Any, model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=getattr(strategy, "bucket_cap_mb", 25),
        gradient_as_bucket_view=getattr(strategy, "gradient_as_bucket_view", False))


@_wrapper("DDP")
def _ddp(strategy: Any, model: nn.Module, optimizer: torch.optim.Optimizer):
    """A full replica; gradients all-reduced in buckets (the first 1 MiB, then ``bucket_cap_mb``)."""
    return _ddp_module(strategy, model), optimizer


@_wrapper("ZeRO")
def _zero(strategy: Any, model: nn.Module, optimizer: torch.optim.Optimizer):
    """ZeRO-1: DDP's replica and buckets, optimizer state sharded (``ZeroRedundancyOptimizer``)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if getattr(strategy, "stage", 1) != 1:
        raise ValueError(f"ZeRO stage {strategy.stage} is not emulated by torch's own wrappers; stage 1 is")
    wrapped = _ddp_module(strategy, model)
    groups = [dict(group) for group in optimizer.param_groups]  # each group keeps its own hyper-parameters
    return wrapped, ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer),
                                            **_constructor_defaults(optimizer))


@_wrapper("FSDP")
def _fsdp(strategy: Any, model: nn.Module, optimizer: torch.optim.Optimizer):
    """FSDP2: ``fully_shard`` on every block (the children of each ModuleList, else each child with
    parameters), then on the root; the optimizer rebuilt over the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(dict((k, v) for k, v in g.items() if k != "params"), [names[id(p)] for p in g["params"]])
              for g in optimizer.param_groups]
    mesh = init_device_mesh("cpu", (strategy.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=getattr(strategy, "param_dtype", None),
                                  reduce_dtype=getattr(strategy, "reduce_dtype", None))
    reshard = getattr(strategy, "reshard_after_forward", True)
    for block in shard_units(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    sharded = dict(model.named_parameters())
    rebuilt = [dict(hyper, params=[sharded[n] for n in params]) for hyper, params in groups]
    return model, type(optimizer)(rebuilt)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: every ModuleList's children (transformer layers), else the
    root's children that hold parameters."""
    units = [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]
    if units:
        return units
    return [child for child in model.children() if any(True for _ in child.parameters())]
