"""A small CNN for 3x32x32 images (two conv blocks with BatchNorm, then a linear head), SGD + momentum.

Where the memory goes (batch 64, fp32): unlike the MLPs, the parameters are small (~0.3 M) and the
activations dominate -- every conv, BatchNorm and ReLU output at full 32x32 / 16x16 resolution is
kept for backward: 64 x 32 x 32 x 32 x 4 B = 8 MiB per full-resolution 32-channel map.
Momentum SGD keeps one buffer per parameter.
"""
import pytest
import torch
from torch import nn

from pytest_gpumem import Category, Phase


def small_cnn(device: torch.device) -> nn.Module:
    def block(c_in, c_out):
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, device=device),
            nn.BatchNorm2d(c_out, device=device),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(3, 32), *block(32, 64),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * 8 * 8, 64, device=device),
        nn.ReLU(),
        nn.Linear(64, 10, device=device),
    )


# measured on the emulated backend (torch 2.14.1): peak 41.92 MiB; budget = peak + 25%, rounded up
@pytest.mark.gpu_budget("53MiB")
def test_small_cnn_sgd_momentum(gpumem):
    model = small_cnn(gpumem.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(64, 3, 32, 32, device=gpumem.device)
    labels = torch.randint(0, 10, (64,), device=gpumem.device)

    report = gpumem.train_step(model, optimizer, images, target=labels)

    # for a CNN the saved activations, not the weights, are what grows: they outweigh params 10x here
    forward = report.phases[Phase.FORWARD].retained_split
    assert forward[Category.ACTIVATIONS] > 10 * forward[Category.PARAMS]
