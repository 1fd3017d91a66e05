"""The ``gpumem`` fixture's object: where to build tensors, and ways to measure a training step.

Imported only when a test asks for the fixture, so a run without GPU-memory tests never imports torch
through this plugin. What a test measured goes into its ``TestState``; the plugin judges it.
"""
from __future__ import annotations

import contextlib
import gc
import os
import traceback
from typing import Any, Iterator

import pytest
import torch

from ._core.categories import estimate_device
from ._core.records import TestState
from ._core.results import StepReport
from ._measure.backends import Backend, cuda_device_for_worker, make_backend
from ._measure.step import OutOfMemory, StepFailed, measure_step, track

#: measure_step options that change what the step does, so the estimate must be told them too
_SHARED_STEP_OPTIONS = ("steps", "set_to_none", "autocast_dtype", "scaler")


class GpuMem:
    """The ``gpumem`` fixture: where to build tensors, and ways to measure a training step."""

    def __init__(self, manager: Any, item: pytest.Item, state: TestState) -> None:
        self._manager = manager
        self._item = item
        self._state = state
        state.used_fixture = True
        if state.backend_name == "cuda" and not torch.cuda.is_available():
            pytest.skip("gpu_budget(backend='cuda') needs a GPU; torch.cuda.is_available() is False here")
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        cuda_device = cuda_device_for_worker(worker) if torch.cuda.is_available() else None
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)  # one GPU per xdist worker; no stray context on GPU 0
        self._backend_factory = lambda: make_backend(state.backend_name, cuda_device=cuda_device, device=state.device)
        probe = self._backend_factory()
        #: where to build the model and batch so the same test runs on a GPU box and on CPU-only CI
        self.device: torch.device = probe.device
        #: the backend measuring this test: 'cuda', 'cpu' or 'emulated'
        self.backend: str = probe.name

    @property
    def reports(self) -> list[StepReport]:
        """Every StepReport this test produced, in order."""
        return list(self._state.reports)

    def _backend(self) -> Backend:
        return self._backend_factory()

    def train_step(self, model, optimizer, batch, *, loss_fn=None, target=None, parallel=None, **kwargs):
        """Measure a training step (see ``measure_step``); the test's budget is checked against it.

        With ``parallel=DDP/FSDP/ZeRO(...)`` (or the marker's ``parallel=``) the step runs on every rank
        (``measure_parallel_step``): a ParallelReport comes back and the budget applies to each rank.
        """
        __tracebackhide__ = True
        parallel = self._parallel(parallel)
        if parallel is not None:
            return self._parallel_step(model, optimizer, batch, loss_fn, target, parallel, kwargs)
        estimate = self._estimate(model, optimizer, batch, loss_fn, target, kwargs)
        backend = self._backend()
        try:
            with self._snapshot(backend):
                report = measure_step(model, optimizer, batch, loss_fn=loss_fn, target=target, backend=backend, **kwargs)
        finally:
            self._state.trackers.extend(backend.trackers)
        if estimate is not None:
            self._state.estimates[len(self._state.reports)] = estimate
        self._state.reports.append(report)
        return report

    def _parallel(self, given):
        """The step's strategy: the one given, else the marker's; both given and different is an error."""
        marker = self._state.budget.parallel if self._state.budget is not None else None
        if given is not None and marker is not None and given != marker:
            raise ValueError(f"train_step(parallel={given.describe()}) differs from the gpu_budget marker's "
                             f"parallel={marker.describe()}; give it in one place")
        return given if given is not None else marker

    def _parallel_step(self, model, optimizer, batch, loss_fn, target, parallel, kwargs):
        """Every rank's report goes to the test (the budget is per rank); the model-state check beside it."""
        __tracebackhide__ = True
        from ._parallel import measure_parallel_step, model_state_estimate
        from ._parallel.runners import parallel_backend

        estimate = None
        if self._manager.rtol_for(self._state) is not None:  # before the step: the user's objects as given
            try:
                device = estimate_device(parallel_backend(self._state.backend_name))
                estimate = model_state_estimate(model, optimizer, parallel, device=device)
            except ValueError as exc:  # an optimizer without a rule: say why there is nothing to compare it with
                self._item.add_report_section("call", "gpumem estimate", f"no closed-form model states for this "
                                              f"step ({exc}); not compared")
        result = measure_parallel_step(model, optimizer, batch, parallel=parallel, loss_fn=loss_fn, target=target,
                                       backend=self._state.backend_name, device=self._state.device, **kwargs)
        for report in result.ranks:
            if estimate is not None:
                self._state.estimates[len(self._state.reports)] = estimate
            self._state.reports.append(report)
        return result

    def _snapshot(self, backend: Backend) -> contextlib.AbstractContextManager:
        """--gpumem-snapshot: record the CUDA allocator's history around the measurement."""
        gating = self._manager.gating
        return gating.snapshot(self._item.nodeid, backend.name) if gating is not None else contextlib.nullcontext()

    def _estimate(self, model, optimizer, batch, loss_fn, target, kwargs):
        """The analytical estimate of the step about to be measured (before it changes the optimizer's state)."""
        if self._manager.rtol_for(self._state) is None:
            return None
        from ._estimate import estimate_step

        try:
            with self._target_gpu():  # the estimate's CUDA kernel choices follow the GPU the test names
                return estimate_step(model, optimizer, batch, loss_fn=loss_fn, target=target,
                                     device=estimate_device(self.backend), hook=self._item.config.hook,
                                     **{k: v for k, v in kwargs.items() if k in _SHARED_STEP_OPTIONS})
        except Exception as exc:  # the measurement decides; say why there is nothing to compare it with
            self._item.add_report_section(
                "call", "gpumem estimate", f"no estimate for this step ({type(exc).__name__}: {exc}); not compared"
            )
            return None

    def _target_gpu(self) -> contextlib.AbstractContextManager:
        if self._state.device is None or self.backend == "cpu":
            return contextlib.nullcontext()
        from ._emulation.attention import target_gpu

        return target_gpu(self._state.device)

    @contextlib.contextmanager
    def track(self, model=None, optimizer=None, batch=None):
        """Measure a hand-written loop: ``with gpumem.track(model=m, optimizer=o, batch=x): ...``."""
        __tracebackhide__ = True
        backend = self._backend()
        handle = None
        try:
            with self._snapshot(backend), track(model, optimizer, batch, backend=backend) as handle:
                self._state.trackers.extend(backend.trackers)
                yield handle
        finally:
            if handle is not None and handle.report is not None:  # also when the loop raised: a partial report
                self._state.reports.append(handle.report)

    def fuzz(self, *args, **kwargs):
        """Property-check the user's model family with hypothesis (see ``pytest_gpumem._tools.fuzz.fuzz``)."""
        from ._tools.fuzz import fuzz

        kwargs.setdefault("backend", self.backend)
        if self._state.budget is not None and self._state.budget.total is not None:
            kwargs.setdefault("budget", self._state.budget.total)
        kwargs.setdefault("on_example", self._state.reports.append)
        return fuzz(*args, **kwargs)

    def max_batch_size(self, *args, **kwargs) -> int:
        """Largest batch whose peak fits ``safety x budget`` (budget defaults to the test's)."""
        from ._tools.advisor import max_batch_size

        kwargs.setdefault("backend", self.backend)
        if self._state.device is not None and self.backend == "emulated":
            kwargs.setdefault("device", self._state.device)  # the budget may be a share of this GPU's memory
        if "budget" not in kwargs and self._state.budget is not None and self._state.budget.total is not None:
            kwargs["budget"] = self._state.budget.total
        value = max_batch_size(*args, **kwargs)
        self._state.max_batch = value
        return value

    def summary(self, model, batch, **kwargs) -> str:
        """Per-layer table: output shape, params, activation bytes, formula or traced."""
        from ._tools.summary import summary

        kwargs.setdefault("device", estimate_device(self.backend))
        return summary(model, batch, **kwargs)


