"""CPU losses whose reduced result keeps the unreduced buffer: the loss the step holds is that big on the CPU.

aten's CPU kernels of ``mse_loss``, ``smooth_l1_loss``, ``soft_margin_loss`` and ``binary_cross_entropy`` with
reduction "mean" or "sum" compute the elementwise loss into a buffer of the input's size and return the 0-d
result as a view of it (measured on torch 2.11 and 2.14: ``F.mse_loss`` of two 512 x 256 fp32 tensors is a
scalar on a 524,288-byte storage). ``l1_loss``, ``huber_loss``, ``kl_div`` and the BCE-with-logits return a
4-byte scalar. Meta's kernels return a 4-byte scalar for all: the trace widens the storage of those that do not.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: the callables the torch-function mode sees for them: the F functions (autocast's list has them, so the mode
#: handles them whole) and the torch._C._nn ops they call
CPU_UNREDUCED_LOSSES = frozenset({F.mse_loss, F.smooth_l1_loss, F.soft_margin_loss, F.binary_cross_entropy,
                                  torch._C._nn.mse_loss, torch._C._nn.smooth_l1_loss, torch._C._nn.soft_margin_loss,
                                  torch._C._nn.binary_cross_entropy})


def keep_unreduced_buffer(out: Any, args: tuple) -> Any:
    """``out`` (the loss on meta) with its storage widened to the input's elements when it is reduced."""
    x = args[0] if args else None
    if (isinstance(out, torch.Tensor) and out.dim() == 0 and out.device.type == "meta" and isinstance(x, torch.Tensor)
            and x.numel() > 1):
        out.untyped_storage().resize_(x.numel() * out.element_size())
    return out
