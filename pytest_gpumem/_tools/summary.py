"""Per-layer summary table in torchinfo's spirit, but for training: bytes each call saves for backward."""
from __future__ import annotations

from typing import Any

from torch import nn

from .._estimate import LayerEstimate, estimate_step
from .._core.units import format_bytes


def layer_rows(model: nn.Module, batch: Any, *, target: Any = None, loss_fn=None, device: str = "cuda",
               hook: Any = None) -> tuple[LayerEstimate, ...]:
    """The per-call LayerEstimates of one forward (a module called twice appears twice)."""
    return estimate_step(model, None, batch, target=target, loss_fn=loss_fn, device=device, steps=1, hook=hook).layers


def summary(model: nn.Module, batch: Any, *, target: Any = None, loss_fn=None, device: str = "cuda",
            hook: Any = None) -> str:
    """A text table: layer (indented by depth), type, output shape, params, activation bytes, formula/traced."""
    rows = layer_rows(model, batch, target=target, loss_fn=loss_fn, device=device, hook=hook)
    header = f"{'layer':<36}{'type':<24}{'output shape':<22}{'params':>12}{'activations':>14}  method"
    lines = [header, "-" * len(header)]
    for r in rows:
        name = "  " * r.depth + r.name
        shape = "x".join(map(str, r.output_shape)) if r.output_shape is not None else "-"
        lines.append(f"{name[:35]:<36}{r.type[:23]:<24}{shape[:21]:<22}{r.params:>12,}"
                     f"{format_bytes(r.activation_bytes):>14}  {r.method}")
    lines.append("-" * len(header))
    lines.append(f"total activations ({device}): {format_bytes(sum(r.activation_bytes for r in rows))}; "
                 f"params: {sum(p.numel() for p in model.parameters()):,}")
    return "\n".join(lines)