def absorb_failure(error: BaseException | None, state: TestState) -> str | None:
    """Keep a failed step's partial report; for an out-of-memory error, free its frames and return the sentence."""
    if isinstance(error, StepFailed) and error.partial is not None:
        state.reports.append(error.partial)
    # train_step wraps an OOM in OutOfMemory; inside gpumem.track() the user's loop raises torch's own
    if not isinstance(error, (OutOfMemory, torch.cuda.OutOfMemoryError)):
        return None
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    where = "" if isinstance(error, OutOfMemory) else "CUDA out of memory inside gpumem.track(): "
    _release_frames(error)  # drop the step's tensors so the next test starts clean
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return f"gpu_budget: {where}{first_line}"


def live_bytes(state: TestState) -> int:
    """Bytes measured in the test that are still allocated now (after a collection, when any are).

    The trackers see every free as it happens, so nothing alive means no leak without collecting; a full
    collection costs about 0.3 s in a process that has imported torch and transformers. On a GPU it always
    collects: the test's cyclic garbage may hold CUDA blocks it did not measure, which the next test's warm-up
    (empty_cache) must be able to release, or that test's reserved figures would depend on this one."""
    if any(t.live_bytes() or t.device_type == "cuda" for t in state.trackers):
        gc.collect()  # reference cycles may be all that still holds them
    return sum(t.live_bytes() for t in state.trackers)


def _release_frames(exc: BaseException | None) -> None:
    """Clear the locals of every frame in ``exc``'s traceback and those of its causes and contexts."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
