"""A structural copy of the user's model (and batch) on the meta device, for tracing."""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from .._compat import MODULE_CHILDREN_DICT, MODULE_TENSOR_DICTS


META = torch.device("meta")


def _to_meta(obj: Any) -> Any:
    from .._core.tensors import map_tensors

    return map_tensors(lambda t: torch.empty_like(t, device=META), obj)  # dataclass batches included


def meta_twin(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are meta tensors.

    Every module is a new object with its own ``__dict__``, its own parameter, buffer, submodule and hook
    registries (so the trace's hooks and block wrappers never touch ``model``); plain attributes are
    shared, as a forward only reads them. Shared modules and tied parameters stay shared. About 40x faster
    than ``copy.deepcopy`` on a 32-block transformer (80 ms -> 2 ms), which matters for the < 1 s bar.
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in memo:
            data = torch.empty_like(t.detach(), device=META)
            memo[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    copies: dict[int, nn.Module] = {}

    def twin(m: nn.Module) -> nn.Module:
        if id(m) in copies:
            return copies[id(m)]
        new = copies[id(m)] = type(m).__new__(type(m))
        d = dict(vars(m))
        for name, value in d.items():
            if name in MODULE_TENSOR_DICTS:
                d[name] = type(value)((k, memo.get(id(v), v) if v is not None else None) for k, v in value.items())
            elif name == MODULE_CHILDREN_DICT:
                d[name] = type(value)((k, twin(v) if v is not None else None) for k, v in value.items())
            elif name in _MODULE_REGISTRIES and isinstance(value, (dict, set, list)):
                d[name] = type(value)(value)
        vars(new).update(d)
        return new

    return twin(model)


#: nn.Module's own containers (hook dicts, buffer sets), copied per twin so registering on it stays local
_MODULE_REGISTRIES = frozenset(vars(nn.Module()))
