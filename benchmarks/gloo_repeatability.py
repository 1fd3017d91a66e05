"""How repeatable the ``cpu`` backend's distributed figures are: every layout of tests/parallel_layout_cases.py
measured RUNS times on real gloo ranks, with the ranks settling their collectives (what the backend does) and,
side by side in the same run, without (the old behaviour), printing per layout how many distinct reports came out
and how far the ranks' peaks spread.

Usage: python benchmarks/gloo_repeatability.py [RUNS] [--only SUBSTRING]   (needs the package installed; Linux)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import parallel_layout_cases as cases  # noqa: E402

from pytest_gpumem import measure_parallel_step  # noqa: E402
from pytest_gpumem._parallel import rank_step  # noqa: E402


@contextlib.contextmanager
def _unsettled():
    """The ranks forked inside measure without settling (the module attribute rank_step looks up)."""
    settling = rank_step.settling_collectives
    rank_step.settling_collectives = lambda tracker: contextlib.nullcontext()
    try:
        yield
    finally:
        rank_step.settling_collectives = settling


def _measure(name: str, layout) -> tuple[str, list[int]]:
    model, optimizer, batch, target, loss = cases.case(name)
    run = measure_parallel_step(model, optimizer, batch, target=target, loss_fn=loss, parallel=layout,
                                backend="cpu", timeout=120)
    return json.dumps(run.to_dict(), sort_keys=True), [rank.peak for rank in run.ranks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="?", type=int, default=5)
    parser.add_argument("--only", default="", help="layouts whose id contains this")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    seen: set[str] = set()
    print(f"{'layout':<70} {'settled':>18} {'unsettled':>18}")
    print(f"{'':<70} {'reports / spread':>18} {'reports / spread':>18}")
    totals = {"settled": 0, "unsettled": 0}
    for name, layout in cases.CASES + cases.BUFFER_CASES:
        key = cases.case_id(name, layout)
        if key in seen or args.only not in key:
            continue
        seen.add(key)
        found: dict[str, list[tuple[str, list[int]]]] = {"settled": [], "unsettled": []}
        for _ in range(args.runs):  # alternating, so both see the same machine load
            found["settled"].append(_measure(name, layout))
            with _unsettled():
                found["unsettled"].append(_measure(name, layout))
        cells = []
        for mode, runs in found.items():
            distinct = len({dump for dump, _ in runs})
            spread = max(max(p) - min(p) for p in zip(*(peaks for _, peaks in runs)))
            totals[mode] += distinct > 1
            cells.append(f"{distinct} / {spread:,} B")
        print(f"{key[:70]:<70} {cells[0]:>18} {cells[1]:>18}", flush=True)
    print(f"layouts with more than one distinct report in {args.runs} runs: settled {totals['settled']}, "
          f"unsettled {totals['unsettled']} (of {len(seen)})")


if __name__ == "__main__":
    main()
