"""Issue 13's acceptance benchmark: an emulated Llama-2-7B-shaped training step on the CPU, beside MemTracker.

The model is transformers' ``LlamaForCausalLM`` built from a ``LlamaConfig`` on the meta device (32 layers,
hidden 4096, 32 heads, intermediate 11008, vocabulary 32000; random init, nothing downloaded), trained with
AdamW under bf16 autocast with Hugging Face gradient checkpointing (non-reentrant), batch 1 x 4096 tokens,
``labels = input_ids`` (the model computes its loss). ``measure_step(..., backend="emulated")`` predicts the
CUDA peak; printed: its wall time, host memory (resident high-water growth over the call, and the tracemalloc peak of
a second, traced call), the predicted peak and its split. Side by side, in a subprocess under a time cap:
torch's MemTracker under FakeTensorMode on the same step (CPU autocast: FakeTensorMode fakes CPU tensors
here, so its SDPA is the CPU kernel and it has no allocator rounding). Targets: < 5 s wall, < 2 GiB host.

    python benchmarks/emulated_7b.py [--layers N] [--seq N] [--steps N] [--memtracker-cap S] [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

TARGET_WALL_S = 5.0
TARGET_HOST_BYTES = 2 * 2**30


def _rss_peak_bytes() -> int:
    """This process's resident-set high-water mark: VmHWM where Linux has it, else ru_maxrss.

    ru_maxrss survives exec on Linux, so in the MemTracker subprocess it would start at this process's peak;
    VmHWM belongs to the new address space.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _config(layers: int, seq: int, hidden: int = 4096, heads: int = 32, intermediate: int = 11008,
            vocab: int = 32000):
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=heads, max_position_embeddings=seq, use_cache=False)


