"""Optimizer state and step() temporaries per optimizer class: a registry of pure rules.

A rule says, for one parameter of one param group, which state tensors the optimizer keeps
(shape-of-param moments, scalar ``step`` counters and where they live), whether the state is
created lazily on the first ``step()`` or eagerly in ``__init__`` (Adagrad), and how many bytes of
transient tensors ``step()`` holds at once, for the per-parameter loop and for the ``foreach`` path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

#: A param group as torch keeps it: hyper-parameters by name, plus "params".
Group = Mapping[str, Any]


@dataclass(frozen=True)
class StateTensor:
    """One state tensor of one parameter: its name, element count, dtype and whether it sits on the param's device."""

    name: str
    numel: int
    dtype: torch.dtype
    on_param_device: bool = True  #: False for the CPU ``step`` counters of non-fused, non-capturable optimizers

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


StateFn = Callable[[Group, torch.Tensor], "tuple[StateTensor, ...]"]
#: (group, per-parameter byte sizes (already rounded for the device), foreach) -> peak transient bytes
TempFn = Callable[[Group, Sequence[int], bool], int]


@dataclass(frozen=True)
class OptimizerRule:
    """How one optimizer class holds state and temporaries."""

    state: StateFn
    temporaries: TempFn
    eager: bool = False  #: state created in __init__ (present from setup), not on the first step()


#: Rules keyed by optimizer class; looked up along the MRO so subclasses inherit their parent's rule.
OPTIMIZER_RULES: dict[type, OptimizerRule] = {}


def optimizer_rule(*types: type, temporaries: TempFn, eager: bool = False):
    """Register the decorated state function (and ``temporaries``) for ``types``; duplicates are an error."""

    def register(fn: StateFn) -> StateFn:
        for t in types:
            if t in OPTIMIZER_RULES:
                raise ValueError(f"an optimizer rule for {t.__name__} is already registered")
            OPTIMIZER_RULES[t] = OptimizerRule(fn, temporaries, eager)
        return fn

    return register


def rule_for(optimizer: torch.optim.Optimizer) -> OptimizerRule | None:
    """The rule of ``optimizer``'s class or nearest registered base class, or None."""
    for cls in type(optimizer).__mro__:
        if cls in OPTIMIZER_RULES:
            return OPTIMIZER_RULES[cls]
    return None


def scalar_dtype(fused: bool = False) -> torch.dtype:
    """dtype of ``step``/``mu_product`` scalars: float32, or float64 when that is the default dtype (never for fused)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 and not fused else torch.float32


def _like(name: str, p: torch.Tensor) -> StateTensor:
    return StateTensor(name, p.numel(), p.dtype)


def _step(group: Group, name: str = "step", *, fused_ok: bool = True) -> StateTensor:
    """A scalar counter: on the param's device when fused or capturable, else a CPU tensor."""
    fused = bool(group.get("fused")) if fused_ok else False
    on_device = fused or bool(group.get("capturable"))
    return StateTensor(name, 1, scalar_dtype(fused), on_device)


def is_foreach(group: Group, device: str) -> bool:
    """Whether step() takes the multi-tensor path: explicit group flag, else torch's default for the device (CUDA -> foreach)."""
    if group.get("fused"):
        return False
    flag = group.get("foreach")
    return bool(flag) if flag is not None else device == "cuda" and not group.get("differentiable", False)


# -- temporaries ------------------------------------------------------------------------------
# Per-parameter loop: the transients of one parameter at a time, so k * max(p).
# foreach: a list of param-sized results for the whole group at once, so k * sum(p).
# fused kernels update in place: 0.


def _adam_temporaries(group: Group, sizes: Sequence[int], foreach: bool) -> int:
    """Adam/AdamW: per param, denom = (v.sqrt() / bc2).add_(eps) holds sqrt and quotient (2p), Adam's
    L2 weight decay adds grad.add(p) (+p); foreach: _foreach_sqrt(v) (P) after the L2 grads (P) are freed."""
    if not sizes or group.get("fused"):
        return 0
    l2 = group.get("weight_decay", 0) != 0 and not group.get("decoupled_weight_decay", False)
    if foreach:
        return sum(sizes)
    return (2 + int(l2)) * max(sizes)


def _sgd_temporaries(group: Group, sizes: Sequence[int], foreach: bool) -> int:
    """SGD: weight decay makes grad.add(p) (+p), nesterov makes grad.add(buf) (+p); both alive together."""
    if not sizes or group.get("fused"):
        return 0
    wd = group.get("weight_decay", 0) != 0
    nesterov = bool(group.get("nesterov")) and group.get("momentum", 0) != 0
    k = int(wd) + int(nesterov)
    return k * (sum(sizes) if foreach else max(sizes))


