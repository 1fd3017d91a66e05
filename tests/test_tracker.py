"""The dispatch-level storage tracker: what counts as an allocation, a free, and which category it is."""
from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpumem_factories import mlp
from pytest_gpumem import Category, Phase, measure_step, track
from pytest_gpumem._measure.allocator import round_allocation
from pytest_gpumem._measure.tracker import StorageTracker

F32 = 4


def param_bytes(params):
    return sum(p.numel() * p.element_size() for p in params)


# -- raw tracker -----------------------------------------------------------------------------
def test_views_share_a_storage_and_count_once():
    with StorageTracker("cpu") as tracker:
        base = torch.zeros(1000)
        views = [base.view(10, 100), base[::2], base[10:20], base.t(), base.unsqueeze(0).expand(3, 1000)]
        assert tracker.live_bytes() == 1000 * F32
        assert {tracker.key_of(v) for v in views} == {tracker.key_of(base)}
    assert len(list(tracker.allocation_events())) == 1


def test_in_place_ops_add_nothing():
    with StorageTracker("cpu") as tracker:
        x = torch.ones(256)
        before = list(tracker.allocation_events())
        x.add_(1).mul_(2).relu_().clamp_(max=3.0)
        x[3:7].zero_()
        assert list(tracker.allocation_events()) == before
        assert tracker.live_bytes() == 256 * F32


def test_out_of_place_op_allocates_and_free_is_recorded():
    with StorageTracker("cpu") as tracker:
        x = torch.ones(256)
        y = x * 2
        assert tracker.live_bytes() == 2 * 256 * F32
        del y
        assert tracker.live_bytes() == 256 * F32
    key_x = 0
    assert list(tracker.allocation_events()) == [(key_x, 1024), (1, 1024), (1, -1024)]
    del x


def test_resize_in_place_frees_the_old_size_and_allocates_the_new():
    with StorageTracker("cpu") as tracker:
        t = torch.empty(10)
        t.resize_(1000)
        assert tracker.live_bytes() == 1000 * F32
    assert list(tracker.allocation_events()) == [(0, 40), (0, -40), (0, 4000)]


def test_tensor_held_by_a_reference_cycle_is_freed_at_gc_collect():
    class Holder:
        pass

    gc.collect()
    gc.disable()  # the cycle must survive until we collect it ourselves
    try:
        with StorageTracker("cpu") as tracker:
            holder = Holder()
            holder.me = holder
            holder.tensor = torch.ones(500)
            key = tracker.key_of(holder.tensor)
            del holder
            assert tracker.live_bytes() == 500 * F32  # unreachable, but not freed yet
            gc.collect()
            assert tracker.live_bytes() == 0
    finally:
        gc.enable()
    assert list(tracker.allocation_events()) == [(key, 2000), (key, -2000)]


def test_other_device_types_are_ignored():
    with StorageTracker("meta") as tracker:
        on_cpu = torch.ones(100)
        on_meta = torch.ones(100, device="meta")
        assert tracker.key_of(on_cpu) is None
    assert list(tracker.allocation_events()) == [(0, 400)]
    del on_meta


def test_frees_after_close_are_not_recorded():
    with StorageTracker("cpu") as tracker:
        x = torch.ones(8)
    tracker.close()
    del x
    gc.collect()
    assert list(tracker.allocation_events()) == [(0, 32)]


def test_allocations_carry_their_step_and_phase():
    from pytest_gpumem._measure.tracker import Allocation

    with StorageTracker("cpu") as tracker:
        tracker.start_phase(0, Phase.FORWARD)
        x = torch.empty(10)          # 10 * 4 B = 40 B
        tracker.start_phase(1, Phase.BACKWARD)
        del x
        y = torch.empty(100)         # 100 * 4 B = 400 B
    assert list(tracker.allocations()) == [
        Allocation(0, 40, 40, 0, Phase.FORWARD), Allocation(0, -40, -40, 1, Phase.BACKWARD),
        Allocation(1, 400, 400, 1, Phase.BACKWARD)]
    del y
@given(st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=12))
def test_rounding_surplus_is_reported_as_other(numels):
    with StorageTracker("cpu", round_allocation) as tracker:
        tracker.start_phase(0, Phase.FORWARD)
        kept = [torch.empty(n, dtype=torch.uint8) for n in numels]
        tracker.mark(kept[:1], Category.ACTIVATIONS)
    (replay,) = tracker.replay()
    raw, rounded = sum(numels), sum(round_allocation(n) for n in numels)
    assert replay.peak == replay.retained == rounded
    assert replay.retained_split[Category.ACTIVATIONS] == numels[0]
    assert replay.retained_split[Category.TEMPORARIES] == raw - numels[0]
    assert replay.retained_split[Category.OTHER] == rounded - raw
    assert sum(replay.peak_split.values()) == replay.peak


@given(st.lists(st.tuples(st.booleans(), st.integers(min_value=1, max_value=64)), min_size=1, max_size=30))
def test_replayed_peak_is_the_running_maximum(ops):
    """Allocate (True) or free the oldest live tensor (False); the replay's peak is the true maximum."""
    live: list[torch.Tensor] = []
    expected_peak = current = 0
    with StorageTracker("cpu") as tracker:
        tracker.start_phase(0, Phase.FORWARD)
        for alloc, n in ops:
            if alloc or not live:
                live.append(torch.empty(n, dtype=torch.uint8))
                current += n
            else:
                current -= live.pop(0).numel()
            expected_peak = max(expected_peak, current)
        (replay,) = tracker.replay()
    assert replay.peak == expected_peak
    assert replay.retained == current


