"""Closed forms of the communication buffers (FSDP2's all-gather/unsharded/prefetched/reduce-scatter, DDP's
buckets) against emulated and gloo ranks, and in the contradiction check.

Figures are raw bytes. The MLP of parallel_layout_cases: Linear(256,512) 512x256+512 = 131,584 elements,
Linear(512,512) 512x512+512 = 262,656, Linear(512,10) 10x512+10 = 5,130 (on 4 ranks dim 0 pads 10 -> 12 rows:
12x512+12 = 6,156); no parameters of its own, so the root is no unit. The transformer: each block 49,984
elements (2 LayerNorms 2x128, in_proj 192x64+192 = 12,480, out_proj 64x64+64 = 4,160, MLP 256x64+256 = 16,640
and 64x256+64 = 16,448; every dim 0 divides by 4); the root keeps embed 97x64, norm 64+64, head 97x64+97:
on 2 ranks 97 -> 98 rows: 98x64 + 128 + 98x64 + 98 = 12,770 elements = 51,080 B; on 4 ranks 97 -> 100 rows:
100x64 + 128 + 100x64 + 100 = 13,028 = 52,112 B.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import nn

from pytest_gpumem import DDP, FSDP, ZeRO, ParallelReport, measure_parallel_step, model_states
from pytest_gpumem._parallel.comm_buffers import (ALL_GATHER, BUCKETS, PREFETCHED, REDUCE_SCATTER, UNSHARDED,
                                                   comm_buffers, unit_buffers)
from pytest_gpumem._parallel.model_check import measured_buffer_peaks, model_state_estimate

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import parallel_layout_cases as cases  # noqa: E402
from fresh_interpreter import run_script_once  # noqa: E402

MLP_FP32 = (526_336, 1_050_624)  # 131,584 x 4 B, 262,656 x 4 B: the first two units
BLOCK = 49_984 * 4               # 199,936 B


def closed(name: str, layout) -> dict[str, int]:
    model, optimizer, *_ = cases.case(name)
    buffers = comm_buffers(model, layout, model_states(model, optimizer, layout))
    assert all(b == buffers[0] for b in buffers)  # padding makes every rank's buffers rank 0's size
    return buffers[0]


def test_mlp_fsdp_units_gather_in_pairs_in_forward_and_one_ahead_in_backward():
    assert closed("mlp", FSDP(2)) == {
        # forward keeps Linear(256,512)'s output until Linear(512,512) has gathered: 526,336 + 1,050,624
        ALL_GATHER: 1_576_960,
        UNSHARDED: 1_050_624,       # resharded after each unit: the largest unit alone
        PREFETCHED: 1_050_624,      # backward: Linear(512,10) prefetches Linear(512,512), which prefetches the first
        REDUCE_SCATTER: 1_050_624,  # one unit's padded fp32 gradients at a time, the largest
    }


def test_padding_to_four_ranks_and_bf16_param_dtype_halve_the_gathered_bytes():
    # unit 512x256+512 in bf16: 131,584 x 2 = 263,168 B; 512x512+512: 262,656 x 2 = 525,312 B;
    # the reduce-scatter follows the bf16 gradients (reduce_dtype None): 525,312 B
    assert closed("mlp", FSDP(4, param_dtype=torch.bfloat16)) == {
        ALL_GATHER: 263_168 + 525_312, UNSHARDED: 525_312, PREFETCHED: 525_312, REDUCE_SCATTER: 525_312}
    # reduce_dtype=fp32 with bf16 parameters: the reduce-scatter input is fp32 again, 262,656 x 4 = 1,050,624 B
    assert closed("mlp", FSDP(4, param_dtype=torch.bfloat16, reduce_dtype=torch.float32))[REDUCE_SCATTER] == 1_050_624


def test_zero2_keeps_every_unit_gathered_and_prefetches_nothing():
    # 4 ranks: Linear(512,10) pads to 12 rows, 6,156 x 4 = 24,624 B; all three units: 526,336 + 1,050,624 + 24,624
    assert closed("mlp", ZeRO(2, 4)) == {ALL_GATHER: 1_576_960, UNSHARDED: 1_601_584, REDUCE_SCATTER: 1_050_624}
    assert closed("mlp", ZeRO(2, 4)) == closed("mlp", FSDP(4, reshard_after_forward=False))


def test_a_root_with_parameters_stays_gathered_beside_each_block():
    units = unit_buffers(cases.case("transformer")[0], FSDP(2))
    assert [(u.name, u.all_gather) for u in units] == [("", 51_080), ("blocks.0", BLOCK), ("blocks.1", BLOCK)]
    assert closed("transformer", FSDP(2)) == {
        ALL_GATHER: 2 * BLOCK,           # block 0's output kept while block 1 gathers: 399,872 > root + block
        UNSHARDED: 51_080 + BLOCK,       # the root's own parameters plus one block: 251,016
        PREFETCHED: BLOCK,               # the root prefetches block 1, block 1 prefetches block 0
        REDUCE_SCATTER: BLOCK,
    }
    # ZeRO-2 on 4 ranks: root 52,112 + two blocks 399,872 = 451,984 B gathered from forward to backward
    assert closed("transformer", ZeRO(2, 4))[UNSHARDED] == 451_984


def test_ddp_and_zero1_name_the_buckets_of_model_states():
    # 399,370 fp32 gradients: 1,597,480 B, once more in buckets whether or not .grad is a view into them
    for layout in (DDP(2), DDP(2, gradient_as_bucket_view=True), ZeRO(1, 4)):
        model, optimizer, *_ = cases.case("mlp")
        states = model_states(model, optimizer, layout)
        assert comm_buffers(model, layout, states) == tuple({BUCKETS: s.buckets} for s in states)
        assert states[0].buckets == 1_597_480


def test_one_rank_gathers_nothing_and_keeps_its_unsharded_copy():
    assert closed("mlp", FSDP(1)) == {UNSHARDED: 1_050_624}


EMULATED = [(name, layout) for name in ("mlp", "transformer") for layout in (
    DDP(2), DDP(4), ZeRO(1, 2), FSDP(2), FSDP(4), FSDP(2, reshard_after_forward=False),
    FSDP(4, reshard_after_forward=False), FSDP(2, param_dtype=torch.bfloat16), FSDP(4, param_dtype=torch.bfloat16),
    FSDP(2, reshard_after_forward=False, param_dtype=torch.bfloat16), ZeRO(2, 2), ZeRO(2, 4), FSDP(1))]


@pytest.mark.parametrize("name, layout", EMULATED, ids=[cases.case_id(*c) for c in EMULATED])
def test_emulated_ranks_reach_each_closed_form_to_the_byte(name, layout):
    model, optimizer, batch, target, loss = cases.case(name)
    estimate = model_state_estimate(model, optimizer, layout, device="cuda")
    result = measure_parallel_step(model, optimizer, batch, target=target, loss_fn=loss, parallel=layout,
                                   backend="emulated")
    for rank, report in enumerate(result.ranks):
        assert measured_buffer_peaks(report) == estimate.buffers[rank], rank
        comparison = estimate.compare(report)
        assert comparison.ok, comparison.message


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    """Every buffer case of parallel_layout_cases.py on gloo ranks, in a fresh interpreter (see its docstring), once a
    run."""
    data = run_script_once(tmp_path_factory, "parallel_layout_cases.py", timeout_s=900)
    return {k: ParallelReport.from_dict(v) for k, v in data["reports"].items()}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="gloo ranks are forked processes")
@pytest.mark.parametrize("name, layout", cases.BUFFER_CASES,
                         ids=[cases.case_id(*c) for c in cases.BUFFER_CASES])
def test_gloo_ranks_reach_each_closed_form_and_the_check_holds(gloo_runs, name, layout):
    model, optimizer, *_ = cases.case(name)
    estimate = model_state_estimate(model, optimizer, layout, device="cpu")
    for rank, report in enumerate(gloo_runs[cases.case_id(name, layout)].ranks):
        # to the byte, gathered buffers too: each collective settles on gloo ranks (settled_collectives.py)
        assert measured_buffer_peaks(report) == estimate.buffers[rank], rank
        comparison = estimate.compare(report)
        assert comparison.ok, comparison.message


def _emulated(model, optimizer, batch, target, loss, layout):
    return measure_parallel_step(model, optimizer, batch, target=target, loss_fn=loss, parallel=layout,
                                 backend="emulated")


def test_a_wrong_unit_wrapping_is_caught_and_the_unsharded_part_named(monkeypatch):
    """Planted: the layout shards the whole MLP as one unit while the closed form takes one unit per Linear."""
    from pytest_gpumem._parallel import wrapping

    model, optimizer, batch, target, loss = cases.case("mlp")
    estimate = model_state_estimate(model, optimizer, FSDP(2), device="cuda")
    monkeypatch.setattr(wrapping, "fsdp_units", lambda model, wrap: [])  # the bug: only the root is sharded
    report = _emulated(model, optimizer, batch, target, loss, FSDP(2)).ranks[0]
    comparison = estimate.compare(report)
    assert not comparison.ok
    wrong = {r.name: (r.estimated, r.measured) for r in comparison.rows if not r.ok}
    # one unit of every parameter: 399,370 x 4 = 1,597,480 B gathered at once, and reduce-scattered at once;
    # nothing to prefetch. The model states themselves still agree (same shards).
    assert wrong == {UNSHARDED: (1_050_624, 1_597_480), ALL_GATHER: (1_576_960, 1_597_480),
                     PREFETCHED: (1_050_624, 0), REDUCE_SCATTER: (1_050_624, 1_597_480)}
    assert "rank 0 of FSDP(world_size=2, reshard_after_forward=True, param_dtype=None" in comparison.message
    assert "params: unsharded" in comparison.message and "<-- differs" in comparison.message
    assert "params: unsharded: more (or fewer) parameters gathered at once than the units allow" in comparison.message
    assert "reshard_after_forward" in comparison.message and "wrap=" in comparison.message


class OutOfOrder(nn.Module):
    """The MLP with its last layer registered second: module order (first, last, middle) is not forward order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last, self.middle = nn.Linear(256, 512), nn.Linear(512, 10), nn.Linear(512, 512)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def test_units_run_out_of_module_order_contradict_the_all_gather_buffer_and_say_so():
    model = OutOfOrder()
    optimizer = torch.optim.Adam(model.parameters())
    estimate = model_state_estimate(model, optimizer, FSDP(2), device="cuda")
    # module order pairs first+last (526,336 + 20,520) and last+middle (20,520 + 1,050,624 = 1,071,144);
    # forward really gathers middle while first's output is alive: 526,336 + 1,050,624 = 1,576,960
    assert estimate.buffers[0][ALL_GATHER] == 1_071_144
    batch, target = torch.randn(32, 256), torch.randint(0, 10, (32,))
    report = _emulated(model, optimizer, batch, target, nn.functional.cross_entropy, FSDP(2)).ranks[0]
    comparison = estimate.compare(report)
    assert not comparison.ok
    # backward prefetches every unit but the one that ran last in forward: by module order that is 'middle'
    # (so max(first, last) = 526,336 B), really 'last' (so max(first, middle) = 1,050,624 B)
    wrong = {r.name: (r.estimated, r.measured) for r in comparison.rows if not r.ok}
    assert wrong == {ALL_GATHER: (1_071_144, 1_576_960), PREFETCHED: (526_336, 1_050_624)}
    assert "run in another order than they are registered" in comparison.message


