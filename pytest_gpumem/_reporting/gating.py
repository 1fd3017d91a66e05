"""CI gating for the pytest plugin: options, baseline regression checks, and JSON/baseline/HTML output at session end."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager, Iterable, Mapping

import pytest

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
from .atomic_files import write_json_atomic
from .results_json import build_results_document, collect_session_info

#: (CLI flag, ini key, is a flag, help). Every option is also an ini key; CLI defaults are None so ini counts.
OPTIONS: tuple[tuple[str, str, bool, str], ...] = (
    ("--gpumem-json", "gpumem_json", False,
     "write every gpumem figure of every test to this JSON file (schema 'pytest-gpumem/results' v1)"),
    ("--gpumem-save-baseline", "gpumem_save_baseline", False,
     "save the measured peaks to this baseline JSON file (meant to be committed); existing entries of tests "
     "not run are kept"),
    ("--gpumem-baseline", "gpumem_baseline", False, "compare every measured test with this saved baseline"),
    ("--gpumem-fail-regression", "gpumem_fail_regression", False,
     "fail tests that grew past these limits vs --gpumem-baseline, e.g. '5%%', '+64MiB', "
     "'5%%,activations:10%%,+64MiB'"),
    ("--gpumem-allow-baseline-mismatch", "gpumem_allow_baseline_mismatch", True,
     "compare with a baseline saved on another backend or device instead of refusing it"),
    ("--gpumem-fail-missing", "gpumem_fail_missing", True,
     "fail measured tests that have no entry in --gpumem-baseline (default: warn)"),
    ("--gpumem-html", "gpumem_html", False, "write a self-contained HTML report with per-test plots to this file"),
    ("--gpumem-snapshot", "gpumem_snapshot", False,
     "cuda backend only: save a CUDA allocator snapshot per test into this folder"),
)


def add_gating_options(parser: pytest.Parser) -> None:
    """Add the CI-gating options to the 'gpumem' group and as ini keys (call from pytest_addoption)."""
    group = parser.getgroup("gpumem")
    for flag, ini, is_flag, help_text in OPTIONS:
        if is_flag:
            group.addoption(flag, action="store_true", default=None, dest=ini, help=help_text)
            parser.addini(ini, help=help_text.replace("%%", "%"), type="bool", default=False)
        else:
            metavar = {"--gpumem-fail-regression": "SPEC", "--gpumem-snapshot": "DIR"}.get(flag, "PATH")
            group.addoption(flag, action="store", default=None, dest=ini, metavar=metavar, help=help_text)
            parser.addini(ini, help=help_text.replace("%%", "%"), default="")  # argparse escapes %, ini help not


def _value(config: pytest.Config, ini: str) -> Any:
    """The CLI value if given, else the ini value; None when neither is set."""
    cli = config.getoption(ini, default=None)
    if cli is not None:
        return cli
    value = config.getini(ini)
    return value if value not in ("", None, False) else None


def _path(config: pytest.Config, ini: str) -> Path | None:
    """A path option: CLI paths are relative to the invocation folder, ini paths to the ini file's folder."""
    cli = config.getoption(ini, default=None)
    if cli is not None:
        return Path(config.invocation_params.dir, cli)
    value = config.getini(ini)
    if not value:
        return None
    base = config.inipath.parent if config.inipath is not None else config.rootpath
    return Path(base, value)


