"""Tensor helpers of the estimate: storage identity, the tensors in a pytree, byte sizes."""
from __future__ import annotations

from typing import Any

import torch
from .._compat import storage_key, tree_flatten


def _storage_key(t: torch.Tensor) -> int:
    return storage_key(t)


def _tensors(obj: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(obj)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
