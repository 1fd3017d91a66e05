"""The tensors inside a nested batch, output or state: one pytree walk for the whole package."""
from __future__ import annotations

from typing import Any

import torch

from .._compat import tree_flatten


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor among the leaves of ``obj`` (tuples, lists, dicts, namedtuples...), in pytree order."""
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]
