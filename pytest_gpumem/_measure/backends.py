"""Where bytes come from: the real CUDA allocator, real CPU tensors, or an emulation of CUDA on meta tensors.

A backend says which device the step's tensors live on, how the tracker rounds sizes, and turns
the tracker's replayed phases into ``PhaseStats`` (adding the allocator's own figures on CUDA).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .allocator import CachingAllocatorModel, replay_allocations, round_allocation, rounding_for
from .._core.categories import BACKENDS, Category, Phase  # noqa: F401  (BACKENDS re-exported)
from .._core.results import PhaseStats
from .tracker import Kernel, PhaseReplay, StorageTracker, no_rounding



def resolve_backend_name(name: str | None) -> str:
    """'auto' (or None) -> 'cuda' when a GPU is present, else 'emulated'; validate the rest."""
    name = (name or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown gpumem backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "emulated"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "gpumem backend 'cuda' was asked for but torch.cuda.is_available() is False; "
            "use backend 'emulated' (predicts CUDA figures on the CPU) or 'auto'"
        )
    return name


@dataclass
class Backend:
    """Common shape of the three backends; subclasses fill in the device-specific parts."""

    name: str = "cpu"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    notes: list[str] = field(default_factory=list)
    #: every tracker this backend made, so the plugin can look for leaks after the test
    trackers: list[StorageTracker] = field(default_factory=list)

    @property
    def rounding(self) -> Callable[[int], int]:
        return no_rounding

    @property
    def tracked_device_type(self) -> str:
        return self.device.type

    def describe(self) -> str:
        """What the figures describe, in words (goes into StepReport.device)."""
        return "cpu"

    @property
    def kernel_shortcuts(self) -> Callable[[Any], Kernel | None] | None:
        """Cheaper equivalents of slow kernels the tracker may run instead (None: always the op itself)."""
        return None

    @property
    def models_caching_allocator(self) -> bool:
        """Whether allocated bytes follow the CUDA caching allocator's blocks (cuda, emulated)."""
        return self.rounding is round_allocation

    def make_tracker(self) -> StorageTracker:
        tracker = StorageTracker(self.tracked_device_type, self.rounding, self.kernel_shortcuts)
        self.trackers.append(tracker)
        return tracker

    def make_value_mode(self):
        """A dispatch mode keeping real values beside the step's tensors (None: they have their own)."""
        return None

    def begin(self) -> None:
        """Called once before anything is measured."""

    def phase_started(self, step: int, phase: Phase) -> None:
        """Called at the start of every phase."""

    def phase_ended(self, step: int, phase: Phase) -> None:
        """Called at the end of every phase."""

    def after_placement(self, tracker: StorageTracker) -> None:
        """Called once the model, optimizer and batch are on the device, before the step runs."""

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Context the forward and backward passes run in (the emulated backend patches kernels)."""
        return contextlib.nullcontext()

    def loop_context(self, optimizer) -> contextlib.AbstractContextManager:
        """Context a hand-written loop (``track()``) runs in: forward, backward and optimizer together."""
        return contextlib.nullcontext()

    def autocast(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this backend's device."""
        return torch.autocast(self.device.type, dtype=dtype)

    def add_value_notes(self, notes: list[str]) -> None:
        """The value-aware emulation's notes (reads answered neutrally, upper bounds) join the report's."""
        self.notes.extend(notes)

    def model_placed(self, model) -> None:
        """Called with the user's (eager) model before it is placed: notes about what the backend cannot model."""

    def explain_failure(self, exc: BaseException) -> str | None:
        """Advice for an error the step raised on this backend (None: nothing to add)."""
        return None

    def optimizer_context(self, optimizer) -> contextlib.AbstractContextManager:
        """Context optimizer.step() runs in (the emulated backend picks CUDA's default implementation)."""
        return contextlib.nullcontext()

    def grad_scaler(self, scaler):
        """The GradScaler to use on this backend for the user's ``scaler`` (True: a default one)."""
        if scaler is True:
            return torch.amp.GradScaler(self.device.type)
        return scaler or None  # False means no scaler

    def phase_stats(self, tracker: StorageTracker, replays: list[PhaseReplay]) -> list[PhaseStats]:
        """Turn replayed phases into the reported per-phase figures."""
        return [
            PhaseStats(r.phase, r.peak, r.retained, r.peak_split, r.retained_split, None, r.peak_parts,
                       part_peaks=r.part_peaks) for r in replays
        ]


@dataclass
class CpuBackend(Backend):
    """Real CPU tensors, every storage tracked at dispatch level; bytes exactly as tensors hold them."""

    name: str = "cpu"

    def describe(self) -> str:
        return "cpu"


