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
from .atomic_files import write_json_atomic
from .results_json import phase_peaks
from .._core.units import format_bytes, parse_bytes

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

    def value(self, scope: str) -> int | None:
        """The saved figure for a scope ('peak', 'reserved' or a category); None if not saved."""
        if scope == "peak":
            return self.peak
        if scope == "reserved":
            return self.reserved_peak
        return self.category_peaks.get(scope)

    @classmethod
    def from_report(cls, report: Any) -> "BaselineEntry":
        """The entry for a ``StepReport`` or its ``to_dict()``."""
        data = report.to_dict() if hasattr(report, "to_dict") else report
        reserved = data.get("reserved_peak_bytes")
        return cls(
            peak=int(data["peak_bytes"]),
            category_peaks={k: int(v) for k, v in data["category_peaks"].items()},
            phase_peaks=phase_peaks(data),
            reserved_peak=int(reserved) if reserved is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak,
            "reserved_peak_bytes": self.reserved_peak,
            "category_peaks": dict(self.category_peaks),
            "phase_peaks": dict(self.phase_peaks),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BaselineEntry":
        reserved = data.get("reserved_peak_bytes")
        return cls(
            peak=_int(data["peak_bytes"]),
            category_peaks={str(k): _int(v) for k, v in data.get("category_peaks", {}).items()},
            phase_peaks={str(k): _int(v) for k, v in data.get("phase_peaks", {}).items()},
            reserved_peak=_int(reserved) if reserved is not None else None,
        )


def _int(value: Any) -> int:
    """A byte count from JSON: a non-negative int (bools and floats rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a non-negative integer number of bytes, got {value!r}")
    return value


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
    """Read a baseline file (read-only); BaselineError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BaselineError(f"baseline {path} does not exist; create it with --gpumem-save-baseline={path}") from None
    except OSError as exc:
        raise BaselineError(f"baseline {path} cannot be read: {exc.strerror or exc}") from None
    if not raw.strip():
        raise BaselineError(f"baseline {path} is empty (truncated?); restore it from version control or save it again")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BaselineError(f"baseline {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BaselineError(
            f"baseline {path} is not valid JSON (corrupt or truncated?): {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}; restore it from version control or save it again"
        ) from None
    return _baseline_from_data(data, path)


def _baseline_from_data(data: Any, path: Path) -> Baseline:
    """Check the header and entries of parsed baseline JSON."""
    if not isinstance(data, dict):
        raise BaselineError(f"baseline {path} holds a JSON {type(data).__name__}, expected an object with a {SCHEMA!r} header")
    if data.get("schema") != SCHEMA:
        raise BaselineError(f"baseline {path} has schema {data.get('schema')!r}, expected {SCHEMA!r}; is it a baseline file?")
    if data.get("version") != VERSION:
        raise BaselineError(
            f"baseline {path} has version {data.get('version')!r}; this pytest-gpumem reads version {VERSION}: "
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
            if not isinstance(entry, dict):
                raise TypeError(f"expected an object, got {type(entry).__name__}")
            entries[nodeid] = BaselineEntry.from_dict(entry)
        except (KeyError, TypeError, AttributeError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise BaselineError(f"baseline {path}: entry {nodeid!r} is malformed: {what}") from None
    torch_version = data.get("torch_version")
    return Baseline(data["backend"], data["device"], entries,
                    torch_version if isinstance(torch_version, str) else None, path)


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
    records: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    *,
    backend: str,
    device: str,
    merge_with: Baseline | None = None,
    torch_version: str | None = None,
) -> Baseline:
    """Write a baseline of every record with a report; entries of ``merge_with`` not re-measured are kept.

    Written to a temp file in the same folder and moved into place, so an existing baseline is never
    half-written or lost. Keys sorted, indent 2, trailing newline, no timestamps: diffs show real changes.
    """
    rows = list(records.values()) if isinstance(records, Mapping) else list(records)
    entries = dict(merge_with.entries) if merge_with is not None else {}
    for record in rows:
        report = record.get("report")
        if report:
            entries[record["nodeid"]] = BaselineEntry.from_report(report)
            torch_version = torch_version or _get(report, "torch_version")
    baseline = Baseline(backend, device, entries, torch_version, Path(path))
    write_json_atomic(path, baseline.to_dict(), sort_keys=True)
    return baseline


def _get(report: Any, key: str) -> Any:
    return report.get(key) if isinstance(report, Mapping) else getattr(report, key, None)


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
    size = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]
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


def check_regression(nodeid: str, report: Any, baseline: Baseline, spec: RegressionSpec) -> RegressionResult:
    """Compare one test's report (``StepReport`` or its dict) with its baseline entry under ``spec``."""
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
