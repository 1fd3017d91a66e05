"""CI gating for the pytest plugin: baseline regression checks, and JSON/baseline/HTML output at session end.

Every path is checked when the run starts (collisions, directories, foreign files, folders we cannot
write), so a bad path stops the run before any test instead of after all of them. A run that measured
nothing leaves existing files alone.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager, Iterable, Mapping

import pytest

from .. import _options as options
from .baseline import (
    Baseline,
    BaselineError,
    RegressionResult,
    RegressionSpec,
    check_compatible,
    check_regression,
    load_baseline,
    parse_regression_spec,
    save_baseline_atomic,
)
from .._core.records import TestRecord
from .results_json import SCHEMA as RESULTS_SCHEMA
from .results_json import build_results_document, collect_session_info
from .atomic_files import (
    FileProblem,
    check_writable_file,
    identity,
    parse_json_bounded,
    read_bytes_bounded,
    resolved,
    write_json_atomic,
)

#: The options naming files this plugin writes.
OUTPUTS = ("json", "html", "save_baseline")


class GatingPlugin:
    """Holds the gating options of one run; the plugin asks it to check tests and to write files at the end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.paths: dict[str, Path] = {
            name: p for name in ("baseline", *OUTPUTS) if (p := options.path(config, name)) is not None
        }
        self.snapshot_dir = options.path(config, "snapshot")
        self.allow_mismatch = options.flag(config, "allow_baseline_mismatch")
        self.fail_missing = options.flag(config, "fail_missing")
        spec_text = options.text(config, "fail_regression")
        #: True when regressions fail tests; False compares only and reports growth as warnings.
        self.gating = spec_text is not None
        self.spec: RegressionSpec = self._parse_spec(spec_text)
        self._check_needs()
        check_paths(config, self.paths, self.snapshot_dir)
        self.baseline: Baseline | None = self._load(self.baseline_path) if self.baseline_path else None
        if self.save_path is not None and self.save_path.exists():
            self._load(self.save_path)  # a target that is not a baseline is refused before any test runs
        self.written: list[Path] = []
        self._warnings: list[str] = []
        #: files that could not be written at the end, in words (the run fails with them)
        self.errors: list[str] = []

    @property
    def json_path(self) -> Path | None:
        return self.paths.get("json")

    @property
    def html_path(self) -> Path | None:
        return self.paths.get("html")

    @property
    def save_path(self) -> Path | None:
        return self.paths.get("save_baseline")

    @property
    def baseline_path(self) -> Path | None:
        return self.paths.get("baseline")

    def _parse_spec(self, text: str | None) -> RegressionSpec:
        if text is None:
            return parse_regression_spec("0%")  # compare-only mode: every byte of growth is worth a warning
        if self.baseline_path is None:
            raise pytest.UsageError(
                f"--gpumem-fail-regression={text} needs a baseline to compare with: add --gpumem-baseline=PATH"
            )
        try:
            return parse_regression_spec(text)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None

    def _check_needs(self) -> None:
        """Flags that mean nothing without the option they modify are refused, not ignored."""
        if self.fail_missing and self.baseline_path is None:
            raise pytest.UsageError(
                f"{options.source(self.config, 'fail_missing')} needs a baseline to look tests up in: "
                f"add --gpumem-baseline=PATH"
            )
        if self.allow_mismatch and self.baseline_path is None and self.save_path is None:
            raise pytest.UsageError(
                f"{options.source(self.config, 'allow_baseline_mismatch')} applies to --gpumem-baseline or "
                f"--gpumem-save-baseline, and neither is given"
            )

    @staticmethod
    def _load(path: Path) -> Baseline:
        try:
            return load_baseline(path)
        except BaselineError as exc:
            raise pytest.UsageError(str(exc)) from None

    @property
    def is_worker(self) -> bool:
        """True in an xdist worker: workers measure, only the controller writes files."""
        return hasattr(self.config, "workerinput")

    # ------------------------------------------------------------------ during the run

    def snapshot(self, nodeid: str, backend: str) -> ContextManager[Any]:
        """Wrap a measured step: records a CUDA allocator snapshot with --gpumem-snapshot on cuda, else nothing."""
        if self.snapshot_dir is None:
            return contextlib.nullcontext()
        from .snapshot import snapshot_context

        return snapshot_context(self.snapshot_dir, nodeid, enabled=backend == "cuda")

    def compare(self, record: TestRecord) -> RegressionResult | None:
        """The regression result of one test, None without a baseline or a report."""
        if self.baseline is None or record.report is None:
            return None
        return check_regression(record.nodeid, record.report, self.baseline, self.spec)

    def check(self, record: TestRecord) -> str | None:
        """The one-sentence failure for this test (regression, baseline mismatch, missing entry) or None."""
        if self.baseline is None or record.report is None:
            return None
        try:
            check_compatible(self.baseline, record.report.backend, record.report.device, self.allow_mismatch)
        except BaselineError as exc:
            return f"gpumem: {exc}"
        result = self.compare(record)
        if result is None:
            return None
        if result.missing:
            return result.missing_message if self.fail_missing else None
        return result.message if self.gating else None

    # ------------------------------------------------------------------ at the end

    def warnings(self) -> list[str]:
        """Lines for the terminal summary: stale baseline entries, missing entries, ungated growth, skipped writes."""
        return [w.removeprefix("gpumem: ").removeprefix("gpumem ") for w in self._warnings]

    def finish(self, records: Mapping[str, TestRecord]) -> None:
        """At session end (controller only under xdist): collect warnings, write JSON, baseline and HTML.

        A run that measured nothing (``--collect-only``, a collection error, no gpumem test selected)
        writes nothing: the files of the last real run stay as they are.
        """
        if self.is_worker:
            return
        rows = [records[k] for k in sorted(records)]
        regressions = self._collect_warnings(rows)
        if not any(r.report is not None for r in rows):
            kept = [str(p) for name, p in self.paths.items() if name in OUTPUTS and p.exists()]
            if kept:
                self._warnings.append(f"no test was measured, so {', '.join(kept)} left unchanged")
            return
        if self.json_path is not None:
            info = collect_session_info(self.config.rootpath)
            doc = build_results_document(rows, session_info=info, regressions=regressions)
            self._write("json", lambda p: write_json_atomic(p, doc))
        if self.save_path is not None:
            self._save_baseline(rows)
        if self.html_path is not None:
            from .html import write_html

            self._write("html", lambda p: write_html(p, rows, regressions=regressions))

    def _write(self, name: str, write: Any) -> None:
        """Write one output; an OSError becomes an error line for the summary instead of a traceback."""
        target = self.paths[name]
        try:
            self.written.append(write(target))
        except OSError as exc:
            self.errors.append(f"{options.source(self.config, name)}={target} not written: {exc.strerror or exc}")

    def _collect_warnings(self, rows: list[TestRecord]) -> dict[str, dict[str, Any]]:
        """Compare every record with the baseline; keep stale/missing/ungated lines; return results by nodeid."""
        results: dict[str, dict[str, Any]] = {}
        if self.snapshot_dir is not None:
            skipped = [r.nodeid for r in rows if r.report is not None and r.report.backend != "cuda"]
            if skipped:
                self._warnings.append(f"--gpumem-snapshot saved nothing for {len(skipped)} test(s) not measured on "
                                      f"the cuda backend (allocator snapshots need a real CUDA allocator)")
        for record in rows:
            result = self.compare(record)
            if result is None:
                continue
            results[record.nodeid] = result.to_dict()
            if result.missing and not self.fail_missing:
                self._warnings.append(result.missing_message or "")
            if result.shrunk:
                self._warnings.append(result.stale_message or "")
            if result.grown and not self.gating:
                self._warnings.append(f"{record.nodeid}: {result.message} (not gated: no --gpumem-fail-regression)")
        return results

    def _save_baseline(self, rows: Iterable[TestRecord]) -> None:
        """Save passed tests' figures, merged (under a lock) into what the file holds when the run ends."""
        # a failed test's figures (an out-of-memory step's partial report among them) are no baseline
        measured = [r for r in rows if r.report is not None and r.outcome == "passed"]
        origins = sorted({(r.report.backend, r.report.device) for r in measured if r.report is not None})
        if not origins:
            self._warnings.append(f"gpumem: baseline {self.save_path} not written: no test passed with a measurement")
            return
        if len(origins) > 1:
            self._warnings.append(
                f"gpumem: baseline {self.save_path} not written: tests ran on several backends/devices "
                f"({', '.join(f'{b}/{d}' for b, d in origins)}); save one baseline per backend"
            )
            return
        (backend, device), = origins
        assert self.save_path is not None
        try:
            save_baseline_atomic(self.save_path, measured, backend=backend, device=device,
                                 replace_other=self.allow_mismatch)
        except BaselineError as exc:
            self._warnings.append(f"gpumem: {exc}")
            return
        except OSError as exc:
            self.errors.append(f"baseline {self.save_path} not written: {exc.strerror or exc}")
            return
        self.written.append(self.save_path)


