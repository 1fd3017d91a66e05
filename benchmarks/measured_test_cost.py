"""What each measured test costs a user's run beyond its own training step, in a process that has imported
the libraries users train with (torch, transformers, timm, torchvision: ~440,000 objects for the garbage
collector).

The leak check after a measured test used to start with a full ``gc.collect()``, which walks every one of
those objects (~0.3 s on a 2-core CI machine). It now collects only when a measured storage is still alive --
the trackers see frees as they happen -- which a test that keeps nothing never has; on a GPU it still always
collects. This script runs the same N one-step tests (MLP, AdamW, emulated backend) with the leak check as
shipped and with a conftest that puts the unconditional collection back, alternating the two so machine noise
hits both alike, and prints pytest's own seconds per test. The plugin loads through its pytest11 entry point
(install the package first), this checkout first on the path.

    python benchmarks/measured_test_cost.py [--tests 20] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TESTS = '''
import pytest, torch
from torch import nn

@pytest.mark.parametrize("i", range({n}))
@pytest.mark.gpu_budget("1GB")
def test_step(gpumem, i):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).to(gpumem.device)
    gpumem.train_step(model, torch.optim.AdamW(model.parameters()), torch.randn(16, 32, device=gpumem.device))
'''

#: what users' suites have imported; whichever of these is installed is imported by the conftest
HEAVY = ("transformers", "timm", "torchvision")

ALWAYS_COLLECT = '''
import gc
from pytest_gpumem import fixture

def _collect_first(state):
    gc.collect()
    return sum(t.live_bytes() for t in state.trackers)

fixture.live_bytes = _collect_first  # the leak check as it was: a full collection after every measured test
'''


def run(folder: Path, always_collect: bool, tests: int) -> float:
    """pytest's own seconds per test for one run of ``tests`` measured tests in ``folder``."""
    heavy = "".join(f"try:\n    import {name}\nexcept ImportError:\n    pass\n" for name in HEAVY)
    (folder / "conftest.py").write_text(heavy + (ALWAYS_COLLECT if always_collect else ""))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--gpumem-backend=emulated",
                          "test_many.py"],
                         cwd=folder, env=env, capture_output=True, text=True)
    found = re.search(rf"{tests} passed.* in ([0-9.]+)s", out.stdout)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"the benchmark's run failed:\n{out.stdout}\n{out.stderr}")
    return float(found.group(1)) / tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / "test_many.py").write_text(TESTS.format(n=args.tests))
        shipped, collecting = [], []
        for _ in range(args.repeat):
            shipped.append(run(folder, False, args.tests))
            collecting.append(run(folder, True, args.tests))
    a, b = statistics.median(shipped), statistics.median(collecting)
    print(f"{args.tests} measured tests, median of {args.repeat} runs, pytest's seconds per test")
    print(f"  leak check as shipped (collects only when something is alive): {a * 1000:7.1f} ms")
    print(f"  full collection after every measured test (before):            {b * 1000:7.1f} ms")
    print(f"  saved per measured test: {(b - a) * 1000:.1f} ms ({b / a:.1f}x)")


if __name__ == "__main__":
    main()
