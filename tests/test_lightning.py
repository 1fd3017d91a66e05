"""Measuring a LightningModule's training_step, as the README shows (lightning is an optional extra)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_gpumem import measure_step
from pytest_gpumem._core.categories import Category, Phase

lightning = pytest.importorskip("lightning")


class Classifier(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # no Trainer attached: Lightning warns and carries on
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class TrainingStep(nn.Module):
    """The README's wrapper: forward(batch) is the LightningModule's training_step (it returns the loss)."""

    def __init__(self, module: lightning.LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module.training_step(batch, 0)


@pytest.mark.filterwarnings("ignore:You are trying to")
@pytest.mark.parametrize("backend", ["cpu", "emulated"])
def test_training_step_of_a_lightning_module_is_measured(backend):
    torch.manual_seed(0)
    module = Classifier()
    batch = (torch.randn(32, 20), torch.randint(0, 5, (32,)))
    report = measure_step(TrainingStep(module), module.configure_optimizers(), (batch,), backend=backend)
    n_params = sum(p.numel() for p in module.parameters())  # 20*64+64 + 64*5+5 = 1669
    assert n_params == 1669
    step = report.steps[-1]
    assert step.phases[Phase.BACKWARD].retained_split[Category.GRADS] == 4 * n_params
    # AdamW's two fp32 moments per parameter, plus on the cpu a 0-d fp32 `step` for each of the 4 parameter tensors
    # (on CUDA, the emulated backend's device, the counters stay on the host)
    counters = 4 * 4 if backend == "cpu" else 0
    assert step.phases[Phase.OPTIMIZER].retained_split[Category.OPTIMIZER] == 2 * 4 * n_params + counters
    assert report.category_peak(Category.BATCH) == 32 * 20 * 4 + 32 * 8  # x: 32 x 20 fp32, y: 32 int64
