"""Budgets from the gpu_budget marker, the checks against a StepReport, and the failure sentences."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

from .categories import BACKENDS, Category
from .units import format_bytes, format_percent, parse_bytes

if TYPE_CHECKING:
    from .results import StepReport

#: the marker's name
MARKER = "gpu_budget"
KINDS = ("allocated", "reserved")
#: categories a marker keyword may budget
BUDGETED_CATEGORIES = (
    Category.PARAMS, Category.GRADS, Category.OPTIMIZER, Category.BATCH, Category.ACTIVATIONS, Category.TEMPORARIES,
)
_KEYWORDS = {c.value for c in BUDGETED_CATEGORIES} | {
    "total", "kind", "backend", "leak", "rtol", "atol", "device", "parallel"}
MARKER_SIGNATURE = (
    "gpu_budget(total=None, *, params=None, grads=None, optimizer=None, batch=None, activations=None, "
    "temporaries=None, kind='allocated', backend=None, leak=None, rtol=None, atol=None, device=None, parallel=None)"
)


class BudgetError(ValueError):
    """A gpu_budget marker or option was given something it cannot use."""


@dataclass(frozen=True)
class Budget:
    """What one test may use: a total and/or per-category bytes, of allocated or reserved memory."""

    total: int | None = None
    categories: dict[Category, int] = field(default_factory=dict)
    kind: str = "allocated"
    backend: str | None = None
    leak: int | None = None      #: bytes a test may still hold after it ends (None: report only)
    rtol: float | bool | None = None  #: allowed relative difference from the estimate (None: ini default; False: off)
    atol: int | None = None  #: bytes below which a difference from the estimate never fails (None: ini default)
    share: float | None = None  #: total as a share of the device's memory ("90%"), until ``with_device_total``
    device: str | None = None   #: the GPU the emulation predicts for this test (None: --gpumem-device)
    #: DDP/FSDP/ZeRO strategy the test's steps run with (the budget is per rank); None: one device
    parallel: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total,
            "categories": {c.value: b for c, b in self.categories.items()},
            "kind": self.kind,
            "leak_bytes": self.leak,
        }

    @property
    def is_empty(self) -> bool:
        return self.total is None and self.share is None and not self.categories

    def with_device_total(self, device_name: str | None, device_memory: int | None) -> "Budget":
        """This budget with a share of device memory ("90%") turned into bytes of ``device_memory``;
        BudgetError when no device is known."""
        if self.share is None:
            return self
        if device_memory is None:
            raise BudgetError(
                f"total={format_percent_plain(self.share)} is a share of the GPU's memory, and no GPU is known: "
                "name one with device='H100' on the marker or --gpumem-device, or run on the cuda backend")
        return replace(self, total=int(self.share * device_memory), share=None, device=self.device or device_name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Budget":
        """The budget of ``to_dict()`` (what a test record carries: total, categories, kind, leak)."""
        return cls(
            total=data.get("total_bytes"),
            categories={Category(k): int(v) for k, v in (data.get("categories") or {}).items()},
            kind=data.get("kind") or "allocated",
            leak=data.get("leak_bytes"),
        )


#: A bare number below this is refused as a total or category budget: gpu_budget(2) meant '2GB', not 2 bytes.
SMALLEST_BARE_BUDGET = 1024


def _size(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Bytes of a budget argument; BudgetError for zero, fractions of a byte and bare numbers that meant a unit."""
    where = f"{name}={value!r}: " if name else ""
    bare = isinstance(value, int) and not isinstance(value, bool) or (
        isinstance(value, float) and math.isfinite(value)) or (
        isinstance(value, str) and value.strip().replace(".", "", 1).isdigit())
    if bare and float(value) != int(float(value)):
        raise BudgetError(f"{where}a bare number counts bytes and {value!r} is not a whole number; "
                          f"write the unit, e.g. '{value}GB' or '{value}GiB'")
    try:
        size = parse_bytes(value)
    except ValueError as exc:
        raise BudgetError(f"{where}{exc}") from None
    if size == 0 and not allow_zero:
        hint = " (use leak='0B' to forbid leaks)" if name else ""
        raise BudgetError(f"{where}a budget must be positive{hint}")
    if bare and not allow_zero and size < SMALLEST_BARE_BUDGET:
        raise BudgetError(f"{where}a bare number counts bytes, and {size} B cannot hold a training step; "
                          f"write the unit, e.g. '{value}GB' or '{value}GiB' (or '{value}B' if you mean bytes)")
    return size


