"""pytest glue only: options, the gpu_budget marker, the gpumem fixture, report hooks, xdist.

Nothing here measures: the fixture (``fixture.py``, imported only when a test asks for it) calls the
step runner, ``budget`` checks, ``report`` renders. One ``Manager`` per run holds the records keyed by
test nodeid; workers send theirs to the xdist controller on the test report (``report.gpumem``), so
both print the same table. This module imports no torch: a run without GPU-memory tests pays nothing.
"""
from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from . import _options as options
from ._core import budget as budgets
from ._core.budget import MARKER
from ._core.units import parse_bytes
from ._core.categories import BACKENDS

if TYPE_CHECKING:
    from ._core.records import TestRecord, TestState
    from ._reporting.gating import GatingPlugin

#: options that need the CI-gating part (baselines, JSON, HTML, snapshots); without them it is not imported
_GATING_OPTIONS = ("json", "save_baseline", "baseline", "html", "snapshot", "fail_regression")
_GATING_FLAGS = ("allow_baseline_mismatch", "fail_missing")

_STATE = pytest.StashKey["TestState"]()
_BUG = "this is a bug in pytest-gpumem, not in the test; please report it with the 'gpumem internal error' section"


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{budgets.MARKER_SIGNATURE}: fail the test when the GPU memory of the training step it measures "
        "(gpumem fixture) exceeds the budget; sizes like '2GB' (10^9) or '2GiB' (2^30)",
    )
    config.pluginmanager.register(Manager(config), "gpumem-manager")


class Manager:
    """Per-run state and every pytest hook of the plugin."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: dict[str, "TestRecord"] = {}
        self.plugin_errors: dict[str, str] = {}  #: nodeid -> what went wrong inside the plugin
        self.backend_name = (options.text(config, "backend") or "auto").strip().lower()
        if self.backend_name not in BACKENDS:
            raise pytest.UsageError(f"{options.source(config, 'backend')} = {self.backend_name!r}: expected one of "
                                    f"{', '.join(BACKENDS)}")
        self.default_budget = _default_budget(config)
        self.device_name = _device_option(config)
        self.rtol = _rtol(config)
        self.atol = _atol(config)
        self.report_wide = options.flag(config, "report_wide")
        self.report_enabled = options.flag(config, "report") or self.report_wide
        #: the CI-gating part, only when one of its options is given (imported only then)
        self.gating: "GatingPlugin | None" = None
        if any(options.text(config, n) is not None for n in _GATING_OPTIONS) or any(
                options.flag(config, n) for n in _GATING_FLAGS):
            from ._reporting.gating import GatingPlugin

            self.gating = GatingPlugin(config)

    # -- the marker --------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """A bad gpu_budget marker errors its own test (like skipif or timeout); the rest of the run goes on."""
        if item.get_closest_marker(MARKER) is None:
            return
        try:
            self.state_for(item)
            return
        except budgets.BudgetError as exc:
            message = f"{item.nodeid}: invalid {MARKER} marker: {exc}"
        except Exception as exc:  # a bug reading the marker: this test's error, named as the plugin's
            message = (f"{item.nodeid}: pytest-gpumem internal error reading the {MARKER} marker: "
                       f"{type(exc).__name__}: {exc} ({_BUG})")
        pytest.fail(message, pytrace=False)  # outside the except: no "during handling" chain in the report

    def state_for(self, item: pytest.Item) -> "TestState":
        """The test's state, created on first use from its marker (nearest wins) or the default budget."""
        state = item.stash.get(_STATE, None)
        if state is None:
            own = [m for m in item.iter_markers(MARKER) if m in item.own_markers]
            if len(own) > 1:
                raise budgets.BudgetError(
                    f"given {len(own)} times on this test (stacked decorators, or a decorator plus pytest.param "
                    f"marks); give it once (a class or module marker is overridden by the test's own)")
            marker = item.get_closest_marker(MARKER)
            budget = budgets.budget_from_marker(marker.args, marker.kwargs) if marker else self.default_budget
            backend = (budget.backend if budget and budget.backend else None) or self.backend_name
            from ._core.records import TestState

            device = None
            if budget is not None and budget.device is not None or self.device_name is not None or (
                    budget is not None and budget.share is not None):
                from ._emulation.devices import device_for_test

                budget, device = device_for_test(budget, backend, self.device_name, self.config)
            state = TestState(budget, backend, budget_from_marker=marker is not None, device=device)
            item.stash[_STATE] = state
        return state

    def rtol_for(self, state: "TestState") -> float | None:
        """The marker's rtol, else --gpumem-rtol / gpumem_rtol; None when the check is off."""
        rtol = state.budget.rtol if state.budget is not None and state.budget.rtol is not None else self.rtol
        return None if rtol is False else rtol

    def atol_for(self, state: "TestState") -> int:
        """The marker's atol, else --gpumem-atol / gpumem_atol: bytes below which the estimate check never fails."""
        return state.budget.atol if state.budget is not None and state.budget.atol is not None else self.atol

    # -- judging -----------------------------------------------------------------------------
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        state = item.stash.get(_STATE, None)
        if state is None and report.when == "call" and item.get_closest_marker(MARKER) is not None:
            state = self._state_or_none(item)
        if state is None:
            return
        try:
            from ._judge import judge_call, judge_leak

            if report.when == "call":
                judge_call(self, item, call, report, state)
            elif report.when == "teardown":
                judge_leak(report, state)
        except Exception as exc:  # the plugin's own failure: the test's error, never a pass, never hiding its result
            self._plugin_error(item, report, exc)

    def _state_or_none(self, item: pytest.Item) -> "TestState | None":
        try:
            return self.state_for(item)
        except budgets.BudgetError:
            return None  # reported at setup already

    def _plugin_error(self, item: pytest.Item, report: pytest.TestReport, exc: Exception) -> None:
        message = f"pytest-gpumem internal error while checking this test: {type(exc).__name__}: {exc}"
        report.sections.append(("gpumem internal error", traceback.format_exc()))
        report.gpumem_error = message
        if report.passed:
            report.outcome = "failed"
            report.longrepr = f"{message}\n({_BUG})"
        from ._core.records import TestRecord

        record = TestRecord(item.nodeid, outcome=report.outcome, plugin_error=message)
        if report.when == "call" and getattr(report, "gpumem", None) is None:
            report.gpumem = record.to_dict()  # the test stays in the report, with its error

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = getattr(report, "gpumem", None)
        if data is not None and report.when == "call":
            from ._core.records import TestRecord

            self.records[report.nodeid] = TestRecord.from_dict(data)
        record = self.records.get(report.nodeid)
        leak = getattr(report, "gpumem_leak", None)
        if leak is not None and record is not None:
            record = record.with_changes(leak_bytes=leak, outcome="failed" if report.failed else record.outcome)
        error = getattr(report, "gpumem_error", None)
        if error is not None:
            self.plugin_errors[report.nodeid] = error
            if record is not None and record.plugin_error is None:
                record = record.with_changes(plugin_error=error)
        if record is not None:
            self.records[report.nodeid] = record

    # -- end of session ----------------------------------------------------------------------
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.gating is None:
            return
        self.gating.finish(self.records)
        if self.gating.errors and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        from ._core.units import format_bytes

        for warning in self.gating.warnings() if self.gating is not None else ():
            terminalreporter.write_line(f"gpumem warning: {warning}", yellow=True)
        for nodeid, record in sorted(self.records.items()):
            limit = record.budget.leak if record.budget is not None else None
            if record.leak_bytes and limit is None:
                terminalreporter.write_line(
                    f"gpumem warning: {nodeid} left {format_bytes(record.leak_bytes)} of measured memory allocated "
                    f"after it ended (gpu_budget(leak='0B') makes this a failure)", yellow=True)
        for line in self.gating.errors if self.gating is not None else ():
            terminalreporter.write_line(f"gpumem error: {line}", red=True)
        if self.plugin_errors:
            terminalreporter.section("gpumem internal errors", red=True)
            for nodeid, message in sorted(self.plugin_errors.items()):
                terminalreporter.write_line(f"{nodeid}: {message}")
            terminalreporter.write_line(_BUG)
        if self.report_enabled:
            self._report_table(terminalreporter, config)

    def _report_table(self, terminalreporter: Any, config: pytest.Config) -> None:
        terminalreporter.section("gpumem report")
        measured = {k: r for k, r in self.records.items() if r.report is not None}
        if not measured:
            terminalreporter.write_line(
                "no test measured GPU memory (use the gpumem fixture: gpumem.train_step(...) or gpumem.track(...))"
            )
            return
        from ._reporting.tables import SummaryRow, summary_table

        wide = self.report_wide or config.getoption("verbose") > 0
        rows, phases = [], {}
        for nodeid in sorted(measured):
            record = measured[nodeid]
            rows.append(SummaryRow.from_record(record))
            if wide and record.report is not None:
                phases[nodeid] = [(f"{s.label}/{p.phase.value}", p.peak) for s, p in record.report.step_phases()]
        terminalreporter.write_line(summary_table(rows, phases=phases, wide=wide))


