"""Per-layer summary table in torchinfo's spirit, but for training: bytes each call saves for backward."""
from __future__ import annotations

from typing import Any

from torch import nn

from .._estimate import LayerEstimate, estimate_step
from .._core.text_table import render_table
from .._core.units import format_bytes


def layer_rows(model: nn.Module, batch: Any, *, target: Any = None, loss_fn=None, device: str = "cuda",
               hook: Any = None) -> tuple[LayerEstimate, ...]:
    """The per-call LayerEstimates of one forward (a module called twice appears twice)."""
    return estimate_step(model, None, batch, target=target, loss_fn=loss_fn, device=device, steps=1, hook=hook).layers


def summary(model: nn.Module, batch: Any, *, target: Any = None, loss_fn=None, device: str = "cuda",
            hook: Any = None) -> str:
    """A text table: layer (indented by depth), type, output shape, params, activation bytes, formula/traced
    (and, where the figure is traced, the closed-form formula's figure beside it as a cross-check)."""
    rows = layer_rows(model, batch, target=target, loss_fn=loss_fn, device=device, hook=hook)
    table = render_table(["layer", "type", "output shape", "params", "activations", "method"], [
        ["  " * r.depth + r.name, r.type, "x".join(map(str, r.output_shape)) if r.output_shape is not None else "-",
         f"{r.params:,}", format_bytes(r.activation_bytes),
         r.method + (f" (formula: {format_bytes(r.formula_bytes)})" if r.formula_bytes is not None else "")]
        for r in rows], align_left=3, left=(5,))
    return (f"{table}\ntotal activations ({device}): {format_bytes(sum(r.activation_bytes for r in rows))}; "
            f"params: {sum(p.numel() for p in model.parameters()):,}")
