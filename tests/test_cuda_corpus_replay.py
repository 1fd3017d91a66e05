"""The recorded CUDA corpus replayed on the CPU (issue 10, item 2), and the replay machinery itself.

With a recording in tests/data/cuda_corpus (or GPUMEM_CUDA_CORPUS): per configuration, our allocator
model must reproduce allocated and reserved bytes after every recorded event, the emulated prediction is
set against memory_stats per phase, and every allocation the emulation misses is listed by kind; over
the corpus the emulated peak must meet the issue's bar (median within 1%, worst within 3% of the real
max_memory_allocated). Without a recording those tests skip, saying how to make one. The converter,
the rebuilt allocator state and the miss diff are tested here on hand-built traces with stated arithmetic.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

from pytest_gpumem._measure.allocator import round_allocation

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import corpus_configs  # noqa: E402
import corpus_format  # noqa: E402
import corpus_replay  # noqa: E402
import record_cuda_corpus  # noqa: E402

CORPUS = Path(os.environ.get("GPUMEM_CUDA_CORPUS", ROOT / "tests" / "data" / "cuda_corpus"))
RECORDED = dict(corpus_replay.recorded(CORPUS))
HOW = ("record one on a GPU: `bash benchmarks/gpu_session.sh` (device tool: run(command=\"bash "
       "benchmarks/gpu_session.sh\", timeout_s=600)), or `python benchmarks/record_cuda_corpus.py`")
MiB = 1 << 20


# -- the configurations ---------------------------------------------------------------------------


def test_the_corpus_covers_what_the_issue_asks():
    configs = corpus_configs.CONFIGS
    assert len(configs) >= 20
    names = [c.name for c in configs]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in names)
    assert {c.sdpa_backend for c in configs} >= {"FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"}
    assert any("GQA enable_gqa=True" in c.tags for c in configs)
    assert any("checkpointing" in c.tags for c in configs) and any(c.scaler for c in configs)
    assert {c.autocast for c in configs} >= {torch.float16, torch.bfloat16, None}
    families = {c.optimizer.__name__.split("(")[0] for c in configs}
    assert families >= {"SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "NAdam", "RAdam", "Adamax"}
    adamw = [c.optimizer.__name__ for c in configs if c.optimizer.__name__.startswith("AdamW")]
    assert any("fused=True" in o for o in adamw) and any("foreach=False" in o for o in adamw)
    assert any("lr=<function tensor_lr" in o for o in adamw)
    assert any("embedding backward" in c.tags for c in configs)
    assert sum("cudnn conv" in c.tags for c in configs) >= 5


# steps the emulated backend cannot run yet: each a divergence from CUDA the corpus found (strict: a fix shows)
EMULATION_GAPS: dict[str, str] = {}


def _gaps(names):
    return [pytest.param(n, marks=pytest.mark.xfail(reason=EMULATION_GAPS[n], strict=True))
            if n in EMULATION_GAPS else n for n in names]


@pytest.mark.parametrize("name", _gaps(c.name for c in corpus_configs.CONFIGS))
def test_each_configuration_runs_on_the_emulated_backend(name):
    """The replay builds the recorder's very step; at least weights and their grads are alive at the peak."""
    config = corpus_configs.get(name)
    emulated = corpus_replay.emulate(config)
    with torch.device("meta"):  # only the sizes are needed: no CPU weights to initialise
        model = config.model()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert emulated.report.peak >= 2 * weights
    assert {(0, "setup"), (0, "forward"), (1, "zero_grad")} <= set(emulated.allocations)


def test_unknown_configuration_names_the_known_ones():
    with pytest.raises(KeyError, match="no corpus configuration 'nope'; there are: mlp_sgd"):
        corpus_configs.get("nope")


# -- the recorder, on the CPU -------------------------------------------------------------------------


