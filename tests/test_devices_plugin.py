"""--gpumem-device, gpu_budget(device=...) and budgets as a share of the GPU's memory, run as users run them.

The inner runs use the emulated backend (a GPU machine would measure the GPU present instead). Figures:
the tiny MLP's emulated peak is well under 1 GiB; the workspaces add 32 + 1 + 32 MiB on an H100.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="inner runs assume the emulated backend")

STEP = '''
import pytest, torch
from torch import nn

def step(gpumem):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).to(gpumem.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return gpumem.train_step(model, opt, torch.randn(16, 32, device=gpumem.device))
'''


def test_device_option_and_marker_pick_the_workspaces(pytester: pytest.Pytester):
    pytester.makepyfile(STEP + '''
@pytest.mark.gpu_budget("1GiB")
def test_default(gpumem):
    report = step(gpumem)
    assert report.other_parts["cuBLAS workspace (main thread)"] == 32 * 2**20   # H100 from --gpumem-device

@pytest.mark.gpu_budget("1GiB", device="A100")
def test_marker_wins(gpumem):
    report = step(gpumem)
    assert report.other_parts["cuBLAS workspace (main thread)"] == 8_519_680    # A100: :4096:2:16:8
    assert report.device.startswith("A100-80GB")
''')
    result = pytester.runpytest("--gpumem-device=h100", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_a_share_of_memory_resolves_against_the_device(pytester: pytest.Pytester):
    pytester.makepyfile(STEP + '''
@pytest.mark.gpu_budget("0.05%", device="H100")
def test_too_small(gpumem):
    step(gpumem)

@pytest.mark.gpu_budget("90%", device="L4")
def test_fits(gpumem):
    step(gpumem)
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    # 0.05% of 80 GiB = 42,949,672 B (40.96 MiB) < 32 + 1 + 32 MiB of workspaces alone
    result.stdout.fnmatch_lines(["*gpu_budget 40.96 MiB exceeded: peak 65.03 MiB*"])


def test_a_share_without_a_device_is_the_tests_error(pytester: pytest.Pytester):
    pytester.makepyfile(STEP + '''
@pytest.mark.gpu_budget("90%")
def test_share(gpumem):
    step(gpumem)
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*invalid gpu_budget marker*share of the GPU's memory, and no GPU is known*"])


def test_default_budget_share_and_ini_device(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\ngpumem_device = H200\ngpumem_default_budget = 90%\n")
    pytester.makepyfile(STEP + '''
def test_uses_default(gpumem):
    report = step(gpumem)
    assert report.device.startswith("H200")
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_unknown_device_option_lists_the_known_ones(pytester: pytest.Pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--gpumem-device=H300", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpumem-device: unknown GPU 'H300': known devices are H100-SXM, H100-PCIe, H200*"])


def test_conftest_adds_a_profile(pytester: pytest.Pytester):
    pytester.makeconftest('''
from pytest_gpumem._cuda_facts.devices import DeviceProfile

def pytest_gpumem_device_profiles():
    return [DeviceProfile("T4", (7, 5), 16 * 2**30, "nominal")]
''')
    pytester.makepyfile(STEP + '''
@pytest.mark.gpu_budget("50%")
def test_t4(gpumem):
    report = step(gpumem)
    assert report.device.startswith("T4") and report.other_parts["cuBLAS workspace (main thread)"] == 8_519_680
''')
    result = pytester.runpytest("--gpumem-device=t4", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
