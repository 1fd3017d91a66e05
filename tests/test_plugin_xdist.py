"""pytest-xdist: workers measure, the controller prints the same --gpumem-report and JUnit figures as a serial run."""
from __future__ import annotations

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


def test_xdist_report_and_junit_match_a_serial_run(pytester):
    pytester.makepyfile(test_inner=INNER)
    runs = {}
    for name, extra in (("serial", ()), ("xdist", ("-n", "2"))):
        xml = pytester.path / f"{name}.xml"
        result = pytester.runpytest_subprocess("--gpumem-report", f"--junitxml={xml}", "-p", "no:cacheprovider", *extra)
        result.assert_outcomes(passed=5, failed=1)
        assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
        runs[name] = (_report_rows(result), _properties(xml))
    serial_rows, serial_props = runs["serial"]
    xdist_rows, xdist_props = runs["xdist"]
    assert [r.split()[0] for r in serial_rows] == [
        "test_inner.py::test_fits[16]", "test_inner.py::test_fits[256]", "test_inner.py::test_fits[64]",
        "test_inner.py::test_loop", "test_inner.py::test_over",
    ]
    assert xdist_rows == serial_rows
    assert serial_rows[-1].endswith("FAILED")
    # every measured test carries its figures in the XML, the same from workers as from a serial run
    assert xdist_props == serial_props
    assert serial_props["test_unmeasured"] == {}
    measured = [k for k in serial_props if k != "test_unmeasured"]
    assert len(measured) == 5
    for name in measured:
        assert int(serial_props[name]["gpumem_peak_bytes"]) > 0
        assert serial_props[name]["gpumem_backend"] == "emulated"
    widths = [int(serial_props[f"test_fits[{w}]"]["gpumem_params_bytes"]) for w in (16, 64, 256)]
    assert widths == sorted(widths) and len(set(widths)) == 3