def test_the_estimate_json_carries_every_ranks_buffers():
    model, optimizer, *_ = cases.case("mlp")
    data = model_state_estimate(model, optimizer, FSDP(4), device="cpu").to_dict()
    # Linear(512, 512)'s 262,656 fp32 gathered while Linear(256, 512)'s 131,584 fp32 are still held: 394,240 x 4 B
    assert [r["comm_buffers"][ALL_GATHER] for r in data["ranks"]] == [1_576_960] * 4
    assert "comm_buffer_slack" not in data  # no slack for gloo: its ranks settle their collectives
    json.dumps(data)  # plain JSON values


PLUGIN_TEST = '''
import pytest, torch
from torch import nn
from pytest_gpumem import FSDP
from pytest_gpumem._parallel import wrapping

def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters()), torch.randn(8, 16)

@pytest.mark.gpu_budget("1MiB", parallel=FSDP(2), backend="emulated")
def test_buffers_hold(gpumem):
    gpumem.train_step(*make())

@pytest.mark.gpu_budget("1MiB", parallel=FSDP(2), backend="emulated")
def test_whole_model_gathered(gpumem, monkeypatch):
    monkeypatch.setattr(wrapping, "fsdp_units", lambda model, wrap: [])
    gpumem.train_step(*make())
'''


