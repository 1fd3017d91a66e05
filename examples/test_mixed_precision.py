"""Mixed precision: autocast to float16 with a GradScaler, against the same step in float32.

Where the memory goes: the weights, their gradients and Adam's two moments stay float32 (16 B per
parameter, whatever the precision of the forward pass); what shrinks is the activations -- matmul
outputs are float16 (2 B per element) -- while autocast adds float16 copies of the input and of the
weights, which the matmuls save for backward. So AMP pays off when activations dominate (large
batches, narrow layers): batch 4096 through 1024-wide layers here.
The scaler multiplies the loss so small float16 gradients do not flush to zero; it keeps a few scalars.

On a GPU this is torch.amp.GradScaler("cuda"); on the emulated backend the emulated scaler runs the
same kernels on meta tensors (no values, so it assumes finite gradients).
"""
import pytest
import torch
from torch import nn

from pytest_gpumem import Category, Phase


def make_scaler(gpumem):
    if gpumem.backend == "emulated":
        from pytest_gpumem._emulation import EmulatedGradScaler

        return EmulatedGradScaler("cuda")
    return torch.amp.GradScaler(gpumem.device.type)


def mlp(device):
    return nn.Sequential(
        nn.Linear(1024, 1024, device=device), nn.ReLU(),
        nn.Linear(1024, 1024, device=device), nn.ReLU(),
        nn.Linear(1024, 10, device=device),
    )


@pytest.mark.skipif("config.getoption('--gpumem-backend') == 'cpu'", reason="float16 autocast + GradScaler is the CUDA recipe")
# measured on the emulated backend (torch 2.14.1): peak 82.29 MiB (amp), 104.37 MiB (fp32);
# budget = the larger peak + 25%, rounded up
@pytest.mark.gpu_budget("131MiB")
def test_autocast_fp16_with_grad_scaler(gpumem):
    x = torch.randn(4096, 1024, device=gpumem.device)
    y = torch.randint(0, 10, (4096,), device=gpumem.device)
    reports = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = mlp(gpumem.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if amp:
            reports[amp] = gpumem.train_step(model, optimizer, x, target=y,
                                             autocast_dtype=torch.float16, scaler=make_scaler(gpumem))
        else:
            reports[amp] = gpumem.train_step(model, optimizer, x, target=y)

    fp32, amp = reports[False], reports[True]
    # params, grads and optimizer state are float32 either way
    for category in (Category.PARAMS, Category.GRADS, Category.OPTIMIZER):
        assert amp.category_peak(category) == fp32.category_peak(category)
    # activations saved in forward: float16 halves each layer's output, but autocast also saves float16
    # copies of the input batch and of every weight for backward -- here 0.81x, not 0.5x
    act_fp32 = fp32.phases[Phase.FORWARD].retained_split[Category.ACTIVATIONS]
    act_amp = amp.phases[Phase.FORWARD].retained_split[Category.ACTIVATIONS]
    assert 0.5 * act_fp32 < act_amp < 0.85 * act_fp32
    # and the step's peak drops: 82.29 MiB vs 104.37 MiB
    assert amp.peak < fp32.peak
