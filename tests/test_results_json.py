"""The --gpumem-json document: schema header, every figure per test, session info, atomic writing."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gpumem_factories import make_record, make_report
from pytest_gpumem._reporting import results_json
from pytest_gpumem._core.categories import Category
from pytest_gpumem._core.records import TestRecord
from pytest_gpumem._core.results import StepReport
from pytest_gpumem._reporting.atomic_files import write_json_atomic
from pytest_gpumem._reporting.results_json import (
    build_results_document,
    collect_session_info,
    git_commit,
)


def test_document_has_schema_session_and_every_figure_per_test() -> None:
    report = make_report()
    records = [make_record("t.py::test_b", report, budget=3_000_000, estimate=2_500_000),
               make_record("t.py::test_a", activations=5_000_000)]
    info = {"git_commit": "abc", "torch_version": "2.14.1"}
    doc = build_results_document(records, session_info=info)
    assert (doc["schema"], doc["version"], doc["session"]) == ("pytest-gpumem/results", 1, info)
    assert [t["nodeid"] for t in doc["tests"]] == ["t.py::test_a", "t.py::test_b"]
    entry = doc["tests"][1]
    assert entry["peak_bytes"] == report.peak
    # make_report()'s sizes: the steady forward holds params 400,000 + optimizer 800,000 + batch 100,000 +
    # activations 1,258,291 + temporaries 50,000 B
    assert entry["peak_bytes"] == 2_608_291 and entry["peak_phase"] == "forward"
    assert entry["category_peaks"] == {"params": 400_000, "grads": 400_000, "optimizer": 800_000, "batch": 100_000,
                                       "activations": 1_258_291, "temporaries": 50_000, "other": 0}
    assert entry["peak_phase"] == report.peak_phase.value
    assert entry["category_peaks"] == {c.value: report.category_peak(c) for c in Category}
    assert entry["peak_split"] == {c.value: report.peak_split.get(c, 0) for c in Category}
    assert entry["phase_peaks"] == {p.value: max(s.phases[p].peak for s in report.steps) for p in report.phases}
    assert (entry["backend"], entry["device"], entry["torch_version"], entry["cuda_version"]) == (
        report.backend, report.device, report.torch_version, report.cuda_version)
    assert entry["budget"]["total_bytes"] == 3_000_000 and entry["estimate"]["peak_bytes"] == 2_500_000
    assert StepReport.from_dict(entry["report"]).to_dict() == report.to_dict()  # the full report survives
    json.dumps(doc, allow_nan=False)


def test_unmeasured_test_and_regressions_are_kept() -> None:
    broken = TestRecord("t.py::test_x", outcome="failed")
    doc = build_results_document([broken], session_info={},
                                 regressions={"t.py::test_x": {"message": "m"}})
    (entry,) = doc["tests"]
    assert entry["peak_bytes"] is None and entry["outcome"] == "failed" and entry["regression"] == {"message": "m"}


def test_session_info_names_versions_and_commit(tmp_path: Path) -> None:
    info = collect_session_info(tmp_path)
    assert set(info) >= {"created", "python_version", "platform", "torch_version", "cuda_version", "git_commit"}
    assert info["git_commit"] is None  # tmp_path is not a repository: silently None


def test_git_commit_inside_a_repository(tmp_path: Path) -> None:
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git not installed")
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f").write_text("x")
    run("add", "f")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m")
    commit = git_commit(tmp_path)
    assert commit == run("rev-parse", "HEAD").stdout.decode().strip()  # git's own answer
    assert len(commit) == 40


def test_git_commit_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(results_json.subprocess, "run", no_git)
    assert git_commit() is None


def test_write_json_atomic_replaces_whole_file_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out" / "results.json"
    write_json_atomic(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    before = path.read_bytes()

    def fail(obj, stream, **kwargs):
        stream.write("{")
        raise OSError("no space left")

    monkeypatch.setattr(json, "dump", fail)
    with pytest.raises(OSError):
        write_json_atomic(path, {"a": 2})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
