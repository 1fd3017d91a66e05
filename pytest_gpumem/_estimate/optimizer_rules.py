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

from .._cuda_facts.optimizers import takes_foreach

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
ProgramFn = Callable[[Group, int], "list[tuple]"]


@dataclass(frozen=True)
class OptimizerRule:
    """How one optimizer class holds state and temporaries."""

    state: StateFn
    temporaries: TempFn
    eager: bool = False  #: state created in __init__ (present from setup), not on the first step()
    #: (group, step index) -> the optimizer phase as events (see replay.StepReplay._run_program), for a step()
    #: whose state changes from step to step and that re-evaluates a closure (LBFGS); ``state`` is then the
    #: state after the first step and ``temporaries`` is not used
    program: ProgramFn | None = None


#: Rules keyed by optimizer class; looked up along the MRO so subclasses inherit their parent's rule.
OPTIMIZER_RULES: dict[type, OptimizerRule] = {}


def optimizer_rule(*types: type, temporaries: TempFn, eager: bool = False, program: ProgramFn | None = None):
    """Register the decorated state function (and ``temporaries``, ``program``) for ``types``; duplicates are an
    error."""

    def register(fn: StateFn) -> StateFn:
        for t in types:
            if t in OPTIMIZER_RULES:
                raise ValueError(f"an optimizer rule for {t.__name__} is already registered")
            OPTIMIZER_RULES[t] = OptimizerRule(fn, temporaries, eager, program)
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
    return takes_foreach(group, device)


# -- temporaries ------------------------------------------------------------------------------
# foreach: lists of param-sized results for the whole group at once, so k * sum(p).
# Per-parameter loop: each param's transients, plus the locals the previous iteration bound and the loop
# has not rebound yet (``denom``/``std`` of the last param stay alive until the next param's is made).
# fused kernels update in place: 0.

#: One statement of a per-parameter loop body: (local name or "" for a transient, param-sized tensors the
#: statement leaves bound to it (0: rebound to a non-temporary, e.g. ``grad = grads[i]``), param-sized
#: tensors alive only while the statement runs, beside the old value and the new one)
LoopStatement = tuple[str, int, int]


def loop_peak(sizes: Sequence[int], body: Sequence[LoopStatement]) -> int:
    """Peak transient bytes of a Python loop running ``body`` once per parameter (sizes in param order).

    A statement ``x = f(...)`` makes its result (and its inner transients) while the old ``x`` is still
    bound; the old one is freed on rebinding. E.g. Adagrad's ``std = state_sum.sqrt().add_(eps)``: on the
    second param, the first param's std and the new one are both alive (W + b, not 2 x max).
    """
    held: dict[str, int] = {}
    peak = 0
    for p in sizes:
        for name, kept, during in body:
            live = sum(held.values())
            peak = max(peak, live + (kept + during) * p)
            if name:
                held[name] = kept * p
    return peak


def _loop_or_foreach(body: Callable[[Group], Sequence[LoopStatement]],
                     lists: Callable[[Group], int]) -> TempFn:
    """A TempFn from a loop body (per-parameter path) and a count of param-sized lists (foreach path)."""

    def temporaries(group: Group, sizes: Sequence[int], foreach: bool) -> int:
        if not sizes or group.get("fused"):
            return 0
        return lists(group) * sum(sizes) if foreach else loop_peak(sizes, body(group))

    temporaries.__doc__ = body.__doc__
    return temporaries


def _wd(group: Group) -> bool:
    return group.get("weight_decay", 0) != 0


def _l2(group: Group) -> bool:
    """Weight decay added to the grad (a new grad tensor), not decoupled into the param."""
    return _wd(group) and not group.get("decoupled_weight_decay", False)


def _grad(group: Group, l2: bool) -> list[LoopStatement]:
    """``grad = grads[i]`` frees the last param's decayed grad; ``grad = grad.add(p, alpha=wd)`` makes one."""
    return [("grad", 0, 0)] + ([("grad", 1, 0)] if l2 else [])


def _adam_body(group: Group) -> list[LoopStatement]:
    """Adam/AdamW loop: denom = (v.sqrt() / bc2).add_(eps): sqrt is freed once the quotient (kept) exists."""
    return _grad(group, _l2(group)) + [("denom", 1, 1)]


def _adam_lists(group: Group) -> int:
    """Adam/AdamW foreach: _foreach_sqrt(v), after the L2 grads (if any) are freed."""
    return 1


def _sgd_body(group: Group) -> list[LoopStatement]:
    """SGD loop: weight decay makes grad.add(p), nesterov grad.add(buf) beside it."""
    nesterov = bool(group.get("nesterov")) and group.get("momentum", 0) != 0
    return _grad(group, _wd(group)) + ([("grad", 1, 0)] if nesterov else [])


def _sgd_lists(group: Group) -> int:
    """SGD foreach: the decayed grads; nesterov adds the buffers into them in place."""
    return int(_wd(group))


def _adagrad_body(group: Group) -> list[LoopStatement]:
    """Adagrad loop: std = state_sum.sqrt().add_(eps), kept until the next param's std."""
    return _grad(group, _wd(group)) + [("std", 1, 0)]


