"""Which implementation ``optimizer.step()`` takes on CUDA by default (torch/optim/optimizer.py,
``_default_to_fused_or_foreach``): foreach for the classes that have one, unless the group sets ``foreach``,
``fused`` or ``differentiable``; the per-parameter loop on the CPU and on meta tensors."""
from __future__ import annotations

from typing import Any, Mapping

#: optimizer classes (by name) with a foreach implementation CUDA picks by default (torch 2.4 - 2.14)
FOREACH_BY_DEFAULT: frozenset[str] = frozenset({
    "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta", "ASGD", "Rprop",
})

#: classes whose functional form keeps the per-parameter loop when ``lr`` is a Tensor and capturable=False
#: (torch/optim/adam.py: foreach refuses a Tensor lr unless capturable)
LOOP_WITH_TENSOR_LR: frozenset[str] = frozenset({"Adam", "AdamW"})


def takes_foreach(group: Mapping[str, Any], device: str, optimizer_name: str | None = None) -> bool:
    """Whether a param group's step() runs the multi-tensor path on ``device`` ("cuda" or "cpu"): its own
    ``foreach`` flag when set; else foreach on CUDA for the classes above (any class when the name is not
    given), never when ``fused`` or ``differentiable``."""
    if group.get("fused"):
        return False
    flag = group.get("foreach")
    if flag is not None:
        return bool(flag)
    if device != "cuda" or group.get("differentiable", False):
        return False
    lr = group.get("lr")
    if optimizer_name in LOOP_WITH_TENSOR_LR and hasattr(lr, "dim") and not group.get("capturable", False):
        return False  # a Tensor lr: CUDA keeps the per-parameter loop
    return optimizer_name is None or optimizer_name in FOREACH_BY_DEFAULT


#: fused optimizer kernels (``torch._fused_adam_`` & co., aten/src/ATen/native/cuda/fused_*_impl.cu): they update
#: params, grads and state lists in place through multi_tensor_apply, whose per-launch tensor metadata travels
#: as kernel arguments (MultiTensorApply.cuh: "TensorListMetadata has to be < 4KB"), so they allocate nothing
#: on the device. What fused=True keeps is state made in Python: each parameter's ``step`` is an fp32 0-d
#: tensor on the device (``_get_scalar_dtype(is_fused=True)``), not a host scalar.
FUSED_KERNELS_ALLOCATE_NOTHING: frozenset[str] = frozenset({"_fused_adam_", "_fused_adamw_", "_fused_sgd_",
                                                            "_fused_adagrad_"})
