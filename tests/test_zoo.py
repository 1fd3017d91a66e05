"""The public zoo (tests/gpumem_zoo): real architectures, tiny configs, random weights, on cpu and emulated.

For every entry: the ``cpu`` peak agrees with torch's MemTracker within 1%, and every difference between the
``emulated`` and the ``cpu`` report -- per step, per phase, per category -- is covered by a named CUDA rule of
the entry (gpumem_zoo/rules.py); the rules with a closed form are checked to the byte. Entries the emulated
backend cannot run yet are strict xfails naming the failing op, so they fail the moment they start passing.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._pytree import tree_flatten

from computed_once import computed_once
from gpumem_zoo import REGISTRY, RULES
from gpumem_zoo.entry import Entry, Step
from gpumem_zoo.oracle import memtracker_peak
from pytest_gpumem import Category, StepReport, measure_step
from pytest_gpumem._measure.step import StepFailed

ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW)


def _cases(backend: str) -> list:
    cases = []
    for name, entry in REGISTRY.items():
        marks = []
        if entry.missing():
            marks.append(pytest.mark.skip(reason=f"needs {', '.join(entry.missing())}: pip install -e '.[zoo]'"))
        if backend == "emulated" and entry.emulated_xfail:
            marks.append(pytest.mark.xfail(strict=True, raises=StepFailed, reason=entry.emulated_xfail))
        cases.append(pytest.param(name, marks=marks, id=name))
    return cases


def build(name: str) -> Step:
    torch.manual_seed(0)
    return REGISTRY[name].build()


def measure(step: Step, backend: str) -> StepReport:
    return measure_step(step.model, step.optimizer, step.batch, target=step.target, loss_fn=step.loss_fn,
                        backend=backend, autocast_dtype=step.autocast_dtype)


def _measure_cpu(name: str) -> dict:
    """The cpu report of entry ``name``, the step tensors in its optimizer state and its batch bytes, as JSON."""
    step = build(name)
    report = measure(step, "cpu")
    steps = sum(1 for state in step.optimizer.state.values() if torch.is_tensor(state.get("step")))
    flat, _ = tree_flatten((step.batch, step.target))
    batch = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in flat if torch.is_tensor(t)}.values())
    return {"report": report.to_dict(), "steps": steps, "batch": batch}


@pytest.fixture(scope="session")
def cpu_runs(tmp_path_factory):
    """cpu_run(name) -> (cpu report, step tensors in the optimizer state, batch bytes), measured once per entry
    and test run: both tests of an entry need it, and under xdist they often land on different workers."""

    @functools.lru_cache(maxsize=None)
    def cpu_run(name: str) -> tuple[StepReport, int, int]:
        data = computed_once(tmp_path_factory, f"zoo-cpu-{name}", lambda: _measure_cpu(name))
        return StepReport.from_dict(data["report"]), data["steps"], data["batch"]

    return cpu_run


def test_registry_is_a_zoo():
    families = {e.family for e in REGISTRY.values()}
    assert len(REGISTRY) >= 30 and families == {"timm", "torchvision", "transformers", "rnn", "peft", "lightning"}
    for entry in REGISTRY.values():
        assert set(entry.rules) <= set(RULES) and entry.rules[:2] == ("block-rounding", "batch-moved")


@pytest.mark.parametrize("name", _cases("cpu"))
def test_cpu_peak_agrees_with_torch_memtracker(name, cpu_runs):
    pytest.importorskip("torch.distributed._tools.mem_tracker")
    ours, _, _ = cpu_runs(name)
    theirs = memtracker_peak(build(name))
    assert ours.peak == pytest.approx(theirs, rel=0.01), f"{name}: cpu {ours.peak} B, MemTracker {theirs} B"


def _uncovered(entry: Entry, cpu: StepReport, emulated: StepReport) -> list[str]:
    """Every (step, phase, category) whose emulated bytes differ from cpu's without a named rule that may move it."""
    problems = []
    assert [s.index for s in cpu.steps] == [s.index for s in emulated.steps]
    for ours, theirs in zip(cpu.steps, emulated.steps):
        assert set(ours.phases) == set(theirs.phases)
        for phase, stats in ours.phases.items():
            for category in Category:
                delta = theirs.phases[phase].peak_split.get(category, 0) - stats.peak_split.get(category, 0)
                rules = [r for r in entry.rules
                         if category in RULES[r].categories and phase.value in RULES[r].phases]
                if delta and not rules:
                    problems.append(f"step {ours.index} {phase.value} {category.value}: {delta:+d} B")
    return problems


@pytest.mark.parametrize("name", _cases("emulated"))
def test_emulated_differs_from_cpu_only_by_named_cuda_rules(name, cpu_runs):
    entry = REGISTRY[name]
    cpu, step_tensors, batch_bytes = cpu_runs(name)
    step = build(name)
    emulated = measure(step, "emulated")
    assert not _uncovered(entry, cpu, emulated), f"{name}: differences no rule of {entry.rules} explains"
    if "selection-upper-bound" in entry.rules:  # every candidate kept: no less than the real step keeps
        assert emulated.peak >= cpu.peak, name
        assert any("upper bound" in note for note in emulated.notes), name

    for ours, theirs in zip(cpu.steps, emulated.steps):
        for phase, stats in ours.phases.items():
            split, mine = theirs.phases[phase].peak_split, stats.peak_split
            # adam-step-on-host: each parameter's `step` is a 4-byte fp32 CPU scalar on CUDA, a device tensor on cpu
            if "adam-step-on-host" in entry.rules and mine.get(Category.OPTIMIZER, 0):
                assert split[Category.OPTIMIZER] == mine[Category.OPTIMIZER] - 4 * step_tensors, (name, phase)
            if phase.value == "setup":  # batch-moved: cpu has the batch on its device already, CUDA not yet
                assert mine[Category.BATCH] - split.get(Category.BATCH, 0) == batch_bytes, name
    if "foreach-optimizer" in entry.rules and isinstance(step.optimizer, ADAM_FAMILY):
        # foreach Adam/AdamW: torch._foreach_sqrt(exp_avg_sqs) is one temporary per trainable parameter, all at once
        trainable = sum(p.numel() * p.element_size() for p in step.model.parameters() if p.requires_grad)
        for theirs in emulated.steps:
            assert theirs.phases[next(p for p in theirs.phases if p.value == "optimizer")].peak_split[
                Category.TEMPORARIES] == trainable, name
