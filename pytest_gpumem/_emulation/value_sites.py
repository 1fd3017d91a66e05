"""Where emulated code needed a value, and the errors that name it (op, code line, way out)."""
from __future__ import annotations

import os
import sys

import torch

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the package


class UnknownValueError(RuntimeError):
    """An op whose output shape depends on values the emulated backend does not have."""


class NoMetaKernelError(NotImplementedError):
    """An op torch (or an extension such as torchvision) cannot run on meta tensors at all."""


def _frames() -> list[tuple[str, int]]:
    frame, found = sys._getframe(1), []
    while frame is not None:
        found.append((frame.f_code.co_filename, frame.f_lineno))
        frame = frame.f_back
    return found


_PLUMBING = tuple(os.path.join(os.path.dirname(torch.__file__), *p.split("/")) for p in (
    "_ops.py", "_tensor.py", "overrides.py", "utils/_python_dispatch.py", "utils/_pytree.py", "utils/_contextlib.py",
    "_meta_registrations.py", "_refs", "_prims", "_decomp", "_subclasses", "_compile.py", "_dynamo"))


def _installed(path: str) -> bool:
    return "site-packages" in path or "dist-packages" in path or path.startswith(sys.base_prefix)


def user_site() -> str:
    """Where code needed a value: the innermost frame outside this package and torch's dispatch plumbing
    (``torch/optim/_adafactor.py:381``), then, when that is library code, the first frame of the caller's own
    code after "called from" (``test_model.py:12``)."""
    frames = [(f, n) for f, n in _frames() if not f.startswith(_OWN_DIR) and not f.startswith("<")]
    reading = next(((f, n) for f, n in frames if not f.startswith(_PLUMBING)), None)
    own = next(((f, n) for f, n in frames if not f.startswith(_TORCH_DIR) and not _installed(f)), None)
    if reading is None:
        return f"{own[0]}:{own[1]}" if own else "an unknown line"
    where = reading[0]
    if where.startswith(_TORCH_DIR):
        where = "torch/" + where[len(_TORCH_DIR):]
    text = f"{where}:{reading[1]}"
    if own is not None and own != reading:
        text += f" (called from {own[0]}:{own[1]})"
    return text
