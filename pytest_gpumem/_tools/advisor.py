"""Batch-size advisor: the largest batch that fits a budget, from three measurements (or estimates), no OOM trials.

Every storage a training step allocates has a size ``fixed + per_sample * batch`` (parameters, grads and
optimizer state are fixed; batch and activations grow), and a step at any batch size allocates and frees
the same storages in the same order. So three probes give each storage's size as a function of the batch
(fitted from the outer two, checked against the middle one), and replaying the step's allocation log at
any batch size, with the backend's rounding, gives its peak without running it. The peak is only
piecewise linear in the batch size (which moment is the peak moves with it), which is why the advisor
replays rather than fitting the peak itself. Storages whose size is not linear are reported: a convex one
is fitted with the parabola through the three probes (what a batch x batch tensor adds), a concave one
with its steeper slope. Exact on the ``cpu`` and ``emulated`` backends; on ``cuda`` it models what the
tracker sees, not library workspaces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .._measure.allocator import CachingAllocatorModel, replay_allocations
from .._core.categories import estimate_device
from .._core.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from .._measure.tracker import StorageTracker

__all__ = ["advise_batch_size", "max_batch_size", "BatchAdvice", "StepModel", "SizeFit", "Probe", "fit_size",
           "largest_fitting", "DEFAULT_PROBES"]

ModelOrFactory = Union[nn.Module, Callable[[], nn.Module]]
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
MakeBatch = Callable[[int], "tuple[Any, Any]"]

#: Batch sizes measured by default: small (cheap, and safe on a real GPU), spread over a factor of 4.
#: Not 1: some layers take another path at batch size 1 (nn.TransformerEncoderLayer allocates differently).
DEFAULT_PROBES = (2, 4, 8)
#: The largest answer given (when nothing grows with the batch, or the budget is huge).
MAX_ANSWER = 2**20

#: One allocation-log entry: (storage instance, phase label, raw bytes) for an allocation, raw None for a free.
Op = tuple[int, str, Optional[int]]


@dataclass(frozen=True)
class Probe:
    """One measured (or estimated) step at ``batch_size``: its allocation log, rounding and reported peak."""

    batch_size: int
    ops: tuple[Op, ...]
    peak: int
    rounding: Callable[[int], int]
    whole_blocks: bool = False  #: allocated bytes follow the caching allocator's blocks (cuda, emulated)
    allocator_settings: Any = None  #: the emulated backend's AllocatorSettings (None: the defaults)


@dataclass(frozen=True)
class SizeFit:
    """A storage's raw size as ``fixed + per_sample * b + per_sample_squared * b**2`` (exact fractions)."""

    fixed: Fraction
    per_sample: Fraction
    per_sample_squared: Fraction = Fraction(0)
    linear: bool = True

    def at(self, batch_size: int) -> int:
        return max(0, math.ceil(self.fixed + self.per_sample * batch_size + self.per_sample_squared * batch_size**2))


@dataclass(frozen=True)
class BatchAdvice:
    """The advisor's answer with the model it came from."""

    max_batch: int                          #: largest batch with peak <= safety * budget (0: none fits)
    fixed_bytes: int                        #: bytes at the limiting moment that do not grow with the batch
    per_sample_bytes: float                 #: bytes per sample there (the slope of the peak near the answer)
    limiting_phase: str                     #: the phase where max_batch + 1 would first exceed, e.g. "steady/backward"
    linear: bool                            #: every storage's size is linear in the batch size
    budget: int
    safety: float
    method: str                             #: "measure" or "estimate"
    samples: tuple[tuple[int, int], ...]    #: (batch size, reported peak bytes) of each probe
    notes: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        return math.floor(self.safety * self.budget)

    def __str__(self) -> str:
        fit = "linear" if self.linear else "NOT linear"
        return (f"max batch {self.max_batch} within {self.safety:.0%} of {format_bytes(self.budget)}: "
                f"{format_bytes(self.fixed_bytes)} + {format_bytes(self.per_sample_bytes)}/sample during "
                f"{self.limiting_phase} ({fit}; {len(self.samples)} {self.method} probes)")


# --------------------------------------------------------------------------- probes

def _log_of(tracker: StorageTracker) -> tuple[Op, ...]:
    """The tracker's allocations and frees as Ops, each allocation a new instance, labelled by phase."""
    current: dict[int, int] = {}   # storage key -> instance
    ops: list[Op] = []
    for index, event in enumerate(tracker.allocations()):
        label = "" if event.phase is None else f"{'first' if event.step == 0 else 'steady'}/{event.phase.value}"
        if event.key not in current:  # a storage's events alternate: allocation, free, allocation (resize_), ...
            current[event.key] = index
            ops.append((index, label, event.raw))
        else:
            ops.append((current.pop(event.key), label, None))
    return tuple(ops)