def test_recorder_runs_setup_batch_and_two_steps_in_order_on_the_cpu():
    record = record_cuda_corpus.record_one("mlp_sgd", "cpu", "python", 100)
    assert [(p["step"], p["phase"]) for p in record["phases"]] == [
        (0, "setup"), (0, "batch"), (0, "forward"), (0, "backward"), (0, "optimizer"), (0, "zero_grad"),
        (1, "forward"), (1, "backward"), (1, "optimizer"), (1, "zero_grad")]
    assert record["format"] == corpus_format.FORMAT and record["device"] == "cpu"
    assert "trace" not in record and "start" not in record["phases"][0]   # no CUDA figures are ever made up
    assert record["settings"]["optimizer"] == "SGD(lr=0.01)"


def test_recorder_never_writes_a_cpu_run_into_the_cuda_corpus(capsys):
    with pytest.raises(SystemExit) as exc:
        record_cuda_corpus.main(["--device", "cpu"])
    assert exc.value.code == 2
    assert "--device cpu never writes into" in capsys.readouterr().err


def test_recorder_on_cuda_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="--device cuda needs a GPU: torch.cuda.is_available\\(\\) is False"):
        record_cuda_corpus.record_one("mlp_sgd", "cuda", "all", 100)


# -- the converter, on a snapshot shaped like torch 2.11's ----------------------------------------

BASE = 0x7F00_0000_0000


def _cpp(name):
    return {"filename": "??", "line": 0, "name": name}


def _py(path, line, name):
    return {"filename": path, "line": line, "name": name}


UNWIND = [_cpp("torch::unwind::unwind()"), _cpp("torch::CapturedTraceback::gather(bool, bool, bool)"),
          _cpp("c10::cuda::CUDACachingAllocator::Native::DeviceCachingAllocator::malloc(...)")]
LINEAR = _py("/opt/torch/.venv/lib/python3.12/site-packages/torch/nn/modules/linear.py", 125, "forward")


def snapshot_211(events):
    """A dict shaped like torch.cuda.memory._snapshot() of torch 2.11 (frames innermost first)."""
    return {
        "segments": [{"device": 0, "address": BASE, "total_size": 2 * MiB, "stream": 0, "segment_type": "small",
                      "allocated_size": 512, "active_size": 512, "requested_size": 100,
                      "blocks": [{"address": BASE, "size": 512, "requested_size": 100, "state": "active_allocated",
                                  "frames": [LINEAR]},
                                 {"address": BASE + 512, "size": 2 * MiB - 512, "requested_size": 0,
                                  "state": "inactive", "frames": []}]}],
        "device_traces": [events],
        "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": "", "expandable_segments": False, "max_split_size": -1},
        "external_annotations": [],
    }


def _entry(action, addr, size, frames=()):
    return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": 1, "frames": list(frames)}


def test_converter_keeps_rows_and_a_short_origin_never_frames():
    events = [
        _entry("segment_alloc", BASE, 2 * MiB, UNWIND),
        _entry("alloc", BASE, 100, UNWIND + [_cpp("at::native::add_out(...)"), LINEAR]),
        _entry("alloc", BASE + 512, 33_554_432, UNWIND + [_cpp("at::cuda::getCurrentCUDABlasHandle()"), LINEAR]),
        _entry("alloc", BASE + 2 * MiB, 4096, UNWIND + [_cpp("at::native::raw_cudnn_convolution_forward_out(...)")]),
        _entry("free_requested", BASE + 512, 33_554_432),
        _entry("free_completed", BASE + 512, 33_554_432),
    ]
    out = corpus_format.convert_snapshot(snapshot_211(events), marks=[])
    assert [row[:4] for row in out.events] == [["segment_alloc", BASE, 2 * MiB, 0], ["alloc", BASE, 100, 0],
                                               ["alloc", BASE + 512, 33_554_432, 0], ["alloc", BASE + 2 * MiB, 4096, 0],
                                               ["free_requested", BASE + 512, 33_554_432, 0],
                                               ["free_completed", BASE + 512, 33_554_432, 0]]
    origins = [out.origins[row[4]] for row in out.events]
    assert origins[1] == {"kind": "tensor", "python": "linear.py:125:forward", "native": "at::native::add_out(...)"}
    assert origins[2]["kind"] == "cublas_workspace" and origins[2]["native"] == "at::cuda::getCurrentCUDABlasHandle()"
    assert origins[3] == {"kind": "cudnn_convolution", "python": "",
                          "native": "at::native::raw_cudnn_convolution_forward_out(...)"}
    assert origins[4] == origins[5] == {"kind": "tensor", "python": "", "native": ""}   # frees carry no stack
    assert len(out.origins) == 4                                                         # repeated origins shared
    assert out.segments == [{"address": BASE, "total_size": 2 * MiB, "stream": 0, "segment_type": "small",
                             "allocated_size": 512,
                             "blocks": [{"address": BASE, "size": 512, "requested_size": 100,
                                         "state": "active_allocated"},
                                        {"address": BASE + 512, "size": 2 * MiB - 512, "requested_size": 0,
                                         "state": "inactive"}]}]
    assert not out.truncated and out.total_events == 6
    capped = corpus_format.convert_snapshot(snapshot_211(events), marks=[], max_events=4)
    assert capped.truncated and capped.total_events == 6 and capped.events == out.events[:4]   # a prefix
    json.dumps(capped.__dict__)  # only plain JSON types


