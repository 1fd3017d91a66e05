"""The forked child that runs an emulated sharded rank: its deadline, and what happens where forking cannot help.

An emulated FSDP/ZeRO-2 rank runs in a forked child so that this process stays able to fork gloo ranks. A child
past its deadline must be stopped (not waited for forever), and a process that can no longer fork children that
run backward (it ran a DTensor step, or any backward with a CUDA device present) must still get its reports.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_gpumem._measure.step import StepFailed
from pytest_gpumem._parallel.clean_child import report_from_child

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the emulated ranks' child is a forked process")

HERE = Path(__file__).resolve().parent


def test_a_child_past_its_deadline_is_stopped_and_reaped(tmp_path):
    pid_file = tmp_path / "child.pid"

    def sleeps():
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)

    started = time.monotonic()
    with pytest.raises(StepFailed, match=r"did not finish within timeout=1 s and was stopped"):
        report_from_child(sleeps, timeout_s=1)
    assert time.monotonic() - started < 30  # stopped at its deadline, not after the 60 s it asked for
    with pytest.raises(ProcessLookupError):  # killed and reaped: not even a zombie is left
        os.kill(int(pid_file.read_text()), 0)


# Run in a fresh interpreter: the in-process DTensor step below leaves that process unable to fork children that
# run backward, which would break any later test of the same xdist worker that forks gloo ranks.
_AFTER_A_DTENSOR_STEP = textwrap.dedent("""
    import json, sys
    import parallel_layout_cases as cases
    from pytest_gpumem import FSDP
    from pytest_gpumem._parallel import emulated_ranks as er
    from pytest_gpumem._parallel.runners import ParallelStep

    def step():
        model, optimizer, batch, target, loss = cases.case("mlp")
        return ParallelStep(model, optimizer, batch, FSDP(2), loss, target)

    before = [r.peak for r in er.emulate_ranks(step(), semantics="cpu")]   # in a forked child, as usual
    er.emulate_rank(step(), 0, er.MetaCpuRankBackend())                     # here: this process can fork no more
    after = [r.peak for r in er.emulate_ranks(step(), semantics="cpu")]    # the child fails, so it runs here
    sys.stdout.write(json.dumps({"before": before, "after": after}) + "\\n")
""")


def test_a_process_that_can_no_longer_fork_backward_still_gets_the_sharded_ranks():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _AFTER_A_DTENSOR_STEP], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    # the same rank figures whether the rank ran in the child or, after the fork stopped working, in the process
    assert peaks["after"] == peaks["before"] and len(peaks["before"]) == 2 and min(peaks["before"]) > 0
