"""The cpu backend against closed-form byte counts: params, grads, optimizer state and batch, exactly."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gpumem_factories import mlp
from pytest_gpumem import Category, Phase, measure_step

F32 = 4


def cnn(channels=6, side=8, classes=5):
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels * (side // 2) ** 2, classes),
    )


MODELS = {
    "mlp": (lambda: mlp(32, 24, 5), lambda n: torch.randn(n, 32)),
    "cnn": (cnn, lambda n: torch.randn(n, 3, 8, 8)),
}
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def expected_optimizer_bytes(name: str, params: list[torch.Tensor], *, step_on_device: bool) -> int:
    """Closed form: SGD keeps nothing; momentum one buffer per param; Adam(W) two moments per param
    plus a 0-d float32 ``step`` per param, which is only on the measured device on the cpu backend."""
    p = nbytes(params)
    if name == "sgd":
        return 0
    if name == "sgd_momentum":
        return p
    return 2 * p + (len(params) * F32 if step_on_device else 0)


def run(model_name, opt_name, batch_size=4, backend="cpu"):
    torch.manual_seed(0)
    make_model, make_batch = MODELS[model_name]
    model = make_model()
    params = list(model.parameters())
    buffers = list(model.buffers())
    x, y = make_batch(batch_size), torch.randint(0, 5, (batch_size,))
    report = measure_step(model, OPTIMIZERS[opt_name](params), x, target=y, backend=backend)
    return report, params, buffers, (x, y)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_categories_equal_closed_form_sums(model_name, opt_name):
    report, params, buffers, batch = run(model_name, opt_name)
    param_bytes = nbytes(params) + nbytes(buffers)  # BatchNorm: running mean/var (f32) + num_batches_tracked (i64)
    opt_bytes = expected_optimizer_bytes(opt_name, params, step_on_device=True)

    assert report.category_peak(Category.PARAMS) == param_bytes
    assert report.category_peak(Category.GRADS) == nbytes(params)
    assert report.category_peak(Category.OPTIMIZER) == opt_bytes
    assert report.category_peak(Category.BATCH) == nbytes(batch)
    assert report.category_peak(Category.OTHER) == 0  # nothing is rounded on the cpu

    first, steady = report.steps
    # optimizer state appears in the first step's optimizer phase and stays
    assert first.phases[Phase.FORWARD].retained_split[Category.OPTIMIZER] == 0
    assert first.phases[Phase.OPTIMIZER].retained_split[Category.OPTIMIZER] == opt_bytes
    for phase in steady.phases.values():
        assert phase.retained_split[Category.OPTIMIZER] == opt_bytes
    # what a step leaves behind: params, optimizer state and the batch; grads were set to None
    end = steady.phases[Phase.ZERO_GRAD]
    assert end.retained == param_bytes + opt_bytes + nbytes(batch)
    assert end.retained_split[Category.GRADS] == 0
    assert end.retained_split[Category.ACTIVATIONS] == 0
    # after backward every parameter has its grad and the activations are gone
    after_backward = steady.phases[Phase.BACKWARD].retained_split
    assert after_backward[Category.GRADS] == nbytes(params)
    assert after_backward[Category.ACTIVATIONS] == 0


def test_setup_holds_what_existed_before_the_step_the_batch_phase_what_it_copied():
    """On the cpu backend the batch is already on the device: it existed before the step, so it belongs
    to setup (chronology), and the batch phase copies nothing."""
    report, params, buffers, batch = run("cnn", "sgd")
    setup, batch_phase = report.steps[0].phases[Phase.SETUP], report.steps[0].phases[Phase.BATCH]
    assert setup.retained == nbytes(params) + nbytes(buffers) + nbytes(batch)
    assert setup.retained_split[Category.BATCH] == nbytes(batch)
    assert batch_phase.retained == setup.retained


def test_batch_phase_holds_the_copy_of_a_batch_from_another_device():
    """The emulated backend copies a CPU batch to the (meta) device during the batch phase."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    x = torch.randn(4, 16)
    report = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, backend="emulated")
    setup, batch_phase = report.steps[0].phases[Phase.SETUP], report.steps[0].phases[Phase.BATCH]
    assert setup.retained_split[Category.BATCH] == 0
    assert batch_phase.retained_split[Category.BATCH] == x.numel() * x.element_size()


def test_mlp_activations_closed_form():
    """Linear-ReLU-Linear with cross-entropy: ReLU's output (= the second Linear's input) is the only
    activation of the model; cross-entropy saves the log-softmax output, one (batch, classes) tensor,
    and nll_loss its 0-d float32 ``total_weight``."""
    batch_size = 4
    report, params, buffers, batch = run("mlp", "sgd", batch_size)
    forward = report.steps[-1].phases[Phase.FORWARD]
    assert forward.retained_split[Category.ACTIVATIONS] == (batch_size * 24 + batch_size * 5 + 1) * F32


@given(
    d_in=st.integers(1, 48), hidden=st.integers(1, 48), d_out=st.integers(1, 12), batch_size=st.integers(1, 8),
    momentum=st.booleans(),
)
def test_any_mlp_shape_matches_closed_form(d_in, hidden, d_out, batch_size, momentum):
    torch.manual_seed(0)
    model = mlp(d_in, hidden, d_out)
    params = list(model.parameters())
    x = torch.randn(batch_size, d_in)
    report = measure_step(model, torch.optim.SGD(params, lr=0.01, momentum=0.9 if momentum else 0), x, backend="cpu")
    p = (d_in * hidden + hidden + hidden * d_out + d_out) * F32
    assert report.category_peak(Category.PARAMS) == p
    assert report.category_peak(Category.GRADS) == p
    assert report.category_peak(Category.OPTIMIZER) == (p if momentum else 0)
    assert report.category_peak(Category.BATCH) == batch_size * d_in * F32
    assert report.peak >= 2 * p + batch_size * d_in * F32
