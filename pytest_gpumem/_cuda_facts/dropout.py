"""Dropout on CUDA: the fused ``native_dropout`` kernel and its bool mask (aten/src/ATen/native/Dropout.cpp)."""
from __future__ import annotations

import torch

#: what the fused kernel saves for backward besides nothing else: a mask of this dtype, one element per input
MASK_DTYPE = torch.bool


def runs_fused(p: float, training: bool, inplace: bool, numel: int) -> bool:
    """Whether ``at::dropout`` takes the fused kernel on CUDA: training, 0 < p < 1, not in place, not empty
    (``is_fused_kernel_acceptable``; feature and alpha dropout are never fused)."""
    return training and not inplace and 0 < p < 1 and numel > 0


def mask_bytes(numel: int, itemsize: int, device: str) -> int:
    """Bytes dropout saves for ``numel`` elements: a bool mask on CUDA, the input-dtype noise on the CPU."""
    return numel * (MASK_DTYPE.itemsize if device == "cuda" else itemsize)
