"""LBFGS through the optimizer rule registry: its global state (flat vectors and 0-dim tensors) step by step,
and its step() re-running forward and backward, against the cpu backend's measurement."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_gpumem import measure_step
from pytest_gpumem._core.categories import Category
from pytest_gpumem._estimate import estimate_step
from pytest_gpumem._tools.contradiction import compare

# nn.Linear(64, 256) + nn.Linear(256, 10): 64*256 + 256 + 256*10 + 10 = 19,210 fp32 parameters
N = 19_210 * 4  #: bytes of one flat vector (d, prev_flat_grad, y, s): 76,840
Z = 4           #: bytes of one 0-dim fp32 tensor (ro, al, H_diag, t)


def _case(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, (lambda: torch.optim.LBFGS(model.parameters(), **kw)), torch.randn(32, 64), torch.randint(0, 10, (32,))


@pytest.mark.parametrize(("kw", "state", "optimizer_peak"), [
    # max_iter=2 -> max_eval = 2 * 5 // 4 = 2: one iteration per step. Step 0 keeps d, prev_flat_grad and t (a
    # tensor from |g|.sum()): 2N + Z. Step 1's peak (its closure's new flat_grad) holds the old d (the state's
    # until step() stores), prev, y, s, the new d, and ro, H_diag, al[0] and the old t: 5N + 4Z.
    (dict(max_iter=2), 2 * N + Z, 5 * N + 4 * Z),
    # max_iter=4, history_size=2 -> max_eval 5: step 0 runs 4 iterations, 3 (y, s) pairs of which the history
    # keeps 2: d, prev, 2 pairs = 6N; ro x2, al x2, H_diag (t is the float lr by then) = 5Z; the steady steps
    # pop as many pairs as they push, and their peak splits the state the same way
    (dict(max_iter=4, history_size=2), 6 * N + 5 * Z, 6 * N + 5 * Z),
])
def test_lbfgs_state_and_peak_match_the_cpu_measurement(kw, state, optimizer_peak):
    model, make_opt, x, y = _case(**kw)
    est = estimate_step(model, make_opt(), x, target=y, device="cpu", steps=2)
    rep = measure_step(model, make_opt(), x, target=y, backend="cpu", steps=2)
    assert est.optimizer == state
    assert est.category_peak(Category.OPTIMIZER) == optimizer_peak == rep.category_peak(Category.OPTIMIZER)
    result = compare(rep, est)
    assert result.ok, result.message
    assert "optimizer" not in est.unestimated


@pytest.mark.parametrize("kw", [dict(max_iter=3, max_eval=10), dict(max_iter=2, line_search_fn="strong_wolfe")])
def test_lbfgs_three_steps_pass_the_default_check(kw):
    model, make_opt, x, y = _case(**kw)
    rep = measure_step(model, make_opt(), x, target=y, backend="cpu", steps=3)
    est = estimate_step(model, make_opt(), x, target=y, device="cpu", steps=3)
    result = compare(rep, est)
    assert result.ok, result.message


def test_lbfgs_step_reruns_forward_and_backward():
    """The optimizer phase holds a closure evaluation (zero_grad, forward, backward) beside the state and the
    flat vectors: with a wide hidden layer the step's peak is there, on both sides."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 10))
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    est = estimate_step(model, torch.optim.LBFGS(model.parameters(), max_iter=2), x, target=y, device="cpu")
    rep = measure_step(model, torch.optim.LBFGS(model.parameters(), max_iter=2), x, target=y, backend="cpu")
    assert est.peak_phase.value == rep.peak_phase.value == "optimizer"
    assert compare(rep, est).ok, compare(rep, est).message
