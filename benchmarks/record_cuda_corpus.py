"""Record the CUDA corpus: every configuration of corpus_configs.py as a plain training step on a real GPU.

No pytest and no tracker of ours: the step is plain PyTorch, run twice (first step, steady step), each
configuration in a fresh Python process so its allocator history starts empty. Per phase (setup, batch,
forward, backward, optimizer, zero_grad) it keeps torch.cuda.memory_stats (allocated, reserved, active,
requested: current and peak, peaks reset at each phase start) and max_memory_allocated; and the whole
allocator trace of torch.cuda.memory._record_memory_history as JSON (corpus_format.py; never pickle),
with the GPU, torch, CUDA and cuDNN versions and the allocator settings.

    python benchmarks/record_cuda_corpus.py                  # on a GPU: tests/data/cuda_corpus/*.json.gz + index.json
                                                             # (pytest_gpumem importable: pip install -e . first)
    python benchmarks/record_cuda_corpus.py --only lm_       # configurations whose name contains 'lm_'
    python benchmarks/record_cuda_corpus.py --device cpu --out /tmp/corpus   # CPU dry run: steps run, no stats
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "tests" / "data" / "cuda_corpus"
HISTORY_ENTRIES = 1_000_000        #: ring size asked of torch: large, so the history never wraps
STAT_KEYS = ("allocated_bytes", "reserved_bytes", "active_bytes", "requested_bytes")
POOLS = ("all", "small_pool", "large_pool")


def _stats(torch: Any) -> dict[str, Any]:
    """The memory_stats figures a replay compares with, plus the counters that place phase boundaries."""
    from corpus_format import COUNTED

    raw = torch.cuda.memory_stats()
    out: dict[str, Any] = {f"{key}.{pool}": {"current": int(raw.get(f"{key}.{pool}.current", 0)),
                                             "peak": int(raw.get(f"{key}.{pool}.peak", 0))}
                           for key in STAT_KEYS for pool in POOLS}
    out["counters"] = {name: int(raw.get(name, 0)) for name in
                       (*COUNTED.values(), "num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free")}
    out["max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
    out["max_memory_reserved"] = int(torch.cuda.max_memory_reserved())
    return out


class PhaseLog:
    """Times each phase and, on CUDA, reads memory_stats at its start and end (peaks reset at the start)."""

    def __init__(self, torch: Any, cuda: bool) -> None:
        self.torch, self.cuda, self.phases = torch, cuda, []

    @contextlib.contextmanager
    def phase(self, step: int, name: str) -> Iterator[None]:
        torch, record = self.torch, {"step": step, "phase": name}
        if self.cuda:
            torch.cuda.synchronize()
            record["start"] = _stats(torch)
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
            record["end"] = _stats(torch)
        record["seconds"] = round(time.perf_counter() - started, 4)
        self.phases.append(record)


def environment(torch: Any, cuda: bool) -> dict[str, Any]:
    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        **{var: os.environ.get(var)
           for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "TORCH_SYMBOLIZE_MODE", "CUBLAS_WORKSPACE_CONFIG",
                       "CUBLASLT_WORKSPACE_SIZE", "TORCH_CUBLASLT_UNIFIED_WORKSPACE", "DISABLE_ADDMM_CUDA_LT")},
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   total_memory=int(props.total_memory), multiprocessors=int(props.multi_processor_count))
    return env


def run_step(torch: Any, cfg: Any, device: str, log: PhaseLog) -> list[str]:
    """Setup, batch, then two training steps of ``cfg`` on ``device``; returns notes on what was not forced."""
    from corpus_configs import seeded

    notes: list[str] = []
    cuda = device == "cuda"
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    model, (inputs, target) = seeded(cfg.model), seeded(cfg.batch)
    with log.phase(0, "setup"):
        model = model.to(device)
        optimizer = cfg.optimizer(model.parameters())
        scaler = torch.amp.GradScaler(device) if cfg.scaler else None
    with log.phase(0, "batch"):
        inputs, target = inputs.to(device), target.to(device)
    attention = contextlib.nullcontext
    if cfg.sdpa_backend and cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = lambda: sdpa_kernel(getattr(SDPBackend, cfg.sdpa_backend))  # noqa: E731
    elif cfg.sdpa_backend:
        notes.append(f"sdpa backend {cfg.sdpa_backend} not forced on {device}")
    for step in range(2):
        with log.phase(step, "forward"):
            with torch.autocast(device, dtype=cfg.autocast, enabled=cfg.autocast is not None), attention():
                output = model(inputs)
                loss = cfg.loss(output, target)
        with log.phase(step, "backward"):
            (scaler.scale(loss) if scaler is not None else loss).backward()
            del output, loss            # as a lean loop does: nothing of the step outlives backward
        with log.phase(step, "optimizer"):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        with log.phase(step, "zero_grad"):
            optimizer.zero_grad()
    return notes


def record_one(name: str, device: str, stacks: str, max_events: int) -> dict[str, Any]:
    """Record configuration ``name`` in this process (which must not have touched CUDA before)."""
    import torch

    import corpus_configs
    from corpus_format import FORMAT, convert_snapshot
    from pytest_gpumem import _compat   # the private torch calls, in one checked place

    cfg = corpus_configs.get(name)
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda needs a GPU: torch.cuda.is_available() is False "
                           "(use --device cpu for a dry run)")
    if cuda:
        _compat.record_allocator_trace(HISTORY_ENTRIES, stacks=stacks)
    log = PhaseLog(torch, cuda)
    started = time.perf_counter()
    notes = run_step(torch, cfg, device, log)
    seconds = time.perf_counter() - started
    record: dict[str, Any] = {
        "format": FORMAT, "config": cfg.name, "device": device, "tags": list(cfg.tags),
        "settings": {"optimizer": cfg.optimizer.__name__, "autocast": str(cfg.autocast) if cfg.autocast else None,
                     "scaler": cfg.scaler, "sdpa_backend": cfg.sdpa_backend, "cudnn_benchmark": cfg.cudnn_benchmark,
                     "steps": 2, "stacks": stacks},
        "environment": environment(torch, cuda), "notes": notes, "seconds": round(seconds, 3),
        "phases": log.phases,
    }
    if not cuda:
        return record
    torch.cuda.synchronize()
    snapshot = _compat.allocator_snapshot()
    _compat.stop_memory_history()
    marks = [p["start"]["counters"] for p in log.phases] + [log.phases[-1]["end"]["counters"]]
    trace = convert_snapshot(snapshot, marks, max_events=max_events)
    for phase, (begin, end) in zip(log.phases, zip(trace.phase_starts, trace.phase_starts[1:])):
        phase["events"] = [begin, end]
    allocs = sum(1 for e in trace.events if e[0] == "alloc") if not trace.truncated else None
    record["max_memory_allocated"] = max(p["end"]["max_memory_allocated"] for p in log.phases)
    record["max_memory_reserved"] = max(p["end"]["max_memory_reserved"] for p in log.phases)
    record["trace"] = {
        "max_events": max_events, "total_events": trace.total_events, "truncated": trace.truncated,
        # the history began before the first allocation iff it holds every allocation memory_stats counted
        "complete": allocs == log.phases[-1]["end"]["counters"]["allocation.all.allocated"],
        "allocator_settings": snapshot.get("allocator_settings", {}),
        "origins": trace.origins, "events": trace.events, "segments": trace.segments,
    }
    return record


# -- the driver: one subprocess per configuration ---------------------------------------------------


def _child(name: str, path: Path, device: str, stacks: str, max_events: int, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("TORCH_SYMBOLIZE_MODE", "dladdr")   # fast C++ symbol names (no addr2line per frame)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--out", str(path), "--device", device,
           "--stacks", stacks, "--max-events", str(max_events)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
    except subprocess.TimeoutExpired:
        status, tail = f"timed out after {timeout:.0f}s", []
    return {"name": name, "status": status, "stacks": stacks, "seconds": round(time.perf_counter() - started, 1),
            "output": tail}


def _summary(path: Path) -> dict[str, Any]:
    from corpus_format import read_record

    data = read_record(path)
    trace = data.get("trace", {})
    return {"file": path.name, "bytes": path.stat().st_size, "max_memory_allocated": data.get("max_memory_allocated"),
            "max_memory_reserved": data.get("max_memory_reserved"), "events": len(trace.get("events", ())),
            "truncated": trace.get("truncated"), "complete": trace.get("complete"),
            "gpu": data["environment"].get("gpu"), "torch": data["environment"]["torch"]}


def record_all(names: list[str], out: Path, device: str, jobs: int, timeout: float, budget: float,
               max_events: int) -> list[dict[str, Any]]:
    """Record ``names`` with ``jobs`` processes at once; none starts once ``budget`` seconds are spent."""
    started = time.perf_counter()

    def one(name: str) -> dict[str, Any]:
        if time.perf_counter() - started > budget:
            return {"name": name, "status": f"not run: the {budget:.0f}s budget was spent", "seconds": 0}
        path = out / f"{name}.json.gz"
        result = _child(name, path, device, "all", max_events, timeout)
        if result["status"] != "ok" and device == "cuda" and time.perf_counter() - started < budget:
            retry = _child(name, path, device, "python", max_events, timeout)   # C++ stacks are the usual suspect
            retry["first_attempt"] = result
            result = retry
        if result["status"] == "ok":
            result.update(_summary(path))
        print(f"  {name}: {result['status']} in {result['seconds']}s", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, names))


def write_index(out: Path, results: list[dict[str, Any]], device: str, max_events: int) -> Path:
    """index.json beside the files: the entries of this run replace those of the same name."""
    from corpus_format import FORMAT, write_json

    path = out / "index.json"
    old = json.loads(path.read_text()).get("configs", []) if path.exists() else []
    fresh = {r["name"] for r in results}
    configs = sorted([c for c in old if c["name"] not in fresh] + results, key=lambda c: c["name"])
    write_json(path, {"format": FORMAT, "device": device, "max_events_per_file": max_events,
                      "updated_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "record_command": "python benchmarks/record_cuda_corpus.py", "configs": configs})
    return path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        help=f"folder (default {CORPUS.relative_to(HERE.parent)}); with --one, the file")
    parser.add_argument("--only", metavar="TEXT", help="record the configurations whose name contains TEXT")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run every step on the CPU to check the configurations (no stats, no trace)")
    parser.add_argument("--jobs", type=int, default=4, help="configurations recorded at once (processes; default 4)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one configuration may take (default 120)")
    parser.add_argument("--budget", type=float, default=420, help="no configuration starts after this many seconds")
    parser.add_argument("--max-events", type=int, default=None, help="trace events kept per file (a prefix)")
    parser.add_argument("--stacks", choices=("all", "python"), default="all", help=argparse.SUPPRESS)
    parser.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    args = parser.parse_args(argv)
    import corpus_configs
    from corpus_format import MAX_EVENTS, write_json_gz

    max_events = args.max_events or MAX_EVENTS
    if args.list:
        print("\n".join(f"{c.name}  [{', '.join(c.tags)}]" for c in corpus_configs.CONFIGS))
        return 0
    if args.one:
        if args.out is None:
            parser.error("--one needs --out FILE")
        write_json_gz(args.out, record_one(args.one, args.device, args.stacks, max_events))
        return 0
    out = (args.out or CORPUS).resolve()
    if args.device != "cuda" and out == CORPUS.resolve():
        parser.error(f"--device {args.device} never writes into {CORPUS}: that folder holds real CUDA recordings; "
                     "give --out DIR")
    names = [c.name for c in corpus_configs.CONFIGS if not args.only or args.only in c.name]
    if not names:
        parser.error(f"no configuration name contains {args.only!r} (see --list)")
    print(f"recording {len(names)} configurations on {args.device} into {out} ({args.jobs} at a time)", flush=True)
    results = record_all(names, out, args.device, args.jobs, args.timeout, args.budget, max_events)
    index = write_index(out, results, args.device, max_events)
    bad = [r for r in results if r["status"] != "ok"]
    for r in bad:
        print(f"{r['name']}: {r['status']}\n    " + "\n    ".join(r.get("output", [])))
    print(f"{len(results) - len(bad)}/{len(results)} recorded; index: {index}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
