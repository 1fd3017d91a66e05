"""Run a case script of the test suite in a fresh interpreter once per test run, shared by the xdist workers.

The gloo-rank measurements must run in a process that has done nothing else (see parallel_gloo_cases.py), and
they take tens of seconds: a module fixture would run them once in every xdist worker that gets one of the
module's tests. Here the first worker runs the script and leaves its JSON in the run's shared temporary folder;
the others wait on a lock and read it.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_script(script: str, timeout_s: float) -> Any:
    """The JSON that ``script`` (a file next to this one) prints on its last line, run with the repository and
    the tests folder on its path; AssertionError carrying its stderr when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True, env=env,
                          timeout=timeout_s)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_script_once(tmp_path_factory, script: str, timeout_s: float) -> Any:
    """``run_script(script)``, run by one xdist worker of this test run and read by the others (without xdist,
    simply run)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return run_script(script, timeout_s)
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above every worker's own
    result = shared / f"{script}.json"
    with open(shared / f"{script}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the script failed
        if not result.exists():
            data = run_script(script, timeout_s)
            partial = result.with_suffix(".partial")
            partial.write_text(json.dumps(data))
            partial.replace(result)
        return json.loads(result.read_text())
