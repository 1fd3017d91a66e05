"""L1 penalty in the loss vs weight decay in the optimizer: same model, what each costs in memory.

- L1: ``loss + lambda * sum(|p|)`` runs through autograd: forward builds |p| for every parameter
  (param-sized temporaries) and backward needs sign(p) -- extra bytes in forward and backward.
- Weight decay (L2 folded into SGD's update): no extra state at all; the optimizer adds
  ``wd * p`` to the gradient inside step().
"""
import pytest
import torch
from torch import nn

from pytest_gpumem import Category, Phase

L1_LAMBDA = 1e-5


def cifar_mlp(device):
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 512, device=device), nn.ReLU(), nn.Linear(512, 10, device=device))


def step(gpumem, model, optimizer, loss_fn=None):
    x = torch.randn(64, 3, 32, 32, device=gpumem.device)
    y = torch.randint(0, 10, (64,), device=gpumem.device)
    return gpumem.train_step(model, optimizer, x, target=y, loss_fn=loss_fn)


# measured on the emulated backend (torch 2.14.1): peak 24.80 MiB (L1), 18.79 MiB (weight decay);
# budget = the larger peak + 25%, rounded up
@pytest.mark.gpu_budget("31MiB")
def test_l1_penalty_vs_weight_decay(gpumem):
    model = cifar_mlp(gpumem.device)

    def l1_loss(output, target):
        l1 = sum(p.abs().sum() for p in model.parameters())
        return nn.functional.cross_entropy(output, target) + L1_LAMBDA * l1

    l1 = step(gpumem, model, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn=l1_loss)
    wd = step(gpumem, model, torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-4))

    # weight decay keeps no optimizer state ...
    assert wd.category_peak(Category.OPTIMIZER) == 0
    # ... while the L1 term makes forward hold param-sized |p| temporaries that plain cross-entropy does not
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    l1_forward = l1.phases[Phase.FORWARD].peak - l1.phases[Phase.BATCH].retained
    wd_forward = wd.phases[Phase.FORWARD].peak - wd.phases[Phase.BATCH].retained
    assert l1_forward - wd_forward >= 0.9 * n_bytes
    # and the whole step: 24.80 MiB with the L1 term vs 18.79 MiB with weight decay
    assert l1.peak > wd.peak
