"""On a GPU: the emulated backend's predictions against the real caching allocator, same models and steps.

Skipped cleanly without a GPU. With GPUMEM_RECORD_RESULTS set, the figures go to
benchmarks/results/cuda_engine_<date>.json.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from gpumem_factories import mlp
from pytest_gpumem import Category, Phase, measure_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
_RECORDED: dict[str, dict] = {}


def mlp_512():
    return mlp(512, 1024, 10)


def cnn_bn_dropout():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.25),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16 * 16, 10),
    )


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=10)


CASES = {
    "mlp": (mlp_512, (64, 512)),
    "cnn_bn_dropout": (cnn_bn_dropout, (32, 3, 32, 32)),
    "resnet18": (resnet18, (16, 3, 64, 64)),
}


def make(case, device):
    make_model, shape = CASES[case]
    torch.manual_seed(0)
    with torch.device(device):
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, torch.randn(*shape), torch.randint(0, 10, (shape[0],))


@pytest.fixture(scope="module", autouse=True)
def record():
    yield
    if os.environ.get("GPUMEM_RECORD_RESULTS") and _RECORDED:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"cuda_engine_{datetime.date.today().isoformat()}.json"
        payload = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cases": _RECORDED,
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")


def real_step_peak(case) -> int:
    """max_memory_allocated over two plain steps, above what was allocated before the model existed."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model, optimizer, x, y = make(case, "cuda")
    x, y = x.cuda(), y.cuda()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, optimizer, x, y
    return peak


@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_predicts_the_real_allocator(case):
    # warm up cuBLAS/cuDNN workspaces (they go through the allocator) before any baseline is taken
    model, optimizer, x, y = make(case, "cpu")
    measure_step(model, optimizer, x, target=y, backend="cuda")
    real = real_step_peak(case)
    model, optimizer, x, y = make(case, "cpu")
    emulated = measure_step(model, optimizer, x, target=y, backend="emulated")
    model, optimizer, x, y = make(case, "cpu")
    cuda = measure_step(model, optimizer, x, target=y, backend="cuda")
    _RECORDED[case] = {
        "real_max_memory_allocated": real,
        "cuda_backend_peak": cuda.peak,
        "emulated_peak": emulated.peak,
        "emulated_over_real": emulated.peak / real,
        "cuda_reserved_peak": cuda.reserved_peak,
        "emulated_reserved_peak": emulated.reserved_peak,
        "emulated_peak_split": {c.value: v for c, v in emulated.peak_split.items()},
        "cuda_peak_split": {c.value: v for c, v in cuda.peak_split.items()},
    }
    assert emulated.peak == pytest.approx(real, rel=0.02)
    assert emulated.peak == pytest.approx(cuda.peak, rel=0.02)


def test_cuda_backend_categories_are_exact():
    model, optimizer, x, y = make("mlp", "cpu")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    report = measure_step(model, optimizer, x, target=y, backend="cuda")
    assert report.backend == "cuda"
    assert report.category_peak(Category.PARAMS) == params
    assert report.category_peak(Category.GRADS) == params
    # AdamW's step counters stay on the CPU: the device holds exactly the two moments
    assert report.category_peak(Category.OPTIMIZER) == 2 * params
    assert report.steps[-1].phases[Phase.ZERO_GRAD].retained_split[Category.GRADS] == 0
    assert report.reserved_peak >= report.peak
