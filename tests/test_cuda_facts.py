"""The one table of CUDA kernel facts, and that the estimate and the emulation both follow it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pytest_gpumem._cuda_facts import autocast as autocast_facts
from pytest_gpumem._cuda_facts import dropout, optimizers
from pytest_gpumem._estimate import estimate_step


def test_dropout_fact_and_both_readers():
    assert dropout.runs_fused(0.1, True, False, 10)
    assert not dropout.runs_fused(0.0, True, False, 10) and not dropout.runs_fused(0.1, False, False, 10)
    assert not dropout.runs_fused(0.1, True, True, 10) and not dropout.runs_fused(0.1, True, False, 0)
    # 64 x 128 elements: a bool mask on CUDA (8,192 B), fp32 noise on the CPU (32,768 B)
    assert dropout.mask_bytes(64 * 128, 4, "cuda") == 8192 and dropout.mask_bytes(64 * 128, 4, "cpu") == 32768
    model = nn.Sequential(nn.Linear(128, 128), nn.Dropout(0.1), nn.Linear(128, 4))
    rows = {r.name: r for r in estimate_step(model, None, torch.randn(64, 128), device="cuda", steps=1).layers}
    assert rows["1"].activation_bytes == 8192  # the estimate's formula reads the fact


def test_emulated_functional_dropout_saves_the_facts_mask():
    from pytest_gpumem._emulation import cuda_semantics

    x = torch.empty(64, 128, device="meta", requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), cuda_semantics():
        F.dropout(x, 0.1, training=True)
    assert any(t.dtype == dropout.MASK_DTYPE and t.numel() == x.numel() for t in saved)


def test_optimizer_fact_and_both_readers():
    from pytest_gpumem._emulation.optimizers import predict_cuda_optimizer
    from pytest_gpumem._estimate.optimizer_rules import is_foreach

    p = nn.Parameter(torch.zeros(2))
    for opt in (torch.optim.Adam([p]), torch.optim.SGD([p], lr=0.1)):
        group = opt.param_groups[0]
        assert optimizers.takes_foreach(group, "cuda", type(opt).__name__) and is_foreach(group, "cuda")
        assert not optimizers.takes_foreach(group, "cpu", type(opt).__name__) and not is_foreach(group, "cpu")
        with predict_cuda_optimizer(opt):
            assert group["foreach"] is True
    assert not optimizers.takes_foreach({"fused": True}, "cuda")
    assert not optimizers.takes_foreach({"foreach": None}, "cuda", "LBFGS")


def test_autocast_lists_are_the_emulations():
    from pytest_gpumem._emulation import autocast as emulated

    assert "linear" in autocast_facts.LOWER and "layer_norm" in autocast_facts.FP32
    assert not autocast_facts.LOWER & autocast_facts.FP32
    assert emulated._POLICY[F.linear] == "lower" and emulated._POLICY[F.layer_norm] == "fp32"


def test_estimate_casts_a_models_own_cuda_autocast_region_as_a_gpu_would():
    """The estimate's trace casts by _cuda_facts' autocast lists itself (real autocast ignores meta tensors): a
    forward that enters torch.autocast("cuda", bf16) on its own is estimated like autocast_dtype=bf16, and the
    emulated backend (its own code, the same table) measures the same activations."""
    from pytest_gpumem._core.categories import Category
    from pytest_gpumem._measure.step import measure_step

    class Own(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.net(x).float()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    x = torch.randn(64, 256)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    full = estimate_step(net, sgd(net), x, device="cuda")
    given = estimate_step(net, sgd(net), x, device="cuda", autocast_dtype=torch.bfloat16)
    own = estimate_step(Own(net), sgd(net), x, device="cuda")
    act = Category.ACTIVATIONS
    assert own.category_peak(act) == given.category_peak(act) < full.category_peak(act)
    assert not any("estimated in full precision" in n for n in own.notes)
    rep = measure_step(Own(net), sgd(net), x, backend="emulated")
    assert rep.category_peak(act) == own.category_peak(act)
