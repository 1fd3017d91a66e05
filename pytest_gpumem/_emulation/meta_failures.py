"""Explain errors of value-dependent ops on meta tensors as advice to the user."""
from __future__ import annotations

import re

from .values import NoMetaKernelError, UnknownValueError


_META_FAILURES = (  # (text in the error, the op, what in user code calls it)
    ("Tensor.item() cannot be called on meta", "aten._local_scalar_dense",
     "Tensor.item(), float()/int()/bool() of a tensor, or an `if` on a tensor"),
    ("torch.nonzero()", "aten.nonzero", "nonzero, argwhere, torch.where(cond) or boolean-mask indexing x[mask]"),
    ("Cannot copy out of meta tensor", "aten._to_copy", "Tensor.tolist(), .cpu() or .to('cpu')"),
    ("convert meta device type tensor to numpy", "Tensor.numpy", "Tensor.numpy()"),
    ("repeat_interleave a meta tensor", "aten.repeat_interleave", "repeat_interleave without output_size"),
)


def explain_meta_failure(exc: BaseException) -> str | None:
    """Turn an error raised by a value-dependent op on meta tensors into advice; None if it is not one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (UnknownValueError, NoMetaKernelError)):
            return None  # its own message names the op, the line and the way out
        seen.add(id(exc))
        text = str(exc)
        op = hint = None
        for needle, op_name, what in _META_FAILURES:
            if needle in text:
                op, hint = op_name, what
                break
        missing = re.match(r"(\w+)::(\w+): attempted to run this operator with Meta tensors", text)
        if op is None and missing:
            op = f"{missing.group(1)}.{missing.group(2)}"
            hint = "an op whose output shape or value depends on tensor data"
        if op is None and type(exc).__name__ in ("DataDependentOutputException", "DynamicOutputShapeException"):
            op, hint = text.split()[0] if text else type(exc).__name__, "an op whose output depends on tensor data"
        if op is not None:
            return (f"the emulated backend runs on meta tensors and cannot compute values: {op} ({hint}) in your "
                    "model or loss; move value-dependent code out of the measured step, or use backend='cpu'")
        exc = exc.__cause__ or exc.__context__
    return None
