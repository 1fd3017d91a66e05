"""Tensor helpers of the estimate: storage identity, the tensors in a pytree, byte sizes."""
from __future__ import annotations

import torch

from .._compat import storage_key
from .._core.tensors import tensors_in as _tensors


def _storage_key(t: torch.Tensor) -> int:
    return storage_key(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