@dataclass
class EmulatedBackend(Backend):
    """Meta tensors (no real memory) with the CUDA caching allocator's rules applied."""

    name: str = "emulated"
    device: torch.device = field(default_factory=lambda: torch.device("meta"))
    #: the GPU predicted (a DeviceProfile); None: none named, so library workspaces are left out (a note says so)
    profile: Any = None
    #: the environment of the CUDA process predicted (allocator settings, CUBLAS_WORKSPACE_CONFIG...); None: os.environ
    environment: Any = None
    #: PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF as the allocator model applies them (read when built)
    allocator_settings: Any = None
    _libraries: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.allocator_settings is None:
            from .._cuda_facts.allocator_settings import from_environment

            # UnsupportedAllocatorSettings names what is not modelled
            self.allocator_settings = from_environment(self.environment)
        if not self.allocator_settings.is_default:
            self.notes.append(f"allocator settings modelled: {self.allocator_settings.source}")

    def make_tracker(self) -> StorageTracker:
        from .._emulation.library_allocations import LibraryAllocations

        tracker = super().make_tracker()
        libraries = LibraryAllocations(self.profile, self.environment)
        self._libraries.append(libraries)
        tracker.after_op = libraries
        return tracker

    @property
    def rounding(self) -> Callable[[int], int]:
        return rounding_for(self.allocator_settings)

    @property
    def models_caching_allocator(self) -> bool:
        return True

    @property
    def kernel_shortcuts(self) -> Callable[[Any], Kernel | None] | None:
        from .._emulation.meta_kernels import kernel_for  # exact stand-ins for torch's slowest meta kernels

        return kernel_for

    def describe(self) -> str:
        if self.profile is not None:
            return f"{self.profile.name} (emulated on meta tensors)"
        return "cuda (emulated on meta tensors)"

    def make_value_mode(self):
        from .._emulation.values import KnownValues  # data-dependent code runs on values kept beside meta

        return KnownValues()

    def forward_context(self) -> contextlib.AbstractContextManager:
        return self._cuda_semantics()

    def _cuda_semantics(self) -> contextlib.ExitStack:
        """Kernel substitutions that make meta save what CUDA saves; their notes (the attention kernel assumed
        for each distinct call) join the report's notes when the context exits."""
        from .. import _emulation as emulation

        from .._emulation import attention

        stack = contextlib.ExitStack()
        if self.profile is not None:
            stack.enter_context(attention.target_gpu(self.profile))
        stack.enter_context(emulation.cuda_semantics())
        stack.callback(self._take_kernel_notes)
        return stack

    def _take_kernel_notes(self) -> None:
        from .._emulation import attention

        self.notes.extend(note for note in attention.take_notes() if note not in self.notes)
        for libraries in self._libraries:
            self.notes.extend(note for note in libraries.notes if note not in self.notes)

    def optimizer_context(self, optimizer) -> contextlib.AbstractContextManager:
        from .. import _emulation as emulation

        stack = self._cuda_semantics()
        if optimizer is not None:
            stack.enter_context(emulation.predict_cuda_optimizer(optimizer))
            if isinstance(optimizer, torch.optim.LBFGS) and emulation.LBFGS_NOTE not in self.notes:
                self.notes.append(emulation.LBFGS_NOTE)
        return stack

    def loop_context(self, optimizer) -> contextlib.AbstractContextManager:
        return self.optimizer_context(optimizer)

    def model_placed(self, model) -> None:
        from .._cuda_facts.rnn import RESERVE_NOTE, trains_cudnn_rnn

        if trains_cudnn_rnn(model.modules()) and RESERVE_NOTE not in self.notes:
            self.notes.append(RESERVE_NOTE)

    def add_value_notes(self, notes: list[str]) -> None:
        """As the base class, but LBFGS's own stopping-test reads are covered by its one note (they do not hold
        memory constant there: the loop's length follows them)."""
        from .._emulation import LBFGS_NOTE

        if LBFGS_NOTE in self.notes:
            notes = [n for n in notes if " at torch/optim/lbfgs.py:" not in n]
        self.notes.extend(notes)

    def autocast(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        from .._emulation import emulated_autocast  # torch.autocast("cuda") as CUDA does it, on meta

        return emulated_autocast(dtype)

    def explain_failure(self, exc: BaseException) -> str | None:
        from .._emulation import explain_meta_failure

        return explain_meta_failure(exc)

    def grad_scaler(self, scaler):
        """A real GradScaler disables itself without a GPU; the emulated one runs its kernels on meta."""
        from .. import _emulation as emulation

        if scaler is None or scaler is False:
            return None
        if not isinstance(scaler, emulation.EmulatedGradScaler):
            self.notes.append("GradScaler replaced by EmulatedGradScaler (same kernels, on meta tensors)")
            return emulation.EmulatedGradScaler()
        return scaler

    def phase_stats(self, tracker: StorageTracker, replays: list[PhaseReplay]) -> list[PhaseStats]:
        """Allocated and reserved bytes from the allocator model, the category split from the tracker.

        The model hands out whole blocks: a cached or fresh large block is not split when less than
        1 MiB would remain, so allocated bytes can exceed the 512-B-rounded request; that surplus is
        ``other``, as on a real GPU.
        """
        self._take_kernel_notes()
        after = list(replay_allocations(tracker.allocation_events(), CachingAllocatorModel(self.allocator_settings)))
        allocated_after = [allocated for allocated, _ in after]
        reserved_after = [reserved for _, reserved in after]
        stats = []
        allocated_before = reserved_before = 0
        for r in replays:
            first, end = r.events
            peak = max(allocated_after[first:end], default=allocated_before)
            peak = max(peak, allocated_before)
            reserved_peak = max(max(reserved_after[first:end], default=reserved_before), reserved_before)
            if end > first:
                allocated_before, reserved_before = allocated_after[end - 1], reserved_after[end - 1]
            stats.append(_with_allocator_figures(r, peak, allocated_before, reserved_peak))
        return stats


@dataclass
class CudaBackend(Backend):
    """The real caching allocator's figures; the tracker supplies the category split.

    Bytes present before the measurement that are not the step's (other tests' leftovers,
    cuBLAS workspaces) are a baseline subtracted from every figure; bytes the allocator holds
    beyond what the tracker saw (workspaces created during the step) are reported as ``other``.
    """

    name: str = "cuda"
    _foreign: int = 0
    _allocator: dict[tuple[int, Phase], list[tuple[int, int, int]]] = field(default_factory=dict)

    @property
    def rounding(self) -> Callable[[int], int]:
        return round_allocation

    def describe(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def begin(self) -> None:
        self._allocator.clear()  # a backend object may measure several sessions
        self._foreign = 0
        warm_up_cuda(self.device)

    def after_placement(self, tracker: StorageTracker) -> None:
        """Bytes allocated now that the tracker does not account for (model, batch, state) are not the step's."""
        self._foreign = torch.cuda.memory_allocated(self.device) - tracker.live_bytes()

    def phase_started(self, step: int, phase: Phase) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def phase_ended(self, step: int, phase: Phase) -> None:
        figures = (
            torch.cuda.max_memory_allocated(self.device),
            torch.cuda.memory_allocated(self.device),
            torch.cuda.max_memory_reserved(self.device),
        )
        # a phase can recur within a step (gradient accumulation): keep its largest peaks, latest retained
        self._allocator.setdefault((step, phase), []).append(figures)

    def phase_stats(self, tracker: StorageTracker, replays: list[PhaseReplay]) -> list[PhaseStats]:
        stats = []
        seen: dict[tuple[int, Phase], int] = {}
        for r in replays:
            occurrence = seen[(r.step, r.phase)] = seen.get((r.step, r.phase), -1) + 1
            recorded = self._allocator.get((r.step, r.phase), [])
            peak, now, reserved = recorded[occurrence] if occurrence < len(recorded) else (r.peak, r.retained, None)
            stats.append(_with_allocator_figures(r, peak - self._foreign, now - self._foreign, reserved))
        return stats


def _with_allocator_figures(r: PhaseReplay, peak: int, retained: int, reserved: int | None) -> PhaseStats:
    """The allocator's (or its model's) bytes, split by the tracker; what it holds beyond the tracker is 'other'."""
    peak_split = dict(r.peak_split)
    peak_split[Category.OTHER] += peak - r.peak
    retained_split = dict(r.retained_split)
    retained_split[Category.OTHER] += retained - r.retained
    return PhaseStats(r.phase, peak, retained, peak_split, retained_split, reserved, dict(r.peak_parts),
                      r.without_libraries, dict(r.part_peaks))


def warm_up_cuda(device: torch.device) -> None:
    """Create cuBLAS/cuBLASLt handles and workspaces (fp32 and half GEMMs, a convolution) before measuring,
    and release cached blocks, so figures do not depend on which test ran first."""
    torch.cuda.set_device(device)
    x = torch.ones(8, 64, device=device, requires_grad=True)
    w = torch.ones(64, 64, device=device, requires_grad=True)
    b = torch.zeros(64, device=device, requires_grad=True)
    torch.nn.functional.linear(x, w, b).sum().backward()  # addmm: the cuBLASLt path
    (x @ w).sum().backward()
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            torch.nn.functional.linear(x, w, b).float().sum().backward()
    image = torch.ones(2, 3, 16, 16, device=device, requires_grad=True)
    kernel = torch.ones(4, 3, 3, 3, device=device, requires_grad=True)
    torch.nn.functional.conv2d(image, kernel).sum().backward()
    del x, w, b, image, kernel
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # reserved figures start from what is in use, not other tests' cache


def cuda_device_for_worker(worker_id: str | None) -> torch.device:
    """The GPU an xdist worker should use: gw<N> -> cuda:<N mod device count>."""
    count = torch.cuda.device_count()
    if not worker_id or not worker_id.startswith("gw") or count == 0:
        return torch.device("cuda", torch.cuda.current_device() if count else 0)
    return torch.device("cuda", int(worker_id[2:]) % count)


def make_backend(name: str | None, *, cuda_device: torch.device | None = None, device: Any = None) -> Backend:
    """Build the backend named ``name`` ('auto' picks cuda when a GPU is present, else emulated); ``device``
    (a GPU name or DeviceProfile) is the GPU the emulated backend predicts."""
    resolved = resolve_backend_name(name)
    if resolved == "cuda":
        return CudaBackend(device=cuda_device or torch.device("cuda", torch.cuda.current_device()))
    if resolved == "emulated":
        from .._emulation.devices import resolve

        return EmulatedBackend(profile=resolve(device))
    return CpuBackend()
