"""Run a function in a forked child and take its StepReport back as JSON, leaving this process untouched.

Why: once a process has run a DTensor op (FSDP2 shards its parameters as DTensors), torch's autograd starts its
device threads at the next backward, and from then on that process can no longer fork children that run
autograd ("Unable to handle autograd's threading in combination with fork-based multiprocessing", torch 2.14).
The ``cpu`` parallel runner forks its gloo ranks, so an emulated FSDP step run in the same process would break
every later gloo step (in a pytest session: whichever test comes after). Emulated sharded steps therefore run in
a child; the parent only forks and reads.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from typing import Callable, NoReturn

from .._core.results import StepReport
from .._measure.step import StepFailed


def can_fork() -> bool:
    return hasattr(os, "fork")


def fork_with_pipe(child_main: Callable[[int], None]) -> tuple[int, int]:
    """Fork; the child runs ``child_main(write_fd)``, which ends with ``send_and_exit``; the parent gets
    (child pid, read end of the pipe). Shared by the emulated ranks' child and the gloo ranks."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():  # Python >= 3.12 warns about fork in a threaded process (xdist's execnet)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        try:
            child_main(write_fd)
        finally:
            os._exit(1)  # child_main returned or raised without sending: the parent sees no payload
    os.close(write_fd)
    return pid, read_fd


def send_and_exit(fd: int, payload: dict, code: int) -> NoReturn:
    """In a forked child: write ``payload`` as JSON to ``fd`` and leave at once (no atexit handlers, no pytest
    teardown: they belong to the parent)."""
    try:
        data = memoryview(json.dumps(payload, default=str).encode())
        while data:
            data = data[os.write(fd, data):]
        os.close(fd)
    finally:
        os._exit(code)


def report_from_child(measure: Callable[[], StepReport]) -> StepReport:
    """``measure()`` run in a forked child; its report, or StepFailed carrying the child's error and traceback."""
    pid, read_fd = fork_with_pipe(lambda fd: _child(measure, fd))
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(1 << 16):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        raise StepFailed(f"the emulated rank's process ended without a report (wait status {status})", None)
    payload = json.loads(b"".join(chunks))
    if "error" in payload:
        raise StepFailed(f"{payload['error']}\n(in the emulated rank's process)\n{payload['traceback']}", None)
    return StepReport.from_dict(payload["report"])


def _child(measure: Callable[[], StepReport], fd: int) -> NoReturn:
    code = 1
    try:
        payload = {"report": measure().to_dict()}
        code = 0
    except BaseException as exc:  # noqa: BLE001 - whatever the rank raised goes to the parent
        payload = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    send_and_exit(fd, payload, code)
