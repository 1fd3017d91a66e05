"""The public zoo side by side: cpu peak, torch's MemTracker peak, emulated peak, their ratios, and why they differ.

Every entry of tests/gpumem_zoo (real architectures, tiny configs, random weights) is measured three ways on the
CPU: ``measure_step(backend="cpu")``, torch's MemTracker over the same loop, and ``measure_step(backend=
"emulated")``. The explanation lists, for the emulated peak's step and phase, each category whose bytes differ
from the cpu report's, with the entry's rules that cover it (tests/test_zoo.py asserts that every such
difference is covered). Entries the emulated backend cannot run yet print their xfail reason.

    python benchmarks/zoo.py                     # every entry
    python benchmarks/zoo.py --only hf_          # entries whose name contains 'hf_'
    python benchmarks/zoo.py --json zoo.json     # also write the rows as JSON
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gpumem_zoo import REGISTRY, RULES  # noqa: E402
from gpumem_zoo.oracle import memtracker_peak  # noqa: E402
from pytest_gpumem import format_bytes, measure_step  # noqa: E402


@dataclass
class Row:
    name: str
    cpu: int | None = None
    memtracker: int | None = None
    emulated: int | None = None
    seconds: float = 0.0
    status: str = "ok"
    explanation: list[str] = field(default_factory=list)


def _measure(name: str, backend: str):
    torch.manual_seed(0)
    step = REGISTRY[name].build()
    return measure_step(step.model, step.optimizer, step.batch, target=step.target, loss_fn=step.loss_fn,
                        backend=backend, autocast_dtype=step.autocast_dtype)


def _explain(name: str, cpu, emulated) -> list[str]:
    """Per category at the emulated peak's (step, phase): the byte difference and the rules that cover it."""
    entry, peak_step = REGISTRY[name], emulated.peak_step
    phase = peak_step.peak_phase
    theirs = peak_step.phases[phase].peak_split
    ours = next(s for s in cpu.steps if s.index == peak_step.index).phases[phase].peak_split
    lines = []
    for category in theirs.keys() | ours.keys():
        delta = theirs.get(category, 0) - ours.get(category, 0)
        if delta:
            rules = [r for r in entry.rules if category in RULES[r].categories and phase.value in RULES[r].phases]
            sign = "+" if delta > 0 else "-"
            lines.append(f"{category.value} {sign}{format_bytes(abs(delta))}: {', '.join(rules) or 'UNEXPLAINED'}")
    return sorted(lines)


def run(name: str) -> Row:
    row, started = Row(name), time.perf_counter()
    entry = REGISTRY[name]
    if entry.missing():
        row.status = f"skipped: needs {', '.join(entry.missing())}"
        return row
    cpu = _measure(name, "cpu")
    row.cpu = cpu.peak
    torch.manual_seed(0)
    row.memtracker = memtracker_peak(entry.build())
    try:
        emulated = _measure(name, "emulated")
        row.emulated = emulated.peak
        row.explanation = _explain(name, cpu, emulated) + list(emulated.notes)
        if entry.emulated_xfail:
            row.status = "XPASS: remove the xfail"
    except Exception as exc:  # noqa: BLE001 - the row says what failed
        row.status = f"xfail: {entry.emulated_xfail}" if entry.emulated_xfail else f"FAILED: {str(exc)[:120]}"
    row.seconds = time.perf_counter() - started
    return row


def _ratio(a: int | None, b: int | None) -> str:
    return f"{a / b:.4f}" if a and b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="entries whose name contains this")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    header = f"{'entry':28s} {'cpu':>11s} {'MemTracker':>11s} {'mt/cpu':>7s} {'emulated':>11s} {'emu/cpu':>7s} {'s':>5s}"
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for name in (n for n in REGISTRY if args.only in n):  # a row as soon as it is measured
        rows.append(r := run(name))
        fmt = (lambda v: format_bytes(v) if v is not None else "-")
        print(f"{r.name:28s} {fmt(r.cpu):>11s} {fmt(r.memtracker):>11s} {_ratio(r.memtracker, r.cpu):>7s} "
              f"{fmt(r.emulated):>11s} {_ratio(r.emulated, r.cpu):>7s} {r.seconds:5.1f}  {r.status}")
        for line in ([REGISTRY[name].notes] if REGISTRY[name].notes else []) + r.explanation:
            print(f"{'':30s}{line}")
        sys.stdout.flush()
    worst = max((abs(r.memtracker / r.cpu - 1) for r in rows if r.cpu and r.memtracker), default=0.0)
    print(f"\n{len(rows)} entries in {time.perf_counter() - started:.0f} s; cpu vs MemTracker worst {worst:.2%}; "
          f"torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