def _default_budget(config: pytest.Config) -> budgets.Budget | None:
    """--gpumem-default-budget / gpumem_default_budget as a Budget; UsageError naming the option when bad."""
    value = options.text(config, "default_budget")
    if value is None:
        return None
    try:
        return budgets.budget_from_total(value)
    except budgets.BudgetError as exc:
        raise pytest.UsageError(f"{options.source(config, 'default_budget')}={value!r}: {exc}") from None


def _device_option(config: pytest.Config) -> str | None:
    """--gpumem-device / gpumem_device, checked against the known profiles (UsageError listing them)."""
    value = options.text(config, "device")
    if value is None:
        return None
    from ._emulation.devices import UnknownDevice, resolve

    try:
        return resolve(value.strip(), config.hook).name
    except UnknownDevice as exc:
        raise pytest.UsageError(f"{options.source(config, 'device')}: {exc}") from None


def _rtol(config: pytest.Config) -> float | None:
    value = options.text(config, "rtol")
    try:
        return budgets.parse_rtol(value)
    except budgets.BudgetError as exc:
        raise pytest.UsageError(f"{options.source(config, 'rtol')}: {exc}") from None


def _atol(config: pytest.Config) -> int:
    value = options.text(config, "atol") or options.DEFAULT_ATOL
    try:
        return parse_bytes(value)  # 0 B is a floor that allows nothing, not an empty budget
    except ValueError as exc:
        raise pytest.UsageError(f"{options.source(config, 'atol')}: {value!r}: {exc}") from None


@pytest.fixture
def gpumem(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Measure training steps of this test against its gpu_budget (see pytest_gpumem.fixture.GpuMem)."""
    from .fixture import GpuMem

    manager: Manager = request.config.pluginmanager.get_plugin("gpumem-manager")
    yield GpuMem(manager, request.node, manager.state_for(request.node))

