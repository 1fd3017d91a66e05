"""CUDA allocator snapshots per test (--gpumem-snapshot): record history around a step, dump a pickle."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .atomic_files import remove_stale_temps, temp_name

#: Allocation events kept by torch while recording (torch's own default is 100000 too).
MAX_ENTRIES = 100_000


@dataclass
class SnapshotResult:
    """Where a snapshot went, or why none was taken."""

    path: Path | None = None  #: the pickle, viewable at pytorch.org/memory_viz; None when skipped
    note: str | None = None   #: why nothing was recorded, in words


def snapshot_filename(nodeid: str) -> str:
    """A file name for a test nodeid: readable, filesystem-safe, unique (a short hash of the nodeid)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("._")[:120] or "test"
    digest = hashlib.sha1(nodeid.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}.pickle"


@contextlib.contextmanager
def snapshot_context(directory: str | os.PathLike[str], nodeid: str, *, enabled: bool | None = None) -> Iterator[SnapshotResult]:
    """Record CUDA allocator history inside the block and dump it to ``directory``; a no-op with a note off cuda.

    ``enabled`` defaults to ``torch.cuda.is_available()``; pass False when the test's backend is not cuda.
    """
    result = SnapshotResult()
    import torch

    if enabled is None:
        enabled = torch.cuda.is_available()
    if not enabled or not torch.cuda.is_available():
        result.note = f"gpumem: no allocator snapshot for {nodeid}: snapshots need the cuda backend"
        yield result
        return
    from .._compat import dump_memory_snapshot, record_memory_history, stop_memory_history

    target = Path(directory) / snapshot_filename(nodeid)
    target.parent.mkdir(parents=True, exist_ok=True)
    record_memory_history(MAX_ENTRIES)
    try:
        yield result
    finally:  # dumped on failure too: an out-of-memory step is when a snapshot matters most
        remove_stale_temps(target)  # a dump cut short by a killed run
        partial = temp_name(target)
        try:
            dump_memory_snapshot(str(partial))
            os.replace(partial, target)
            result.path = target
        finally:
            stop_memory_history()
            if partial.exists():
                partial.unlink()
