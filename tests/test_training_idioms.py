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
from pytest_gpumem._cuda_facts.rnn import RESERVE_NOTE
from pytest_gpumem._emulation.library_allocations import LIBRARY_NOTES
from pytest_gpumem._emulation.optimizers import LBFGS_NOTE, predict_cuda_optimizer
from pytest_gpumem._emulation.values import KnownValues
from pytest_gpumem._measure.allocator import round_allocation
from pytest_gpumem._measure.tracker import StorageTracker

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


def test_emulated_lbfgs_takes_its_longest_step_and_matches_a_cpu_step_that_does_not_converge():
    # Before: the unknown gradient read as ones looked like an ascent direction (g.d > 0), so the emulated loop
    # stopped after one evaluation and kept a third of the history a real step keeps (3.28 vs 7.02 MB peak).
    states, evals = {}, None
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 4))
        optimizer = torch.optim.LBFGS(model.parameters(), max_iter=4)
        report = measure_step(model, optimizer, torch.randn(64, 256), target=torch.randint(0, 4, (64,)),
                              backend=backend, steps=3)
        states[backend] = [s.phases[Phase.OPTIMIZER].retained_split[Category.OPTIMIZER] for s in report.steps]
        if backend == "cpu":
            evals = optimizer.state[optimizer._params[0]]["func_evals"]
        else:
            assert tuple(n for n in report.notes if n not in LIBRARY_NOTES) == (LBFGS_NOTE,)  # (no GPU named: a note)
    assert evals == 3 * 4  # the real steps did not converge: every one ran max_iter = 4 evaluations
    # later steps append a curvature pair at each of their 4 iterations: two flat fp32 vectors of
    # n = 256*512 + 512 + 512*4 + 4 = 133636 floats each (8 x 534544 B), and a few 0-d tensors (ro, H_diag)
    assert states["emulated"] == states["cpu"]
    growth = states["cpu"][2] - states["cpu"][1]
    assert states["cpu"][1] - states["cpu"][0] == growth and 0 <= growth - 8 * 133636 * 4 < 512


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


class SparseBag(nn.Module):
    """An Embedding(sparse=True) feeding a dense head: the classic sparse-gradient setup."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(1000, 64, sparse=True), nn.Linear(64, 4)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def sparse_step(optimizer: str, backend: str):
    torch.manual_seed(0)
    model = SparseBag()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.SparseAdam(list(model.emb.parameters())))
    ids = torch.tensor([[3, 1, 3, 7], [7, 9, 2, 3]])  # 8 ids, 5 distinct (1, 2, 3, 7, 9)
    return measure_step(model, opt, ids, target=torch.tensor([0, 1]), backend=backend)


@pytest.mark.parametrize("optimizer", ["sgd", "sparse_adam"])
def test_sparse_gradients_count_their_indices_and_values_as_grads_on_both_backends(optimizer):
    cpu, emulated = sparse_step(optimizer, "cpu"), sparse_step(optimizer, "emulated")
    # an uncoalesced COO grad (embedding_sparse_backward, the same code on CPU and CUDA): int64 indices (1, 8)
    # = 64 B and fp32 values (8, 64) = 2048 B; the dense head's grads 4 * 64 * 4 + 4 * 4 = 1040 B
    for report in (cpu, emulated):
        grads = report.steps[-1].phases[Phase.BACKWARD].retained_split[Category.GRADS]
        assert grads == 64 + 2048 + 1040, (report.backend, grads)
    # the ids come from the batch: how many are distinct is known (the library notes aside: no GPU named)
    assert [n for n in emulated.notes if n not in LIBRARY_NOTES] == []
    if optimizer == "sparse_adam":  # dense exp_avg and exp_avg_sq: 2 x 1000 x 64 x 4 = 512000 B on both
        for report in (cpu, emulated):
            assert report.steps[-1].phases[Phase.OPTIMIZER].retained_split[Category.OPTIMIZER] == 512000


def test_coalescing_allocates_what_the_cuda_kernel_does_from_known_or_assumed_indices():
    with StorageTracker("meta", round_allocation) as tracker:
        with KnownValues() as mode:
            indices = torch.tensor([[3, 1, 3, 7]]).to("meta")
            mode.remember(indices, torch.tensor([[3, 1, 3, 7]]))
            grad = torch.sparse_coo_tensor(indices, torch.empty(4, 16, device="meta"), (10, 16), check_invariants=False)
            coalesced = grad.clone().coalesce()
            unknown = torch.sparse_coo_tensor(torch.empty(1, 4, dtype=torch.long, device="meta"),
                                              torch.empty(4, 16, device="meta"), (10, 16), check_invariants=False).coalesce()
    assert coalesced._nnz() == 3 and coalesced._values().shape == (3, 16)  # ids 1, 3, 7
    assert unknown._nnz() == 4 and unknown.is_coalesced()  # every index assumed distinct
    raw = [a.raw for a in tracker.allocations()]
    # clone: indices 4 x 8 = 32 B and values 4 x 16 x 4 = 256 B; _coalesce_sparse_cuda: the flattened indices,
    # origIndices and uniqueOffsets (4 x 8 = 32 B each), values for the 3 unique indices 3 x 16 x 4 = 192 B
    assert raw.count(32) >= 1 + 3 and 256 in raw and 192 in raw
    (note,) = mode.notes
    assert note.startswith("coalesce of a sparse tensor") and "upper bound" in note


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.AdamW(params, lr=0.01, fused=True),
    lambda params: torch.optim.Adam(params, lr=0.01, fused=True),
    lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True),
    lambda params: torch.optim.Adagrad(params, lr=0.01, fused=True),
], ids=["adamw", "adam", "sgd", "adagrad"])
def test_fused_optimizers_run_emulated_with_the_cpu_backends_state(make):
    reports = {}
    for backend in BACKENDS:
        model = mlp()
        reports[backend] = measure_step(model, make(model.parameters()), torch.randn(8, 16),
                                        target=torch.randint(0, 4, (8,)), backend=backend)
    n_params = sum(p.numel() for p in mlp().parameters())  # 16*32 + 32 + 32*4 + 4 = 676
    states = {be: r.steps[-1].phases[Phase.OPTIMIZER].retained_split[Category.OPTIMIZER] for be, r in reports.items()}
    # the fused kernels update in place; fused Adam/AdamW keep each of the 4 parameters' `step` as an fp32 0-d
    # device tensor (not a host scalar as foreach does): 2 moments x 676 x 4 B + 4 x 4 B = 5424 B
    expected = {"AdamW": 2 * 4 * n_params + 16, "Adam": 2 * 4 * n_params + 16, "SGD": 4 * n_params,
                "Adagrad": 4 * n_params + 16}[type(make([nn.Parameter(torch.ones(1))])).__name__]
    assert states == {"cpu": expected, "emulated": expected}


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_an_emulated_rnn_training_step_says_cudnns_reserve_space_is_not_counted(rnn):
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = rnn(16, 32, batch_first=True), nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Tagger()
    x, y = torch.randn(4, 5, 16), torch.randint(0, 4, (4,))
    emulated = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, target=y, backend="emulated")
    assert RESERVE_NOTE in emulated.notes
    cpu = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, target=y, backend="cpu")
    assert RESERVE_NOTE not in cpu.notes  # the cpu backend measures what the CPU runs: nothing left out
    plain = nn.Sequential(nn.Linear(16, 4))  # no RNN layer: nothing to say
    report = measure_step(plain, torch.optim.SGD(plain.parameters(), lr=0.1), torch.randn(4, 16), backend="emulated")
    assert RESERVE_NOTE not in report.notes


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
