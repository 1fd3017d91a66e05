"""End to end through pytest: --gpumem-save-baseline, --gpumem-baseline gating, JSON, HTML, ini keys (xdist: tests/test_xdist.py)."""
from __future__ import annotations

import hashlib
import json

import pytest

# Import what an AdamW step imports lazily *before* pytester snapshots sys.modules: otherwise each in-process run
# re-imports torch._inductor.test_operators and torch refuses to register its TORCH_LIBRARY a second time.
try:
    import torch._inductor.test_operators  # noqa: F401
except ImportError:  # older or newer torch without it: nothing to pre-import
    pass

TEST_FILE = """
import os, torch, pytest

@pytest.mark.gpu_budget("64MiB")
def test_mlp(gpumem):
    width = int(os.environ.get("GM_WIDTH", "256"))
    model = torch.nn.Sequential(torch.nn.Linear(128, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)).to(gpumem.device)
    gpumem.train_step(model, torch.optim.AdamW(model.parameters()), torch.randn(32, 128, device=gpumem.device))

def test_unmeasured():
    pass
"""
BASE = ("--gpumem-backend=emulated", "-p", "no:cacheprovider")


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("GM_WIDTH", raising=False)
    pytester.makepyfile(test_m=TEST_FILE)
    return pytester


def test_save_then_gate_on_growth_and_warn_on_shrink(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    project.runpytest(*BASE, "--gpumem-save-baseline=base.json", "--gpumem-json=out/results.json").assert_outcomes(passed=2)
    base = project.path / "base.json"
    saved = json.loads(base.read_text())
    assert list(saved["tests"]) == ["test_m.py::test_mlp"] and saved["backend"] == "emulated"
    results = json.loads((project.path / "out" / "results.json").read_text())
    assert results["schema"] == "pytest-gpumem/results"
    assert results["tests"][0]["peak_bytes"] == saved["tests"]["test_m.py::test_mlp"]["peak_bytes"]
    digest = hashlib.sha256(base.read_bytes()).hexdigest()

    monkeypatch.setenv("GM_WIDTH", "512")
    grown = project.runpytest(*BASE, "--gpumem-baseline=base.json", "--gpumem-fail-regression=5%,activations:10%")
    grown.assert_outcomes(passed=1, failed=1)
    grown.stdout.fnmatch_lines(["*gpumem regression: peak grew * over the 5% allowed; activations grew * (+*, +100.0%)"
                                " over the 10% allowed vs baseline base.json*"])

    monkeypatch.setenv("GM_WIDTH", "128")
    shrunk = project.runpytest(*BASE, "--gpumem-baseline=base.json", "--gpumem-fail-regression=5%")
    shrunk.assert_outcomes(passed=2)
    shrunk.stdout.fnmatch_lines(["*stale baseline for test_m.py::test_mlp: peak shrank*refresh it with --gpumem-save-baseline*"])
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest  # comparing never rewrites the baseline


def test_bad_baseline_and_bad_spec_are_usage_errors(project: pytest.Pytester) -> None:
    bad = project.path / "base.json"
    bad.write_text('{"schema": "pytest-gpumem/baseline", "version": 1, "tes')
    before = bad.read_bytes()
    result = project.runpytest(*BASE, "--gpumem-baseline=base.json", "--gpumem-fail-regression=5%",
                               "--gpumem-save-baseline=new.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*baseline {bad} is not valid JSON (corrupt or truncated?)*"])
    assert bad.read_bytes() == before
    spec = project.runpytest(*BASE, "--gpumem-fail-regression=5")
    assert spec.ret == pytest.ExitCode.USAGE_ERROR
    spec.stderr.fnmatch_lines(["*--gpumem-fail-regression=5 needs a baseline*"])


def test_ini_keys_and_missing_entries(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\ngpumem_save_baseline = ci/base.json\ngpumem_html = ci/report.html\n")
    project.runpytest(*BASE).assert_outcomes(passed=2)
    assert (project.path / "ci" / "base.json").exists() and (project.path / "ci" / "report.html").exists()
    (project.path / "ci" / "base.json").write_text(
        json.dumps({"schema": "pytest-gpumem/baseline", "version": 1, "backend": "emulated",
                    "device": "cuda (emulated on meta tensors)", "tests": {}}))
    project.makeini("[pytest]\ngpumem_baseline = ci/base.json\ngpumem_fail_regression = 5%\ngpumem_fail_missing = true\n")
    missing = project.runpytest(*BASE)
    missing.assert_outcomes(passed=1, failed=1)
    missing.stdout.fnmatch_lines(["*has no entry for test_m.py::test_mlp*"])


def test_other_backend_baseline_is_refused_unless_allowed(project: pytest.Pytester) -> None:
    (project.path / "base.json").write_text(
        json.dumps({"schema": "pytest-gpumem/baseline", "version": 1, "backend": "cuda", "device": "NVIDIA H100",
                    "tests": {"test_m.py::test_mlp": {"peak_bytes": 1, "category_peaks": {}, "phase_peaks": {}}}}))
    refused = project.runpytest(*BASE, "--gpumem-baseline=base.json", "--gpumem-fail-regression=5%")
    refused.assert_outcomes(passed=1, failed=1)
    refused.stdout.fnmatch_lines(["*saved on backend 'cuda'*this run measures backend 'emulated'*"])
    allowed = project.runpytest(*BASE, "--gpumem-baseline=base.json", "--gpumem-fail-regression=+1GiB",
                                "--gpumem-allow-baseline-mismatch")
    allowed.assert_outcomes(passed=2)
