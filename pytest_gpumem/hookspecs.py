"""pluggy hook specifications: how users teach the estimate about their own layers and optimizers.

Both hooks are "who can answer this?" questions (``firstresult=True``): the first implementation
returning an int wins, ``None`` passes the question on, and an answer beats the built-in registry.
Usable without pytest (``pytest_gpumem.register_formulas``) and inside pytest (the plugin adds
these specs to ``config.pluginmanager``, so a ``conftest.py`` can implement them).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import pluggy

PROJECT = "pytest_gpumem"
F = TypeVar("F", bound=Callable[..., Any])

_OWN_SPEC = pluggy.HookspecMarker(PROJECT)
_OWN_IMPL = pluggy.HookimplMarker(PROJECT)
#: pytest's PluginManager (project "pytest") reads only ``pytest_spec``/``pytest_impl`` marks; without them it
#: registers a spec with its legacy defaults and ``firstresult`` is lost. These are the markers pytest.hookspec
#: and pytest.hookimpl are, made here so that this module does not import pytest.
_PYTEST_SPEC = pluggy.HookspecMarker("pytest")
_PYTEST_IMPL = pluggy.HookimplMarker("pytest")


def hookspec(**options: Any) -> Callable[[F], F]:
    """Mark a hook specification for both managers: the estimate's own and pytest's (``config.hook``)."""
    def mark(fn: F) -> F:
        return _PYTEST_SPEC(**options)(_OWN_SPEC(**options)(fn))
    return mark


def hookimpl(function: F | None = None, **options: Any) -> Any:
    """Mark a hook implementation (``tryfirst``, ``trylast``, ``wrapper``...) for both managers.

    Usable bare (``@hookimpl``) or with options (``@hookimpl(tryfirst=True)``).
    """
    def mark(fn: F) -> F:
        return _PYTEST_IMPL(**options)(_OWN_IMPL(**options)(fn))
    return mark(function) if function is not None else mark


@hookspec(firstresult=True)
def pytest_gpumem_activation_bytes(module: Any, inputs: tuple, output: Any, device: str) -> int | None:
    """Bytes ``module`` saves for backward in this call (inputs/output are meta tensors; device "cuda" or "cpu"), or None."""


@hookspec(firstresult=True)
def pytest_gpumem_optimizer_state_bytes(optimizer: Any, param: Any, device: str) -> int | None:
    """Bytes of optimizer state ``optimizer`` keeps on ``device`` for ``param`` after its first step, or None."""


@hookspec()
def pytest_gpumem_device_profiles() -> list[Any]:
    """More target GPUs for ``--gpumem-device`` / ``gpu_budget(device=...)``: a list of
    ``pytest_gpumem.DeviceProfile``. Every implementation is asked; a name given twice is refused."""
