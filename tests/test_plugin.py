"""The pytest surface (issue 3), run as a user runs it: pytester files with a budgeted tiny-MLP step.

Figures are derived, never hard-coded: the outer test measures the same model with ``measure_step``
on the emulated backend and checks what the inner run says. The inner runs use the emulated backend on
every machine (on a GPU machine through ``--gpumem-backend=emulated``, see the ``pytester`` fixture below).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Callable

import pytest
import torch

from pytest_gpumem import measure_step
from pytest_gpumem._core.categories import CATEGORIES
from pytest_gpumem._core.units import format_bytes, format_percent


def _on_emulated(run: Callable[..., Any], pytester: pytest.Pytester) -> Callable[..., Any]:
    """``run`` with ``--gpumem-backend=emulated`` first, unless the test picks a backend itself (CLI or ini)."""
    def emulated(*args: Any, **kwargs: Any) -> Any:
        picked = any(str(a).startswith("--gpumem-backend") for a in args) or any(
            "gpumem_backend" in f.read_text() for f in pytester.path.glob("*") if f.name in _INI_FILES)
        return run(*(() if picked else ("--gpumem-backend=emulated",)), *args, **kwargs)
    return emulated


_INI_FILES = ("pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml")


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """Inner runs measure on the emulated backend on every machine: on a GPU machine the default would be cuda,
    and the figures below are derived with the emulated backend (a test that picks a backend keeps it)."""
    if torch.cuda.is_available():
        for name in ("runpytest", "runpytest_subprocess", "inline_run"):
            monkeypatch.setattr(pytester, name, _on_emulated(getattr(pytester, name), pytester))
    return pytester


# The model and batch of every inner test; exec'd here too, so both sides build exactly the same step.
MODEL = '''
import torch
from torch import nn

def make_model(device="cpu"):
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)

def make_step(device):
    model = make_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, torch.randn(16, 32, device=device)
'''
_NS: dict = {}
exec(MODEL, _NS)


def _warm_up() -> None:
    """Import what a step imports lazily (torch._dynamo, torch._inductor...) before any inline run.

    pytester's inline runs restore sys.modules afterwards; a module such as torch._inductor.test_operators
    first imported inside one would be imported again by the next and fail ("Only a single TORCH_LIBRARY
    can be used to register the namespace _inductor_test").
    """
    import pytest_gpumem._tools.contradiction  # noqa: F401  (the rtol check)
    import pytest_gpumem._judge  # noqa: F401  (the plugin imports these on first use; patched by tests below)
    import pytest_gpumem._reporting.gating  # noqa: F401
    import pytest_gpumem._reporting.tables  # noqa: F401
    import pytest_gpumem.fixture  # noqa: F401
    import pytest_gpumem._emulation  # noqa: F401  (explains failures on meta tensors)
    from pytest_gpumem import track
    from pytest_gpumem._estimate import estimate_step

    for backend in ("emulated", "cpu"):
        measure_step(*_NS["make_step"]("cpu"), backend=backend)
    model, optimizer, batch = _NS["make_step"]("meta")
    estimate_step(model, optimizer, batch)
    with track(model, optimizer, batch, backend="emulated"):
        model(batch).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


_warm_up()


def _inner(pytester: pytest.Pytester, body: str, **extra: str) -> None:
    pytester.makepyfile(mlp=MODEL, test_inner="import pytest\nimport torch\nfrom mlp import make_model, make_step\n"
                        + body, **extra)


@pytest.fixture(scope="module")
def expected():
    """What the emulated backend measures for the inner tests' step, anchored to its closed-form figures."""
    report = measure_step(*_NS["make_step"]("cpu"), backend="emulated")
    # Linear(32, 64) + Linear(64, 4) in fp32: (32*64 + 64 + 64*4 + 4) * 4 B = 2372 * 4 = 9488 B of params, as much
    # of grads and of SGD momentum buffers; the batch is 16 x 32 fp32 = 2048 B
    split = {c.value: report.category_peak(c) for c in CATEGORIES}
    assert (split["params"], split["grads"], split["optimizer"], split["batch"]) == (9488, 9488, 9488, 2048)
    # The peak, in the allocator's 512-B blocks: W1 (64 x 32 fp32) 8192 B, W2 (4 x 64) 1024 B, each bias (256 B,
    # 16 B) one 512-B block: 10240 B per copy of the model state. The second ("steady") step's backward holds, at
    # the instant b1's grad, the last of the four, is allocated,
    #   params + momentum buffers (the first step made them) + all four grads   3 x 10240 = 30720
    #   the batch                                                                          2048
    #   the grad at ReLU's input (16 x 64 fp32, read by W1's and b1's grads)              4096
    #   Linear2's 16 x 4 output (256 B; held through backward), the scalar loss
    #   and its grad of ones (4 B each): one 512-B block each                          3 x 512
    # = 38400 B. The first step's backward holds no momentum buffers yet, so the steady one is the peak.
    assert report.peak == 3 * 10240 + 2048 + 4096 + 3 * 512 == 38400
    assert (report.peak_step.label, report.peak_phase.value) == ("steady", "backward")
    # every block is far below 1 MiB: the caching allocator serves all of them from one 2 MiB small-pool segment
    assert report.reserved_peak == 2 * 1024 * 1024
    return report


def _mix(report) -> str:
    parts = sorted(((b, c) for c, b in report.peak_split.items() if b > 0), key=lambda bc: -bc[0])
    return ", ".join(f"{c.value} {format_bytes(b)}" for b, c in parts)


STEP = '''
    model, optimizer, batch = make_step(gpumem.device)
    gpumem.train_step(model, optimizer, batch)
'''

# -- the marker ----------------------------------------------------------------------------------


def test_marker_is_listed_and_clean_under_strict_markers(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.gpu_budget(total=None, *, params=None, * kind='allocated', *"])
    _inner(pytester, "@pytest.mark.gpu_budget('1GB', activations='512MiB')\ndef test_a(gpumem):" + STEP)
    pytester.runpytest("--strict-markers").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        ("'1GB', bogus=3", "unknown keyword bogus"),
        ("'2 parsecs'", "total='2 parsecs'"),
        ("'1GB', kind='free'", "kind='free'"),
        ("activations='-1MB'", "activations='-1MB'"),
    ],
)
def test_bad_marker_arguments_error_their_own_test_only(pytester, args, shown):
    _inner(pytester, f"@pytest.mark.gpu_budget({args})\ndef test_bad(gpumem):\n    pass\n\ndef test_fine():\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=1)  # like skipif or timeout: the rest of the suite still runs
    result.stdout.fnmatch_lines([f"*test_inner.py::test_bad: invalid gpu_budget marker: {shown}*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert "During handling" not in result.stdout.str()
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


# -- the fixture ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "device", "backend"), [((), "meta", "emulated"),
                                                            (("--gpumem-backend=cpu",), "cpu", "cpu")])
def test_fixture_device_follows_the_backend(pytester, option, device, backend):
    _inner(pytester, f'''
def test_device(gpumem):
    assert gpumem.device == torch.device("{device}")
    assert gpumem.backend == "{backend}"
    report = gpumem.train_step(*make_step(gpumem.device))
    assert report.backend == "{backend}"
''')
    pytester.runpytest(*option).assert_outcomes(passed=1)


def test_train_step_returns_the_report_the_engine_measures(pytester, expected):
    _inner(pytester, f'''
def test_step(gpumem):
    report = gpumem.train_step(*make_step(gpumem.device))
    assert report.peak == {expected.peak}
    assert report.peak_phase.value == "{expected.peak_phase.value}"
    assert gpumem.reports == [report]
''')
    pytester.runpytest().assert_outcomes(passed=1)


def test_track_finds_the_phases_of_a_hand_written_loop(pytester):
    _inner(pytester, '''
@pytest.mark.gpu_budget("1GB")
def test_loop(gpumem):
    model, optimizer, batch = make_step(gpumem.device)
    with gpumem.track(model=model, optimizer=optimizer, batch=batch) as handle:
        for _ in range(2):
            model(batch).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    report = handle.report
    assert gpumem.reports == [report]
    assert len(report.steps) == 2
    loop = {"forward", "backward", "optimizer", "zero_grad"}
    for step in report.steps:
        assert loop <= {p.value for p in step.phases}, step.phases
    assert report.steps[1].phases[report.steps[1].peak_phase].peak_split
''')
    pytester.runpytest().assert_outcomes(passed=1)


def test_budgeted_test_that_measures_nothing_fails_and_says_so(pytester):
    _inner(pytester, "@pytest.mark.gpu_budget('1GB')\ndef test_idle(gpumem):\n    pass\n\n"
                     "@pytest.mark.gpu_budget('1GB')\ndef test_no_fixture():\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*gpu_budget is set but the test measured nothing: call gpumem.train_step*"] * 2)


# -- failures at the boundary --------------------------------------------------------------------


def test_budget_boundary_equal_passes_one_byte_less_fails(pytester, expected):
    peak = expected.peak
    _inner(pytester, f'''
@pytest.mark.parametrize("budget", [
    pytest.param({peak}, marks=pytest.mark.gpu_budget({peak}), id="at_peak"),
    pytest.param({peak - 1}, marks=pytest.mark.gpu_budget({peak - 1}), id="one_byte_less"),
])
def test_step(gpumem, budget):''' + STEP)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)  # FAILED, not ERROR
    sentence = (
        f"gpu_budget {format_bytes(peak - 1)} exceeded: peak {format_bytes(peak)} "
        f"({format_bytes(1, signed=True)}, {format_percent(1 / (peak - 1))}) during {expected.peak_phase.value}; "
        f"{_mix(expected)}"
    )
    lines = result.stdout.lines
    assert sentence in lines, "\n".join(lines)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_step[[]one_byte_less[]] - gpu_budget *"])
    # the report section: the phase x category table of the peak step
    header = next(i for i, ln in enumerate(lines) if ln.startswith("step/phase"))
    assert lines[header].split()[3:] == [c.value for c in CATEGORIES]
    rows = [ln for ln in lines[header + 2:] if ln.startswith(("first/", "steady/"))]
    assert len(rows) == len(expected.peak_step.phases)
    (marked,) = [ln for ln in rows if ln.endswith("<- peak")]
    assert marked.startswith(f"{expected.peak_step.label}/{expected.peak_phase.value} ")


