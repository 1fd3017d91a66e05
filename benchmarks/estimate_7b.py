"""Estimate a ~7B-parameter decoder-only transformer's training step on the meta device, never materialised.

Prints wall time, tracemalloc peak and ru_maxrss growth (the acceptance bar: < 1 s, < 200 MB host memory),
the estimate's parameter count and its model-state bytes for mixed-precision Adam (16 B/param, ZeRO paper).
Run: .venv/bin/python benchmarks/estimate_7b.py [--seq 2048] [--batch 1]
"""
from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import torch
from torch import nn

from pytest_gpumem._core.units import format_bytes
from pytest_gpumem._estimate import estimate_step, model_state_bytes


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention (SDPA) + SiLU MLP, LLaMA-7B-like widths."""

    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.act, self.down = nn.Linear(d, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.down(self.act(self.up(self.norm2(x))))


class Decoder(nn.Module):
    def __init__(self, vocab=32000, d=4096, layers=32, heads=32, hidden=11008 + 5504) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    with torch.device("meta"):
        model = Decoder()
    n = sum(p.numel() for p in model.parameters())
    tokens = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
    target = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
    loss_fn = lambda out, t: nn.functional.cross_entropy(out.flatten(0, 1), t.flatten())  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters())

    # Warm-up on a toy config: torch imports its meta kernels (torch._refs, decompositions) on first use,
    # a one-time cost of the process, not of the estimate.
    with torch.device("meta"):
        toy = Decoder(vocab=64, d=32, layers=2, heads=2, hidden=64)
    toy_tokens = torch.zeros(1, 8, dtype=torch.long, device="meta")
    estimate_step(toy, torch.optim.AdamW(toy.parameters()), (toy_tokens,), target=toy_tokens, loss_fn=loss_fn)

    # Time without tracemalloc (it slows every Python allocation several-fold), then measure memory in a
    # second run under tracemalloc; ru_maxrss growth covers both runs.
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    est = estimate_step(model, optimizer, (tokens,), target=target, loss_fn=loss_fn, device="cuda")
    wall = time.perf_counter() - t0
    tracemalloc.start()
    estimate_step(model, optimizer, (tokens,), target=target, loss_fn=loss_fn, device="cuda")
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # ru_maxrss is KiB on Linux

    print(f"parameters: {n:,} ({n / 1e9:.2f} B)")
    print(f"estimate wall time: {wall:.3f} s  (bar: < 1 s)")
    print(f"host memory: tracemalloc peak {format_bytes(traced_peak)}, ru_maxrss growth {format_bytes(rss_growth)} "
          "(bar: < 200 MB)")
    print(est.table())
    print(f"fp32 AdamW model state (params + grads + 2 moments): "
          f"{format_bytes(est.params + est.grads + est.optimizer)} = {(est.params + est.grads + est.optimizer) / n:.2f} B/param")
    print(f"mixed-precision Adam model state (16 B/param, ZeRO): {format_bytes(model_state_bytes(n))} "
          f"= {model_state_bytes(n) / n:.0f} B/param")


if __name__ == "__main__":
    main()
