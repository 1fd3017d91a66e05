"""The leaf calls the peak model replays, with the transient and gradient sizes each one needs."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .lifetimes import _Lifetimes
from .saves import _Save, regions_of
from .storages import _nbytes, _storage_key, _tensors
from .trace import GRAD_IN, OUT, _Call, _Trace


@dataclass(frozen=True)
class _Leaf:
    """A call that runs kernels itself (no accounted child): where gradients flow in backward."""

    position: float    #: call end - 0.25: after the call's own saves
    in_raw: int
    out_raw: int
    out_new: int        #: forward transient: output bytes not saved by anyone yet
    in_live: tuple[int, ...]  #: forward transients: unsaved storages made earlier and alive through the call
    grad_raw: tuple[int, ...]  #: param grads that appear when this call's backward runs
    accum_raw: tuple[int, ...] = ()  #: param grads that already exist (the loss made them) and get added to
    region: int | None = None  #: checkpoint region: backward recomputes the region's saves on reaching it
    cross_raw: tuple[int, ...] = ()  #: backward: grads of earlier tensors used again later (residuals), held
    cast_raw: tuple[int, ...] = ()  #: backward: grads of autocast's low-precision parameter copies, before the cast back
    #: forward transients (of out_new and in_live) that a later call saves: the tracker files a storage under
    #: what it ends up as, so at this instant they are activations in the split (the bytes are the same)
    later_saved: tuple[int, ...] = ()
    #: forward, the loss only (user code: an L1 penalty's |p| per parameter): the storages made inside the call
    #: and alive at its busiest op (each raw), and the call's own saves (alloc) not made yet at that op
    inner_live: tuple[int, ...] = ()
    inner_unsaved: tuple[int, int] = (0, 0)  #: (raw, allocated)
    #: a traced call (nn.MultiheadAttention's functional body): per grad_raw entry, the op whose backward makes
    #: it; backward then frees the call's saves op by op between them instead of after all its grads
    grad_ops: tuple[int, ...] = ()
    grad_split: tuple[tuple[int, ...], ...] = ()  #: per grad_ops entry: slice-grad sums just before that op
    grad_inner: tuple[tuple[int, ...], ...] = ()  #: per grad_ops entry: bytes of the call's inner and output grads alive there
    inner_raw: int = 0  #: backward: the largest grad of a tensor the call made and used itself (log_softmax in CE)
    #: a traced call: per op of it with no parameter grad whose backward makes input grads (attention's sdpa),
    #: (op, the call's grads alive while that op's backward runs: its output grads, the input grads it makes,
    #: inner grads held across it, the residual's or the call output's grad)
    op_peaks: tuple[tuple[int, tuple[int, ...]], ...] = ()
    scratch: tuple[int, ...] = ()  #: backward: buffers its kernels allocate and free (CUDA attention's scratch)
    #: backward, a call chaining ops on what it made itself (cross-entropy under autocast: cast to fp32,
    #: log_softmax, nll_loss): the most bytes one op's backward holds, its output's grad beside the input grads
    #: it makes (log_softmax: two fp32 logits-sized grads, where the one-inner-grad model saw one)
    chain_raw: tuple[int, ...] = ()


def _leaves(trace: _Trace, saves: list[_Save], covered: list[bool], grads_of: dict[int, list[int]],
            accum_of: dict[int, list[int]]) -> list[_Leaf]:
    """The leaf calls in forward order with the sizes the peak model needs."""
    accounted_children = {c.parent for c in trace.calls if not covered[c.index] and c.parent is not None}
    saved_by_position: list[tuple[int, int | None]] = [(s.position, s.key) for s in saves if s.region is None]
    saved_ever = {k for _, k in saved_by_position if k is not None}
    region = regions_of(trace.calls)
    life = _Lifetimes(trace)
    skip = trace.param_keys | trace.batch_keys
    leaves = []
    leaf_calls = [c.index for c in trace.calls
                  if not covered[c.index] and c.index not in accounted_children and _tensors(c.output)]
    for by_call in (grads_of, accum_of):
        for target in list(by_call):
            if target not in leaf_calls:  # a container's parameters: their grads appear at its last leaf
                inside = [i for i in leaf_calls if _has_ancestor(trace.calls, i, target)]
                if inside:
                    by_call.setdefault(inside[-1], []).extend(by_call.pop(target))
    # Leaf calls do not nest, so their ends increase: the keys saved so far grow as a prefix of the saves.
    saved_now: set[int] = set()
    next_save = 0
    for c in (trace.calls[i] for i in leaf_calls):
        while next_save < len(saved_by_position) and saved_by_position[next_save][0] < c.end:
            if saved_by_position[next_save][1] is not None:
                saved_now.add(saved_by_position[next_save][1])
            next_save += 1
        outs = _tensors(c.output)
        out, x = outs[0], (c.inputs[0] if c.inputs else None)
        out_key = _storage_key(out)
        in_key = _storage_key(x) if x is not None else None
        in_needs = x is not None and x.requires_grad and in_key not in trace.param_keys
        if c.module is None and c.op_end > c.op_start and all(
                op in trace.passthrough for op in range(c.op_start, c.op_end)):
            in_needs = False  # a segment of adds and views: its input grads are its output's grad, not new
        out_new = 0 if (out_key in saved_now or out_key == in_key) else _nbytes(out)
        in_keys = {_storage_key(t) for t in c.inputs}
        live_keys = [k for k in life.alive_through(c) if k not in saved_now and k != out_key and k not in skip]
        later = tuple(life.storage[k] for k in live_keys if k in saved_ever)
        in_live = tuple(life.storage[k] for k in live_keys if k not in saved_ever)
        if out_new and out_key in saved_ever:
            later, out_new = later + (out_new,), 0
        # an add hands its output's grad to both inputs as one buffer: an earlier branch's grad that comes from
        # the same add as this call's output grad is that very buffer, not one more
        shared = life.last_grad.get(out_key)
        shared = shared if shared in trace.passthrough else None
        cross = tuple(life.grad[k] for k in life.grad_through(c) if k not in in_keys and k != out_key
                      and k not in skip and (shared is None or life.last_grad.get(k) != shared))
        own_casts = [cast for cast in life.casts if c.op_start <= cast[0] < c.op_end]
        in_live += tuple(b for _, _, k, b in own_casts if k not in saved_now)
        grads, grad_ops = tuple(grads_of.pop(c.index, ())), ()
        traced: dict[str, Any] = {}
        if c.items is None and c.module is not None and grads and c.index not in accum_of:
            traced = _traced_call_grads(c, grads, trace, life, skip, outs)
            grads = traced.pop("grads")
        op_peaks = traced.get("op_peaks", ())
        out_grad = _nbytes(out) if out.requires_grad and not _grad_is_a_view(out, trace, life) else 0
        leaves.append(_Leaf(c.end - 0.25, _nbytes(x) if in_needs else 0, out_grad,
                            out_new, in_live, grads, **traced, scratch=_scratch_elsewhere(c, trace, op_peaks),
                            accum_raw=tuple(accum_of.pop(c.index, ())), region=region[c.index], cross_raw=cross,
                            cast_raw=tuple(b for op, _, _, b in own_casts),
                            inner_raw=life.inner_grad(c, skip | {_storage_key(t) for t in outs}),
                            chain_raw=_chain_peak(c, trace, skip),
                            later_saved=later,
                            **(_loss_transients(c, trace, life, saves,
                                                skip | {_storage_key(t) for t in outs} | saved_ever)
                               if c.module is None else {})))
    return leaves


def _traced_call_grads(c: _Call, grads: tuple[int, ...], trace: _Trace, life: _Lifetimes, skip: set[int],
                       outs: list[torch.Tensor]) -> dict[str, Any]:
    """A traced call's backward op by op (nn.MultiheadAttention's functional body): its parameter grads placed at
    their ops, the inner grads alive at each, slice-grad sums and op peaks (as _Leaf fields, with "grads")."""
    out = outs[0]
    out_key = _storage_key(out)
    grads, grad_ops = _grads_by_op(c, grads, life)
    inner = [k for k in life.made_in(c) if k not in skip and k not in {_storage_key(t) for t in outs}]
    # the output's grad goes once backward is past the op that made the output (out_proj)
    out_op = life.first.get(out_key, c.op_end)
    # an input used differentiably after the call (the residual of post-norm ``x + sa(x)``) has its grad
    # from that later use held through the whole backward of the call: the add passes the output's grad
    # on to it unchanged, so below out_op the output's grad is still alive as that input's grad, until the
    # call's input grad is summed into it (measured on the CPU: B=3, L=1, E=8, the residual's 96 B beside
    # in_proj's weight grad)
    residual = tuple(life.grad[k] for k in dict.fromkeys(_storage_key(t) for t in c.inputs if t.requires_grad)
                     if k not in skip and k != out_key and life.last_grad.get(k, -1) >= c.op_end)
    # a copy of the call's input (batch_first's transpose made contiguous) passes its grad on unchanged:
    # that grad is the call's input grad, which in_raw counts
    copies = _input_copies(c, trace, skip)
    out_grad = 0 if _grad_is_a_view(out, trace, life) else _nbytes(out)
    grad_inner = tuple(tuple(life.grad[k] for k in inner
                             if k not in copies and life.first[k] <= op <= life.last_grad.get(k, -1))
                       + ((out_grad,) if out.requires_grad and op >= out_op else residual)
                       for op in grad_ops)
    # a storage read as n differentiable slices (attention's packed q, k, v = proj[0], proj[1], proj[2]):
    # each slice's backward makes a zero-filled full-size grad and they are summed, so the first two
    # slices' full-size grads and their sum (3 x the storage) are alive together, beside the other
    # n - 2 slices' grads (and the residual's grad, below), before the grad op below it (in_proj) runs
    # and before the call's input grad exists (measured on the CPU: 3 x 13824 + 4608 B, and the
    # residual's 4608 B, for B=8, L=6, E=24; emulated, B=14, L=1, E=28 with dropout)
    split = {}
    for k in inner:
        n = len(life.slices.get(k, ()))
        if n >= 2:
            below = [op for op in grad_ops if op <= life.first[k]]
            if below:
                size = life.storage[k]
                split[max(below)] = split.get(max(below), ()) + (size,) * 3 + (size // n,) * (n - 2)
    grad_split = tuple(split[op] + residual if op in split else () for op in grad_ops)
    op_peaks = _op_peaks(c, trace, life, inner, set(grad_ops), skip, out, out_op, residual)
    return {"grads": grads, "grad_ops": grad_ops, "grad_inner": grad_inner, "grad_split": grad_split,
            "op_peaks": op_peaks}


def _input_copies(c: _Call, trace: _Trace, skip: set[int]) -> set[int]:
    """Storages call ``c`` makes as whole copies of its input (or of such a copy): an op whose differentiable
    inputs are all the input's storage and whose one output has a new storage of the same size."""
    ins = {_storage_key(t): t.untyped_storage().nbytes() for t in c.inputs if t.requires_grad}
    ins = {k: n for k, n in ins.items() if k not in skip}
    copies: set[int] = set()
    for op, group in itertools.groupby(trace.uses_between(c.op_start, c.op_end), key=lambda u: u[0]):
        group = list(group)
        read = {_storage_key(t) for _, t, kind in group if kind == GRAD_IN}
        made = {_storage_key(t): t.untyped_storage().nbytes() for _, t, kind in group if kind == OUT}
        if len(read) == 1 and len(made) == 1:
            (src,), ((dst, n),) = read, made.items()
            if src in ins and dst not in ins and n == ins[src]:
                ins[dst] = n
                copies.add(dst)
    return copies


