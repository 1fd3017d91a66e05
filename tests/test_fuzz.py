"""Fuzzing the engine against the estimator, and the fuzz() helper itself (shrinking, budget, callbacks).

Example counts come from the hypothesis profile (tests/conftest.py): ``ci`` runs 20 derandomized
examples per family, ``HYPOTHESIS_PROFILE=dev`` 200 random ones; benchmarks/fuzz_agreement.py runs
>= 200 per family and prints the worst disagreement.
"""
from __future__ import annotations

import pluggy
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.errors import FailedHealthCheck, InvalidArgument, Unsatisfiable
from torch import nn

from pytest_gpumem import hookspecs
from pytest_gpumem import strategies as gst
from pytest_gpumem._estimate import estimate_step
from pytest_gpumem._measure.step import measure_step
from pytest_gpumem._tools.contradiction import compare
from pytest_gpumem._tools.fuzz import FuzzFailure, fuzz
from pytest_gpumem.strategies import MLPConfig, OptimizerFactory

#: The optimizers fuzzed with every family (RMSprop/Adagrad: their own test below).
AGREEING_OPTIMIZERS = gst.optimizers(kinds=["sgd", "sgd_momentum", "adam", "adamw"])
SGD = OptimizerFactory.of(torch.optim.SGD, lr=1e-3)
SMALL_BATCHES = gst.batch_sizes(max_value=16)

#: Families fuzzed against the estimator. Layers start at 8 units: below that a few-byte gap (see
#: test_tiny_models) exceeds 2% of the whole step and would hide every other finding behind it.
FAMILIES = {
    "mlp": gst.mlp_configs(min_width=8, max_width=256, min_in_features=8, max_in_features=128),
    "cnn": gst.cnn_configs(max_depth=3, min_channels=8, max_channels=16, min_image_size=8, max_image_size=16),
    "transformer": gst.transformer_configs(max_depth=1, min_head_dim=8, max_head_dim=16, max_ffn_width=32,
                                           max_seq_len=8, max_vocab_size=32),
}

# Disagreements over 2% that this suite's fuzzing found in the estimator (_estimate/, not ours), each shrunk
# to its minimal example; strict, so the mark must go when the estimator is fixed.
# (The transformer family's emulated gap, the residual's grad held through nn.MultiheadAttention's backward and
# the sdpa backward instant, is fixed; none is open.)
KNOWN_GAPS: dict[tuple[str, str], str] = {}


#: Known gaps only need detecting, not shrinking again (that alone costs ~300 examples per test).
NO_SHRINK = settings(phases=[Phase.explicit, Phase.reuse, Phase.generate], deadline=None)


def _settings_for(family, backend):
    return NO_SHRINK if (family, backend) in KNOWN_GAPS else None


def _family_params(backend):
    params = []
    for name in FAMILIES:
        gap = KNOWN_GAPS.get((name, backend))
        marks = [pytest.mark.xfail(raises=FuzzFailure, strict=True, reason=gap)] if gap else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("family", _family_params("cpu"))
def test_measurement_matches_estimate_within_2_percent_on_cpu(family):
    result = fuzz(FAMILIES[family], batch_sizes=SMALL_BATCHES, optimizer=AGREEING_OPTIMIZERS, backend="cpu",
                  rtol=0.02, settings=_settings_for(family, "cpu"))
    assert result.examples >= settings.default.max_examples
    assert result.worst_row <= 0.02


@pytest.mark.parametrize("family", _family_params("emulated"))
def test_measurement_matches_estimate_within_2_percent_emulated(family):
    result = fuzz(FAMILIES[family], batch_sizes=SMALL_BATCHES, optimizer=AGREEING_OPTIMIZERS,
                  backend="emulated", rtol=0.02, settings=_settings_for(family, "emulated"))
    assert result.worst_row <= 0.02


def test_rmsprop_and_adagrad_on_cpu():
    fuzz(gst.mlp_configs(min_width=8, max_width=256), batch_sizes=SMALL_BATCHES,
         optimizer=gst.optimizers(kinds=["rmsprop", "adagrad"]), backend="cpu", rtol=0.02, settings=NO_SHRINK)


@pytest.mark.parametrize(("backend", "batch_size"), [("cpu", 1), ("emulated", 4)])
def test_cnn_dropout_after_strided_1x1_conv(backend, batch_size):
    _assert_agrees(gst.CNNConfig(1, 8, (8,), (1,), (2,), 2, batch_norm=False, dropout=0.1), batch_size, backend)


@pytest.mark.xfail(raises=AssertionError, strict=True,
                   reason="the shrunk example of fuzzing MLPs from width 1: on the tiniest models the estimated "
                          "peak is a few bytes off (e.g. 120 or 132 B vs 128 B measured), over 2% of so small a "
                          "step; why FAMILIES start at 8 units")
def test_tiny_models():
    _assert_agrees(MLPConfig(1, (1,), 2), 2, "cpu")


def _assert_agrees(config, batch_size, backend):
    """measure_step and estimate_step agree within 2% on one configuration (SGD)."""
    model = config.build()
    inputs, target = config.make_batch(batch_size)
    report = measure_step(model, SGD(model.parameters()), inputs, target=target, backend=backend)
    model = config.build()
    estimate = estimate_step(model, SGD(model.parameters()), inputs, target=target,
                             device="cpu" if backend == "cpu" else "cuda")
    comparison = compare(report, estimate, 0.02, atol=0)
    assert comparison.ok, comparison.message


# --------------------------------------------------------------------------- a planted estimator bug

