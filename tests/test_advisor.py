"""Tests of the batch-size advisor: its answer fits the budget and one more sample does not, by measurement."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pytest_gpumem._measure.step import measure_step
from pytest_gpumem._tools.advisor import StepModel, advise_batch_size, fit_size, max_batch_size
from pytest_gpumem.strategies import CNNConfig, MLPConfig, OptimizerFactory

ADAM = OptimizerFactory.of(torch.optim.Adam, lr=1e-3)
SGD = OptimizerFactory.of(torch.optim.SGD, lr=0.1, momentum=0.9)
MLP = MLPConfig(64, (256, 256), 10, dropout=0.1)
CNN = CNNConfig(3, 16, (8, 16), (3, 3), (1, 2), 10, batch_norm=True, dropout=0.1)


def peak(config, batch_size, optimizer, backend="cpu"):
    model = config.build()
    inputs, target = config.make_batch(batch_size)
    return measure_step(model, optimizer(model.parameters()), inputs, target=target, backend=backend).peak


def budget_for(usable, safety):
    """The smallest budget whose floor(safety * budget) is exactly ``usable`` bytes."""
    budget = math.ceil(usable / safety)
    assert math.floor(safety * budget) == usable
    return budget


@pytest.mark.parametrize(("config", "optimizer", "backend", "target"), [
    (MLP, ADAM, "cpu", 37),       # Adam: the optimizer phase is the peak at small batches, backward at large
    (MLP, ADAM, "cpu", 300),
    (CNN, SGD, "cpu", 23),
    (MLP, ADAM, "emulated", 150),  # 512-B rounding: still exact, since the advisor replays rounded sizes
], ids=["mlp-37", "mlp-300", "cnn-23", "mlp-emulated-150"])
def test_answer_fits_and_one_more_sample_does_not(config, optimizer, backend, target):
    # The budget leaves exactly the peak of `target` usable, so the answer must be `target` itself.
    safety = 0.8
    budget = budget_for(peak(config, target, optimizer, backend), safety)
    advice = advise_batch_size(config.build, optimizer, config.make_batch, budget=budget, safety=safety,
                               backend=backend)
    assert advice.linear and advice.method == "measure" and len(advice.samples) == 3
    assert peak(config, advice.max_batch, optimizer, backend) <= safety * budget
    assert peak(config, advice.max_batch + 1, optimizer, backend) > safety * budget
    assert advice.max_batch == target


def test_peak_moving_between_phases_is_followed():
    # With Adam on this MLP the probes (2, 4, 8) peak in the optimizer phase, a large batch in backward:
    # a line through the probes' peaks would give a far larger answer than the one that fits.
    advice = advise_batch_size(MLP.build, ADAM, MLP.make_batch, budget="3MB", backend="cpu")
    probe_line = [p for _, p in advice.samples]
    slope = (probe_line[2] - probe_line[0]) / (advice.samples[2][0] - advice.samples[0][0])
    naive = math.floor((advice.usable_bytes - probe_line[0]) / slope) + advice.samples[0][0]
    assert naive > 2 * advice.max_batch
    assert advice.limiting_phase.endswith("backward")
    assert peak(MLP, advice.max_batch, ADAM) <= advice.usable_bytes < peak(MLP, advice.max_batch + 1, ADAM)


class PairwiseScores(nn.Module):
    """A contrastive-style head: a batch x batch score matrix, so memory grows with batch**2."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 16)

    def forward(self, x):
        z = self.proj(x)
        return z @ z.T  # (batch, batch) logits; cross-entropy against the diagonal


def pairwise_batch(b):
    return torch.randn(b, 32), torch.arange(b)


def test_quadratic_memory_is_reported_and_still_answered():
    safety = 0.8
    reference = PairwiseScores()
    usable = measure_step(reference, SGD(reference.parameters()), pairwise_batch(200)[0],
                          target=pairwise_batch(200)[1], backend="cpu").peak
    budget = budget_for(usable, safety)
    advice = advise_batch_size(PairwiseScores, SGD, pairwise_batch, budget=budget, safety=safety, backend="cpu")
    assert not advice.linear
    assert "do not grow linearly" in advice.notes[0]

    def measured(b):
        model = PairwiseScores()
        inputs, target = pairwise_batch(b)
        return measure_step(model, SGD(model.parameters()), inputs, target=target, backend="cpu").peak

    assert measured(advice.max_batch) <= advice.usable_bytes < measured(advice.max_batch + 1)
    assert advice.max_batch == 200  # the budget leaves exactly the peak of batch 200 usable (budget_for above)