def test_verbose_report_section_lists_every_step(pytester, expected):
    _inner(pytester, "@pytest.mark.gpu_budget('1B')\ndef test_step(gpumem):" + STEP)
    quiet = [ln for ln in pytester.runpytest().stdout.lines if ln.startswith(("first/", "steady/"))]
    loud = [ln for ln in pytester.runpytest("-v").stdout.lines if ln.startswith(("first/", "steady/"))]
    assert len(quiet) == len(expected.peak_step.phases)
    assert len(loud) == sum(len(s.phases) for s in expected.steps) > len(quiet)


def test_category_and_reserved_budgets(pytester, expected):
    activations = expected.category_peak(next(c for c in CATEGORIES if c.value == "activations"))
    reserved = expected.reserved_peak
    assert activations > 0 and reserved is not None
    _inner(pytester, f'''
@pytest.mark.gpu_budget(activations={activations})
def test_activations_fit(gpumem):{STEP}
@pytest.mark.gpu_budget(activations={activations - 1})
def test_activations_over(gpumem):{STEP}
@pytest.mark.gpu_budget({reserved}, kind="reserved")
def test_reserved_fits(gpumem):{STEP}
@pytest.mark.gpu_budget({reserved - 1}, kind="reserved")
def test_reserved_over(gpumem):{STEP}
''')
    result = pytester.runpytest("-rf")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        f"gpu_budget activations={format_bytes(activations - 1)} exceeded: activations peaked at "
        f"{format_bytes(activations)} *",
    ])
    result.stdout.fnmatch_lines([
        f"gpu_budget {format_bytes(reserved - 1)} (reserved) exceeded: reserved peak {format_bytes(reserved)} *",
    ])
    assert expected.peak < reserved - 1  # so it is the reserved figure, not the allocated peak, that failed


