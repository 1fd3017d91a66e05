"""The optimizer's state and step() temporaries, and whether a GradScaler scales, for the peak model."""
from __future__ import annotations

from typing import Any

from . import optimizer_rule_lbfgs, optimizer_rules_factored  # noqa: F401  (register LBFGS, Adafactor, SparseAdam)
from .optimizer_rules import is_foreach, rule_for, state_bytes_on
from .storages import _nbytes


def _scaler_enabled(scaler: Any, device: str) -> bool:
    """Whether ``scaler`` scales: True, or a GradScaler that is enabled (any one, for a CUDA estimate)."""
    if scaler is None or scaler is False:
        return False
    if scaler is True or device == "cuda":
        return True
    return bool(getattr(scaler, "is_enabled", lambda: True)())


def _optimizer_figures(optimizer, device: str, rnd, hooks,
                       notes: list[str]) -> tuple[int, int, tuple[int, int], bool]:
    """(raw state bytes, allocated state bytes, peak step() temporaries (raw, allocated), eager?) of
    ``optimizer`` on ``device``."""
    if optimizer is None:
        return 0, 0, (0, 0), False
    rule = rule_for(optimizer)
    raw = alloc = 0
    temps = (0, 0)
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        for p in params:
            answer = None
            for h in hooks:
                answer = h.pytest_gpumem_optimizer_state_bytes(optimizer=optimizer, param=p, device=device)
                if answer is not None:
                    break
            if answer is not None:
                raw, alloc = raw + int(answer), alloc + rnd(int(answer))
            elif rule is not None:
                r, a = state_bytes_on(rule.state(group, p), device, rnd)
                raw, alloc = raw + r, alloc + a
        if rule is not None:
            # raw and allocated: the same rule over raw sizes and over the allocator's blocks (compare() judges
            # the peak without 'other', so the rounding must not be filed as temporaries)
            foreach = is_foreach(group, device)
            raw_temps = rule.temporaries(group, [_nbytes(p) for p in params], foreach)
            alloc_temps = rule.temporaries(group, [rnd(_nbytes(p)) for p in params], foreach)
            if alloc_temps > temps[1]:
                temps = (raw_temps, alloc_temps)
    if rule is None:
        notes.append(f"no optimizer rule for {type(optimizer).__name__}: its state is not estimated "
                     "(implement pytest_gpumem_optimizer_state_bytes)")
    return raw, alloc, temps, bool(rule and rule.eager)


def _foreign_params(optimizer, model) -> tuple[int, int]:
    """(count, bytes) of the tensors ``optimizer`` steps that are not parameters of ``model``."""
    if optimizer is None:
        return 0, 0
    own = {id(p) for p in model.parameters()}
    foreign = {id(p): p for g in optimizer.param_groups for p in g["params"] if id(p) not in own}
    return len(foreign), sum(_nbytes(p) for p in foreign.values())


def _has_rule(optimizer, hooks) -> bool:
    """Whether the optimizer's state can be estimated: a table rule, or a hook implementation answering it."""
    if optimizer is None or rule_for(optimizer) is not None:
        return True
    return any(h.pytest_gpumem_optimizer_state_bytes.get_hookimpls() for h in hooks
               if hasattr(h.pytest_gpumem_optimizer_state_bytes, "get_hookimpls"))


def _optimizer_program(optimizer, hooks) -> Any:
    """step index -> the optimizer phase's events, where the optimizer's rule has a program (LBFGS) and no hook
    answers its state; else None."""
    rule = rule_for(optimizer) if optimizer is not None else None
    if rule is None or rule.program is None or len(optimizer.param_groups) != 1:
        return None
    if any(h.pytest_gpumem_optimizer_state_bytes.get_hookimpls() for h in hooks
           if hasattr(h.pytest_gpumem_optimizer_state_bytes, "get_hookimpls")):
        return None
    group = optimizer.param_groups[0]
    return lambda step: rule.program(group, step)
