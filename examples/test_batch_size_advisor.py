"""How big a batch fits? The advisor answers from three small probe steps, without OOM trials.

The course's advice -- "start at 16, double until it runs out of memory, keep ~80%" -- needs a GPU
and many crashes. ``gpumem.max_batch_size`` measures the step at batch sizes 2, 4 and 8, fits
memory = fixed + per_sample x batch for every allocation of the step, and solves for the largest
batch whose peak stays within safety x budget (safety defaults to 0.8, the same 80% rule).
Here: the CIFAR-10 MLP 3072-128-10 with Adam against a 64 MiB budget.
"""
import pytest
import torch
from torch import nn


def make_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 128), nn.ReLU(), nn.Linear(128, 10))


# the budget is the device memory the job may use (peak at the advised batch: 51.20 MiB = 80% of it)
@pytest.mark.gpu_budget("64MiB")
def test_max_batch_size_cifar_mlp(gpumem):
    def model_factory():
        with torch.device(gpumem.device):
            return make_model()

    def make_batch(batch_size):
        return (torch.randn(batch_size, 3, 32, 32, device=gpumem.device),
                torch.randint(0, 10, (batch_size,), device=gpumem.device))

    def adam(params):
        return torch.optim.Adam(params, lr=1e-3)

    batch = gpumem.max_batch_size(model_factory, adam, make_batch)  # budget: the marker's 64 MiB
    assert batch >= 16  # the course's starting point fits with room to spare

    # check the advice: the step at that batch fits 80% of the budget, a slightly larger one does not
    usable = 0.8 * 64 * 2**20
    for batch_size, fits in ((batch, True), (batch + 8, False)):
        model = model_factory()
        images, labels = make_batch(batch_size)
        report = gpumem.train_step(model, adam(model.parameters()), images, target=labels)
        assert (report.peak <= usable) is fits