def test_nothing_fits_below_the_fixed_bytes():
    # Budget: the parameters' own bytes (64*256+256 + 256*256+256 + 256*10+10 = 85,002 fp32 = 340,008 B); at the
    # default safety 0.8 the usable part is 272,006 B, which the parameters alone exceed.
    n_params = sum(p.numel() for p in MLP.build().parameters())
    assert n_params == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10 == 85_002
    advice = advise_batch_size(MLP.build, ADAM, MLP.make_batch, budget=4 * n_params, backend="cpu")
    assert advice.max_batch == 0


def test_model_instance_and_factory_agree_and_max_batch_size_is_the_same_answer():
    kwargs = dict(budget="2MB", backend="cpu")
    from_factory = advise_batch_size(CNN.build, SGD, CNN.make_batch, **kwargs)
    from_instance = advise_batch_size(CNN.build(), SGD, CNN.make_batch, **kwargs)
    assert from_factory.max_batch == from_instance.max_batch == max_batch_size(CNN.build, SGD, CNN.make_batch,
                                                                                 **kwargs)
    # the answer fits the usable bytes and one more sample does not, by measurement (2 MB x 0.8 = 1.6 MB)
    assert from_factory.usable_bytes == 1_600_000
    assert 0 < peak(CNN, from_factory.max_batch, SGD) <= 1_600_000 < peak(CNN, from_factory.max_batch + 1, SGD)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"safety": 0}, "safety=0 must be a number in (0, 1]"),
    ({"safety": 1.5}, "safety=1.5"),
    ({"probes": (2, 4)}, "must be three different batch sizes"),
    ({"probes": (0, 1, 2)}, "must be three different batch sizes >= 1"),
    ({"method": "trial"}, "method='trial' must be 'measure' or 'estimate'"),
    ({"budget": "2 Gb"}, "a lowercase 'b' means bits"),
])
def test_invalid_arguments(kwargs, message):
    options = {"budget": "1GB", "backend": "cpu", **kwargs}
    with pytest.raises(ValueError) as info:
        advise_batch_size(MLP.build, ADAM, MLP.make_batch, **options)
    assert message in str(info.value)


def test_fit_size_lines_parabolas_and_concave_bends():
    line = fit_size([(2, 120), (4, 140), (8, 180)])  # 100 + 10 b
    assert (line.fixed, line.per_sample, line.linear) == (100, 10, True)
    parabola = fit_size([(2, 4 * 3 + 7), (4, 16 * 3 + 7), (8, 64 * 3 + 7)])  # 7 + 3 b^2
    assert (parabola.fixed, parabola.per_sample, parabola.per_sample_squared) == (7, 0, 3)
    assert not parabola.linear and parabola.at(10) == 7 + 3 * 10**2  # 307
    concave = fit_size([(2, 100), (4, 140), (8, 180)])  # slopes 20 then 10: keep 20 through (8, 180)
    assert (concave.per_sample, concave.at(8), concave.at(9)) == (20, 180, 180 + 20)


def test_step_model_rejects_probes_that_allocate_differently():
    from pytest_gpumem._tools.advisor import Probe

    a = Probe(2, ((0, "first/forward", 10),), 10, lambda n: n)
    b = Probe(4, ((0, "first/forward", 20), (0, "first/forward", None)), 20, lambda n: n)
    with pytest.raises(ValueError, match="allocated differently"):
        StepModel.from_probes([a, b, b])


def test_estimate_method_solves_the_estimate_without_running_steps():
    from pytest_gpumem._estimate import estimate_step

    def estimated(b):
        model = MLP.build()
        inputs, target = MLP.make_batch(b)
        return estimate_step(model, ADAM(model.parameters()), inputs, target=target, device="cpu").peak

    advice = advise_batch_size(MLP.build, ADAM, MLP.make_batch, budget="3MB", backend="cpu", method="estimate")
    assert advice.method == "estimate" and advice.max_batch > 0
    assert estimated(advice.max_batch) <= advice.usable_bytes < estimated(advice.max_batch + 1)
