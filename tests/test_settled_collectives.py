"""Collectives on gloo ranks settle before the step goes on (pytest_gpumem/_parallel/settled_collectives.py).

Gloo's worker thread can be the last to let go of a collective's Work, and with it a staged copy the collective
made on the calling thread. These tests stand a fake collective in for torch's: it stages a copy of its input on
the calling thread and hands it to a thread that lets go of it LATE_S later, as gloo's worker does when it loses
the race. Settled, the copy is freed before the call returns; unsettled (the control), after the rank's next
allocation, which is what moved a rank's backward peak by a whole reduce-scatter input in 4 of 12 runs.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

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
    owner = _compat.gloo_collective_patch_targets()[0]
    monkeypatch.setattr(owner, name, fake.broadcast_coalesced if name in _compat.WAITS_IN_CPP else fake.reduce_scatter)
    tracker = StorageTracker("cpu")
    with tracker:
        inp, out = torch.ones(1024), torch.empty(512)  # 4,096 B staged; out is half of it
        with settling_collectives(tracker, []) if settle else contextlib.nullcontext():
            if name in _compat.WAITS_IN_CPP:
                returned = getattr(owner, name)(None, [inp], 1 << 20, 0)
            else:
                returned = getattr(owner, name)(output=out, input=inp, **kwargs)
        after = torch.ones(64)  # the rank's next allocation: 256 B
        fake.join()  # a late free still lands inside the measurement
        del after
    return [(a.size, a.raw) for a in tracker.allocations()], returned


def _free_comes_before_the_next_allocation(events) -> bool:
    return events.index((-4096, -4096)) < events.index((256, 256))


@pytest.mark.parametrize("which", ["reduce-scatter", "_broadcast_coalesced"])
def test_the_staged_copy_is_freed_before_the_collective_returns(monkeypatch, which):
    name = _scatter_name() if which == "reduce-scatter" else "_broadcast_coalesced"
    events, _ = _run(monkeypatch, name, LateWorker(), settle=True)
    assert _free_comes_before_the_next_allocation(events), events


def test_without_settling_the_late_free_lands_after_the_next_allocation(monkeypatch):
    # the control: the fake really frees late (held until join(), after the next allocation), so the test above
    # can fail
    events, _ = _run(monkeypatch, _scatter_name(), LateWorker(hold_s=60), settle=False)
    assert not _free_comes_before_the_next_allocation(events), events


def test_an_async_caller_gets_a_finished_work_and_the_buffers_are_already_freed(monkeypatch):
    # FSDP2 may all-gather with async_op=True and wait later, checking isinstance(work, Work)
    events, work = _run(monkeypatch, _scatter_name(), LateWorker(), settle=True, async_op=True)
    assert isinstance(work, torch.distributed.distributed_c10d.Work) and work.is_completed()
    assert _free_comes_before_the_next_allocation(events), events


def test_the_callers_tensor_held_by_the_work_is_let_go_before_the_collective_returns(monkeypatch):
    # the other half of settling: the Work holds the caller's own tensor (an all-gather's output, a reduce-scatter's
    # input) and the caller drops it right after; freed then, unless the worker thread still holds the Work
    owner = _compat.gloo_collective_patch_targets()[0]
    name = _scatter_name()
    release, threads = threading.Event(), []
    weight = torch.ones(2, 1, requires_grad=True)

    def holds_the_input(output, input, op=None, group=None, async_op=False):  # noqa: A002 - torch's name
        product = weight * input  # autograd saves ``input`` in C++, as gloo's Work holds its tensors
        saved = [product.grad_fn]
        del product  # its own 2 x 1,024 fp32 = 8,192 B go now; the saved input stays held
        thread = threading.Thread(target=lambda: (release.wait(60), saved.clear()), daemon=True)
        thread.start()
        threads.append(thread)
        return _compat.completed_work() if async_op else None

    monkeypatch.setattr(owner, name, holds_the_input)
    monkeypatch.setattr(settled_collectives, "_wait_until_not", _released_then_waited(release))
    tracker = StorageTracker("cpu")
    with tracker:
        inp, out = torch.ones(1024), torch.empty(512)  # 4,096 B and 2,048 B
        with settling_collectives(tracker, []):
            getattr(owner, name)(out, inp)
        del inp  # 4,096 B freed now if nothing else holds it
        after = torch.ones(64)  # the next allocation, 256 B
        release.set()
        for thread in threads:
            thread.join()
        del after
    events = [(a.size, a.raw) for a in tracker.allocations()]
    assert _free_comes_before_the_next_allocation(events), events


def _released_then_waited(release: threading.Event):
    """settled_collectives' wait, after letting the fake's thread go when the wait is first asked for: the release
    happens only if the settling waits at all (a settling that does not wait leaves the input held past ``del``)."""
    wait = settled_collectives._wait_until_not

    def waiting(pending, timeout_s):
        if pending():
            release.set()
        return wait(pending, timeout_s)

    return waiting


def test_a_buffer_that_outlives_the_wait_is_waited_for_once_then_no_more_and_noted(monkeypatch):
    monkeypatch.setattr(settled_collectives, "SETTLE_S", 0.05)
    waits = []
    wait = settled_collectives._wait_until_not
    monkeypatch.setattr(settled_collectives, "_wait_until_not", lambda pending, t: waits.append(t) or wait(pending, t))
    owner = _compat.gloo_collective_patch_targets()[0]
    name = _scatter_name()
    fake = LateWorker(hold_s=60)  # held until join()
    monkeypatch.setattr(owner, name, fake.reduce_scatter)
    tracker, notes = StorageTracker("cpu"), []
    with tracker, settling_collectives(tracker, notes):
        for _ in range(2):
            getattr(owner, name)(output=torch.empty(2), input=torch.ones(4))
    fake.join()
    assert waits == [0.05]  # waited once, SETTLE_S, for a copy that stayed; not again for that collective
    assert len(notes) == 1 and f"a {name} kept a buffer alive past 0.05 s" in notes[0], notes


def test_the_callers_own_tensors_first_seen_in_the_call_are_not_waited_for(monkeypatch):
    # a broadcast into a tensor made before the measurement: the tracker first sees its storage as the collective's
    # output, but it is the caller's and stays alive; settling must not take it for a buffer the call made
    monkeypatch.setattr(settled_collectives, "SETTLE_S", 0.05)
    owner = _compat.gloo_collective_patch_targets()[0]

    def broadcast(tensor, src=None, group=None, async_op=False):
        tensor.add_(0)  # written in place, as gloo's broadcast does on the receiving ranks
        return _compat.completed_work() if async_op else None

    monkeypatch.setattr(owner, "broadcast", broadcast)
    made_before = torch.ones(8)
    tracker, notes = StorageTracker("cpu"), []
    with tracker, settling_collectives(tracker, notes):
        owner.broadcast(made_before, src=0)
        assert tracker.key_of(made_before) is not None  # seen, during the call
    assert notes == []  # not given up on: nothing of the call's own was pending


def test_a_collective_that_does_not_declare_async_op_is_called_as_it_is(monkeypatch):
    # a profiler's or a user's wrapper of (*args, **kwargs) in front of torch's: async_op passes through untouched
    owner = _compat.gloo_collective_patch_targets()[0]
    name = _scatter_name()
    seen = []

    def wrapper(*args, **kwargs):
        seen.append(kwargs.get("async_op"))
        return _compat.completed_work() if kwargs.get("async_op") else None

    monkeypatch.setattr(owner, name, wrapper)
    tracker = StorageTracker("cpu")
    with tracker, settling_collectives(tracker, []):
        work = getattr(owner, name)(torch.empty(2), torch.ones(4), async_op=True)
        none = getattr(owner, name)(torch.empty(2), torch.ones(4))
    assert isinstance(work, torch.distributed.distributed_c10d.Work) and none is None
    assert seen == [True, None]


def test_inside_a_coalescing_manager_the_collective_is_deferred_not_waited_on():
    # torch hands back a placeholder there, which raises if waited on; the collectives run when the block ends
    import torch.distributed as dist

    owner = _compat.gloo_collective_patch_targets()[0]
    name = next(n for n in ("reduce_scatter_tensor", "reduce_scatter_single") if hasattr(dist, n))
    dist.init_process_group("fake", store=_compat.fake_store(), rank=0, world_size=4)
    try:
        tracker = StorageTracker("cpu")
        with tracker, settling_collectives(tracker, []), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # reduce_scatter_tensor is deprecated on 2.14
            with dist._coalescing_manager(async_ops=True) as coalesced:
                work = getattr(owner, name)(torch.empty(1), torch.ones(4), async_op=True)
                assert _compat.is_deferred_work(work)
                assert getattr(owner, name)(torch.empty(1), torch.ones(4)) is None
            coalesced.wait()
    finally:
        dist.destroy_process_group()


def test_the_collectives_are_restored_after_the_block_also_when_it_raises():
    owner, names = _compat.gloo_collective_patch_targets()
    before = {n: owner.__dict__[n] for n in names}
    with settling_collectives(StorageTracker("cpu"), []):
        assert all(owner.__dict__[n] is not before[n] for n in names)
    assert {n: owner.__dict__[n] for n in names} == before
    with pytest.raises(KeyError), settling_collectives(StorageTracker("cpu"), []):
        raise KeyError("the step failed")
    assert {n: owner.__dict__[n] for n in names} == before
