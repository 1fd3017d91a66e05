"""The peak model: replay the traced step phase by phase and find its peak and category split."""
from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
from torch import nn

from .._core.categories import Category
from .._core.step_calls import eager_model
from .._measure.allocator import round_allocation
from .optimizer_rules import grad_scaler_tensors
from .layer_table import _layer_table
from .leaves import _leaves, _param_grads_by_call
from .optimizer_figures import _foreign_params, _has_rule, _optimizer_figures, _optimizer_program, _scaler_enabled
from .plugins import plugin_manager
from .results import Estimate
from .saves import _Save, _saves
from .storages import _nbytes, _storage_key, _tensors, held_by
from .replay import StepFigures, StepReplay
from .trace import _Trace, trace_step


def rounding_for(device: str) -> Callable[[int], int]:
    """The allocator's rounding for ``device``: 512-B blocks on CUDA, raw bytes on the CPU."""
    return round_allocation if device == "cuda" else (lambda n: n)


def estimate_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    batch: Any,
    *,
    loss_fn: Callable | None = None,
    target: Any = None,
    device: str = "cuda",
    steps: int = 2,
    set_to_none: bool = True,
    hook: Any = None,
    autocast_dtype: torch.dtype | None = None,
    reuse_blocks: bool = True,
    scaler: Any = None,
) -> Estimate:
    """Estimate peak and per-category bytes of ``steps`` training steps on ``device`` ("cuda" or "cpu").

    ``scaler`` (True or a ``torch.amp.GradScaler``) adds what a GradScaler holds, as ``measure_step(...,
    scaler=...)`` runs it: the scaled loss in backward, unscale_'s temporaries, its scale and growth tracker.
    A GradScaler made without a GPU is disabled; for ``device="cuda"`` it counts as enabled, as on the GPU.
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    rnd = rounding_for(device)
    model, compiled = eager_model(model)  # a torch.compile'd model is estimated as its eager graph
    hooks = [h for h in (hook, plugin_manager.hook) if h is not None]
    trace = trace_step(model, batch, target=target, loss_fn=loss_fn, device=device, hooks=hooks,
                       autocast_dtype=autocast_dtype, reuse_blocks=reuse_blocks)
    saves, covered = _saves(trace, rnd)
    notes = ([compiled] if compiled else []) + _trace_notes(trace)
    figures = _step_figures(model, optimizer, batch, target, trace, saves, covered, device, rnd, hooks, scaler,
                            notes)
    replay = StepReplay(figures, set_to_none)
    replay.run(steps)
    assert replay.best is not None
    peak, peak_phase, peak_step, peak_split = replay.best
    p = figures
    categories = {
        Category.PARAMS: p.params[0], Category.GRADS: p.grads[0], Category.OPTIMIZER: p.optimizer[0],
        Category.BATCH: p.batch[0], Category.ACTIVATIONS: sum(s.raw for s in saves if s.region is None),
    }
    return Estimate(
        device=device, peak=peak, peak_phase=peak_phase, peak_step=peak_step, peak_split=peak_split,
        phases=replay.phase_peaks, params=p.params[0], grads=p.grads[0], optimizer=p.optimizer[0],
        batch=p.batch[0], activations=categories[Category.ACTIVATIONS], layers=_layer_table(trace, saves, covered),
        notes=tuple(notes), step_peaks=tuple(replay.step_peaks), categories=categories,
        category_peaks=replay.category_peaks,
        unestimated=(() if _has_rule(optimizer, hooks) else ("optimizer",)),
        autocast_inside=trace.user_autocast, foreign_optimizer_params=_foreign_params(optimizer, model),
    )


def _output_keep(trace: _Trace, saved_keys: set[int]) -> int:
    """Bytes the model's output keeps alive from forward's end to backward's end that no one saves: its tensors,
    and the storages held by objects in it (a KV cache) that are not parameters or the batch."""
    skip = saved_keys | trace.batch_keys
    keep = sum(_nbytes(t) for t in _tensors(trace.output) if _storage_key(t) not in skip)
    pytree = {_storage_key(t) for t in _tensors(trace.output)}
    extra = {_storage_key(t): t.untyped_storage().nbytes() for t in held_by(trace.output, extra=trace.side_held)}
    return keep + sum(n for k, n in extra.items() if k not in pytree and k not in skip and k not in trace.param_keys)


def _trace_notes(trace: _Trace) -> list[str]:
    notes: list[str] = []
    if trace.user_autocast is not None:
        notes.append(f"the model or loss enters {trace.user_autocast} itself: meta tensors ignore it, so its "
                     "activations are estimated in full precision (pass autocast_dtype=... to the step instead)")
    if trace.reused[0]:
        notes.append(f"repeated blocks: {trace.reused[1]} traced, {trace.reused[0]} calls replayed from them")
    return notes


def _step_figures(model: nn.Module, optimizer: Any, batch: Any, target: Any, trace: _Trace, saves: list[_Save],
                  covered: list[bool], device: str, rnd: Callable[[int], int], hooks: list[Any], scaler: Any,
                  notes: list[str]) -> StepFigures:
    """The static totals, leaves and optimizer figures the replay reads (each as (raw, allocated))."""
    tensors_pb = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    grad_sizes = [trace.grad_nbytes(p) for p in trace.twin.parameters() if p.requires_grad]
    batch_storages = [t.untyped_storage().nbytes() for t in
                      {_storage_key(t): t for t in _tensors((batch, target))}.values()]
    opt_raw, opt_alloc, temps, eager = _optimizer_figures(optimizer, device, rnd, hooks, notes)
    sc = grad_scaler_tensors() if _scaler_enabled(scaler, device) else None
    if sc is not None:
        notes.append(f"GradScaler: its scale and growth tracker ({sum(sc.kept)} B) are counted as other")
    program = _optimizer_program(optimizer, hooks)
    if program is not None:
        notes.append(f"{type(optimizer).__name__}.step() is replayed as its rule's program: every iteration that "
                     "max_iter and max_eval allow runs; a run stopping early on its tolerances holds less")
    grads_of, accum_of = _param_grads_by_call(trace, covered, trace.twin)
    saved_keys = {s.key for s in saves if s.region is None}
    region_saves: dict[int, list[_Save]] = {}
    for s in saves:
        if s.region is not None:
            region_saves.setdefault(s.region, []).append(s)
    return StepFigures(
        device=device, rnd=rnd,
        params=(sum(_nbytes(t) for t in tensors_pb.values()), sum(rnd(_nbytes(t)) for t in tensors_pb.values())),
        grads=(sum(grad_sizes), sum(map(rnd, grad_sizes))),
        batch=(sum(batch_storages), sum(map(rnd, batch_storages))),
        optimizer=(opt_raw, opt_alloc), optimizer_temps=temps, eager_state=eager,
        saves=saves, leaves=_leaves(trace, saves, covered, grads_of, accum_of),
        out_keep=_output_keep(trace, saved_keys),
        held_saves=frozenset(_storage_key(t) for t in held_by(trace.output, extra=trace.side_held)) & saved_keys,
        loss=sum(t.untyped_storage().nbytes() for t in _tensors(trace.loss)), scaler=sc, region_saves=region_saves,
        loss_seed=sum(_nbytes(t) for t in _tensors(trace.loss)),
        optimizer_program=program,
    )
