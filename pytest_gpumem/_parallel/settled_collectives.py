"""On gloo ranks, let each collective finish freeing its buffers before the step goes on.

Gloo runs a collective on its own worker thread, and the Work it returns holds the collective's tensors, including
a staged copy of a reduce-scatter's input that gloo makes on the calling thread. The Work is destroyed by whichever
lets go of it last: the caller, or the worker thread a moment after it marked the Work done. When the worker is
last, the staged copy is freed after the rank has already made its next allocations, and in 4 of 12 runs that added
a whole reduce-scatter input to a rank's backward peak (the MLP of tests/parallel_layout_cases.py on FSDP(2):
5,644,168 B or 6,135,688 B). NCCL has no staged copy, and the emulated ranks model the run in which the buffers are
gone when the collective returns. So on gloo ranks each collective waits for its Work, drops it, and waits until
its tensors have no other owner and every storage it made is freed; an async caller gets a Work that is done.
DDP's constructor gathers the ranks' parameter shapes the same way, and a late free of that small tensor moves
the setup peak (ZeRO-1 over 4 ranks: a rank's setup peak 901,384 B, or 901,496 B when it came after the gradient
buckets). Not reached: what DDP's C++ reducer broadcasts on its own when it rebuilds its buckets at the second
step (a few int tensors; on 4 ranks, DDP and ZeRO-1 alike, now and then 4 B more in one rank's second forward).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
from typing import Any, Callable, Iterator

import torch

from .._compat import (WAITS_IN_CPP, completed_work, gloo_collective_patch_targets, is_deferred_work,
                       tensor_use_count, tree_flatten)
from .._measure.tracker import StorageTracker

#: how long one collective waits for gloo's worker thread to let go of its Work (it takes microseconds when the
#: thread gets a core: 4.4 ms at most over 264 calls of FSDP2 steps here); a collective whose buffers outlive this
#: once is not waited for again in this measurement, and the report's notes say so
SETTLE_S = 0.5


@contextlib.contextmanager
def settling_collectives(tracker: StorageTracker, notes: list[str]) -> Iterator[None]:
    """Within the block, the collectives return only once their buffers are freed (see the module text); a
    collective given up on adds a line to ``notes``."""
    owner, names = gloo_collective_patch_targets()
    originals = {name: owner.__dict__[name] for name in names}
    settle = _Settling(tracker, notes)
    for name, original in originals.items():
        setattr(owner, name, settle.wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(owner, name, original)


class _Settling:
    """What the wrapped collectives of one rank measurement share: the tracker, and the names given up on."""

    def __init__(self, tracker: StorageTracker, notes: list[str]) -> None:
        self.tracker = tracker
        self.notes = notes
        self.given_up: set[str] = set()

    def wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        """``original`` run to its end (async_op forced on where it takes one), then settled."""
        takes_async = name not in WAITS_IN_CPP and _takes_async_op(original)
        signature = inspect.signature(original) if takes_async else None

        @functools.wraps(original)
        def collective(*args: Any, **kwargs: Any) -> Any:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            use_counts_before = [tensor_use_count(t) for t in tensors]
            first_new = self.tracker.next_key()
            if signature is None:
                result = original(*args, **kwargs)
            else:
                call = signature.bind(*args, **kwargs)
                asked_async = bool(call.arguments.get("async_op", False))
                call.arguments["async_op"] = True
                work = original(*call.args, **call.kwargs)
                if is_deferred_work(work):  # inside a coalescing manager: nothing has run yet
                    return work if asked_async else None
                if work is not None:  # None: this rank is not in the group
                    work.wait()
                result = completed_work() if asked_async and work is not None else None
                del work  # now only gloo's worker thread may still hold it
            self.settle(name, tensors, use_counts_before, first_new)
            return result

        return collective

    def settle(self, name: str, tensors: list[torch.Tensor], use_counts_before: list[int], first_new: int) -> None:
        """Wait until ``tensors`` have only their owners of before the call and every storage the call made (not
        theirs) is freed; give up on ``name`` after SETTLE_S, once."""
        if name in self.given_up:
            return
        own = frozenset(k for k in (self.tracker.key_of(t) for t in tensors) if k is not None)

        def pending() -> bool:
            return (any(tensor_use_count(t) > n for t, n in zip(tensors, use_counts_before))
                    or self.tracker.alive_since(first_new, excluding=own))

        if not _wait_until_not(pending, SETTLE_S):
            self.given_up.add(name)
            self.notes.append(f"gloo rank: a {name} kept a buffer alive past {SETTLE_S:g} s after it finished; its "
                              f"later calls were not waited for, so their buffers may be freed late and move a peak")


def _takes_async_op(function: Callable[..., Any]) -> bool:
    """Whether ``function`` says it takes ``async_op`` (a wrapper of ``*args, **kwargs`` does not say)."""
    try:
        return "async_op" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _wait_until_not(pending: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``pending`` (sleeping, so other threads take the GIL) until it is false: True, or False at the timeout."""
    deadline = time.monotonic() + timeout_s
    while pending():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0001)
    return True
