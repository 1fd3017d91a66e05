"""Issue 12 end to end: files left alone by runs that measured nothing, concurrent saves that merge, temp files
of killed saves cleaned, leaks shown, plugin frames hidden, write failures at the end reported, not raised."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpumem_factories import make_record
from pytest_gpumem._reporting.atomic_files import TEMP_SUFFIX, folder_lock
from pytest_gpumem._reporting.baseline import load_baseline, save_baseline_atomic

MLP = '''
import torch, pytest

def mlp(device, width=64):
    return torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, 4)).to(device)
'''
STEP = '''
@pytest.mark.gpu_budget("64MiB", rtol=False)
def test_{name}(gpumem):
    model = mlp(gpumem.device)
    gpumem.train_step(model, torch.optim.{optimizer}(model.parameters(), lr=0.1), torch.randn(8, 32, device=gpumem.device))
'''
BASE = ("--gpumem-backend=emulated", "-p", "no:cacheprovider")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def steps(*pairs: tuple[str, str]) -> str:
    return MLP + "".join(STEP.format(name=n, optimizer=o) for n, o in pairs)


@pytest.fixture
def measured(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project whose first run wrote results, a baseline and an HTML report."""
    pytester.makepyfile(test_m=steps(("sgd", "SGD"), ("adam", "Adam")))
    pytester.runpytest(*BASE, "--gpumem-json=r.json", "--gpumem-save-baseline=b.json", "--gpumem-html=r.html"
                       ).assert_outcomes(passed=2)
    return pytester


@pytest.mark.parametrize("how", ["collect-only", "collection-error", "no-gpumem-test", "deselected"])
def test_a_run_that_measured_nothing_leaves_every_file_alone(measured: pytest.Pytester, how: str) -> None:
    files = [measured.path / n for n in ("r.json", "b.json", "r.html")]
    before = [sha(p) for p in files]
    args = {"collect-only": ["--collect-only"], "collection-error": [], "no-gpumem-test": ["test_plain.py"],
            "deselected": ["-k", "nothing_matches"]}[how]
    if how == "collection-error":
        measured.makepyfile(test_broken="import no_such_module_anywhere\n")
    if how == "no-gpumem-test":
        measured.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = measured.runpytest(*BASE, "--gpumem-json=r.json", "--gpumem-save-baseline=b.json",
                                "--gpumem-html=r.html", *args)
    assert [sha(p) for p in files] == before
    result.stdout.fnmatch_lines([f"gpumem warning: no test was measured, so *r.json*left unchanged"])