def test_converter_refuses_an_action_it_does_not_know():
    with pytest.raises(ValueError, match="unknown allocator trace action 'defragment'; known: alloc, free_requested"):
        corpus_format.convert_snapshot(snapshot_211([_entry("defragment", BASE, 1)]), marks=[])


def test_phase_boundaries_follow_the_memory_stats_counters():
    actions = ["segment_alloc", "alloc", "alloc", "free_requested", "free_completed", "alloc", "free_requested",
               "free_completed"]
    events = [{"action": a} for a in actions]

    def mark(allocs, freed, segments):
        return {"allocation.all.allocated": allocs, "allocation.all.freed": freed,
                "segment.all.allocated": segments, "segment.all.freed": 0}

    # nothing yet -> 0; two allocations in one segment -> after events 0..2 -> 3; one free more -> its
    # free_completed (event 4) belongs to it too -> 5; everything -> 8
    marks = [mark(0, 0, 0), mark(2, 0, 1), mark(2, 1, 1), mark(3, 2, 1)]
    assert corpus_format.phase_boundaries(events, marks) == [0, 3, 5, 8]


def test_corpus_files_round_trip_and_a_foreign_file_is_refused(tmp_path):
    data = {"format": corpus_format.FORMAT, "config": "x", "trace": {"events": [["alloc", 1, 2, 0, 0]]}}
    path = tmp_path / "x.json.gz"
    corpus_format.write_json_gz(path, data)
    assert corpus_format.read_record(path) == data and list(tmp_path.iterdir()) == [path]
    with gzip.open(tmp_path / "y.json.gz", "wt") as f:
        json.dump({"format": "something else"}, f)
    with pytest.raises(ValueError, match="format 'something else', expected 'pytest-gpumem cuda corpus v1'"):
        corpus_format.read_record(tmp_path / "y.json.gz")


# -- the allocator replay, on a trace built by hand -------------------------------------------------

