"""What CUDA libraries allocate through the caching allocator beside the step's tensors, on meta.

cuBLAS and cuBLASLt workspaces (facts: ``_cuda_facts/workspaces.py``): one of each per thread, allocated
on that thread's first cuBLAS (cuBLASLt) call and kept; the forward runs on the calling thread, backward
on autograd's device thread (on meta both run here, so ``running_backward()`` tells them apart). Each is a
named part of ``other``. What has no exact figure yet becomes a note saying the prediction leaves it out.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from .._compat import running_backward
from .._core.units import format_bytes
from .._cuda_facts import workspaces as facts

MAIN, AUTOGRAD = "main thread", "autograd thread"
_LT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CONVOLUTIONS = frozenset({"convolution", "convolution_backward", "_convolution", "cudnn_convolution",
                           "conv_depthwise2d", "_conv_depthwise2d"})
_BATCH_NORMS = frozenset({"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                          "cudnn_batch_norm"})

NOTE_CONVOLUTION = ("cuDNN convolution workspaces are not included: cuDNN allocates one per convolution call "
                    "(its size depends on the engine cuDNN picks and on free memory) and no recorded table exists yet")
NOTE_BATCH_NORM = ("cuDNN batch norm's reserve buffer (fp32/fp16 inputs; kept for backward) is not included: its "
                   "size comes from cuDNN at run time")
NOTE_EMBEDDING = ("embedding backward's sort buffers on CUDA (sorted indices and per-segment partial gradients, "
                  "freed when it returns) are not included")
NOTE_NO_DEVICE = ("cuBLAS/cuBLASLt workspaces are not included (no GPU named; 8.125 MiB before Hopper, 32 MiB on "
                  "Hopper, per thread that runs matmuls): name one with --gpumem-device or gpu_budget(device=...)")

#: every note this module writes (tests about other notes filter these out)
LIBRARY_NOTES = (NOTE_CONVOLUTION, NOTE_BATCH_NORM, NOTE_EMBEDDING, NOTE_NO_DEVICE)


def _name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", None)
    return getattr(packet, "__name__", "") or str(func)


class LibraryAllocations:
    """The tracker's ``after_op``: adds each thread's cuBLAS/cuBLASLt workspace at its first call and notes
    what the prediction leaves out. ``profile`` None: no GPU named, so no workspace sizes (a note says so)."""

    def __init__(self, profile: Any = None, env: Mapping[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        self.cublas = profile.cublas_workspace(env) if profile is not None else None
        self.cublaslt = profile.cublaslt_workspace(env) if profile is not None else None
        self.env = env
        self._done: set[tuple[str, str]] = set()
        self.notes: dict[str, None] = {}
        self._names: dict[Any, str] = {}  # op -> its name (called after every op: look each up once)

    def __call__(self, tracker: Any, func: Any, args: tuple, kwargs: dict) -> None:
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = _name(func)
        if name in facts.CUBLAS_OPS:
            thread = AUTOGRAD if running_backward() else MAIN
            self._workspace(tracker, "cuBLAS", thread, self.cublas)
            if _takes_lt(name, args, kwargs, self.env):
                self._workspace(tracker, "cuBLASLt", thread, self.cublaslt)
        elif name in _CONVOLUTIONS:
            self.notes[NOTE_CONVOLUTION] = None
        elif name in _BATCH_NORMS and _cudnn_batch_norm_dtype(args):
            self.notes[NOTE_BATCH_NORM] = None
        elif name == "embedding_dense_backward":
            self.notes[NOTE_EMBEDDING] = None

    def _workspace(self, tracker: Any, library: str, thread: str, size: int | None) -> None:
        if (library, thread) in self._done:
            return
        self._done.add((library, thread))
        if size is None:
            self.notes[NOTE_NO_DEVICE] = None
        elif size > 0:
            tracker.library_allocation(f"{library} workspace ({thread})", size)

    def describe(self) -> str | None:
        """One line naming the workspace sizes assumed (None without a GPU)."""
        if self.cublas is None:
            return None
        return (f"cuBLAS workspace {format_bytes(self.cublas)} and cuBLASLt workspace {format_bytes(self.cublaslt)} "
                f"per thread that runs matmuls (torch's defaults for this GPU, or CUBLAS_WORKSPACE_CONFIG / "
                "CUBLASLT_WORKSPACE_SIZE)")


def _takes_lt(name: str, args: tuple, kwargs: dict, env: Mapping[str, str]) -> bool:
    if name not in facts.CUBLASLT_OPS or len(args) < 3:
        return False
    bias, mat1, mat2 = args[0], args[1], args[2]
    beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
    return facts.takes_cublaslt(name, tuple(bias.shape), bias.is_contiguous(), float(beta), tuple(mat1.shape),
                                tuple(mat2.shape), mat1.dtype in _LT_DTYPES, env)


def _cudnn_batch_norm_dtype(args: tuple) -> bool:
    """In training, on fp32 or fp16 inputs (not bf16: Normalization.cpp's use_cudnn), cuDNN keeps a reserve."""
    training = any(a is True for a in args[3:6])
    return training and isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.float32, torch.float16)
