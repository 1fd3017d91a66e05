"""Distributed steps measured for real: forked gloo ranks on the CPU, against the closed forms and each other.

Runs are shared by the run's xdist workers and made in a fresh interpreter (parallel_gloo_cases.py): one per (strategy, world
size), plus a rank that raises and one past its timeout.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from pytest_gpumem import DDP, FSDP, Category, ParallelReport, Phase, ZeRO, model_states
from pytest_gpumem._measure.step import StepFailed
from pytest_gpumem._parallel.model_check import measured_model_states, model_state_estimate

from fresh_interpreter import run_script_once
from parallel_gloo_cases import CASES, REPEATS, adam, uneven

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not torch.distributed.is_available(),
                                reason="cpu ranks fork one process per rank and need torch.distributed (gloo)")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Every case of parallel_gloo_cases.py measured once a run, in a fresh interpreter (see its docstring)."""
    return run_script_once(tmp_path_factory, "parallel_gloo_cases.py", timeout_s=900)


@pytest.fixture(scope="module")
def runs(measured):
    """strategy -> (model, optimizer, ParallelReport): the models rebuilt here as the script built them."""
    out = {}
    for strategy, data in zip(CASES, measured["runs"]):
        model = uneven()
        out[strategy] = (model, adam(model), ParallelReport.from_dict(data))
    return out


@pytest.mark.parametrize("strategy", CASES, ids=lambda s: s.describe())
def test_every_rank_holds_the_closed_form_model_states_to_the_byte(runs, strategy):
    model, adam, result = runs[strategy]
    closed = model_states(model, adam, strategy)  # the user's model and optimizer are untouched by the run
    assert result.world_size == strategy.world_size
    for rank, report in enumerate(result.ranks):
        assert report.parallel is not None and report.parallel.rank == rank
        got = measured_model_states(report)
        want = closed[rank]
        assert (got.params, got.grads, got.optimizer) == (want.params, want.grads, want.optimizer), rank
        assert model_state_estimate(model, adam, strategy).compare(report).ok


def test_a_sharded_step_measures_the_same_every_run(measured):
    # the MLP on FSDP(2), REPEATS runs: every figure of every rank the same, run after run (settled_collectives)
    first, *rest = measured["repeats"]
    assert len(rest) == REPEATS - 1
    for index, run in enumerate(rest, 1):
        assert run == first, f"run {index} differs from run 0"


def test_fsdp_pads_dim0_per_rank_and_the_state_follows_the_real_rows(runs):
    # Linear(5,7): weight 7x5 + bias 7, Linear(7,3): 3x7 + 3, LayerNorm(3): 3 + 3, fp32.
    # On 2 ranks each allocates ceil(7/2)=4 rows: 4*5+4 + 2*7+2 + 2+2 = 44 elements = 176 B on both ranks.
    _, _, result = runs[FSDP(2)]
    assert [measured_model_states(r).params for r in result.ranks] == [176, 176]
    # Adam's moments cover the real rows: rank 0 4*5+4 + 2*7+2 + 2+2 = 44, rank 1 3*5+3 + 1*7+1 + 1+1 = 28
    # elements, twice (exp_avg, exp_avg_sq) in fp32, plus six 4-byte step counters: 376 B and 248 B
    assert [measured_model_states(r).optimizer for r in result.ranks] == [44 * 8 + 24, 28 * 8 + 24]


def test_ddp_buckets_are_a_second_copy_of_the_gradients_unless_grads_are_bucket_views(runs):
    # Ψ = 35+7+21+3+3+3 = 72 parameters, 288 B of fp32 gradients
    for strategy, grads in ((DDP(2), 2 * 288), (DDP(2, gradient_as_bucket_view=True), 288)):
        report = runs[strategy][2].ranks[0]
        backward = report.steps[1].phases[Phase.BACKWARD]
        assert backward.retained_split[Category.GRADS] == grads
        assert backward.peak_parts["grads: gradient buckets"] == 288


