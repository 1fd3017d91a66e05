"""The estimate does not care how a step is written: a hypothesis family of coding styles (ci profile)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gpumem import measure_step
from pytest_gpumem._core.categories import Category
from pytest_gpumem._estimate import estimate_step
from pytest_gpumem._tools.coding_styles import CodingStyleConfig, coding_style_configs, style_loss
from pytest_gpumem._tools.contradiction import compare


def _both(config: CodingStyleConfig, batch_size: int, backend: str):
    torch.manual_seed(0)
    model = config.build()
    inputs, target = config.make_batch(batch_size)
    rep = measure_step(model, torch.optim.Adam(model.parameters()), inputs, target=target, loss_fn=style_loss,
                       backend=backend)
    est = estimate_step(model, torch.optim.Adam(model.parameters()), inputs, target=target, loss_fn=style_loss,
                        device="cpu" if backend == "cpu" else "cuda")
    return rep, est


@pytest.mark.parametrize("backend", ["cpu", "emulated"])
@settings(deadline=None)
@given(config=coding_style_configs(large=(64, 256)), batch_size=st.integers(1, 64))
def test_every_coding_style_agrees_within_2_percent_or_256_kib(config, batch_size, backend):
    rep, est = _both(config, batch_size, backend)
    result = compare(rep, est, 0.02)
    assert result.ok, f"{config}\n{result.message}"


@pytest.mark.parametrize("container", ["tuple", "list", "dict", "namedtuple", "dataclass"])
def test_the_batch_container_changes_nothing(container):
    # the case: two 1024 x 256 inputs, once -12% in every container; 1024 x 256 fp32 = 1 MiB each
    config = CodingStyleConfig(functional=False, container=container, d_in=256, width=256, classes=10,
                               returns_loss=False)
    rep, est = _both(config, 1024, "cpu")
    # two fp32 inputs and the int64 labels: 2 x 1024 x 256 x 4 + 1024 x 8 = 2,105,344 B
    assert est.batch == rep.category_peak(Category.BATCH) == 2 * 1024 * 256 * 4 + 1024 * 8
    assert compare(rep, est, 0.02).ok, compare(rep, est, 0.02).message
