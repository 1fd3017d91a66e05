"""Facts about CUDA's scaled_dot_product_attention kernels: which one runs, what it saves, what backward allocates.

Data and pure functions only (shapes and dtypes in, facts out; the mask helpers build the tensor the kernel is
given), so the emulated backend and the estimate read the same table. Sources, read for torch 2.11 (the GPU machine's release; cuDNN 9.19 in its cu130 wheels):
``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` (kernel choice), ``flash_attn/flash_api.cpp``
(``mha_fwd`` / ``mha_bwd``), ``mem_eff_attention`` (xformers' ``kernel_backward.h``) and cudnn-frontend's SDPA
backward node (its workspace). Unverified on a GPU so far: the cuDNN backend engine's own workspace beyond the
frontend's (not modelled), and the memory-efficient backward's workspace (its gradient-of-query accumulator).
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .._compat import TORCH_VERSION

FLASH, CUDNN, EFFICIENT, MATH = "flash", "cudnn", "efficient", "math"
KERNEL_NAMES = {FLASH: "flash attention", CUDNN: "cuDNN attention", EFFICIENT: "memory-efficient attention",
                MATH: "math (composite) attention"}
_LOW = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionCall:
    """What the kernel choice sees of one ``scaled_dot_product_attention`` call."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    qk_dim: int
    v_dim: int
    dtype: torch.dtype
    dims: int = 4                 #: q.dim(); fused kernels need 4-d dense inputs
    same_dtype: bool = True       #: q, k, v of one dtype
    has_mask: bool = False
    dropout: float = 0.0
    is_causal: bool = False
    enable_gqa: bool = False
    requires_grad: bool = True
    last_dim_contiguous: bool = True

    @property
    def grouped(self) -> bool:
        return self.q_heads != self.kv_heads


@dataclass(frozen=True)
class GpuProfile:
    """The target GPU and library versions the choice depends on."""

    sm: tuple[int, int] = (9, 0)          #: H100 / H200
    torch: tuple[int, int] = (2, 11)
    cudnn: int = 91900                    #: cuDNN 9.19.0 (torch 2.11 cu130 wheels)

    def prefers_cudnn(self) -> bool:
        """sdp_utils.cpp check_prefer_cudnn_attention: sm90/sm10x, torch >= 2.9, cuDNN > 9.15."""
        return self.torch >= (2, 9) and self.sm[0] in (9, 10) and self.cudnn > 91500


#: the target GPU: an H100/H200 (sm90) running this process's torch release with its cuDNN, unless
#: ``target_gpu`` names another for a block (the emulation and the estimate both read it at each call)
TARGET = GpuProfile(sm=(9, 0), torch=TORCH_VERSION)


@contextlib.contextmanager
def target_gpu(profile: GpuProfile) -> Iterator[None]:
    """Choose kernels as on ``profile`` inside the block (--gpumem-device, gpu_budget(device=...))."""
    global TARGET
    saved, TARGET = TARGET, profile
    try:
        yield
    finally:
        TARGET = saved


@dataclass(frozen=True)
class Enabled:
    """The user's switches: torch.backends.cuda.*_sdp_enabled() (set by sdpa_kernel) and determinism."""

    flash: bool = True
    cudnn: bool = True
    efficient: bool = True
    math: bool = True
    deterministic: bool = False