def _generic_temporaries(group: Group, sizes: Sequence[int], foreach: bool) -> int:
    """Other optimizers (approximate): two param-sized transients per param in the loop, one list in foreach."""
    if not sizes or group.get("fused"):
        return 0
    return sum(sizes) if foreach else 2 * max(sizes)


# -- state ------------------------------------------------------------------------------------


@optimizer_rule(torch.optim.SGD, temporaries=_sgd_temporaries)
def sgd_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """SGD: a momentum_buffer (clone of the first grad) only when momentum != 0."""
    return (_like("momentum_buffer", p),) if group.get("momentum", 0) != 0 else ()


@optimizer_rule(torch.optim.Adam, torch.optim.AdamW, temporaries=_adam_temporaries)
def adam_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """Adam/AdamW: step, exp_avg, exp_avg_sq (+ max_exp_avg_sq with amsgrad)."""
    extra = (_like("max_exp_avg_sq", p),) if group.get("amsgrad") else ()
    return (_step(group), _like("exp_avg", p), _like("exp_avg_sq", p), *extra)


@optimizer_rule(torch.optim.Adagrad, temporaries=_generic_temporaries, eager=True)
def adagrad_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """Adagrad: step and sum, both created in __init__ (step on the device only when fused)."""
    return (_step(group), _like("sum", p))


@optimizer_rule(torch.optim.RMSprop, temporaries=_generic_temporaries)
def rmsprop_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """RMSprop: step, square_avg (+ momentum_buffer if momentum > 0, + grad_avg if centered)."""
    extra = ((_like("momentum_buffer", p),) if group.get("momentum", 0) > 0 else ()) + (
        (_like("grad_avg", p),) if group.get("centered") else ()
    )
    return (_step(group, fused_ok=False), _like("square_avg", p), *extra)


@optimizer_rule(torch.optim.Adamax, temporaries=_generic_temporaries)
def adamax_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """Adamax: step, exp_avg, exp_inf."""
    return (_step(group, fused_ok=False), _like("exp_avg", p), _like("exp_inf", p))


@optimizer_rule(torch.optim.NAdam, temporaries=_generic_temporaries)
def nadam_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """NAdam: step and mu_product scalars, exp_avg, exp_avg_sq."""
    return (
        _step(group, fused_ok=False),
        _step(group, "mu_product", fused_ok=False),
        _like("exp_avg", p),
        _like("exp_avg_sq", p),
    )


@optimizer_rule(torch.optim.RAdam, temporaries=_generic_temporaries)
def radam_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """RAdam: step, exp_avg, exp_avg_sq."""
    return (_step(group, fused_ok=False), _like("exp_avg", p), _like("exp_avg_sq", p))


@optimizer_rule(torch.optim.Adadelta, temporaries=_generic_temporaries)
def adadelta_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """Adadelta: step, square_avg, acc_delta."""
    return (_step(group, fused_ok=False), _like("square_avg", p), _like("acc_delta", p))


def state_bytes_on(tensors: Sequence[StateTensor], device: str, round_fn: Callable[[int], int]) -> tuple[int, int]:
    """(raw, allocated) bytes of ``tensors`` that occupy ``device``: CPU-side counters count only when device is "cpu"."""
    raw = alloc = 0
    for t in tensors:
        if t.on_param_device or device == "cpu":
            raw += t.nbytes
            alloc += round_fn(t.nbytes)
    return raw, alloc


# -- torch.amp.GradScaler ---------------------------------------------------------------------


@dataclass(frozen=True)
class ScalerTensors:
    """The tensors torch.amp.GradScaler makes in one step, each as its byte size (the allocator rounds each).

    Checked against measure_step(backend="emulated", autocast_dtype=torch.float16, scaler=True) on an MLP.
    """

    kept: tuple[int, ...]            #: made by the first scale() and kept for good
    backward: tuple[int, ...]        #: alive through backward
    backward_start: tuple[int, ...]  #: beside autograd's seed when backward starts
    unscale: tuple[int, ...]         #: alive together at unscale_'s peak
    step: tuple[int, ...]            #: alive through optimizer.step() and update()


def grad_scaler_tensors(devices: int = 1) -> ScalerTensors:
    """GradScaler's tensors for parameters on ``devices`` devices (all of them 0-d fp32/int32 scalars, 4 B)."""
    return ScalerTensors(
        kept=(4, 4),               # _scale fp32 [] + _growth_tracker int32 []: 4 + 4 = 8 B
        backward=(4,),             # scale(loss) = loss * _scale: the scaled fp32 loss
        backward_start=(4,),       # grad of the loss = seed * _scale
        # unscale_: inv_scale = _scale.double().reciprocal().float() peaks at 8 + 8 B first, then inv_scale,
        # found_inf and one copy of each per device are alive together: (2 + 2 x devices) x 4 B
        unscale=(4, 4) + (4, 4) * devices,
        step=(4,) * devices,       # found_inf per device, read by step() to skip and by update()
    )
