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
step (a few int tensors; seen as 4 B more in one DDP(4) rank's second forward in 2 of 6 runs).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
from typing import Any, Callable, Iterator

import torch

from .._compat import WAITS_IN_CPP, completed_work, gloo_collective_patch_targets, tensor_use_count, tree_flatten
from .._measure.tracker import StorageTracker

#: how long one collective waits for gloo's worker thread to let go of its Work (it takes microseconds when the
#: thread gets a core); a collective whose buffers outlive this once is not waited for again in this step
SETTLE_S = 0.5


@contextlib.contextmanager
def settling_collectives(tracker: StorageTracker) -> Iterator[None]:
    """Within the block, the collectives return only once their buffers are freed (see the module text)."""
    owner, names = gloo_collective_patch_targets()
    originals = {name: owner.__dict__[name] for name in names}
    unsettled: set[str] = set()
    for name, original in originals.items():
        setattr(owner, name, _settled(original, name, tracker, unsettled))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(owner, name, original)


def _settled(original: Callable[..., Any], name: str, tracker: StorageTracker,
             unsettled: set[str]) -> Callable[..., Any]:
    signature = None if name in WAITS_IN_CPP else inspect.signature(original)

    @functools.wraps(original)
    def collective(*args: Any, **kwargs: Any) -> Any:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        owners = [tensor_use_count(t) for t in tensors]
        first_new = tracker.next_key()
        asked_async, result = False, None
        if signature is None:
            result = original(*args, **kwargs)
        else:
            call = signature.bind(*args, **kwargs)
            asked_async = bool(call.arguments.get("async_op", False))
            call.arguments["async_op"] = True
            work = original(*call.args, **call.kwargs)
            if work is None:  # this rank is not in the group
                return None
            work.wait()
            del work  # now only gloo's worker thread may still hold it

        def pending() -> bool:
            return (any(tensor_use_count(t) > n for t, n in zip(tensors, owners))
                    or tracker.alive_since(first_new))

        if name not in unsettled and not _wait_until_not(pending, SETTLE_S):
            unsettled.add(name)
        return completed_work() if asked_async else result

    return collective


def _wait_until_not(pending: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``pending`` (sleeping, so other threads take the GIL) until it is false: True, or False at the timeout."""
    deadline = time.monotonic() + timeout_s
    while pending():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0001)
    return True