def _measure(model_or_factory, optimizer_factory, make_batch, batch_size, *, backend, loss_fn, steps,
             device=None) -> Probe:
    """One measured step at ``batch_size`` with its allocation log (taken when the backend replays it)."""
    from .._measure.backends import make_backend
    from .._measure.step import measure_step  # local: the advisor sits beside step, importing it only when measuring

    be = make_backend(backend, device=device)  # a named GPU: its library workspaces are part of every probe
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    inputs, target = make_batch(batch_size)
    report = measure_step(model, optimizer_factory(model.parameters()), inputs, target=target, loss_fn=loss_fn,
                          backend=be, steps=steps)
    return Probe(batch_size, _log_of(be.trackers[-1]), report.peak, be.rounding, be.models_caching_allocator,
                 getattr(be, "allocator_settings", None))


def _estimate(model_or_factory, optimizer_factory, make_batch, batch_size, *, backend, loss_fn, steps) -> Probe:
    """The estimated peak at ``batch_size`` as a one-storage log (device: the CPU for backend "cpu", else CUDA)."""
    from .._estimate import estimate_step

    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    inputs, target = make_batch(batch_size)
    device = estimate_device(backend)
    estimate = estimate_step(model, optimizer_factory(model.parameters()), inputs, target=target,
                             loss_fn=loss_fn, device=device, steps=steps)
    return Probe(batch_size, ((0, "estimate/peak", int(estimate.peak)),), int(estimate.peak), lambda n: n)


# --------------------------------------------------------------------------- model

def fit_size(points: Sequence[tuple[int, int]]) -> SizeFit:
    """The line through the outer two of three (batch, bytes) points if the middle one is on it, else a bend."""
    (b0, m0), (b1, m1), (b2, m2) = points
    outer = Fraction(m2 - m0, b2 - b0)
    if m0 + outer * (b1 - b0) == m1:
        return SizeFit(m0 - outer * b0, outer)
    left, right = Fraction(m1 - m0, b1 - b0), Fraction(m2 - m1, b2 - b1)
    if right > left:  # convex: the parabola through the three points
        squared = (right - left) / (b2 - b0)
        slope = left - squared * (b0 + b1)
        return SizeFit(m0 - slope * b0 - squared * b0 * b0, slope, squared, linear=False)
    return SizeFit(m2 - left * b2, left, linear=False)  # concave: the steeper slope through the last point


@dataclass(frozen=True)
class StepModel:
    """A step's allocation log with every storage's size a function of the batch size."""

    ops: tuple[tuple[int, str, bool], ...]   #: (instance, phase, is allocation)
    sizes: dict[int, SizeFit]
    rounding: Callable[[int], int]
    whole_blocks: bool = False
    allocator_settings: Any = None  #: the probes' AllocatorSettings, replayed with the same model

    @classmethod
    def from_probes(cls, probes: Sequence[Probe]) -> "StepModel":
        shapes = {tuple((i, p, raw is None) for i, p, raw in probe.ops) for probe in probes}
        if len(shapes) != 1:
            counts = ", ".join(f"{len(p.ops)} at batch {p.batch_size}" for p in probes)
            raise ValueError(f"the step allocated differently at each probe ({counts}); choose other probes")
        raws = [{i: raw for i, _, raw in probe.ops if raw is not None} for probe in probes]
        sizes = {i: fit_size([(p.batch_size, r[i]) for p, r in zip(probes, raws)]) for i in raws[0]}
        ops = tuple((i, p, raw is not None) for i, p, raw in probes[0].ops)
        return cls(ops, sizes, probes[0].rounding, probes[0].whole_blocks, probes[0].allocator_settings)

    def peak(self, batch_size: int) -> tuple[int, int, str, int]:
        """(peak bytes, its op index, phase, storages live then) of a step at ``batch_size``, by replay."""
        live: dict[int, int] = {}

        def events() -> Iterator[tuple[int, int]]:
            for instance, _, alloc in self.ops:
                if alloc:
                    live[instance] = self.rounding(self.sizes[instance].at(batch_size))
                    yield instance, live[instance]
                else:
                    yield instance, -live.pop(instance)

        best = 0
        where = (0, "", 0)
        allocator = CachingAllocatorModel(self.allocator_settings) if self.whole_blocks else None
        for index, ((allocated, _), (_, phase, alloc)) in enumerate(zip(replay_allocations(events(), allocator),
                                                                         self.ops)):
            if alloc and allocated > best:
                best, where = allocated, (index, phase, len(live))
        return (best, *where)

    def line_at(self, op_index: int) -> tuple[Fraction, Fraction]:
        """(fixed, per_sample) raw bytes of the storages live just after op ``op_index``."""
        live: set[int] = set()
        for instance, _, alloc in self.ops[: op_index + 1]:
            (live.add if alloc else live.discard)(instance)
        return (sum((self.sizes[i].fixed for i in live), Fraction(0)),
                sum((self.sizes[i].per_sample for i in live), Fraction(0)))

    def max_batch(self, usable: int, *, start: int = 1) -> int:
        """The largest batch whose replayed peak is <= ``usable``."""
        return largest_fitting(lambda b: self.peak(b)[0], usable, start=start)


