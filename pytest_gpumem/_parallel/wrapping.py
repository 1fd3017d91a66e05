"""Lay a model and its optimizer out as a strategy says, inside an initialised process group.

DDP wraps the model (same parameters, same optimizer). ZeRO-1 adds ``ZeroRedundancyOptimizer`` around the
user's optimizer class. FSDP (and ZeRO-2, FSDP2 without resharding after forward) calls ``fully_shard``
on each unit, then the root; the parameters become DTensor shards, so the optimizer is rebuilt on them
with the user's class and per-group options. The same code serves the gloo ranks and the emulated ones.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import nn

from .strategies import DDP, FSDP, ZeRO, Strategy, units_by_class


def default_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The default wrapping rule: every element of each outermost ``nn.ModuleList`` (transformer blocks);
    without one, every direct child that holds parameters. The root is sharded after these, always."""
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        for block in module:
            if any(True for _ in block.parameters()):
                units.append(block)
            inside.update(id(m) for m in block.modules())
        inside.update(id(m) for m in module.modules())
    if units:
        return units
    return [child for child in model.children() if any(True for _ in child.parameters())]


def fsdp_units(model: nn.Module, wrap: Any) -> list[nn.Module]:
    """The submodules ``FSDP(wrap=...)`` picks, in module order, without the root and without repeats."""
    if wrap is None:
        chosen: Iterable[nn.Module] = default_fsdp_units(model)
    elif isinstance(wrap, type) or isinstance(wrap, tuple):
        chosen = units_by_class(wrap if isinstance(wrap, tuple) else (wrap,))(model)
    else:
        chosen = wrap(model)
    picked = {id(m) for m in chosen if isinstance(m, nn.Module) and m is not model}
    return [m for m in model.modules() if id(m) in picked]


def lay_out(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy):
    """(model, optimizer) as ``strategy`` runs them; the given optimizer's params are released (FSDP, ZeRO)."""
    if isinstance(strategy, DDP):
        return _ddp(model, strategy), optimizer
    if isinstance(strategy, ZeRO) and strategy.stage == 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        wrapped = _ddp(model, DDP(strategy.world_size))
        groups = _groups(optimizer, {})
        zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=type(optimizer),
                                       **_accepted(optimizer, groups[0]))
        for group in groups[1:]:
            zero.add_param_group(group)
        _release(optimizer)
        return wrapped, zero
    fsdp = strategy.as_fsdp() if isinstance(strategy, ZeRO) else strategy
    assert isinstance(fsdp, FSDP)
    return _fully_shard(model, optimizer, fsdp)


def _ddp(model: nn.Module, strategy: DDP) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, bucket_cap_mb=strategy.bucket_cap_mb,
                                   gradient_as_bucket_view=strategy.gradient_as_bucket_view)


def _fully_shard(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: FSDP):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = {id(p): name for name, p in model.named_parameters()}
    policy = MixedPrecisionPolicy(param_dtype=strategy.param_dtype, reduce_dtype=strategy.reduce_dtype)
    depth = {id(m): name.count(".") + 1 for name, m in model.named_modules() if name}
    # inner units first: fully_shard on an outer unit turns the inner unit's parameters into DTensors already
    for unit in sorted(fsdp_units(model, strategy.wrap), key=lambda m: -depth.get(id(m), 0)):
        fully_shard(unit, reshard_after_forward=strategy.reshard_after_forward, mp_policy=policy)
    fully_shard(model, reshard_after_forward=strategy.reshard_after_forward, mp_policy=policy)
    sharded = dict(model.named_parameters())
    mapping = {key: sharded[name] for key, name in names.items()}
    groups = _groups(optimizer, mapping)
    rebuilt = type(optimizer)(groups, **_accepted(optimizer, optimizer.defaults))
    _release(optimizer)
    return model, rebuilt


def _groups(optimizer: torch.optim.Optimizer, mapping: dict[int, Any]) -> list[dict[str, Any]]:
    """The optimizer's param groups (options kept) with each parameter replaced through ``mapping``."""
    groups = []
    for group in optimizer.param_groups:
        params = [mapping.get(id(p), p) for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    return groups


def _accepted(optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> dict[str, Any]:
    """The options the optimizer's constructor takes (``defaults`` also holds derived keys, e.g. AdamW's
    ``decoupled_weight_decay``, that its __init__ refuses); the groups keep every key anyway."""
    parameters = inspect.signature(type(optimizer).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return {k: v for k, v in options.items() if k != "params"}
    return {k: v for k, v in options.items() if k in parameters and k != "params"}


def _release(optimizer: torch.optim.Optimizer) -> None:
    """Drop the replaced optimizer's references to the full parameters (this rank's copy, not the user's)."""
    optimizer.param_groups.clear()
    optimizer.state.clear()
