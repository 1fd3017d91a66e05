"""The user's model, optimizer and batch on another device (meta for emulation, a GPU for cuda).

The step runs on a twin of the model built around device copies of its tensors; the optimizer is
rebuilt over the copies. While the step runs, the user's own model also points at the copies (and
gets its tensors back afterwards), so a loss that closes over it (``sum(p.abs().sum() for p in
model.parameters())``) sees the tensors the step uses. On the meta device a copy costs nothing.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from typing import Any, Iterator

import torch
from torch import nn
from .._compat import module_registries
from .._core.tensors import map_tensors


def move_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: an empty tensor of the same shape on meta, a real copy elsewhere."""
    if t.device == device:
        return t
    if device.type == "meta":
        return torch.empty_like(t, device=device)
    return t.detach().to(device)


def move_batch(batch: Any, device: torch.device) -> Any:
    """Every tensor in a (nested) batch on ``device``, dataclass fields included; other leaves unchanged.

    A tensor that appears twice (``labels=input_ids``, the same tensor as batch and target) is copied
    once, as a training loop that moves each tensor once would.
    """
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def move(t: torch.Tensor) -> torch.Tensor:
        hit = copies.get(id(t))
        if hit is None:
            hit = copies[id(t)] = (t, move_tensor(t, device))
        return hit[1]

    return map_tensors(move, batch)


def device_copies(model: nn.Module, device: torch.device) -> dict[int, torch.Tensor]:
    """id(original) -> a copy on ``device`` for every parameter (with its grad) and buffer of ``model``."""
    mapping: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in mapping:
            continue
        data = move_tensor(t.detach(), device)
        new = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
        if isinstance(t, nn.Parameter) and t.grad is not None:
            new.grad = move_tensor(t.grad, device)
        mapping[id(t)] = new
    return mapping


def model_twin(model: nn.Module, mapping: dict[int, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` built around ``mapping``'s tensors (a deepcopy whose memo maps each original).

    The memo also remaps tensors the model holds outside its registries (lists of weights, an RNN's
    flat weights), so the copy never touches the user's tensors and the user's model keeps no copy.
    """
    return copy.deepcopy(model, dict(mapping))


@contextlib.contextmanager
def swapped_in(model: nn.Module, mapping: dict[int, torch.Tensor]) -> Iterator[nn.Module]:
    """``model``'s parameter and buffer registries pointing at ``mapping``'s copies; restored on exit.

    Every new registry is built before any is changed, so a failure leaves the model as it was.
    """
    stores = [store for module in model.modules() for store in module_registries(module)]
    originals = [dict(store) for store in stores]
    replaced = [{name: (mapping[id(t)] if t is not None else None) for name, t in store.items()} for store in originals]
    try:
        for store, new in zip(stores, replaced):
            store.update(new)
        yield model
    finally:
        for store, old in zip(stores, originals):
            store.clear()
            store.update(old)


def optimizer_twin(optimizer: torch.optim.Optimizer, mapping: dict[int, torch.Tensor], device: torch.device):
    """The same optimizer class and hyper-parameters over the twin's parameters, with its state moved."""
    groups = []
    for group in optimizer.param_groups:
        new_group = {k: v for k, v in group.items() if k != "params"}
        new_group["params"] = [mapping[id(p)] for p in group["params"]]
        groups.append(new_group)
    try:
        twin = type(optimizer)(groups, **_constructor_defaults(optimizer))
    except TypeError as exc:
        raise TypeError(
            f"pytest-gpumem could not rebuild {type(optimizer).__name__} for the {device.type} device "
            f"({exc}); create the model and optimizer on gpumem.device instead"
        ) from exc
    on_device = {  # fused and capturable optimizers keep their 'step' counters on the device
        id(p) for g in optimizer.param_groups if g.get("fused") or g.get("capturable") for p in g["params"]
    }
    for param, state in optimizer.state.items():
        new_param = mapping[id(param)]
        keep_scalars = id(param) not in on_device
        twin.state[new_param] = {k: _move_state(v, device, keep_scalars) for k, v in state.items()}
    return twin


def _constructor_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's defaults that its constructor accepts.

    ``defaults`` may hold keys the constructor does not take (AdamW adds ``decoupled_weight_decay``
    after calling ``Adam.__init__``); the param groups carry every key anyway.
    """
    try:
        params = inspect.signature(type(optimizer).__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - C-implemented or odd signatures
        return dict(optimizer.defaults)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(optimizer.defaults)
    return {k: v for k, v in optimizer.defaults.items() if k in params}


def _move_state(value: Any, device: torch.device, keep_cpu_scalars: bool = True) -> Any:
    """Move per-parameter state; scalar CPU tensors (non-capturable 'step' counters) stay on the CPU."""
    if not isinstance(value, torch.Tensor):
        return value
    if keep_cpu_scalars and value.device.type == "cpu" and value.dim() == 0:
        return value.clone()
    return move_tensor(value, device)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a model without tensors)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None
