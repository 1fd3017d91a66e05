"""Saved baselines (diff-friendly JSON meant to be committed) and the regression gate against them."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .._core.categories import CATEGORIES
from .._core.records import TestRecord
from .._core.results import StepReport
from .._core.units import UNITS, format_bytes, parse_bytes
from .atomic_files import FileProblem, folder_lock, parse_json_bounded, read_bytes_bounded, write_json_atomic

SCHEMA = "pytest-gpumem/baseline"
VERSION = 1

#: What a regression rule can watch: the step's peak, its reserved peak, one category, or every category ("*").
SCOPES: tuple[str, ...] = ("peak", "reserved", "*") + tuple(c.value for c in CATEGORIES)

ACCEPTED_SPEC = (
    "comma-separated rules, each '[SCOPE:]LIMIT' where LIMIT is a percentage ('5%') or an absolute "
    "size ('+64MiB') and SCOPE is 'peak' (the default), 'reserved', a category "
    f"({', '.join(c.value for c in CATEGORIES)}) or '*' for every category; "
    "e.g. '5%', '+64MiB', 'activations:10%', '5%,activations:10%,+64MiB'"
)


class BaselineError(Exception):
    """A baseline file that cannot be used: missing, corrupt, truncated, wrong schema/version or from elsewhere."""


# --------------------------------------------------------------------------- regression spec


@dataclass(frozen=True)
class Rule:
    """One allowed growth: a fraction or a number of bytes, for one scope."""

    scope: str                   #: "peak", "reserved", a category value, or "*" (each category)
    fraction: float | None = None  #: allowed growth as a fraction of the baseline (0.05 = 5%)
    nbytes: int | None = None      #: allowed growth in bytes
    text: str = ""               #: the rule as the user wrote it

    def allowed(self, baseline: int) -> float:
        """Bytes of change (either way) this rule tolerates from ``baseline``."""
        return self.fraction * baseline if self.fraction is not None else float(self.nbytes or 0)

    def describe(self) -> str:
        """The limit in words: '5%' or '+64.00 MiB'."""
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return format_bytes(self.nbytes or 0, signed=True)

    def scopes(self) -> tuple[str, ...]:
        """The concrete figures this rule watches ('*' expands to every category)."""
        return tuple(c.value for c in CATEGORIES) if self.scope == "*" else (self.scope,)


@dataclass(frozen=True)
class RegressionSpec:
    """A parsed --gpumem-fail-regression value: independent rules, any one exceeded is a regression."""

    rules: tuple[Rule, ...]
    text: str = ""

    def __str__(self) -> str:
        return self.text or ",".join(r.text for r in self.rules)


_RULE = re.compile(r"^(?:(?P<scope>[A-Za-z_*]+)\s*:)?\s*(?P<limit>.+?)\s*$")
_PERCENT = re.compile(r"^\+?(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*%$")


def parse_regression_spec(text: str) -> RegressionSpec:
    """Parse '5%,activations:10%,+64MiB' into rules; ValueError naming the text and the accepted forms."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"invalid --gpumem-fail-regression {text!r}: empty; expected {ACCEPTED_SPEC}")
    rules: list[Rule] = []
    seen: set[tuple[str, str]] = set()
    for part in text.split(","):
        rule = _parse_rule(part.strip(), text)
        key = (rule.scope, "fraction" if rule.fraction is not None else "bytes")
        if key in seen:
            raise ValueError(
                f"invalid --gpumem-fail-regression {text!r}: two {key[1]} limits for {rule.scope!r}; "
                f"give each scope at most one percentage and one size"
            )
        seen.add(key)
        rules.append(rule)
    return RegressionSpec(tuple(rules), text.strip())


def _parse_rule(part: str, text: str) -> Rule:
    """One '[SCOPE:]LIMIT' rule of ``text``."""
    where = f"invalid --gpumem-fail-regression {text!r}"
    match = _RULE.match(part) if part else None
    if match is None:
        raise ValueError(f"{where}: empty rule; expected {ACCEPTED_SPEC}")
    scope = (match.group("scope") or "peak").lower()
    limit = match.group("limit")
    if scope not in SCOPES:
        raise ValueError(f"{where}: unknown scope {scope!r} in {part!r}; expected {ACCEPTED_SPEC}")
    percent = _PERCENT.match(limit)
    if percent:
        return Rule(scope, fraction=float(percent.group("num")) / 100, text=part)
    size = limit[1:] if limit.startswith("+") else limit
    if re.fullmatch(r"[0-9.]+", size):
        # A bare number is ambiguous ('5' = 5 bytes or 5%?): ask for a unit or a percent sign.
        raise ValueError(f"{where}: {limit!r} needs '%' or a unit such as 'MiB'; expected {ACCEPTED_SPEC}")
    try:
        nbytes = parse_bytes(size)
    except ValueError as exc:
        hint = " (a lowercase 'b' means bits; use 'B' for bytes)" if "bits" in str(exc) else ""
        raise ValueError(f"{where}: {limit!r} is not a percentage or a size{hint}; expected {ACCEPTED_SPEC}") from None
    return Rule(scope, nbytes=nbytes, text=part)


