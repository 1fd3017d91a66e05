"""Judging one test after it ran: budget, estimate agreement, baseline regression, leaks; and its record.

Called from the plugin's makereport hook. Any exception here is the plugin's own failure, which the
hook reports as such; the user's own outcome (a failed assertion, an error) is never replaced.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from ._core import budget as budgets
from ._core.budget import MARKER
from ._core.categories import CATEGORIES
from ._core.records import TestRecord, TestState
from ._core.units import format_bytes

if TYPE_CHECKING:
    from .plugin import Manager


def judge_call(manager: "Manager", item: pytest.Item, call: pytest.CallInfo, report: pytest.TestReport,
               state: TestState) -> None:
    """Fail a passed test that broke its budget, contradicts its estimate or regressed; attach its record."""
    failures: list[str] = []
    oom = None
    state.call_raised = call.excinfo is not None
    if state.used_fixture:  # torch is imported already: the fixture needs it
        from .fixture import absorb_failure

        oom = absorb_failure(call.excinfo.value if call.excinfo is not None else None, state)
        if oom:
            failures.append(oom)
    if report.passed:
        failures += _budget_failures(state)
        failures += _contradictions(manager, state)
    record = _record(item, state, report)
    if report.passed and record is not None and manager.gating is not None:
        sentence = manager.gating.check(record)
        if sentence:
            failures.append(sentence)
    if state.reports:
        verbose = item.config.getoption("verbose") > 0
        peak_report = max(state.reports, key=lambda r: r.peak)
        report.sections.append(("gpumem", peak_report.table(verbose=verbose)))
    if failures and (report.passed or oom):
        report.outcome = "failed"
        report.longrepr = "\n".join(failures)
    if record is not None:
        record = record.with_changes(outcome=report.outcome)
        report.gpumem = record.to_dict()  # travels to the xdist controller with the report
        properties = junit_properties(record)
        report.user_properties.extend(properties)
        # junitxml writes the properties of the *teardown* report, which copies item.user_properties
        # (the call report holds its own copy, so extending only it never reached the XML)
        item.user_properties.extend(properties)


def _budget_failures(state: TestState) -> list[str]:
    """One sentence per way the measurements break the budget; a marker with nothing measured is a failure."""
    budget = state.budget
    if budget is None:
        return []
    if not state.reports:
        if budget.is_empty or not state.budget_from_marker:
            return []  # --gpumem-default-budget applies to what a test measures; measuring nothing is fine
        return [f"{MARKER} is set but the test measured nothing: call gpumem.train_step(model, optimizer, batch) "
                "or run the step inside `with gpumem.track(...)` so there is something to check"]
    failures = []
    for step_report in state.reports:
        try:
            rank = f"{step_report.parallel.describe()}: " if step_report.parallel is not None else ""
            failures.extend(rank + o.sentence for o in budgets.check_budget(step_report, budget))
        except budgets.BudgetError as exc:
            failures.append(f"{MARKER}: {exc}")
    return failures


def _contradictions(manager: "Manager", state: TestState) -> list[str]:
    rtol = manager.rtol_for(state)
    if rtol is None or not state.estimates:
        return []
    from ._tools.contradiction import compare

    out = []
    for index, estimate in sorted(state.estimates.items()):
        atol = manager.atol_for(state)
        # a distributed step's closed-form model states carry their own exact check
        own = getattr(estimate, "compare", None)
        result = own(state.reports[index], rtol, atol) if own is not None else compare(state.reports[index], estimate,
                                                                                       rtol, atol)
        if result.ok:
            continue
        if own is not None:  # exact closed forms: rtol and atol do not loosen them
            out.append("gpumem: the measurement contradicts the closed forms of the distributed step (exact; rtol and "
                       f"atol do not apply; pass rtol=False to gpu_budget to skip this check)\n{result.message}")
        else:
            out.append(f"gpumem: the measurement contradicts the estimate (rtol {rtol:g}, atol {format_bytes(atol)}; "
                       f"pass rtol=False to gpu_budget to skip this check)\n{result.message}")
    return out


def _record(item: pytest.Item, state: TestState, report: pytest.TestReport) -> TestRecord | None:
    if not state.reports:
        return None
    peak_report = max(state.reports, key=lambda r: r.peak)
    estimate = state.estimates.get(state.reports.index(peak_report))
    return TestRecord(
        nodeid=item.nodeid,
        outcome=report.outcome,
        report=peak_report,
        budget=state.budget,
        estimate=estimate.to_dict() if estimate is not None else None,
        max_batch=state.max_batch,
        measurements=len(state.reports),
    )


def judge_leak(report: pytest.TestReport, state: TestState) -> None:
    """After teardown: bytes measured in the test that are still allocated; fail past ``leak=``."""
    if not state.trackers or state.call_raised:
        return  # a failed test's traceback holds its tensors: that is pytest keeping it, not a leak
    from .fixture import live_bytes

    leaked = live_bytes(state)
    report.gpumem_leak = leaked
    if leaked:
        report.sections.append(
            ("gpumem leak", f"{format_bytes(leaked)} of memory measured in this test is still allocated after it ended"))
    limit = state.budget.leak if state.budget is not None else None
    if limit is not None and leaked > limit and report.passed:
        report.outcome = "failed"
        report.longrepr = (
            f"gpu_budget leak={format_bytes(limit)} exceeded: {format_bytes(leaked)} measured in the test is still "
            "allocated after it ended (something keeps a reference to the model, optimizer, batch or outputs)"
        )


def junit_properties(record: TestRecord) -> list[tuple[str, Any]]:
    """The record's figures as junitxml properties."""
    rep = record.report
    if rep is None:
        return []
    props: list[tuple[str, Any]] = [("gpumem_peak_bytes", rep.peak), ("gpumem_backend", rep.backend),
                                    ("gpumem_peak_phase", rep.peak_phase.value)]
    props += [(f"gpumem_{c.value}_bytes", rep.peak_split.get(c, 0)) for c in CATEGORIES]
    if rep.reserved_peak is not None:
        props.append(("gpumem_reserved_peak_bytes", rep.reserved_peak))
    if record.budget_total is not None:
        props.append(("gpumem_budget_bytes", record.budget_total))
    return props
