"""Compute a JSON value once per test run and share it between the local xdist workers of that run.

Some fixtures cost tens of seconds (gloo ranks measured in a fresh interpreter, a real model's cpu step), and their
tests often land on different workers. The first worker to ask computes the value and leaves it as JSON in this
run's temporary folder, under a lock per key; the others wait on the lock and read it. Only local (popen) workers
share: their basetemps are ``<this run's basetemp>/popen-gwN``, whereas a remote worker's parent folder outlives
the run and could serve stale values. Without xdist, or on a remote worker, the value is computed once per process.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from pytest_gpumem._reporting.atomic_files import folder_lock, write_json_atomic


def computed_once(tmp_path_factory, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` (a JSON value), computed by one local worker of this run and read back by every caller."""
    base = tmp_path_factory.getbasetemp()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = worker is not None and base.name == f"popen-{worker}"
    path = (base.parent if shared else base) / "computed-once" / key / "value.json"
    with folder_lock(path):  # locks the key's own folder: a second caller waits, then reads
        if not path.exists():
            write_json_atomic(path, compute())  # a worker killed mid-write leaves no half file
        return json.loads(path.read_text())
