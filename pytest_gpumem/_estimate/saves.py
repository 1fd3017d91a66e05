"""From the trace to saved storages: each activation storage counted once, checkpoint regions apart."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .storages import _storage_key
from .trace import _Call, _Trace


@dataclass(frozen=True)
class _Save:
    """One activation allocation: who saved it first, when, raw and allocated bytes."""

    call: int
    position: float  #: index in the save order; formula items sit at (call end - 0.5)
    raw: int
    alloc: int
    key: int | None  #: storage key, None for formula-made tensors
    region: int | None = None  #: checkpoint region: not kept in forward, recomputed when backward reaches it
    op: int | None = None  #: the op that saved it (traced saves): backward frees it once past that op


def _covered(calls: list[_Call]) -> list[bool]:
    """Calls inside a call answered by a formula or hook: their bytes are the ancestor's."""
    out = [False] * len(calls)
    for c in calls:
        p = c.parent
        while p is not None:
            if calls[p].items is not None or out[p]:
                out[c.index] = True
                break
            p = calls[p].parent
    return out


def regions_of(calls: list[_Call]) -> list[int | None]:
    """Per call, the checkpoint region it runs in (its own or its nearest ancestor's), else None."""
    out: list[int | None] = []
    for c in calls:  # parents come before their children
        out.append(c.region if c.region is not None else (out[c.parent] if c.parent is not None else None))
    return out


def _saves(trace: _Trace, round_fn: Callable[[int], int]) -> tuple[list[_Save], list[bool]]:
    """Unique activation storages in save order: params and batch excluded, a storage counted once.

    A storage saved inside a checkpoint region is kept only if something outside a region saves it too
    (e.g. the next checkpoint's input); otherwise it is a region save, recomputed in backward.
    """
    covered = _covered(trace.calls)
    region = regions_of(trace.calls)
    kept = {_storage_key(t) for i, t in trace.order if region[i] is None}
    seen: set[int] = set()
    out: list[_Save] = []

    def add(call: _Call, t_or_n: Any, position: int) -> None:
        r = region[call.index]
        if isinstance(t_or_n, torch.Tensor):
            key = _storage_key(t_or_n)
            if key in trace.param_keys or key in trace.batch_keys or key in seen or (r is not None and key in kept):
                return
            seen.add(key)
            raw = t_or_n.untyped_storage().nbytes()
            op = trace.save_ops[int(position)] if len(trace.save_ops) == len(trace.order) else None
            out.append(_Save(call.index, position, raw, round_fn(raw), key, r, op))
        elif isinstance(t_or_n, int) and t_or_n > 0:
            out.append(_Save(call.index, position, int(t_or_n), round_fn(int(t_or_n)), None, r))

    # Traced saves happen in order; a formula/hook call's items are placed where the call ended.
    by_end: dict[int, list[_Call]] = {}
    for c in trace.calls:
        if c.items is not None and not covered[c.index]:
            by_end.setdefault(c.end, []).append(c)
    for position in range(len(trace.order) + 1):
        for c in by_end.get(position, ()):
            for item in c.items:
                add(c, item, position - 0.5)
        if position < len(trace.order):
            index, t = trace.order[position]
            c = trace.calls[index]
            if c.items is None and not covered[index]:
                add(c, t, position)
    return out, covered
