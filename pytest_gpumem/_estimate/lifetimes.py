"""When each traced storage is alive, in ops, and when its gradient is."""
from __future__ import annotations

import bisect
import heapq

import torch

from .storages import _nbytes, _storage_key
from .trace import GRAD_IN, OUT, _Call, _Trace


class _Lifetimes:
    """When each storage of the trace is alive, in ops (``_Uses``), and when its gradient is.

    A storage lives from the op that makes it (its first appearance) to its last use, and at least to the end
    of every call it is an argument of (the caller holds it: a block's input stays alive through the block).
    Its gradient appears when backward reaches its last differentiable use and is consumed at the op that made
    it, so during backward it is held across every call in between: e.g. the post-norm transformer's
    ``norm1(x + sa(x))`` keeps the add's output grad while sa's backward runs.
    """

    def __init__(self, trace: _Trace) -> None:
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}       #: last op using the storage, or last op of a call taking it
        self.last_grad: dict[int, int] = {}  #: last op into which a differentiable use of it went
        self.grad_ops: dict[int, int] = {}   #: how many ops used it differentiably
        self.storage: dict[int, int] = {}
        self.grad: dict[int, int] = {}       #: bytes of its gradient (the largest differentiable view used)
        #: (op, parameter storage, its low-precision copy's storage, the copy's bytes)
        self.casts: list[tuple[int, int, int, int]] = []
        self._cast_copies: set[int] = set()
        #: storage -> offsets of the distinct partial views of it used differentiably (q, k, v of one projection)
        self.slices: dict[int, set[int]] = {}
        grad_in: dict[int, list[torch.Tensor]] = {}
        for op, t, kind in trace.uses:
            k = _storage_key(t)
            self.first.setdefault(k, op)
            self.last[k] = max(self.last.get(k, op), op)
            self.storage.setdefault(k, t.untyped_storage().nbytes())
            if kind == GRAD_IN:
                if self.last_grad.get(k) != op:
                    self.grad_ops[k] = self.grad_ops.get(k, 0) + 1
                self.last_grad[k] = op
                if _nbytes(t) < t.untyped_storage().nbytes():
                    self.slices.setdefault(k, set()).add(t.storage_offset())
                self.grad[k] = max(self.grad.get(k, 0), _nbytes(t))
                grad_in.setdefault(op, []).append(t)
            elif kind == OUT:
                # autocast's weight copy: a parameter read by an op whose output has its shape, another dtype
                for x in grad_in.get(op, ()):
                    if _storage_key(x) in trace.param_keys and x.shape == t.shape and x.dtype != t.dtype:
                        self.casts.append((op, _storage_key(x), k, _nbytes(t)))
                        self._cast_copies.add(k)
        # autocast caches its weight copies until the autocast region (forward and loss) ends
        end = max(self.last.values(), default=0)
        for k in self._cast_copies:
            self.last[k] = end
        for c in trace.calls:
            for t in c.inputs:
                k = _storage_key(t)
                if k in self.last:
                    self.last[k] = max(self.last[k], c.op_end - 1)
        self._by_first = sorted(self.first, key=self.first.__getitem__)
        self._firsts = [self.first[k] for k in self._by_first]

    def _sweep(self, c: _Call, ends: dict[int, int], name: str, margin: int) -> list[int]:
        """Storages made before ``c`` with ``ends[k] >= c.op_end - margin``, in the order they were made.

        Called for calls in forward order (leaf calls do not nest, so op_start and op_end grow) it sweeps: a
        storage that ends before one call's end ends before every later call's too and is dropped for good,
        so the whole pass costs O(storages log storages), not O(calls x storages). Out of order it scans."""
        state = self.__dict__.setdefault("_sweeps", {}).get(name)
        if state is None or c.op_start < state[2] or c.op_end < state[3]:
            state = self._sweeps[name] = [[], 0, c.op_start, c.op_end]  # heap of (end, rank, key), next rank
        heap = state[0]
        limit = bisect.bisect_left(self._firsts, c.op_start)
        for rank in range(state[1], limit):
            k = self._by_first[rank]
            heapq.heappush(heap, (ends.get(k, -1), rank, k))
        state[1], state[2], state[3] = max(state[1], limit), c.op_start, c.op_end
        while heap and heap[0][0] < c.op_end - margin:
            heapq.heappop(heap)
        return [k for _, _, k in sorted(heap, key=lambda e: e[1])]

    def made_in(self, c: _Call) -> list[int]:
        """Storages first made by an op of call ``c``."""
        lo, hi = bisect.bisect_left(self._firsts, c.op_start), bisect.bisect_left(self._firsts, c.op_end)
        return self._by_first[lo:hi]

    def alive_through(self, c: _Call) -> list[int]:
        """Storages made before call ``c`` began that stay alive until its last op."""
        return self._sweep(c, self.last, "alive", 1)

    def inner_grad(self, c: _Call, skip: set[int]) -> int:
        """Bytes of the largest grad of a storage call ``c`` made and used differentiably itself: not one in
        ``skip`` (its outputs, parameters, the batch), not an autocast weight copy (``casts`` has those)."""
        lo, hi = bisect.bisect_left(self._firsts, c.op_start), bisect.bisect_left(self._firsts, c.op_end)
        return max((self.grad[k] for k in self._by_first[lo:hi]
                    if k not in skip and k not in self._cast_copies and self.last_grad.get(k, c.op_end) < c.op_end),
                   default=0)

    def grad_through(self, c: _Call) -> list[int]:
        """Storages made before ``c`` and used differentiably after it: their grads exist during c's backward."""
        return self._sweep(c, self.last_grad, "grad", 0)