# -- the user's own result comes first -----------------------------------------------------------


def test_users_own_assertion_is_shown_in_a_budgeted_test(pytester):
    _inner(pytester, "@pytest.mark.gpu_budget('1GB')\ndef test_mine(gpumem):" + STEP
           + "    assert 1 + 1 == 3, 'my own message'\n")
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: my own message*"])
    assert "gpumem internal error" not in result.stdout.str()


def test_a_crash_inside_the_plugin_never_hides_the_users_result(pytester):
    conftest = '''
import pytest

@pytest.fixture(autouse=True)
def broken_checker(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated plugin bug")
    monkeypatch.setattr("pytest_gpumem._judge._record", boom)
'''
    _inner(pytester, "@pytest.mark.gpu_budget('1GB')\ndef test_fails(gpumem):" + STEP
           + "    assert False, 'my own message'\n\n@pytest.mark.gpu_budget('1GB')\ndef test_passes(gpumem):" + STEP,
           conftest=conftest)
    result = pytester.runpytest("-rA")
    # the plugin's failure fails the test it was checking, never a silent pass ...
    result.assert_outcomes(passed=0, failed=2)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_passes - pytest-gpumem internal error*"])
    # ... and never replaces the user's own failure, which keeps its message; the plugin's goes in a section
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_fails - AssertionError: my own message*"])
    result.stdout.fnmatch_lines(["*gpumem internal error*", "*RuntimeError: simulated plugin bug*"])
    # the summary names both tests under the plugin's own heading
    result.stdout.fnmatch_lines(["*gpumem internal errors*", "test_inner.py::test_fails: pytest-gpumem internal error*",
                                 "test_inner.py::test_passes: pytest-gpumem internal error*"])


