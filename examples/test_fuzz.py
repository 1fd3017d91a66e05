"""A hypothesis-fuzzed budget: every MLP in a family, at every batch size up to 64, fits the budget.

One hand-picked model says little about its neighbours; hypothesis draws MLPs (1-4 hidden layers up
to 512 wide, up to 512 inputs, up to 16 classes, optional Dropout), batch sizes and optimizers, and
every drawn step is measured and checked against the gpu_budget -- a failure shrinks to the smallest
model that breaks it. The largest member (4 x 512 wide, Adam, batch 64) peaks at 20.32 MiB on the
emulated backend; the budget is that + 25%, rounded up.
Besides the budget, a property that holds for every member: an optimizer step with Adam holds the
parameters, their gradients and both moments at once -- at least 16 bytes per fp32 parameter.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from pytest_gpumem import Category, Phase, parse_bytes
from pytest_gpumem import strategies as gst

BUDGET = "25.5MiB"
BUDGET_BYTES = parse_bytes(BUDGET)


@pytest.mark.gpu_budget(BUDGET)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=gst.mlp_configs(max_depth=4, max_width=512, max_in_features=512),
       batch_size=gst.batch_sizes(max_value=64),
       make_optimizer=gst.optimizers(kinds=["sgd", "sgd_momentum", "adam", "adamw"]))
def test_mlp_family_fits_budget(gpumem, config, batch_size, make_optimizer):
    model = config.build(gpumem.device)
    optimizer = make_optimizer(model.parameters())
    inputs, target = config.make_batch(batch_size, gpumem.device)

    report = gpumem.train_step(model, optimizer, inputs, target=target)  # checked against the budget

    n_params = sum(p.numel() for p in model.parameters())
    if make_optimizer.cls.__name__ in ("Adam", "AdamW"):
        at_step = report.phases[Phase.OPTIMIZER].peak_split
        held = sum(at_step[c] for c in (Category.PARAMS, Category.GRADS, Category.OPTIMIZER))
        assert held >= 16 * n_params


def test_largest_member_fits_with_headroom(gpumem):
    """The family's worst case, measured on every run: the budget above must keep 25% headroom over it."""
    config = gst.MLPConfig(in_features=512, widths=(512,) * 4, out_features=16)
    model = config.build(gpumem.device)
    inputs, target = config.make_batch(64, gpumem.device)

    report = gpumem.train_step(model, torch.optim.Adam(model.parameters()), inputs, target=target)

    assert report.peak * 1.25 <= BUDGET_BYTES
