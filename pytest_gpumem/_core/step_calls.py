"""How a training step calls the model and turns its output into a loss, shared by the runner and the estimate."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._compat import compiled_original


def model_loss(output: Any) -> torch.Tensor | None:
    """The loss a model computed itself: ``output.loss`` (Hugging Face ModelOutput) or ``output["loss"]``."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def default_loss(output: Any, target: Any) -> torch.Tensor:
    """The model's own loss when it returns one (``.loss`` / ``["loss"]``) and no target is given; else sum()
    of the output without a target, cross-entropy for integer targets, MSE for float ones."""
    if not isinstance(output, torch.Tensor):
        own = model_loss(output)
        if own is not None and target is None:
            return own
        why = "and a target was given" if own is not None else "without a 'loss' attribute or key"
        raise TypeError(
            f"the model returned {type(output).__name__}, not a tensor, {why}: pass loss_fn=... to say how to "
            "turn it into a scalar loss"
        )
    if target is None:
        return output.sum()
    if not target.is_floating_point():
        return nn.functional.cross_entropy(output, target)
    return nn.functional.mse_loss(output, target)


COMPILED_NOTE = ("torch.compile'd model measured as its eager graph: compiled (Inductor) kernels fuse ops and may "
                 "save fewer or other tensors, so the compiled model can use less than these figures")


def eager_model(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The module to measure for ``model``: the eager original of a ``torch.compile``d one, with a note."""
    original = compiled_original(model)
    return (model, None) if original is None else (original, COMPILED_NOTE)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """model(*inputs) for a tuple/list batch, model(**inputs) for a dict, model(inputs) otherwise."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)
