"""torchvision's CUDA ``nms`` kernel (torchvision/csrc/ops/cuda/nms_kernel.cu, ``nms_kernel``): what it allocates
on the device for ``n`` boxes, and how many indices it returns when all are kept (the emulation's upper bound)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: boxes per thread block: one bit per box in an unsigned 64-bit word (``threadsPerBlock``)
THREADS_PER_BLOCK = 64


@dataclass(frozen=True)
class DeviceBuffer:
    """One device allocation the kernel makes: its name in the source, shape, dtype (or the input whose dtype
    it takes: "scores" or "boxes"), and whether it is freed as soon as the next one is made (a dropped temporary)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str
    dropped: bool = False


def nms_buffers(n: int, kept: int) -> tuple[DeviceBuffer, ...]:
    """Device allocations of ``nms`` on ``n`` boxes keeping ``kept``, in the order the kernel makes them.

    ``scores.sort(0, descending)`` gives sorted values (dropped at once) and the int64 ``order_t``;
    ``dets.index_select(0, order_t)`` the sorted boxes; ``mask`` holds ``n * ceil(n / 64)`` int64 words
    (copied to the host, where the kept indices are chosen); the kept host indices go back to the device
    (``keep.to(device)``) and ``order_t.index(...)`` is the int64 result (``kept`` elements), made while all of
    these are alive; they are freed when the kernel returns. Empty input allocates nothing but
    an empty result. cub's sort scratch is not listed (its size is an implementation detail of cub).
    """
    if n == 0:
        return ()
    col_blocks = -(-n // THREADS_PER_BLOCK)
    return (
        DeviceBuffer("sorted scores", (n,), "scores", dropped=True),
        DeviceBuffer("order_t", (n,), torch.int64),
        DeviceBuffer("dets_sorted", (n, 4), "boxes"),
        DeviceBuffer("mask", (n * col_blocks,), torch.int64),
        DeviceBuffer("keep (on the device)", (kept,), torch.int64),
    )
