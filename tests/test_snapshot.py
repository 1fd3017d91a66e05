"""--gpumem-snapshot: a CUDA allocator snapshot per test; a no-op with a note elsewhere."""
from __future__ import annotations

import pickletools
from pathlib import Path

import pytest
import torch

from pytest_gpumem._reporting.snapshot import snapshot_context, snapshot_filename


def test_filenames_are_safe_and_distinct() -> None:
    a, b = snapshot_filename("tests/t.py::test_x[a/b]"), snapshot_filename("tests/t.py::test_x[a_b]")
    assert a != b and "/" not in a and a.endswith(".pickle") and a.startswith("tests_t.py_test_x_a_b")


def test_no_op_with_a_note_off_cuda(tmp_path: Path) -> None:
    with snapshot_context(tmp_path, "t.py::test_x", enabled=False) as snap:
        pass
    assert snap.path is None and "need the cuda backend" in snap.note
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="allocator snapshots need a CUDA GPU")
def test_dumps_a_snapshot_on_cuda(tmp_path: Path) -> None:
    with snapshot_context(tmp_path, "t.py::test_x") as snap:
        x = torch.empty(1 << 20, device="cuda")
        del x
    assert snap.path is not None and snap.path.parent == tmp_path
    # The dump is torch's memory_viz format, a pickle. It is read here without unpickling (no pickle loads, by
    # the project's rule): pickletools walks the opcodes to the final STOP (a cut-short file raises) and lists the
    # strings they push, without building an object or running any code from the file.
    opcodes = list(pickletools.genops(snap.path.read_bytes()))
    assert opcodes[-1][0].name == "STOP"
    strings = {arg for _, arg, _ in opcodes if isinstance(arg, str)}
    assert {"segments", "device_traces", "action", "alloc"} <= strings
