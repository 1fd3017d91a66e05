"""Functional code as calls: the ops a module runs itself, between its children, become calls of their own.

A module's hooks see module calls only; ``F.relu`` between two layers, a residual add, or a loss computed
inside ``forward()`` (every Hugging Face model given ``labels=``) run in the parent's own code. Without a
call of their own they would have no transients in forward and no gradients in backward. Each maximal run of
a parent's own ops between its children that makes a new storage becomes a *segment*: a call without a
module (like the loss), whose inputs are what the run reads from before it and whose outputs are what it
makes and something uses later.
"""
from __future__ import annotations

import bisect
from typing import Any

import torch

from .storages import _storage_key

IN_KINDS = (1, 2)  #: trace.IN, trace.GRAD_IN (not imported: trace imports this module)
GRAD_IN, OUT = 2, 0


def split_own_ops(calls: list[Any], order: list[tuple[int, torch.Tensor]], save_ops: list[int],
                  uses: list[tuple[int, torch.Tensor, int]], make_call: Any) -> tuple[list[Any], list[tuple[int, torch.Tensor]]]:
    """(calls with segments inserted in pre-order and renumbered, ``order`` with call indices remapped).

    ``make_call(**fields)`` builds a call record. Calls without ops in ``uses`` (replayed blocks) are left as
    they are; so are calls without children (leaves already run their own ops)."""
    kids: dict[int | None, list[Any]] = {}
    for c in calls:
        kids.setdefault(c.parent, []).append(c)
    by_op: dict[int, list[tuple[torch.Tensor, int]]] = {}
    for op, t, kind in uses:
        by_op.setdefault(op, []).append((t, kind))
    ops_sorted = sorted(by_op)
    first_seen: dict[int, int] = {}
    last_used: dict[int, int] = {}
    read_first: set[int] = set()  #: storages an op read before any op wrote them (the batch, a view's base)
    for op, t, kind in uses:
        k = _storage_key(t)
        if k not in first_seen and kind != OUT:
            read_first.add(k)
        first_seen.setdefault(k, op)
        last_used[k] = op
    new_owner: dict[int, Any] = {}  #: position in order -> segment that saved it
    segments: dict[int, list[Any]] = {}
    for c in calls:
        children = [k for k in kids.get(c.index, ()) if k.module is not None]
        if not children or c.op_end <= c.op_start:
            continue
        bounds = [c.op_start] + [x for k in children for x in (k.op_start, k.op_end)] + [c.op_end]
        for lo, hi in zip(bounds[0::2], bounds[1::2]):
            seg = _segment(c, lo, hi, by_op, ops_sorted, first_seen, last_used, read_first, order, save_ops,
                           make_call)
            if seg is None:
                continue
            segments.setdefault(c.index, []).append(seg)
            for pos in range(bisect.bisect_left(save_ops, lo), bisect.bisect_left(save_ops, hi)):
                if order[pos][0] == c.index:
                    new_owner[pos] = seg
    if not segments:
        return calls, order
    for parent, segs in segments.items():
        kids.setdefault(parent, []).extend(segs)
    out: list[Any] = []
    index_of: dict[int, int] = {}

    def visit(c: Any, parent: int | None) -> None:
        index_of[id(c)] = len(out)
        c.index, c.parent = len(out), parent
        out.append(c)
        own = kids.get(c._old_index, []) if hasattr(c, "_old_index") else []
        for k in sorted(own, key=lambda k: (k.op_start, k.module is None)):
            visit(k, c.index)

    for c in calls:
        c._old_index = c.index
    for segs in segments.values():
        for s in segs:
            s._old_index = -1 - id(s)  # no children
    for root in kids.get(None, []):
        visit(root, None)
    old_to_new = {c._old_index: c.index for c in out}
    for c in out:
        c.children = sum(1 for _ in kids.get(c._old_index, ()))
        c.saved = []
        del c._old_index
    new_order = []
    for pos, (old, t) in enumerate(order):
        owner = new_owner.get(pos)
        idx = owner.index if owner is not None else old_to_new[old]
        out[idx].saved.append(t)
        new_order.append((idx, t))
    return out, new_order


def _segment(parent: Any, lo: int, hi: int, by_op: dict, ops_sorted: list[int], first_seen: dict[int, int],
             last_used: dict[int, int], read_first: set[int], order: list, save_ops: list[int],
             make_call: Any) -> Any:
    """The call record of ``parent``'s own ops in [lo, hi), or None when they make no new storage."""
    ops = ops_sorted[bisect.bisect_left(ops_sorted, lo):bisect.bisect_left(ops_sorted, hi)]
    inputs: dict[int, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}
    for op in ops:
        for t, kind in by_op[op]:
            k = _storage_key(t)
            if kind == OUT:
                if first_seen[k] == op and k not in made and k not in read_first:  # a view of an input is not new
                    made[k] = t
                elif k in made:
                    made[k] = t  # the latest view of it
            elif first_seen[k] < lo and k not in inputs:
                inputs[k] = t
    if not made:
        return None
    outputs = [t for k, t in made.items() if last_used[k] >= hi] or [list(made.values())[-1]]
    # the differentiable output first (the leaf model reads outputs[0] and inputs[0])
    outputs.sort(key=lambda t: not (t.requires_grad and t.is_floating_point()))
    ins = sorted(inputs.values(), key=lambda t: not (t.requires_grad and t.is_floating_point()))
    seg = make_call(index=-1, name=f"{parent.name}.<ops>", module=None, parent=parent.index, depth=parent.depth + 1)
    seg.inputs = tuple(ins)
    seg.output = tuple(outputs) if len(outputs) > 1 else outputs[0]
    seg.op_start, seg.op_end = lo, hi
    seg.end = bisect.bisect_left(save_ops, hi)
    seg.region = None
    return seg
