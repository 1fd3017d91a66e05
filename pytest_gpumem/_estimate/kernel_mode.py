"""The kernels a traced op stands for: what CUDA (or the CPU) runs, so the meta trace saves what they save.

Meta kernels are CPU-like: dropout keeps a float noise tensor, attention the L x L probabilities. For
``device="cuda"`` the trace runs what ``_cuda_facts`` says CUDA runs (the fused dropout with its bool mask, the
attention kernel sm90 picks, autocast's casts) and records each attention backward's scratch; for
``device="cpu"`` the CPU's flash attention and oneDNN LSTM. The estimate's own code, reading the table the emulated backend
reads too: it never runs the emulation, so a wrong fact shows as a disagreement with a GPU.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import _compat
from .._cuda_facts import attention as attention_facts
from .._cuda_facts import dropout as dropout_facts
from .autocast_casts import AutocastCasts
from .cpu_attention import cpu_attention
from .cpu_losses import CPU_UNREDUCED_LOSSES, keep_unreduced_buffer
from .cpu_rnn import cpu_lstm

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_DROPOUTS = frozenset({F.dropout, torch.dropout})

#: what the mode does with a callable: cast its inputs, run a kernel of its own, open it (an F function that
#: hides the calls inside it from the mode), or call it as it is
_CAST, _KERNEL, _OPEN, _PLAIN = "cast", "kernel", "open", "plain"


def _bound(args: tuple, kwargs: dict) -> dict[str, Any]:
    return {**dict(zip(_SDPA_ARGS, args)), **kwargs}


def _on_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


class KernelMode(TorchFunctionMode):
    """Forward of the trace as ``device`` runs it. ``on_scratch(output, nbytes)`` hears of each CUDA attention
    call's backward scratch (buffers its backward allocates and frees), keyed by the kernel's output."""

    def __init__(self, device: str, on_scratch: Callable[[torch.Tensor, tuple[int, ...]], None]) -> None:
        super().__init__()
        self.device = device
        self.on_scratch = on_scratch
        self.casts = AutocastCasts()
        self.kinds: dict[Any, str] = {}
        self.opened: set[Any] = set()

    def _kind(self, func: Any) -> str:
        try:
            kind = self.kinds.get(func)
        except TypeError:  # an unhashable callable
            return _PLAIN
        if kind is None:
            if (func in _DROPOUTS or func is F.scaled_dot_product_attention or func is torch.lstm
                    or func in CPU_UNREDUCED_LOSSES):
                kind = _KERNEL
            elif AutocastCasts.policy(func) is not None:
                kind = _CAST
            elif _compat.checks_torch_function(func):
                kind = _OPEN
            else:
                kind = _PLAIN
            self.kinds[func] = kind
        return kind

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func)
        if kind == _PLAIN:
            return func(*args, **kwargs)
        policy = AutocastCasts.policy(func)
        if policy is not None:
            args, kwargs = self.casts.apply(policy, args, kwargs)
        if kind == _KERNEL:
            out = self._kernel(func, args, kwargs)
            if out is not None:
                return out
        if kind == _OPEN and func not in self.opened:
            # F.multi_head_attention_forward & co.: the mode is off while it handles a call, so the calls inside
            # would go unseen; run a copy without the function's own check, with the mode on (never one twice)
            self.opened.add(func)
            try:
                with self:
                    return _compat.without_torch_function_checks(func)(*args, **kwargs)
            finally:
                self.opened.discard(func)
        return func(*args, **kwargs)

    def _kernel(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The op as this device's kernel runs it, or None to call it as it is."""
        if func in _DROPOUTS:
            return self._dropout(func, args, kwargs) if self.device == "cuda" else None
        if func is torch.lstm:  # the CPU's oneDNN LSTM; CUDA's cuDNN RNN is the formulas' (_cuda_facts.rnn)
            return cpu_lstm(args, kwargs) if self.device == "cpu" else None
        if func in CPU_UNREDUCED_LOSSES:
            return keep_unreduced_buffer(func(*args, **kwargs), args, kwargs) if self.device == "cpu" else None
        if len(args) > 6:
            return None
        bound = _bound(args, kwargs)
        if not all(_on_meta(bound.get(n)) for n in _SDPA_ARGS[:3]):
            return None
        return self._cuda_attention(bound) if self.device == "cuda" else cpu_attention(bound)

    @staticmethod
    def _dropout(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """CUDA's at::dropout: the fused native_dropout (a bool mask saved) when _cuda_facts says it runs."""
        names = ("input", "p", "training" if func is F.dropout else "train", "inplace")
        b = {**dict(zip(names, args)), **kwargs}
        x, p = b.get("input"), b.get("p", 0.5)
        training, inplace = b.get(names[2], True), func is F.dropout and b.get("inplace", False)
        if not (_on_meta(x) and dropout_facts.runs_fused(p, training, inplace, x.numel())):
            return None
        return torch.native_dropout(x, p, True)[0]

    def _cuda_attention(self, b: dict[str, Any]) -> torch.Tensor | None:
        """The aten op of the kernel _cuda_facts says sm90 picks (its saves are what autograd records)."""
        q, k, v, mask = b["query"], b["key"], b["value"], b.get("attn_mask")
        dropout_p, is_causal, scale = b.get("dropout_p", 0.0), b.get("is_causal", False), b.get("scale")
        call = attention_facts.describe_call(q, k, v, mask, dropout_p, is_causal, bool(b.get("enable_gqa", False)))
        enabled = attention_facts.Enabled(**_compat.sdp_backends_enabled(),
                                          deterministic=torch.are_deterministic_algorithms_enabled())
        kernel = attention_facts.choose(call, attention_facts.TARGET, enabled).kernel
        if kernel == attention_facts.FLASH:
            out = _compat.cuda_flash_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        elif kernel == attention_facts.CUDNN:
            out = _compat.cuda_cudnn_attention(q, k, v, attention_facts.cudnn_bias(mask, q),
                                               compute_log_sumexp=call.requires_grad, dropout_p=dropout_p,
                                               is_causal=is_causal, scale=scale)
        elif kernel == attention_facts.EFFICIENT:
            out = _compat.cuda_efficient_attention(q, k, v, attention_facts.efficient_bias(mask, q, k),
                                                   compute_log_sumexp=call.requires_grad, dropout_p=dropout_p,
                                                   is_causal=is_causal, scale=scale)
        else:
            return None  # the composite math path, as CUDA runs it (k/v expanded for GQA)
        if call.requires_grad:
            scratch = attention_facts.backward_scratch(call, kernel, enabled)
            if scratch:
                self.on_scratch(out, tuple(buf.nbytes for buf in scratch))
        return out
