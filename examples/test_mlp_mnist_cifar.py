"""The course's first two models, MLPs with Adam: MNIST 784-128-10 and CIFAR-10 3072-128-10.

Where the memory goes (fp32, 4 B per element):
- params: 101,770 (MNIST) / 394,634 (CIFAR) parameters -> 407,080 B / 1,578,536 B;
- grads: the same again, from backward on;
- optimizer: Adam keeps two moments per parameter (exp_avg, exp_avg_sq) -> 2x params;
- batch: 64 x 1 x 28 x 28 x 4 B = 196 KiB (MNIST) / 64 x 3 x 32 x 32 x 4 B = 768 KiB (CIFAR);
- activations: tiny for a 128-wide hidden layer (64 x 128 x 4 B = 32 KiB).
The peak falls in optimizer.step(): CUDA's default multi-tensor ("foreach") Adam adds
param-sized temporaries on top of params + grads + two moments.

Data comes from torchvision's FakeData (random images, nothing downloaded). Models are built on
``gpumem.device``: a real GPU when there is one, the emulated CUDA device (meta tensors) otherwise.
"""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pytest_gpumem import Category


def mlp(in_features: int, device: torch.device) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 128, device=device),
        nn.ReLU(),
        nn.Linear(128, 10, device=device),
    )


def fake_loader(image_size, batch_size=64):
    """FakeData stands in for MNIST/CIFAR-10: same shapes, random pixels, no download."""
    data = datasets.FakeData(size=batch_size, image_size=image_size, num_classes=10, transform=transforms.ToTensor())
    return DataLoader(data, batch_size=batch_size)


# measured on the emulated backend (torch 2.14.1): peak 2.14 MiB; budget = peak + 25%, rounded up
@pytest.mark.gpu_budget("2.7MiB")
def test_mnist_mlp_adam(gpumem):
    model = mlp(784, gpumem.device)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 101_770  # 784*128 + 128 + 128*10 + 10, as torchsummary shows it
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = next(iter(fake_loader((1, 28, 28))))

    report = gpumem.train_step(model, optimizer, images, target=labels)

    # fp32: 4 B per parameter, rounded up to the allocator's 512-B blocks per tensor
    assert report.category_peak(Category.PARAMS) >= n_params * 4
    # Adam: exp_avg + exp_avg_sq, one fp32 value each per parameter
    assert report.category_peak(Category.OPTIMIZER) >= 2 * n_params * 4


# measured on the emulated backend (torch 2.14.1): peak 8.28 MiB; budget = peak + 25%, rounded up
@pytest.mark.gpu_budget("10.5MiB")
def test_cifar10_mlp_adam(gpumem):
    model = mlp(3 * 32 * 32, gpumem.device)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 3072 * 128 + 128 + 128 * 10 + 10  # 394,634: 3.9x the MNIST MLP
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = next(iter(fake_loader((3, 32, 32))))

    report = gpumem.train_step(model, optimizer, images, target=labels)

    assert report.category_peak(Category.OPTIMIZER) >= 2 * n_params * 4