def test_emulated_backend_step_failure_explains_itself(pytester):
    _inner(pytester, '''
class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.lin(torch.unique(x, dim=0))  # how many distinct rows there are depends on x's values

@pytest.mark.gpu_budget("1GB")
def test_item(gpumem):
    model = Branchy().to(gpumem.device)
    gpumem.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(16, 32, device=gpumem.device))
''')
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        # torch's line that needed the values, then the user's own line
        "*StepFailed: UnknownValueError during forward of step 0: unique (torch.unique, unique_consecutive) at "
        "torch/functional.py:* (called from *test_inner.py:11) "
        "needs the values*its output shape depends on them*backend='cpu'*",
    ])
    assert "gpumem internal error" not in result.stdout.str()


# -- options, as CLI flags and ini keys ----------------------------------------------------------


def _report_rows(result) -> list[str]:
    lines = result.stdout.lines
    start = next(i for i, ln in enumerate(lines) if "gpumem report" in ln)
    return [ln for ln in lines[start:] if ln.startswith("test_inner.py::")]


@pytest.mark.parametrize("how", ["cli", "ini"])
def test_report_option_lists_each_measured_test(pytester, expected, how):
    budget = 2 * expected.peak
    _inner(pytester, f"@pytest.mark.gpu_budget({budget})\ndef test_a(gpumem):{STEP}\n"
                     f"def test_b(gpumem):{STEP}\ndef test_unmeasured():\n    pass\n")
    if how == "ini":
        pytester.makeini("[pytest]\ngpumem_report = true\n")
    result = pytester.runpytest(*(["--gpumem-report"] if how == "cli" else []))
    result.assert_outcomes(passed=3)
    rows = _report_rows(result)
    assert [r.split()[0] for r in rows] == ["test_inner.py::test_a", "test_inner.py::test_b"]
    a, b = rows
    headroom = f"{(budget - expected.peak) / budget * 100:.1f}%"
    cells = a.split()
    # default: 120 columns; one backend, so no backend column, and the largest category instead of all seven
    assert cells[1:6] == [*format_bytes(budget).split(), *format_bytes(expected.peak).split(), headroom]
    assert cells[6] == expected.peak_phase.value
    assert b.split()[1] == "-"
    top = max(CATEGORIES, key=lambda c: expected.peak_split.get(c, 0))
    assert f"{expected.peak_split[top] / expected.peak * 100:.0f}%" in a
    assert a.endswith("ok")
    assert "peak: most bytes allocated" in result.stdout.str()
    section = result.stdout.lines[next(i for i, ln in enumerate(result.stdout.lines) if "gpumem report" in ln):]
    assert max(len(ln) for ln in section if not ln.startswith("=")) <= 120
    # -v: every column, and a row per step/phase under each test
    verbose = pytester.runpytest("-v", *(["--gpumem-report"] if how == "cli" else []))
    wide = next(ln for ln in _report_rows(verbose) if ln.startswith("test_inner.py::test_a "))
    for c in CATEGORIES:
        value = expected.peak_split.get(c, 0)
        assert (format_bytes(value) if value else "0") in wide
    assert wide.split()[1] == "emulated"
    lines = verbose.stdout.lines
    i = next(i for i, ln in enumerate(lines) if ln.startswith("test_inner.py::test_a "))
    phase_rows = [ln for ln in lines[i + 1:] if ln.startswith("  ")][: sum(len(s.phases) for s in expected.steps)]
    assert [r.split()[0] for r in phase_rows] == [f"{s.label}/{p.value}" for s in expected.steps for p in s.phases]
    assert format_bytes(expected.peak) in next(r for r in phase_rows
                                               if r.split()[0] == f"{expected.peak_step.label}/{expected.peak_phase.value}")


