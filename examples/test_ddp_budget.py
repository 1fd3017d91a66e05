"""Data-parallel training with DistributedDataParallel: what one rank holds, budgeted per GPU.

An MLP for 784-pixel images (784-512-512-10, Ψ = 669,706 parameters, 2.68 MB in fp32), AdamW, a global
batch of 128 split over 2 ranks (64 each). DDP keeps the whole model on every rank, and with torch's default
``gradient_as_bucket_view=False`` its gradient buckets are a second copy of every gradient:
params 4Ψ + grads 4Ψ + buckets 4Ψ + AdamW 8Ψ = 20Ψ = 13.4 MB per rank before any activation.
Run on a CPU-only machine with real gloo ranks: ``pytest examples/test_ddp_budget.py --gpumem-backend=cpu``.
"""
import pytest
import torch
from torch import nn

from pytest_gpumem import DDP, Category, Phase


def mnist_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def ddp_step(gpumem):
    """One AdamW step of the MLP on a global batch of 128 images, laid out by the marker's DDP; (result, Ψ)."""
    model = mnist_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    result = gpumem.train_step(model, optimizer, images, target=labels)
    return result, sum(p.numel() for p in model.parameters())


# measured with gloo ranks on the cpu backend (torch 2.14.1): peak 16.03 MiB (16.8 MB) per rank; budget = peak + 25%
@pytest.mark.gpu_budget("21MB", parallel=DDP(world_size=2))
def test_ddp_rank_budget(gpumem):
    result, psi = ddp_step(gpumem)
    for report in result.ranks:  # every rank holds the same: DDP replicates
        after_backward = report.steps[-1].phases[Phase.BACKWARD].retained_split
        # .grad (4Ψ) plus the buckets beside it (4Ψ)
        assert after_backward[Category.GRADS] == 2 * 4 * psi
        # the buckets live from DDP's construction on, so the peak holds them too: 4Ψ = 2,678,824 B
        assert report.phases[report.peak_phase].peak_parts["grads: gradient buckets"] == 4 * psi


@pytest.mark.gpu_budget("21MB", parallel=DDP(world_size=2, gradient_as_bucket_view=True))
def test_ddp_bucket_views_save_a_copy_of_the_gradients(gpumem):
    result, psi = ddp_step(gpumem)
    # the .grad tensors are views into the buckets: one copy, 4Ψ
    assert result.ranks[0].steps[-1].phases[Phase.BACKWARD].retained_split[Category.GRADS] == 4 * psi