def _llama(config):
    """The model with checkpointing on, built under whatever device/fake mode the caller has entered."""
    import transformers

    model = transformers.LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _batch(seq: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _emulated_step(config, seq: int, steps: int):
    from pytest_gpumem import measure_step

    with torch.device("meta"):
        model = _llama(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return measure_step(model, optimizer, _batch(seq, config.vocab_size), steps=steps, backend="emulated",
                        autocast_dtype=torch.bfloat16), sum(p.numel() for p in model.parameters())


def run_ours(layers: int, seq: int, steps: int) -> dict:
    """Warm up on a tiny config (imports, first-use kernels), then time, then trace a second run."""
    from pytest_gpumem._core.units import format_bytes

    start = time.perf_counter()
    _emulated_step(_config(2, 64, hidden=64, heads=4, intermediate=128, vocab=256), 64, steps)
    warmup = time.perf_counter() - start
    config = _config(layers, seq)
    rss_before = _rss_peak_bytes()
    start = time.perf_counter()
    report, n_params = _emulated_step(config, seq, steps)
    wall = time.perf_counter() - start
    rss_growth = _rss_peak_bytes() - rss_before
    tracemalloc.start()
    traced_start = time.perf_counter()
    _emulated_step(config, seq, steps)
    traced_wall = time.perf_counter() - traced_start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    split = {c.value: b for c, b in report.peak_split.items()}
    return {"parameters": n_params, "warmup_s": warmup, "wall_s": wall, "host_rss_growth_bytes": rss_growth,
            "tracemalloc_peak_bytes": traced_peak, "traced_wall_s": traced_wall, "peak_bytes": report.peak,
            "peak_phase": report.peak_phase.value, "peak_split_bytes": split,
            "phase_peaks_bytes": {p.value: b for p, b in report.phase_peaks().items()},
            "host_rss_peak_bytes": _rss_peak_bytes(),
            "reserved_peak_bytes": report.reserved_peak, "notes": list(report.notes),
            "table": report.table(),
            "peak_text": format_bytes(report.peak)}


def run_memtracker(layers: int, seq: int, steps: int) -> dict:
    """MemTracker under FakeTensorMode over the same step(s): model, optimizer and batch all fake."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    config = _config(layers, seq)
    batch = _batch(seq, config.vocab_size)
    rss_before = _rss_peak_bytes()
    start = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = _llama(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        fake_batch = {k: mode.from_tensor(v) for k, v in batch.items()}
        built = time.perf_counter()
        tracker = MemTracker()
        tracker.track_external(model, optimizer, *fake_batch.values())
        with tracker:
            for _ in range(steps):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    output = model(**fake_batch)
                output.loss.backward()
                del output
                optimizer.step()
                optimizer.zero_grad()
                tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    end = time.perf_counter()
    return {"wall_s": end - built, "build_s": built - start, "host_rss_growth_bytes": _rss_peak_bytes() - rss_before,
            "host_rss_peak_bytes": _rss_peak_bytes(),
            "peak_bytes": peak["Total"], "peak_split_bytes": {str(k): v for k, v in peak.items() if k != "Total"}}


def _spawn_memtracker(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--layers", str(args.layers), "--seq",
           str(args.seq), "--steps", str(args.steps)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.memtracker_cap)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within the {args.memtracker_cap:.0f} s cap (killed)",
                "process_s": time.perf_counter() - start}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]), process_s=time.perf_counter() - start)
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"error": tail[-1] if tail else f"exit {proc.returncode}, no output",
            "process_s": time.perf_counter() - start}


def _print(results: dict) -> None:
    from pytest_gpumem._core.units import format_bytes as fb

    ours, theirs = results["ours"], results["memtracker"]
    print(f"torch {results['torch']}, transformers {results['transformers']}, {results['cpu_count']} CPUs; "
          f"Llama {results['layers']} layers, seq {results['seq']}, batch 1, bf16 autocast, AdamW, "
          f"checkpointing, {results['steps']} step(s); {ours['parameters']:,} parameters")
    print(f"warm-up (tiny config: imports, first use): {ours['warmup_s']:.2f} s")
    print(f"{'':34s} {'emulated (ours)':>18s} {'MemTracker+Fake':>18s}")
    if "error" in theirs:
        print(f"{'wall time of the step(s)':34s} {ours['wall_s']:>16.2f} s   n/a: {theirs['error']}")
    else:
        print(f"{'wall time of the step(s)':34s} {ours['wall_s']:>16.2f} s {theirs['wall_s']:>16.2f} s"
              f"   (ours/theirs {ours['wall_s'] / theirs['wall_s']:.3f}; ours includes building the meta model, "
              f"theirs excludes its {theirs['build_s']:.1f} s fake build)")
        print(f"{'host RSS high-water growth':34s} {fb(ours['host_rss_growth_bytes']):>18s} "
              f"{fb(theirs['host_rss_growth_bytes']):>18s}")
        print(f"{'host RSS high-water, whole process':34s} {fb(ours['host_rss_peak_bytes']):>18s} "
              f"{fb(theirs['host_rss_peak_bytes']):>18s}   (imports included)")
    print(f"{'host tracemalloc peak':34s} {fb(ours['tracemalloc_peak_bytes']):>18s}   "
          f"(traced run {ours['traced_wall_s']:.2f} s)")
    mt_peak = fb(theirs["peak_bytes"]) if "peak_bytes" in theirs else "n/a"
    print(f"{'predicted / tracked peak':34s} {fb(ours['peak_bytes']):>18s} {mt_peak:>18s}   "
          f"(ours in {ours['peak_phase']}; reserved {fb(ours['reserved_peak_bytes'] or 0)})")
    print("ours, peak per phase: " + ", ".join(f"{k} {fb(v)}" for k, v in ours["phase_peaks_bytes"].items()))
    print("ours, split at the peak: " + ", ".join(f"{k} {fb(v)}" for k, v in ours["peak_split_bytes"].items()))
    if "peak_split_bytes" in theirs:
        print("MemTracker, by type at its peak: "
              + ", ".join(f"{k} {fb(v)}" for k, v in theirs["peak_split_bytes"].items() if v))
    host = max(ours["host_rss_growth_bytes"], ours["tracemalloc_peak_bytes"])
    print(f"targets: wall {ours['wall_s']:.2f} s < {TARGET_WALL_S:.0f} s: "
          f"{'met' if ours['wall_s'] < TARGET_WALL_S else 'MISSED'}; host {fb(host)} < 2 GiB: "
          f"{'met' if host < TARGET_HOST_BYTES else 'MISSED'}")
    for note in ours["notes"]:
        print(f"note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=1, help="training steps per measurement (default 1)")
    parser.add_argument("--memtracker-cap", type=float, default=120.0, help="seconds; 0 skips MemTracker")
    parser.add_argument("--json", help="also write the figures here (e.g. benchmarks/results/...json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_memtracker(args.layers, args.seq, args.steps)))
        return
    import transformers

    results = {"device": "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "layers": args.layers, "seq": args.seq, "steps": args.steps,
               "targets": {"wall_s": TARGET_WALL_S, "host_bytes": TARGET_HOST_BYTES}}
    results["ours"] = run_ours(args.layers, args.seq, args.steps)
    results["memtracker"] = (_spawn_memtracker(args) if args.memtracker_cap > 0
                             else {"error": "skipped (--memtracker-cap 0)"})
    _print(results)
    if args.json:
        results["ours"].pop("table", None)
        with open(args.json + ".tmp", "w") as fh:
            json.dump(results, fh, indent=2)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
