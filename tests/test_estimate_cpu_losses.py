"""Losses whose CPU kernel returns the reduced scalar on the unreduced buffer: the estimate (device="cpu") holds it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_gpumem._estimate import estimate_step
from pytest_gpumem._estimate.trace import trace_step
from pytest_gpumem._measure.step import measure_step


def _bce(out, y):
    return F.binary_cross_entropy(torch.sigmoid(out), torch.sigmoid(y))


LOSSES = {"mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss, "soft_margin": F.soft_margin_loss, "bce": _bce,
          "mse sum": lambda out, y: F.mse_loss(out, y, reduction="sum"), "l1": F.l1_loss, "huber": F.huber_loss}
#: 512 x 256 fp32 elements: 524,288 B for the losses that keep their unreduced buffer, 4 B for the others
KEPT = {"mse": 524_288, "smooth_l1": 524_288, "soft_margin": 524_288, "bce": 524_288, "mse sum": 524_288,
        "l1": 4, "huber": 4}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_traced_loss_holds_what_the_cpu_loss_holds(name):
    x, y = torch.randn(512, 256), torch.randn(512, 256)
    real = LOSSES[name](x.requires_grad_(), y)
    assert real.untyped_storage().nbytes() == KEPT[name]  # the CPU fact itself, on this torch
    trace = trace_step(nn.Identity(), x.detach(), target=y, loss_fn=LOSSES[name], device="cpu")
    assert trace.loss.untyped_storage().nbytes() == KEPT[name]


@pytest.mark.parametrize("name", ["mse", "bce", "l1"])
def test_peak_matches_the_cpu_with_the_loss_buffer(name):
    """Linear 256 -> 1024, GELU, Linear 1024 -> 256 on 512 rows: with MSE the peak (fc2's backward) holds the
    loss's 524,288-B buffer the step keeps until backward ends; the estimate was 524,284 B (-4.3%) under."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    x, y = torch.randn(512, 256), torch.randn(512, 256)
    est = estimate_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, target=y, loss_fn=LOSSES[name],
                        device="cpu")
    rep = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, target=y, loss_fn=LOSSES[name],
                       backend="cpu")
    assert est.peak == rep.peak


@pytest.mark.parametrize("how", ["broadcast", "keywords"])
def test_the_buffer_follows_broadcasting_and_keyword_arguments(how):
    """An (8, 1) input against an (8, 8) target: the CPU keeps the 8 x 8 elementwise loss, 64 x 4 = 256 B (the input
    alone would say 8 x 4 = 32 B); given by keyword, input and target are found all the same (4 x 4 x 4 = 64 B)."""
    if how == "broadcast":
        x, y, loss, kept = torch.randn(8, 1), torch.randn(8, 8), F.mse_loss, 256
    else:
        x, y, kept = torch.randn(4, 4), torch.randn(4, 4), 64

        def loss(out, target):
            return F.mse_loss(input=out, target=target)
    assert loss(x, y).untyped_storage().nbytes() == kept  # the CPU fact itself, on this torch
    trace = trace_step(nn.Identity(), x, target=y, loss_fn=loss, device="cpu")
    assert trace.loss.untyped_storage().nbytes() == kept