def parse_size(value: Any) -> int:
    """A positive budget size ('2GiB', 2_000_000_000); BudgetError saying what is wrong and what is accepted."""
    return _size("", value)


def parse_share(name: str, value: Any) -> float | None:
    """A share of device memory from '90%' (0.9); None when ``value`` is not a percentage; BudgetError
    for a share outside (0, 100]."""
    if not (isinstance(value, str) and value.strip().endswith("%")):
        return None
    where = f"{name}={value!r}: " if name else f"{value!r}: "
    try:
        share = float(value.strip()[:-1]) / 100
    except ValueError:
        raise BudgetError(f"{where}expected a share of the GPU's memory such as '90%'") from None
    if not 0 < share <= 1:
        raise BudgetError(f"{where}a share of the GPU's memory must be above 0% and at most 100%")
    return share


def format_percent_plain(share: float) -> str:
    return f"{share * 100:g}%"


def budget_from_total(value: Any) -> Budget:
    """The budget of --gpumem-default-budget: a size ('2GiB') or a share of the device's memory ('90%')."""
    share = parse_share("", value)
    return Budget(share=share) if share is not None else Budget(total=parse_size(value))


def budget_from_marker(args: tuple, kwargs: Mapping[str, Any]) -> Budget:
    """Build a Budget from ``gpu_budget(...)`` arguments; BudgetError names the bad value."""
    if len(args) > 1:
        raise BudgetError(f"takes at most one positional argument (the total), got {len(args)}: {MARKER_SIGNATURE}")
    unknown = sorted(set(kwargs) - _KEYWORDS)
    if unknown:
        raise BudgetError(f"unknown keyword {', '.join(unknown)}; accepted: {MARKER_SIGNATURE}")
    if args and "total" in kwargs:
        raise BudgetError("total given both positionally and as a keyword")
    if all(v is None for v in (*args, *kwargs.values())):
        raise BudgetError("sets nothing: give a total such as gpu_budget('2GB'), a per-category budget "
                          "(activations='512MiB'), leak=, rtol=, backend= or parallel=")
    raw_total = args[0] if args else kwargs.get("total")
    share = parse_share("total", raw_total)
    total = None if raw_total is None or share is not None else _size("total", raw_total)
    categories = {
        c: _size(c.value, kwargs[c.value]) for c in BUDGETED_CATEGORIES if kwargs.get(c.value) is not None
    }
    kind = kwargs.get("kind", "allocated")
    if kind not in KINDS:
        raise BudgetError(f"kind={kind!r}: expected one of {', '.join(map(repr, KINDS))}")
    if kind == "reserved" and categories:
        raise BudgetError("per-category budgets apply to allocated bytes; kind='reserved' takes only a total")
    if kind == "reserved" and total is None and share is None:
        raise BudgetError("kind='reserved' limits the total: give one, e.g. gpu_budget('2GB', kind='reserved')")
    backend = kwargs.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise BudgetError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    leak = kwargs.get("leak")
    leak_bytes = None if leak is None else _size("leak", leak, allow_zero=True)
    rtol = kwargs.get("rtol")
    if rtol is not None and rtol is not False:  # False: no estimate check for this test
        rtol = parse_rtol(rtol)
        if rtol is None:
            rtol = False
    atol = kwargs.get("atol")
    atol_bytes = None if atol is None else _size("atol", atol, allow_zero=True)
    device = kwargs.get("device")
    if device is not None and not (isinstance(device, str) and device.strip()):
        raise BudgetError(f"device={device!r}: expected a GPU name such as 'H100' or 'A100-80GB'")
    parallel = kwargs.get("parallel")
    if parallel is not None and not getattr(parallel, "gpumem_strategy", False):
        raise BudgetError(f"parallel={parallel!r}: expected DDP(world_size=...), FSDP(world_size=...) or "
                          "ZeRO(stage=1|2, world_size=...) from pytest_gpumem (the budget is then per rank)")
    if parallel is not None and kind == "reserved":
        raise BudgetError("kind='reserved' is not available with parallel= (per-rank figures are allocated bytes)")
    return Budget(total, categories, kind, backend, leak_bytes, rtol, atol_bytes, share, device, parallel)