S, L1, L2 = 0x1000_0000, 0x2000_0000, 0x4000_0000   # a small segment, then two large ones
TRACE = [
    ["segment_alloc", S, 2 * MiB, 0, 0],              # 0  small pool: 2 MiB segment
    ["alloc", S, 1000, 0, 0],                         # 1  1000 -> 1024 (512-B multiple); split off the rest
    ["alloc", S + 1024, 600, 0, 0],                   # 2  600 -> 1024
    ["segment_alloc", L1, 20 * MiB, 0, 0],            # 3  3 MiB < 10 MiB: a 20 MiB segment
    ["alloc", L1, 3 * MiB, 0, 0],                     # 4  17 MiB would remain (> 1 MiB): split
    ["alloc", L1 + 3 * MiB, 33 * MiB // 2, 0, 0],  # 5  16.5 MiB from the 17 MiB rest: 0.5 MiB <= 1 MiB, not split
    ["segment_alloc", L2, 14 * MiB, 0, 0],            # 6  12 MiB + 1 B >= 10 MiB: segment rounded up to 2 MiB
    ["alloc", L2, 12 * MiB + 1, 0, 0],                # 7  -> 12 MiB + 512; 2096640 B remain (> 1 MiB): split
    ["free_requested", S, 1000, 0, 0],                # 8  allocated drops at the request
    ["free_completed", S, 1000, 0, 0],                # 9  the block is reusable only now
    ["free_requested", L1, 3 * MiB, 0, 0],            # 10
    ["free_completed", L1, 3 * MiB, 0, 0],            # 11
    ["alloc", L1, 2 * MiB, 0, 0],                     # 12 best fit: L2's 2096640 B is too small, L1's 3 MiB
                                                      #    fits; exactly 1 MiB would remain: not split (3 MiB)
    ["alloc", S, 512, 0, 0],                          # 13 best fit: the freed 1024 B; 512 remain (>= 512): split
    ["free_requested", L1 + 3 * MiB, 33 * MiB // 2, 0, 0],  # 14 the whole 17 MiB block goes
    ["free_completed", L1 + 3 * MiB, 33 * MiB // 2, 0, 0],  # 15
    ["alloc", L1 + 3 * MiB, 5 * MiB, 0, 0],           # 16 from the 17 MiB block, split (12 MiB remain)
]
ALLOCATED = [
    0, 1024, 2048, 2048,
    2048 + 3 * MiB,                                   # 4: 3_147_776
    2048 + 3 * MiB + 17 * MiB,                        # 5: the unsplit 17 MiB block counts whole: 20_973_568
    20_973_568,
    20_973_568 + 12 * MiB + 512,                      # 7: 33_556_992
    33_556_992 - 1024, 33_555_968,                    # 8, 9
    33_555_968 - 3 * MiB, 30_410_240,                 # 10, 11
    30_410_240 + 3 * MiB,                             # 12: 33_555_968
    33_555_968 + 512,                                 # 13: 33_556_480
    33_556_480 - 17 * MiB, 15_730_688,                # 14, 15
    15_730_688 + 5 * MiB,                             # 16: 20_973_568
]
RESERVED = [2 * MiB] * 3 + [22 * MiB] * 3 + [36 * MiB] * 11


def test_rebuilt_allocator_state_follows_the_allocator_rules():
    truth = corpus_replay.reconstruct(TRACE)
    assert truth.problems == []
    assert truth.allocated == ALLOCATED
    assert truth.reserved == RESERVED


def test_our_allocator_model_reproduces_every_event_of_the_hand_built_trace():
    allocated, reserved, deferred = corpus_replay.replay_model(TRACE)
    # segment events are compared as part of the allocation after them; every other event exactly
    checked = [i for i, e in enumerate(TRACE) if e[0] != "segment_alloc"]
    assert [allocated[i] for i in checked] == [ALLOCATED[i] for i in checked]
    assert [reserved[i] for i in checked] == [RESERVED[i] for i in checked]
    assert deferred == 0


def test_a_trace_that_breaks_the_rules_is_flagged():
    bad = TRACE[:3] + [["alloc", S + 512, 100, 0, 0]]   # S + 512 lies inside the live block at S
    problems = corpus_replay.reconstruct(bad).problems
    assert problems == [f"event 3: alloc at {S + 512:#x} is not the start of a free block"]


def _stats(current, peak, reserved):
    return {"allocated_bytes.all": {"current": current, "peak": peak}, "reserved_bytes.all": {"current": reserved}}


def hand_record(**changes):
    """A record of TRACE: setup = events 0-7, forward = events 8-16, with the memory_stats they imply."""
    phases = [
        # setup starts empty, peaks at event 7 (33_556_992), ends with 36 MiB reserved
        {"step": 0, "phase": "setup", "events": [0, 8], "start": _stats(0, 0, 0),
         "end": _stats(33_556_992, 33_556_992, 36 * MiB)},
        # forward starts at 33_556_992 (the peak reset to it) and never goes above it
        {"step": 0, "phase": "forward", "events": [8, 17], "start": _stats(33_556_992, 33_556_992, 36 * MiB),
         "end": _stats(20_973_568, 33_556_992, 36 * MiB)},
    ]
    record = {"config": "hand", "phases": phases, "trace": {"events": TRACE, "origins": [
        {"kind": "tensor", "python": "", "native": ""}]}}
    record.update(changes)
    return record


def test_allocator_check_is_exact_on_the_hand_built_record():
    check = corpus_replay.check_allocator(hand_record())
    assert check.exact, check
    assert (check.compared, check.allocated_mismatches, check.reserved_mismatches) == (14, 0, 0)


def test_allocator_check_reports_memory_stats_the_trace_contradicts():
    record = hand_record()
    record["phases"][1]["end"]["allocated_bytes.all"]["peak"] = 40 * MiB
    check = corpus_replay.check_allocator(record)
    assert not check.exact
    # the rebuilt peak is the trace's, after event 7: 2048 + 3 MiB + 17 MiB + (12 MiB + 512) = 33,556,992 B
    assert check.boundary_mismatches == [f"0/forward peak: rebuilt {2048 + 32 * MiB + 512}, memory_stats {40 * MiB}"]


# -- the miss diff ------------------------------------------------------------------------------------


def test_misses_list_the_workspaces_the_emulation_lacks_by_kind():
    """mlp_sgd's setup recorded as its six parameters, forward as the emulated forward's allocations
    less one, plus cuBLAS (32 MiB) and cuBLASLt (1 MiB) workspaces: exactly those two are missed, and
    the dropped one is reported as made by the emulation only."""
    emulated = corpus_replay.emulate(corpus_configs.get("mlp_sgd"))
    # 1024x4096, 4096, 4096x4096, 4096, 4096x10, 10 fp32 parameters; 10 x 4 = 40 B rounds to 512
    params = [16 * MiB, 16384, 64 * MiB, 16384, 163840, 40]
    assert sorted(emulated.allocations[(0, "setup")]) == sorted(map(round_allocation, params))
    forward = emulated.allocations[(0, "forward")]
    dropped, kept = forward[0], forward[1:]
    origins = [{"kind": "tensor", "python": "", "native": ""},
               {"kind": "cublas_workspace", "python": "linear.py:125:forward", "native": "getCurrentCUDABlasHandle"},
               {"kind": "cublaslt_workspace", "python": "linear.py:125:forward", "native": "getCUDABlasLtWorkspace"}]
    events = [["alloc", 0x1000 * i, size, 0, 0] for i, size in enumerate(params)]
    events += [["alloc", 0x10_0000 + i, size, 0, 0] for i, size in enumerate(kept)]
    events += [["alloc", 0x20_0000, 32 * MiB, 0, 1], ["alloc", 0x30_0000, MiB, 0, 2]]
    record = {"phases": [{"step": 0, "phase": "setup", "events": [0, 6]},
                         {"step": 0, "phase": "forward", "events": [6, len(events)]}],
              "trace": {"events": events, "origins": origins}}
    missed, extra = corpus_replay.misses(record, emulated)
    assert [(m.phase, m.size, m.kind) for m in missed] == [("forward", 32 * MiB, "cublas_workspace"),
                                                          ("forward", MiB, "cublaslt_workspace")]
    assert corpus_replay.misses_by_kind(missed) == {"cublas_workspace": (1, 32 * MiB), "cublaslt_workspace": (1, MiB)}
    assert extra == {(0, "forward"): [dropped]}


def test_a_recordings_gpu_gets_its_library_workspaces_in_the_emulated_run():
    """The recording's environment names its GPU; the emulated run then holds that GPU's cuBLAS/cuBLASLt workspaces
    (CublasHandlePool.cpp: 32 MiB per thread on sm90, 1 MiB cuBLASLt), so a real trace's workspace allocations
    find their emulated match instead of being missed. The environment below is written for the test, not recorded."""
    environment = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "total_memory": 80 * 2**30}
    config = corpus_configs.get("mlp_sgd")
    plain, h100 = corpus_replay.emulate(config), corpus_replay.emulate(config, environment)
    # forward: the MLP's Linear with bias takes cuBLASLt -> 32 MiB + 1 MiB on the main thread; backward: 32 MiB
    assert h100.report.other_parts == {"cuBLAS workspace (main thread)": 32 * MiB,
                                       "cuBLASLt workspace (main thread)": MiB,
                                       "cuBLAS workspace (autograd thread)": 32 * MiB}
    assert h100.report.peak - plain.report.peak == 65 * MiB      # never freed, each its own block: additive
    assert h100.allocations[(0, "forward")].count(32 * MiB) == 1 and h100.allocations[(0, "backward")].count(32 * MiB) == 1
    assert h100.allocations[(1, "forward")].count(32 * MiB) == 0  # allocated once per process
    older = dict(environment, compute_capability="8.0", CUBLAS_WORKSPACE_CONFIG=":4096:8")   # the recording's own setting
    assert corpus_replay.emulate(config, older).report.other_parts["cuBLAS workspace (main thread)"] == 8 * 4096 * 1024


# -- the recorded corpus (skips until a GPU session records one) ----------------------------------


def _record(name):
    if name not in RECORDED:
        pytest.skip(f"no CUDA recording of {name} in {CORPUS}: {HOW}")
    return corpus_format.read_record(RECORDED[name])


NAMES = [c.name for c in corpus_configs.CONFIGS]


@pytest.fixture(scope="module")
def emulations():
    return {}


def _emulated(emulations, name):
    """The emulated run of ``name`` for the GPU and process settings of its recording (workspaces included)."""
    if name not in emulations:
        environment = corpus_format.read_record(RECORDED[name]).get("environment") if name in RECORDED else None
        emulations[name] = corpus_replay.emulate(corpus_configs.get(name), environment)
    return emulations[name]


@pytest.mark.parametrize("name", NAMES)
def test_recorded_trace_is_replayed_exactly_by_the_allocator_model(name):
    record = _record(name)
    assert record["device"] == "cuda" and record["trace"]["complete"], "the history must start empty"
    check = corpus_replay.check_allocator(record)
    assert check.boundary_mismatches == [] and check.problems == [], "the trace disagrees with memory_stats"
    assert check.allocated_mismatches == 0 and check.reserved_mismatches == 0, check.first_mismatch


@pytest.mark.parametrize("name", _gaps(NAMES))
def test_recorded_phases_against_the_emulated_prediction(name, emulations, record_property):
    record = _record(name)
    rows = corpus_replay.phase_table(record, _emulated(emulations, name))
    for row in rows:
        record_property(f"{row.step}/{row.phase}", f"recorded {row.recorded_peak} emulated {row.emulated_peak}")
    assert all(row.emulated_peak is not None for row in rows), "the emulation lacks a recorded phase"
    print("\n".join(f"{r.step}/{r.phase}: recorded {r.recorded_peak}, emulated {r.emulated_peak} "
                    f"({(r.peak_error or 0) * 100:+.2f}%)" for r in rows))


@pytest.mark.parametrize("name", _gaps(NAMES))
def test_the_emulation_misses_only_allocations_of_a_known_kind(name, emulations):
    """Library workspaces (cuBLAS, cuDNN, attention scratch) are listed, not modelled yet (issue 10 item 4);
    a plain tensor the emulation does not make is a bug in the emulation."""
    record = _record(name)
    if record["settings"]["stacks"] != "all":
        pytest.skip(f"{name} was recorded without C++ stacks (the recorder's fallback): kinds cannot be told apart")
    missed, _extra = corpus_replay.misses(record, _emulated(emulations, name))
    print({k: v for k, v in corpus_replay.misses_by_kind(missed).items()})
    plain = [m for m in missed if m.kind == "tensor"]
    assert not plain, "\n".join(f"{m.step}/{m.phase} {m.size} B {m.python} {m.native}" for m in plain)


def test_emulated_peak_meets_the_bar_over_the_recorded_corpus(emulations):
    if not RECORDED:
        pytest.skip(f"no CUDA recording in {CORPUS}: {HOW}")
    # the configurations the emulation cannot run yet fail (xfail) on their own above, not here
    errors = {n: corpus_replay.peak_error(corpus_format.read_record(p), _emulated(emulations, n))
              for n, p in RECORDED.items() if n not in EMULATION_GAPS}
    table = "\n".join(f"{n}: {e * 100:+.2f}%" for n, e in sorted(errors.items()))
    median, worst = statistics.median(map(abs, errors.values())), max(map(abs, errors.values()))
    assert median <= 0.01 and worst <= 0.03, f"median {median:.2%}, worst {worst:.2%} (bar 1%, 3%):\n{table}"
