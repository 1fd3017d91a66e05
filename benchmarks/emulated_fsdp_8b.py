"""Issue 15's benchmark: one rank of an 8-rank FSDP2 training step of a Llama-3-8B-shaped model, emulated on the CPU.

The model is transformers' ``LlamaForCausalLM`` from a ``LlamaConfig`` on the meta device (hidden 4096, 32 layers,
32 heads / 8 kv heads, intermediate 14336, vocabulary 128256; nothing downloaded), fp32 parameters sharded by
``fully_shard`` on every decoder layer and the root, all-gathered in bf16 (``param_dtype=bfloat16``) with gradients
reduced in fp32; AdamW (fp32 state); Hugging Face gradient checkpointing (non-reentrant); global batch 8 x 8192
tokens, so each rank trains 1 x 8192 (``labels = input_ids``). ``measure_parallel_step(..., backend="emulated")``
predicts every rank's CUDA peak (the rank runs in a forked process, see _parallel/clean_child.py). Printed: wall
time of the call and host peak RSS of this process and of that child (targets < 10 s, < 3 GiB), the
per-rank peak with its split by category and the named parts (all-gather buffers, unsharded parameters,
reduce-scatter input), beside the closed-form model states per rank.

    python benchmarks/emulated_fsdp_8b.py [--layers N] [--seq N] [--world N] [--steps N] [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

TARGET_WALL_S = 10.0
TARGET_HOST_BYTES = 3 * 2**30


def _rss_peak_bytes() -> int:
    """Resident-set high-water mark of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _children_rss_peak_bytes() -> int:
    """Resident-set high-water mark of the largest finished child (the emulated FSDP rank runs in one)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB


def _config(layers: int, seq: int, hidden: int = 4096, heads: int = 32, kv_heads: int = 8,
            intermediate: int = 14336, vocab: int = 128256):
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, max_position_embeddings=seq, use_cache=False,
                                    rope_theta=500000.0, torch_dtype=torch.float32)


def _step(config, seq: int, world: int, steps: int):
    import transformers
    from pytest_gpumem import FSDP, measure_parallel_step

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (world, seq), generator=torch.Generator().manual_seed(0))
    strategy = FSDP(world, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    report = measure_parallel_step(model, optimizer, {"input_ids": ids, "labels": ids}, parallel=strategy,
                                   backend="emulated", steps=steps)
    return report, sum(p.numel() for p in model.parameters())


def run(layers: int, seq: int, world: int, steps: int) -> dict:
    start = time.perf_counter()
    _step(_config(2, 64, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256), 64, world, 1)
    warmup = time.perf_counter() - start
    rss_before = _rss_peak_bytes()
    start = time.perf_counter()
    report, n_params = _step(_config(layers, seq), seq, world, steps)
    wall = time.perf_counter() - start
    rank = report.peak_report
    phase = rank.phases[rank.peak_phase]
    return {"parameters": n_params, "warmup_s": warmup, "wall_s": wall,
            "host_rss_peak_bytes": max(_rss_peak_bytes(), _children_rss_peak_bytes()),
            "host_rss_parent_bytes": _rss_peak_bytes(), "host_rss_child_bytes": _children_rss_peak_bytes(),
            "host_rss_growth_bytes": _rss_peak_bytes() - rss_before,
            "rank_peaks_bytes": [r.peak for r in report.ranks], "peak_bytes": rank.peak,
            "peak_phase": rank.peak_phase.value, "reserved_peak_bytes": rank.reserved_peak,
            "peak_split_bytes": {c.value: b for c, b in rank.peak_split.items()},
            "peak_parts_bytes": dict(phase.peak_parts),
            "phase_peaks_bytes": {p.value: b for p, b in rank.phase_peaks().items()},
            "notes": list(rank.notes), "table": report.table()}


def _print(results: dict) -> None:
    from pytest_gpumem._core.units import format_bytes as fb

    r = results["result"]
    print(f"torch {results['torch']}, transformers {results['transformers']}, {results['cpu_count']} CPUs; "
          f"Llama-3-8B shape, {results['layers']} layers, FSDP2 x{results['world']} (fp32 shards, bf16 all-gather, "
          f"fp32 reduce), AdamW, checkpointing, per-rank batch 1 x {results['seq']}, {results['steps']} step(s); "
          f"{r['parameters']:,} parameters")
    print(f"warm-up (tiny config: imports, first use): {r['warmup_s']:.2f} s")
    print(f"wall time of the emulated step(s): {r['wall_s']:.2f} s (target < {TARGET_WALL_S:.0f} s: "
          f"{'met' if r['wall_s'] < TARGET_WALL_S else 'MISSED'})")
    print(f"host RSS high-water: {fb(r['host_rss_peak_bytes'])} (this process {fb(r['host_rss_parent_bytes'])}, "
          f"the forked process that ran the rank {fb(r['host_rss_child_bytes'])}; target < 3 GiB: "
          f"{'met' if r['host_rss_peak_bytes'] < TARGET_HOST_BYTES else 'MISSED'})")
    print(f"predicted per-rank peak: {fb(r['peak_bytes'])} in {r['peak_phase']} (reserved "
          f"{fb(r['reserved_peak_bytes'] or 0)}); every rank: {', '.join(fb(b) for b in r['rank_peaks_bytes'])}")
    print("peak per phase: " + ", ".join(f"{k} {fb(v)}" for k, v in r["phase_peaks_bytes"].items()))
    print("split at the peak: " + ", ".join(f"{k} {fb(v)}" for k, v in r["peak_split_bytes"].items() if v))
    print("parts at the peak: " + (", ".join(f"{k} {fb(v)}" for k, v in r["peak_parts_bytes"].items()) or "none"))
    print(r["table"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    import transformers

    results = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "transformers": transformers.__version__, "python": platform.python_version(),
               "cpu_count": os.cpu_count(), "layers": args.layers, "seq": args.seq, "world": args.world,
               "steps": args.steps, "result": run(args.layers, args.seq, args.world, args.steps)}
    _print(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
