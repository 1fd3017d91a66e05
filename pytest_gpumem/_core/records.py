"""The typed record of one measured test: what travels from the plugin to xdist, JSON, baselines and HTML."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .budget import Budget
from .results import StepReport

#: Outcomes a record can carry: pytest's, after the plugin's own checks.
OUTCOMES = ("passed", "failed", "skipped")


@dataclass(frozen=True)
class TestRecord:
    """What the plugin knows about one test that measured GPU memory (or tried to)."""

    __test__ = False  # not a pytest test class

    nodeid: str
    outcome: str = "passed"                    #: "passed" | "failed" | "skipped", after budget and regression checks
    report: StepReport | None = None           #: the measurement with the largest peak; None when nothing was measured
    budget: Budget | None = None               #: the test's budget; None when it has none
    estimate: Mapping[str, Any] | None = None  #: ``Estimate.to_dict()`` of the peak measurement; None when not estimated
    max_batch: int | None = None               #: from ``gpumem.max_batch_size()``
    measurements: int = 0                      #: how many steps the test measured
    leak_bytes: int | None = None              #: bytes measured in the test still allocated after it ended
    plugin_error: str | None = None            #: a failure inside pytest-gpumem while judging this test

    @property
    def measured(self) -> bool:
        return self.report is not None

    @property
    def budget_total(self) -> int | None:
        return self.budget.total if self.budget is not None else None

    @property
    def estimate_peak(self) -> int | None:
        peak = (self.estimate or {}).get("peak_bytes")
        return int(peak) if peak is not None else None

    def with_changes(self, **changes: Any) -> "TestRecord":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (execnet refuses str subclasses such as ``torch.__version__``)."""
        return _plain({
            "nodeid": self.nodeid,
            "outcome": self.outcome,
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "report": self.report.to_dict() if self.report is not None else None,
            "estimate": dict(self.estimate) if self.estimate is not None else None,
            "max_batch": self.max_batch,
            "measurements": self.measurements,
            "leak_bytes": self.leak_bytes,
            "plugin_error": self.plugin_error,
        })

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TestRecord":
        return cls(
            nodeid=str(data["nodeid"]),
            outcome=str(data.get("outcome") or "passed"),
            report=StepReport.from_dict(data["report"]) if data.get("report") else None,
            budget=Budget.from_dict(data["budget"]) if data.get("budget") else None,
            estimate=dict(data["estimate"]) if data.get("estimate") else None,
            max_batch=data.get("max_batch"),
            measurements=int(data.get("measurements") or 0),
            leak_bytes=data.get("leak_bytes"),
            plugin_error=data.get("plugin_error"),
        )


def _plain(data: Any) -> Any:
    """``data`` as plain JSON types (str subclasses -> str, tuples -> lists), safe for execnet and JSON."""
    return json.loads(json.dumps(data, default=str))


@dataclass
class TestState:
    """What one test measured so far, kept on the item until its reports are made."""

    __test__ = False  # not a pytest test class

    budget: Budget | None
    backend_name: str
    budget_from_marker: bool = False  #: False: the budget is --gpumem-default-budget (or none)
    device: Any = None  #: the target GPU's DeviceProfile (None: none named, emulation without library workspaces)
    used_fixture: bool = False
    reports: list[StepReport] = field(default_factory=list)
    estimates: dict[int, Any] = field(default_factory=dict)  #: index in ``reports`` -> its Estimate
    trackers: list[Any] = field(default_factory=list)        #: StorageTrackers, for the leak check at teardown
    max_batch: int | None = None
    call_raised: bool = False  #: the test raised: its traceback keeps its locals alive, so no leak is judged
