"""The emulated parallel runner (torch's DDP / FSDP2 / ZeroRedundancyOptimizer on meta over the fake process
group) against closed forms and against real gloo ranks on the CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("pytest_gpumem._parallel.rank_step", reason="the dist branch's rank step (merged with it)")

from pytest_gpumem import DDP, FSDP, ZeRO, measure_parallel_step  # noqa: E402
from pytest_gpumem._core.categories import Category, Phase  # noqa: E402
from pytest_gpumem._parallel.emulated_ranks import emulate_ranks  # noqa: E402
from pytest_gpumem._parallel.runners import ParallelStep  # noqa: E402


def _mlp():
    torch.manual_seed(0)
    # 256*512+512 + 512*512+512 + 512*10+10 = 131,584 + 262,656 + 5,130 = 399,370 parameters = 1,597,480 B fp32
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _step(strategy, optimizer_cls=torch.optim.SGD, **options):
    model = _mlp()
    optimizer = optimizer_cls(model.parameters(), lr=0.1, **options)
    return model, optimizer, ParallelStep(model, optimizer, torch.randn(32, 256), strategy,
                                          nn.functional.cross_entropy, torch.randint(0, 10, (32,)))


def test_fsdp_rank_holds_its_padded_shards_at_setup_never_the_whole_model():
    _, _, step = _step(FSDP(4))
    reports = emulate_ranks(step, semantics="cpu")
    setup = reports[0].steps[0].phases[Phase.SETUP]
    # dim 0 of each parameter padded to a multiple of 4 and split: 512/4=128 rows of 256, bias 512/4=128,
    # 128 rows of 512, bias 128, ceil(10/4)=3 rows of 512, bias 3: (32,768+128+65,536+128+1,536+3) * 4 B = 400,396 B
    assert setup.peak_split[Category.PARAMS] == 400_396
    assert setup.peak == 400_396  # the whole-model copy the shards are cut from (1,597,480 B) is not this rank's


def test_every_rank_is_reported_and_ddp_ranks_are_alike():
    _, _, step = _step(DDP(4))
    reports = emulate_ranks(step, semantics="cuda")
    assert [r.parallel.rank for r in reports] == [0, 1, 2, 3]
    assert len({r.peak for r in reports}) == 1
    # a full replica: params 1,597,480 B; DDP's buckets beside .grad: another 1,597,480 B named as buckets
    assert reports[0].peak_split[Category.PARAMS] == 1_597_480


def test_zero1_ranks_are_each_measured_and_hold_different_optimizer_state():
    _, _, step = _step(ZeRO(1, 2), torch.optim.Adam)
    reports = emulate_ranks(step, semantics="cpu")
    state = [r.steps[-1].phases[Phase.ZERO_GRAD].retained_split[Category.OPTIMIZER] for r in reports]
    # Adam keeps 2 x 4 B per parameter of the rank's partition (+ a CPU step counter, not on the device);
    # the two partitions together hold every parameter once: 2 * 4 * 399,370 = 3,194,960 B
    assert sum(state) == 3_194_960 and state[0] != state[1]


@pytest.mark.parametrize("strategy", [DDP(2), DDP(2, gradient_as_bucket_view=True), ZeRO(1, 2)],
                         ids=lambda s: s.describe())
def test_emulated_peak_agrees_with_gloo_ranks_on_the_cpu(strategy):
    model, optimizer, step = _step(strategy, torch.optim.Adam)
    real = measure_parallel_step(model, optimizer, step.batch, target=step.target, loss_fn=step.loss_fn,
                                 parallel=strategy, backend="cpu", timeout=120)
    emulated = emulate_ranks(step, semantics="cpu")
    for rank, (r, e) in enumerate(zip(real.ranks, emulated)):
        assert abs(e.peak - r.peak) <= 0.02 * r.peak, (rank, e.peak, r.peak)


@pytest.mark.xfail(strict=True, reason="FSDP2 takes other branches on a cpu device with gloo than on meta "
                   "(see the emulated_ranks docstring); the emulated peak is ~10% under gloo's on this MLP")
def test_emulated_fsdp_peak_agrees_with_gloo_ranks_on_the_cpu():
    model, optimizer, step = _step(FSDP(2))
    real = measure_parallel_step(model, optimizer, step.batch, target=step.target, loss_fn=step.loss_fn,
                                 parallel=FSDP(2), backend="cpu", timeout=120)
    emulated = emulate_ranks(step, semantics="cpu")
    assert abs(emulated[0].peak - real.ranks[0].peak) <= 0.02 * real.ranks[0].peak
