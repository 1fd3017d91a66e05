"""The CPU's oneDNN LSTM in the estimate (device="cpu"): the workspace each layer keeps, against the CPU itself."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_gpumem._core.categories import Category
from pytest_gpumem._estimate import estimate_step
from pytest_gpumem._estimate.cpu_rnn import onednn_lstm_workspace_bytes
from pytest_gpumem._measure.step import measure_step

needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
                                  reason="this torch has no oneDNN: the CPU runs LSTM natively")


def test_workspace_of_the_zoo_lstm_layer_by_hand():
    """T=32, B=8, I=H=128, float32. Gates: rows padded 4*128=512 -> 528 (a multiple of 256 gets one more cache
    line, 16 floats): 32*8*528*4 = 540672. h per step: 32*8*128*4 = 131072. Five state buffers of
    2*(32+1)*8 rows x 128 x 4 B = 270336 each. All page multiples: 540672 + 131072 + 5*270336 = 2023424,
    the workspace issue 14 saw the CPU save."""
    assert onednn_lstm_workspace_bytes(32, 8, 128, 128, 4) == 2023424


def test_workspace_of_a_layer_whose_gates_pad_past_a_multiple_of_256():
    """T=20, B=6, I=48, H=64, float32. Gates 4*64 = 256 -> 272: 20*6*272*4 = 130560 -> page 131072; h
    20*6*64*4 = 30720, ends 161792 -> 163840; five buffers of 2*21*6 = 252 rows x 64 (max(I, H)) x 4 B = 64512,
    each but the last rounded to 65536: 163840 + 4*65536 + 64512 = 490496 -> 491520."""
    assert onednn_lstm_workspace_bytes(20, 6, 48, 64, 4) == 491520


def test_workspace_in_bfloat16_by_hand_with_page_rounding():
    """T=8, B=4, I=H=16, bf16 (2 B; diff buffers stay fp32). Gates 8*4*64*2 = 4096 (64 is already a whole
    32-element line). h: 16 -> 32 per line: 8*4*32*2 = 2048, ends at 6144 -> next page 8192. Rows 2*9*4 = 72:
    h states 72*32*2 = 4608 (ends 12800 -> 16384), c 72*16*2 = 2304 (18688 -> 20480), three fp32 diffs
    72*16*4 = 4608 each (25088 -> 28672, 33280 -> 36864, 41472), the end rounded to a page: 45056."""
    assert onednn_lstm_workspace_bytes(8, 4, 16, 16, 2) == 45056


def _saved_workspace(steps, batch, inp, hidden, dtype) -> int:
    lstm = nn.LSTM(inp, hidden).to(dtype)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lstm(torch.randn(steps, batch, inp, dtype=dtype, requires_grad=True))
    (ws,) = [t for t in saved if t.dtype == torch.uint8]
    return ws.untyped_storage().nbytes()


@needs_onednn
@pytest.mark.parametrize("shape", [(13, 3, 37, 100), (5, 1, 7, 9), (7, 33, 64, 512), (20, 5, 200, 64)])
def test_workspace_rule_matches_what_the_cpu_saves(shape):
    """Odd sizes (padding, page rounding, input wider or narrower than hidden, H=512 whose gates pad to 2064)."""
    assert onednn_lstm_workspace_bytes(*shape, 4) == _saved_workspace(*shape, torch.float32)


@needs_onednn
@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU runs no oneDNN bfloat16")
def test_workspace_rule_matches_what_the_cpu_saves_in_bfloat16():
    assert onednn_lstm_workspace_bytes(13, 3, 37, 100, 2) == _saved_workspace(13, 3, 37, 100, torch.bfloat16)


class TokenLSTM(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(500, 48)
        self.rnn = nn.LSTM(48, 64, batch_first=True, **kw)
        self.head = nn.Linear(64 * (2 if kw.get("bidirectional") else 1), 500)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0]).flatten(0, 1)


@needs_onednn
@pytest.mark.parametrize("kw", [dict(num_layers=2), dict(num_layers=3, bidirectional=True),
                                dict(num_layers=2, bias=False), dict(num_layers=2, dropout=0.3)],
                         ids=["2 layers", "bidirectional", "no bias", "dropout"])
def test_lstm_activations_match_the_cpu_exactly(kw):
    """Each layer and direction keeps its workspace until backward reaches it: with it the estimate's activations
    are the CPU's to a scalar's bytes (without it, the zoo's LSTM LM was -42%). No bias: the zeros aten passes in are
    saved too; dropout between layers keeps its mask."""
    torch.manual_seed(0)
    model = TokenLSTM(**kw)
    ids, y = torch.randint(0, 500, (6, 20)), torch.randint(0, 500, (120,))
    est = estimate_step(model, torch.optim.Adam(model.parameters()), ids, target=y, device="cpu")
    rep = measure_step(model, torch.optim.Adam(model.parameters()), ids, target=y, backend="cpu")
    est_act, meas_act = est.category_peak(Category.ACTIVATIONS), rep.category_peak(Category.ACTIVATIONS)
    assert abs(est_act - meas_act) <= 16, (est_act, meas_act)  # a scalar's bytes at most (the loss)
    assert abs(est.peak - rep.peak) <= 16, (est.peak, rep.peak)  # a few scalars (the loss) at most
