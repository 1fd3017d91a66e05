"""LBFGS: a closure optimizer whose state grows step by step and whose step() runs forward and backward again.

Read from torch/optim/lbfgs.py (torch 2.4 - 2.14). One global state on the first parameter: ``d`` and
``prev_flat_grad`` (flat vectors of every parameter of the group, in the grads' dtype), ``history_size`` pairs
``old_dirs``/``old_stps`` (y = g - g_prev, s = d * t, one pair per iteration after the first), ``ro`` (1/ys),
``al`` and ``H_diag`` as 0-dim tensors, and ``t`` (a 0-dim tensor after the very first iteration, a float after
later ones). An iteration ends early on values only (``ys > 1e-10`` assumed true, no tolerance reached); the
structural limits ``max_iter`` and ``max_eval`` are followed. step() holds ``flat_grad`` (a cat of the grads)
and, after the first iteration, ``q``; each re-evaluation is a closure: zero_grad, forward, backward, and a new
``flat_grad`` made beside the old one. With ``line_search_fn="strong_wolfe"`` the line search is taken to
accept its first trial point (one evaluation per iteration; more trials are value-dependent).

Registered into :data:`optimizer_rules.OPTIMIZER_RULES` on import.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .._core.categories import Category
from .optimizer_rules import Group, StateTensor, optimizer_rule

O, T = Category.OPTIMIZER, Category.TEMPORARIES


@dataclass
class _History:
    """LBFGS's state between steps, as ids of simulated tensors (their bytes in ``size``)."""

    iterations: int = 0                      #: state["n_iter"]
    d: int | None = None
    prev: int | None = None
    pairs: list[tuple[int, int, int]] = field(default_factory=list)  #: (y, s, ro) per history entry
    al: dict[int, int] = field(default_factory=dict)  #: index -> the 0-dim tensor in state["al"][index]
    h_diag: int | None = None
    t: int | None = None
    size: dict[int, int] = field(default_factory=dict)

    def held(self) -> set[int]:
        ids = {self.d, self.prev, self.h_diag, self.t, *self.al.values()}
        ids.update(x for pair in self.pairs for x in pair)
        return ids - {None}


class _Step:
    """One step() simulated: tensors made and freed in order; at the end a tensor made in this step is state
    (optimizer) if the state holds it, else a temporary (the tracker files a storage by what it ends up as)."""

    def __init__(self, h: _History) -> None:
        self.h = h
        self.log: list[tuple] = []  #: ("new", id) | ("free", id) | ("peek", bytes) | ("closure",)
        self.made: set[int] = set()
        self.ys: int | None = None   #: the local ys of the latest iteration
        self.stored: list[int] = []  #: state tensors rebound in this step, freed when step() stores the state

    def new(self, nbytes: int) -> int:
        i = len(self.h.size)
        self.h.size[i] = nbytes
        self.made.add(i)
        self.log.append(("new", i))
        return i

    def free(self, *ids: int | None) -> None:
        self.log.extend(("free", i) for i in ids if i is not None)

    def events(self) -> list[tuple]:
        kept = self.h.held()
        cat = {i: (O if i in kept or i not in self.made else T) for i in self.h.size}
        out: list[tuple] = []
        for entry in self.log:
            if entry[0] == "new":
                out.append(("add", cat[entry[1]], self.h.size[entry[1]]))
            elif entry[0] == "free" and entry[1] is not None:
                out.append(("add", cat[entry[1]], -self.h.size[entry[1]]))
            elif entry[0] == "peek":
                out.append(("peek", [(T, entry[1])]))
            else:
                out.append(entry)
        return out


def _sizes(group: Group) -> tuple[int, int, torch.dtype]:
    """(flat vector bytes, 0-dim tensor bytes, dtype): torch.cat of every parameter's grad (a zero vector for
    a parameter without one) promotes to one dtype."""
    params = list(group["params"])
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
    return sum(p.numel() for p in params) * dtype.itemsize, dtype.itemsize, dtype


def _update_history(st: _Step, n: int, z: int, history: int) -> None:
    """The L-BFGS memory update of one iteration after the first (ys > 1e-10 assumed)."""
    h = st.h
    y, s = st.new(n), st.new(n)              # y = flat_grad - prev_flat_grad; s = d * t
    ys = st.new(z)                           # ys = y.dot(s), a local until the next iteration rebinds it
    st.free(st.ys)
    st.ys = ys
    if len(h.pairs) == history:
        st.free(*h.pairs.pop(0))             # old_dirs/old_stps/ro.pop(0): the state's own lists
    h.pairs.append((y, s, st.new(z)))        # ro.append(1 / ys)
    yy = st.new(z)
    h_diag = st.new(z)                       # H_diag = ys / y.dot(y)
    st.free(yy)
    if h.h_diag is not None and h.h_diag in st.made:
        st.free(h.h_diag)                    # this step's earlier H_diag (the state's goes when the step stores)
    elif h.h_diag is not None:
        st.stored.append(h.h_diag)
    h.h_diag = h_diag