def test_concurrent_saves_merge_under_the_lock(tmp_path: Path) -> None:
    """A save waits for the folder lock, then merges with what the file holds *then*, not at its start."""
    path = tmp_path / "b.json"
    save_baseline_atomic(path, [make_record("t::first")], backend="emulated", device="cuda (emulated on meta tensors)")
    # the other run's record goes over as JSON, so that process never imports torch (~1.5 s of CPU saved)
    record = json.dumps(make_record("t::from_the_other_run").to_dict())
    script = textwrap.dedent(f"""
        import json
        from pytest_gpumem._core.records import TestRecord
        from pytest_gpumem._reporting.baseline import save_baseline_atomic
        print("saving", flush=True)
        save_baseline_atomic({str(path)!r}, [TestRecord.from_dict(json.loads({record!r}))], backend="emulated",
                             device="cuda (emulated on meta tensors)")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    with folder_lock(path):  # this process is "the first run", mid-save
        other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        assert other.stdout is not None and other.stdout.readline().strip() == "saving"
        time.sleep(1.0)  # the other run is now blocked on the lock (it cannot have read the file yet)
        assert other.poll() is None
        data = json.loads(path.read_text())  # our save, written while we hold the lock
        data["tests"]["t::second"] = data["tests"]["t::first"]
        path.write_text(json.dumps(data))
    assert other.wait(timeout=120) == 0
    # 3 entries: the first save, ours made under the lock, and the other run's, merged after it got the lock
    assert sorted(load_baseline(path).entries) == ["t::first", "t::from_the_other_run", "t::second"]


def test_two_pytest_runs_saving_one_baseline_at_once_keep_every_entry(pytester: pytest.Pytester) -> None:
    pairs = [(f"{o.lower()}{i}", o) for o in ("SGD", "Adam") for i in range(6)]
    pytester.makepyfile(test_m=steps(*pairs))
    runs = [pytester.popen([sys.executable, "-m", "pytest", *BASE, "-q", "-k", key, "--gpumem-save-baseline=b.json"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for key in ("sgd", "adam")]
    assert [r.wait(timeout=600) for r in runs] == [0, 0]
    assert sorted(load_baseline(pytester.path / "b.json").entries) == sorted(f"test_m.py::test_{n}" for n, _ in pairs)
    assert [p.name for p in pytester.path.iterdir() if p.name.startswith(".")] == []


def test_a_killed_save_leaves_a_temp_file_the_next_save_removes(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".b.json.{int(dead.stdout)}.0123abcd{TEMP_SUFFIX}"  # what a kill -9 mid-save leaves
    stale.write_text('{"schema": "pytest-gpumem/baseline", "tes')
    running = tmp_path / f".b.json.{os.getppid()}.0123abcd{TEMP_SUFFIX}"  # a save still running elsewhere
    running.write_text("{")
    save_baseline_atomic(path, [make_record("t::a")], backend="emulated", device="cuda (emulated on meta tensors)")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b.json", running.name])
    assert list(load_baseline(path).entries) == ["t::a"]


def test_track_with_leak_0b_keeps_nothing_alive_and_a_real_leak_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=MLP + '''
KEEP = []

@pytest.mark.gpu_budget("64MiB", leak="0B")
def test_track_keeps_nothing(gpumem):
    model = mlp(gpumem.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.randn(8, 32, device=gpumem.device)
    with gpumem.track(model=model, optimizer=optimizer, batch=batch):
        for _ in range(2):
            model(batch).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

def test_keeps_its_model(gpumem):
    model = mlp(gpumem.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.randn(8, 32, device=gpumem.device)
    with gpumem.track(model=model, optimizer=optimizer, batch=batch):
        model(batch).sum().backward()
        optimizer.step()
    KEEP.append(model)  # the parameters outlive the test: a leak
''')
    result = pytester.runpytest(*BASE, "--gpumem-json=r.json", "--gpumem-report")
    result.assert_outcomes(passed=2)
    tests = {t["nodeid"]: t for t in json.loads((pytester.path / "r.json").read_text())["tests"]}
    assert tests["test_m.py::test_track_keeps_nothing"]["leak_bytes"] == 0
    # the kept model's parameters and their grads (no zero_grad): Linear(32, 64) + Linear(64, 4) hold weights of
    # 2048 and 256 floats and biases of 64 and 4, in 512-byte blocks on the emulated CUDA allocator:
    # 8192 + 512 + 1024 + 512 = 10240 bytes of parameters, as much again of grads
    assert tests["test_m.py::test_keeps_its_model"]["leak_bytes"] == 2 * (8192 + 512 + 1024 + 512)
    result.stdout.fnmatch_lines(["gpumem warning: test_m.py::test_keeps_its_model left 20.00 KiB of measured memory "
                                 "allocated after it ended*"])


def test_fixture_only_test_with_a_default_budget_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m="def test_device(gpumem):\n    assert gpumem.device.type in ('meta', 'cpu', 'cuda')\n")
    pytester.runpytest(*BASE, "--gpumem-default-budget=1GiB").assert_outcomes(passed=1)


def test_plugin_frames_are_hidden_from_the_users_traceback(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m=MLP + '''
class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        raise ValueError("my bug in forward")

def test_broken(gpumem):
    model = Broken().to(gpumem.device)
    gpumem.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 4, device=gpumem.device))
''')
    result = pytester.runpytest("--gpumem-backend=cpu", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "ValueError: my bug in forward" in text
    assert "pytest_gpumem" not in "\n".join(ln for ln in result.stdout.lines if ln.startswith(("    ", ">"))), text
    assert "_measure/step.py" not in text and "fixture.py" not in text


def test_a_file_that_cannot_be_written_at_the_end_is_an_error_line_not_a_traceback(pytester: pytest.Pytester) -> None:
    # the folder for the results is free at startup; a test then puts a file where that folder must go
    pytester.makepyfile(test_m=steps(("sgd", "SGD")) + "\ndef test_takes_the_folder_name():\n"
                                                       "    open('out', 'w').close()\n")
    result = pytester.runpytest(*BASE, "--gpumem-json=out/r.json")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"gpumem error: --gpumem-json={pytester.path / 'out' / 'r.json'} not written: *"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert (pytester.path / "out").read_text() == ""