# -- through a training step -----------------------------------------------------------------
def test_zero_grad_set_to_none_false_keeps_the_grads_set_to_none_frees_them():
    x = torch.randn(16, 64)
    kept = measure_step(m := mlp(64, 32, 8, seed=0), torch.optim.SGD(m.parameters(), lr=0.1), x, backend="cpu", set_to_none=False)
    freed = measure_step(m := mlp(64, 32, 8, seed=0), torch.optim.SGD(m.parameters(), lr=0.1), x, backend="cpu", set_to_none=True)
    grads = param_bytes(m.parameters())
    for step in kept.steps:
        assert step.phases[Phase.ZERO_GRAD].retained_split[Category.GRADS] == grads
    for step in freed.steps:
        assert step.phases[Phase.ZERO_GRAD].retained_split[Category.GRADS] == 0
    assert kept.steps[-1].phases[Phase.ZERO_GRAD].retained - freed.steps[-1].phases[Phase.ZERO_GRAD].retained == grads


@pytest.mark.parametrize("retain_graph", [False, True])
def test_retain_graph_keeps_the_activations(retain_graph):
    batch, hidden = 16, 32
    model = mlp(64, hidden, 8, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(batch, 64)
    with track(model, optimizer, x, backend="cpu") as tracking:
        model(x).sum().backward(retain_graph=retain_graph)
        optimizer.step()
        optimizer.zero_grad()
    phases = tracking.report.steps[0].phases
    # saved for backward: ReLU's output, which is also the second Linear's input (one storage);
    # x is the batch and the weights are parameters, so they are not counted again
    saved = batch * hidden * F32
    assert phases[Phase.FORWARD].retained_split[Category.ACTIVATIONS] == saved
    expected_after = saved if retain_graph else 0
    assert phases[Phase.BACKWARD].retained_split[Category.ACTIVATIONS] == expected_after
    assert phases[Phase.ZERO_GRAD].retained_split[Category.ACTIVATIONS] == expected_after


def test_frozen_parameters_have_no_grads():
    model = mlp(64, 32, 8, seed=0, frozen_first=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    report = measure_step(model, torch.optim.SGD(trainable, lr=0.1), torch.randn(16, 64), backend="cpu")
    assert report.category_peak(Category.GRADS) == param_bytes(trainable) == (32 * 8 + 8) * F32
    assert report.category_peak(Category.PARAMS) == param_bytes(model.parameters())


class Deep(nn.Module):
    def __init__(self, width: int, depth: int, use_checkpoint: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()) for _ in range(depth)
        )
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        return x


def test_checkpoint_stores_fewer_activations():
    batch, width, depth = 16, 64, 6
    reports = {}
    for use in (False, True):
        torch.manual_seed(0)
        model = Deep(width, depth, use)
        reports[use] = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(batch, width), backend="cpu")
    plain = reports[False].steps[-1].phases[Phase.FORWARD].retained_split[Category.ACTIVATIONS]
    ckpt = reports[True].steps[-1].phases[Phase.FORWARD].retained_split[Category.ACTIVATIONS]
    act = batch * width * F32
    # without: each Tanh saves its output, which the next Linear saves as its input (one storage):
    # two activations per block; the first Linear's input is the batch
    assert plain == 2 * depth * act
    # with: only each checkpointed block's input is kept (the first one is the batch)
    assert ckpt == (depth - 1) * act
    forward_peak = {use: r.steps[-1].phases[Phase.FORWARD].peak for use, r in reports.items()}
    assert forward_peak[True] < forward_peak[False]


def test_autocast_on_the_cpu_backend_saves_bfloat16_activations():
    batch, d_in, hidden, d_out = 16, 64, 32, 8
    model = mlp(d_in, hidden, d_out, seed=0)
    report = measure_step(
        model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(batch, d_in),
        backend="cpu", autocast_dtype=torch.bfloat16,
    )
    bf16 = 2
    forward = report.steps[-1].phases[Phase.FORWARD]
    # saved for backward in bfloat16: the cast input (for the first weight's grad), ReLU's output
    # (= second Linear's input) and the cast second weight (for the grad of its input)
    assert forward.retained_split[Category.ACTIVATIONS] == (batch * d_in + batch * hidden + hidden * d_out) * bf16
    # parameters and grads stay float32 (the master copies)
    assert report.category_peak(Category.PARAMS) == param_bytes(model.parameters())
    assert report.category_peak(Category.GRADS) == param_bytes(model.parameters())


@pytest.mark.parametrize(("device_type", "keep", "collections"), [
    ("cpu", False, 0),    # nothing measured is alive: no leak, no collection
    ("cpu", True, 1),     # something is: a collection first (a reference cycle may be all that holds it)
    ("cuda", False, 1),   # on a GPU always: cyclic garbage may hold unmeasured blocks the next warm-up frees
])
def test_the_leak_check_collects_only_when_it_must(monkeypatch, device_type, keep, collections):
    from pytest_gpumem._core.records import TestState
    from pytest_gpumem.fixture import live_bytes

    tracker = StorageTracker(device_type)
    kept = torch.empty(256)  # 1,024 B on the cpu tracker (the cuda one ignores cpu tensors)
    if keep:
        tracker.observe(kept)
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *args: calls.append(args) or 0)
    assert live_bytes(TestState(budget=None, backend_name=device_type, trackers=[tracker])) == (1024 if keep else 0)
    assert len(calls) == collections
