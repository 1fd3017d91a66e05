"""Dispatch-level storage tracker: an event log of storage allocations and frees, per phase.

Every op output seen by a ``TorchDispatchMode`` is resolved to its untyped storage; the first
sighting of a storage is an allocation event, the storage's weakref callback a free event. What a
storage is *for* (params, grads, ...) is decided at the end from what was learned during the step
(``mark``), and the log is then replayed once to find peaks, their category mix and what each
phase retained. Views share a storage, so they count once.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from .._compat import TorchDispatchMode, storage_key, tree_flatten

from .._compat import dtensor_local, sparse_parts
from .._core.categories import CATEGORIES, Category, Phase

#: Priority when a storage was marked twice: a parameter saved for backward stays a parameter.
_PRIORITY: dict[Category, int] = {
    Category.PARAMS: 0,
    Category.BATCH: 1,
    Category.GRADS: 2,
    Category.OPTIMIZER: 3,
    Category.ACTIVATIONS: 4,
    Category.TEMPORARIES: 5,
    Category.OTHER: 6,
}

#: tensor types whose ops may take the backend's kernel shortcuts (a wrapper subclass such as DTensor may not)
_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))

RoundFn = Callable[[int], int]
Kernel = Callable[[Any, tuple, dict], Any]  #: (func, args, kwargs) -> what func(*args, **kwargs) returns


def no_rounding(nbytes: int) -> int:
    """Bytes as the tensor holds them (the ``cpu`` backend)."""
    return nbytes


@dataclass
class _Event:
    key: int        #: storage key, or -1 for a phase mark
    delta: int      #: +size on allocation, -size on free (rounded, what an allocator would report)
    raw: int        #: the same in raw storage bytes
    step: int = -1  #: for phase marks
    phase: Phase | None = None


@dataclass(frozen=True)
class Allocation:
    """One allocation (size > 0) or free (size < 0) of a tracked storage, with the phase it happened in."""

    key: int                   #: the storage's key (a resized storage keeps its key: a free, then an allocation)
    size: int                  #: +bytes allocated / -bytes freed, rounded as the allocator hands them out
    raw: int                   #: the same in the storage's own bytes
    step: int                  #: the step it happened in (-1 before the first phase mark)
    phase: Phase | None        #: the phase it happened in (None before the first phase mark)


@dataclass(frozen=True)
class PhaseReplay:
    """Replayed figures of one (step, phase)."""

    step: int
    phase: Phase
    peak: int
    peak_split: dict[Category, int]
    retained: int
    retained_split: dict[Category, int]
    events: tuple[int, int]  #: [first, last) event indices, for allocator models
    #: named parts at the peak, raw bytes, as "category: part" ("other: cuBLAS workspace (main thread)",
    #: "grads: gradient buckets"); library workspaces (``library_allocation``) and ``mark_part`` names alike
    peak_parts: dict[str, int] = field(default_factory=dict)
    #: the most raw bytes each named part held at any instant of the phase (communication buffers have a
    #: closed form for this, not for their share of the phase's peak)
    part_peaks: dict[str, int] = field(default_factory=dict)
    #: with library allocations: (peak, tracked bytes at it) of the same log without them, else None
    without_libraries: tuple[int, int] | None = None


class StorageTracker(TorchDispatchMode):
    """Records allocations and frees of storages on one device type while active.

    ``rounding`` maps a storage's byte size to what the allocator would hand out (512-B blocks on
    CUDA); categories are reported in raw bytes and the rounding surplus as ``other``.
    """

    def __init__(self, device_type: str, rounding: RoundFn = no_rounding,
                 shortcuts: Callable[[Any], Kernel | None] | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self.rounding = rounding
        #: op -> an equivalent, cheaper kernel or None (the emulated backend's meta_kernels.kernel_for)
        self._shortcuts = shortcuts
        self._kernels: dict[Any, Kernel | None] = {}
        self._events: list[_Event] = []
        self._live: dict[int, tuple[int, int, int, weakref.ref]] = {}  # storage_key -> (key, size, raw, ref)
        self._next_key = 0
        self._marks: dict[int, Category] = {}
        self._ignored: dict[int, weakref.ref] = {}  #: storages that are not this measurement's, while they live
        #: key -> its named part within its category: ``mark_part`` names (distributed steps' buffers) and
        #: ``library_allocation`` names (workspaces, in ``other``)
        self._parts: dict[int, str] = {}
        self._library: set[int] = set()  #: keys of library allocations (kept for the process, never freed)
        self._closed = False
        #: called before every op; ``track()`` uses it to notice that autograd's backward began
        self.on_dispatch: Callable[[], None] | None = None
        #: called after every op with (tracker, func, args, kwargs); the emulated backend adds library workspaces
        self.after_op: Callable[[StorageTracker, Any, tuple, dict], None] | None = None

    # -- recording ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on_dispatch is not None:
            self.on_dispatch()
        kwargs = kwargs or {}
        if self._shortcuts is None or not _PLAIN_TYPES.issuperset(types):  # a DTensor op: its own dispatch shards it
            out = func(*args, **kwargs)
        else:
            try:
                kernel = self._kernels[func]
            except KeyError:
                kernel = self._kernels[func] = self._shortcuts(func)
            out = func(*args, **kwargs) if kernel is None else kernel(func, args, kwargs)
        if isinstance(out, torch.Tensor):  # most ops: skip flattening
            self.observe(out)
        else:
            flat, _ = tree_flatten(out)
            for item in flat:
                if isinstance(item, torch.Tensor):
                    self.observe(item)
        if self.after_op is not None:
            self.after_op(self, func, args, kwargs)
        return out

    def library_allocation(self, part: str, nbytes: int) -> int:
        """Record ``nbytes`` a library allocates through the caching allocator and keeps for the process
        (a cuBLAS workspace): category ``other``, reported under the name ``part``; returns its key."""
        key = self._next_key
        self._next_key += 1
        self._marks[key] = Category.OTHER
        self._parts[key] = part
        self._library.add(key)
        self._record(key, self.rounding(nbytes), nbytes)
        return key

    def observe(self, tensor: torch.Tensor) -> int | None:
        """Register ``tensor``'s storage if it is on the tracked device; return its key.

        A sparse COO tensor holds two storages (indices and values): both are registered, the key of its
        values is returned; other layouts are not tracked.
        """
        local = dtensor_local(tensor)
        if local is not None:  # a DTensor (FSDP2's sharded parameters, their grads and state): this rank's shard
            return self.observe(local)
        if tensor.device.type != self.device_type:
            return None
        if tensor.layout == torch.sparse_coo:
            parts = sparse_parts(tensor)
            keys = [self.observe(part) for part in parts]
            return keys[-1] if keys else None
        if tensor.layout != torch.strided:
            return None
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. nested, functional)
            return None
        ident = storage_key(tensor)
        entry = self._live.get(ident)
        if entry is None and ident in self._ignored:
            return None
        raw = storage.nbytes()
        if entry is not None:
            key, size, old_raw, ref = entry
            if raw == old_raw:
                return key
            # resize_ in place: the allocator frees the old block and hands out a new one
            self._record(key, -size, -old_raw)
            size = self.rounding(raw)
            self._live[ident] = (key, size, raw, ref)
            self._record(key, size, raw)
            return key
        key = self._next_key
        self._next_key += 1
        size = self.rounding(raw)
        ref = weakref.ref(storage, self._make_free_callback(ident))
        self._live[ident] = (key, size, raw, ref)
        self._record(key, size, raw)
        return key

    def _make_free_callback(self, ident: int) -> Callable[[weakref.ref], None]:
        def on_free(_ref: weakref.ref) -> None:
            entry = self._live.get(ident)
            if entry is not None and entry[3] is _ref:
                del self._live[ident]
                if not self._closed:
                    self._record(entry[0], -entry[1], -entry[2])

        return on_free

    def _record(self, key: int, delta: int, raw: int) -> None:
        self._events.append(_Event(key, delta, raw))

    def start_phase(self, step: int, phase: Phase) -> None:
        """Mark that everything from now on belongs to ``phase`` of step ``step``."""
        self._events.append(_Event(-1, 0, 0, step, phase))

    def mark(self, tensors: Iterable[torch.Tensor], category: Category) -> None:
        """Say what the storages of ``tensors`` are for (registering them if not yet seen)."""
        for t in tensors:
            if t is None:
                continue
            parts = sparse_parts(t) if t.layout == torch.sparse_coo else (t,)
            for part in parts:  # a sparse gradient: its indices and values are both grads
                key = self.observe(part)
                if key is None:
                    continue
                old = self._marks.get(key)
                if old is None or _PRIORITY[category] < _PRIORITY[old]:
                    self._marks[key] = category

    def ignore(self, tensors: Iterable[torch.Tensor]) -> None:
        """Never register the storages of ``tensors`` while they live: they are not the measured step's (the
        whole-model copy a sharded layout is made from, which a rank initialised on meta never holds)."""
        for t in tensors:
            storage = t.untyped_storage()
            ident = storage_key(t)
            self._ignored[ident] = weakref.ref(storage, lambda _ref, ident=ident: self._ignored.pop(ident, None))

    def mark_part(self, tensors: Iterable[torch.Tensor], part: str) -> None:
        """Name what the storages of ``tensors`` are within their category ('gradient buckets'); first name wins."""
        for t in tensors:
            key = self.observe(t) if t is not None else None
            if key is not None:
                self._parts.setdefault(key, part)

    def storage_resized(self, storage: Any) -> None:
        """A tracked storage was resized outside the dispatcher (``UntypedStorage.resize_``): a free and an allocation."""
        entry = self._live.get(storage._cdata)
        if entry is None or self._closed:
            return
        key, size, old_raw, ref = entry
        raw = storage.nbytes()
        if raw != old_raw:
            self._record(key, -size, -old_raw)
            size = self.rounding(raw)
            self._live[storage._cdata] = (key, size, raw, ref)
            self._record(key, size, raw)

    def key_of(self, tensor: torch.Tensor) -> int | None:
        """The key of ``tensor``'s storage if it is live and tracked."""
        if tensor.device.type != self.device_type:
            return None
        entry = self._live.get(storage_key(tensor))
        return entry[0] if entry is not None else None

    def live_bytes(self) -> int:
        """Rounded bytes of the tracked storages alive now."""
        # a copy first: frees arrive from other threads too (gloo's, autograd's device thread) and would change
        # the dict under a Python-level iteration; list() copies it without letting another thread run
        return sum(entry[1] for entry in list(self._live.values()))

    def next_key(self) -> int:
        """The key the next storage seen will get (keys are handed out in order)."""
        return self._next_key

    def alive_since(self, key: int, excluding: frozenset[int] = frozenset()) -> bool:
        """Whether a storage first seen at or after ``key``, other than those keyed ``excluding``, is still alive
        (read from a copy, as live_bytes)."""
        return any(entry[0] >= key and entry[0] not in excluding for entry in list(self._live.values()))

    def close(self) -> None:
        """Stop recording frees (storages outliving the measurement are still live at its end)."""
        self._closed = True

    # -- replay ----------------------------------------------------------------------------
    def category_of(self, key: int) -> Category:
        return self._marks.get(key, Category.TEMPORARIES)

    def allocations(self) -> Iterator[Allocation]:
        """Every allocation and free in order, each with its step and phase (the log's public view)."""
        step, phase = -1, None
        for ev in self._events:
            if ev.key < 0:
                step, phase = ev.step, ev.phase
            else:
                yield Allocation(ev.key, ev.delta, ev.raw, step, phase)

    def allocation_events(self) -> Iterator[tuple[int, int]]:
        """(key, +size | -size) of every allocation and free in order, for allocator models."""
        for event in self.allocations():
            yield event.key, event.size

    def replay(self) -> list[PhaseReplay]:
        """Walk the log once: per (step, phase) the rounded peak, its raw category mix, and what remained."""
        cat_index = {c: i for i, c in enumerate(CATEGORIES)}
        totals = [0] * len(CATEGORIES)
        allocated = 0
        results: list[PhaseReplay] = []
        current: tuple[int, Phase] | None = None
        peak = -1
        peak_mix: list[int] = []
        first = 0
        alloc_index = 0
        parts: dict[str, int] = {}
        peak_parts: dict[str, int] = {}
        part_peaks: dict[str, int] = {}
        library = 0              # rounded bytes of library allocations so far (never freed)
        bare = (-1, 0)           # (peak, tracked bytes) without them, this phase
        other = cat_index[Category.OTHER]

        def split(mix: list[int], rounded: int) -> dict[Category, int]:
            out = {c: mix[i] for i, c in enumerate(CATEGORIES)}
            out[Category.OTHER] += rounded - sum(mix)
            return out

        def close_phase() -> None:
            if current is not None:
                results.append(
                    PhaseReplay(
                        step=current[0],
                        phase=current[1],
                        peak=peak,
                        peak_split=split(peak_mix, peak),
                        retained=allocated,
                        retained_split=split(totals, allocated),
                        events=(first, alloc_index),
                        peak_parts={k: v for k, v in peak_parts.items() if v},
                        part_peaks={k: v for k, v in part_peaks.items() if v},
                        without_libraries=bare if self._library else None,
                    )
                )

        for ev in self._events:
            if ev.key < 0:
                close_phase()
                current = (ev.step, ev.phase)
                peak, peak_mix, first, peak_parts = allocated, list(totals), alloc_index, dict(parts)
                part_peaks = dict(parts)
                bare = (allocated - library, sum(totals) - totals[other])
                continue
            alloc_index += 1
            allocated += ev.delta
            category = self.category_of(ev.key)
            totals[cat_index[category]] += ev.raw
            part = self._parts.get(ev.key) if self._parts else None
            if part is not None:
                name = f"{category.value}: {part}"
                parts[name] = parts.get(name, 0) + ev.raw
                part_peaks[name] = max(part_peaks.get(name, 0), parts[name])
                if ev.key in self._library:
                    library += ev.delta
            if allocated > peak:
                peak, peak_mix = allocated, list(totals)
                if self._parts:
                    peak_parts = dict(parts)
            if self._library and allocated - library > bare[0]:
                bare = (allocated - library, sum(totals) - totals[other])
        close_phase()
        return results
