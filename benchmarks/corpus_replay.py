"""Replay the recorded CUDA corpus on the CPU: allocator model, emulated prediction, and what it misses.

Three comparisons per recorded configuration:
1. ``check_allocator``: the real allocator's state is rebuilt from the trace's own addresses (which free
   block each allocation took; a block is split when more than 1 MiB would remain in the large pool, at
   least 512 B in the small one) and checked against memory_stats at every phase boundary; then our
   ``CachingAllocatorModel`` replays the same requests and must match allocated and reserved bytes
   after every event.
2. ``phase_table``: the emulated backend runs the same step (corpus_configs) and its per-phase peak and
   retained bytes are set against the recorded memory_stats.
3. ``misses``: per phase, recorded allocations with no emulated allocation of the same rounded size,
   by kind (cuBLAS workspace, cuDNN, ...), and emulated ones the GPU never made.

    python benchmarks/corpus_replay.py                 # every recorded configuration in tests/data/cuda_corpus
    python benchmarks/corpus_replay.py --only resnet   # those whose name contains 'resnet'
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pytest_gpumem._measure.allocator import SMALL_REQUEST, SMALL_SEGMENT, CachingAllocatorModel, round_allocation

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "tests" / "data" / "cuda_corpus"
MIN_LARGE_SPLIT = SMALL_REQUEST   #: a large-pool block is split only when more than this would remain
MIN_SMALL_SPLIT = 512             #: a small-pool block is split when at least this would remain


@dataclass
class _Segment:
    base: int
    size: int
    small: bool
    free: dict[int, int] = field(default_factory=dict)    # start -> end of each free range
    starts: list[int] = field(default_factory=list)       # sorted starts of the free ranges

    def add_free(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] == end:            # merge with the range after
            end = self.free.pop(end)
            del self.starts[i]
        if i > 0 and self.free[self.starts[i - 1]] == start:          # merge with the range before
            start = self.starts[i - 1]
        else:
            self.starts.insert(i, start)
        self.free[start] = end


@dataclass
class Truth:
    """Allocated and reserved bytes after each event, as the real allocator had them."""

    allocated: list[int]
    reserved: list[int]
    problems: list[str]          #: where the trace contradicts the allocator rules assumed above


def reconstruct(events: Sequence[Sequence[Any]]) -> Truth:
    """The real allocator's allocated/reserved bytes after each event, from the addresses in the trace."""
    segments: dict[int, _Segment] = {}
    bases: list[int] = []
    blocks: dict[int, int] = {}          # address -> block size, live (or awaiting free_completed)
    allocated = reserved = 0
    out_alloc, out_res, problems = [], [], []
    for i, (action, addr, size, _stream, _origin) in enumerate(events):
        if action == "segment_alloc":
            seg = _Segment(addr, size, size == SMALL_SEGMENT)
            seg.add_free(addr, addr + size)
            segments[addr] = seg
            bisect.insort(bases, addr)
            reserved += size
        elif action == "segment_free":
            segments.pop(addr, None)
            if addr in bases:
                bases.remove(addr)
            reserved -= size
        elif action == "alloc":
            j = bisect.bisect_right(bases, addr) - 1
            seg = segments.get(bases[j]) if j >= 0 else None
            rounded = round_allocation(size)
            if seg is None or addr not in seg.free:
                problems.append(f"event {i}: alloc at {addr:#x} is not the start of a free block")
                block = rounded
            else:
                end = seg.free.pop(addr)
                seg.starts.remove(addr)
                rest = end - addr - rounded
                split = rest >= MIN_SMALL_SPLIT if seg.small else rest > MIN_LARGE_SPLIT
                block = rounded if split else end - addr
                if split:
                    seg.add_free(addr + rounded, end)
            blocks[addr] = block
            allocated += block
        elif action == "free_requested":
            allocated -= blocks.get(addr, 0)
        elif action == "free_completed":
            block = blocks.pop(addr, None)
            j = bisect.bisect_right(bases, addr) - 1
            if block is None or j < 0:
                problems.append(f"event {i}: free_completed at {addr:#x} of no live block")
            else:
                segments[bases[j]].add_free(addr, addr + block)
        out_alloc.append(allocated)
        out_res.append(reserved)
    return Truth(out_alloc, out_res, problems)