def _adagrad_lists(group: Group) -> int:
    """Adagrad foreach: std, and the decayed grads or (without decay) numerator = grads * -clr."""
    return 2


def _rmsprop_body(group: Group) -> list[LoopStatement]:
    """RMSprop loop: avg = square_avg.sqrt() (centered: square_avg.addcmul(g_avg, g_avg).sqrt_()), kept."""
    return _grad(group, _wd(group)) + [("avg", 1, 0)]


def _rmsprop_lists(group: Group) -> int:
    """RMSprop foreach: avg, plus the decayed grads."""
    return 1 + int(_wd(group))


def _adamax_body(group: Group) -> list[LoopStatement]:
    """Adamax loop: torch.maximum(exp_inf, grad.abs().add_(eps), out=exp_inf): one transient."""
    return _grad(group, _wd(group)) + [("", 0, 1)]


def _adamax_lists(group: Group) -> int:
    """Adamax foreach: |grads| (with decay: the decayed grads, made absolute in place)."""
    return 1


def _nadam_body(group: Group) -> list[LoopStatement]:
    """NAdam loop: denom = exp_avg_sq.div(bc2).sqrt(): the quotient is freed once denom (kept) exists."""
    return _grad(group, _l2(group)) + [("denom", 1, 1)]


def _nadam_lists(group: Group) -> int:
    """NAdam foreach: sqrt(exp_avg_sq), beside the L2-decayed grads."""
    return 1 + int(_l2(group))


def _radam_body(group: Group) -> list[LoopStatement]:
    """RAdam loop: bias_corrected_exp_avg = exp_avg / bc1 (kept), then bias_corrected_exp_avg * lr.

    That is the unrectified branch (rho_t <= 5: the first ~5 steps with beta2=0.999, which a measured
    step is); later steps also make sqrt(exp_avg_sq) and the rectified quotient (about one more param)."""
    return _grad(group, _l2(group)) + [("bias_corrected", 1, 0), ("", 0, 1)]


def _radam_lists(group: Group) -> int:
    """RAdam foreach: sqrt(exp_avg_sq); the decayed grads are deleted before it."""
    return 1


def _adadelta_body(group: Group) -> list[LoopStatement]:
    """Adadelta loop: std = square_avg.add(eps).sqrt_() and delta = acc_delta.add(eps).sqrt_(), both kept."""
    return _grad(group, _wd(group)) + [("std", 1, 0), ("delta", 1, 0)]


def _adadelta_lists(group: Group) -> int:
    """Adadelta foreach: std and deltas, plus the decayed grads."""
    return 2 + int(_wd(group))


_adam_temporaries = _loop_or_foreach(_adam_body, _adam_lists)
_sgd_temporaries = _loop_or_foreach(_sgd_body, _sgd_lists)
_adagrad_temporaries = _loop_or_foreach(_adagrad_body, _adagrad_lists)
_rmsprop_temporaries = _loop_or_foreach(_rmsprop_body, _rmsprop_lists)
_adamax_temporaries = _loop_or_foreach(_adamax_body, _adamax_lists)
_nadam_temporaries = _loop_or_foreach(_nadam_body, _nadam_lists)
_radam_temporaries = _loop_or_foreach(_radam_body, _radam_lists)
_adadelta_temporaries = _loop_or_foreach(_adadelta_body, _adadelta_lists)


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


@optimizer_rule(torch.optim.Adagrad, temporaries=_adagrad_temporaries, eager=True)
def adagrad_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """Adagrad: step and sum, both created in __init__ (step on the device only when fused)."""
    return (_step(group), _like("sum", p))


@optimizer_rule(torch.optim.RMSprop, temporaries=_rmsprop_temporaries)
def rmsprop_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """RMSprop: step, square_avg (+ momentum_buffer if momentum > 0, + grad_avg if centered)."""
    extra = ((_like("momentum_buffer", p),) if group.get("momentum", 0) > 0 else ()) + (
        (_like("grad_avg", p),) if group.get("centered") else ()
    )
    return (_step(group, fused_ok=False), _like("square_avg", p), *extra)


@optimizer_rule(torch.optim.Adamax, temporaries=_adamax_temporaries)
def adamax_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """Adamax: step, exp_avg, exp_inf."""
    return (_step(group, fused_ok=False), _like("exp_avg", p), _like("exp_inf", p))


@optimizer_rule(torch.optim.NAdam, temporaries=_nadam_temporaries)
def nadam_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """NAdam: step and mu_product scalars, exp_avg, exp_avg_sq."""
    return (
        _step(group, fused_ok=False),
        _step(group, "mu_product", fused_ok=False),
        _like("exp_avg", p),
        _like("exp_avg_sq", p),
    )


@optimizer_rule(torch.optim.RAdam, temporaries=_radam_temporaries)
def radam_state(group: Group, p: torch.Tensor) -> tuple[StateTensor, ...]:
    """RAdam: step, exp_avg, exp_avg_sq."""
    return (_step(group, fused_ok=False), _like("exp_avg", p), _like("exp_avg_sq", p))


@optimizer_rule(torch.optim.Adadelta, temporaries=_adadelta_temporaries)
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
