"""The machine-readable results document (--gpumem-json): schema header, session info, every figure per test."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from typing import Any, Iterable, Mapping

SCHEMA = "pytest-gpumem/results"
VERSION = 1

Record = Mapping[str, Any]


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """``git rev-parse HEAD`` in ``cwd``; None outside a repository or without git (never raises)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def collect_session_info(rootdir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What the whole run ran on: versions, platform, git commit, start time (UTC)."""
    info: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": None,
        "cuda_version": None,
        "cuda_available": False,
        "git_commit": git_commit(rootdir),
    }
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: F811 - torch is a dependency, but keep this module importable without it
        except ImportError:  # pragma: no cover
            return info
    info["torch_version"] = str(torch.__version__)
    info["cuda_version"] = torch.version.cuda
    info["cuda_available"] = bool(torch.cuda.is_available())
    return info


def phase_peaks(report: Mapping[str, Any]) -> dict[str, int]:
    """The peak of each phase over all steps of a ``StepReport.to_dict()``, in phase order."""
    peaks: dict[str, int] = {}
    for step in report.get("steps", ()):
        for stats in step["phases"]:
            name = stats["phase"]
            peaks[name] = max(peaks.get(name, 0), int(stats["peak_bytes"]))
    return peaks


def results_entry(record: Record, regression: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One test's figures, flattened for readers, with the full report kept under "report"."""
    report = record.get("report")
    entry: dict[str, Any] = {
        "nodeid": record["nodeid"],
        "outcome": record.get("outcome"),
        "backend": None,
        "device": None,
        "torch_version": None,
        "cuda_version": None,
        "peak_bytes": None,
        "peak_phase": None,
        "reserved_peak_bytes": None,
        "peak_split": None,
        "category_peaks": None,
        "phase_peaks": None,
        "budget": record.get("budget"),
        "estimate": record.get("estimate"),
        "max_batch": record.get("max_batch"),
        "regression": dict(regression) if regression is not None else None,
        "report": report,
    }
    if report:
        for key in ("backend", "device", "torch_version", "cuda_version", "peak_bytes", "peak_phase",
                    "reserved_peak_bytes", "peak_split", "category_peaks"):
            entry[key] = report.get(key)
        entry["phase_peaks"] = phase_peaks(report)
    return entry


def build_results_document(
    records: Iterable[Record] | Mapping[str, Record],
    *,
    session_info: Mapping[str, Any],
    regressions: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The --gpumem-json document: schema header, session info, one entry per test sorted by nodeid."""
    rows = list(records.values()) if isinstance(records, Mapping) else list(records)
    regressions = regressions or {}
    tests = [results_entry(r, regressions.get(r["nodeid"])) for r in sorted(rows, key=lambda r: r["nodeid"])]
    return {"schema": SCHEMA, "version": VERSION, "session": dict(session_info), "tests": tests}
