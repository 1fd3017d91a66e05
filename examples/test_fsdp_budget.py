"""Sharded training with FSDP2 (``fully_shard``): parameters, gradients and AdamW state divided by the ranks.

A small pre-norm transformer (4 blocks of width 256, vocabulary 1000), AdamW, a global batch of 8
sequences of 64 tokens over 2 ranks. Each block of ``model.blocks`` (a ModuleList) is an FSDP unit, then
the root: between steps a rank holds Ψ/2 of the parameters (dim 0 padded to a multiple of 2), Ψ/2 of the
gradients and Ψ/2 of the AdamW moments, 16Ψ/2 bytes in fp32; a unit's parameters are all-gathered whole for
its forward and backward only. Run with real gloo ranks: ``pytest examples/test_fsdp_budget.py --gpumem-backend=cpu``.
"""
import pytest
import torch
from torch import nn

from pytest_gpumem import FSDP, Category, Phase, model_states


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 1000, width: int = 256, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


# measured with gloo ranks on the cpu backend (torch 2.14.1): peak 52,165,036 B = 49.7 MiB per rank, the same in
# every run, during backward (AdamW state 14 MiB, shards 7 MiB, a gathered block and the root 5 MiB, activations
# 12 MiB); budget = the peak + 25%: 52,165,036 B x 1.25 = 65.2 MB, rounded up to 66 MB
@pytest.mark.gpu_budget("66MB", parallel=FSDP(world_size=2))
def test_fsdp_rank_budget(gpumem):
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 1000, (8, 64))

    result = gpumem.train_step(model, optimizer, tokens, target=tokens, loss_fn=lm_loss)

    # each rank's parameters between steps are its padded shards: the closed form, to the byte
    closed = model_states(model, optimizer, FSDP(world_size=2), device=result.ranks[0].backend)
    for rank, report in enumerate(result.ranks):
        params = report.steps[-1].phases[Phase.ZERO_GRAD].retained_split[Category.PARAMS]
        assert params == closed[rank].params
        # half the model (plus a padding row where dim 0 is odd), never the whole of it at rest
        assert params < 0.51 * sum(p.nbytes for p in model.parameters())
