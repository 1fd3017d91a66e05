"""A hypothesis-fuzzed budget: every MLP in a family, at every batch size up to 64, fits the budget
and agrees with the analytical estimate.

One hand-picked model says little about its neighbours. ``gpumem.fuzz`` draws MLPs (1-4 hidden layers
64-512 wide, 64-512 inputs, up to 16 classes, optional Dropout), batch sizes and optimizers; each drawn
step is measured, estimated and checked against the gpu_budget, and a failure shrinks to the smallest
model and batch that break it. The largest member (4 x 512 wide, Adam, batch 64) peaks at 20.32 MiB on
the emulated backend; the budget is that + 25%, rounded up.
"""
import pytest
import torch
from hypothesis import settings

from pytest_gpumem import parse_bytes
from pytest_gpumem import strategies as gst

BUDGET = "25.5MiB"
BUDGET_BYTES = parse_bytes(BUDGET)


@pytest.mark.gpu_budget(BUDGET)
def test_mlp_family_fits_budget_and_matches_estimate(gpumem):
    """gpumem.fuzz draws models, batch sizes and optimizers; every example is measured, estimated and
    checked against the budget. A failure is shrunk to the smallest MLP and batch that break it."""
    result = gpumem.fuzz(
        gst.mlp_configs(min_width=64, max_depth=4, max_width=512, min_in_features=64, max_in_features=512),
        batch_sizes=gst.batch_sizes(max_value=64),
        optimizer=gst.optimizers(kinds=["sgd", "sgd_momentum", "adam", "adamw"]),
        rtol=0.05,
        # the same 15 examples on every run, so the committed CI baseline (examples/ci/) stays comparable
        settings=settings(max_examples=15, derandomize=True, database=None, deadline=None),
    )
    assert result.examples >= 15  # every drawn step was measured (and each one fit the budget)
    assert max(result.peaks) <= BUDGET_BYTES


def test_largest_member_fits_with_headroom(gpumem):
    """The family's worst case, measured on every run: the budget above must keep 25% headroom over it."""
    config = gst.MLPConfig(in_features=512, widths=(512,) * 4, out_features=16)
    model = config.build(gpumem.device)
    inputs, target = config.make_batch(64, gpumem.device)

    report = gpumem.train_step(model, torch.optim.Adam(model.parameters()), inputs, target=target)

    assert report.peak * 1.25 <= BUDGET_BYTES