class IgnoreDropoutMasks:
    """The planted bug: tells the estimator that Dropout saves nothing for backward."""

    @hookspecs.hookimpl
    def pytest_gpumem_activation_bytes(self, module, inputs, output, device):
        return 0 if isinstance(module, nn.Dropout) else None


def estimate_ignoring_dropout(*args, **kwargs):
    """estimate_step with the planted bug, through the estimator's own hook (nothing else changed)."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(IgnoreDropoutMasks())
    return estimate_step(*args, hook=manager.hook, **kwargs)


#: Generate and shrink only: what the shrink tests prove. Hypothesis' target and explain phases re-run the step
#: many times after shrinking (~40 s of the planted-bug test alone; ~3 s without them).
SHRINK_ONLY = settings(max_examples=50, database=None, deadline=None, phases=[Phase.generate, Phase.shrink])


@pytest.mark.parametrize("backend", ["cpu", "emulated"])
def test_planted_dropout_bug_is_caught_and_shrunk_to_a_minimal_config(backend):
    with pytest.raises(FuzzFailure) as info:
        fuzz(gst.mlp_configs(min_width=8, max_width=64, min_in_features=8, max_in_features=64),
             batch_sizes=SMALL_BATCHES, optimizer=AGREEING_OPTIMIZERS, backend=backend, rtol=0.02,
             atol=0,
             estimate=estimate_ignoring_dropout, settings=SHRINK_ONLY)
    case = info.value.case
    # Minimal: every size at its lower bound (an 8-8-2 MLP at batch size 1, plain SGD) -- only the Dropout stays.
    assert case.model.in_features == 8 and case.model.widths == (8,) and case.model.out_features == 2
    assert case.batch_size == 1 and case.optimizer == SGD
    # the dropouts drawn are 0.0, 0.1, 0.2, 0.3, 0.5 (strategies._dropouts, shrinking to the lowest): the bug needs a
    # Dropout layer, so the smallest positive probability
    assert case.model.dropout == 0.1
    message = str(info.value)
    assert repr(case) in message and "activations" in message and "<-- differs" in message
    # The failure is the planted bug's: the real estimator agrees on the very same example.
    model = case.model.build()
    inputs, target = case.model.make_batch(case.batch_size)
    report = measure_step(model, SGD(model.parameters()), inputs, target=target, backend=backend)
    model = case.model.build()
    estimate = estimate_step(model, SGD(model.parameters()), inputs, target=target,
                             device="cpu" if backend == "cpu" else "cuda")
    assert compare(report, estimate, 0.02, atol=0).ok


# --------------------------------------------------------------------------- fuzz() on a user's own model

def make_net(in_features, width):
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, 2))


def make_net_batch(batch_size, in_features):
    return torch.randn(batch_size, in_features), torch.randint(2, (batch_size,))


def _peak_of(width, in_features=8, batch_size=4):
    model = make_net(in_features, width)
    inputs, target = make_net_batch(batch_size, in_features)
    return measure_step(model, SGD(model.parameters()), inputs, target=target, backend="cpu").peak


def test_budget_failure_shrinks_to_the_smallest_width_over_budget():
    budget = _peak_of(100)  # the 100-wide net fits exactly; 101 and wider do not (peak grows with width)
    with pytest.raises(FuzzFailure) as info:
        fuzz(make_net, in_features=st.just(8), width=st.integers(1, 512), make_batch=make_net_batch,
             batch_sizes=4, optimizer=SGD, budget=budget, backend="cpu", rtol=1.0,
             settings=settings(SHRINK_ONLY, max_examples=100))
    assert info.value.case.model == {"in_features": 8, "width": 101}
    assert "exceeds the budget" in str(info.value) and "width=101" in str(info.value)
    assert _peak_of(101) > budget >= _peak_of(100)


def test_user_model_arguments_reach_model_and_batch_and_every_example_is_reported(tmp_path):
    # tmp_path: a function-scoped fixture next to fuzz() raises no health check, since fuzz builds everything
    # per example itself and is not itself a pytest item.
    seen = []
    result = fuzz(make_net, in_features=st.integers(1, 16), width=st.integers(1, 64), make_batch=make_net_batch,
                  batch_sizes=st.integers(1, 8), optimizer=SGD, backend="cpu", rtol=0.02, max_examples=10,
                  on_example=seen.append)
    assert result.examples == len(seen) == len(result.peaks) == 10
    assert [r.peak for r in seen] == result.peaks
    assert all(r.backend == "cpu" for r in seen)


def test_health_checks_stay_on():
    with pytest.raises((FailedHealthCheck, Unsatisfiable)):
        fuzz(gst.mlp_configs(max_width=4), batch_sizes=st.integers(1, 64).filter(lambda b: False),
             optimizer=SGD, backend="cpu", settings=settings(max_examples=5, database=None, deadline=None))
    assert HealthCheck.filter_too_much not in settings.default.suppress_health_check


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"make_model": make_net}, "make_batch=... is needed"),
    ({"make_model": 3, "make_batch": make_net_batch}, "make_model=3 must be a strategy"),
    ({"make_model": gst.mlp_configs(), "width": st.just(2)}, "model arguments ['width'] apply only"),
    ({"make_model": gst.mlp_configs(), "rtol": -0.1}, "rtol=-0.1 must be >= 0"),
    ({"make_model": gst.mlp_configs(), "optimizer": "adam"}, "optimizer='adam' must be a callable"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(InvalidArgument) as info:
        fuzz(**kwargs, backend="cpu")
    assert message in str(info.value)

