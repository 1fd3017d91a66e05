"""pytest glue only: options, the gpu_budget marker, report hooks, xdist (the fixture is in fixture.py).

Nothing here measures: the fixture calls the step runner, ``budget`` checks, ``report`` renders.
One ``Manager`` per run holds the results keyed by test nodeid; workers send theirs to the xdist
controller on the test report (``report.gpumem``), so both print the same table.
"""
from __future__ import annotations

import contextlib
import gc
import json
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
import torch

from ._core import budget as budgets
from ._core.categories import CATEGORIES
from ._core.results import StepReport
from ._core.units import format_bytes, parse_bytes
from ._measure.backends import BACKENDS
from ._measure.step import OutOfMemory, StepFailed
from ._reporting.tables import SummaryRow, summary_table
from .fixture import GpuMem, gpumem  # noqa: F401  (the fixture, registered with this plugin)

MARKER = "gpu_budget"
#: measurement and estimate must agree within this fraction unless a test or the ini says otherwise
DEFAULT_RTOL = "0.05"
_STATE = pytest.StashKey["TestState"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpumem", "GPU memory budgets (pytest-gpumem)")
    group.addoption("--gpumem-report", action="store_true", default=None,
                    help="print a table of measured tests: budget, peak, headroom, split by category (-v: per phase)")
    group.addoption("--gpumem-backend", default=None, choices=BACKENDS,
                    help="where bytes come from: auto (cuda if a GPU is present, else emulated), cuda, cpu, emulated")
    group.addoption("--gpumem-default-budget", default=None, metavar="SIZE",
                    help="budget for tests that use the gpumem fixture without a gpu_budget marker, e.g. 2GiB")
    group.addoption("--gpumem-rtol", default=None, metavar="FRACTION",
                    help="fail a measured test whose peak or any category differs from the analytical estimate by "
                         "more than this fraction (default 0.05); 'off' disables the check")
    parser.addini("gpumem_report", type="bool", default=False, help="same as --gpumem-report")
    parser.addini("gpumem_backend", default="auto", help="same as --gpumem-backend")
    parser.addini("gpumem_default_budget", default="", help="same as --gpumem-default-budget")
    parser.addini("gpumem_rtol", default=DEFAULT_RTOL, help="same as --gpumem-rtol (default 0.05)")
    with contextlib.suppress(ImportError):
        from ._reporting.gating import add_gating_options

        add_gating_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    with contextlib.suppress(ImportError):
        from . import hookspecs

        pluginmanager.add_hookspecs(hookspecs)


def _option(config: pytest.Config, name: str) -> Any:
    """CLI value when given, else the ini value (CLI defaults are None so ini options are honoured)."""
    value = config.getoption(f"--gpumem-{name.replace('_', '-')}")
    return value if value is not None else config.getini(f"gpumem_{name}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{budgets.MARKER_SIGNATURE}: fail the test when the GPU memory of the training step it measures "
        "(gpumem fixture) exceeds the budget; sizes like '2GB' (10^9) or '2GiB' (2^30)",
    )
    config.pluginmanager.register(Manager(config), "gpumem-manager")


@dataclass
class TestState:
    """What one test measured, kept on the item until its report is made."""

    budget: budgets.Budget | None
    backend_name: str
    reports: list[StepReport] = field(default_factory=list)
    estimates: dict[int, Any] = field(default_factory=dict)  #: index in ``reports`` -> its estimate
    trackers: list[Any] = field(default_factory=list)
    max_batch: int | None = None


class Manager:
    """Per-run state and every pytest hook of the plugin."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: dict[str, dict[str, Any]] = {}
        self.backend_name = str(_option(config, "backend") or "auto")
        if self.backend_name not in BACKENDS:
            raise pytest.UsageError(f"gpumem_backend = {self.backend_name!r}: expected one of {', '.join(BACKENDS)}")
        default = _option(config, "default_budget") or None
        try:
            self.default_budget = budgets.Budget(total=parse_bytes(default)) if default else None
        except ValueError as exc:
            raise pytest.UsageError(f"--gpumem-default-budget / gpumem_default_budget: {exc}") from None
        self.rtol = _parse_rtol(_option(config, "rtol"))
        self.report_enabled = bool(_option(config, "report"))
        self.gating = None
        with contextlib.suppress(ImportError):
            from ._reporting.gating import GatingPlugin

            self.gating = GatingPlugin(config)

    # -- collection --------------------------------------------------------------------------
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Bad gpu_budget arguments become collection errors naming the test and the value.

        A collection error (rather than a UsageError) also works inside xdist workers, and stops the
        run the way ``--strict-markers`` does.
        """
        keep = []
        for item in items:
            marker = item.get_closest_marker(MARKER)
            try:
                if marker is not None:
                    budgets.budget_from_marker(marker.args, marker.kwargs)
            except budgets.BudgetError as exc:
                report = pytest.CollectReport(
                    item.nodeid, "failed", f"{item.nodeid}: invalid {MARKER} marker: {exc}", []
                )
                self.config.hook.pytest_collectreport(report=report)
                continue
            keep.append(item)
        items[:] = keep

    def state_for(self, item: pytest.Item) -> TestState:
        state = item.stash.get(_STATE, None)
        if state is None:
            marker = item.get_closest_marker(MARKER)
            budget = budgets.budget_from_marker(marker.args, marker.kwargs) if marker else self.default_budget
            backend = (budget.backend if budget and budget.backend else None) or self.backend_name
            state = TestState(budget, backend)
            item.stash[_STATE] = state
        return state

    # -- running -----------------------------------------------------------------------------
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        state = item.stash.get(_STATE, None)
        marker = item.get_closest_marker(MARKER)
        if state is None and marker is not None and report.when == "call":
            state = self.state_for(item)
        if state is None:
            return
        try:
            if report.when == "call":
                self._judge(item, call, report, state)
            elif report.when == "teardown":
                self._judge_leak(report, state)
        except Exception:  # a bug here must never hide the user's own result
            report.sections.append(("gpumem internal error", traceback.format_exc()))

    def _judge(self, item: pytest.Item, call: pytest.CallInfo, report: pytest.TestReport, state: TestState) -> None:
        verbose = self.config.getoption("verbose") > 0
        failures: list[str] = []
        excinfo = call.excinfo
        error = excinfo.value if excinfo is not None else None
        if isinstance(error, StepFailed) and error.partial is not None:
            state.reports.append(error.partial)
        # train_step wraps an OOM in OutOfMemory; inside gpumem.track() the user's loop raises torch's own
        out_of_memory = isinstance(error, (OutOfMemory, torch.cuda.OutOfMemoryError))
        if out_of_memory:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            where = "" if isinstance(error, OutOfMemory) else "CUDA out of memory inside gpumem.track(): "
            failures.append(f"gpu_budget: {where}{first_line}")
            _release_frames(error)  # drop the step's tensors so the next test starts clean
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if report.passed:
            if state.budget is not None and not state.budget.is_empty and not state.reports:
                failures.append(
                    f"{MARKER} is set but the test measured nothing: call gpumem.train_step(model, optimizer, batch) "
                    "or run the step inside `with gpumem.track(...)` so there is something to check"
                )
            for step_report in state.reports:
                if state.budget is not None:
                    try:
                        failures.extend(o.sentence for o in budgets.check_budget(step_report, state.budget))
                    except budgets.BudgetError as exc:
                        failures.append(f"{MARKER}: {exc}")
            failures.extend(self._contradictions(state))
        record = self._record(item, state, report)
        if report.passed and self.gating is not None and record is not None:
            sentence = self.gating.check(item.nodeid, record)
            if sentence:
                failures.append(sentence)
        if state.reports:
            peak_report = max(state.reports, key=lambda r: r.peak)
            report.sections.append(("gpumem", peak_report.table(verbose=verbose)))
        if failures and (report.passed or out_of_memory):
            report.outcome = "failed"
            report.longrepr = "\n".join(failures)
        if record is not None:
            record["outcome"] = report.outcome
            report.gpumem = record  # travels to the xdist controller with the report
            properties = _junit_properties(record)
            report.user_properties.extend(properties)
            # junitxml writes the properties of the *teardown* report, which copies item.user_properties
            # (the call report holds its own copy, so extending only it never reached the XML)
            item.user_properties.extend(properties)

    def rtol_for(self, state: TestState) -> float | None:
        """The marker's rtol, else --gpumem-rtol / gpumem_rtol; None when the check is off."""
        rtol = state.budget.rtol if state.budget is not None and state.budget.rtol is not None else self.rtol
        return None if rtol is False else rtol

    def _contradictions(self, state: TestState) -> list[str]:
        rtol = self.rtol_for(state)
        if rtol is None:
            return []
        from ._tools.contradiction import compare

        out = []
        for index, estimate in sorted(state.estimates.items()):
            result = compare(state.reports[index], estimate, rtol)
            if not result.ok:
                out.append(f"gpumem: the measurement contradicts the estimate (rtol {rtol:g}; pass rtol=False "
                           f"to gpu_budget to skip this check)\n{result.message}")
        return out

    def _record(self, item: pytest.Item, state: TestState, report: pytest.TestReport) -> dict[str, Any] | None:
        if not state.reports:
            return None
        peak_report = max(state.reports, key=lambda r: r.peak)
        estimate = state.estimates.get(state.reports.index(peak_report))
        # plain JSON types only: the record travels to the xdist controller through execnet, which refuses
        # str subclasses such as torch.__version__ (TorchVersion) and crashes the worker
        return _plain({
            "nodeid": item.nodeid,
            "outcome": report.outcome,
            "budget": state.budget.to_dict() if state.budget is not None else None,
            "report": peak_report.to_dict(),
            "estimate": estimate.to_dict() if estimate is not None and hasattr(estimate, "to_dict") else None,
            "max_batch": state.max_batch,
            "measurements": len(state.reports),
        })

    def _judge_leak(self, report: pytest.TestReport, state: TestState) -> None:
        if not state.trackers:
            return
        gc.collect()
        leaked = sum(t.live_bytes() for t in state.trackers)
        report.gpumem_leak = leaked
        if leaked:
            report.sections.append(("gpumem leak", f"{format_bytes(leaked)} of memory measured in this test is still allocated after it ended"))
        limit = state.budget.leak if state.budget is not None else None
        if limit is not None and leaked > limit and report.passed:
            report.outcome = "failed"
            report.longrepr = (
                f"gpu_budget leak={format_bytes(limit)} exceeded: {format_bytes(leaked)} measured in the test is still "
                "allocated after it ended (something keeps a reference to the model, optimizer, batch or outputs)"
            )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = getattr(report, "gpumem", None)
        if record is not None and report.when == "call":
            self.records[report.nodeid] = dict(record)
        leak = getattr(report, "gpumem_leak", None)
        if leak is not None and report.nodeid in self.records:
            self.records[report.nodeid]["leak_bytes"] = leak

    # -- end of session ----------------------------------------------------------------------
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.gating is not None:
            self.gating.finish(self.records)

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config: pytest.Config) -> None:
        if self.gating is not None:
            for warning in self.gating.warnings():
                terminalreporter.write_line(f"gpumem warning: {warning}", yellow=True)
        if not self.report_enabled:
            return
        terminalreporter.section("gpumem report")
        if not self.records:
            terminalreporter.write_line(
                "no test measured GPU memory (use the gpumem fixture: gpumem.train_step(...) or gpumem.track(...))"
            )
            return
        verbose = config.getoption("verbose") > 0
        rows, phases = [], {}
        for nodeid in sorted(self.records):
            rows.append(_summary_row(self.records[nodeid]))
            if verbose:
                rep = StepReport.from_dict(self.records[nodeid]["report"])
                phases[nodeid] = [
                    (f"{s.label}/{p.phase.value}", p.peak) for s in rep.steps for p in s.phases.values()
                ]
        terminalreporter.write_line(summary_table(rows, phases=phases))


