"""Optimizers and training idioms on every CPU-runnable backend: closures, model-computed losses, sparse
gradients, tensor learning rates, compiled models, batches that repeat a tensor."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gpumem_factories import mlp as make_mlp
from pytest_gpumem import estimate_step, measure_step
from pytest_gpumem._core.categories import Category, Phase
from pytest_gpumem._core.step_calls import COMPILED_NOTE
from pytest_gpumem._emulation.optimizers import predict_cuda_optimizer
from pytest_gpumem._emulation.values import SPARSE_NOTE

BACKENDS = ("cpu", "emulated")


def mlp() -> nn.Module:
    return make_mlp(16, 32, 4, activation=nn.Tanh, seed=0)  # (16 + 1) * 32 + (32 + 1) * 4 = 676 parameters


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# -- optimizers whose step takes a closure --------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_lbfgs_step_runs_with_a_closure_and_phases_in_order(backend):
    model = mlp()
    report = measure_step(model, torch.optim.LBFGS(model.parameters(), max_iter=4), torch.randn(8, 16),
                          target=torch.randint(0, 4, (8,)), backend=backend)
    for step in report.steps:  # the first closure call is forward + backward; re-evaluations are the optimizer's
        assert [p for p in step.phases if p not in (Phase.SETUP, Phase.BATCH)] == \
            [Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER, Phase.ZERO_GRAD]
    n_params = sum(p.numel() for p in model.parameters())
    # the first closure call's backward leaves one fp32 grad per parameter
    assert report.steps[0].phases[Phase.BACKWARD].retained_split[Category.GRADS] == 4 * n_params


def test_lbfgs_history_counts_as_optimizer_state_on_the_cpu():
    model = mlp()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=4)
    report = measure_step(model, optimizer, torch.randn(8, 16), target=torch.randint(0, 4, (8,)), backend="cpu")
    state = [t for s in optimizer.state.values() for v in s.values()
             for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)]
    assert any(isinstance(v, list) and v for s in optimizer.state.values() for v in s.values())  # history kept
    retained = report.steps[-1].phases[Phase.OPTIMIZER].retained_split[Category.OPTIMIZER]
    assert retained == storage_bytes(state)


def test_a_closure_optimizer_with_a_grad_scaler_is_refused_clearly():
    model = mlp()
    with pytest.raises(Exception, match="closure.*GradScaler|GradScaler.*closure"):
        measure_step(model, torch.optim.LBFGS(model.parameters()), torch.randn(8, 16), backend="emulated", scaler=True)


# -- models that compute their own loss -----------------------------------------------------------
class Output:
    """A model output with a ``.loss`` attribute, like Hugging Face's ModelOutput (one class, no cycles)."""

    def __init__(self, loss, logits) -> None:
        self.loss, self.logits = loss, logits


class ReturnsLoss(nn.Module):
    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.net, self.as_dict = mlp(), as_dict

    def forward(self, x, labels):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels)
        if self.as_dict:
            return {"loss": loss, "logits": logits}
        return Output(loss, logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_dict", [True, False])
def test_a_model_returning_its_loss_needs_no_loss_fn_and_dict_batches_are_keywords(backend, as_dict):
    batch = {"x": torch.randn(8, 16), "labels": torch.randint(0, 4, (8,))}
    own = ReturnsLoss(as_dict)
    implicit = measure_step(own, torch.optim.SGD(own.parameters(), lr=0.1), batch, backend=backend)
    explicit = measure_step(own, torch.optim.SGD(own.parameters(), lr=0.1), batch, backend=backend,
                            loss_fn=lambda out, _: out["loss"] if as_dict else out.loss)
    assert implicit.steps[-1].peak == explicit.steps[-1].peak
    assert implicit.steps[-1].peak_split == explicit.steps[-1].peak_split


def test_an_output_without_a_loss_asks_for_loss_fn():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return {"logits": self.net(x)}

    model = Pair()
    with pytest.raises(Exception, match="loss_fn"):
        measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 16), backend="cpu")


# -- batches --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_tensor_as_batch_and_target_counts_once(backend):
    model = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(8, 16)
    report = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, target=x, backend=backend)
    assert report.steps[0].phases[Phase.BATCH].retained_split[Category.BATCH] == 8 * 16 * 4  # one copy of x


# -- optimizer implementations --------------------------------------------------------------------
def test_adam_with_a_tensor_lr_keeps_the_loop_as_cuda_does():
    model = mlp()
    tensor_lr = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3))
    with predict_cuda_optimizer(tensor_lr):
        assert tensor_lr.param_groups[0]["foreach"] is None  # adam.py: no foreach for Tensor lr, capturable=False
    loop = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(8, 16)
    a = measure_step(model, tensor_lr, x, backend="emulated")
    b = measure_step(model, loop, x, backend="emulated")
    assert a.steps[-1].phases[Phase.OPTIMIZER].peak == b.steps[-1].phases[Phase.OPTIMIZER].peak


def test_sparse_gradients_count_as_grads_on_the_cpu_and_are_noted_on_emulated():
    model = nn.Sequential(nn.Embedding(1000, 16, sparse=True))
    ids = torch.randint(0, 1000, (8, 4))
    cpu = measure_step(model, torch.optim.SparseAdam(model.parameters()), ids, backend="cpu")
    # an uncoalesced COO grad: int64 indices (1, 32) = 256 B and fp32 values (32, 16) = 2048 B
    assert cpu.steps[-1].phases[Phase.BACKWARD].retained_split[Category.GRADS] == 256 + 2048
    emulated = measure_step(model, torch.optim.SparseAdam(model.parameters()), ids, backend="emulated")
    assert SPARSE_NOTE in emulated.notes


# -- torch.compile --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_model_is_measured_and_estimated_as_its_eager_graph_and_says_so(backend):
    eager = mlp()
    compiled = torch.compile(eager)
    x = torch.randn(8, 16)
    report = measure_step(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1), x, backend=backend)
    reference = measure_step(eager, torch.optim.SGD(eager.parameters(), lr=0.1), x, backend=backend)
    assert COMPILED_NOTE in report.notes and COMPILED_NOTE not in reference.notes
    assert report.steps[-1].peak == reference.steps[-1].peak
    estimate = estimate_step(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1), x)
    assert COMPILED_NOTE in estimate.notes