def test_a_budget_test_fails_naming_the_buffer_that_contradicts(pytester):
    pytester.makepyfile(PLUGIN_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--gpumem-json=out.json", timeout=300)
    result.assert_outcomes(passed=1, failed=1)
    # units Linear(16,32) 32x16+32 = 544 and Linear(32,4) 4x32+4 = 132 elements; as one unit 676 x 4 = 2,704 B
    # gathered at once, where the closed form holds the larger unit, 544 x 4 = 2,176 B
    result.stdout.fnmatch_lines(["*the measurement contradicts the closed forms of the distributed step (exact; "
                                 "rtol and atol do not apply*",
                                 "*params: unsharded*2.12 KiB*2.64 KiB*<-- differs*",
                                 "*likely cause*", "*- params: unsharded: more (or fewer) parameters gathered*"])
    tests = {t["nodeid"].split("::")[1]: t for t in json.loads((pytester.path / "out.json").read_text())["tests"]}
    assert tests["test_buffers_hold"]["estimate"]["ranks"][0]["comm_buffers"][UNSHARDED] == 2_176


def test_a_part_that_peaks_before_the_phase_peak_keeps_its_own_most():
    """part_peaks: the most each named part held in the phase, where peak_parts shows it at the phase's peak."""
    from pytest_gpumem import Category, Phase
    from pytest_gpumem._core.results import PhaseStats
    from pytest_gpumem._measure.tracker import StorageTracker

    with StorageTracker("cpu") as tracker:
        tracker.start_phase(0, Phase.FORWARD)
        gathered = torch.empty(250)                  # 1,000 B, named below, freed before the peak
        tracker.mark([gathered], Category.PARAMS)
        tracker.mark_part([gathered], "unsharded")
        del gathered
        big = torch.empty(1000)                      # 4,000 B unnamed: the phase's peak
        del big
    (replay,) = tracker.replay()
    assert replay.peak == 4_000
    assert replay.peak_parts == {} and replay.part_peaks == {"params: unsharded": 1_000}
    stats = PhaseStats(Phase.FORWARD, 4_000, 0, {}, {}, part_peaks=dict(replay.part_peaks))
    assert PhaseStats.from_dict(json.loads(json.dumps(stats.to_dict()))).part_peaks == {"params: unsharded": 1_000}


def test_nested_units_are_sharded_inner_first_and_gathered_inside_their_outer_unit():
    # units: root 51,080 B; each block without its MLP: 49,984 - 16,640 - 16,448 = 16,896 elements = 67,584 B;
    # each MLP 33,088 elements = 132,352 B. Forward (resharded after each unit): root + block + its MLP gathered
    # together, 51,080 + 67,584 + 132,352 = 251,016 B; the all-gather buffers of block 0's MLP and block 1
    # overlap: 132,352 + 67,584 = 199,936 B (root + block 0 is 118,664 B). Backward: block 1 prefetches its MLP,
    # the MLP prefetches block 0 (the unit whose forward ended before): at most 132,352 B.
    layout = FSDP(2, wrap=cases.nested_units)
    assert [u.all_gather for u in unit_buffers(cases.case("transformer")[0], layout)] == [
        51_080, 67_584, 132_352, 67_584, 132_352]  # module order: block 0, its MLP, block 1, its MLP
    assert closed("transformer", layout) == {ALL_GATHER: 199_936, UNSHARDED: 251_016, PREFETCHED: 132_352,
                                             REDUCE_SCATTER: 132_352}
    model, optimizer, batch, target, loss = cases.case("transformer")
    estimate = model_state_estimate(model, optimizer, layout, device="cuda")
    result = _emulated(model, optimizer, batch, target, loss, layout)  # fully_shard on an outer unit first fails
    assert [measured_buffer_peaks(r) for r in result.ranks] == list(estimate.buffers)


def test_baseline_entries_save_each_ranks_buffers_at_their_most():
    from pytest_gpumem._reporting.baseline import BaselineEntry

    model, optimizer, batch, target, loss = cases.case("mlp")
    report = _emulated(model, optimizer, batch, target, loss, FSDP(2)).ranks[1]
    entry = BaselineEntry.from_report(report)
    # the same figures as the closed form (test_mlp_fsdp_units_gather_in_pairs_in_forward_and_one_ahead_in_backward)
    assert entry.part_peaks == {ALL_GATHER: 1_576_960, UNSHARDED: 1_050_624, PREFETCHED: 1_050_624,
                                REDUCE_SCATTER: 1_050_624}
    assert BaselineEntry.from_dict(json.loads(json.dumps(entry.to_dict()))) == entry
    # one device: nothing named, the entry's JSON as before
    assert "part_peaks" not in BaselineEntry.from_report(measure_step_cpu()).to_dict()


def measure_step_cpu():
    from pytest_gpumem import measure_step

    model = nn.Linear(4, 2)
    return measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 4), backend="cpu")
