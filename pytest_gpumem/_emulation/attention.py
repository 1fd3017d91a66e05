"""scaled_dot_product_attention on meta as a CUDA GPU runs it: the kernel it would pick, what that kernel
saves for backward, and the scratch its backward allocates (kernel facts in _cuda_facts/attention.py)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .._compat import (cuda_cudnn_attention, cuda_efficient_attention, cuda_flash_attention,
                       sdp_backends_enabled)
from .._cuda_facts import attention as facts
from .substitutions import Proceed, Substitution, _arg, _on_meta, _register

#: one line per distinct call seen since the last take_notes(): which kernel was assumed, and why
_NOTES: dict[str, None] = {}


def target_gpu(device: Any) -> contextlib.AbstractContextManager:
    """Choose kernels as on ``device`` (a DeviceProfile) inside the block, instead of the default sm90; the
    estimate reads the same target (_cuda_facts/attention.py)."""
    return facts.target_gpu(device.attention_profile(facts.TARGET.torch))


def take_notes() -> list[str]:
    """The kernel-choice notes recorded since the last call (each distinct call once), and forget them."""
    notes = list(_NOTES)
    _NOTES.clear()
    return notes


def _hold_scratch(out: torch.Tensor, scratch: list[facts.Buffer]) -> None:
    """Allocate ``scratch`` on meta while the kernel's backward node runs, and free it when the node returns."""
    node = out.grad_fn
    if node is None or not scratch:
        return
    held: list[torch.Tensor] = []

    def allocate(grad_outputs):
        held.extend(torch.empty(b.shape, dtype=b.dtype, device="meta") for b in scratch)

    def release(grad_inputs, grad_outputs):
        held.clear()

    node.register_prehook(allocate)
    node.register_hook(release)


def _cuda_attention(func: Callable, args: tuple, kwargs: dict, proceed: Proceed) -> Any:
    """Run the aten op of the kernel CUDA would pick, so its saved tensors are recorded, and hold its scratch."""
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = _arg(args, kwargs, 3, "attn_mask")
    dropout_p, is_causal = _arg(args, kwargs, 4, "dropout_p", 0.0), _arg(args, kwargs, 5, "is_causal", False)
    scale, enable_gqa = kwargs.get("scale"), bool(kwargs.get("enable_gqa", False))
    if not all(map(_on_meta, (q, k, v))) or len(args) > 6:
        return proceed(args, kwargs)
    call = facts.describe_call(q, k, v, mask, dropout_p, is_causal, enable_gqa)
    enabled = facts.Enabled(**sdp_backends_enabled(), deterministic=torch.are_deterministic_algorithms_enabled())
    choice = facts.choose(call, facts.TARGET, enabled)
    _NOTES.setdefault(choice.describe(call))
    if choice.kernel == facts.FLASH:
        out = cuda_flash_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    elif choice.kernel == facts.CUDNN:
        out = cuda_cudnn_attention(q, k, v, facts.cudnn_bias(mask, q), compute_log_sumexp=call.requires_grad,
                                   dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    elif choice.kernel == facts.EFFICIENT:
        out = cuda_efficient_attention(q, k, v, facts.efficient_bias(mask, q, k), compute_log_sumexp=call.requires_grad,
                                       dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    else:
        return proceed(args, kwargs)  # the composite math path, as CUDA runs it (k/v expanded for GQA)
    if call.requires_grad:
        _hold_scratch(out, facts.backward_scratch(call, choice.kernel, enabled))
    return out


_register(Substitution(
    "sdpa",
    "scaled_dot_product_attention on CUDA runs the kernel sm90 would pick (cuDNN, flash, memory-efficient or math; "
    "grouped-query shapes without expanding k/v on flash and cuDNN), saving output + logsumexp, and its backward "
    "allocates the kernel's scratch (torch 2.9-2.14).",
    intercepts=frozenset({F.scaled_dot_product_attention}),
    run=_cuda_attention,
))