def check_paths(config: pytest.Config, paths: Mapping[str, Path], snapshot_dir: Path | None) -> None:
    """UsageError, before any test runs, for outputs that collide with each other or with the baseline,
    that are directories or foreign files, or whose folder cannot be written."""
    seen: dict[tuple, str] = {}
    for name, p in paths.items():
        key = identity(p)
        if key in seen:
            other = seen[key]
            what = ("the baseline it is checked against" if {other, name} == {"baseline", "save_baseline"}
                    else "the baseline" if "baseline" in (other, name) else "the other's output")
            raise pytest.UsageError(
                f"{options.source(config, other)} and {options.source(config, name)} name the same file ({p}): "
                f"one run would overwrite {what}; give each its own path"
            )
        seen[key] = name
    for name, p in paths.items():
        if name == "baseline":
            continue
        try:
            check_writable_file(resolved(p), option=options.source(config, name))
        except FileProblem as exc:
            raise pytest.UsageError(str(exc)) from None
        _refuse_foreign(config, name, p)
    if snapshot_dir is not None:
        where = f"{options.source(config, 'snapshot')}={snapshot_dir}"
        if snapshot_dir.exists() and not snapshot_dir.is_dir():
            raise pytest.UsageError(f"{where} is a file; give a folder for the snapshots")
        if any(identity(p) == identity(snapshot_dir) for p in paths.values()):
            raise pytest.UsageError(f"{where} names the same path as another gpumem file; give the snapshots a folder")


def _refuse_foreign(config: pytest.Config, name: str, p: Path) -> None:
    """An existing file at an output path must be one we wrote: never replace someone else's file."""
    if name == "save_baseline" or not p.is_file() or p.stat().st_size == 0:
        return  # a baseline target is read (and refused when it is not a baseline) by GatingPlugin._load
    where = f"{options.source(config, name)}={p}"
    try:
        raw = read_bytes_bounded(p, what="file")
    except FileProblem as exc:
        raise pytest.UsageError(f"{where}: {exc}") from None
    if name == "html":
        if b"pytest-gpumem" not in raw[:4096]:
            raise pytest.UsageError(f"{where} exists and is not a pytest-gpumem HTML report; refusing to overwrite "
                                    f"it: give another path or delete it")
        return
    try:
        data = parse_json_bounded(raw, what="file", path=p)
    except FileProblem:
        data = None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != RESULTS_SCHEMA:
        held = f"a {schema!r} document" if schema else "something other than pytest-gpumem results"
        raise pytest.UsageError(f"{where} exists and holds {held}; refusing to overwrite it: give another path or "
                                f"delete it")
