"""CPU attention on meta: scaled_dot_product_attention saving what the CPU's flash kernel saves."""
from __future__ import annotations

from typing import Any

import torch

from .._compat import cpu_flash_attention


def cpu_attention(b: dict[str, Any]) -> torch.Tensor | None:
    """The CPU's flash kernel for bound sdpa arguments ``b`` (query, key, value, attn_mask, dropout_p, is_causal,
    scale, enable_gqa), or None where the CPU takes the math path.

    torch >= 2.3 picks flash on the CPU for 4-d floating q/k/v of one dtype, equal head dims and no dropout; it
    saves the output and logsumexp (B, H, L), not the math path's B*H*L*S probabilities (checked against
    backend="cpu")."""
    q, k, v = b["query"], b["key"], b["value"]
    fits = (q.dim() == k.dim() == v.dim() == 4 and q.is_floating_point() and q.dtype == k.dtype == v.dtype
            and q.size(-1) == k.size(-1) == v.size(-1) and k.size(1) == v.size(1)
            and _heads_fit(q, k, bool(b.get("enable_gqa", False))) and not b.get("dropout_p", 0.0))
    if not fits:
        return None
    return cpu_flash_attention(q, k, v, is_causal=bool(b.get("is_causal", False)), attn_mask=b.get("attn_mask"),
                               scale=b.get("scale"))


def _heads_fit(q: torch.Tensor, k: torch.Tensor, enable_gqa: bool) -> bool:
    """Equal head counts, or grouped-query attention: the CPU flash kernel takes k/v with fewer heads as they
    are, without expanding them (measured on torch 2.14: saves k and v at 2 heads beside q at 4)."""
    return q.size(1) == k.size(1) or (enable_gqa and q.size(1) % k.size(1) == 0)
