"""The peak model: replay the traced step phase by phase and find its peak and category split."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._core.categories import CATEGORIES, Category, Phase
from .._measure.allocator import round_allocation
from .optimizer_rules import grad_scaler_tensors
from .layer_table import _layer_table
from .leaves import _leaves, _param_grads_by_call
from .optimizer_figures import _foreign_params, _has_rule, _optimizer_figures, _scaler_enabled
from .plugins import plugin_manager
from .results import Estimate
from .saves import _Save, _saves
from .storages import _nbytes, _storage_key, _tensors
from .trace import trace_step


def rounding_for(device: str) -> Callable[[int], int]:
    """The allocator's rounding for ``device``: 512-B blocks on CUDA, raw bytes on the CPU."""
    return round_allocation if device == "cuda" else (lambda n: n)


class _Live:
    """Live bytes per category (raw and allocated) with a running peak and its split."""

    def __init__(self) -> None:
        self.raw = {c: 0 for c in CATEGORIES}
        self.alloc = 0
        self.peak = -1
        self.peak_split: dict[Category, int] = {}

    def add(self, category: Category, raw: int, alloc: int) -> None:
        self.raw[category] += raw
        self.alloc += alloc

    def observe(self, extra: Iterable[tuple[Category, int, int]] = ()) -> None:
        """Take the current live bytes (plus transient ``extra``) as a peak candidate."""
        raw = dict(self.raw)
        alloc = self.alloc
        for c, r, a in extra:
            raw[c] += r
            alloc += a
        if alloc > self.peak:
            raw[Category.OTHER] += alloc - sum(raw.values())
            self.peak, self.peak_split = alloc, raw

    def start_phase(self) -> None:
        self.peak = -1
        self.observe()


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
    hooks = [h for h in (hook, plugin_manager.hook) if h is not None]
    trace = trace_step(model, batch, target=target, loss_fn=loss_fn, device=device, hooks=hooks,
                       autocast_dtype=autocast_dtype, reuse_blocks=reuse_blocks)
    saves, covered = _saves(trace, rnd)
    notes: list[str] = []
    if trace.user_autocast is not None:
        notes.append(f"the model or loss enters {trace.user_autocast} itself: meta tensors ignore it, so its "
                     "activations are estimated in full precision (pass autocast_dtype=... to the step instead)")
    if trace.reused[0]:
        notes.append(f"repeated blocks: {trace.reused[1]} traced, {trace.reused[0]} calls replayed from them")

    # -- static totals
    tensors_pb = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        tensors_pb[id(t)] = t
    params_raw = sum(_nbytes(t) for t in tensors_pb.values())
    params_alloc = sum(rnd(_nbytes(t)) for t in tensors_pb.values())
    grad_sizes = [trace.grad_nbytes(p) for p in trace.twin.parameters() if p.requires_grad]
    grads_raw = sum(grad_sizes)
    grads_alloc = sum(map(rnd, grad_sizes))
    batch_tensors = {_storage_key(t): t for t in _tensors((batch, target))}
    batch_raw = sum(t.untyped_storage().nbytes() for t in batch_tensors.values())
    batch_alloc = sum(rnd(t.untyped_storage().nbytes()) for t in batch_tensors.values())
    act_raw = sum(s.raw for s in saves if s.region is None)

    opt_raw, opt_alloc, temps, eager = _optimizer_figures(optimizer, device, rnd, hooks, notes)
    sc = grad_scaler_tensors() if _scaler_enabled(scaler, device) else None
    if sc is not None:
        notes.append(f"GradScaler: its scale and growth tracker ({sum(sc.kept)} B) are counted as other")

    def tensors(category: Category, sizes: Iterable[int], sign: int = 1) -> list[tuple[Category, int, int]]:
        return [(category, sign * n, sign * rnd(n)) for n in sizes]

    def add_all(items: Iterable[tuple[Category, int, int]]) -> None:
        for c, r, a in items:
            live.add(c, r, a)

    grads_of, accum_of = _param_grads_by_call(trace, covered, trace.twin)
    leaves = _leaves(trace, saves, covered, grads_of, accum_of)
    outs = _tensors(trace.output)
    out_key = _storage_key(outs[0]) if outs else None
    saved_keys = {s.key for s in saves if s.region is None}
    out_keep = sum(_nbytes(t) for t in outs if _storage_key(t) not in saved_keys | trace.batch_keys)
    loss_raw = sum(_nbytes(t) for t in _tensors(trace.loss))
    del out_key

    region_saves: dict[int, list[_Save]] = {}
    for s in saves:
        if s.region is not None:
            region_saves.setdefault(s.region, []).append(s)

    live = _Live()

    def free(s: _Save, recomputed: set[int]) -> None:
        """Backward is past ``s``'s first save: it is freed (a region save only if it was recomputed)."""
        if s.region is None:
            live.add(Category.ACTIVATIONS, -s.raw, -s.alloc)
        elif s.region in recomputed:
            live.add(T, -s.raw, -s.alloc)

    phase_peaks: dict[Phase, int] = {}
    step_peaks: list[int] = []
    best: tuple[int, Phase, int, dict[Category, int]] | None = None
    T = Category.TEMPORARIES

    category_peaks = {c: 0 for c in CATEGORIES}

    def close(step: int, phase: Phase) -> None:
        nonlocal best
        for c, v in live.peak_split.items():
            category_peaks[c] = max(category_peaks[c], v)
        phase_peaks[phase] = max(phase_peaks.get(phase, 0), live.peak)
        if best is None or live.peak > best[0]:
            best = (live.peak, phase, step, live.peak_split)

    for step in range(steps):
        step_start = len(step_peaks)
        peaks_this_step = []
        if step == 0:
            live.start_phase()
            live.add(Category.PARAMS, params_raw, params_alloc)
            if eager:
                live.add(Category.OPTIMIZER, opt_raw, opt_alloc)
            live.observe()
            close(0, Phase.SETUP)
            peaks_this_step.append(live.peak)
            live.start_phase()
            live.add(Category.BATCH, batch_raw, batch_alloc)
            live.observe()
            close(0, Phase.BATCH)
            peaks_this_step.append(live.peak)
        grads_present = step > 0 and not set_to_none

        # forward: saved tensors accumulate; each leaf's unsaved output/input is a transient
        live.start_phase()
        save_iter = iter([s for s in saves if s.region is None])
        pending = next(save_iter, None)
        for leaf in leaves:
            while pending is not None and pending.position <= leaf.position:
                live.add(Category.ACTIVATIONS, pending.raw, pending.alloc)
                pending = next(save_iter, None)
            live.observe([(T, leaf.out_new + sum(leaf.in_live), rnd(leaf.out_new) + sum(map(rnd, leaf.in_live))),
                          (Category.ACTIVATIONS, sum(leaf.later_saved), sum(map(rnd, leaf.later_saved)))])
            if leaf.inner_live:
                live.observe([(T, sum(leaf.inner_live) + sum(leaf.in_live),
                               sum(map(rnd, leaf.inner_live)) + sum(map(rnd, leaf.in_live))),
                              (Category.ACTIVATIONS, -leaf.inner_unsaved[0], -leaf.inner_unsaved[1])])
        while pending is not None:
            live.add(Category.ACTIVATIONS, pending.raw, pending.alloc)
            pending = next(save_iter, None)
        live.add(T, out_keep + loss_raw, rnd(out_keep) + rnd(loss_raw))
        live.observe()
        close(step, Phase.FORWARD)
        peaks_this_step.append(live.peak)

        # backward: reverse sweep; a storage is freed once the sweep passes its first save
        live.start_phase()
        seed = loss_raw
        live.add(T, seed, rnd(seed))
        if sc is not None:
            if step == 0:  # the first scale() makes the scale and the growth tracker
                add_all(tensors(Category.OTHER, sc.kept))
            add_all(tensors(T, sc.backward))
            live.observe(tensors(T, sc.backward_start))
        remaining = sorted(saves, key=lambda s: s.position)
        recomputed: set[int] = set()
        for i in range(len(leaves) - 1, -1, -1):
            leaf = leaves[i]
            if leaf.region is not None and leaf.region not in recomputed:
                # checkpoint: the first unpack reruns the region's forward, which makes all its saves again
                recomputed.add(leaf.region)
                for s in region_saves.get(leaf.region, ()):
                    live.add(T, s.raw, s.alloc)
            new_grads = [] if grads_present else list(leaf.grad_raw)
            accum = list(leaf.grad_raw) if grads_present else []
            held = [(T, leaf.in_raw, rnd(leaf.in_raw))] + [(T, g, rnd(g)) for g in leaf.cross_raw]
            if leaf.inner_raw:
                # a chain inside the call (cross-entropy: log_softmax -> nll_loss): the inner grad is made
                # beside the output grad, then the input grad beside it
                inner = (T, leaf.inner_raw, rnd(leaf.inner_raw))
                live.observe([(T, leaf.out_raw, rnd(leaf.out_raw)), inner] + held[1:])
                live.observe([inner] + held)
            threshold = leaves[i - 1].position if i > 0 else float("-inf")
            if leaf.cast_raw:
                # autocast: the kernels make grads of the low-precision weight copies; the call's saves and
                # output grad go, then each is cast back to the parameter's dtype beside it (measured on an
                # fp16 MLP: the fp32 weight grad appears after the saved fp16 input is freed)
                casts = [(T, g, rnd(g)) for g in leaf.cast_raw]
                live.observe([(T, leaf.out_raw, rnd(leaf.out_raw))] + held + casts)
                while remaining and remaining[-1].position > threshold:
                    free(remaining.pop(), recomputed)
                extra = held + casts
            else:
                extra = [(T, leaf.out_raw, rnd(leaf.out_raw))] + held
            if leaf.grad_ops and new_grads and not leaf.cast_raw and leaf.region is None:
                # a traced call runs many ops (attention: in_proj, sdpa, out_proj): backward makes each grad
                # at its op and frees the saves of later ops before it (attention's saves go before in_proj's
                # weight grad appears)
                mine = []
                while remaining and remaining[-1].position > threshold:
                    mine.append(remaining.pop())
                mine.sort(key=lambda s: -1 if s.op is None else s.op)
                extra = held  # grad_inner has the output's grad where it is still alive
                op_peaks = dict(leaf.op_peaks)
                for op in sorted(set(leaf.grad_ops) | set(op_peaks), reverse=True):
                    while mine and mine[-1].op is not None and mine[-1].op > op:
                        free(mine.pop(), recomputed)
                    if op in op_peaks:
                        live.observe(held[1:] + [(T, g, rnd(g)) for g in op_peaks[op]])
                        continue
                    made = [g for g, o in zip(new_grads, leaf.grad_ops) if o == op]
                    at = leaf.grad_ops.index(op)
                    inner = leaf.grad_inner[at]
                    if leaf.grad_split and leaf.grad_split[at]:
                        live.observe(held[1:] + [(T, g, rnd(g)) for g in leaf.grad_split[at]])
                    live.observe(extra + [(T, g, rnd(g)) for g in inner] + [(Category.GRADS, g, rnd(g)) for g in made])
                    for g in made:
                        live.add(Category.GRADS, g, rnd(g))
                for s in mine:
                    free(s, recomputed)
            else:
                extra += [(Category.GRADS, g, rnd(g)) for g in new_grads] + [(T, g, rnd(g)) for g in accum]
                live.observe(extra)
                for g in new_grads:
                    live.add(Category.GRADS, g, rnd(g))
            # a grad the loss already made (L1 penalty): once the call's backward is done, its contribution
            # and the out-of-place sum are alive beside the old grad (measured: 2 x the parameter's bytes)
            for g in leaf.accum_raw:
                live.observe([(T, 2 * g, 2 * rnd(g))])
            while remaining and remaining[-1].position > threshold:
                free(remaining.pop(), recomputed)
        while remaining:
            free(remaining.pop(), recomputed)
        live.add(T, -(out_keep + loss_raw + seed), -(rnd(out_keep) + rnd(loss_raw) + rnd(seed)))
        if sc is not None:
            add_all(tensors(T, sc.backward, -1))
        # grads of trainable params no leaf owned (e.g. used only by functional code in a container)
        missing = grads_raw - live.raw[Category.GRADS]
        if missing > 0:
            live.add(Category.GRADS, missing, missing if device == "cpu" else rnd(missing))
        live.observe()
        close(step, Phase.BACKWARD)
        peaks_this_step.append(live.peak)

        # optimizer: lazy state on the first step, then temporaries
        live.start_phase()
        if sc is not None:  # scaler.step(): unscale_ first, then optimizer.step() beside found_inf
            live.observe(tensors(T, sc.unscale))
        if step == 0 and not eager:
            live.add(Category.OPTIMIZER, opt_raw, opt_alloc)
        live.observe([(T, temps[0], temps[1])] + (tensors(T, sc.step) if sc is not None else []))
        close(step, Phase.OPTIMIZER)
        peaks_this_step.append(live.peak)

        # zero_grad: set_to_none frees the grads
        live.start_phase()
        if set_to_none:
            live.add(Category.GRADS, -live.raw[Category.GRADS], -(grads_alloc if device == "cuda" else grads_raw))
        close(step, Phase.ZERO_GRAD)
        peaks_this_step.append(live.peak)
        step_peaks.append(max(peaks_this_step))
        del step_start

    assert best is not None
    peak, peak_phase, peak_step, peak_split = best
    layers = _layer_table(trace, saves, covered)
    categories = {
        Category.PARAMS: params_raw, Category.GRADS: grads_raw, Category.OPTIMIZER: opt_raw,
        Category.BATCH: batch_raw, Category.ACTIVATIONS: act_raw,
    }
    return Estimate(
        device=device, peak=peak, peak_phase=peak_phase, peak_step=peak_step, peak_split=peak_split,
        phases=phase_peaks, params=params_raw, grads=grads_raw, optimizer=opt_raw, batch=batch_raw,
        activations=act_raw, layers=layers, notes=tuple(notes), step_peaks=tuple(step_peaks),
        categories=categories, category_peaks=category_peaks,
        unestimated=(() if _has_rule(optimizer, hooks) else ("optimizer",)),
        autocast_inside=trace.user_autocast,
        foreign_optimizer_params=_foreign_params(optimizer, model),
    )
