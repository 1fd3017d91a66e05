"""Models and layouts measured on real gloo ranks for tests/test_parallel_emulated.py (the emulated ranks must
agree with them) and tests/test_parallel_comm_buffers.py (each communication buffer against its closed form).

Run as a script it measures every case of both lists on gloo ranks, once per test run (fresh_interpreter.py), and
prints one JSON object on the last line of stdout: ``peaks`` (agreement case id -> each rank's peak) and
``reports`` (buffer case id -> the ParallelReport as a dict). A fresh interpreter, because FSDP2 once run in a
process starts autograd's device threads, after which that process can no longer fork ranks (torch's
"Autograd and Fork" limit). One script for both lists: the layouts they share are measured once, and a test run
pays one interpreter start-up and one import of torch instead of two. Each case is measured once: the ranks settle
their collectives, so a run is the same every time (tests/test_parallel_gloo.py checks that on the MLP).
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


#: the agreement cases: an MLP and a small transformer on DDP, FSDP2 and ZeRO-2 at world sizes 2 and 4
LAYOUTS = [DDP(2), DDP(4), FSDP(2), FSDP(4), ZeRO(2, 2), ZeRO(2, 4)]
CASES = [(name, layout) for name in ("mlp", "transformer") for layout in LAYOUTS]

#: the buffer cases: every FSDP2 knob that changes a buffer (resharding, bf16 parameters, nested units), DDP's
#: buckets and both ZeRO stages
BUFFER_LAYOUTS = [DDP(2), ZeRO(1, 4), FSDP(2), FSDP(4), FSDP(2, reshard_after_forward=False),
                  FSDP(4, param_dtype=torch.bfloat16), FSDP(2, reshard_after_forward=False, param_dtype=torch.bfloat16),
                  ZeRO(2, 2), ZeRO(2, 4)]


def nested_units(model):
    """Each transformer block and, inside it, its MLP: nested FSDP units."""
    return [*model.blocks, *(block.mlp for block in model.blocks)]


BUFFER_CASES = [(name, layout) for name in ("mlp", "transformer") for layout in BUFFER_LAYOUTS] + [
    ("transformer", FSDP(2, wrap=nested_units)),
    ("transformer", FSDP(4, wrap=nested_units, param_dtype=torch.bfloat16))]


def case_id(name: str, layout) -> str:
    return f"{name}-{layout.describe()}"


def main() -> None:
    from pytest_gpumem import measure_parallel_step

    agreement, buffers = {case_id(*c) for c in CASES}, {case_id(*c) for c in BUFFER_CASES}
    peaks, reports = {}, {}
    for name, layout in CASES + [c for c in BUFFER_CASES if case_id(*c) not in agreement]:
        key = case_id(name, layout)
        model, optimizer, batch, target, loss = case(name)
        run = measure_parallel_step(model, optimizer, batch, target=target, loss_fn=loss, parallel=layout,
                                    backend="cpu", timeout=120)
        if key in agreement:
            peaks[key] = [rank.peak for rank in run.ranks]
        if key in buffers:
            reports[key] = run.to_dict()
    sys.stdout.write("\n" + json.dumps({"peaks": peaks, "reports": reports}) + "\n")


if __name__ == "__main__":
    main()
