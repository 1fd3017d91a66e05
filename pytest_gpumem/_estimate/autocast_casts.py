"""The estimate's autocast: cast a traced op's meta inputs as ``torch.autocast("cuda")`` would.

Real autocast never touches meta tensors, so the trace applies the policy itself, by op name, from
``_cuda_facts.autocast`` (the table the emulated backend reads too, through its own code). Casts go through
autograd like the real ones, so what the op saves is the cast copy; casts of parameters are cached for the
trace, as autocast caches them until its outermost region exits.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .. import _compat
from .._cuda_facts import autocast as facts


@contextlib.contextmanager
def cuda_autocast_state(dtype: torch.dtype | None) -> Iterator[None]:
    """CUDA's autocast flag and dtype set for this thread (no GPU needed), put back on exit; ``None``: unchanged.

    A model's own ``torch.autocast("cuda", enabled=False)`` then turns it off inside, as on a GPU."""
    if dtype is None:
        yield
        return
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])


@contextlib.contextmanager
def cuda_autocast_without_gpu() -> Iterator[None]:
    """``torch.autocast("cuda")`` entered by the model itself stays on without a GPU (it would disable itself), so
    the trace casts inside it as a GPU would; a no-op where a GPU is present."""
    if torch.cuda.is_available():
        yield
        return
    # it checks availability, then bf16 support (the target GPU, sm90, has it)
    targets = [(*_compat.amp_availability_patch_target(), False), (torch.cuda, "is_bf16_supported", True)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    for owner, name, answer in targets:
        setattr(owner, name, lambda *args, _answer=answer, **kwargs: _answer)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _eligible(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta" and facts.eligible(t.dtype)


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for v in (*args, *kwargs.values()):
        out.extend(t for t in (v if isinstance(v, (list, tuple)) else (v,)) if isinstance(t, torch.Tensor))
    return out


class AutocastCasts:
    """Casts by policy with a weight cache that lives as long as this object (one trace)."""

    def __init__(self) -> None:
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  #: id(parameter) -> (parameter, its copy)

    @staticmethod
    def policy(func: Any) -> str | None:
        """The op's autocast policy by its name (``torch.mm``, ``F.linear``, ``Tensor.__matmul__`` alike)."""
        return facts.POLICY.get(getattr(func, "__name__", None))

    def apply(self, policy: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """(args, kwargs) as CUDA autocast hands them to the op; unchanged when autocast is off or nothing is
        eligible. Raises for a banned op, as autocast does."""
        if not torch.is_autocast_enabled("cuda") or "out" in kwargs:
            return args, kwargs
        tensors = [t for t in _tensors(args, kwargs) if _eligible(t)]
        if not tensors:
            return args, kwargs
        if policy == "banned":
            raise RuntimeError("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to "
                               "autocast; use binary_cross_entropy_with_logits or BCEWithLogitsLoss.")
        if policy == "fp32_dtype":  # reductions: dtype=float32 unless given, no copy of the input
            first = _tensors(args, kwargs)[0]
            explicit = kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args)
            return (args, kwargs) if explicit or not _eligible(first) else (args, {**kwargs, "dtype": torch.float32})
        dtype = facts.cast_to(policy, torch.get_autocast_dtype("cuda"), [t.dtype for t in tensors])
        return self._cast(args, dtype), {k: self._cast(v, dtype) for k, v in kwargs.items()}

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if not _eligible(value) or value.dtype is dtype:
            return value
        if not facts.weight_cast_cached(dtype, torch.get_autocast_dtype("cuda"), value.dtype, value.requires_grad,
                                        value.is_leaf, _compat.is_view(value), torch.is_autocast_cache_enabled()):
            return value.to(dtype)
        hit = self.cache.get(id(value))
        if hit is None or hit[0] is not value:
            hit = self.cache[id(value)] = (value, value.to(dtype))
        return hit[1]
