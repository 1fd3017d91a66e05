"""The per-layer rows of an estimate: output shape, own parameters, activation bytes, method."""
from __future__ import annotations

import torch

from .results import LayerEstimate
from .saves import _Save
from .storages import _storage_key, _tensors
from .trace import _Trace


def _layer_table(trace: _Trace, saves: list[_Save], covered: list[bool]) -> tuple[LayerEstimate, ...]:
    """One LayerEstimate per accounted call, in call order; repeated modules appear once per call."""
    by_call: dict[int, int] = {}
    for s in (s for s in saves if s.region is None):  # a checkpoint region keeps nothing
        by_call[s.call] = by_call.get(s.call, 0) + s.alloc
    seen_modules: set[int] = set()
    rows = []
    for c in trace.calls:
        if covered[c.index]:
            continue
        params = 0
        if c.module is not None and id(c.module) not in seen_modules:
            seen_modules.add(id(c.module))
            params = sum(p.numel() for p in c.module.parameters(recurse=c.items is not None))
        outs = _tensors(c.output)
        shape = tuple(outs[0].shape) if outs else None
        type_name = type(c.module).__name__ if c.module is not None else ("ops" if c.parent is not None else "loss")
        rows.append(LayerEstimate(c.name, type_name, shape, params, by_call.get(c.index, 0), c.method, c.depth,
                                  _formula_bytes(c.formula_items, trace)))
    return tuple(rows)


def _formula_bytes(items: tuple | None, trace: _Trace) -> int | None:
    """Bytes a formula's items stand for: its own tensors' storages (not parameters or the batch) and ints."""
    if items is None:
        return None
    skip = trace.param_keys | trace.batch_keys
    seen: set[int] = set()
    total = 0
    for item in items:
        if isinstance(item, torch.Tensor):
            key = _storage_key(item)
            if key not in skip and key not in seen:
                seen.add(key)
                total += item.untyped_storage().nbytes()
        elif isinstance(item, int):
            total += item
    return total