def test_fsdp_names_all_gathered_parameters_and_reduce_scatter_buffers(runs):
    # FSDP's units (fp32, dim 0 padded to a multiple of 2, buffers the same on both ranks): Linear(5,7)
    # 2 x (4x5+4) = 48 elements = 192 B, Linear(7,3) 2 x (2x7+2) = 32 = 128 B, LayerNorm(3) 2 x (2+2) = 8 = 32 B;
    # the whole model gathered 192 + 128 + 32 = 352 B. Every part is exact: the ranks settle each collective, so no
    # gathered output or staged reduce-scatter copy outlives its call on gloo's worker thread (settled_collectives)
    model, adam, result = runs[FSDP(2)]
    report = result.ranks[0]
    forward, backward = report.steps[1].phases[Phase.FORWARD], report.steps[1].phases[Phase.BACKWARD]
    # resharded after each unit's forward: at the forward peak Linear(7,3) alone is gathered (128 B), while
    # Linear(5,7)'s all-gather output is still held (kept until the next unit's copy-out): 192 + 128 = 320 B
    assert forward.peak_parts["params: unsharded"] == 128
    assert forward.part_peaks["params: unsharded"] == 192  # one unit at a time, the largest Linear(5,7)
    assert forward.part_peaks["params: all-gather buffer"] == 320
    # backward runs the units last to first, each gathering the one before ahead of time: Linear(5,7) is
    # prefetched (192 B) while Linear(7,3) reduces; the largest reduce-scatter input is Linear(5,7)'s padded
    # gradients, 48 fp32 = 192 B (each freed before the next); LayerNorm, the last unit, is gathered at its own
    # pre-backward, nothing prefetching it: 32 B of all-gather buffer; one unit unsharded at a time: 192 B
    assert backward.part_peaks["grads: reduce-scatter input"] == 192
    assert backward.part_peaks["params: unsharded"] == 192
    assert backward.part_peaks["params: prefetched"] == 192
    assert backward.part_peaks["params: all-gather buffer"] == 32
    # over the step those are the closed forms: all-gather 320 (forward), unsharded, prefetched, reduce-scatter 192
    assert model_state_estimate(model, adam, FSDP(2)).buffers[0] == {
        "params: all-gather buffer": 320, "params: unsharded": 192, "params: prefetched": 192,
        "grads: reduce-scatter input": 192}
    # ZeRO-2 keeps every unit gathered from forward to the end of backward: at the forward peak Linear(5,7) and
    # Linear(7,3), 192 + 128 = 320 B, LayerNorm (32 B) not yet gathered; by the forward's end all three, 352 B
    zero2 = runs[ZeRO(2, 2)][2].ranks[0].steps[1].phases
    assert zero2[Phase.FORWARD].peak_parts["params: unsharded"] == 192 + 128
    assert zero2[Phase.FORWARD].part_peaks["params: unsharded"] == 192 + 128 + 32
    assert zero2[Phase.BACKWARD].part_peaks["params: unsharded"] == 352  # still all held
    assert zero2[Phase.BACKWARD].part_peaks["grads: reduce-scatter input"] == 192  # Linear(5,7)'s, as above
    # nothing resharded, so nothing to gather or prefetch in backward (unsettled, gloo's worker thread could let
    # go of the last forward all-gather output, LayerNorm's 32 B, only after backward began: seen once in CI)
    assert "params: prefetched" not in zero2[Phase.BACKWARD].part_peaks
    assert "params: all-gather buffer" not in zero2[Phase.BACKWARD].part_peaks


def test_zero1_ranks_hold_the_optimizer_state_of_their_parameters_only(runs):
    # zero_partition: largest first (35, 21, 7, 3, 3, 3), each to the rank with the fewest elements so far, the
    # lowest rank on a tie. 35 -> r0 (0 = 0, tie); then r1 holds fewer than r0's 35 before each placement:
    # 21 -> r1 (0), 7 -> r1 (21), 3 -> r1 (28), 3 -> r1 (31), 3 -> r1 (34): r0 {35}, r1 {21, 7, 3, 3, 3} = 37
    # Adam: 8 B per element + a 4-byte step per parameter: r0 35*8+4 = 284, r1 37*8+5*4 = 316
    _, _, result = runs[ZeRO(1, 2)]
    assert [measured_model_states(r).optimizer for r in result.ranks] == [284, 316]


