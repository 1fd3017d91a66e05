"""Model-state rules of thumb: bytes per parameter of params + grads + optimizer state."""
from __future__ import annotations

#: Bytes per parameter of the model state (params + grads + optimizer state) for common recipes.
#: mixed_adam: fp16 params (2) + fp16 grads (2) + fp32 master params, exp_avg, exp_avg_sq (4+4+4) = 16 (ZeRO paper).
MODEL_STATE_RECIPES: dict[str, int] = {
    "fp32_adam": 4 + 4 + 8,      # params + grads + two fp32 moments
    "fp32_sgd": 4 + 4,           # params + grads (no momentum)
    "fp32_sgd_momentum": 4 + 4 + 4,
    "mixed_adam": 2 + 2 + 12,
    "bf16_adam": 2 + 2 + 4,      # pure bf16 training, bf16 moments
}


def model_state_bytes(n_params: int, recipe: str = "mixed_adam") -> int:
    """Bytes of params + grads + optimizer state for ``n_params`` parameters under ``recipe``."""
    try:
        return n_params * MODEL_STATE_RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(MODEL_STATE_RECIPES)}") from None
