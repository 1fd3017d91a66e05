"""Dropout on meta as CUDA runs it: the fused kernel that saves a bool mask."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .._cuda_facts.dropout import runs_fused
from .substitutions import Proceed, Substitution, _arg, _on_meta, _register


def _fused_dropout(func: Callable, args: tuple, kwargs: dict, proceed: Proceed) -> Any:
    """at::dropout on CUDA: native_dropout (a bool mask saved) when training, 0 < p < 1, numel > 0."""
    x, p = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "p", 0.5)
    training = _arg(args, kwargs, 2, "training" if func is F.dropout else "train", True)
    inplace = func is F.dropout and _arg(args, kwargs, 3, "inplace", False)
    if not (_on_meta(x) and runs_fused(p, training, inplace, x.numel())):
        return proceed(args, kwargs)
    return torch.native_dropout(x, p, True)[0]


_register(Substitution(
    "dropout",
    "F.dropout/nn.Dropout in training on CUDA run the fused native_dropout, saving a 1 B/elem bool mask, "
    "not an itemsize B/elem noise tensor (torch >= 1.12; inplace, feature and alpha dropout are unfused everywhere).",
    intercepts=frozenset({F.dropout, torch.dropout}),
    run=_fused_dropout,
))
