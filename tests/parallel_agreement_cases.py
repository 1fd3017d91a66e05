"""Models and layouts on which the emulated ranks must agree with real gloo ranks (tests/test_parallel_emulated.py).

Run as a script it measures every case on real gloo ranks and prints their peaks as JSON: the test runs it in a
fresh interpreter, because FSDP2 once run in a process starts autograd's device threads, after which that process
can no longer fork ranks (torch's "Autograd and Fork" limit).

Each sharded case runs twice and each rank keeps its smaller peak: gloo reduce-scatters by all-reducing a staged copy of
the input, which its work object frees when the gloo thread lets go of it; now and then that lands after the
rank's next allocations and adds one reduce-scatter input to its peak (seen on one rank in 1 of 5 runs of the
MLP on FSDP(2): 5,644,168 B or 6,135,688 B). The run without the late free is the one the emulation models.
"""
from __future__ import annotations

import json
import sys

import torch
from torch import nn

from pytest_gpumem import DDP, FSDP, ZeRO


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and a 4x MLP, no dropout."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token embedding, two blocks in a ModuleList (FSDP's default units), a final norm and a vocabulary head."""

    def __init__(self, vocab: int = 97, width: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def sequence_loss(logits, target):
    return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def case(model_name: str):
    """(model, optimizer, batch, target, loss_fn) for ``model_name``, the same on every call."""
    torch.manual_seed(0)
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        batch, target, loss = torch.randn(32, 256), torch.randint(0, 10, (32,)), nn.functional.cross_entropy
    else:
        model = TinyTransformer()
        ids = torch.randint(0, 97, (8, 16))
        batch, target, loss = ids, torch.randint(0, 97, (8, 16)), sequence_loss
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), batch, target, loss


LAYOUTS = [DDP(2), DDP(4), FSDP(2), FSDP(4), ZeRO(2, 2), ZeRO(2, 4)]
CASES = [(name, layout) for name in ("mlp", "transformer") for layout in LAYOUTS]


def case_id(name: str, layout) -> str:
    return f"{name}-{layout.describe()}"


def main() -> None:
    from pytest_gpumem import measure_parallel_step

    peaks = {}
    for name, layout in CASES:
        runs = []
        for _ in range(1 if isinstance(layout, DDP) else 2):  # DDP reduces in place: no staged copy
            model, optimizer, batch, target, loss = case(name)
            report = measure_parallel_step(model, optimizer, batch, target=target, loss_fn=loss, parallel=layout,
                                           backend="cpu", timeout=120)
            runs.append([r.peak for r in report.ranks])
        peaks[case_id(name, layout)] = [min(by_rank) for by_rank in zip(*runs)]
    json.dump(peaks, sys.stdout)


if __name__ == "__main__":
    main()
