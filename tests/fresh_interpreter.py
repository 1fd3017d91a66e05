"""Run a case script of the test suite in a fresh interpreter once per test run, shared by the xdist workers.

The gloo-rank measurements must run in a process that has done nothing else (see parallel_gloo_cases.py), and
they take tens of seconds: a module fixture would run them once in every xdist worker that gets one of the
module's tests, and once in each of the two modules that read the same script. computed_once runs it once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from computed_once import computed_once

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
    """``run_script(script)``, run once per test run and shared by its xdist workers (computed_once)."""
    return computed_once(tmp_path_factory, script, lambda: run_script(script, timeout_s))