# --------------------------------------------------------------------------- baseline data


@dataclass(frozen=True)
class BaselineEntry:
    """What one test measured when the baseline was saved."""

    peak: int
    category_peaks: dict[str, int]
    phase_peaks: dict[str, int]
    reserved_peak: int | None = None
    #: a distributed step's layout and the rank the figures are of ({"strategy", "world_size", "rank"})
    parallel: dict[str, Any] | None = None
    #: a distributed step's named parts at their most ("params: all-gather buffer": bytes); saved, not gated
    part_peaks: dict[str, int] = field(default_factory=dict)

    def value(self, scope: str) -> int | None:
        """The saved figure for a scope ('peak', 'reserved' or a category); None if not saved."""
        if scope == "peak":
            return self.peak
        if scope == "reserved":
            return self.reserved_peak
        return self.category_peaks.get(scope)

    @classmethod
    def from_report(cls, report: StepReport) -> "BaselineEntry":
        """The entry for a measured step."""
        return cls(
            peak=report.peak,
            category_peaks={c.value: report.category_peak(c) for c in CATEGORIES},
            phase_peaks={p.value: v for p, v in report.phase_peaks().items()},
            reserved_peak=report.reserved_peak,
            parallel=({"strategy": report.parallel.strategy, "world_size": report.parallel.world_size,
                       "rank": report.parallel.rank} if report.parallel is not None else None),
            part_peaks=report.part_peaks(),
        )

    def to_dict(self) -> dict[str, Any]:
        data = {
            "peak_bytes": self.peak,
            "reserved_peak_bytes": self.reserved_peak,
            "category_peaks": dict(self.category_peaks),
            "phase_peaks": dict(self.phase_peaks),
        }
        if self.parallel is not None:
            data["parallel"] = dict(self.parallel)
        if self.part_peaks:
            data["part_peaks"] = dict(self.part_peaks)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "BaselineEntry":
        """An entry from baseline JSON; TypeError/KeyError naming the field that is wrong."""
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got a JSON {_json_type(data)}")
        reserved = data.get("reserved_peak_bytes")
        return cls(
            peak=_int(data["peak_bytes"], "peak_bytes"),
            category_peaks=_byte_map(data.get("category_peaks", {}), "category_peaks"),
            phase_peaks=_byte_map(data.get("phase_peaks", {}), "phase_peaks"),
            reserved_peak=_int(reserved, "reserved_peak_bytes") if reserved is not None else None,
            parallel=dict(data["parallel"]) if isinstance(data.get("parallel"), dict) else None,
            part_peaks=_byte_map(data.get("part_peaks", {}), "part_peaks"),
        )


#: Largest byte count a baseline may hold (8 EiB; anything larger is a corrupt or hand-edited file).
MAX_BYTES = 2**63 - 1


def _int(value: Any, field: str = "") -> int:
    """A byte count from JSON: an int in [0, 2**63) (bools, floats and huge numbers rejected)."""
    where = f"{field}: " if field else ""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{where}expected a non-negative integer number of bytes, got {_short(value)}")
    if value > MAX_BYTES:
        raise TypeError(f"{where}{_short(value)} bytes is beyond any device (at most 2**63 - 1)")
    return value


def _byte_map(value: Any, field: str) -> dict[str, int]:
    """A {name: bytes} object from JSON, naming the field when it is something else."""
    if not isinstance(value, dict):
        raise TypeError(f"{field}: expected an object of byte counts keyed by name, got a JSON {_json_type(value)}")
    return {str(k): _int(v, f"{field}.{k}") for k, v in value.items()}


def _short(value: Any) -> str:
    """repr() of a value, cut to 40 characters (a 400-digit number stays readable in a message)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


@dataclass(frozen=True)
class Baseline:
    """A loaded or about-to-be-saved baseline: header plus one entry per test nodeid."""

    backend: str
    device: str
    entries: dict[str, BaselineEntry] = field(default_factory=dict)
    torch_version: str | None = None
    path: Path | None = None

    @property
    def name(self) -> str:
        """How messages name this baseline: its file name."""
        return self.path.name if self.path is not None else "<unsaved baseline>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "backend": self.backend,
            "device": self.device,
            "torch_version": self.torch_version,
            "tests": {nodeid: e.to_dict() for nodeid, e in sorted(self.entries.items())},
        }


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """Read a baseline file (read-only, bounded); BaselineError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        raw = read_bytes_bounded(path, what="baseline")
    except FileNotFoundError:
        raise BaselineError(f"baseline {path} does not exist; create it with --gpumem-save-baseline={path}") from None
    except FileProblem as exc:
        raise BaselineError(str(exc)) from None
    if not raw.strip():
        raise BaselineError(f"baseline {path} is empty (truncated?); restore it from version control or save it again")
    try:
        data = parse_json_bounded(raw, what="baseline", path=path)
    except FileProblem as exc:
        raise BaselineError(str(exc)) from None
    return _baseline_from_data(data, path)


