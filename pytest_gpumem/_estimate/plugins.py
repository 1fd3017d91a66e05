"""The estimate's own pluggy manager: formula and optimizer-state hooks for pytest-free use."""
from __future__ import annotations

from typing import Any

import pluggy

from .. import hookspecs


class _PluginManager(pluggy.PluginManager):
    """A PluginManager that also accepts unmarked ``pytest_gpumem_*`` functions (as conftest.py files have them)."""

    def parse_hookimpl_opts(self, plugin, name):  # noqa: D401 - pluggy's override point
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("pytest_gpumem_") and callable(getattr(plugin, name, None)):
            return {}
        return opts


#: Hook implementations registered here are asked before the built-in formulas (pytest-free use).
plugin_manager = _PluginManager(hookspecs.PROJECT)
plugin_manager.add_hookspecs(hookspecs)


def register_formulas(obj: Any) -> Any:
    """Register a module or object whose ``pytest_gpumem_*`` functions answer the hooks; returns it."""
    plugin_manager.register(obj)
    return obj
