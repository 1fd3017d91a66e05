"""The tensors inside a nested batch, output or state: one pytree walk for the whole package.

torch's pytree does not descend into dataclasses, so a ``@dataclass`` batch would hide its tensors from the
measurement and the estimate (they would be booked as activations); both helpers walk dataclass fields too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from .._compat import tree_flatten, tree_map


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor among the leaves of ``obj`` (tuples, lists, dicts, namedtuples, dataclasses...), in order."""
    out: list[torch.Tensor] = []
    for leaf in tree_flatten(obj)[0]:
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif _is_dataclass_instance(leaf):
            out.extend(tensors_in([getattr(leaf, f.name) for f in dataclasses.fields(leaf)]))
    return out


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor; a dataclass becomes a copy with its init fields mapped."""

    def one(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return fn(leaf)
        if _is_dataclass_instance(leaf):
            fields = {f.name: map_tensors(fn, getattr(leaf, f.name)) for f in dataclasses.fields(leaf) if f.init}
            return dataclasses.replace(leaf, **fields)
        return leaf

    return tree_map(one, obj)