def test_a_rank_that_raises_fails_the_step_with_its_own_traceback(measured):
    failure = measured["raises"]
    assert re.search(r"(?s)rank 1 of DDP.*rank one's own error.*traceback in rank 1.*in _raising_loss",
                     failure["message"] or "")
    assert failure["children"] == []


def test_a_rank_past_the_timeout_is_stopped_and_no_process_is_left(measured):
    failure = measured["timeout"]
    assert "did not finish within 3 s (timeout=) and was stopped" in (failure["message"] or "")
    assert failure["seconds"] < 20  # 3 s, the grace of the other rank, the kill
    assert failure["children"] == []


def test_the_fsdp2_internals_compat_reads_are_where_they_were(measured):
    """_compat.dtensor_local and fsdp_unsharded_params on a real FSDP2 module (one gloo rank)."""
    compat = measured["compat"]
    assert compat["local_shape"] == [3, 4] and compat["local_is_plain"], \
        f"DTensor._local_tensor moved in torch {torch.__version__}: update pytest_gpumem/_compat/"
    # created on the first all-gather: none before the forward, weight and bias after
    assert compat["unsharded_before"] == 0 and compat["unsharded_after"] == [[3, 4], [3]], \
        f"FSDPParam._unsharded_param moved in torch {torch.__version__}: update pytest_gpumem/_compat/"


def test_a_rank_refused_backward_after_a_fork_gets_advice():
    from pytest_gpumem._parallel.gloo_ranks import FORKED_AUTOGRAD, _Rank, _reports

    error = json.dumps({"rank": 0, "error": "RuntimeError: Unable to handle autograd's threading in combination "
                        "with fork-based multiprocessing. See https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork",
                        "traceback": "..."}).encode()
    ranks = [_Rank(0, 1, -1, bytearray(error), True, 0, 1)]
    with pytest.raises(StepFailed, match="pytest process of their own") as info:
        _reports(ranks, type("Step", (), {"strategy": DDP(1), "timeout_s": 1})())
    assert FORKED_AUTOGRAD in str(info.value)


PLUGIN_TESTS = '''
import pytest, torch
from torch import nn
from pytest_gpumem import DDP, FSDP

def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters()), torch.randn(8, 16)

@pytest.mark.gpu_budget("64KiB", parallel=FSDP(2), backend="cpu")
def test_fsdp_fits(gpumem):
    result = gpumem.train_step(*make())
    assert result.world_size == 2 and len(gpumem.reports) == 2

@pytest.mark.gpu_budget("8KiB", parallel=DDP(2), backend="cpu")
def test_ddp_over(gpumem):
    gpumem.train_step(*make())

@pytest.mark.gpu_budget("1MB", parallel="fsdp")
def test_bad_marker(gpumem):
    pass
'''


def test_the_marker_budgets_every_rank_and_reports_the_rank(pytester):
    pytester.makepyfile(PLUGIN_TESTS)
    # in a fresh interpreter: this one may have started autograd's device threads (see parallel_gloo_cases.py)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--gpumem-report", "--gpumem-json=out.json",
                                           timeout=300)
    result.assert_outcomes(passed=1, failed=1, errors=1)
    # Ψ = 16*32+32 + 32*4+4 = 676 fp32 parameters; DDP holds params, grads, buckets and AdamW state whole
    result.stdout.fnmatch_lines(["*invalid gpu_budget marker: parallel='fsdp': expected DDP*",
                                 "*rank 0 of 2, DDP: gpu_budget 8.00 KiB exceeded: peak *",
                                 "*rank 1 of 2, DDP: gpu_budget 8.00 KiB exceeded: peak *"])
    import json

    tests = {t["nodeid"].split("::")[1]: t for t in json.loads((pytester.path / "out.json").read_text())["tests"]}
    assert tests["test_fsdp_fits"]["parallel"]["strategy"] == "FSDP"
    assert tests["test_fsdp_fits"]["parallel"]["world_size"] == 2
    assert tests["test_fsdp_fits"]["estimate"]["kind"] == "model_states"  # the closed form was checked, and held
