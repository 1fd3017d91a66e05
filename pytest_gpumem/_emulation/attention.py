"""scaled_dot_product_attention on meta as an sm80+ GPU runs it: flash or memory-efficient kernels."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .._compat import cuda_efficient_attention, cuda_flash_attention
from .substitutions import Proceed, Substitution, _arg, _on_meta, _register


def _cuda_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> str:
    """The SDPA kernel an sm80+ GPU picks: flash, else memory-efficient, else math (cuDNN not modelled)."""
    qk_dim, v_dim = q.size(-1), v.size(-1)
    if not (q.dim() == k.dim() == v.dim() == 4 and k.size(-1) == qk_dim and q.size(1) == k.size(1) == v.size(1)
            and q.dtype == k.dtype == v.dtype):
        return "math"  # GQA, 3-d inputs, mixed dtypes: not modelled, leave meta's path
    low_precision = q.dtype in (torch.float16, torch.bfloat16)
    if low_precision and mask is None and v_dim == qk_dim <= 256 and qk_dim % 8 == 0:
        return "flash"
    align = 8 if low_precision else 4  # memory-efficient kernel's alignment of the head dims
    if (low_precision or q.dtype is torch.float32) and qk_dim % align == 0 and v_dim % align == 0:
        return "efficient"
    return "math"


def _attention_bias(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """CUDA's preprocess_mask: bool -> additive float mask, last dim padded to 16, expanded to (B, H, L, S)."""
    if mask is None:
        return None
    if mask.dtype is torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill(mask.logical_not(), float("-inf"))
    last = mask.size(-1)
    if last % 16:
        mask = F.pad(mask, (0, 16 - last % 16))[..., :last]
    return mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))


def _efficient_attention(func: Callable, args: tuple, kwargs: dict, proceed: Proceed) -> Any:
    """Run the flash / memory-efficient aten op CUDA would pick, so its saved tensors are recorded."""
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = _arg(args, kwargs, 3, "attn_mask")
    dropout_p, is_causal = _arg(args, kwargs, 4, "dropout_p", 0.0), _arg(args, kwargs, 5, "is_causal", False)
    scale = kwargs.get("scale")
    if not all(map(_on_meta, (q, k, v))) or kwargs.get("enable_gqa") or len(args) > 6:
        return proceed(args, kwargs)
    kernel = _cuda_attention_kernel(q, k, v, mask)
    if kernel == "flash":
        return cuda_flash_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if kernel == "efficient":
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return cuda_efficient_attention(q, k, v, _attention_bias(mask, q, k), compute_log_sumexp=needs_lse,
                                        dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return proceed(args, kwargs)


_register(Substitution(
    "sdpa",
    "scaled_dot_product_attention on CUDA (sm80+) runs flash or memory-efficient kernels that save output + "
    "logsumexp (+ rng state), not the B*H*L*S attention matrix the meta math path saves (torch 2.4-2.14).",
    intercepts=frozenset({F.scaled_dot_product_attention}),
    run=_efficient_attention,
))
