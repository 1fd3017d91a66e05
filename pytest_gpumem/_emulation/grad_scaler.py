"""torch.amp.GradScaler('cuda') on meta tensors: enabled without a GPU, finite grads assumed."""
from __future__ import annotations

from typing import Callable

import torch

from .._compat import grad_scaler_step_patch_target
from .substitutions import SUBSTITUTIONS, Substitution, _on_meta, _patched, _register


def _step_without_inf_check(original: Callable) -> Callable:
    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        if any(_on_meta(t) for t in optimizer_state["found_inf_per_device"].values()):
            return optimizer.step(*args, **kwargs)  # meta grads hold no values: assume finite, as most steps are
        return original(self, optimizer, optimizer_state, *args, **kwargs)
    return _maybe_opt_step


_register(Substitution(
    "grad_scaler",
    "torch.amp.GradScaler('cuda') stays enabled without a GPU and steps without reading found_inf from a meta "
    "tensor (torch 2.4-2.14; its scale, growth tracker, found_inf and unscale run as on CUDA).",
    patches=((*grad_scaler_step_patch_target(), _step_without_inf_check),),
))


class EmulatedGradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler that works on meta tensors: same tensors and kernels, finite grads assumed."""

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True) -> None:
        with _patched(SUBSTITUTIONS["autocast"].patches[:1]):  # stay enabled without a GPU
            super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        self._known_scale, self._known_growth = float(init_scale), 0  #: what the meta scale would hold

    _maybe_opt_step = _step_without_inf_check(torch.amp.GradScaler._maybe_opt_step)

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        super().update(new_scale)
        if not self._enabled:
            return
        if new_scale is not None:
            self._known_scale, self._known_growth = float(new_scale), 0
            return
        self._known_growth += 1
        if self._known_growth == self._growth_interval:
            self._known_scale, self._known_growth = self._known_scale * self._growth_factor, 0

    def get_scale(self) -> float:
        if self._enabled and _on_meta(self._scale):
            return self._known_scale
        return super().get_scale()

    def _get_growth_tracker(self) -> int:
        if self._enabled and _on_meta(self._growth_tracker):
            return self._known_growth
        return super()._get_growth_tracker()
