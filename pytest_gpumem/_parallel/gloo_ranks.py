"""The ``cpu`` backend's distributed runner: one forked process per rank, gloo, each rank measured for real.

Forking hands every rank the user's model, optimizer, batch and loss as they are (nothing is pickled, so
lambdas and local classes work); each rank reports its StepReport as JSON over its own pipe. Rendezvous
goes through a FileStore in a fresh temporary folder (no port to pick); gloo's own connections use ports
the kernel hands out. A rank that raises sends its traceback and the others are stopped; past the
timeout every rank is killed. Ranks die with the parent (Linux: PR_SET_PDEATHSIG), so none is orphaned.
"""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

from .._core.results import StepReport
from .._measure.step import StepFailed
from .clean_child import die_with_parent, fork_with_pipe, send_and_exit
from .runners import ParallelStep, parallel_runner

#: more ranks than this on one CPU is slow and says nothing new; the emulated backend takes any world size
MAX_RANKS = 8
#: seconds the other ranks get to finish after one failed, before they are killed
GRACE_S = 2.0
#: what to do when torch refuses backward in a forked rank
FORKED_AUTOGRAD = (
    "this process started autograd's device threads before the ranks were forked (a backward on CUDA, or an "
    "emulated FSDP2 step, ran in it earlier), and torch refuses backward in processes forked after that; run the "
    "backend='cpu' distributed tests in a pytest process of their own (a separate run, or one xdist worker: "
    "`-n 2 --dist loadgroup` with @pytest.mark.xdist_group('gloo'))")


@dataclass
class _Rank:
    rank: int
    pid: int
    fd: int
    data: bytearray = field(default_factory=bytearray)
    done: bool = False
    status: int | None = None  #: exit status once reaped
    finished: int = -1  #: order in which the rank's pipe closed (the first to raise is the cause, not its peers)


@parallel_runner("cpu")
def run_gloo_ranks(step: ParallelStep) -> tuple[StepReport, ...]:
    """Fork ``world_size`` ranks, run the step in each with gloo, return their reports by rank."""
    __tracebackhide__ = True
    world_size = step.strategy.world_size
    if not hasattr(os, "fork"):
        raise RuntimeError("backend='cpu' with parallel= forks one process per rank, which this platform "
                           "cannot (no os.fork); use backend='emulated'")
    if world_size > MAX_RANKS:
        raise ValueError(f"backend='cpu' runs a real process per rank and takes world_size <= {MAX_RANKS}, "
                         f"got {step.strategy.describe()}; use backend='emulated' for larger world sizes")
    folder = tempfile.mkdtemp(prefix="gpumem-gloo-")
    ranks: list[_Rank] = []
    try:
        for rank in range(world_size):
            ranks.append(_fork_rank(step, rank, os.path.join(folder, "store")))
        _collect(ranks, step.timeout_s)
    finally:
        _stop(ranks)
        shutil.rmtree(folder, ignore_errors=True)
    return _reports(ranks, step)


def _fork_rank(step: ParallelStep, rank: int, store_path: str) -> _Rank:
    pid, read_fd = fork_with_pipe(lambda fd: _rank_main(step, rank, store_path, fd))
    return _Rank(rank, pid, read_fd)


def _rank_main(step: ParallelStep, rank: int, store_path: str, fd: int) -> NoReturn:
    """Inside the forked rank: join the group, measure, send JSON, leave without running the parent's cleanup."""
    code = 1
    try:
        die_with_parent()
        import torch
        import torch.distributed as dist

        from .._measure.backends import CpuBackend
        from .rank_step import measure_rank_step

        torch.set_num_threads(1)  # ranks share the cores; OpenMP pools do not survive fork anyway
        world_size = step.strategy.world_size
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=step.timeout_s))
        report = measure_rank_step(step, rank, CpuBackend(), settle=True)
        payload = {"rank": rank, "report": report.to_dict()}
        code = 0
    except BaseException as exc:  # noqa: BLE001 - whatever the rank raised goes to the parent
        payload = {"rank": rank, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    send_and_exit(fd, payload, code)


def _collect(ranks: list[_Rank], timeout_s: float) -> None:
    """Read every rank's pipe to its end; after a failure give the rest GRACE_S; stop at the deadline."""
    deadline = time.monotonic() + timeout_s
    selector = selectors.DefaultSelector()
    for r in ranks:
        selector.register(r.fd, selectors.EVENT_READ, r)
    try:
        while any(not r.done for r in ranks):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for key, _ in selector.select(timeout=min(remaining, 0.5)):
                rank: _Rank = key.data
                chunk = os.read(rank.fd, 1 << 16)
                if chunk:
                    rank.data += chunk
                    continue
                rank.done = True
                rank.finished = sum(r.done for r in ranks)
                selector.unregister(rank.fd)
                if _failed(rank):
                    deadline = min(deadline, time.monotonic() + GRACE_S)
    finally:
        selector.close()


def _failed(rank: _Rank) -> bool:
    return b'"error"' in rank.data[:200] or not rank.data


def _stop(ranks: list[_Rank]) -> None:
    """Kill ranks still running, reap every one, close the pipes."""
    for r in ranks:
        if r.status is None:
            waited = _reap(r.pid, block=False)
            if waited is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGKILL)
                waited = _reap(r.pid, block=True)
            r.status = waited
        with contextlib.suppress(OSError):
            os.close(r.fd)


def _reap(pid: int, *, block: bool) -> int | None:
    try:
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return -1
    return status if done else None


def _reports(ranks: list[_Rank], step: ParallelStep) -> tuple[StepReport, ...]:
    """The ranks' reports; StepFailed naming the first rank that raised (its traceback) or did not finish.

    The first rank to finish with an error is the cause: its peers then fail in a collective (gloo's
    'Connection reset by peer'), which says nothing about the user's code.
    """
    __tracebackhide__ = True
    what = step.strategy.describe()
    payloads = {}
    for r in ranks:
        try:
            payloads[r.rank] = json.loads(bytes(r.data)) if r.done and r.data else None
        except ValueError:
            payloads[r.rank] = None
    for r in sorted(ranks, key=lambda r: (not r.done, r.finished)):
        payload = payloads[r.rank]
        if payload is not None and "error" in payload:
            advice = f"\n{FORKED_AUTOGRAD}" if "Autograd-and-Fork" in payload["error"] else ""
            raise StepFailed(f"rank {r.rank} of {what} raised {payload['error']}{advice}\n--- traceback in rank "
                             f"{r.rank} ---\n{payload['traceback']}", None)
    missing = [r for r in ranks if payloads[r.rank] is None]
    if missing:
        r = missing[0]
        how = (f"was killed by signal {os.WTERMSIG(r.status)}" if r.status is not None and r.status > 0
               and os.WIFSIGNALED(r.status) else "exited without a report")
        if not r.done:
            how = f"did not finish within {step.timeout_s:g} s (timeout=) and was stopped"
        raise StepFailed(f"rank {r.rank} of {what} {how}; no rank raised an error", None)
    return tuple(StepReport.from_dict(payloads[r.rank]["report"]) for r in ranks)
