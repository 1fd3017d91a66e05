"""Run a training step through its phases on a backend and return a StepReport.

``measure_step`` runs the step itself; ``track`` measures a loop the user writes, finding the
phases from module, autograd and optimizer hooks. Both share ``Session``: one tracker, one
backend, phase marks, and the rules that say what each storage is for.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import itertools
from typing import Any, Callable, Iterator

import torch
from torch import nn
from .._compat import running_backward


from .backends import Backend, make_backend
from .._core.categories import PHASES, Category, Phase
from .._core.step_calls import call_model, default_loss, eager_model
from .._core.tensors import tensors_in
from .._core.results import PhaseStats, StepMeasurement, StepReport
from .tracker import StorageTracker
from .twins import device_copies, model_device, model_twin, move_batch, optimizer_twin, swapped_in

LossFn = Callable[[Any, Any], torch.Tensor]


class StepFailed(RuntimeError):
    """The step raised; ``partial`` holds what was measured up to the failure."""

    def __init__(self, message: str, partial: StepReport | None) -> None:
        super().__init__(message)
        self.partial = partial


class OutOfMemory(StepFailed):
    """The device ran out of memory during the step."""


def optimizer_state_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    # nested too: LBFGS keeps lists of history vectors (old_dirs, old_stps) in its state
    held = tensors_in([list(state.values()) for state in optimizer.state.values()])
    local = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer: this rank's shard lives in its local optimizer
    if isinstance(local, torch.optim.Optimizer) and local is not optimizer:
        held += optimizer_state_tensors(local)
    return held


class Session:
    """One measurement: tracker + backend + phase marks, turned into a StepReport at the end."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.tracker: StorageTracker = backend.make_tracker()
        #: real values beside meta tensors (the emulated backend), entered above the tracker
        self.values = backend.make_value_mode()
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.batch_tensors: list[torch.Tensor] = []
        self.current: tuple[int, Phase] | None = None
        self.report: StepReport | None = None
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._entered = False
        self._closing = False
        self._restore = contextlib.ExitStack()  # puts the user's own tensors back into their model

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        self.backend.begin()
        self.tracker.__enter__()
        if self.values is not None:
            self.values.__enter__()
        self._saving.__enter__()
        self._entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> StepReport:
        """End the current phase, stop tracking and build the report (idempotent)."""
        if self.report is not None:
            return self.report
        try:
            if self.current is not None and not self._closing:
                self._closing = True  # a second close() after a failure must not end the phase twice
                self.classify()
                self.backend.phase_ended(*self.current)
            if self._entered:
                self._entered = False
                self._saving.__exit__(None, None, None)
                if self.values is not None:
                    self.values.__exit__(None, None, None)
                    self.backend.add_value_notes(self.values.notes)
                self.tracker.__exit__(None, None, None)
            self.tracker.close()
            self.report = self._build_report()
        finally:
            self._restore.close()  # the user's model gets its own tensors back whatever happened
            # the trackers outlive the step (the leak check at teardown): they must not keep the user's objects alive
            self.model, self.optimizer, self.batch_tensors = None, None, []
            self.tracker.on_dispatch = None
        return self.report

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tracker.mark((tensor,), Category.ACTIVATIONS)
        return tensor

    # -- phases ------------------------------------------------------------------------------
    def phase(self, step: int, phase: Phase) -> None:
        """End the running phase and start ``phase`` of step ``step``."""
        if self.current == (step, phase):
            return
        if self.current is not None:
            self._end_phase()
        self.current = (step, phase)
        self.tracker.start_phase(step, phase)
        self.backend.phase_started(step, phase)

    def _end_phase(self) -> None:
        assert self.current is not None
        self.classify()
        self.backend.phase_ended(*self.current)

    def classify(self) -> None:
        """Mark what the model, optimizer and batch hold now (priority keeps earlier, stronger marks)."""
        marked: set[int] = set()
        if self.model is not None:
            model_params = list(self.model.parameters())
            self.tracker.mark(itertools.chain(model_params, self.model.buffers()), Category.PARAMS)
            self.tracker.mark((p.grad for p in model_params if p.grad is not None), Category.GRADS)
            marked = set(map(id, model_params))
        if self.optimizer is not None:
            # the model's own parameters (and their grads) are marked already: marking again changes nothing
            params = [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in marked]
            self.tracker.mark(params, Category.PARAMS)
            self.tracker.mark((p.grad for p in params if p.grad is not None), Category.GRADS)
            self.tracker.mark(optimizer_state_tensors(self.optimizer), Category.OPTIMIZER)
        self.tracker.mark(self.batch_tensors, Category.BATCH)

    # -- placing the user's objects ----------------------------------------------------------
    def place_model(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        """The model and optimizer on the backend's device: as given when they are there, else copies."""
        device = self.backend.device
        model, compiled = eager_model(model)  # dynamo compiles nothing under a dispatch mode: say so
        if compiled is not None and compiled not in self.backend.notes:
            self.backend.notes.append(compiled)
        self.backend.model_placed(model)
        current = model_device(model)
        if current is not None and current != device and not _same_device(current, device):
            mapping = device_copies(model, device)
            if self.values is not None:  # integer buffers (position ids) keep their values
                for buffer in model.buffers():
                    if self.values.worth_seeding(buffer):
                        self.values.remember(mapping[id(buffer)], buffer)
            twin = model_twin(model, mapping)  # runs the step: its own attributes, lists and caches remapped
            # a loss that closes over the user's model (an L1 penalty over model.parameters()) must see the
            # same copies; the user's model never runs, and gets its own tensors back when the step ends
            self._restore.enter_context(swapped_in(model, mapping))
            if optimizer is not None:
                optimizer = optimizer_twin(optimizer, mapping, device)
            model = twin
        self.model, self.optimizer = model, optimizer
        self.classify()
        return model, optimizer

    def adopt_batch(self, batch: Any) -> None:
        """Mark batch tensors already on the device as batch (they were allocated before the step)."""
        device = self.backend.device
        self.tracker.mark((t for t in tensors_in(batch) if _same_device(t.device, device)), Category.BATCH)

    def place_batch(self, batch: Any) -> Any:
        """The batch on the backend's device, its storages marked as batch."""
        moved = move_batch(batch, self.backend.device)
        if self.values is not None:  # token ids, masks, labels keep their values beside the meta copies
            for original, copy in zip(tensors_in(batch), tensors_in(moved)):
                if copy is not original and self.values.worth_seeding(original):
                    self.values.remember(copy, original)
        batch = moved
        self.batch_tensors = tensors_in(batch)
        self.tracker.mark(self.batch_tensors, Category.BATCH)
        return batch

    # -- report ------------------------------------------------------------------------------
    def _build_report(self) -> StepReport:
        replays = self.tracker.replay()
        stats = self.backend.phase_stats(self.tracker, replays)
        by_step: dict[int, dict[Phase, PhaseStats]] = {}
        for replay, stat in zip(replays, stats):
            phases = by_step.setdefault(replay.step, {})
            phases[replay.phase] = _merge(phases.get(replay.phase), stat)
        steps = []
        for index in sorted(by_step):
            phases = by_step[index]
            ordered = [phases[p] for p in PHASES if p in phases]
            top = max(ordered, key=lambda s: s.peak)  # max() keeps the first of equal peaks
            reserved = [s.reserved_peak for s in ordered if s.reserved_peak is not None]
            steps.append(
                StepMeasurement(index, top.peak, top.phase, top.peak_split, phases, max(reserved) if reserved else None)
            )
        return StepReport(
            backend=self.backend.name,
            device=self.backend.describe(),
            torch_version=str(torch.__version__),
            cuda_version=torch.version.cuda,
            steps=tuple(steps),
            notes=tuple(self.backend.notes),
        )


def _merge(earlier: PhaseStats | None, later: PhaseStats) -> PhaseStats:
    """One phase that ran twice in a step (gradient accumulation): the larger peak, the later retained."""
    if earlier is None:
        return later
    top = earlier if earlier.peak >= later.peak else later
    reserved = [r for r in (earlier.reserved_peak, later.reserved_peak) if r is not None]
    bare = [b for b in (earlier.without_libraries, later.without_libraries) if b is not None]
    return PhaseStats(later.phase, top.peak, later.retained, top.peak_split, later.retained_split,
                      max(reserved) if reserved else None, top.peak_parts, max(bare) if bare else None,
                      {k: max(earlier.part_peaks.get(k, 0), later.part_peaks.get(k, 0))
                       for k in {**earlier.part_peaks, **later.part_peaks}})


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def _failure(session: Session, exc: BaseException) -> StepFailed:
    """Wrap ``exc`` with the partial report; say what to do when the emulated backend hits a value."""
    where = f" during {session.current[1].value} of step {session.current[0]}" if session.current else ""
    partial = None
    with contextlib.suppress(Exception):
        partial = session.close()
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return OutOfMemory(f"CUDA out of memory{where}: {str(exc).splitlines()[0]}", partial)
    message = f"{type(exc).__name__}{where}: {exc}"
    explained = session.backend.explain_failure(exc)
    if explained:
        message = f"{message}\n{explained}"
    return StepFailed(message, partial)


def measure_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    *,
    loss_fn: LossFn | None = None,
    target: Any = None,
    steps: int = 2,
    backend: str | Backend | None = "auto",
    set_to_none: bool = True,
    autocast_dtype: torch.dtype | None = None,
    scaler: Any = None,
) -> StepReport:
    """Run ``steps`` training steps and report per phase and per category where memory went.

    Step 0 creates the optimizer state lazily; later steps are steady. The output and loss are
    dropped after backward, as a lean training loop does. With ``backend="emulated"`` the model,
    optimizer and batch are copied to meta tensors (the originals are untouched) and the CUDA
    allocator's rules applied, predicting what ``backend="cuda"`` would report.
    """
    __tracebackhide__ = True
    check_step_arguments(model, optimizer, steps)
    be = backend if isinstance(backend, Backend) else make_backend(backend)
    loss_fn = loss_fn or default_loss
    session = Session(be)
    with older_objects_frozen():
        try:
            with session:
                session.phase(0, Phase.SETUP)
                model, optimizer = session.place_model(model, optimizer)
                session.adopt_batch((batch, target))
                be.after_placement(session.tracker)
                session.phase(0, Phase.BATCH)
                inputs, target = session.place_batch((batch, target))
                scaler = be.grad_scaler(scaler)
                for index in range(steps):
                    one_step(session, index, model, optimizer, inputs, target, loss_fn, set_to_none, autocast_dtype,
                             scaler)
                gc.collect()  # cycles the step made (autograd graph, hooks) free their storages before the report
        except StepFailed:
            raise
        except Exception as exc:  # the partial report travels with the error
            raise _failure(session, exc) from exc
    return session.close()