def _plain(data: Any) -> Any:
    """``data`` as plain JSON types (str subclasses -> str, tuples -> lists), safe for execnet and JSON."""
    return json.loads(json.dumps(data, default=str))


def _release_frames(exc: BaseException | None) -> None:
    """Clear the locals of every frame in ``exc``'s traceback and those of its causes and contexts."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _summary_row(record: dict[str, Any]) -> SummaryRow:
    rep = StepReport.from_dict(record["report"])
    budget = record.get("budget") or {}
    total = budget.get("total_bytes")
    head = budgets.headroom(rep, budgets.Budget(total=total, kind=budget.get("kind") or "allocated"))
    return SummaryRow(
        nodeid=record["nodeid"], backend=rep.backend, budget=total, peak=rep.peak, headroom=head,
        peak_phase=rep.peak_phase.value, split=rep.peak_split, max_batch=record.get("max_batch"),
        status="FAILED" if record.get("outcome") == "failed" else "ok", kind=budget.get("kind") or "allocated",
    )


def _junit_properties(record: dict[str, Any]) -> list[tuple[str, Any]]:
    rep = record["report"]
    props = [("gpumem_peak_bytes", rep["peak_bytes"]), ("gpumem_backend", rep["backend"]),
             ("gpumem_peak_phase", rep["peak_phase"])]
    props += [(f"gpumem_{c.value}_bytes", rep["peak_split"][c.value]) for c in CATEGORIES]
    if rep.get("reserved_peak_bytes") is not None:
        props.append(("gpumem_reserved_peak_bytes", rep["reserved_peak_bytes"]))
    if record.get("budget") and record["budget"].get("total_bytes") is not None:
        props.append(("gpumem_budget_bytes", record["budget"]["total_bytes"]))
    return props


def _parse_rtol(value: Any) -> float | None:
    try:
        return budgets.parse_rtol(value)
    except budgets.BudgetError as exc:
        raise pytest.UsageError(f"--gpumem-rtol / gpumem_rtol: {exc}") from None
