"""cuBLAS and cuBLASLt workspaces: how big, when torch allocates them, and through which allocator.

Source: ``aten/src/ATen/cuda/CublasHandlePool.cpp`` and ``aten/src/ATen/native/cuda/Blas.cpp`` read at
pytorch commit 26a39059 (a 2.9+ snapshot; it uses ``float32Precision``). The installed 2.11.0 and 2.14.1
wheels carry the same environment variables (``CUBLAS_WORKSPACE_CONFIG``, ``CUBLASLT_WORKSPACE_SIZE``,
``TORCH_CUBLASLT_UNIFIED_WORKSPACE`` are strings in their ``libtorch_cuda.so``) and not the later
``TORCH_CUBLAS_WORKSPACE_CACHE`` switch, whose release allocates a workspace per call instead.
- The workspace is ``CUDACachingAllocator::get()->allocate(size)``: counted by ``memory_allocated`` and
  ``max_memory_allocated``, kept in a map keyed by (handle, stream) until ``clearCublasWorkspaces``.
- Handles are per thread (``DeviceThreadHandlePool``): the thread running the forward and autograd's
  device thread (backward) each get one, so each gets its own workspace on its first cuBLAS call.
- ``getCurrentCUDABlasHandle`` allocates the cuBLAS workspace; a cuBLASLt call (``addmm`` with a 1-D
  bias, ``gemm_and_bias``) also takes the cuBLAS handle, then allocates the cuBLASLt workspace.
- Sizes: ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE:COUNT`` pairs, SIZE in KiB, summed) else 32 MiB on
  compute capability 9.x (``4096 * 8 * 1024``) and ``:4096:2:16:8`` = 8,519,680 B on older GPUs.
  Blackwell (10.x/12.x) moved between releases (sm90 only, then 9/10/12, then 9-12): no default here.
  cuBLASLt: ``CUBLASLT_WORKSPACE_SIZE`` KiB, default 1024 KiB, capped at the cuBLAS size; with
  ``TORCH_CUBLASLT_UNIFIED_WORKSPACE=1`` cuBLASLt uses the cuBLAS workspace and allocates none.
"""
from __future__ import annotations

import re
from typing import Mapping

KIB, MIB = 1024, 1 << 20
#: the default on compute capability 9.x (Hopper): 4096 * 8 * 1024 B
HOPPER_CUBLAS_WORKSPACE = 4096 * 8 * 1024
#: the default before Hopper, ``:4096:2:16:8``: 2 x 4096 KiB + 8 x 16 KiB
PRE_HOPPER_CUBLAS_WORKSPACE = 4096 * 1024 * 2 + 16 * 1024 * 8
#: CUBLASLT_WORKSPACE_SIZE's default, 1024 KiB
DEFAULT_CUBLASLT_WORKSPACE = 1024 * KIB
_PAIR = re.compile(r":([0-9]+):([0-9]+)")
_TRUE = ("1", "true", "yes", "on", "y")

#: aten ops that run cuBLAS on CUDA (so take the thread's handle and its workspace)
CUBLAS_OPS: frozenset[str] = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_addmm_activation",
})
#: op whose 1-D bias can take the cuBLASLt path (``gemm_and_bias``)
CUBLASLT_OPS: frozenset[str] = frozenset({"addmm", "_addmm_activation"})


def default_cublas_workspace(sm: tuple[int, int]) -> int | None:
    """Bytes of the default cuBLAS workspace on compute capability ``sm`` (None: not settled across releases)."""
    if sm[0] == 9:
        return HOPPER_CUBLAS_WORKSPACE
    if sm[0] < 9:
        return PRE_HOPPER_CUBLAS_WORKSPACE
    return None


def parse_workspace_config(value: str) -> int | None:
    """Bytes of a ``CUBLAS_WORKSPACE_CONFIG`` value (':4096:8' -> 32 MiB); None when torch cannot parse it
    (it then warns and keeps the default)."""
    pairs = _PAIR.findall(value)
    if not pairs:
        return None
    return sum(int(size) * KIB * int(count) for size, count in pairs)


def cublas_workspace(sm: tuple[int, int], env: Mapping[str, str]) -> int | None:
    """The cuBLAS workspace torch allocates per (handle, stream) on ``sm`` under the environment ``env``."""
    value = env.get("CUBLAS_WORKSPACE_CONFIG")
    parsed = parse_workspace_config(value) if value is not None else None
    return parsed if parsed is not None else default_cublas_workspace(sm)


def cublaslt_workspace(cublas_bytes: int, env: Mapping[str, str]) -> int:
    """The separate cuBLASLt workspace per (handle, stream): 0 when unified with the cuBLAS one."""
    if env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "").strip().lower() in _TRUE:
        return 0
    size = DEFAULT_CUBLASLT_WORKSPACE
    raw = env.get("CUBLASLT_WORKSPACE_SIZE")
    if raw is not None:
        try:
            size = int(raw.strip()) * KIB   # std::stoi: an invalid value keeps the default (torch warns)
        except ValueError:
            pass
    return min(size, cublas_bytes)


def takes_cublaslt(op: str, bias_shape: tuple[int, ...], bias_contiguous: bool, beta: float,
                   mat1_shape: tuple[int, ...], mat2_shape: tuple[int, ...], dtype_ok: bool,
                   env: Mapping[str, str]) -> bool:
    """Blas.cpp isInputCompliesAddmmCudaLt for a contiguous 2-D result: beta 1, a bias that is 1-D (or
    squeezes to 1-D) of mat2's columns, fp32/fp64/fp16/bf16, every matrix dimension > 1; and
    ``DISABLE_ADDMM_CUDA_LT`` unset."""
    if op not in CUBLASLT_OPS or env.get("DISABLE_ADDMM_CUDA_LT") == "1":
        return False
    squeezed = [s for s in bias_shape if s != 1]
    bias_1d = len(bias_shape) == 1 or len(squeezed) == 1
    return (beta == 1 and dtype_ok and bias_contiguous and bias_1d and len(bias_shape) >= 1
            and bias_shape[-1] == mat2_shape[-1] and min(*mat1_shape, *mat2_shape) > 1)
