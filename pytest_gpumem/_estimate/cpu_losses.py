"""CPU losses whose reduced result keeps the unreduced buffer: the loss the step holds is that big on the CPU.

aten's CPU kernels of ``mse_loss``, ``smooth_l1_loss``, ``soft_margin_loss`` and ``binary_cross_entropy`` with
reduction "mean" or "sum" compute the elementwise loss into a buffer of the input's size and return the 0-d
result as a view of it (measured on torch 2.11 and 2.14: ``F.mse_loss`` of two 512 x 256 fp32 tensors is a
scalar on a 524,288-byte storage). ``l1_loss``, ``huber_loss``, ``kl_div`` and the BCE-with-logits return a
4-byte scalar. Meta's kernels return a 4-byte scalar for all: the trace widens the storage of those that do not.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .._compat import nn_loss_ops

#: the callables the torch-function mode sees for them: the F functions (autocast's list has them, so the mode
#: handles them whole) and the torch._C._nn ops they call
CPU_UNREDUCED_LOSSES = frozenset({F.mse_loss, F.smooth_l1_loss, F.soft_margin_loss, F.binary_cross_entropy,
                                  *nn_loss_ops()})


def keep_unreduced_buffer(out: Any, args: tuple, kwargs: dict) -> Any:
    """``out`` (the loss on meta) with its storage widened to the elementwise loss's size when it is reduced: the
    input and target broadcast together (an (8, 1) input against an (8, 8) target keeps 8 x 8 elements)."""
    bound = {**dict(zip(("input", "target"), args)), **kwargs}
    x, y = bound.get("input"), bound.get("target")
    if not (isinstance(out, torch.Tensor) and out.dim() == 0 and out.device.type == "meta"
            and isinstance(x, torch.Tensor)):
        return out
    shape = torch.broadcast_shapes(x.shape, y.shape) if isinstance(y, torch.Tensor) else x.shape
    elements = math.prod(shape)
    if elements > 1:
        out.untyped_storage().resize_(elements * out.element_size())
    return out
