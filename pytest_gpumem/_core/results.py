"""Result dataclasses of a measured step: per phase, per category, per step; with to_dict()/from_dict()."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .categories import CATEGORIES, PHASES, Category, Phase
from .text_table import render_table
from .units import format_bytes

Split = Mapping[Category, int]


def split_to_dict(split: Split) -> dict[str, int]:
    """A category split as a plain dict in the canonical category order (zeros kept)."""
    return {c.value: int(split.get(c, 0)) for c in CATEGORIES}


def split_from_dict(data: Mapping[str, int]) -> dict[Category, int]:
    return {Category(k): int(v) for k, v in data.items()}


@dataclass(frozen=True)
class RankInfo:
    """Which rank of which layout a StepReport measured (``StepReport.parallel``)."""

    strategy: str                 #: "DDP", "FSDP" or "ZeRO"
    world_size: int
    rank: int
    settings: Mapping[str, Any]   #: the strategy's ``to_dict()`` (strategy and world_size included)

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world_size": self.world_size, "rank": self.rank,
                "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RankInfo":
        return cls(str(data["strategy"]), int(data["world_size"]), int(data["rank"]), dict(data.get("settings") or {}))

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}, {self.strategy}"


_OTHER_PREFIX = f"{Category.OTHER.value}: "


def _parts_from_dict(data: Mapping[str, Any]) -> dict[str, int]:
    """A phase's named parts from JSON; files written before the parts were unified kept ``other``'s apart."""
    parts = {str(k): int(v) for k, v in (data.get("peak_parts") or {}).items()}
    parts.update({_OTHER_PREFIX + str(k): int(v) for k, v in (data.get("other_parts") or {}).items()})
    return parts


@dataclass(frozen=True)
class PhaseStats:
    """What one phase of one step did to memory."""

    phase: Phase
    peak: int                      #: max allocated bytes during the phase
    retained: int                  #: allocated bytes when the phase ended
    peak_split: dict[Category, int]  #: category mix at the phase's peak instant
    retained_split: dict[Category, int]
    reserved_peak: int | None = None  #: max reserved bytes (cuda, emulated), None on cpu
    #: named parts at the phase's peak as "category: part", raw bytes: library workspaces in ``other``
    #: ("other: cuBLAS workspace (main thread)"), distributed buffers ("grads: gradient buckets")
    peak_parts: dict[str, int] = field(default_factory=dict)
    #: (peak, tracked bytes at it) had the libraries allocated nothing; None without library allocations.
    #: In-process only (not in JSON): the estimate check compares the step's own bytes with it
    without_libraries: tuple[int, int] | None = field(default=None, compare=False)
    #: the most raw bytes each named part held at any instant of the phase, whether or not at its peak
    #: (what the closed forms of communication buffers predict)
    part_peaks: dict[str, int] = field(default_factory=dict)

    @property
    def other_parts(self) -> dict[str, int]:
        """The named parts of ``other`` at the peak (library workspaces), without the "other: " prefix."""
        return {name[len(_OTHER_PREFIX):]: n for name, n in self.peak_parts.items() if name.startswith(_OTHER_PREFIX)}

    def to_dict(self) -> dict[str, Any]:
        data = {
            "phase": self.phase.value,
            "peak_bytes": self.peak,
            "retained_bytes": self.retained,
            "reserved_peak_bytes": self.reserved_peak,
            "peak_split": split_to_dict(self.peak_split),
            "retained_split": split_to_dict(self.retained_split),
        }
        if self.peak_parts:
            data["peak_parts"] = dict(self.peak_parts)
        if self.part_peaks:
            data["part_peaks"] = dict(self.part_peaks)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PhaseStats":
        return cls(
            phase=Phase(data["phase"]),
            peak=int(data["peak_bytes"]),
            retained=int(data["retained_bytes"]),
            peak_split=split_from_dict(data["peak_split"]),
            retained_split=split_from_dict(data["retained_split"]),
            reserved_peak=data.get("reserved_peak_bytes"),
            peak_parts=_parts_from_dict(data),
            part_peaks={str(k): int(v) for k, v in (data.get("part_peaks") or {}).items()},
        )


@dataclass(frozen=True)
class StepMeasurement:
    """One training step: its peak, where the peak fell and the per-phase figures."""

    index: int                     #: 0 = first step (optimizer state created lazily), 1.. = steady
    peak: int
    peak_phase: Phase
    peak_split: dict[Category, int]
    phases: dict[Phase, PhaseStats]
    reserved_peak: int | None = None

    @property
    def label(self) -> str:
        return "first" if self.index == 0 else "steady"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "peak_bytes": self.peak,
            "peak_phase": self.peak_phase.value,
            "reserved_peak_bytes": self.reserved_peak,
            "peak_split": split_to_dict(self.peak_split),
            "phases": [self.phases[p].to_dict() for p in PHASES if p in self.phases],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StepMeasurement":
        phases = [PhaseStats.from_dict(p) for p in data["phases"]]
        return cls(
            index=int(data["index"]),
            peak=int(data["peak_bytes"]),
            peak_phase=Phase(data["peak_phase"]),
            peak_split=split_from_dict(data["peak_split"]),
            phases={p.phase: p for p in phases},
            reserved_peak=data.get("reserved_peak_bytes"),
        )


@dataclass(frozen=True)
class StepReport:
    """Everything measured about a training step on one backend.

    ``steps[0]`` is the first step (lazy optimizer state appears there), later ones are steady.
    The top-level ``peak``/``peak_split``/``phases`` are those of the step with the larger peak.
    """

    backend: str                  #: "cuda", "cpu" or "emulated"
    device: str                   #: what the figures describe, e.g. "NVIDIA H100 80GB HBM3" or "cuda (emulated on meta tensors)"
    torch_version: str
    cuda_version: str | None
    steps: tuple[StepMeasurement, ...]
    notes: tuple[str, ...] = ()   #: what the backend substituted or could not see, in words
    parallel: RankInfo | None = None  #: the rank and strategy of a data-parallel or sharded step; None: one device

    @property
    def peak_step(self) -> StepMeasurement:
        """The step with the largest peak (the first one on ties)."""
        return max(self.steps, key=lambda s: (s.peak, -s.index))

    @property
    def peak(self) -> int:
        return self.peak_step.peak

    @property
    def peak_phase(self) -> Phase:
        return self.peak_step.peak_phase

    @property
    def peak_split(self) -> dict[Category, int]:
        return self.peak_step.peak_split

    @property
    def phases(self) -> dict[Phase, PhaseStats]:
        return self.peak_step.phases

    def tracked_peak(self) -> int:
        """Tracked bytes (every category but ``other``) at the peak; with library allocations (workspaces),
        at the peak the step would have without them, so a workspace that moves the peak's instant does not
        change what the estimate is compared with."""
        bare = [stats.without_libraries for _, stats in self.step_phases() if stats.without_libraries is not None]
        if bare:
            return max(bare)[1]
        return self.peak - self.peak_split.get(Category.OTHER, 0)

    @property
    def other_parts(self) -> dict[str, int]:
        """Named parts of ``other`` at the peak (library workspaces); the rest of ``other`` is allocator rounding."""
        return dict(self.phases[self.peak_phase].other_parts) if self.peak_phase in self.phases else {}

    @property
    def reserved_peak(self) -> int | None:
        values = [s.reserved_peak for s in self.steps if s.reserved_peak is not None]
        return max(values) if values else None

    @property
    def larger_step(self) -> str:
        """Which step needs more memory, in words: 'first', 'steady' or 'equal'."""
        if len(self.steps) < 2 or self.steps[0].peak == self.steps[-1].peak:
            return "equal"
        return "first" if self.steps[0].peak > self.steps[-1].peak else "steady"

    def step_phases(self) -> Iterator[tuple[StepMeasurement, PhaseStats]]:
        """Every (step, phase figures) of the report, steps in order and phases in step order."""
        for step in self.steps:
            for stats in step.phases.values():
                yield step, stats

    def category_peak(self, category: Category) -> int:
        """The most bytes ``category`` held at any phase peak of any step (for per-category budgets)."""
        return max((stats.peak_split.get(category, 0) for _, stats in self.step_phases()), default=0)

    def part_peaks(self) -> dict[str, int]:
        """The most bytes each named part held at any instant of any step, library workspaces ('other: ...')
        left out: the communication buffers and FSDP2's unsharded parameters."""
        peaks: dict[str, int] = {}
        for step in self.steps:
            for stats in step.phases.values():
                for name, size in stats.part_peaks.items():
                    if not name.startswith(_OTHER_PREFIX):
                        peaks[name] = max(peaks.get(name, 0), size)
        return peaks

    def phase_peaks(self) -> dict[Phase, int]:
        """The peak of each phase over all steps, in phase order."""
        peaks: dict[Phase, int] = {}
        for phase in PHASES:
            values = [s.phases[phase].peak for s in self.steps if phase in s.phases]
            if values:
                peaks[phase] = max(values)
        return peaks

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device,
            "torch_version": self.torch_version,
            "cuda_version": self.cuda_version,
            "peak_bytes": self.peak,
            "peak_phase": self.peak_phase.value,
            "peak_step": self.peak_step.label,
            "larger_step": self.larger_step,
            "reserved_peak_bytes": self.reserved_peak,
            "peak_split": split_to_dict(self.peak_split),
            "category_peaks": {c.value: self.category_peak(c) for c in CATEGORIES},
            **({"other_parts": self.other_parts} if self.other_parts else {}),
            "steps": [s.to_dict() for s in self.steps],
            "notes": list(self.notes),
            **({"parallel": self.parallel.to_dict()} if self.parallel is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StepReport":
        return cls(
            backend=data["backend"],
            device=data["device"],
            torch_version=data["torch_version"],
            cuda_version=data.get("cuda_version"),
            steps=tuple(StepMeasurement.from_dict(s) for s in data["steps"]),
            notes=tuple(data.get("notes", ())),
            parallel=RankInfo.from_dict(data["parallel"]) if data.get("parallel") else None,
        )

    def table(self, *, verbose: bool = False) -> str:
        """A phase x category table of the peak step (every step with ``verbose``), for people."""
        return step_table(self, verbose=verbose)

    def __str__(self) -> str:
        return (
            f"StepReport({self.backend}: peak {format_bytes(self.peak)} during {self.peak_phase.value} "
            f"of the {self.peak_step.label} step)"
        )


def _step_rows(step: StepMeasurement) -> list[list[str]]:
    rows = []
    for phase, stats in step.phases.items():
        mark = " <- peak" if phase is step.peak_phase else ""
        rows.append(
            [f"{step.label}/{phase.value}", format_bytes(stats.peak), format_bytes(stats.retained)]
            + [format_bytes(stats.peak_split.get(c, 0)) for c in CATEGORIES]
            + [mark.strip()]
        )
    return rows


_LARGER = {
    "first": "the first step needs more than the steady ones",
    "steady": "steady steps need more than the first",
    "equal": "first and steady steps peak alike",
}

#: what the rows and columns of ``step_table`` mean, printed under it
STEP_LEGEND = (
    "rows: step/phase (first = step 0, where the optimizer state is created; steady = later steps); "
    "peak: most bytes allocated during the phase; retained: allocated when it ended; "
    "the category columns split the phase's peak"
)


def step_table(report: StepReport, *, verbose: bool = False) -> str:
    """Per phase: peak, retained, and the category mix at the phase's peak."""
    steps = report.steps if verbose else (report.peak_step,)
    header = ["step/phase", "peak", "retained", *[c.value for c in CATEGORIES], ""]
    rows = [row for step in steps for row in _step_rows(step)]
    title = (
        f"{report.backend} backend, {report.device}: peak {format_bytes(report.peak)} during "
        f"{report.peak_phase.value} of the {report.peak_step.label} step ({_LARGER[report.larger_step]})"
    )
    if report.reserved_peak is not None:
        title += f"; reserved peak {format_bytes(report.reserved_peak)} (allocator segments)"
    if not verbose and len(report.steps) > 1:
        title += f"; showing the {report.peak_step.label} step (-v: all {len(report.steps)} steps)"
    if report.parallel is not None:
        title = f"{report.parallel.describe()}: {title}"
    notes = "".join(f"\nnote: {n}" for n in report.notes)
    return f"{title}\n{render_table(header, rows)}\n{STEP_LEGEND}{_parts_line(report)}{notes}"


def _parts_line(report: StepReport) -> str:
    """The named parts of the peak's categories, one line: 'parts at the peak: ...' (library workspaces in
    ``other``, whose rest is allocator rounding; distributed steps' buffers)."""
    parts = report.phases[report.peak_phase].peak_parts if report.peak_phase in report.phases else {}
    if not parts:
        return ""
    line = "\nparts at the peak: " + ", ".join(f"{name} {format_bytes(n)}" for name, n in parts.items())
    return line + (" (the rest of other: allocator rounding)" if report.other_parts else "")
