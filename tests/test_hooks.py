"""The extension hooks are "who can answer this?" questions: the first non-None answer wins (firstresult),
under pytest (``config.hook``, a conftest.py implementing them) and without pytest (``register_formulas``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pytest_gpumem
from pytest_gpumem import estimate_step, hookimpl, register_formulas
from pytest_gpumem._estimate import plugin_manager


class Squarer(nn.Module):
    """y = x * x: saves x (meta trace 4*4*4 B = 64 B), so a hook answer is told apart from the trace."""

    def forward(self, x):
        return x * x


def test_without_pytest_the_first_int_answer_is_returned_not_a_list():
    class Passes:
        @hookimpl
        def pytest_gpumem_activation_bytes(self, module, inputs, output, device):
            return None

    class Answers:
        @hookimpl
        def pytest_gpumem_activation_bytes(self, module, inputs, output, device):
            return 4321 if isinstance(module, Squarer) else None

    class AnswersFirst:
        @hookimpl(tryfirst=True)
        def pytest_gpumem_activation_bytes(self, module, inputs, output, device):
            return 99 if isinstance(module, Squarer) else None

    plugins = [register_formulas(Answers()), register_formulas(Passes())]
    try:
        # Passes is asked first (registered last) and passes the question on: Answers' int comes back alone
        assert plugin_manager.hook.pytest_gpumem_activation_bytes(
            module=Squarer(), inputs=(), output=None, device="cpu") == 4321
        est = estimate_step(nn.Sequential(nn.Linear(4, 4), Squarer()), None, (torch.randn(4, 4),), device="cpu")
        row = next(r for r in est.layers if r.type == "Squarer")
        assert (row.method, row.activation_bytes) == ("hook", 4321)
        plugins.append(register_formulas(AnswersFirst()))
        assert plugin_manager.hook.pytest_gpumem_activation_bytes(
            module=Squarer(), inputs=(), output=None, device="cpu") == 99  # tryfirst honoured
    finally:
        for plugin in plugins:
            plugin_manager.unregister(plugin)


def test_spec_is_firstresult_for_pytest_and_for_the_estimate():
    from pytest_gpumem import hookspecs

    pm = pytest.PytestPluginManager()
    pm.add_hookspecs(hookspecs)
    for manager in (pm, plugin_manager):
        for name in ("pytest_gpumem_activation_bytes", "pytest_gpumem_optimizer_state_bytes"):
            assert getattr(manager.hook, name).spec.opts["firstresult"] is True


def test_a_conftest_hook_returning_an_int_is_the_first_result(pytester: pytest.Pytester):
    pytester.makeconftest('''
        import pytest_gpumem
        from torch import nn

        class Early:
            @pytest_gpumem.hookimpl(tryfirst=True)
            def pytest_gpumem_optimizer_state_bytes(self, optimizer, param, device):
                return 10  # asked before the conftest's own answer below

        def pytest_configure(config):
            config.pluginmanager.register(Early(), "early")

        def pytest_gpumem_activation_bytes(module, inputs, output, device):
            return 1234 if type(module).__name__ == "Squarer" else None

        def pytest_gpumem_optimizer_state_bytes(optimizer, param, device):
            return 20
    ''')
    pytester.makepyfile('''
        import torch
        from torch import nn
        from pytest_gpumem import estimate_step

        class Squarer(nn.Module):
            def forward(self, x):
                return x * x

        def test_hook(request):
            hook = request.config.hook
            assert hook.pytest_gpumem_activation_bytes(module=Squarer(), inputs=(), output=None, device="cpu") == 1234
            assert hook.pytest_gpumem_activation_bytes(module=nn.ReLU(), inputs=(), output=None, device="cpu") is None
            model = nn.Sequential(nn.Linear(4, 4), Squarer())
            # what the gpumem fixture passes for the contradiction check: the session's config.hook
            est = estimate_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 4),
                                device="cpu", hook=hook)
            row = next(r for r in est.layers if r.type == "Squarer")
            assert (row.method, row.activation_bytes) == ("hook", 1234)
            # Early (tryfirst) answers 10 B per parameter: 2 parameters (weight, bias) -> 20 B
            assert est.optimizer == 10 * 2
    ''')
    result = pytester.runpytest("--gpumem-backend=emulated")
    result.assert_outcomes(passed=1)
