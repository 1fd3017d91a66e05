"""torch's own MemTracker as an independent oracle for the cpu backend's peak.

MemTracker (torch.distributed._tools.mem_tracker, a private API) is a TorchDispatchMode that tracks
storages per device; it tracks real CPU tensors, so it runs the same real CPU step here (no
FakeTensorMode needed). Its own tests accept +-10% against the real peak; we ask for 5%.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gpumem_factories import mlp
from pytest_gpumem import Category, measure_step

mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")


def mlp_128():
    return mlp(128, 256, 10)


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )


CASES = {
    "mlp-adamw": (mlp_128, (16, 128), lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
    "mlp-sgd-momentum": (mlp_128, (16, 128), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "cnn-adam": (cnn, (8, 3, 16, 16), lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    "cnn-sgd": (cnn, (8, 3, 16, 16), lambda ps: torch.optim.SGD(ps, lr=0.1)),
}


def make(case):
    make_model, shape, make_opt = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    return model, make_opt(model.parameters()), x, y


def memtracker_peak(model, optimizer, x, y, steps=2) -> dict:
    tracker = mem_tracker.MemTracker()
    tracker.track_external(model, optimizer, x, y)
    with tracker:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad()
            tracker.reset_mod_stats()  # it refuses a second forward of the same module otherwise
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_peak_agrees_with_torch_memtracker(case):
    model, optimizer, x, y = make(case)
    ours = measure_step(model, optimizer, x, target=y, backend="cpu", steps=2)
    model, optimizer, x, y = make(case)
    theirs = memtracker_peak(model, optimizer, x, y)
    assert ours.peak == pytest.approx(theirs["Total"], rel=0.05)
    # the static parts are the same bytes in both tools' words
    param_key = mem_tracker._MemRefType.PARAM
    assert ours.category_peak(Category.PARAMS) == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert theirs[param_key] == sum(p.numel() * p.element_size() for p in model.parameters())
