"""Per-layer activation formulas: what a module saves for backward, as a pure function of shapes and dtypes.

A formula gets the module, its input tensors, its output and the target device ("cuda" or "cpu") and
returns the saved items: a *tensor* it saves as is (an input or the output, so the estimate can
dedup by storage: a ReLU output saved by the ReLU and by the next Linear counts once, a parameter
counts as params, the batch as batch) or an *int* of bytes for a tensor it creates to save
(BatchNorm statistics, dropout masks, max-pool indices). Only the meta tensors' shapes, dtypes and
``requires_grad`` flags are read; no kernel runs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Union

import torch
from torch import nn

from .._cuda_facts.dropout import mask_bytes

SavedItem = Union[torch.Tensor, int]
Formula = Callable[[nn.Module, "tuple[Any, ...]", Any, str], "tuple[SavedItem, ...]"]

#: Formulas keyed by module class (exact class first, then along the MRO).
ACTIVATION_FORMULAS: dict[type, Formula] = {}


def activation_formula(*types: type) -> Callable[[Formula], Formula]:
    """Register the decorated formula for ``types``; a second registration for a type is an error."""

    def register(fn: Formula) -> Formula:
        for t in types:
            if t in ACTIVATION_FORMULAS:
                raise ValueError(f"an activation formula for {t.__name__} is already registered")
            ACTIVATION_FORMULAS[t] = fn
        return fn

    return register


#: Layers whose op autocast runs in the low-precision dtype: under autocast they save cast copies (the
#: input's, and the weight's from autocast's cache) whose storages only the trace knows, so they are traced.
AUTOCAST_TRACED: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def formula_for(module: nn.Module, *, autocast: bool = False) -> Formula | None:
    """The formula registered for ``module``'s class or its nearest registered base class (None under
    ``autocast`` for the layers of :data:`AUTOCAST_TRACED`)."""
    if autocast and isinstance(module, AUTOCAST_TRACED):
        return None
    for cls in type(module).__mro__:
        if cls in ACTIVATION_FORMULAS:
            return ACTIVATION_FORMULAS[cls]
    return None


def _first(inputs: tuple[Any, ...]) -> torch.Tensor:
    return inputs[0]


def _acc_itemsize(dtype: torch.dtype) -> int:
    """Statistics of normalisation layers are kept in float32 for half/bfloat16 inputs (the accumulate type)."""
    return 4 if dtype in (torch.float16, torch.bfloat16) else dtype.itemsize


def _weight_needs_grad(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and weight.requires_grad


@activation_formula(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
def linear_or_conv(module: nn.Module, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """y = x W^T + b / conv(x, W): dW needs x, dx needs W -> saves x if W requires grad (+ W, a parameter)."""
    x = _first(inputs)
    saved: tuple[SavedItem, ...] = (x,) if _weight_needs_grad(module) else ()
    return saved + ((module.weight,) if x.requires_grad else ())


def _bn_like(module: nn.Module, x: torch.Tensor, groups: int) -> tuple[SavedItem, ...]:
    """Normalisation: saves x and two statistics (mean, inverse std) of ``groups`` elements each: two
    tensors, so two allocator blocks on CUDA (one item of both made a tiny transformer 2 blocks per layer short)."""
    if not (x.requires_grad or _weight_needs_grad(module)):
        return ()
    stat = groups * _acc_itemsize(x.dtype)
    return (x, stat, stat)


@activation_formula(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(module: nn.BatchNorm2d, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """Training BN: x + save_mean + save_invstd, C elements each: 2*C*4 B (fp32)."""
    x = _first(inputs)
    batch_stats = module.training or module.running_mean is None
    return _bn_like(module, x, x.shape[1] if batch_stats else 0)


@activation_formula(nn.LayerNorm)
def layer_norm(module: nn.LayerNorm, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """LayerNorm: x + mean + rstd, one each per normalised row: 2 * numel/prod(normalized_shape) * 4 B."""
    x = _first(inputs)
    rows = x.numel() // max(1, math.prod(module.normalized_shape))
    return _bn_like(module, x, rows)


@activation_formula(nn.GroupNorm)
def group_norm(module: nn.GroupNorm, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """GroupNorm: x + mean + rstd of N*G elements each: 2*N*G*4 B."""
    x = _first(inputs)
    return _bn_like(module, x, x.shape[0] * module.num_groups)


def _if_grad(x: torch.Tensor, *items: SavedItem) -> tuple[SavedItem, ...]:
    return items if x.requires_grad else ()


@activation_formula(nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.LogSoftmax)
def saves_output(module: nn.Module, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """relu/tanh/sigmoid/softmax: the gradient is a function of y -> saves y (in place: y is x's storage)."""
    return _if_grad(_first(inputs), output)


@activation_formula(nn.GELU, nn.SiLU, nn.LeakyReLU)
def saves_input(module: nn.Module, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """gelu/silu/leaky_relu: the gradient is a function of x -> saves x."""
    return _if_grad(_first(inputs), _first(inputs))


@activation_formula(nn.Dropout)
def dropout(module: nn.Dropout, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """Dropout in training: CUDA saves a bool mask (numel * 1 B); the CPU path saves the float noise
    it multiplies by (numel * itemsize B). Eval or p == 0: nothing."""
    x = _first(inputs)
    if not module.training or module.p == 0 or not x.requires_grad:
        return ()
    return (mask_bytes(x.numel(), x.dtype.itemsize, device),)


@activation_formula(nn.MaxPool2d, nn.MaxPool3d)
def max_pool(module: nn.Module, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """max_pool_with_indices: saves x and the int64 argmax indices (output numel * 8 B)."""
    x = _first(inputs)
    return _if_grad(x, x, output.numel() * torch.int64.itemsize)


@activation_formula(nn.AvgPool2d, nn.AvgPool3d)
def avg_pool(module: nn.Module, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """avg_pool: the backward kernel takes x (for its shape and padding) -> saves x."""
    x = _first(inputs)
    return _if_grad(x, x)


@activation_formula(nn.Embedding)
def embedding(module: nn.Embedding, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """Embedding: saves the int64 indices (usually the batch itself, so 0 B of activations)."""
    return (_first(inputs),) if module.weight.requires_grad else ()


@activation_formula(nn.Flatten, nn.Unflatten, nn.Identity)
def no_save(module: nn.Module, inputs, output, device: str) -> tuple[SavedItem, ...]:
    """Views and identity: nothing saved."""
    return ()
