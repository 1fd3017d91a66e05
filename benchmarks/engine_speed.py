"""Speed and host memory of the measurement engine, side by side with torch's MemTracker.

(a) Emulated ResNet-50, batch 32 (3x224x224), AdamW: ``measure_step(backend="emulated")`` with steps=1
    and steps=2, against torch's MemTracker under FakeTensorMode running the same step(s). Wall time
    (median of repeats) and host peak memory (growth of ru_maxrss over the measured call, each variant in
    a fresh subprocess so one's peak does not hide another's). Target: ours <= 0.25x theirs.
(b) Overhead of tracking a real CPU step: ResNet-18, batch 16 (3x224x224), SGD. Untracked and tracked
    steps interleaved (untracked, tracked, untracked, tracked, ...), medians reported. Target <= 1.15x.

    python benchmarks/engine_speed.py [--repeats N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------- (a)
def _resnet50_inputs(batch: int):
    import torch

    return torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))


def run_ours(steps: int, repeats: int, batch: int) -> dict:
    import torch
    import torchvision

    from pytest_gpumem import measure_step

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    x, y = _resnet50_inputs(batch)
    times, peak = [], None
    rss_before = _rss_peak_bytes()
    for _ in range(repeats):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        start = time.perf_counter()
        report = measure_step(model, optimizer, x, target=y, steps=steps, backend="emulated")
        times.append(time.perf_counter() - start)
        peak = report.peak
    return {"times_s": times, "median_s": statistics.median(times), "peak_bytes": peak,
            "host_peak_growth_bytes": _rss_peak_bytes() - rss_before}


def run_memtracker_fake(steps: int, repeats: int, batch: int) -> dict:
    import torch
    import torchvision
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    times, peak = [], None
    rss_before = _rss_peak_bytes()
    for _ in range(repeats):
        with FakeTensorMode():
            torch.manual_seed(0)
            model = torchvision.models.resnet50()  # created fake: no real parameter memory
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x, y = _resnet50_inputs(batch)
            start = time.perf_counter()
            tracker = MemTracker()
            tracker.track_external(model, optimizer, x, y)
            with tracker:
                for _ in range(steps):
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    del loss
                    optimizer.step()
                    optimizer.zero_grad()
                    tracker.reset_mod_stats()
            times.append(time.perf_counter() - start)
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return {"times_s": times, "median_s": statistics.median(times), "peak_bytes": peak,
            "host_peak_growth_bytes": _rss_peak_bytes() - rss_before}


# ---------------------------------------------------------------------------------------------- (b)
def run_overhead(repeats: int, batch: int) -> dict:
    import torch
    import torchvision
    from torch import nn

    from pytest_gpumem import measure_step, track

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad()

    def untracked():
        step()

    def tracked():
        with track(model, optimizer, x, backend="cpu"):
            step()

    def measured():
        measure_step(model, optimizer, x, target=y, steps=1, backend="cpu")

    variants = {"untracked": untracked, "track": tracked, "measure_step": measured}
    step()  # warm-up: first-call costs (allocations, kernel selection) out of the figures
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():  # interleaved: drifting machine load hits all alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"times_s": times, "median_s": med,
            "ratio_track": med["track"] / med["untracked"],
            "ratio_measure_step": med["measure_step"] / med["untracked"]}


# ---------------------------------------------------------------------------------------------- main
def _child(kind: str, args) -> None:
    if kind == "ours1":
        out = run_ours(1, args.repeats, 32)
    elif kind == "ours2":
        out = run_ours(2, args.repeats, 32)
    elif kind == "theirs1":
        out = run_memtracker_fake(1, args.repeats, 32)
    elif kind == "theirs2":
        out = run_memtracker_fake(2, args.repeats, 32)
    else:
        out = run_overhead(args.overhead_repeats, 16)
    print("RESULT " + json.dumps(out))


def _spawn(kind: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--repeats", str(args.repeats),
           "--overhead-repeats", str(args.overhead_repeats)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead-repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args)
        return

    import torch

    results = {"torch": torch.__version__, "cpu_count": os.cpu_count()}
    for kind in ("ours1", "theirs1", "ours2", "theirs2", "overhead"):
        results[kind] = _spawn(kind, args)

    mib = 2**20
    print(f"torch {results['torch']}, {results['cpu_count']} CPUs")
    print("(a) ResNet-50 batch 32 AdamW: emulated measure_step vs MemTracker under FakeTensorMode")
    print(f"    {'steps':>5} {'ours s':>8} {'theirs s':>9} {'ratio':>6} {'ours host MiB':>14} {'theirs host MiB':>16} "
          f"{'ours peak MiB':>14} {'theirs peak MiB':>16}")
    for steps in (1, 2):
        ours, theirs = results[f"ours{steps}"], results[f"theirs{steps}"]
        if "error" in ours or "error" in theirs:
            print(f"    {steps:>5} error: ours={ours.get('error')} theirs={theirs.get('error')}")
            continue
        ratio = ours["median_s"] / theirs["median_s"]
        results[f"ratio_steps{steps}"] = ratio
        print(f"    {steps:>5} {ours['median_s']:>8.2f} {theirs['median_s']:>9.2f} {ratio:>6.2f} "
              f"{ours['host_peak_growth_bytes'] / mib:>14.1f} {theirs['host_peak_growth_bytes'] / mib:>16.1f} "
              f"{ours['peak_bytes'] / mib:>14.1f} {theirs['peak_bytes'] / mib:>16.1f}")
    print("    target: ratio <= 0.25")
    over = results["overhead"]
    print("(b) real CPU step, ResNet-18 batch 16 SGD, interleaved repeats, medians")
    if "error" in over:
        print(f"    error: {over['error']}")
    else:
        m = over["median_s"]
        print(f"    untracked {m['untracked']:.3f} s, track() {m['track']:.3f} s (x{over['ratio_track']:.3f}), "
              f"measure_step(steps=1) {m['measure_step']:.3f} s (x{over['ratio_measure_step']:.3f}); target <= 1.15")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
