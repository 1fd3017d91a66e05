"""The peak model's replay: the traced step phase by phase, live bytes per category, peaks and their split.

Forward accumulates saved tensors (each leaf call's unsaved output and inputs are transient); backward
sweeps the leaves in reverse, freeing a storage once it passes its first save while gradients appear
(checkpoint regions recompute their saves); the optimizer creates its state lazily and holds its step()
temporaries; zero_grad frees the grads. :class:`StepFigures` holds what the replay needs, computed once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .._core.categories import CATEGORIES, Category, Phase
from .leaves import _Leaf
from .saves import _Save

T = Category.TEMPORARIES
Item = tuple[Category, int, int]  #: (category, raw bytes, allocated bytes)
Event = tuple  #: an optimizer program's event (see StepReplay._run_program)


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

    def observe(self, extra: Iterable[Item] = ()) -> None:
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


@dataclass(frozen=True)
class StepFigures:
    """Everything the replay reads: static totals (raw, allocated), saves, leaves and optimizer figures."""

    device: str
    rnd: Callable[[int], int]
    params: tuple[int, int]
    grads: tuple[int, int]
    batch: tuple[int, int]
    optimizer: tuple[int, int]
    optimizer_temps: tuple[int, int]
    eager_state: bool                #: optimizer state made in __init__ (Adagrad), present from setup
    saves: list[_Save]
    leaves: list[_Leaf]
    out_keep: int                    #: output bytes nobody saves, alive from forward's end to backward's end
    loss: int                        #: bytes of the loss tensor's storage (the CPU's mse_loss: the unreduced buffer)
    scaler: Any = None               #: grad_scaler_tensors() when a GradScaler scales, else None
    region_saves: dict[int, list[_Save]] = field(default_factory=dict)
    #: saved storages the model's output also holds (the step keeps the output until backward ends): not freed
    #: when backward passes their save, but when backward ends
    held_saves: frozenset = frozenset()
    #: step -> the optimizer phase's events, for a rule with a program (LBFGS); None: state and temporaries
    optimizer_program: Callable[[int], list["Event"]] | None = None
    loss_seed: int | None = None     #: bytes of backward's seed gradient (the loss's elements); None: ``loss``


class StepReplay:
    """Replays ``steps`` steps over :class:`StepFigures`; ``close`` records each phase's peak."""

    def __init__(self, f: StepFigures, set_to_none: bool) -> None:
        self.f = f
        self.set_to_none = set_to_none
        self.live = _Live()
        self.phase_peaks: dict[Phase, int] = {}
        self.step_peaks: list[int] = []
        self.category_peaks = {c: 0 for c in CATEGORIES}
        self.best: tuple[int, Phase, int, dict[Category, int]] | None = None
        self._this_step: list[int] = []

    def items(self, category: Category, sizes: Iterable[int], sign: int = 1) -> list[Item]:
        return [(category, sign * n, sign * self.f.rnd(n)) for n in sizes]

    def add_all(self, items: Iterable[Item]) -> None:
        for c, r, a in items:
            self.live.add(c, r, a)

    def close(self, step: int, phase: Phase) -> None:
        live = self.live
        for c, v in live.peak_split.items():
            self.category_peaks[c] = max(self.category_peaks[c], v)
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), live.peak)
        if self.best is None or live.peak > self.best[0]:
            self.best = (live.peak, phase, step, live.peak_split)
        self._this_step.append(live.peak)

    def run(self, steps: int) -> None:
        for step in range(steps):
            self._this_step = []
            if step == 0:
                self.setup()
            self.forward(step)
            self.backward(step)
            self.optimizer(step)
            self.zero_grad(step)
            self.step_peaks.append(max(self._this_step))

    def setup(self) -> None:
        f, live = self.f, self.live
        live.start_phase()
        live.add(Category.PARAMS, *f.params)
        if f.eager_state:
            live.add(Category.OPTIMIZER, *f.optimizer)
        live.observe()
        self.close(0, Phase.SETUP)
        live.start_phase()
        live.add(Category.BATCH, *f.batch)
        live.observe()
        self.close(0, Phase.BATCH)

    def forward(self, step: int) -> None:
        self.live.start_phase()
        self._forward()
        self.close(step, Phase.FORWARD)

    def _forward(self) -> None:
        """Saved tensors accumulate; each leaf's unsaved output and inputs are transients beside them."""
        f, live, rnd = self.f, self.live, self.f.rnd
        save_iter = iter([s for s in f.saves if s.region is None])
        pending = next(save_iter, None)
        for leaf in f.leaves:
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
        live.add(T, f.out_keep + f.loss, rnd(f.out_keep) + rnd(f.loss))
        live.observe()

    def backward(self, step: int) -> None:
        self.live.start_phase()
        self._backward(step, grads_present=step > 0 and not self.set_to_none)
        self.close(step, Phase.BACKWARD)

    def _backward(self, step: int, grads_present: bool) -> None:
        """A reverse sweep over the leaves: a storage is freed once the sweep passes its first save."""
        f, live, rnd = self.f, self.live, self.f.rnd
        seed = f.loss if f.loss_seed is None else f.loss_seed
        live.add(T, seed, rnd(seed))  # the seed gradient
        sc = f.scaler
        if sc is not None:
            if step == 0:  # the first scale() makes the scale and the growth tracker
                self.add_all(self.items(Category.OTHER, sc.kept))
            self.add_all(self.items(T, sc.backward))
            live.observe(self.items(T, sc.backward_start))
        self._remaining = sorted(f.saves, key=lambda s: s.position)
        self._recomputed: set[int] = set()
        self._held: list[_Save] = []
        for i in range(len(f.leaves) - 1, -1, -1):
            self._backward_leaf(i, grads_present)
        while self._remaining:
            self._free(self._remaining.pop())
        for s in self._held:
            self._free(s, ending=True)
        live.add(T, -(f.out_keep + f.loss + seed), -(rnd(f.out_keep) + rnd(f.loss) + rnd(seed)))
        if sc is not None:
            self.add_all(self.items(T, sc.backward, -1))
        # grads of trainable params no leaf owned (e.g. used only by functional code in a container)
        missing = f.grads[0] - live.raw[Category.GRADS]
        if missing > 0:
            live.add(Category.GRADS, missing, missing if f.device == "cpu" else rnd(missing))
        live.observe()

    def _free(self, s: _Save, *, ending: bool = False) -> None:
        """Backward is past ``s``'s first save: it is freed (a region save only if it was recomputed; one the
        output holds only when backward ends)."""
        if s.region is None and s.key in self.f.held_saves and not ending:
            self._held.append(s)
        elif s.region is None:
            self.live.add(Category.ACTIVATIONS, -s.raw, -s.alloc)
        elif s.region in self._recomputed:
            self.live.add(T, -s.raw, -s.alloc)

    def _free_after(self, threshold: float) -> list[_Save]:
        out = []
        while self._remaining and self._remaining[-1].position > threshold:
            out.append(self._remaining.pop())
        return out

    def _backward_leaf(self, i: int, grads_present: bool) -> None:
        f, live, rnd = self.f, self.live, self.f.rnd
        leaf = f.leaves[i]
        if leaf.region is not None and leaf.region not in self._recomputed:
            # checkpoint: the first unpack reruns the region's forward, which makes all its saves again
            self._recomputed.add(leaf.region)
            for s in f.region_saves.get(leaf.region, ()):
                live.add(T, s.raw, s.alloc)
        new_grads = [] if grads_present else list(leaf.grad_raw)
        accum = list(leaf.grad_raw) if grads_present else []
        held = [(T, leaf.in_raw, rnd(leaf.in_raw))] + [(T, g, rnd(g)) for g in leaf.cross_raw]
        scratch = [(T, b, rnd(b)) for b in leaf.scratch]
        if leaf.inner_raw:
            # a chain inside the call (cross-entropy: log_softmax -> nll_loss): the inner grad is made
            # beside the output grad, then the input grad beside it
            inner = (T, leaf.inner_raw, rnd(leaf.inner_raw))
            live.observe([(T, leaf.out_raw, rnd(leaf.out_raw)), inner] + held[1:])
            live.observe([inner] + held)
            if leaf.chain_raw:
                live.observe([(T, g, rnd(g)) for g in leaf.chain_raw] + held[1:])
        threshold = f.leaves[i - 1].position if i > 0 else float("-inf")
        if leaf.cast_raw:
            # autocast: the kernels make grads of the low-precision weight copies; the call's saves and
            # output grad go, then each is cast back to the parameter's dtype beside it (measured on an
            # fp16 MLP: the fp32 weight grad appears after the saved fp16 input is freed)
            casts = [(T, g, rnd(g)) for g in leaf.cast_raw]
            live.observe([(T, leaf.out_raw, rnd(leaf.out_raw))] + held + casts)
            for s in self._free_after(threshold):
                self._free(s)
            extra = held + casts
        else:
            extra = [(T, leaf.out_raw, rnd(leaf.out_raw))] + held
        if leaf.grad_ops and new_grads and not leaf.cast_raw and leaf.region is None:
            self._backward_by_op(leaf, new_grads, held, threshold)
        else:
            extra += [(Category.GRADS, g, rnd(g)) for g in new_grads] + [(T, g, rnd(g)) for g in accum]
            live.observe(extra + scratch)
            for g in new_grads:
                live.add(Category.GRADS, g, rnd(g))
        # a grad a later call already made (L1 penalty in the loss, a head tied to this embedding): once the
        # call's backward is done, its contribution and the out-of-place sum are alive beside the old grad
        # (measured: 2 x the parameter's bytes), the input's grad and the grads held across the call (a
        # cross-attention's grad into the encoder output, Whisper: 0.1 MiB of its peak)
        for g in leaf.accum_raw:
            live.observe(held + [(T, 2 * g, 2 * rnd(g))])
        for s in self._free_after(threshold):
            self._free(s)

    def _backward_by_op(self, leaf: _Leaf, new_grads: list[int], held: list[Item], threshold: float) -> None:
        """A traced call runs many ops (attention: in_proj, sdpa, out_proj): backward makes each grad at its op
        and frees the saves of later ops before it (attention's saves go before in_proj's weight grad)."""
        live, rnd = self.live, self.f.rnd
        mine = self._free_after(threshold)
        mine.sort(key=lambda s: -1 if s.op is None else s.op)
        op_peaks = dict(leaf.op_peaks)
        for op in sorted(set(leaf.grad_ops) | set(op_peaks), reverse=True):
            while mine and mine[-1].op is not None and mine[-1].op > op:
                self._free(mine.pop())
            if op in op_peaks:
                live.observe(held[1:] + [(T, g, rnd(g)) for g in op_peaks[op]])
                continue
            made = [g for g, o in zip(new_grads, leaf.grad_ops) if o == op]
            at = leaf.grad_ops.index(op)
            if leaf.grad_split and leaf.grad_split[at]:
                live.observe(held[1:] + [(T, g, rnd(g)) for g in leaf.grad_split[at]])
            # grad_inner has the output's grad where it is still alive
            live.observe(held + [(T, g, rnd(g)) for g in leaf.grad_inner[at]]
                         + [(Category.GRADS, g, rnd(g)) for g in made])
            for g in made:
                live.add(Category.GRADS, g, rnd(g))
        for s in mine:
            self._free(s)

    def optimizer(self, step: int) -> None:
        """Lazy state on the first step, then step()'s temporaries (after unscale_ under a GradScaler); or the
        rule's program of the step (LBFGS: its state changes, temporaries and closure re-evaluations)."""
        f, live, sc = self.f, self.live, self.f.scaler
        live.start_phase()
        if f.optimizer_program is not None:
            self._run_program(step, f.optimizer_program(step))
            self.close(step, Phase.OPTIMIZER)
            return
        if sc is not None:  # scaler.step(): unscale_ first, then optimizer.step() beside found_inf
            live.observe(self.items(T, sc.unscale))
        if step == 0 and not f.eager_state:
            live.add(Category.OPTIMIZER, *f.optimizer)
        live.observe([(T, *f.optimizer_temps)] + (self.items(T, sc.step) if sc is not None else []))
        self.close(step, Phase.OPTIMIZER)

    def _run_program(self, step: int, events: Iterable[Event]) -> None:
        """Replay an optimizer step's events: ("add", category, bytes) (negative frees), ("peek", [(category,
        bytes)]) transients observed beside what is live, ("closure",) zero_grad + forward + backward again."""
        live, rnd = self.live, self.f.rnd
        for event in events:
            if event[0] == "add":
                _, category, n = event
                live.add(category, n, rnd(n) if n >= 0 else -rnd(-n))
                live.observe()
            elif event[0] == "peek":
                live.observe([(c, n, rnd(n)) for c, n in event[1]])
            elif event[0] == "closure":
                self._free_grads()
                self._forward()
                self._backward(step, grads_present=not self.set_to_none)  # its loss: step() keeps a float
            else:
                raise ValueError(f"unknown optimizer program event {event!r}")

    def _free_grads(self) -> None:
        if self.set_to_none:
            f = self.f
            self.live.add(Category.GRADS, -self.live.raw[Category.GRADS],
                          -(f.grads[1] if f.device == "cuda" else f.grads[0]))

    def zero_grad(self, step: int) -> None:
        """set_to_none frees the grads."""
        self.live.start_phase()
        self._free_grads()
        self.close(step, Phase.ZERO_GRAD)