def _two_loop(st: _Step, z: int) -> None:
    """al[i] = s_i . q * ro_i for each history entry: state["al"] is the state's own list, so an entry's old
    tensor goes as soon as the new one is stored."""
    h = st.h
    for i in reversed(range(len(h.pairs))):
        new = st.new(z)
        st.free(h.al.get(i))
        h.al[i] = new


def _one_step(group: Group, h: _History) -> list[tuple]:
    """The events of one step() after its first closure call (the step's own forward and backward), updating
    ``h`` to the state it leaves."""
    n, z, _ = _sizes(group)
    max_iter, history = group["max_iter"], group["history_size"]
    max_eval = group["max_eval"] if group["max_eval"] is not None else max_iter * 5 // 4
    wolfe = group.get("line_search_fn") == "strong_wolfe"
    st = _Step(h)
    flat = st.new(n)                         # flat_grad = cat(grads)
    st.log.append(("peek", n))               # flat_grad.abs().max()
    state_d, state_t, d, q, t = h.d, h.t, h.d, None, h.t
    evals, iteration = 1, 0
    while iteration < max_iter:
        iteration += 1
        h.iterations += 1
        if h.iterations == 1:
            d = st.new(n)                    # d = flat_grad.neg()
        else:
            _update_history(st, n, z, history)
            new_q = st.new(n)                # q = flat_grad.neg()
            st.free(q)
            q = new_q
            _two_loop(st, z)
            new_d = st.new(n)                # d = r = q * H_diag
            if d is not None and d != state_d:
                st.free(d)
            d = new_d
        if h.prev is None:
            h.prev = st.new(n)               # prev_flat_grad = flat_grad.clone()
        if h.iterations == 1:
            st.log.append(("peek", n))       # t = min(1, 1 / flat_grad.abs().sum()) * lr: a 0-dim tensor
            t = st.new(z)
        elif t is not None:
            if t != state_t:
                st.free(t)                   # t = lr, a float
            t = None
        if wolfe:
            x_init, g = st.new(n), st.new(n)  # the parameters cloned; _strong_wolfe's g.clone()
        if wolfe or iteration != max_iter:
            st.log.append(("closure",))
            new_flat = st.new(n)
            st.free(flat)
            flat = new_flat
            st.log.append(("peek", n))
            evals += 1
        if wolfe:
            st.free(x_init, g)
        if iteration == max_iter or evals >= max_eval:
            break
        st.log.append(("peek", 2 * n))      # lack of progress: d.mul(t).abs().max()
    h.d, h.t = d, t
    if state_d is not None and state_d != d:
        st.free(state_d)                     # state["d"] = d frees the previous step's d
    if state_t is not None and state_t != t:
        st.free(state_t)
    st.free(*st.stored)                      # state["H_diag"] = H_diag
    st.free(flat, q, st.ys)
    return st.events()


def lbfgs_program(group: Group, step: int) -> list[tuple]:
    """The optimizer phase of step ``step`` (0 = the first) as events for the peak model's replay."""
    h = _History()
    events: list[tuple] = []
    for _ in range(step + 1):
        events = _one_step(group, h)
    return events


def _lbfgs_temporaries(group: Group, sizes: Sequence[int], foreach: bool) -> int:
    return 0  # the program holds step()'s temporaries


@optimizer_rule(torch.optim.LBFGS, temporaries=_lbfgs_temporaries, program=lbfgs_program)
def _lbfgs(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """The state after the first step, all on the group's first trainable parameter (LBFGS keeps one state)."""
    first = next(q for q in group["params"] if q.requires_grad)
    if p is not first:
        return ()
    h = _History()
    _one_step(group, h)
    n_bytes, z, dtype = _sizes(group)
    sizes = [h.size[i] for i in h.held()]
    vectors, scalars = sizes.count(n_bytes), len(sizes) - sizes.count(n_bytes)
    numel = n_bytes // dtype.itemsize
    return tuple(StateTensor(f"vector{i}", numel, dtype) for i in range(vectors)) + tuple(
        StateTensor(f"scalar{i}", 1, dtype) for i in range(scalars))
