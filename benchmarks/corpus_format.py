"""The recorded CUDA corpus on disk: a torch allocator snapshot turned into small gzip-compressed JSON.

``torch.cuda.memory._snapshot()`` returns ``{"segments": [...], "device_traces": [[entry, ...]],
"allocator_settings": {...}, ...}``; a trace entry is ``{"action", "addr", "size", "stream", "frames",
"time_us", ...}`` with ``action`` one of alloc, free_requested, free_completed, segment_alloc,
segment_free, segment_map, segment_unmap, oom, snapshot. We keep, per event, the action, address, size,
stream, the phase it fell in and a short description of who asked (the top Python frame and the
first informative C++ frame), plus a kind read off the whole stack (cuBLAS workspace, cuDNN, ...).
Python frame objects are never kept and nothing is ever pickled.

Events are stored as rows ``[action, addr, size, stream, origin]`` where ``origin`` indexes the
file's ``origins`` table of ``{"kind", "python", "native"}``: frames repeat a lot, rows stay short.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

FORMAT = "pytest-gpumem cuda corpus v1"
MAX_EVENTS = 60_000           #: events kept per configuration (a prefix: replay from empty stays valid)
ACTIONS = ("alloc", "free_requested", "free_completed", "segment_alloc", "segment_free",
           "segment_map", "segment_unmap", "oom", "snapshot")
#: memory_stats counters that count trace actions one for one (cumulative since the process started)
COUNTED = {"alloc": "allocation.all.allocated", "free_requested": "allocation.all.freed",
           "segment_alloc": "segment.all.allocated", "segment_free": "segment.all.freed"}

# kind of an allocation, first match wins, read off every frame name of its stack (C++ and Python)
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((kind, re.compile(pattern, re.I)) for kind, pattern in (
    ("cublaslt_workspace", r"BlasLtWorkspace|cublasLt.*workspace"),
    ("cublas_workspace", r"getCurrentCUDABlasHandle|getNewWorkspace|CUDABlasHandle|cublas.*workspace"),
    ("cudnn_attention", r"cudnn.*attention|attention.*cudnn|run_cudnn_SDP|_cudnn_attention"),
    ("cudnn_batch_norm", r"cudnn_batch_norm|cudnnBatchNorm|BatchNormalization.*cudnn"),
    ("cudnn_convolution", r"cudnn_convolution|raw_cudnn_convolution|cudnn.*conv|ConvolutionBackward"),
    ("cudnn_other", r"cudnn"),
    ("flash_attention", r"flash_attention|flash::|mha_fwd|mha_bwd|_flash_attn"),
    ("efficient_attention", r"efficient_attention|mem_eff|fmha"),
    ("embedding_backward", r"embedding_dense_backward|embedding_backward|embedding_bag_backward|embedding_renorm"),
    ("fused_optimizer", r"_fused_adam|_fused_sgd|_fused_adagrad|fused_adam"),
    ("foreach_optimizer", r"_foreach_"),
    ("grad_scaler", r"_amp_foreach_non_finite|_amp_update_scale|grad_scaler"),
    ("autocast_cache", r"cached_cast|autocast"),
))
# frames that say nothing about who asked: the allocator, tensor factories, dispatch and Python glue
_DULL = re.compile(r"unwind::|CapturedTraceback|gather_with_cpp|__libc_start_main|CachingAllocator|c10::cuda|"
                   r"c10::Storage|StorageImpl|at::empty|empty_cuda|empty_generic|at::detail::empty|TensorBase|"
                   r"TensorImpl|_ops::|c10::impl|c10::Dispatcher|BoxedKernel|wrapper_CUDA|make_boxed|"
                   r"torch::autograd::generated|VariableType|ADInplaceOrView|PyObject|_PyEval|_PyObject|"
                   r"_PyFunction|Py_|pybind11|\?\?|^$", re.I)


def classify(frame_names: Iterable[str]) -> str:
    """The kind of an allocation from its stack's frame names; "tensor" when nothing special shows."""
    names = list(frame_names)
    for kind, pattern in KINDS:
        if any(pattern.search(n) for n in names):
            return kind
    return "tensor"


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def origin_of(frames: Sequence[Mapping[str, Any]] | None) -> dict[str, str]:
    """``{"kind", "python", "native"}`` for one trace entry's frames (innermost first, as torch lists them)."""
    frames = frames or ()
    names = [str(f.get("name", "")) for f in frames]
    python = next((f"{Path(str(f.get('filename', ''))).name}:{f.get('line', 0)}:{f.get('name', '')}"
                   for f in frames if str(f.get("filename", "")).endswith(".py")), "")
    native = next((n for f, n in zip(frames, names)
                   if not str(f.get("filename", "")).endswith(".py") and not _DULL.search(n)), "")
    return {"kind": classify(names), "python": _short(python), "native": _short(native)}