@contextlib.contextmanager
def older_objects_frozen() -> Iterator[None]:
    """gc.freeze() what exists before the step, so the final gc.collect() walks only what the step made.

    A full collection walks every long-lived object of torch (~0.1 s, a sixth of an emulated ResNet-50
    step); the step's garbage is all new, so the same storages are freed either way. Skipped when the
    caller froze objects already: unfreezing would undo theirs.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def check_step_arguments(model: Any, optimizer: Any, steps: Any) -> None:
    """TypeError/ValueError, before anything runs, for arguments that cannot make a training step."""
    __tracebackhide__ = True
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be a whole number >= 1, got {steps!r} ({type(steps).__name__})")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True), so there is no "
            f"training step to measure; unfreeze some, or measure inference another way"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    own = {id(p) for p in model.parameters()}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    if held and not any(id(p) in own for p in held):
        raise ValueError(
            f"the optimizer updates none of {type(model).__name__}'s parameters ({len(held)} tensor(s) of another "
            f"model?); build it from this model: torch.optim.X(model.parameters(), ...)"
        )


def one_step(session, index, model, optimizer, inputs, target, loss_fn, set_to_none, autocast_dtype, scaler):
    """forward -> backward -> optimizer -> zero_grad, each its own phase."""
    __tracebackhide__ = True
    if needs_closure(optimizer):
        return _one_closure_step(session, index, model, optimizer, inputs, target, loss_fn, set_to_none,
                                 autocast_dtype, scaler)
    session.phase(index, Phase.FORWARD)
    with session.backend.forward_context():
        with session.backend.autocast(autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext():
            output = call_model(model, inputs)
            loss = loss_fn(output, target)
        session.phase(index, Phase.BACKWARD)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        del output, loss
    session.phase(index, Phase.OPTIMIZER)
    with session.backend.optimizer_context(optimizer):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    session.phase(index, Phase.ZERO_GRAD)
    optimizer.zero_grad(set_to_none=set_to_none)


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (LBFGS): a ``closure`` parameter without a default."""
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # pragma: no cover - C-implemented step
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _one_closure_step(session, index, model, optimizer, inputs, target, loss_fn, set_to_none, autocast_dtype,
                      scaler):
    """``optimizer.step(closure)`` as torch documents it: the closure zeroes the grads, runs forward and
    backward, returns the loss. Its first call is the step's forward and backward phases; the optimizer's
    re-evaluations (LBFGS line search, inner iterations) count in the optimizer phase, where they happen."""
    if scaler is not None:
        raise ValueError(f"{type(optimizer).__name__}.step takes a closure, which torch.amp.GradScaler does not "
                         "support; measure it without scaler=")
    calls = [0]

    def closure():
        first = calls[0] == 0
        calls[0] += 1
        optimizer.zero_grad(set_to_none=set_to_none)
        if first:
            session.phase(index, Phase.FORWARD)
        with session.backend.autocast(autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext():
            loss = loss_fn(call_model(model, inputs), target)
        if first:
            session.phase(index, Phase.BACKWARD)
        loss.backward()
        if first:
            session.phase(index, Phase.OPTIMIZER)
        return loss

    with session.backend.optimizer_context(optimizer), session.backend.forward_context():
        optimizer.step(closure)
    session.phase(index, Phase.ZERO_GRAD)
    optimizer.zero_grad(set_to_none=set_to_none)


class Tracking:
    """Handle of ``track()``: the report appears on ``.report`` when the block ends."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.report: StepReport | None = None


@contextlib.contextmanager
def track(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batch: Any = None,
    *,
    backend: str | Backend | None = "auto",
) -> Iterator[Tracking]:
    """Measure a hand-written loop: phases are found from the model's forward hooks, autograd and
    the optimizer's step hooks. The model, optimizer and batch must already be on the backend's
    device (``gpumem.device``); a new forward after an optimizer step starts the next step.
    """
    __tracebackhide__ = True
    be = backend if isinstance(backend, Backend) else make_backend(backend)
    session = Session(be)
    handle = Tracking(session)
    step = [0]
    undo: list[Callable[[], None]] = []

    def enter(phase: Phase) -> None:
        if session.current is None:
            return
        cur_step, cur_phase = session.current
        if phase is Phase.FORWARD and cur_phase in (Phase.OPTIMIZER, Phase.ZERO_GRAD):
            step[0] += 1
        recomputing = phase is Phase.FORWARD and running_backward()  # checkpoint replay
        if (step[0], phase) != session.current and not recomputing:
            session.phase(step[0], phase)

    def on_dispatch() -> None:
        if running_backward() and session.current and session.current[1] is not Phase.BACKWARD:
            enter(Phase.BACKWARD)

    session.tracker.on_dispatch = on_dispatch
    with session:
        try:  # from the first hook on: whatever fails, the user's model and optimizer are left as they were
            session.phase(0, Phase.SETUP)
            if model is not None:
                session.model = model
                session.backend.model_placed(model)
                undo.append(model.register_forward_pre_hook(lambda m, a: enter(Phase.FORWARD)).remove)
            if optimizer is not None:
                session.optimizer = optimizer
                undo.append(optimizer.register_step_pre_hook(lambda o, a, k: enter(Phase.OPTIMIZER)).remove)
                undo.append(_wrap_zero_grad(optimizer, lambda: enter(Phase.ZERO_GRAD)))
            session.classify()
            if batch is not None:
                session.batch_tensors = tensors_in(batch)
                session.tracker.mark(session.batch_tensors, Category.BATCH)
            be.after_placement(session.tracker)
            session.phase(0, Phase.BATCH)
            with be.loop_context(optimizer):
                yield handle
        finally:
            for fn in reversed(undo):
                fn()
            handle.report = session.close()


def _wrap_zero_grad(optimizer: torch.optim.Optimizer, before: Callable[[], None]) -> Callable[[], None]:
    """Call ``before`` ahead of every optimizer.zero_grad(); return the function that undoes it."""
    had_own = "zero_grad" in optimizer.__dict__
    previous = optimizer.__dict__.get("zero_grad")
    original = optimizer.zero_grad

    def zero_grad(*args, **kwargs):
        before()
        return original(*args, **kwargs)

    optimizer.zero_grad = zero_grad  # type: ignore[method-assign]

    def undo() -> None:
        if had_own:
            optimizer.zero_grad = previous  # type: ignore[method-assign]
        else:
            optimizer.__dict__.pop("zero_grad", None)

    return undo
