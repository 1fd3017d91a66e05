"""torch.tensor / torch.as_tensor on the meta device through the dispatcher, so their values are kept."""
from __future__ import annotations

from typing import Any, Callable

import torch

from .substitutions import Proceed, Substitution, _register


def _literal_on_meta(func: Callable, args: tuple, kwargs: dict, proceed: Proceed) -> Any:
    """torch.tensor(data, device=meta): built on the CPU, then copied, so the copy's value is known."""
    device = kwargs.get("device")
    if device is None or torch.device(device).type != "meta":
        return proceed(args, kwargs)
    requires_grad = kwargs.get("requires_grad", False)
    on_cpu = proceed(args, {k: v for k, v in kwargs.items() if k not in ("device", "requires_grad")})
    copy = on_cpu.to("meta")  # dispatched: the value-tracking mode records on_cpu as its value
    return copy.requires_grad_(True) if requires_grad else copy


_register(Substitution(
    "literal_tensors",
    "torch.tensor/as_tensor(data, device='cuda') copy host data into one block of the tensor's size; on meta the "
    "copy goes through the dispatcher so the value-tracking mode keeps its value (torch 2.4-2.14).",
    intercepts=frozenset({torch.tensor, torch.as_tensor}),
    run=_literal_on_meta,
))
