"""The plugin's check of a distributed step, as users run it: what it says when it cannot compare."""
from __future__ import annotations

NO_RULE_TEST = '''
import pytest, torch
from torch import nn
from pytest_gpumem import DDP


class Still(torch.optim.Optimizer):
    """An optimizer of the user's own, with no state and no rule: its per-rank state has no closed form."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


@pytest.mark.gpu_budget("64MiB", parallel=DDP(world_size=2))
def test_own_optimizer(gpumem):
    model = nn.Linear(8, 4)
    gpumem.train_step(model, Still(model.parameters()), torch.randn(4, 8))
'''


def test_an_optimizer_without_a_rule_is_measured_and_says_why_it_is_not_compared(pytester):
    pytester.makepyfile(NO_RULE_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--gpumem-backend=emulated", "-rP", timeout=300)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*gpumem estimate*",
                                 "*no closed-form model states for this step (no optimizer rule for Still*not compared"])
