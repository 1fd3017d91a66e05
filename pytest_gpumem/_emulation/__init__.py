"""Make a training step on meta tensors save and allocate what it would on a CUDA GPU.

Meta kernels are not CUDA kernels: dropout builds a float noise tensor where CUDA keeps a bool mask,
scaled_dot_product_attention keeps the L x L attention matrix where CUDA's flash / memory-efficient
kernels keep a logsumexp, ``torch.autocast("cuda")`` switches itself off without a GPU, GradScaler too.
:func:`cuda_semantics` applies a registry of small substitutions, each reproducing one CUDA behaviour,
and restores everything on exit. Substitutions act on meta tensors only, so the context is harmless
around real CUDA tensors.

How the step runner uses it (the whole step, forward to optimizer, inside one context)::

    with cuda_semantics(), predict_cuda_optimizer(optimizer):
        with torch.autocast("cuda", dtype=torch.float16):   # the user's own region, or the runner's
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()                      # scaler: EmulatedGradScaler("cuda")
        scaler.step(optimizer); scaler.update()
"""
from __future__ import annotations

# registry order is the order substitutions chain in: autocast, dropout, sdpa, grad_scaler, literal_tensors, sparse_new
from . import autocast, dropout, attention, grad_scaler, literals, sparse_ops  # noqa: F401  (each registers its substitution)
from .grad_scaler import EmulatedGradScaler
from .meta_failures import explain_meta_failure
from .optimizers import LBFGS_NOTE, predict_cuda_optimizer
from .semantics_mode import cuda_semantics, emulated_autocast
from .substitutions import SUBSTITUTIONS, Substitution

__all__ = [
    "SUBSTITUTIONS",
    "Substitution",
    "EmulatedGradScaler",
    "LBFGS_NOTE",
    "cuda_semantics",
    "emulated_autocast",
    "explain_meta_failure",
    "predict_cuda_optimizer",
]
