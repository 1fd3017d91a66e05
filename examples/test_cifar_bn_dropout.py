"""The course's CIFAR-10 project MLP: 3072-1024-512-256-10 with BatchNorm and Dropout, trained with AdamW.

Where the memory goes (batch 128, fp32):
- params: 3,805,450 Linear weights and biases + 3,584 BatchNorm weights and biases = 3,809,034
  parameters = 15.2 MB (plus the BatchNorm running mean/var/count buffers);
- grads: the same again; optimizer: AdamW's two moments = 2x params;
- activations: each hidden layer keeps its Linear input, BatchNorm input and statistics, ReLU
  output and the Dropout mask -- on CUDA the mask is 1 byte per element (a bool tensor);
- batch: 128 x 3 x 32 x 32 x 4 B = 1.5 MiB.
"""
import pytest
import torch
from torch import nn

from pytest_gpumem import Category, Phase


def cifar_mlp(device: torch.device, p_drop: float = 0.5) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [3 * 32 * 32, 1024, 512, 256]
    for d_in, d_out in zip(widths, widths[1:]):
        layers += [
            nn.Linear(d_in, d_out, device=device),
            nn.BatchNorm1d(d_out, device=device),
            nn.ReLU(),
            nn.Dropout(p_drop),
        ]
    layers.append(nn.Linear(widths[-1], 10, device=device))
    return nn.Sequential(*layers)


# measured on the emulated backend (torch 2.14.1): peak 74.17 MiB, activations at most 2.86 MiB;
# budget = peak + 25%, rounded up, and a per-category budget on the activations (2.86 MiB + 25%)
@pytest.mark.gpu_budget("93MiB", activations="3.6MiB")
def test_cifar10_bn_dropout_mlp_adamw(gpumem):
    model = cifar_mlp(gpumem.device)
    assert sum(p.numel() for p in model.parameters()) == 3_809_034
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    images = torch.randn(128, 3, 32, 32, device=gpumem.device)
    labels = torch.randint(0, 10, (128,), device=gpumem.device)

    report = gpumem.train_step(model, optimizer, images, target=labels)

    # the model state (params + grads + 2 moments = 16 B/param) dwarfs the activations at this batch size
    forward = report.phases[Phase.FORWARD].retained_split
    assert forward[Category.ACTIVATIONS] < report.category_peak(Category.PARAMS) / 4
