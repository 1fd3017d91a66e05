"""torchvision's ResNet-18 (11.7 M parameters, 10 classes) with SGD + momentum on 64x64 images, batch 8.

Where the memory goes (fp32): params 44.7 MB, grads the same, one momentum buffer the same again
(3 x 44.7 MB = the fixed part); activations grow with batch x height x width -- at 64x64 they are
small, at 224x224 they are 12x larger and dominate. Small images keep the CPU-only run fast.
"""
import pytest
import torch
from torchvision.models import resnet18

from pytest_gpumem import Category


# measured on the emulated backend (torch 2.14.1): peak 171.06 MiB; budget = peak + 25%, rounded up
@pytest.mark.gpu_budget("214MiB")
def test_resnet18_sgd_momentum(gpumem):
    with torch.device(gpumem.device):  # build the weights straight on the GPU / emulated device
        model = resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(8, 3, 64, 64, device=gpumem.device)
    labels = torch.randint(0, 10, (8,), device=gpumem.device)

    report = gpumem.train_step(model, optimizer, images, target=labels)

    n_params = sum(p.numel() for p in model.parameters())
    # one momentum buffer per parameter, created on the first step
    assert report.category_peak(Category.OPTIMIZER) >= n_params * 4