def replay_model(events: Sequence[Sequence[Any]]) -> tuple[list[int], list[int], int]:
    """Our allocator model fed the trace's requests: allocated and reserved after each event, and how
    many frees completed later than requested (another stream; the model frees at the request)."""
    model = CachingAllocatorModel()
    allocated, reserved, deferred = [], [], 0
    pending: str | None = None
    for action, addr, size, _stream, _origin in events:
        if action == "alloc":
            model.malloc(addr, round_allocation(size))
        elif action == "free_requested":
            model.free(addr)
        if pending is not None and action != "free_completed":
            deferred += 1
        pending = "free" if action == "free_requested" else None
        allocated.append(model.allocated)
        reserved.append(model.reserved)
    return allocated, reserved, deferred


@dataclass
class AllocatorCheck:
    name: str
    events: int
    compared: int                                     #: events after which both figures were compared
    allocated_mismatches: int
    reserved_mismatches: int
    first_mismatch: str | None
    boundary_mismatches: list[str]                    #: rebuilt truth vs memory_stats at phase boundaries
    problems: list[str]
    deferred_frees: int
    segment_frees: int

    @property
    def exact(self) -> bool:
        return not (self.allocated_mismatches or self.reserved_mismatches or self.boundary_mismatches
                    or self.problems)


def check_allocator(record: Mapping[str, Any]) -> AllocatorCheck:
    """Rebuild the real figures from the trace, check them against memory_stats, then replay our model."""
    events = record["trace"]["events"]
    truth = reconstruct(events)
    boundaries = []
    for p in record["phases"]:
        begin, end = p["events"]
        if end > len(events):
            break                         # a truncated trace: only the phases it holds whole
        start_alloc = truth.allocated[begin - 1] if begin else 0
        recorded = p["start"]["allocated_bytes.all"]["current"]
        if start_alloc != recorded:
            boundaries.append(f"{p['step']}/{p['phase']} start: rebuilt {start_alloc}, memory_stats {recorded}")
        peak = max([start_alloc, *truth.allocated[begin:end]])
        if peak != p["end"]["allocated_bytes.all"]["peak"]:
            boundaries.append(f"{p['step']}/{p['phase']} peak: rebuilt {peak}, "
                              f"memory_stats {p['end']['allocated_bytes.all']['peak']}")
        res = truth.reserved[end - 1] if end else 0
        if res != p["end"]["reserved_bytes.all"]["current"]:
            boundaries.append(f"{p['step']}/{p['phase']} end reserved: rebuilt {res}, "
                              f"memory_stats {p['end']['reserved_bytes.all']['current']}")
    model_alloc, model_res, deferred = replay_model(events)
    compared = bad_alloc = bad_res = 0
    first = None
    for i, ev in enumerate(events):
        if ev[0] not in ("alloc", "free_requested", "free_completed"):
            continue                      # segment events belong to the allocation that follows
        compared += 1
        a_ok, r_ok = model_alloc[i] == truth.allocated[i], model_res[i] == truth.reserved[i]
        bad_alloc += not a_ok
        bad_res += not r_ok
        if first is None and not (a_ok and r_ok):
            first = (f"event {i} ({ev[0]} {ev[2]} B at {ev[1]:#x}): allocated model {model_alloc[i]} vs real "
                     f"{truth.allocated[i]}, reserved model {model_res[i]} vs real {truth.reserved[i]}")
    return AllocatorCheck(record["config"], len(events), compared, bad_alloc, bad_res, first, boundaries,
                          truth.problems, deferred, sum(1 for e in events if e[0] == "segment_free"))


# -- the emulated backend on the same step ------------------------------------------------------------


@dataclass
class Emulated:
    report: Any                                        #: the StepReport
    allocations: dict[tuple[int, str], list[int]]      #: (step, phase) -> rounded sizes allocated, in order


