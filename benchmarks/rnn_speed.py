"""Emulated LSTM/GRU steps against the real CPU step, before and after the recurrent-gate meta shortcuts.

Each variant runs ``measure_step`` (2 steps, Adam) on a 2-layer LSTM/GRU (input 64, hidden 128, batch 16,
sequence 50) and a linear head; variants interleave (cpu, before, after, cpu, ...) and the median of the
repeats is reported, so machine load hits all three alike. "before" is the emulated backend with the meta
shortcuts this change added switched off and without value tracking (what the emulated backend ran
before); "after" is the emulated backend as shipped. Target: after / cpu <= 1.

    python benchmarks/rnn_speed.py [--repeats N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pytest_gpumem import measure_step  # noqa: E402
from pytest_gpumem._emulation import meta_kernels  # noqa: E402
from pytest_gpumem._measure.backends import EmulatedBackend  # noqa: E402

#: the shortcuts the emulated backend had before the recurrent-gate ones were added
_BEFORE = frozenset({torch.ops.aten.native_batch_norm.default, torch.ops.aten.native_batch_norm_backward.default,
                     torch.ops.aten.threshold_backward.default, torch.ops.aten.zeros_like.default,
                     torch.ops.aten._foreach_sqrt.default})


class BeforeBackend(EmulatedBackend):
    @property
    def kernel_shortcuts(self):
        def kernel_for(func):
            if func in _BEFORE:
                return meta_kernels.memoised
            found = meta_kernels.kernel_for(func)
            return found if found is meta_kernels.foreach_in_place else None
        return kernel_for

    def make_value_mode(self):
        return None


class Recurrent(nn.Module):
    def __init__(self, cell) -> None:
        super().__init__()
        self.rnn = cell(64, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    for cell in (nn.LSTM, nn.GRU):
        torch.manual_seed(0)
        model = Recurrent(cell)
        x, y = torch.randn(16, 50, 64), torch.randint(0, 10, (16,))
        variants = {"cpu": "cpu", "before": BeforeBackend, "after": "emulated"}
        times: dict[str, list[float]] = {name: [] for name in variants}
        peaks = {}
        for _ in range(args.repeats + 1):  # the first round warms up (memo, imports)
            for name, backend in variants.items():
                be = backend() if isinstance(backend, type) else backend
                start = time.perf_counter()
                report = measure_step(model, torch.optim.Adam(model.parameters()), x, target=y, backend=be)
                times[name].append(time.perf_counter() - start)
                peaks[name] = report.peak
        median = {name: statistics.median(t[1:]) for name, t in times.items()}
        row = {"median_s": median, "before_over_cpu": median["before"] / median["cpu"],
               "after_over_cpu": median["after"] / median["cpu"], "speedup": median["before"] / median["after"],
               "peaks": peaks}
        results[cell.__name__] = row
        print(f"{cell.__name__}: cpu {median['cpu']:.3f} s, emulated before {median['before']:.3f} s "
              f"({row['before_over_cpu']:.2f}x cpu), after {median['after']:.3f} s ({row['after_over_cpu']:.2f}x cpu); "
              f"emulated peak before {peaks['before']:,} B, after {peaks['after']:,} B, cpu {peaks['cpu']:,} B")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
