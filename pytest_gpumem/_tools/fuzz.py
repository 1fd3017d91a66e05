"""Property check for users' own models: over drawn layer and batch sizes, measurement matches the estimate.

``fuzz`` is pure library (no pytest): for every hypothesis example it builds a fresh model, optimizer and
batch, measures a training step (``measure_step``), estimates it (``estimate_step``), and fails when they
differ by more than ``rtol`` (``contradiction.compare``) or the peak exceeds ``budget``. Hypothesis then
shrinks the failure to the smallest layer and batch sizes, and the error shows that configuration with
its estimated-vs-measured table. The pytest fixture's ``gpumem.fuzz(...)`` calls this function.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import hypothesis
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from .._compat import set_hypothesis_digest
from .._core.categories import estimate_device
from .._core.units import format_bytes, format_percent, parse_bytes

__all__ = ["fuzz", "FuzzCase", "FuzzFailure", "FuzzResult"]


@dataclass(frozen=True)
class FuzzCase:
    """One drawn example: the model's configuration (or keyword arguments), batch size and optimizer factory."""

    model: Any                   #: a config with .build()/.make_batch(), or the dict of drawn model arguments
    batch_size: int
    optimizer: Any               #: callable(params) -> Optimizer

    def __repr__(self) -> str:
        model = self.model if not isinstance(self.model, dict) else ", ".join(
            f"{k}={v!r}" for k, v in self.model.items())
        return f"FuzzCase({model}, batch_size={self.batch_size}, optimizer={self.optimizer!r})"


class FuzzFailure(AssertionError):
    """Measurement and estimate disagree (or the budget is exceeded) for ``case``; the message has the table."""

    def __init__(self, message: str, case: FuzzCase, report: Any, estimate: Any) -> None:
        super().__init__(message)
        self.case, self.report, self.estimate = case, report, estimate


@dataclass
class FuzzResult:
    """What a passing fuzz run saw: examples run and the largest disagreement between estimate and measurement."""

    examples: int = 0
    worst_peak: float = 0.0                  #: largest |estimated - measured| / measured of the peak
    worst_peak_case: Optional[FuzzCase] = None
    worst_row: float = 0.0                   #: the same over every compared row (categories and peak)
    worst_row_name: str = ""
    worst_row_case: Optional[FuzzCase] = None
    peaks: list[int] = field(default_factory=list, repr=False)  #: measured peak of every example

    def __str__(self) -> str:
        return (f"{self.examples} examples: worst peak disagreement {format_percent(self.worst_peak, signed=False)}"
                f" ({self.worst_peak_case!r}); worst row {self.worst_row_name} "
                f"{format_percent(self.worst_row, signed=False)} ({self.worst_row_case!r})")


def _default_optimizers() -> st.SearchStrategy:
    from .strategies import optimizers

    return optimizers()


def _as_strategy(name: str, value: Any) -> st.SearchStrategy:
    """A strategy as given, or st.just() of a plain value (e.g. one optimizer factory)."""
    if isinstance(value, st.SearchStrategy):
        return value
    if name == "optimizer" and not callable(value):
        raise InvalidArgument(f"optimizer={value!r} must be a callable(params) -> Optimizer or a strategy of them")
    return st.just(value)


def _cases(make_model, model_args, batch_sizes, optimizer) -> st.SearchStrategy[FuzzCase]:
    if isinstance(make_model, st.SearchStrategy):
        models = make_model
    else:
        models = st.fixed_dictionaries({k: _as_strategy(k, v) for k, v in model_args.items()})
    return st.builds(FuzzCase, models, _as_strategy("batch_sizes", batch_sizes), _as_strategy("optimizer", optimizer))