def recorded_gpu(environment: Mapping[str, Any] | None) -> Any:
    """The DeviceProfile of the GPU a recording was made on (None when it names none): its name, compute
    capability and memory as the driver reported them, so the emulation adds that GPU's library workspaces."""
    from pytest_gpumem._cuda_facts.devices import from_properties

    if not environment or not environment.get("gpu") or not environment.get("compute_capability"):
        return None
    major, minor = (int(x) for x in str(environment["compute_capability"]).split("."))
    return from_properties(environment["gpu"], major, minor, int(environment.get("total_memory") or 0))


#: environment variables of the recording process the emulation reads (the recorder keeps them)
PROCESS_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG",
                     "CUBLASLT_WORKSPACE_SIZE", "TORCH_CUBLASLT_UNIFIED_WORKSPACE", "DISABLE_ADDMM_CUDA_LT")


def emulate(config: Any, environment: Mapping[str, Any] | None = None) -> Emulated:
    """Run ``config`` (a corpus_configs.CorpusConfig) on the emulated backend, as the recorder ran it; with a
    recording's ``environment``, for its GPU and its process's allocator and workspace settings."""
    from corpus_configs import seeded
    from pytest_gpumem import measure_step
    from pytest_gpumem._measure.backends import EmulatedBackend
    from pytest_gpumem._emulation import EmulatedGradScaler

    process = {k: str(environment[k]) for k in PROCESS_VARIABLES if environment and environment.get(k) is not None}
    backend = EmulatedBackend(profile=recorded_gpu(environment), environment=process)
    model, (inputs, target) = seeded(config.model), seeded(config.batch)
    optimizer = config.optimizer(model.parameters())
    attention = contextlib.nullcontext()
    if config.sdpa_backend:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = sdpa_kernel(getattr(SDPBackend, config.sdpa_backend))
    with attention:
        report = measure_step(model, optimizer, inputs, target=target, loss_fn=config.loss, backend=backend,
                              autocast_dtype=config.autocast,
                              scaler=EmulatedGradScaler("cuda") if config.scaler else None)
    tracker = backend.trackers[-1]
    allocations: dict[tuple[int, str], list[int]] = {(r.step, r.phase.value): [] for r in tracker.replay()}
    for event in tracker.allocations():
        if event.phase is not None and event.size > 0:
            allocations.setdefault((event.step, event.phase.value), []).append(event.size)
    return Emulated(report, allocations)


@dataclass(frozen=True)
class PhaseRow:
    step: int
    phase: str
    recorded_peak: int
    emulated_peak: int | None
    recorded_retained: int
    emulated_retained: int | None

    @property
    def peak_error(self) -> float | None:
        if self.emulated_peak is None or not self.recorded_peak:
            return None
        return (self.emulated_peak - self.recorded_peak) / self.recorded_peak


def phase_table(record: Mapping[str, Any], emulated: Emulated) -> list[PhaseRow]:
    """Recorded memory_stats against the emulated figures, per (step, phase)."""
    stats = {(s.index, ph.value): st for s in emulated.report.steps for ph, st in s.phases.items()}
    rows = []
    for p in record["phases"]:
        st = stats.get((p["step"], p["phase"]))
        rows.append(PhaseRow(p["step"], p["phase"], p["end"]["allocated_bytes.all"]["peak"],
                             st.peak if st else None, p["end"]["allocated_bytes.all"]["current"],
                             st.retained if st else None))
    return rows


def peak_error(record: Mapping[str, Any], emulated: Emulated) -> float:
    """(emulated peak - real max_memory_allocated) / real, over the whole recording."""
    real = record["max_memory_allocated"]
    return (emulated.report.peak - real) / real


@dataclass(frozen=True)
class Miss:
    step: int
    phase: str
    size: int          #: rounded bytes
    kind: str
    python: str
    native: str


