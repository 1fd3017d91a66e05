"""Run a function in a forked child and take its StepReport back as JSON, leaving this process untouched.

Why: once a process has run a DTensor op (FSDP2 shards its parameters as DTensors), torch's autograd starts its
device threads at the next backward, and from then on that process can no longer fork children that run
autograd ("Unable to handle autograd's threading in combination with fork-based multiprocessing", torch 2.14).
The ``cpu`` parallel runner forks its gloo ranks, so an emulated FSDP step run in the same process would break
every later gloo step (in a pytest session: whichever test comes after). Emulated sharded steps therefore run in
a child; the parent only forks and reads.
"""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import sys
import time
import traceback
import warnings
from typing import Callable, NoReturn

from .._core.results import StepReport
from .._measure.step import StepFailed
from .runners import DEFAULT_TIMEOUT_S


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


#: what torch's error says when a forked process cannot run backward (its parent started autograd's device threads)
AUTOGRAD_FORK_MARK = "Autograd-and-Fork"


class ChildCannotRunBackward(StepFailed):
    """The forked child could not run backward: this process had started autograd's device threads before."""


def report_from_child(measure: Callable[[], StepReport], timeout_s: float = DEFAULT_TIMEOUT_S) -> StepReport:
    """``measure()`` run in a forked child; its report, or StepFailed carrying the child's error and traceback.
    A child still running after ``timeout_s`` seconds is killed and StepFailed says so."""
    pid, read_fd = fork_with_pipe(lambda fd: _child(measure, fd))
    try:
        data, finished = _read_until(read_fd, time.monotonic() + timeout_s)
    finally:
        os.close(read_fd)
        if not _reaped(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    if not finished:
        raise StepFailed(f"the emulated rank's process did not finish within timeout={timeout_s:g} s and was "
                         "stopped; give measure_parallel_step a larger timeout= for a larger model", None)
    if not data:
        raise StepFailed("the emulated rank's process ended without a report", None)
    payload = json.loads(data)
    if "error" in payload:
        kind = ChildCannotRunBackward if AUTOGRAD_FORK_MARK in payload["error"] else StepFailed
        raise kind(f"{payload['error']}\n(in the emulated rank's process)\n{payload['traceback']}", None)
    return StepReport.from_dict(payload["report"])


def _read_until(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything written to ``fd`` until its end, and whether the end came before ``deadline``."""
    chunks = []
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(timeout=min(remaining, 0.5)):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
    return b"".join(chunks), False


def _reaped(pid: int) -> bool:
    """Wait briefly for ``pid`` to exit (it has closed its pipe); False while it still runs."""
    for _ in range(50):
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        time.sleep(0.01)
    return False


def die_with_parent() -> None:
    """Linux: SIGKILL this forked process when the process that forked it dies (no orphans after a crash or kill)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def _child(measure: Callable[[], StepReport], fd: int) -> NoReturn:
    code = 1
    try:
        die_with_parent()
        payload = {"report": measure().to_dict()}
        code = 0
    except BaseException as exc:  # noqa: BLE001 - whatever the rank raised goes to the parent
        payload = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    send_and_exit(fd, payload, code)
