"""The machine-readable results document (--gpumem-json)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from .._core.records import TestRecord

SCHEMA = "pytest-gpumem/results"
VERSION = 1



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


#: the report's figures copied to the top of each entry, for readers who do not walk "report"
_FLATTENED = ("backend", "device", "torch_version", "cuda_version", "peak_bytes", "peak_phase",
              "reserved_peak_bytes", "peak_split", "category_peaks")
#: the record's own fields, as ``TestRecord.to_dict`` serialises them
_RECORD_FIELDS = ("budget", "estimate", "max_batch", "measurements", "leak_bytes", "plugin_error")


def results_entry(record: TestRecord, regression: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One test's figures, flattened for readers, with the full report kept under "report"."""
    fields = record.to_dict()
    report = fields["report"]
    entry: dict[str, Any] = {
        "nodeid": fields["nodeid"],
        "outcome": fields["outcome"],
        **{key: report.get(key) if report is not None else None for key in _FLATTENED},
        "phase_peaks": ({p.value: v for p, v in record.report.phase_peaks().items()}
                        if record.report is not None else None),
        **{key: fields[key] for key in _RECORD_FIELDS},
        "regression": dict(regression) if regression is not None else None,
        "report": report,
    }
    if report is not None and report.get("parallel"):  # a distributed step: the rank the figures are of
        entry["parallel"] = {k: report["parallel"][k] for k in ("strategy", "world_size", "rank")}
    return entry


def build_results_document(
    records: Iterable[TestRecord],
    *,
    session_info: Mapping[str, Any],
    regressions: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The --gpumem-json document: schema header, session info, one entry per test sorted by nodeid."""
    regressions = regressions or {}
    tests = [results_entry(r, regressions.get(r.nodeid)) for r in sorted(records, key=lambda r: r.nodeid)]
    return {"schema": SCHEMA, "version": VERSION, "session": dict(session_info), "tests": tests}