def misses(record: Mapping[str, Any], emulated: Emulated) -> tuple[list[Miss], dict[tuple[int, str], list[int]]]:
    """Recorded allocations the emulation has no same-sized allocation for, phase by phase; and the
    emulated allocations the GPU never made (same keys as ``Emulated.allocations``)."""
    events, origins = record["trace"]["events"], record["trace"]["origins"]
    missed: list[Miss] = []
    extra: dict[tuple[int, str], list[int]] = {}
    for p in record["phases"]:
        key = (p["step"], p["phase"])
        left = Counter(emulated.allocations.get(key, ()))
        begin, end = p["events"]
        for action, _addr, size, _stream, origin in events[begin:end]:
            if action != "alloc":
                continue
            rounded = round_allocation(size)
            if left[rounded] > 0:
                left[rounded] -= 1
            else:
                o = origins[origin]
                missed.append(Miss(p["step"], p["phase"], rounded, o["kind"], o["python"], o["native"]))
        if +left:
            extra[key] = sorted((+left).elements())
    return missed, extra


def misses_by_kind(found: Sequence[Miss]) -> dict[str, tuple[int, int]]:
    """kind -> (count, bytes) of the missed allocations."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for m in found:
        out[m.kind][0] += 1
        out[m.kind][1] += m.size
    return {k: (v[0], v[1]) for k, v in sorted(out.items(), key=lambda kv: -kv[1][1])}


# -- the corpus -----------------------------------------------------------------------------------


def recorded(corpus: Path = CORPUS) -> Iterator[tuple[str, Path]]:
    """(name, file) of every configuration recorded on a GPU in ``corpus``, from its index."""
    import json

    index = corpus / "index.json"
    if not index.exists():
        return
    data = json.loads(index.read_text())
    if data.get("device") != "cuda":
        return
    for entry in data.get("configs", ()):
        path = corpus / entry.get("file", f"{entry['name']}.json.gz")
        if entry.get("status") == "ok" and path.exists():
            yield entry["name"], path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.2f}%"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    import corpus_configs
    from corpus_format import read_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--only", metavar="TEXT")
    args = parser.parse_args(argv)
    found = [(n, p) for n, p in recorded(args.corpus) if not args.only or args.only in n]
    if not found:
        print(f"no CUDA recording in {args.corpus}: on a GPU run `bash benchmarks/gpu_session.sh` "
              "(or `python benchmarks/record_cuda_corpus.py`)")
        return 1
    errors = []
    for name, path in found:
        record = read_record(path)
        check = check_allocator(record)
        print(f"\n== {name}  ({record['environment'].get('gpu')}, torch {record['environment']['torch']})")
        print(f"allocator replay: {check.compared} events compared, allocated mismatches {check.allocated_mismatches}, "
              f"reserved mismatches {check.reserved_mismatches}; boundaries off {len(check.boundary_mismatches)}; "
              f"trace problems {len(check.problems)}")
        if check.first_mismatch:
            print(f"  first: {check.first_mismatch}")
        emulated = emulate(corpus_configs.get(name), record.get("environment"))
        err = peak_error(record, emulated)
        errors.append(err)
        print(f"max_memory_allocated {record['max_memory_allocated']}, emulated {emulated.report.peak} ({_pct(err)})")
        for row in phase_table(record, emulated):
            print(f"  {row.step}/{row.phase:<10} recorded {row.recorded_peak:>12}  emulated {row.emulated_peak!s:>12}  "
                  f"{_pct(row.peak_error):>9}   retained {row.recorded_retained:>12} / {row.emulated_retained!s:>12}")
        missed, extra = misses(record, emulated)
        for kind, (count, nbytes) in misses_by_kind(missed).items():
            print(f"  missed {kind}: {count} allocations, {nbytes} B")
        for m in missed:
            print(f"    {m.step}/{m.phase} {m.size} B {m.kind}  {m.python}  {m.native}")
        for (step, phase), sizes in extra.items():
            print(f"  emulated only, {step}/{phase}: {sizes}")
    abs_err = [abs(e) for e in errors]
    print(f"\nemulated vs max_memory_allocated over {len(errors)} configurations: median "
          f"{statistics.median(abs_err) * 100:.2f}%, worst {max(abs_err) * 100:.2f}% (bar: 1% and 3%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
