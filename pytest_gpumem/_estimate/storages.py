"""Tensor helpers of the estimate: storage identity, the tensors in a pytree, byte sizes."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._compat import storage_key
from .._core.tensors import tensors_in as _tensors


def _storage_key(t: torch.Tensor) -> int:
    return storage_key(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def held_by(obj: Any, depth: int = 8, extra: dict[int, tuple[Any, list[torch.Tensor]]] | None = None
            ) -> list[torch.Tensor]:
    """Every tensor ``obj`` keeps alive: its pytree leaves and, a few levels deep, the attributes of the objects
    among them (a Hugging Face output's ``past_key_values`` cache keeps each layer's keys and values). ``extra``:
    id(object) -> (object, tensors it keeps besides its attributes: what replayed blocks left in it)."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def visit(o: Any, left: int) -> None:
        if isinstance(o, torch.Tensor):
            found.setdefault(id(o), o)
            return
        if left == 0 or id(o) in seen or isinstance(o, (str, bytes, int, float, bool, type, nn.Module)) or o is None:
            return
        seen.add(id(o))
        if extra and id(o) in extra:
            for t in extra[id(o)][1]:
                found.setdefault(id(t), t)
        if isinstance(o, dict):
            values = list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            values = list(o)
        else:
            values = list(getattr(o, "__dict__", {}).values())
        for v in values:
            visit(v, left - 1)

    for t in _tensors(obj):
        found.setdefault(id(t), t)
    visit(obj, depth)
    return list(found.values())