def _named_args(fn: Callable, args: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``args`` that ``fn`` accepts by name (all of them when it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(args)
    return {k: v for k, v in args.items() if k in params}


def _instantiate(case: FuzzCase, make_model, make_batch):
    """A fresh model, its optimizer and a batch for ``case`` (nothing is shared between examples)."""
    if isinstance(case.model, dict):
        model = make_model(**case.model)
        batch = make_batch(case.batch_size, **_named_args(make_batch, case.model))
    else:
        model = case.model.build()
        batch = (make_batch or case.model.make_batch)(case.batch_size)
    inputs, target = batch if isinstance(batch, tuple) and len(batch) == 2 else (batch, None)
    return model, case.optimizer(model.parameters()), inputs, target


def _digest(make_model, model_args, backend) -> bytes:
    """Database key material, so failures saved by one fuzz() call replay only in the same call."""
    name = getattr(make_model, "__qualname__", None) or repr(make_model)
    text = f"{getattr(make_model, '__module__', '')}.{name}|{sorted(model_args)}|{backend}"
    return hashlib.sha256(text.encode()).digest()


def fuzz(
    make_model: Union[st.SearchStrategy, Callable[..., Any]],
    *,
    batch_sizes: Union[st.SearchStrategy[int], int] = st.integers(1, 64),
    make_batch: Optional[Callable[..., Any]] = None,
    optimizer: Any = None,
    budget: Union[int, str, None] = None,
    rtol: float = 0.05,
    atol: Optional[int] = None,
    backend: str = "auto",
    max_examples: Optional[int] = None,
    settings: Optional[hypothesis.settings] = None,
    loss_fn: Optional[Callable[[Any, Any], Any]] = None,
    estimate: Optional[Callable[..., Any]] = None,
    on_example: Optional[Callable[[Any], None]] = None,
    **model_args: Any,
) -> FuzzResult:
    """Check over hypothesis examples that measure_step agrees with estimate_step within ``rtol`` (or ``atol``
    bytes, default 256 KiB, as the plugin's check) and fits ``budget``.

    ``make_model`` is either a strategy of configs with ``.build()`` and ``.make_batch(batch_size)`` (see
    ``pytest_gpumem.strategies``), or a callable whose keyword arguments are drawn from the strategies in
    ``model_args``; then ``make_batch(batch_size, **those of the drawn arguments it names)`` returns
    ``(inputs, target)``. ``optimizer`` is a factory ``callable(params) -> Optimizer`` or a strategy of them
    (default: ``strategies.optimizers()``). ``estimate`` replaces estimate_step (same signature).
    ``on_example(report)`` sees every measured StepReport, shrinking included. Raises FuzzFailure for the
    shrunk minimal example; returns a FuzzResult otherwise.

    No health check is suppressed. Hypothesis' function-scoped-fixture check has nothing to guard here:
    the @given test is internal to this call (not a pytest item), and every example builds its own model,
    optimizer and batch, so no fixture state is shared between examples. Without ``settings`` the current
    hypothesis profile applies, with no deadline (one example is a measured and an estimated step).

    >>> fuzz(lambda width: nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 2)),
    ...      width=st.integers(1, 256), make_batch=lambda b: (torch.randn(b, 8), torch.randint(2, (b,))),
    ...      backend="cpu", max_examples=20)  # doctest: +SKIP
    """
    from .._measure.backends import resolve_backend_name
    from .contradiction import DEFAULT_ATOL, compare
    from .._estimate import estimate_step
    from .._measure.step import measure_step

    _check_arguments(make_model, make_batch, model_args, rtol)
    limit = parse_bytes(budget) if budget is not None else None
    backend = resolve_backend_name(backend)
    device = estimate_device(backend)
    estimate = estimate or estimate_step
    cases = _cases(make_model, model_args, batch_sizes, optimizer if optimizer is not None else _default_optimizers())
    result = FuzzResult()

    def one_example(case: FuzzCase) -> None:
        model, opt, inputs, target = _instantiate(case, make_model, make_batch)
        report = measure_step(model, opt, inputs, target=target, loss_fn=loss_fn, backend=backend)
        if on_example is not None:
            on_example(report)
        # The estimate gets its own fresh model and optimizer: the measured step has trained the first pair.
        model, opt, inputs, target = _instantiate(case, make_model, make_batch)
        est = estimate(model, opt, inputs, target=target, loss_fn=loss_fn, device=device)
        comparison = compare(report, est, rtol, DEFAULT_ATOL if atol is None else atol)
        _record(result, case, comparison, report.peak)
        if not comparison.ok:
            raise FuzzFailure(f"estimate and measurement disagree for {case!r}\n{comparison.message}",
                              case, report, est)
        if limit is not None and report.peak > limit:
            raise FuzzFailure(f"peak {format_bytes(report.peak)} exceeds the budget {format_bytes(limit)} "
                              f"({report.backend}) for {case!r}\n{comparison.message}", case, report, est)

    test = given(case=cases)(one_example)
    set_hypothesis_digest(test, _digest(make_model, model_args, backend))
    # An example takes 0.05-1 s, and the first one also pays torch's lazy imports: wall time is not the
    # property here, so no deadline unless the caller's settings ask for one.
    base = settings if settings is not None else hypothesis.settings(deadline=None)
    run = hypothesis.settings(base, **({"max_examples": max_examples} if max_examples is not None else {}))(test)
    run()
    return result


def _check_arguments(make_model: Any, make_batch: Any, model_args: dict[str, Any], rtol: float) -> None:
    """InvalidArgument for a combination fuzz() cannot run, naming what is accepted."""
    if not isinstance(make_model, st.SearchStrategy):
        if not callable(make_model):
            raise InvalidArgument(f"make_model={make_model!r} must be a strategy of configs or a callable")
        if make_batch is None:
            raise InvalidArgument("make_batch=... is needed when make_model is a callable: "
                                  "make_batch(batch_size, **drawn model arguments it names) -> (inputs, target)")
    elif model_args:
        raise InvalidArgument(f"model arguments {sorted(model_args)} apply only when make_model is a callable")
    if not 0 <= rtol:
        raise InvalidArgument(f"rtol={rtol!r} must be >= 0")


def _record(result: FuzzResult, case: FuzzCase, comparison: Any, peak: int) -> None:
    """Count the example and keep the largest disagreements seen."""
    result.examples += 1
    result.peaks.append(peak)
    for row in comparison.rows:
        rel = abs(row.rel)
        if row.name == "peak" and rel >= result.worst_peak:
            result.worst_peak, result.worst_peak_case = rel, case
        if rel >= result.worst_row:
            result.worst_row, result.worst_row_name, result.worst_row_case = rel, row.name, case
