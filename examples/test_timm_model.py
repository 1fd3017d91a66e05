"""A timm model under a memory budget: ConvNeXt-Atto (3.7 M parameters), AdamW, 10 classes, 64x64 images.

timm builds the architecture from its name with random weights (``pretrained=False``: nothing downloaded).
Where the memory goes: fp32 weights, gradients and AdamW's two moments (16 B per parameter, ~57 MiB together)
are the fixed part; the foreach AdamW that CUDA runs adds a parameter-sized temporary (sqrt of the second
moment) during the optimizer step; at 16 images of 64x64 the activations saved for backward are larger still,
so the step peaks in backward.

Needs the ``zoo`` extra (``pip install -e '.[zoo]'``); skipped without timm.
"""
import pytest
import torch

from pytest_gpumem import Category, Phase

timm = pytest.importorskip("timm")


# measured on the emulated backend (torch 2.14.1, timm 1.0.31): peak 84.27 MiB; budget = peak + 25%
@pytest.mark.gpu_budget("106MiB")
def test_convnext_atto_adamw(gpumem):
    with torch.device(gpumem.device):
        model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(16, 3, 64, 64, device=gpumem.device)
    labels = torch.randint(0, 10, (16,), device=gpumem.device)

    report = gpumem.train_step(model, optimizer, images, target=labels)

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.category_peak(Category.OPTIMIZER) >= 2 * param_bytes  # two moments per weight
    assert report.phases[Phase.OPTIMIZER].peak >= 4 * param_bytes  # params, grads, moments live at the step
