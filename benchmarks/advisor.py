"""Batch-size advisor vs binary search by trial runs: same answer? at what cost?

For each model the advisor (three measured probe steps, then a replay of the allocation log) and a
search by trial runs (measure batch 1, 2, 4, ... until the peak exceeds safety * budget, then bisect --
what "grow until OOM" does, without the OOM) find the largest batch whose peak fits. Printed side by
side: each answer, measured steps, wall time, and the ratio. Both answers are checked by measurement.

    python benchmarks/advisor.py [--backend cpu|emulated] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pytest_gpumem._measure.step import measure_step  # noqa: E402
from pytest_gpumem._tools.advisor import advise_batch_size  # noqa: E402
from pytest_gpumem.strategies import CNNConfig, MLPConfig, OptimizerFactory  # noqa: E402

ADAM = OptimizerFactory.of(torch.optim.Adam, lr=1e-3)
SGD = OptimizerFactory.of(torch.optim.SGD, lr=0.1, momentum=0.9)

#: (name, config, optimizer factory, budget): budgets chosen so the answers land in the hundreds.
CASES = [
    ("MNIST MLP 784-128-10, Adam", MLPConfig(784, (128,), 10), ADAM, "8MB"),
    ("MLP 64-256-256-10 + Dropout, Adam", MLPConfig(64, (256, 256), 10, dropout=0.1), ADAM, "10MB"),
    ("CNN 3x32x32 16-32-64 + BN + Dropout, SGD", CNNConfig(3, 32, (16, 32, 64), (3, 3, 3), (1, 2, 2), 10,
                                                            batch_norm=True, dropout=0.1), SGD, "64MB"),
]


def measured_peak(config, optimizer, batch_size, backend, counter):
    counter[0] += 1
    model = config.build()
    inputs, target = config.make_batch(batch_size)
    return measure_step(model, optimizer(model.parameters()), inputs, target=target, backend=backend).peak


def trial_search(config, optimizer, usable, backend):
    """Largest batch with peak <= usable by trial steps: double until too big, then bisect."""
    counter = [0]
    fits = lambda b: measured_peak(config, optimizer, b, backend, counter) <= usable  # noqa: E731
    if not fits(1):
        return 0, counter[0]
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low, counter[0]


def run_case(name, config, optimizer, budget, backend, safety=0.8):
    measured_peak(config, optimizer, 2, backend, [0])  # warm-up: torch's lazy imports paid before timing
    start = time.perf_counter()
    advice = advise_batch_size(config.build, optimizer, config.make_batch, budget=budget, safety=safety,
                               backend=backend)
    advisor_s = time.perf_counter() - start
    start = time.perf_counter()
    trial, trial_steps = trial_search(config, optimizer, advice.usable_bytes, backend)
    trial_s = time.perf_counter() - start
    counter = [0]
    fits = measured_peak(config, optimizer, advice.max_batch, backend, counter) <= advice.usable_bytes
    next_fits = measured_peak(config, optimizer, advice.max_batch + 1, backend, counter) <= advice.usable_bytes
    return {
        "model": name, "backend": backend, "budget": budget, "safety": safety,
        "advisor": {"max_batch": advice.max_batch, "measured_steps": len(advice.samples), "seconds": advisor_s,
                    "linear": advice.linear, "limiting_phase": advice.limiting_phase,
                    "fixed_bytes": advice.fixed_bytes, "per_sample_bytes": advice.per_sample_bytes},
        "trial_search": {"max_batch": trial, "measured_steps": trial_steps, "seconds": trial_s},
        "answers_agree": advice.max_batch == trial,
        "answer_fits": fits, "one_more_fits": next_fits,
        "time_ratio": trial_s / advisor_s,
        "steps_ratio": trial_steps / len(advice.samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", choices=["cpu", "emulated"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rows = [run_case(*case, backend=args.backend) for case in CASES]
    header = (f"{'model':<42}{'answer':>8}{'trial':>7}{'steps':>7}{'trial':>7}"
              f"{'advisor s':>11}{'trial s':>9}{'time x':>8}{'steps x':>9}  check")
    print(f"backend {args.backend}, torch {torch.__version__}; answer = advisor, trial = binary search by trial runs")
    print(header)
    for r in rows:
        a, t = r["advisor"], r["trial_search"]
        check = "ok" if r["answers_agree"] and r["answer_fits"] and not r["one_more_fits"] else "MISMATCH"
        print(f"{r['model']:<42}{a['max_batch']:>8}{t['max_batch']:>7}{a['measured_steps']:>7}"
              f"{t['measured_steps']:>7}{a['seconds']:>11.2f}{t['seconds']:>9.2f}{r['time_ratio']:>8.1f}"
              f"{r['steps_ratio']:>9.1f}  {check}")
    print("steps: measured training steps (each measure_step runs 2); time x / steps x: trial search / advisor")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "rows": rows}, fh, indent=2)
    if not all(r["answers_agree"] and r["answer_fits"] and not r["one_more_fits"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