@dataclass(frozen=True)
class Buffer:
    """One tensor a kernel allocates: what it is for, its shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Choice:
    """The kernel CUDA runs for a call, and why each kernel before it in the priority order was passed over."""

    kernel: str
    passed_over: dict[str, str] = field(default_factory=dict)

    def describe(self, call: AttentionCall) -> str:
        heads = f"{call.q_heads} heads" if not call.grouped else f"{call.q_heads} query / {call.kv_heads} key-value heads"
        shape = (f"{str(call.dtype).replace('torch.', '')}, batch {call.batch}, {heads}, length {call.q_len}"
                 f"{'' if call.kv_len == call.q_len else f'x{call.kv_len}'}, head dim {call.qk_dim}")
        why = "; ".join(f"not {KERNEL_NAMES[k]}: {r}" for k, r in self.passed_over.items())
        return f"attention assumed on {KERNEL_NAMES[self.kernel]} ({shape})" + (f" [{why}]" if why else "")


def _round(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def priority(profile: GpuProfile) -> tuple[str, ...]:
    """sdp_utils.cpp priority_order: cuDNN first where preferred, else flash, memory-efficient, math."""
    return (CUDNN, FLASH, EFFICIENT, MATH) if profile.prefers_cudnn() else (FLASH, EFFICIENT, MATH)


def _common(call: AttentionCall) -> str | None:
    if call.dims != 4:
        return "inputs are not 4-d"
    if not call.same_dtype:
        return "q, k and v differ in dtype"
    if not call.last_dim_contiguous:
        return "the last dimension is not contiguous"
    if min(call.q_len, call.kv_len, call.batch, call.q_heads) == 0:
        return "an empty dimension"
    if call.grouped and (call.kv_heads == 0 or call.q_heads % call.kv_heads or not call.enable_gqa):
        return "query heads differ from key/value heads without enable_gqa=True"
    return None


def why_not_flash(call: AttentionCall, profile: GpuProfile) -> str | None:
    """can_use_flash_attention: fp16/bf16, no mask, equal head dims <= 256, square when causal; GQA accepted."""
    if call.dtype not in _LOW:
        return f"{call.dtype} is not fp16/bf16"
    if call.has_mask:
        return "an explicit attn_mask"
    if not call.qk_dim == call.v_dim <= 256:
        return "head dims differ or exceed 256"
    if call.is_causal and call.q_len != call.kv_len:
        return "causal with query length != key length"
    if not (8, 0) <= profile.sm <= (12, 1):
        return f"sm{profile.sm[0]}{profile.sm[1]} outside sm80..sm121"
    return _common(call)


def why_not_cudnn(call: AttentionCall, profile: GpuProfile, enabled: Enabled) -> str | None:
    """can_use_cudnn_attention: fp16/bf16, head dims <= 128 and multiples of 8, dropout a multiple of 1/16,
    not deterministic, key length != 1; masks and GQA accepted."""
    if call.dtype not in _LOW:
        return f"{call.dtype} is not fp16/bf16"
    if enabled.deterministic:
        return "deterministic algorithms are on"
    if call.dropout * 16 != int(call.dropout * 16):
        return f"dropout {call.dropout} is not a multiple of 1/16"
    if max(call.qk_dim, call.v_dim) > 128 or call.qk_dim % 8 or call.v_dim % 8:
        return "head dims above 128 or not multiples of 8"
    if call.kv_len == 1:
        return "key length 1"
    if max(call.batch, call.q_heads) > 65535:
        return "batch or heads above 65535"
    if not (8, 0) <= profile.sm <= (12, 1):
        return f"sm{profile.sm[0]}{profile.sm[1]} outside sm80..sm121"
    return _common(call)


def why_not_efficient(call: AttentionCall, profile: GpuProfile) -> str | None:
    """can_use_mem_efficient_attention: fp16/bf16/fp32, equal q/k head dims aligned to 8 (half) or 4 (fp32),
    and no GQA in torch 2.11 (native GQA came later, pytorch PR #191085, July 2026)."""
    if call.dtype not in (*_LOW, torch.float32):
        return f"{call.dtype} is not fp16/bf16/fp32"
    align = 8 if call.dtype in _LOW else 4
    if call.qk_dim % align or call.v_dim % align:
        return f"head dims not multiples of {align}"
    if call.grouped:
        return "grouped-query shapes (no GQA on this kernel in torch 2.11)"
    return _common(call)


def choose(call: AttentionCall, profile: GpuProfile = GpuProfile(), enabled: Enabled = Enabled()) -> Choice:
    """The kernel select_sdp_backend returns for ``call``: the first in priority order that is enabled and fits."""
    passed: dict[str, str] = {}
    for kernel in priority(profile):
        if kernel == MATH:
            return Choice(MATH, passed)
        if not getattr(enabled, kernel):
            passed[kernel] = "disabled"
            continue
        reason = {FLASH: lambda: why_not_flash(call, profile), CUDNN: lambda: why_not_cudnn(call, profile, enabled),
                  EFFICIENT: lambda: why_not_efficient(call, profile)}[kernel]()
        if reason is None:
            return Choice(kernel, passed)
        passed[kernel] = reason
    return Choice(MATH, passed)


def forward_saves(call: AttentionCall, kernel: str) -> list[Buffer]:
    """What a fused kernel's forward allocates besides its output, and autograd keeps with q, k, v and out."""
    b, h, lq = call.batch, call.q_heads, call.q_len
    if kernel == FLASH:  # mha_fwd: softmax_lse (B, H, Lq) fp32, rng_state uint64[2], an unused uint64 scalar
        return [Buffer("logsumexp", (b, h, lq), torch.float32), Buffer("rng_state", (2,), torch.uint64),
                Buffer("unused", (), torch.uint64)]
    if kernel == CUDNN:  # softmax stats (B, H, Lq, 1) fp32; philox seed and offset as int64 scalars
        return [Buffer("logsumexp", (b, h, lq, 1), torch.float32), Buffer("philox_seed", (), torch.int64),
                Buffer("philox_offset", (), torch.int64)]
    if kernel == EFFICIENT:  # logsumexp padded to 32 rows when grad is needed
        rows = _round(lq, 32) if call.requires_grad else 0
        return [Buffer("logsumexp", (b, h, rows), torch.float32), Buffer("philox_seed", (), torch.int64),
                Buffer("philox_offset", (), torch.int64)]
    return []


def backward_scratch(call: AttentionCall, kernel: str, enabled: Enabled = Enabled()) -> list[Buffer]:
    """What a fused kernel's backward allocates besides dq, dk, dv, and frees before it returns."""
    b, h, lq, lk, d = call.batch, call.q_heads, call.q_len, call.kv_len, call.qk_dim
    if kernel == FLASH:
        # mha_bwd: softmax_d (B, H, round128(Lq)) fp32; dq_accum (B, round128(Lq), H, round(d, 32 or 64)) fp32
        # (deterministic: nsplits copies, not modelled); GQA: dk/dv at full query heads, summed into dk/dv after
        d_rounded = _round(d, 32 if d <= 128 else 64)
        scratch = [Buffer("softmax_d", (b, h, _round(lq, 128)), torch.float32),
                   Buffer("dq_accum", (b, _round(lq, 128), h, d_rounded), torch.float32)]
        if call.grouped:
            scratch += [Buffer("dk_expanded", (b, lk, h, d), call.dtype),
                        Buffer("dv_expanded", (b, lk, h, call.v_dim), call.dtype)]
        return scratch
    if kernel == CUDNN:
        # cudnn-frontend SDPA backward (cuDNN >= 9): dQ accumulator (B, H, Lq, d) fp32 and softmax sum (B, H, Lq)
        # fp32 in the graph workspace; GQA's full-head dK/dV are virtual there (the engine's own is not modelled)
        return [Buffer("dq_accum", (b, h, lq, d), torch.float32),
                Buffer("softmax_sum", (b, h, lq), torch.float32)]
    if kernel == EFFICIENT:
        # attention_backward.cu: delta (B, H, Lq) fp32; xformers' kernel accumulates grad_q in fp32 when the
        # output is fp16/bf16 (kNeedsAccumGradQ) in a workspace of (B, H, Lq, d) floats
        scratch = [Buffer("delta", (b, h, lq), torch.float32)]
        if call.dtype in _LOW:
            scratch.append(Buffer("grad_q_accum", (b, h, lq, d), torch.float32))
        return scratch
    return []


def describe_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, dropout_p: float,
                  is_causal: bool, enable_gqa: bool) -> AttentionCall:
    """What the kernel choice sees of one call (3-d and other unusual inputs are described as such)."""
    four = q.dim() == k.dim() == v.dim() == 4
    return AttentionCall(
        batch=q.size(0) if four else 0, q_heads=q.size(1) if four else 0, kv_heads=k.size(1) if four else 0,
        q_len=q.size(-2), kv_len=k.size(-2), qk_dim=q.size(-1), v_dim=v.size(-1), dtype=q.dtype,
        dims=q.dim() if q.dim() == k.dim() == v.dim() else -1, same_dtype=q.dtype == k.dtype == v.dtype,
        has_mask=mask is not None, dropout=float(dropout_p), is_causal=bool(is_causal),
        enable_gqa=bool(enable_gqa), requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        last_dim_contiguous=all(t.stride(-1) == 1 for t in (q, k, v)))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask.logical_not(), float("-inf"))


def efficient_bias(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The memory-efficient kernel's bias (sdp_utils preprocess_mask): a bool mask becomes an additive one of the
    query's dtype, its last dim padded to a multiple of 16 and sliced back, expanded to (B, H, Lq, Lk)."""
    if mask is None:
        return None
    if mask.dtype is torch.bool:
        mask = _additive(mask, q.dtype)
    last = mask.size(-1)
    if last % 16:
        mask = F.pad(mask, (0, 16 - last % 16))[..., :last]
    return mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))


def cudnn_bias(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """The cuDNN kernel's bias: a bool mask becomes an additive one of the query's dtype (not padded)."""
    if mask is None or mask.dtype is not torch.bool:
        return mask
    return _additive(mask, q.dtype)