def _op_peaks(c: _Call, trace: _Trace, life: "_Lifetimes", inner: list[int], grad_ops: set[int], skip: set[int],
              out: torch.Tensor, out_op: int, residual: tuple[int, ...]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Per op of traced call ``c`` that makes grads of the call's own tensors and no parameter grad (attention's
    sdpa): the grads alive while its backward runs. Its output's grad is still alive as it makes one grad per
    differentiable input view (q, k, v of one packed projection: three), beside inner grads held across it and
    the residual's grad (below the op making the call's output) or the output's (measured on the emulated
    backend: B=1, L=1, E=8, the sdpa backward is the step's peak, two 512-B blocks over out_proj's grads)."""
    inner_set = set(inner)
    by_op: dict[int, list[tuple[torch.Tensor, int]]] = {}
    for op, t, kind in trace.uses_between(c.op_start, c.op_end):
        by_op.setdefault(op, []).append((t, kind))
    out_key = _storage_key(out)
    peaks = []
    for op, used in sorted(by_op.items()):
        if op in grad_ops or any(_storage_key(t) in trace.param_keys for t, kind in used if kind == GRAD_IN):
            continue
        made = [_nbytes(t) for t, kind in used if kind == GRAD_IN and _storage_key(t) in inner_set
                and life.first[_storage_key(t)] < op and life.last_grad.get(_storage_key(t)) == op]
        if not made:
            continue
        outs = {_storage_key(t) for t, kind in used if kind == OUT and t.requires_grad} - skip
        out_grads = [life.grad[k] for k in outs if k in life.grad and k != out_key]
        held = [life.grad[k] for k in inner if k not in outs and life.first[k] < op < life.last_grad.get(k, -1)]
        tail = (0 if _grad_is_a_view(out, trace, life) else _nbytes(out),) if out.requires_grad and op >= out_op \
            else residual
        # a CUDA attention kernel's backward allocates its scratch beside the grads it makes
        peaks.append((op, tuple(out_grads + made + held) + tail + trace.scratch.get(op, ())))
    return tuple(peaks)


def _grad_is_a_view(out: torch.Tensor, trace: _Trace, life: _Lifetimes) -> bool:
    """Whether ``out``'s grad in backward is a view made by its only differentiable use: a sum over it (the default
    loss without a target, ``output.sum()``) hands back its own grad expanded, allocating nothing."""
    k = _storage_key(out)
    op = life.last_grad.get(k)
    if op is None or life.grad_ops.get(k) != 1 or op not in trace.passthrough:
        return False
    made = [t for _, t, kind in trace.uses_between(op, op + 1) if kind == OUT]
    return bool(made) and all(t.numel() < out.numel() for t in made)


def _chain_peak(c: _Call, trace: _Trace, skip: set[int]) -> tuple[int, ...]:
    """Per op of call ``c``, bytes of its differentiable outputs' grads and of the input grads its backward makes
    (parameters, whose grads are counted as grads, and the batch left out): those of the op holding the most.
    For calls without a module (the loss, a parent's own ops) and modules without trainable parameters (CLIP's
    QuickGELU, x * sigmoid(1.702 x): the mul's backward makes both inputs' grads beside its output's); a module
    with parameters is modelled per op apart (``_traced_call_grads``)."""
    if c.module is not None and any(p.requires_grad for p in c.module.parameters()):
        return ()
    best: tuple[int, ...] = ()
    for op, group in itertools.groupby(trace.uses_between(c.op_start, c.op_end), key=lambda u: u[0]):
        if op in trace.passthrough:
            continue  # an add or a view hands its output's grad on as its inputs' grads: nothing new
        sizes: dict[int, int] = {}
        for _, t, kind in group:
            k = _storage_key(t)
            if k in skip or not t.requires_grad or (kind != GRAD_IN and kind != OUT):
                continue
            sizes[k] = max(sizes.get(k, 0), _nbytes(t))
        if sum(sizes.values()) > sum(best):
            best = tuple(sizes.values())
    return best


def _scratch_elsewhere(c: _Call, trace: _Trace, op_peaks: tuple[tuple[int, tuple[int, ...]], ...]) -> tuple[int, ...]:
    """Backward scratch of the ops of call ``c`` that no op peak of it holds (the call's backward holds it)."""
    placed = {op for op, _ in op_peaks}
    return tuple(b for op, sizes in sorted(trace.scratch.items())
                 if c.op_start <= op < c.op_end and op not in placed for b in sizes)


def _grads_by_op(c: _Call, grads: tuple[int, ...], life: "_Lifetimes") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A traced call's parameter grads in its own parameter order, each with the op of its last differentiable
    use inside the call (backward makes the grad there); no ops when they cannot all be placed."""
    params = [p for p in c.module.parameters() if p.requires_grad]
    if sorted(map(_nbytes, params)) != sorted(grads):
        return grads, ()
    ops = tuple(life.last_grad.get(_storage_key(p), -1) for p in params)
    if not all(c.op_start <= op < c.op_end for op in ops):
        return grads, ()
    return tuple(map(_nbytes, params)), ops


def _loss_transients(c: _Call, trace: _Trace, life: "_Lifetimes", saves: list[_Save],
                     skip: set[int]) -> dict[str, Any]:
    """The loss call's busiest op among what it computes from the parameters directly (an L1 penalty's |p|):
    those storages alive there that nobody saves (``skip`` holds the saved ones, its output, parameters and
    batch), and the call's own saves not yet made at that op (as _Leaf fields)."""
    from_params = set(trace.param_keys)
    for op, group in itertools.groupby(trace.uses_between(c.op_start, c.op_end), key=lambda u: u[0]):
        group = list(group)
        if any(kind != OUT and _storage_key(t) in from_params for _, t, kind in group):
            from_params.update(_storage_key(t) for _, t, kind in group if kind == OUT)
    made = [k for k in life.made_in(c) if k not in skip]
    if not any(k in from_params for k in made):
        return {}
    own = [(life.first.get(s.key, c.op_end), s.raw, s.alloc) for s in saves
           if s.call == c.index and s.region is None and s.key is not None]
    best: tuple[int, tuple[int, ...], tuple[int, int]] | None = None
    for op in range(c.op_start, c.op_end):
        alive_keys = [k for k in made if life.first[k] <= op <= life.last[k]]
        if not any(k in from_params for k in alive_keys):
            continue
        alive = tuple(life.storage[k] for k in alive_keys)
        unsaved = (sum(r for first, r, _ in own if first > op), sum(a for first, _, a in own if first > op))
        if alive and (best is None or sum(alive) - unsaved[0] >= best[0]):
            best = (sum(alive) - unsaved[0], alive, unsaved)
    return {} if best is None else {"inner_live": best[1], "inner_unsaved": best[2]}


def _has_ancestor(calls: list[_Call], index: int, ancestor: int) -> bool:
    p = calls[index].parent
    while p is not None:
        if p == ancestor:
            return True
        p = calls[p].parent
    return False


def _param_grads_by_call(trace: _Trace, covered: list[bool],
                         model: nn.Module) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Bytes of each trainable parameter's grad, attached to the call backward reaches first among those using it
    (the one that used it last in forward: the grad appears there); and the grads accumulated into.

    A parameter used by several calls (a weight tied between the embedding and the LM head; the loss using it
    directly, an L1 penalty) gets its grad at the last user in forward; each earlier user's backward then adds
    its contribution to it out of place: those calls' entries in the second dict."""
    users = {**_innermost_users(trace, covered), **_users_by_ops(trace, covered)}
    loss_call = next((c.index for c in reversed(trace.calls) if c.module is None and c.parent is None), None)
    out: dict[int, list[int]] = {}
    accum: dict[int, list[int]] = {}
    for p in trace.twin.parameters():
        if not p.requires_grad:
            continue
        targets = users.get(id(p), [])
        if id(p) in trace.loss_params and loss_call is not None and loss_call not in targets:
            targets = targets + [loss_call]
        if not targets:
            continue
        out.setdefault(targets[-1], []).append(trace.grad_nbytes(p))
        for t in targets[:-1]:
            accum.setdefault(t, []).append(trace.grad_nbytes(p))
    return out, accum


def _users_by_ops(trace: _Trace, covered: list[bool]) -> dict[int, list[int]]:
    """Per trainable parameter (by id), the accounted calls whose ops read it differentiably, in forward order
    (by the trace's op record: a parent's own code multiplying by a tied embedding's weight is a user too)."""
    owner = [-1] * (max((c.op_end for c in trace.calls), default=0) + 1)
    for c in sorted(trace.calls, key=lambda c: c.depth):  # deeper calls overwrite: an op is its innermost call's
        if not covered[c.index]:
            owner[c.op_start:c.op_end] = [c.index] * (c.op_end - c.op_start)
    params = {_storage_key(p): id(p) for p in trace.twin.parameters() if p.requires_grad}
    out: dict[int, list[int]] = {}
    for op, t, kind in trace.uses:
        if kind != GRAD_IN:
            continue
        pid = params.get(_storage_key(t))
        if pid is not None and 0 <= op < len(owner) and owner[op] >= 0:
            users = out.setdefault(pid, [])
            if not users or users[-1] != owner[op]:
                if owner[op] in users:
                    users.remove(owner[op])
                users.append(owner[op])
    return out


def _innermost_users(trace: _Trace, covered: list[bool]) -> dict[int, list[int]]:
    """Per trainable parameter (by id), the accounted calls that use it, in forward order, by the modules that
    hold it (for parameters the op record does not show used).

    A call uses a parameter when its module holds it and no call inside it holds it too (a block holds its
    layers' weights, but the layer's call is the user); a call answered by a formula stands for the calls
    inside it. Calls of different modules holding one tensor (tied weights) are all users."""
    calls = trace.calls
    holders: dict[int, list[int]] = {}
    for c in calls:
        if c.module is not None:
            for p in c.module.parameters():
                if p.requires_grad:
                    holders.setdefault(id(p), []).append(c.index)
    out: dict[int, list[int]] = {}
    for pid, hs in holders.items():
        held, outer = set(hs), set()
        for h in hs:
            a = calls[h].parent
            while a is not None:
                if a in held:
                    outer.add(a)
                a = calls[a].parent
        targets: list[int] = []
        for h in hs:  # calls are numbered in forward order; innermost holders do not nest
            if h in outer:
                continue
            while covered[h]:
                h = calls[h].parent  # type: ignore[assignment]
            if h in targets:
                targets.remove(h)
            targets.append(h)
        out[pid] = targets
    return out
