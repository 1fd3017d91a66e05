"""Shared test builders: small models (one ``mlp``), and StepReports / plugin-style records from category sizes."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pytest_gpumem._core.budget import Budget
from pytest_gpumem._core.categories import PHASES, Category, Phase
from pytest_gpumem._core.records import TestRecord
from pytest_gpumem._core.results import PhaseStats, StepMeasurement, StepReport

C = Category


def mlp(d_in: int = 32, hidden: int | tuple[int, ...] = 64, d_out: int = 8, *, frozen_first: bool = False,
        seed: int | None = None, device: torch.device | str | None = None,
        activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear(d_in, hidden) -> ReLU -> Linear(hidden, d_out): (d_in + 1) * hidden + (hidden + 1) * d_out parameters.

    A tuple of hidden widths stacks Linear -> activation pairs (``mlp(512, (1024, 1024), 10)``)."""
    if seed is not None:
        torch.manual_seed(seed)
    widths = (d_in, *((hidden,) if isinstance(hidden, int) else hidden))
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), activation()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], d_out))
    if frozen_first:
        model[0].requires_grad_(False)
    return model.to(device) if device is not None else model


def _phase_splits(step: int, sizes: dict[Category, int]) -> dict[Phase, tuple[dict, dict]]:
    """(peak split, retained split) per phase of a plausible SGD-with-state step; step 0 has no state yet."""
    p, g, o, b, a, t = (sizes.get(c, 0) for c in (C.PARAMS, C.GRADS, C.OPTIMIZER, C.BATCH, C.ACTIVATIONS, C.TEMPORARIES))
    state = {C.OPTIMIZER: o} if step > 0 else {}
    return {
        Phase.SETUP: ({C.PARAMS: p, **state}, {C.PARAMS: p, **state}),
        Phase.BATCH: ({C.PARAMS: p, **state, C.BATCH: b}, {C.PARAMS: p, **state, C.BATCH: b}),
        Phase.FORWARD: ({C.PARAMS: p, **state, C.BATCH: b, C.ACTIVATIONS: a, C.TEMPORARIES: t},
                        {C.PARAMS: p, **state, C.BATCH: b, C.ACTIVATIONS: a}),
        Phase.BACKWARD: ({C.PARAMS: p, **state, C.BATCH: b, C.ACTIVATIONS: a // 2, C.GRADS: g, C.TEMPORARIES: t},
                         {C.PARAMS: p, **state, C.BATCH: b, C.GRADS: g}),
        Phase.OPTIMIZER: ({C.PARAMS: p, C.OPTIMIZER: o, C.BATCH: b, C.GRADS: g},
                          {C.PARAMS: p, C.OPTIMIZER: o, C.BATCH: b, C.GRADS: g}),
        Phase.ZERO_GRAD: ({C.PARAMS: p, C.OPTIMIZER: o, C.BATCH: b, C.GRADS: g},
                          {C.PARAMS: p, C.OPTIMIZER: o, C.BATCH: b}),
    }


def make_report(*, params: int = 400_000, grads: int | None = None, optimizer: int = 800_000, batch: int = 100_000,
                activations: int = 1_258_291, temporaries: int = 50_000, backend: str = "emulated",
                device: str = "cuda (emulated on meta tensors)", steps: int = 2) -> StepReport:
    """A two-step StepReport whose category peaks are exactly the given sizes."""
    sizes = {C.PARAMS: params, C.GRADS: params if grads is None else grads, C.OPTIMIZER: optimizer,
             C.BATCH: batch, C.ACTIVATIONS: activations, C.TEMPORARIES: temporaries}
    measured = []
    for index in range(steps):
        phases = {}
        for phase, (peak, kept) in _phase_splits(index, sizes).items():
            phases[phase] = PhaseStats(phase, sum(peak.values()), sum(kept.values()), peak, kept,
                                       reserved_peak=sum(peak.values()) + 2 * 2**20 if backend != "cpu" else None)
        top = max(PHASES, key=lambda ph: phases[ph].peak)
        measured.append(StepMeasurement(index, phases[top].peak, top, dict(phases[top].peak_split),
                                        phases, phases[top].reserved_peak))
    return StepReport(backend, device, "2.14.1", None, tuple(measured), notes=("emulated: test data",))


def make_record(nodeid: str, report: StepReport | None = None, *, budget: int | None = None,
                estimate: int | None = None, outcome: str = "passed", **sizes: Any) -> TestRecord:
    """A plugin-style test record around a report (built from ``sizes`` when not given)."""
    report = report if report is not None else make_report(**sizes)
    return TestRecord(
        nodeid=nodeid,
        outcome=outcome,
        report=report,
        budget=Budget(total=budget),
        estimate=None if estimate is None else {"peak_bytes": estimate,
                                                "peak_split": {"params": report.peak_split[C.PARAMS]}},
        measurements=1,
    )
