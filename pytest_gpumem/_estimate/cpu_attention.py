"""CPU attention on meta: make scaled_dot_product_attention save what the CPU's flash kernel saves."""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from .._compat import cpu_flash_attention, without_torch_function_checks


class _CpuAttention(TorchFunctionMode):
    """Make F.scaled_dot_product_attention on meta save what the CPU saves: its flash kernel's output and
    logsumexp (B, H, L), not the math path's B*H*L*S probabilities (torch >= 2.3 picks flash on the CPU
    for 4-d floating q/k/v of one dtype, equal head dims and no dropout; checked against backend="cpu")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            bound = {**dict(zip(names, args)), **kwargs}
            q, k, v = bound["query"], bound["key"], bound["value"]
            fits = (q.device.type == "meta" and q.dim() == k.dim() == v.dim() == 4 and q.is_floating_point()
                    and q.dtype == k.dtype == v.dtype and q.size(-1) == k.size(-1) == v.size(-1)
                    and k.size(1) == v.size(1) and _heads_fit(q, k, bool(bound.get("enable_gqa", False)))
                    and not bound.get("dropout_p", 0.0) and len(args) <= 6)
            if fits:
                return cpu_flash_attention(q, k, v, is_causal=bool(bound.get("is_causal", False)),
                                           attn_mask=bound.get("attn_mask"), scale=bound.get("scale"))
        if func is torch.nn.functional.multi_head_attention_forward:
            # the mode is off while it handles a call, so the sdpa inside nn.MultiheadAttention would go unseen
            # (and keep the L x L math path): run a copy without its own torch-function check, mode on
            with self:
                return without_torch_function_checks(func)(*args, **kwargs)
        return func(*args, **kwargs)



def _heads_fit(q: torch.Tensor, k: torch.Tensor, enable_gqa: bool) -> bool:
    """Equal head counts, or grouped-query attention: the CPU flash kernel takes k/v with fewer heads as they
    are, without expanding them (measured on torch 2.14: saves k and v at 2 heads beside q at 4)."""
    return q.size(1) == k.size(1) or (enable_gqa and q.size(1) % k.size(1) == 0)
