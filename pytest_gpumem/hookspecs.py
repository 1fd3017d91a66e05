"""pluggy hook specifications: how users teach the estimate about their own layers and optimizers.

Both hooks are "who can answer this?" questions (``firstresult=True``): the first implementation
returning an int wins, ``None`` passes the question on, and an answer beats the built-in registry.
Usable without pytest (``pytest_gpumem.estimate.plugin_manager``) and inside pytest (the plugin adds
these specs to ``config.pluginmanager``, so a ``conftest.py`` can implement them).
"""
from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "pytest_gpumem"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def pytest_gpumem_activation_bytes(module: Any, inputs: tuple, output: Any, device: str) -> int | None:
    """Bytes ``module`` saves for backward in this call (inputs/output are meta tensors; device "cuda" or "cpu"), or None."""


@hookspec(firstresult=True)
def pytest_gpumem_optimizer_state_bytes(optimizer: Any, param: Any, device: str) -> int | None:
    """Bytes of optimizer state ``optimizer`` keeps on ``device`` for ``param`` after its first step, or None."""
