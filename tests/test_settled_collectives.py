"""Collectives on gloo ranks settle before the step goes on (pytest_gpumem/_parallel/settled_collectives.py).

Gloo's worker thread can be the last to let go of a collective's Work, and with it a staged copy the collective
made on the calling thread. These tests stand a fake collective in for torch's: it stages a copy of its input on
the calling thread and hands it to a thread that lets go of it LATE_S later, as gloo's worker does when it loses
the race. Settled, the copy is freed before the call returns; unsettled (the control), after the rank's next
allocation, which is what moved a rank's backward peak by a whole reduce-scatter input in 4 of 12 runs.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from pytest_gpumem import _compat
from pytest_gpumem._measure.tracker import StorageTracker
from pytest_gpumem._parallel import settled_collectives
from pytest_gpumem._parallel.settled_collectives import settling_collectives

LATE_S = 0.05  #: how long the fake worker thread holds the staged copy after the collective is done


class LateWorker:
    """A stand-in for one of torch.distributed's collectives whose staged copy a thread frees late."""

    def __init__(self, hold_s: float = LATE_S) -> None:
        self.hold_s = hold_s
        self.threads: list[threading.Thread] = []
        self.release = threading.Event()

    def _hand_to_a_thread(self, staged: list[torch.Tensor]) -> None:
        def worker() -> None:
            self.release.wait(self.hold_s)
            staged.clear()  # the last owner lets go on this thread

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        self.threads.append(thread)

    def reduce_scatter(self, output, input, op=None, group=None, async_op=False):  # noqa: A002 - torch's name
        self._hand_to_a_thread([input.clone()])  # staged on the calling thread, as gloo does
        output.copy_(input[: output.numel()])
        return _compat.completed_work() if async_op else None

    def broadcast_coalesced(self, process_group, tensors, bucket_size, src=0):
        self._hand_to_a_thread([torch.cat([t.flatten() for t in tensors])])  # DDP's flattened bucket

    def join(self) -> None:
        self.release.set()
        for thread in self.threads:
            thread.join()


def _scatter_name() -> str:
    owner, names = _compat.gloo_collective_patch_targets()
    return next(n for n in names if "scatter" in n)


def _run(monkeypatch, name: str, fake: LateWorker, *, settle: bool, **kwargs):
    """Inside a cpu tracker: the collective ``name`` (``fake`` standing in), the rank's next allocation, then the
    fake's thread let go. Returns (the allocation log as (size, raw), what the collective returned)."""
    owner, _ = _compat.gloo_collective_patch_targets()
    monkeypatch.setattr(owner, name, fake.broadcast_coalesced if name in _compat.WAITS_IN_CPP else fake.reduce_scatter)
    tracker = StorageTracker("cpu")
    with tracker:
        inp, out = torch.ones(1024), torch.empty(512)  # 4,096 B staged; out is half of it
        with settling_collectives(tracker) if settle else _nothing():
            if name in _compat.WAITS_IN_CPP:
                returned = getattr(owner, name)(None, [inp], 1 << 20, 0)
            else:
                returned = getattr(owner, name)(output=out, input=inp, **kwargs)
        after = torch.ones(64)  # the rank's next allocation: 256 B
        fake.join()  # a late free still lands inside the measurement
        del after
    return [(a.size, a.raw) for a in tracker.allocations()], returned


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _free_comes_before_the_next_allocation(events) -> bool:
    return events.index((-4096, -4096)) < events.index((256, 256))


@pytest.mark.parametrize("which", ["reduce-scatter", "_broadcast_coalesced"])
def test_the_staged_copy_is_freed_before_the_collective_returns(monkeypatch, which):
    name = _scatter_name() if which == "reduce-scatter" else "_broadcast_coalesced"
    events, _ = _run(monkeypatch, name, LateWorker(), settle=True)
    assert _free_comes_before_the_next_allocation(events), events


def test_without_settling_the_late_free_lands_after_the_next_allocation(monkeypatch):
    # the control: the fake really frees late, so the test above can fail
    events, _ = _run(monkeypatch, _scatter_name(), LateWorker(), settle=False)
    assert not _free_comes_before_the_next_allocation(events), events


def test_an_async_caller_gets_a_finished_work_and_the_buffers_are_already_freed(monkeypatch):
    # FSDP2 all-gathers with async_op=True and waits later, checking isinstance(work, Work)
    events, work = _run(monkeypatch, _scatter_name(), LateWorker(), settle=True, async_op=True)
    assert isinstance(work, torch.distributed.distributed_c10d.Work) and work.is_completed()
    assert _free_comes_before_the_next_allocation(events), events


def test_a_buffer_that_outlives_the_wait_is_waited_for_once_then_no_more(monkeypatch):
    monkeypatch.setattr(settled_collectives, "SETTLE_S", 0.05)
    owner, _ = _compat.gloo_collective_patch_targets()
    name = _scatter_name()
    fake = LateWorker(hold_s=60)  # held until join()
    monkeypatch.setattr(owner, name, fake.reduce_scatter)
    tracker = StorageTracker("cpu")
    took = []
    with tracker, settling_collectives(tracker):
        for _ in range(2):
            started = time.monotonic()
            getattr(owner, name)(output=torch.empty(2), input=torch.ones(4))
            took.append(time.monotonic() - started)
    fake.join()
    assert took[0] >= 0.05  # waited the whole SETTLE_S for a copy that stayed
    assert took[1] < 0.05   # and not again for that collective in this step


def test_the_collectives_are_restored_after_the_block(monkeypatch):
    owner, names = _compat.gloo_collective_patch_targets()
    before = {n: owner.__dict__[n] for n in names}
    with settling_collectives(StorageTracker("cpu")):
        assert all(owner.__dict__[n] is not before[n] for n in names)
    assert {n: owner.__dict__[n] for n in names} == before