def _baseline_from_data(data: Any, path: Path) -> Baseline:
    """Check the header and entries of parsed baseline JSON."""
    if not isinstance(data, dict):
        raise BaselineError(f"baseline {path} holds a JSON {_json_type(data)}, expected an object with a {SCHEMA!r} header")
    if data.get("schema") != SCHEMA:
        raise BaselineError(f"baseline {path} has schema {data.get('schema')!r}, expected {SCHEMA!r}; is it a baseline file?")
    version = data.get("version")
    if isinstance(version, bool) or version != VERSION:  # True == 1 in Python, but not in a baseline
        raise BaselineError(
            f"baseline {path} has version {version!r}; this pytest-gpumem reads version {VERSION}: "
            f"save it again with --gpumem-save-baseline"
        )
    for key in ("backend", "device"):
        if not isinstance(data.get(key), str):
            raise BaselineError(f"baseline {path}: header field {key!r} is missing or not a string")
    tests = data.get("tests")
    if not isinstance(tests, dict):
        raise BaselineError(f"baseline {path}: 'tests' is missing or not an object keyed by test nodeid")
    entries: dict[str, BaselineEntry] = {}
    for nodeid, entry in tests.items():
        try:
            entries[nodeid] = BaselineEntry.from_dict(entry)
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise BaselineError(f"baseline {path}: entry {nodeid!r} is malformed: {what}") from None
    torch_version = data.get("torch_version")
    return Baseline(data["backend"], data["device"], entries,
                    torch_version if isinstance(torch_version, str) else None, path)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: object, array, string, number, true/false, null."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_compatible(baseline: Baseline, backend: str, device: str, allow_mismatch: bool = False) -> None:
    """Refuse a baseline measured on another backend or device, unless explicitly allowed."""
    if allow_mismatch or (baseline.backend == backend and baseline.device == device):
        return None
    raise BaselineError(
        f"baseline {baseline.path or baseline.name} was saved on backend {baseline.backend!r}, device "
        f"{baseline.device!r}, but this run measures backend {backend!r}, device {device!r}; figures from "
        f"different backends or devices are not comparable: save a baseline for this one, or pass "
        f"--gpumem-allow-baseline-mismatch to compare anyway"
    )


def save_baseline_atomic(
    path: str | os.PathLike[str],
    records: Iterable[TestRecord],
    *,
    backend: str,
    device: str,
    replace_other: bool = False,
) -> Baseline:
    """Save every measured record into the baseline at ``path``, merged with what the file holds now.

    Under a lock on the folder the file is read again, its entries of tests not re-measured are kept,
    and the result replaces it atomically: two runs saving at once (``-k sgd`` and ``-k adam``) keep
    both sets, and the file is never half-written. A file saved on another backend or device is
    refused (BaselineError) unless ``replace_other``; keys sorted, no timestamps, so diffs show real changes.
    """
    measured = {r.nodeid: r.report for r in records if r.report is not None}
    with folder_lock(path):
        entries: dict[str, BaselineEntry] = {}
        if os.path.lexists(path):
            current = load_baseline(path)
            if (current.backend, current.device) == (backend, device):
                entries.update(current.entries)
            elif not replace_other:
                raise BaselineError(
                    f"baseline {path} not overwritten: it holds backend {current.backend!r}, device "
                    f"{current.device!r}, this run measured {backend!r}, {device!r}; use another path, delete it, "
                    f"or pass --gpumem-allow-baseline-mismatch to replace it"
                )
        entries.update({nodeid: BaselineEntry.from_report(report) for nodeid, report in measured.items()})
        torch_version = next((str(r.torch_version) for r in measured.values()), None)
        baseline = Baseline(backend, device, entries, torch_version, Path(path))
        write_json_atomic(path, baseline.to_dict(), sort_keys=True)
    return baseline


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class Finding:
    """One figure that moved past a rule: grown (a regression) or shrunk (a stale baseline)."""

    scope: str       #: "peak", "reserved" or a category value
    baseline: int    #: bytes saved in the baseline
    now: int         #: bytes measured now
    rule: Rule

    @property
    def growth(self) -> int:
        """Bytes gained since the baseline (negative when shrunk)."""
        return self.now - self.baseline

    @property
    def fraction(self) -> float:
        """Growth as a fraction of the baseline (inf from zero)."""
        if self.baseline == 0:
            return math.inf if self.growth > 0 else (0.0 if self.growth == 0 else -math.inf)
        return self.growth / self.baseline

    def describe(self) -> str:
        """'activations grew 1.20 MiB -> 1.50 MiB (+0.30 MiB, +25.0%) over the 5% allowed'."""
        verb = "grew" if self.growth > 0 else "shrank"
        pct = f"{self.fraction * 100:+.1f}%" if math.isfinite(self.fraction) else "from zero"
        limit = "over the" if self.growth > 0 else "past the"
        noun = "allowed" if self.growth > 0 else "threshold"
        return (
            f"{self.scope} {verb} {format_bytes(self.baseline)} -> {format_bytes(self.now)} "
            f"({_format_like(self.growth, max(self.baseline, self.now))}, {pct}) {limit} {self.rule.describe()} {noun}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "baseline_bytes": self.baseline,
            "now_bytes": self.now,
            "growth_bytes": self.growth,
            "growth_fraction": self.fraction if math.isfinite(self.fraction) else None,
            "rule": self.rule.text or self.rule.describe(),
        }


