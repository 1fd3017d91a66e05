"""How a training step calls the model and turns its output into a loss, shared by the runner and the estimate."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def default_loss(output: Any, target: Any) -> torch.Tensor:
    """sum() of the output without a target; cross-entropy for integer targets; MSE for float ones."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the model returned {type(output).__name__}, not a tensor: pass loss_fn=... to say how to "
            "turn it into a scalar loss"
        )
    if target is None:
        return output.sum()
    if not target.is_floating_point():
        return nn.functional.cross_entropy(output, target)
    return nn.functional.mse_loss(output, target)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """model(*inputs) for a tuple/list batch, model(**inputs) for a dict, model(inputs) otherwise."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)