class GatingPlugin:
    """Holds the gating options of one run; the plugin asks it to check tests and to write files at the end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.json_path = _path(config, "gpumem_json")
        self.save_path = _path(config, "gpumem_save_baseline")
        self.baseline_path = _path(config, "gpumem_baseline")
        self.html_path = _path(config, "gpumem_html")
        self.snapshot_dir = _path(config, "gpumem_snapshot")
        self.allow_mismatch = bool(_value(config, "gpumem_allow_baseline_mismatch"))
        self.fail_missing = bool(_value(config, "gpumem_fail_missing"))
        spec_text = _value(config, "gpumem_fail_regression")
        #: True when regressions fail tests; False compares only and reports growth as warnings.
        self.gating = spec_text is not None
        self.spec: RegressionSpec = self._parse_spec(spec_text)
        self.baseline: Baseline | None = self._load(self.baseline_path) if self.baseline_path else None
        self.previous: Baseline | None = None  # the baseline file --gpumem-save-baseline will update
        if self.save_path is not None and self.save_path.exists():
            self.previous = self._load(self.save_path)
        self.written: list[Path] = []
        self._warnings: list[str] = []

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

    def compare(self, nodeid: str, record: Mapping[str, Any]) -> RegressionResult | None:
        """The regression result of one test, None without a baseline or a report."""
        if self.baseline is None or not record.get("report"):
            return None
        return check_regression(nodeid, record["report"], self.baseline, self.spec)

    def check(self, nodeid: str, record: Mapping[str, Any]) -> str | None:
        """The one-sentence failure for this test (regression, baseline mismatch, missing entry) or None."""
        report = record.get("report")
        if self.baseline is None or not report:
            return None
        try:
            check_compatible(self.baseline, report["backend"], report["device"], self.allow_mismatch)
        except BaselineError as exc:
            return f"gpumem: {exc}"
        result = self.compare(nodeid, record)
        if result is None:
            return None
        if result.missing:
            return result.missing_message if self.fail_missing else None
        return result.message if self.gating else None

    # ------------------------------------------------------------------ at the end

    def warnings(self) -> list[str]:
        """Lines for the terminal summary: stale baseline entries, missing entries, ungated growth, skipped writes."""
        return [w.removeprefix("gpumem: ").removeprefix("gpumem ") for w in self._warnings]

    def finish(self, records: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]) -> None:
        """At session end (controller only under xdist): collect warnings, write JSON, baseline and HTML."""
        if self.is_worker:
            return
        rows = list(records.values()) if isinstance(records, Mapping) else list(records)
        regressions = self._collect_warnings(rows)
        if self.json_path is not None:
            info = collect_session_info(self.config.rootpath)
            doc = build_results_document(rows, session_info=info, regressions=regressions)
            self.written.append(write_json_atomic(self.json_path, doc))
        if self.save_path is not None:
            self._save_baseline(rows)
        if self.html_path is not None:
            from .html import write_html

            self.written.append(write_html(self.html_path, rows, regressions=regressions))

    def _collect_warnings(self, rows: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Compare every record with the baseline; keep stale/missing/ungated lines; return results by nodeid."""
        results: dict[str, dict[str, Any]] = {}
        if self.snapshot_dir is not None:
            skipped = [r["nodeid"] for r in rows if r.get("report") and r["report"]["backend"] != "cuda"]
            if skipped:
                self._warnings.append(f"--gpumem-snapshot saved nothing for {len(skipped)} test(s) not measured on "
                                      f"the cuda backend (allocator snapshots need a real CUDA allocator)")
        for record in rows:
            result = self.compare(record["nodeid"], record)
            if result is None:
                continue
            results[record["nodeid"]] = result.to_dict()
            if result.missing and not self.fail_missing:
                self._warnings.append(result.missing_message or "")
            if result.shrunk:
                self._warnings.append(result.stale_message or "")
            if result.grown and not self.gating:
                self._warnings.append(f"{record['nodeid']}: {result.message} (not gated: no --gpumem-fail-regression)")
        return results

    def _save_baseline(self, rows: list[Mapping[str, Any]]) -> None:
        """Save measured records, merged into the previous file when it is from the same backend and device."""
        # a failed test's figures (an out-of-memory step's partial report among them) are no baseline
        measured = [r for r in rows if r.get("report") and r.get("outcome", "passed") == "passed"]
        origins = sorted({(r["report"]["backend"], r["report"]["device"]) for r in measured})
        if not origins:
            self._warnings.append(f"gpumem: baseline {self.save_path} not written: no test was measured")
            return
        if len(origins) > 1:
            self._warnings.append(
                f"gpumem: baseline {self.save_path} not written: tests ran on several backends/devices "
                f"({', '.join(f'{b}/{d}' for b, d in origins)}); save one baseline per backend"
            )
            return
        backend, device = origins[0]
        merge = self.previous
        if merge is not None and (merge.backend, merge.device) != (backend, device):
            if not self.allow_mismatch:
                self._warnings.append(
                    f"gpumem: baseline {self.save_path} not overwritten: it holds backend {merge.backend!r}, "
                    f"device {merge.device!r}, this run measured {backend!r}, {device!r}; use another path, "
                    f"delete it, or pass --gpumem-allow-baseline-mismatch to replace it"
                )
                return
            merge = None
        assert self.save_path is not None
        save_baseline_atomic(self.save_path, measured, backend=backend, device=device, merge_with=merge)
        self.written.append(self.save_path)
