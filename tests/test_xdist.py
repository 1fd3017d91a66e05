"""pytest-xdist: workers measure; the controller prints the same --gpumem-report, JUnit figures, baseline and JSON
as a serial run, writes each file once, and reports a bad marker without crashing a worker.

One serial and one ``-n 2`` subprocess run of one inner project serve every assertion (a subprocess run with
workers costs tens of seconds on a 2-core machine, so they are not repeated per property)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("xdist")

INNER = '''
import pytest
import torch
from torch import nn


def make_step(device, width):
    model = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 4)).to(device)
    return model, torch.optim.AdamW(model.parameters()), torch.randn(16, 32, device=device)


@pytest.mark.parametrize("width", [16, 64, 256])
@pytest.mark.gpu_budget("1GB")
def test_fits(gpumem, width):
    gpumem.train_step(*make_step(gpumem.device, width))


@pytest.mark.gpu_budget("1kB")
def test_over(gpumem):
    gpumem.train_step(*make_step(gpumem.device, 64))


def test_loop(gpumem):
    model, optimizer, batch = make_step(gpumem.device, 32)
    with gpumem.track(model=model, optimizer=optimizer, batch=batch):
        for _ in range(2):
            model(batch).sum().backward()
            optimizer.step()
            optimizer.zero_grad()


def test_unmeasured():
    pass
'''


def _report_rows(result) -> list[str]:
    lines = result.stdout.lines
    start = next(i for i, ln in enumerate(lines) if "gpumem report" in ln)
    return [ln for ln in lines[start:] if ln.startswith("test_inner.py::")]


def _properties(path) -> dict[str, dict[str, str]]:
    return {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in ET.parse(path).getroot().iter("testcase")
    }


BAD_MARKER = """
import pytest

@pytest.mark.gpu_budget("2Gb")
def test_bad(gpumem):
    pass

def test_fine():
    pass
"""
#: a bad marker is a collection error; a serial run carries on past it as xdist workers do
OPTIONS = ("--gpumem-backend=emulated", "--gpumem-report", "--continue-on-collection-errors", "-p", "no:cacheprovider")


def _run(pytester, monkeypatch, name, *extra):
    """One subprocess run in its own folder of the same project; (result, report rows, JUnit properties, folder)."""
    folder = pytester.mkdir(name)
    (folder / "test_inner.py").write_text(INNER)
    (folder / "test_bad.py").write_text(BAD_MARKER)
    monkeypatch.chdir(folder)  # the folder is the rootdir: the same nodeids in both runs
    result = pytester.runpytest_subprocess(*OPTIONS, f"--junitxml={folder / 'junit.xml'}",
                                           f"--gpumem-save-baseline={folder / 'base.json'}",
                                           f"--gpumem-json={folder / 'r.json'}", *extra)
    return result, _report_rows(result), _properties(folder / "junit.xml"), folder


def test_xdist_matches_a_serial_run_writes_once_and_survives_a_bad_marker(pytester, monkeypatch):
    serial, serial_rows, serial_props, serial_dir = _run(pytester, monkeypatch, "serial")
    xdist, xdist_rows, xdist_props, xdist_dir = _run(pytester, monkeypatch, "xdist", "-n", "2")
    for result in (serial, xdist):
        # test_over fails its 1 kB budget; test_bad's marker is refused (an error, not a crash)
        outcomes = result.parseoutcomes()
        assert (outcomes.get("passed"), outcomes.get("failed")) == (6, 1), result.stdout.str()
        assert outcomes.get("errors", outcomes.get("error", 0)) + outcomes.get("failed", 0) == 2, result.stdout.str()
        assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
        assert result.ret != pytest.ExitCode.OK
        # the bad marker: named with what was wrong, from the worker as from a serial run
        result.stdout.fnmatch_lines(["*test_bad.py::test_bad: invalid gpu_budget marker: total='2Gb'*"])

    # --gpumem-report and JUnit: the same rows and figures from workers as from a serial run
    assert [r.split()[0] for r in serial_rows] == [
        "test_inner.py::test_fits[16]", "test_inner.py::test_fits[256]", "test_inner.py::test_fits[64]",
        "test_inner.py::test_loop", "test_inner.py::test_over",
    ]
    assert xdist_rows == serial_rows
    assert serial_rows[-1].endswith("FAILED")
    assert xdist_props == serial_props
    assert serial_props["test_unmeasured"] == {}
    measured = [k for k in serial_props if k.startswith(("test_fits", "test_loop", "test_over"))]
    assert len(measured) == 5
    for name in measured:
        assert serial_props[name]["gpumem_backend"] == "emulated"
    # Linear(32, w) + Linear(w, 4) in fp32: (32w + w + 4w + 4) x 4 B = 2,384 / 9,488 / 37,904 B for w = 16 / 64 / 256;
    # the peak holds at least params, grads and AdamW's two moments (4 x those) and the 16 x 32 fp32 batch (2 KiB)
    for w in (16, 64, 256):
        props = serial_props[f"test_fits[{w}]"]
        assert int(props["gpumem_params_bytes"]) == (37 * w + 4) * 4
        assert int(props["gpumem_peak_bytes"]) >= 4 * (37 * w + 4) * 4 + 16 * 32 * 4

    # the controller writes the baseline and the JSON once, with every measured test, and leaves no partial file
    for folder in (serial_dir, xdist_dir):
        assert sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".tmp")) == ["base.json", "r.json"]
    saved = {d: json.loads((d / "base.json").read_text())["tests"] for d in (serial_dir, xdist_dir)}
    assert sorted(saved[xdist_dir]) == sorted(saved[serial_dir])
    assert {k.split("::")[1] for k in saved[xdist_dir]} <= {"test_fits[16]", "test_fits[64]", "test_fits[256]",
                                                          "test_loop", "test_over"}
    assert saved[xdist_dir] == saved[serial_dir]
    results = {d: json.loads((d / "r.json").read_text())["tests"] for d in (serial_dir, xdist_dir)}
    assert len(results[xdist_dir]) == len(results[serial_dir]) >= 5
