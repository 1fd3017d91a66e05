"""The public zoo: real architectures with tiny configs and random weights, each a named training step.

``REGISTRY`` maps a name to an :class:`~gpumem_zoo.entry.Entry`; ``entry.build()`` returns a
:class:`~gpumem_zoo.entry.Step` on the CPU. Nothing is downloaded. Used by tests/test_zoo.py and
benchmarks/zoo.py.
"""
from __future__ import annotations

from . import other, text, vision  # noqa: F401  (each module registers its entries)
from .entry import REGISTRY, Entry, Step
from .rules import RULES

__all__ = ["REGISTRY", "RULES", "Entry", "Step"]