def test_report_off_by_default_and_says_when_nothing_was_measured(pytester):
    _inner(pytester, "def test_plain():\n    pass\n")
    assert "gpumem report" not in pytester.runpytest().stdout.str()
    pytester.runpytest("--gpumem-report").stdout.fnmatch_lines(["*no test measured GPU memory*"])


def test_backend_ini_and_cli_override(pytester):
    _inner(pytester, "def test_device(gpumem, pytestconfig):\n"
                     "    assert str(gpumem.device) == pytestconfig.getoption('expect')\n",
           conftest="def pytest_addoption(parser):\n    parser.addoption('--expect')\n")
    pytester.makeini("[pytest]\ngpumem_backend = cpu\n")
    pytester.runpytest("--expect=cpu").assert_outcomes(passed=1)
    pytester.runpytest("--expect=meta", "--gpumem-backend=emulated").assert_outcomes(passed=1)


def test_default_budget_ini_and_cli_override(pytester, expected):
    _inner(pytester, "def test_unmarked(gpumem):" + STEP
           + "\n@pytest.mark.gpu_budget('1GB')\ndef test_marked(gpumem):" + STEP)
    pytester.makeini(f"[pytest]\ngpumem_default_budget = {expected.peak - 1}\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)  # the marker wins over the default
    result.stdout.fnmatch_lines([f"FAILED test_inner.py::test_unmarked - gpu_budget {format_bytes(expected.peak - 1)} exceeded*"])
    pytester.runpytest(f"--gpumem-default-budget={expected.peak}").assert_outcomes(passed=2)


def test_rtol_ini_and_cli_override(pytester):
    # a conftest formula that makes the estimate of the optimizer state absurd: only the rtol check notices
    conftest = "def pytest_gpumem_optimizer_state_bytes(optimizer, param, device):\n    return 10**9\n"
    _inner(pytester, "def test_step(gpumem):" + STEP, conftest=conftest)
    result = pytester.runpytest()  # default: on, at 5%
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the measurement contradicts the estimate (rtol 0.05*", "*estimate*vs measured*"])
    pytester.makeini("[pytest]\ngpumem_rtol = off\n")
    pytester.runpytest().assert_outcomes(passed=1)
    result = pytester.runpytest("--gpumem-rtol=0.5")  # the CLI wins over the ini
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*rtol 0.5*"])


def test_rtol_false_on_the_marker_skips_the_estimate_check(pytester):
    conftest = "def pytest_gpumem_optimizer_state_bytes(optimizer, param, device):\n    return 10**9\n"
    _inner(pytester, "@pytest.mark.gpu_budget('1GB', rtol=False)\ndef test_step(gpumem):" + STEP, conftest=conftest)
    pytester.runpytest().assert_outcomes(passed=1)


def test_estimate_matches_by_default(pytester):
    """Without any option the plugin compares the step with its estimate, and a plain MLP agrees."""
    _inner(pytester, "def test_step(gpumem):" + STEP)
    result = pytester.runpytest("--gpumem-json=out.json")
    result.assert_outcomes(passed=1)
    import json

    record = json.loads((pytester.path / "out.json").read_text())
    (entry,) = record["tests"] if isinstance(record["tests"], list) else record["tests"].values()
    estimate = entry["estimate"]
    # the model states in closed form (see `expected`): 9488 B each of params, grads and momentum, a 2048-B batch
    totals = estimate["totals"]
    assert (totals["params"], totals["grads"], totals["optimizer"], totals["batch"]) == (9488, 9488, 9488, 2048)
    # and the peak the plugin compared with the measurement is within the default rtol of 5%
    assert abs(estimate["peak_bytes"] - entry["peak_bytes"]) <= 0.05 * entry["peak_bytes"]


@pytest.mark.parametrize(
    ("args", "ini", "shown"),
    [
        (["--gpumem-backend=tpu"], "", "'tpu'"),
        ([], "gpumem_backend = tpu", "'tpu'"),
        (["--gpumem-default-budget=lots"], "", "'lots'"),
        ([], "gpumem_default_budget = 2 parsecs", "'2 parsecs'"),
        (["--gpumem-rtol=abc"], "", "'abc'"),
        ([], "gpumem_rtol = -1", "'-1'"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_value(pytester, args, ini, shown):
    _inner(pytester, "def test_plain():\n    pass\n")
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert shown in result.stderr.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


# -- JUnit XML -----------------------------------------------------------------------------------


def test_junit_xml_carries_the_figures_as_properties(pytester, expected):
    _inner(pytester, f"@pytest.mark.gpu_budget({2 * expected.peak})\ndef test_step(gpumem):{STEP}")
    xml = pytester.path / "junit.xml"
    pytester.runpytest(f"--junitxml={xml}").assert_outcomes(passed=1)
    (case,) = ET.parse(xml).getroot().iter("testcase")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["gpumem_peak_bytes"] == str(expected.peak)
    assert props["gpumem_backend"] == "emulated"
    assert props["gpumem_budget_bytes"] == str(2 * expected.peak)
    for c in CATEGORIES:
        assert props[f"gpumem_{c.value}_bytes"] == str(expected.peak_split.get(c, 0)), c


# -- leaks ---------------------------------------------------------------------------------------

LEAKY = '''
KEEP = []

@pytest.mark.gpu_budget("1GB"{leak})
def test_keeps_its_model(gpumem):
    model, optimizer, batch = make_step(gpumem.device)
    gpumem.train_step(model, optimizer, batch)
    KEEP.append(model)

@pytest.mark.gpu_budget("1GB"{leak})
def test_in_a_cycle(gpumem):
    model, optimizer, batch = make_step(gpumem.device)
    model.keep = [optimizer, model]  # a reference cycle: only a collection frees the optimizer's state after the test
    gpumem.train_step(model, optimizer, batch)

@pytest.mark.gpu_budget("1GB"{leak})
def test_clean(gpumem):
''' + STEP


def _teardowns(reprec) -> dict[str, pytest.TestReport]:
    return {r.nodeid.split("::")[-1]: r for r in reprec.getreports("pytest_runtest_logreport") if r.when == "teardown"}


def test_leak_is_reported_and_fails_with_leak_budget(pytester, expected):
    _inner(pytester, LEAKY.format(leak=""))
    # inline_run's HookRecorder keeps every hook call's arguments, and the estimate asks the
    # pytest_gpumem_activation_bytes hook about each module and tensor: with the estimate check on,
    # the recorder itself would keep the clean test's tensors alive
    pytester.makeini("[pytest]\ngpumem_rtol = off\n")
    teardowns = _teardowns(pytester.inline_run())
    params = expected.peak_split[next(c for c in CATEGORIES if c.value == "params")]
    leaky = dict(teardowns["test_keeps_its_model"].sections)
    assert "gpumem leak" in leaky, teardowns["test_keeps_its_model"].sections
    assert "still allocated after it ended" in leaky["gpumem leak"]
    # the kept model's parameters (zero_grad set its grads to None): weights of 64 x 32 and 4 x 64 fp32, biases of 64
    # and 4, in 512-byte blocks on the emulated allocator: 8192 + 512 + 1024 + 512 = 10,240 B
    assert params == 9488 and teardowns["test_keeps_its_model"].gpumem_leak == 8192 + 512 + 1024 + 512
    assert teardowns["test_keeps_its_model"].passed
    # what only a reference cycle holds is freed by the leak check's own collection: no leak
    for name in ("test_clean", "test_in_a_cycle"):
        assert "gpumem leak" not in dict(teardowns[name].sections)
        assert teardowns[name].gpumem_leak == 0

    _inner(pytester, LEAKY.format(leak=', leak="0B"'))
    result = pytester.runpytest()
    # a teardown failure: pytest counts it as an error of the test, the call itself passed
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_keeps_its_model*",
                                 "gpu_budget leak=0 B exceeded: * is still allocated after it ended*"])