def phase_boundaries(events: Sequence[Mapping[str, Any]], marks: Sequence[Mapping[str, int]]) -> list[int]:
    """Trace index at each mark: the longest prefix whose counted actions do not exceed the mark's counters.

    A mark holds ``torch.cuda.memory_stats()`` counters (``COUNTED``) read at a phase boundary. Each
    counted action bumps its counter by one, so the prefix that was recorded at the boundary is the
    longest one within every counter; uncounted actions after it (free_completed following its
    free_requested in the same call) belong to it too.
    """
    out, i, seen = [], 0, dict.fromkeys(COUNTED, 0)
    for mark in marks:
        while i < len(events):
            action = events[i]["action"]
            if action in COUNTED and seen[action] + 1 > int(mark.get(COUNTED[action], 0)):
                break
            if action in COUNTED:
                seen[action] += 1
            i += 1
        out.append(i)
    return out


@dataclass(frozen=True)
class ConvertedTrace:
    events: list[list[Any]]              #: [action, addr, size, stream, origin index]
    origins: list[dict[str, str]]
    phase_starts: list[int]              #: event index where each recorded phase begins
    total_events: int                    #: events in the snapshot before the cap
    truncated: bool
    segments: list[dict[str, Any]]       #: the allocator's segments when the snapshot was taken


def convert_snapshot(snapshot: Mapping[str, Any], marks: Sequence[Mapping[str, int]], *,
                     device: int = 0, max_events: int = MAX_EVENTS) -> ConvertedTrace:
    """Keep what a replay needs from a ``torch.cuda.memory._snapshot()`` dict (no frame objects)."""
    traces = snapshot.get("device_traces") or []
    raw = list(traces[device]) if device < len(traces) else []
    for entry in raw:
        if entry.get("action") not in ACTIONS:
            raise ValueError(f"unknown allocator trace action {entry.get('action')!r}; known: {', '.join(ACTIONS)}")
    starts = phase_boundaries(raw, marks)
    kept = raw[:max_events]
    origin_index: dict[tuple[str, str, str], int] = {}
    origins: list[dict[str, str]] = []
    events = []
    for entry in kept:
        origin = origin_of(entry.get("frames"))
        key = (origin["kind"], origin["python"], origin["native"])
        if key not in origin_index:
            origin_index[key] = len(origins)
            origins.append(origin)
        events.append([entry["action"], int(entry.get("addr", 0)), int(entry.get("size", 0)),
                       int(entry.get("stream", 0)), origin_index[key]])
    segments = [{"address": int(s["address"]), "total_size": int(s["total_size"]), "stream": int(s.get("stream", 0)),
                 "segment_type": s.get("segment_type"), "allocated_size": int(s.get("allocated_size", 0)),
                 "blocks": [{"address": int(b["address"]), "size": int(b["size"]),
                             "requested_size": int(b.get("requested_size", 0)), "state": b.get("state")}
                            for b in s.get("blocks", ())]}
                for s in snapshot.get("segments", ()) if int(s.get("device", device)) == device]
    return ConvertedTrace(events, origins, starts, len(raw), len(raw) > len(kept), segments)


# -- files ----------------------------------------------------------------------------------------


def write_json_gz(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as gzip-compressed JSON atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(json.dumps(data, separators=(",", ":"), sort_keys=False).encode())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(data, indent=1) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_record(path: Path) -> dict[str, Any]:
    """One recorded configuration, checked to be a corpus file of the format this code reads."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    return data