def largest_fitting(peak_of: Callable[[int], int], usable: int, *, start: int = 1) -> int:
    """The largest batch b with peak_of(b) <= usable, peaks growing with b: double from ``start``, then bisect."""
    if peak_of(1) > usable:
        return 0
    low, high = 1, max(2, start)
    while high < MAX_ANSWER and peak_of(high) <= usable:
        low, high = high, min(MAX_ANSWER, high * 2)
    if peak_of(high) <= usable:
        return high
    while high - low > 1:  # invariant: low fits, high does not
        mid = (low + high) // 2
        low, high = (mid, high) if peak_of(mid) <= usable else (low, mid)
    return low


# --------------------------------------------------------------------------- public API

def _check(budget, safety, probes, method) -> tuple[int, tuple[int, ...]]:
    budget_bytes = parse_bytes(budget)
    if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not 0 < safety <= 1:
        raise ValueError(f"safety={safety!r} must be a number in (0, 1]")
    sizes = tuple(sorted(set(probes)))
    if len(sizes) != 3 or sizes[0] < 1:
        raise ValueError(f"probes={probes!r} must be three different batch sizes >= 1")
    if method not in ("measure", "estimate"):
        raise ValueError(f"method={method!r} must be 'measure' or 'estimate'")
    return budget_bytes, sizes


def advise_batch_size(
    model_or_factory: ModelOrFactory,
    optimizer_factory: OptimizerFactory,
    make_batch: MakeBatch,
    *,
    budget: Union[int, str],
    safety: float = 0.8,
    backend: str = "auto",
    method: str = "measure",
    probes: Sequence[int] = DEFAULT_PROBES,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    steps: int = 2,
    device: Any = None,
) -> BatchAdvice:
    """Measure (or estimate) three probe batch sizes, model every storage's size, solve for the budget.

    ``make_batch(batch_size)`` returns ``(inputs, target)`` (target may be None). A factory gives a fresh
    model per probe; a model instance is reused. ``method="estimate"`` fits estimate_step's peak instead.
    ``device`` (a GPU name or DeviceProfile) is the GPU the emulated backend predicts, workspaces included.

    >>> advise_batch_size(lambda: nn.Linear(784, 10), lambda p: torch.optim.SGD(p, lr=0.1),
    ...                   lambda b: (torch.randn(b, 784), torch.randint(10, (b,))),
    ...                   budget="1MB", backend="cpu").max_batch  # doctest: +SKIP
    228
    """
    budget_bytes, sizes = _check(budget, safety, probes, method)
    probe_at = _measure if method == "measure" else _estimate
    on_device = {"device": device} if method == "measure" and device is not None else {}
    runs = [probe_at(model_or_factory, optimizer_factory, make_batch, b, backend=backend, loss_fn=loss_fn,
                     steps=steps, **on_device) for b in sizes]
    model = StepModel.from_probes(runs)
    usable = math.floor(safety * budget_bytes)
    answer = model.max_batch(usable, start=sizes[-1])
    if method == "estimate":
        # The estimate's peak is piecewise linear too (its peak phase moves with the batch) and an estimate
        # costs milliseconds: settle the answer on the estimate itself, starting from the fitted line's.
        def estimated(b: int) -> int:
            return _estimate(model_or_factory, optimizer_factory, make_batch, b, backend=backend,
                             loss_fn=loss_fn, steps=steps).peak

        answer = largest_fitting(estimated, usable, start=max(answer, 1))
    _, index, phase, _ = model.peak(min(answer + 1, MAX_ANSWER))
    fixed, per_sample = model.line_at(index)
    bent = [i for i, fit in model.sizes.items() if not fit.linear]
    notes: tuple[str, ...] = ()
    if bent:
        notes += (f"{len(bent)} of {len(model.sizes)} storages do not grow linearly with the batch size "
                  f"(probes {sizes}); fitted with a parabola or the steeper slope",)
    if answer >= MAX_ANSWER:
        notes += (f"the answer is capped at {MAX_ANSWER}",)
    return BatchAdvice(
        max_batch=answer, fixed_bytes=math.ceil(fixed), per_sample_bytes=float(per_sample),
        limiting_phase=phase, linear=not bent, budget=budget_bytes, safety=safety, method=method,
        samples=tuple((r.batch_size, r.peak) for r in runs), notes=notes,
    )


def max_batch_size(
    model_or_factory: ModelOrFactory,
    optimizer_factory: OptimizerFactory,
    make_batch: MakeBatch,
    *,
    budget: Union[int, str],
    safety: float = 0.8,
    backend: str = "auto",
    method: str = "measure",
    **options: Any,
) -> int:
    """The largest batch size whose step peak stays within ``safety * budget`` (see advise_batch_size)."""
    return advise_batch_size(model_or_factory, optimizer_factory, make_batch, budget=budget, safety=safety,
                             backend=backend, method=method, **options).max_batch
