"""How ``_compat`` fails when torch moved an internal: one error naming it and the torch version, never a fallback."""
from __future__ import annotations

from typing import Any

import torch


class TorchInternalMissing(RuntimeError):
    """A private torch/hypothesis internal pytest-gpumem relies on is not where it was in the checked releases."""

    def __init__(self, internal: str, why: str = "") -> None:
        super().__init__(
            f"pytest-gpumem relies on {internal}, which torch {torch.__version__} does not provide as expected"
            f"{': ' + why if why else ''}. Checked on torch 2.11 and 2.14; please report this with your torch version.")
        self.internal = internal


def _require(owner: Any, name: str, where: str) -> Any:
    value = getattr(owner, name, None)
    if value is None:
        raise TorchInternalMissing(f"{where}.{name}")
    return value
