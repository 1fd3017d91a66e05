"""Analytical estimate of a training step's memory: from structure and shapes, no real kernels.

Layers are found by running a meta-device twin of the model under forward hooks and
``saved_tensors_hooks``: each call's saved bytes come from a pluggy hook answer, else the formula
registry (``layer_formulas.py``), else what the call itself saved on meta ("traced"). Saved storages are
deduplicated; parameters and the batch are not activations. Every op's tensors are numbered as well
(``_Uses``), which gives each storage a lifetime: a residual's input stays alive across its branch, and so
does its gradient in backward. A peak model then replays the step (forward accumulates saved tensors,
backward frees them in reverse while gradients appear, the optimizer creates its state and temporaries,
zero_grad frees the grads) with the CUDA allocator's 512-B rounding when ``device="cuda"``.
"""
from __future__ import annotations

from .meta_twin import meta_twin
from .model_state import MODEL_STATE_RECIPES, model_state_bytes
from .peak import estimate_step, rounding_for
from .plugins import plugin_manager, register_formulas
from .results import Estimate, LayerEstimate
from .trace import trace_step

__all__ = [
    "Estimate",
    "LayerEstimate",
    "MODEL_STATE_RECIPES",
    "estimate_step",
    "meta_twin",
    "model_state_bytes",
    "plugin_manager",
    "register_formulas",
    "rounding_for",
    "trace_step",
]