def _format_like(delta: int, reference: int) -> str:
    """A signed change in the unit ``format_bytes`` picks for ``reference``, so '1.20 MiB -> 1.50 MiB (+0.30 MiB'."""
    unit = format_bytes(reference).split()[-1]
    size = UNITS[unit]
    if size == 1 or abs(delta) >= size or abs(delta) * 200 < size:  # "+0.00 MiB" would hide the change
        return format_bytes(delta, signed=True)
    return f"{delta / size:+.2f} {unit}"


@dataclass(frozen=True)
class RegressionResult:
    """The outcome of comparing one test with the baseline."""

    nodeid: str
    baseline_name: str
    grown: tuple[Finding, ...] = ()   #: regressions: figures that grew past a rule
    shrunk: tuple[Finding, ...] = ()  #: stale baseline: figures that shrank past a rule
    missing: bool = False             #: the baseline has no entry for this test

    @property
    def failed(self) -> bool:
        return bool(self.grown)

    @property
    def message(self) -> str | None:
        """One sentence for a regression, None when nothing grew."""
        if not self.grown:
            return None
        return f"gpumem regression: {'; '.join(f.describe() for f in self.grown)} vs baseline {self.baseline_name}"

    @property
    def stale_message(self) -> str | None:
        """One sentence for a baseline that is now too generous, None when nothing shrank."""
        if not self.shrunk:
            return None
        return (
            f"gpumem stale baseline for {self.nodeid}: {'; '.join(f.describe() for f in self.shrunk)} vs "
            f"baseline {self.baseline_name}; refresh it with --gpumem-save-baseline"
        )

    @property
    def missing_message(self) -> str | None:
        if not self.missing:
            return None
        return (
            f"gpumem baseline {self.baseline_name} has no entry for {self.nodeid}; "
            f"add it with --gpumem-save-baseline"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline_name,
            "missing": self.missing,
            "grown": [f.to_dict() for f in self.grown],
            "shrunk": [f.to_dict() for f in self.shrunk],
            "message": self.message,
        }


def check_regression(nodeid: str, report: StepReport, baseline: Baseline, spec: RegressionSpec) -> RegressionResult:
    """Compare one test's measurement with its baseline entry under ``spec``."""
    saved = baseline.entries.get(nodeid)
    if saved is None:
        return RegressionResult(nodeid, baseline.name, missing=True)
    now = BaselineEntry.from_report(report)
    grown: list[Finding] = []
    shrunk: list[Finding] = []
    for rule in spec.rules:
        for scope in rule.scopes():
            before, after = saved.value(scope), now.value(scope)
            if before is None or after is None:
                continue  # e.g. no reserved figure on the cpu backend
            change = after - before
            if abs(change) > rule.allowed(before):
                (grown if change > 0 else shrunk).append(Finding(scope, before, after, rule))
    return RegressionResult(nodeid, baseline.name, _worst(grown), _worst(shrunk))


def _worst(findings: list[Finding]) -> tuple[Finding, ...]:
    """One finding per scope (the first rule it broke), peak first then categories in canonical order."""
    best: dict[str, Finding] = {}
    for f in findings:
        if f.scope not in best:
            best[f.scope] = f
    order = {s: i for i, s in enumerate(SCOPES)}
    return tuple(sorted(best.values(), key=lambda f: order.get(f.scope, len(order))))
