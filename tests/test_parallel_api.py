"""Distributed steps without processes: strategy checks, marker, bad input, the closed forms' arithmetic."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pytest_gpumem import DDP, FSDP, Category, ModelStates, Phase, ZeRO, measure_parallel_step, model_states
from pytest_gpumem._core.budget import BudgetError, budget_from_marker
from pytest_gpumem._parallel.model_states import deepspeed_zero_bytes, shard_rows, zero_partition
from pytest_gpumem._parallel.runners import runner_for
from pytest_gpumem._parallel.wrapping import default_fsdp_units, fsdp_units


@pytest.mark.parametrize("build, error, words", [
    (lambda: DDP(0), ValueError, "world_size must be >= 1"),
    (lambda: DDP(2.0), TypeError, "whole number"),
    (lambda: FSDP(True), TypeError, "got bool"),
    (lambda: DDP(2, bucket_cap_mb=0), ValueError, "bucket_cap_mb=0"),
    (lambda: DDP(2, bucket_cap_mb=float("inf")), ValueError, "finite"),
    (lambda: DDP(2, gradient_as_bucket_view=1), TypeError, "True or False"),
    (lambda: FSDP(2, reshard_after_forward="yes"), TypeError, "True or False"),
    (lambda: FSDP(2, param_dtype=torch.int8), TypeError, "floating torch.dtype"),
    (lambda: FSDP(2, param_dtype="bf16"), TypeError, "floating torch.dtype"),
    (lambda: FSDP(2, wrap=3), TypeError, "callable"),
    (lambda: ZeRO(3, 2), ValueError, "stage 3 is FSDP"),
    (lambda: ZeRO(True, 2), ValueError, "expected 1"),
    (lambda: ZeRO(1, 0), ValueError, "world_size must be >= 1"),
])
def test_strategies_refuse_bad_arguments_naming_them(build, error, words):
    with pytest.raises(error, match=words):
        build()


def test_strategies_describe_themselves_as_json():
    assert ZeRO(2, 4).to_dict() == {"strategy": "ZeRO", "world_size": 4, "stage": 2}
    assert FSDP(8, param_dtype=torch.bfloat16).to_dict()["param_dtype"] == "bfloat16"
    assert DDP(2) == DDP(2, bucket_cap_mb=25) and repr(ZeRO(1, 2)) == "ZeRO(stage=1, world_size=2)"
    assert ZeRO(2, 4).as_fsdp() == FSDP(4, reshard_after_forward=False)


def test_marker_takes_a_strategy_and_refuses_anything_else():
    assert budget_from_marker(("80GB",), {"parallel": FSDP(8)}).parallel == FSDP(8)
    assert budget_from_marker((), {"parallel": DDP(2)}).total is None  # a layout alone is a setting
    with pytest.raises(BudgetError, match="parallel='fsdp': expected DDP"):
        budget_from_marker(("1GB",), {"parallel": "fsdp"})


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def test_bad_input_is_refused_before_any_rank_starts():
    model = _mlp()
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"world_size=4 does not divide the global batch: tensor 0 .*shape \(6, 5\)"):
        measure_parallel_step(model, adam, torch.randn(6, 5), parallel=DDP(4), backend="cpu")
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match="cannot shard LBFGS: its step takes a closure"):
        measure_parallel_step(model, lbfgs, torch.randn(4, 5), parallel=ZeRO(1, 2), backend="cpu")
    with pytest.raises(ValueError, match="has no trainable parameters"):
        measure_parallel_step(nn.ReLU(), adam, torch.randn(4, 5), parallel=FSDP(2), backend="cpu")
    with pytest.raises(TypeError, match="parallel='ddp': expected DDP"):
        measure_parallel_step(model, adam, torch.randn(4, 5), parallel="ddp", backend="cpu")
    with pytest.raises(ValueError, match="at most|world_size <= 8"):
        measure_parallel_step(model, adam, torch.randn(16, 5), parallel=DDP(16), backend="cpu")


def test_cuda_backend_has_no_parallel_runner_and_says_what_does():
    with pytest.raises(ValueError, match="not supported on the 'cuda' backend.*'cpu' runs real gloo ranks"):
        runner_for("cuda")


def test_default_wrapping_rule_takes_modulelist_blocks_else_children_with_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4)]))
                                         for _ in range(3)])
            self.head = nn.Linear(4, 2)

    net = Net()
    assert default_fsdp_units(net) == list(net.layers)  # the inner ModuleList is inside a unit already
    mlp = _mlp()
    assert default_fsdp_units(mlp) == [mlp[0], mlp[2]]  # the ReLU holds no parameters
    assert fsdp_units(net, nn.Linear) == [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert fsdp_units(net, lambda m: [m.head, m]) == [net.head]  # the root is always sharded last, not twice


def test_shard_rows_pad_dim0_to_a_multiple_of_the_world_size():
    # 7 rows over 2 ranks: ceil(7/2) = 4 rows each allocated; rank 0 holds 4, rank 1 holds 3
    assert [shard_rows(7, 2, r) for r in range(2)] == [(4, 4), (4, 3)]
    # 3 rows over 4 ranks: 1 row each allocated; rank 3 holds none
    assert [shard_rows(3, 4, r) for r in range(4)] == [(1, 1), (1, 1), (1, 1), (1, 0)]


def test_zero_partition_is_greedy_by_size_largest_first():
    # sizes 4, 512, 32, 128 over 2 ranks: 512 -> r0, 128 -> r1, 32 -> r1 (160 < 512), 4 -> r1 (164 < 512)
    assert zero_partition([[4, 512, 32, 128]], 2) == [[1, 0, 1, 1]]
    # ties go to the lowest rank: 64, 64, 64, 64 -> 0, 1, 0, 1
    assert zero_partition([[64, 64, 64, 64]], 2) == [[0, 1, 0, 1]]


def _even_model() -> nn.Module:
    # 4 weights of 8x8, no biases: Ψ = 256 parameters, every dim 0 (8) divisible by 2 and 4, equal sizes
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(4)])


@pytest.mark.parametrize("world_size", [2, 4])
def test_closed_forms_agree_with_deepspeeds_published_zero_formulas(world_size):
    """ZeRO paper, K = 12 for mixed-precision Adam; Ψ = 256; on CUDA Adam's step counters sit on the CPU."""
    model = _even_model()
    psi, n = 256, world_size
    adam = torch.optim.Adam(model.parameters())
    # stage 3 = FSDP full shard with bf16 compute: fp32 sharded params 4Ψ/N (the master weights) + fp32 grads
    # 4Ψ/N + Adam moments 8Ψ/N = 16Ψ/N; the paper: fp16 params 2 + fp16 grads 2 + K=12 (master, m, v) = 16Ψ/N
    fsdp = model_states(model, adam, FSDP(n, param_dtype=torch.bfloat16), device="cuda")
    assert all(s.total == deepspeed_zero_bytes(3, psi, n) == 16 * psi // n for s in fsdp)
    # stage 0 = DDP in fp32 with bucket views: 4Ψ + 4Ψ + 8Ψ = 16Ψ, the paper's (2+2+12)Ψ: same total, other split
    ddp = model_states(model, adam, DDP(n, gradient_as_bucket_view=True), device="cuda")
    assert all(s.total == deepspeed_zero_bytes(0, psi, n) == 16 * psi for s in ddp)
    # without bucket views DDP holds every gradient twice: 16Ψ + 4Ψ of buckets
    assert all(s.total == 20 * psi and s.buckets == 4 * psi for s in model_states(model, adam, DDP(n), device="cuda"))
    # stage 1 in fp32 (no separate master copy, so p = g = 4 B and K = 8): (4+4)Ψ + 8Ψ/N, buckets aside
    zero1 = model_states(model, adam, ZeRO(1, n), device="cuda")
    assert all(s.total - s.buckets == deepspeed_zero_bytes(1, psi, n, k=8, param_bytes=4, grad_bytes=4)
               == 8 * psi + 8 * psi // n for s in zero1)
    # stage 2 as torch runs it (FSDP2, params sharded between steps too), fp32: params 4Ψ/N + grads 4Ψ/N + Adam
    # moments 8Ψ/N = 16Ψ/N, i.e. the paper's p·Ψ + (g+K)Ψ/N with p = g = 4, K = 8 and the parameter term divided
    # as well (torch gathers them once per step): 4Ψ + 12Ψ/N - 4Ψ + 4Ψ/N = 16Ψ/N, no gradient buckets
    zero2 = model_states(model, adam, ZeRO(2, n), device="cuda")
    assert all(s.total == 16 * psi // n and s.buckets == 0 for s in zero2)
    assert all(s.total == deepspeed_zero_bytes(2, psi, n, k=8, param_bytes=4, grad_bytes=4) - 4 * psi + 4 * psi // n
               for s in zero2)


def test_model_states_count_cpu_step_counters_only_on_the_cpu():
    model = _even_model()
    adam = torch.optim.Adam(model.parameters())
    cpu, cuda = model_states(model, adam, FSDP(2)), model_states(model, adam, FSDP(2), device="cuda")
    # four parameters, one 4-byte fp32 `step` tensor each
    assert [c.optimizer - g.optimizer for c, g in zip(cpu, cuda)] == [16, 16]
    assert isinstance(cpu[0], ModelStates) and cpu[0].to_dict()["rank"] == 0


def test_rank_reports_and_their_parts_survive_json():
    from pytest_gpumem import ParallelReport, PhaseStats, RankInfo, StepMeasurement, StepReport

    def rank_report(rank: int, peak: int) -> StepReport:
        stats = PhaseStats(Phase.BACKWARD, peak, 10, {Category.GRADS: peak}, {Category.GRADS: 10}, None,
                           {"grads: gradient buckets": peak // 2})
        step = StepMeasurement(0, peak, Phase.BACKWARD, {Category.GRADS: peak}, {Phase.BACKWARD: stats})
        return StepReport("cpu", "cpu", "2.14", None, (step,), (), RankInfo("DDP", 2, rank, DDP(2).to_dict()))

    result = ParallelReport(DDP(2).to_dict(), (rank_report(0, 100), rank_report(1, 300)))
    assert result.peak_rank == 1 and result.peak == 300
    again = ParallelReport.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.to_dict() == result.to_dict()
    assert again.ranks[1].phases[Phase.BACKWARD].peak_parts == {"grads: gradient buckets": 150}
    assert "rank 1 of 2, DDP" in again.table() and "parts at the peak: grads: gradient buckets 150 B" in again.table()
    # a one-device report's JSON is unchanged: no "parallel" key, no "peak_parts" where there are none
    plain = StepReport("cpu", "cpu", "2.14", None, rank_report(0, 100).steps)
    assert "parallel" not in plain.to_dict()