def parse_rtol(value: Any) -> float | None:
    """A relative tolerance from 0.05, '0.05', '5%' or 'off' (None); BudgetError names anything else (also '')."""
    accepted = "expected a fraction such as 0.05, '5%', or 'off'"
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    if isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise BudgetError(f"rtol={value!r}: {accepted}")
    text = str(value).strip()
    try:
        rtol = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise BudgetError(f"rtol={value!r}: {accepted}") from None
    if not 0 <= rtol < float("inf"):
        raise BudgetError(f"rtol={value!r}: must be a finite number >= 0")
    return rtol


@dataclass(frozen=True)
class Overrun:
    """A failed budget: one sentence for the failure line, the detail for the report section."""

    sentence: str
    over_by: int


def _mix(split: Mapping[Category, int]) -> str:
    parts = sorted(((b, c) for c, b in split.items() if b > 0), key=lambda bc: -bc[0])
    return ", ".join(f"{c.value} {format_bytes(b)}" for b, c in parts)


def _excess(limit: int, value: int) -> str:
    return f"{format_bytes(value - limit, signed=True)}, {format_percent((value - limit) / limit)}"


def check_budget(report: StepReport, budget: Budget) -> list[Overrun]:
    """Every way ``report`` breaks ``budget`` (empty when it fits; a peak equal to the budget fits)."""
    overruns: list[Overrun] = []
    if budget.total is not None:
        if budget.kind == "reserved":
            reserved = report.reserved_peak
            if reserved is None:
                raise BudgetError(
                    f"kind='reserved' needs reserved-memory figures, which the {report.backend} backend does not have; "
                    "use the cuda or emulated backend"
                )
            if reserved > budget.total:
                overruns.append(Overrun(
                    f"gpu_budget {format_bytes(budget.total)} (reserved) exceeded: reserved peak {format_bytes(reserved)} "
                    f"({_excess(budget.total, reserved)})",
                    reserved - budget.total,
                ))
        elif report.peak > budget.total:
            overruns.append(Overrun(
                f"gpu_budget {format_bytes(budget.total)} exceeded: peak {format_bytes(report.peak)} "
                f"({_excess(budget.total, report.peak)}) during {report.peak_phase.value}; {_mix(report.peak_split)}",
                report.peak - budget.total,
            ))
    for category, limit in budget.categories.items():
        value = report.category_peak(category)
        if value > limit:
            phase = _phase_of_category_peak(report, category)
            overruns.append(Overrun(
                f"gpu_budget {category.value}={format_bytes(limit)} exceeded: {category.value} peaked at "
                f"{format_bytes(value)} ({_excess(limit, value)}) during {phase}",
                value - limit,
            ))
    return overruns


def _phase_of_category_peak(report: StepReport, category: Category) -> str:
    best = max(
        ((ps.peak_split.get(category, 0), s.index, ps.phase.value) for s, ps in report.step_phases()),
        key=lambda t: (t[0], -t[1]),
    )
    return best[2]


def headroom(report: StepReport, budget: Budget | None) -> float | None:
    """Fraction of the total budget left unused (negative when over), None without a total."""
    if budget is None or budget.total is None:
        return None
    value = report.reserved_peak if budget.kind == "reserved" else report.peak
    if value is None:
        return None
    return (budget.total - value) / budget.total
