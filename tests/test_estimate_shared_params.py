"""Parameters used by several calls (tied embeddings, a layer applied twice, a cell in a loop) and what replayed
blocks leave in a cache: the estimate (device="cpu") against the cpu backend."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_gpumem._core.categories import Category
from pytest_gpumem._estimate import estimate_step
from pytest_gpumem._measure.step import measure_step


def _both(model, batch, target=None, loss_fn=None, **kw):
    torch.manual_seed(0)
    est = estimate_step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, target=target, loss_fn=loss_fn,
                        device="cpu", **kw)
    rep = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, target=target, loss_fn=loss_fn,
                       backend="cpu")
    return est, rep


class TiedEncDec(nn.Module):
    """An encoder output read by a cross projection, and an LM head tied to the embedding, multiplied in the
    parent's own code (no head module)."""

    def __init__(self, vocab=4000, d=64):
        super().__init__()
        self.enc, self.emb, self.cross = nn.Linear(d, d), nn.Embedding(vocab, d), nn.Linear(d, d)

    def forward(self, x, ids):
        e = torch.tanh(self.enc(x))
        return (self.emb(ids) + self.cross(e)) @ self.emb.weight.t()


def test_tied_embedding_grad_is_made_at_the_head_and_summed_at_the_embedding():
    """Backward reaches the head's matmul first: the weight's grad (4000 x 64 x 4 B = 1,024,000 B) is made
    there, not at the embedding. At the embedding the contribution and the out-of-place sum are alive beside
    it: 2 x 1,024,000 B of temporaries at the peak. Attributing the grad to the embedding (the module holding
    it) estimated 4,251,736 B against 4,776,024 B measured (-11%)."""
    model = TiedEncDec()
    x, ids, y = torch.randn(8, 64), torch.randint(0, 4000, (8,)), torch.randint(0, 4000, (8,))
    est, rep = _both(model, (x, ids), y)
    assert est.peak_split[Category.TEMPORARIES] >= 2 * 1_024_000
    assert abs(est.peak - rep.peak) <= 16, (est.peak, rep.peak)


class Twice(nn.Module):
    def __init__(self, d=512):
        super().__init__()
        self.lin, self.head = nn.Linear(d, d), nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.lin(torch.relu(self.lin(x))))


def test_a_layer_applied_twice_sums_its_second_contribution():
    """The second application's backward makes the 512 x 512 weight's grad (1 MiB); the first one's contribution
    is added out of place. Was -0.15% (10,248 B under: the sum of the bias and weight contributions)."""
    est, rep = _both(Twice(), torch.randn(256, 512), torch.randint(0, 10, (256,)))
    assert est.peak == rep.peak


class CellLoop(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.cell, self.head = nn.GRUCell(d, d), nn.Linear(d, 10)

    def forward(self, x):
        h = x.new_zeros(x.size(1), x.size(2))
        for t in range(x.size(0)):
            h = self.cell(x[t], h)
        return self.head(h)


def test_a_cell_run_in_a_loop_is_within_three_percent():
    """Eight GRUCell calls share one set of weights: the last call makes the grads, the seven before add to them
    (was -9.7%: the grads appeared only at the first call). The sums are not always out of place (autograd reuses
    a buffer it holds the only reference to), so the estimate is an upper bound here: +1.7% measured."""
    est, rep = _both(CellLoop(), torch.randn(8, 64, 256), torch.randint(0, 10, (64,)))
    assert 0 <= est.peak - rep.peak <= 0.03 * rep.peak, (est.peak, rep.peak)


def test_replayed_decoder_layers_keep_what_they_put_in_the_kv_cache():
    """A Hugging Face decoder in training still fills its DynamicCache, which the output keeps until backward
    ends: per layer keys and values of 4 x 2 heads x 64 x 32 x 4 B = 65,536 B each. Layer 1 is replayed from
    layer 0's template, which did not run the cache update: 131,072 B were missing (12,095,120 B estimated with
    replay, 12,226,192 B without). Against the CPU: +2,056 B (0.02%), a few small grads' order."""
    tr = pytest.importorskip("transformers")
    model = tr.LlamaForCausalLM(tr.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, attn_implementation="eager"))
    ids = torch.randint(0, 1000, (4, 64))
    batch = {"input_ids": ids, "labels": ids}
    est, rep = _both(model, batch, loss_fn=lambda out, _t: out.loss)
    unreplayed = estimate_step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch,
                               loss_fn=lambda out, _t: out.loss, device="cpu", reuse_blocks=False)
    assert est.peak == unreplayed.peak
    assert abs(est.peak - rep.peak) <= 0.001 * rep.peak, (est.peak, rep.peak)
