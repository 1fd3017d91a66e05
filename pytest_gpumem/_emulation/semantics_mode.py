"""The cuda_semantics context: a TorchFunctionMode that routes calls through the substitutions."""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from .._compat import checks_torch_function as _checks_torch_function
from .._compat import without_torch_function_checks as _transparent
from .autocast import _CACHE
from .recompute import reentered_in_modules, reentered_in_recomputation
from .substitutions import SUBSTITUTIONS, Substitution, _patched


_PASS_THROUGH: set[Any] = set()  #: callables seen not to need the mode (no substitution, not an F function)


class _CudaSemanticsMode(TorchFunctionMode):
    """Routes intercepted calls through the function substitutions, in registry order."""

    def __init__(self, substitutions: list[Substitution]) -> None:
        super().__init__()
        self.chain = [s for s in substitutions if s.run is not None]
        self.intercepted = frozenset().union(*(s.intercepts for s in self.chain))
        self.opened: set[Callable] = set()  #: F functions running as transparent copies right now

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # fast path, most calls (Tensor methods, conv2d, relu, ...): nothing to substitute or open
        try:
            plain = func in _PASS_THROUGH and func not in self.intercepted
        except TypeError:  # an unhashable callable
            plain = False
        if plain:
            return func(*args, **(kwargs or {}))
        return self._call(0, func, args, kwargs or {})

    def _call(self, start: int, func: Callable, args: tuple, kwargs: dict) -> Any:
        for i in range(start, len(self.chain)):
            if func in self.chain[i].intercepts:
                return self.chain[i].run(func, args, kwargs, functools.partial(self._call, i + 1, func))
        if _checks_torch_function(func) and func not in self.opened:
            self.opened.add(func)  # F.max_pool2d & co. hand the check to a wrapper: never open one twice
            try:
                with self:
                    return _transparent(func)(*args, **kwargs)
            finally:
                self.opened.discard(func)
        if not _checks_torch_function(func):
            with contextlib.suppress(TypeError):  # unhashable callables just take the slow path
                _PASS_THROUGH.add(func)
        return func(*args, **kwargs)


_OWNER: list[int] = []  # the thread inside cuda_semantics (patches are process-wide, so one at a time)


@contextlib.contextmanager
def cuda_semantics(*, only: tuple[str, ...] | None = None) -> Iterator[None]:
    """Within this context, forward + backward on meta tensors save and allocate what CUDA would.

    ``only`` names the substitutions to apply (default: all of :data:`SUBSTITUTIONS`). Nested use is a no-op;
    on exit (normal or by exception) every patch is undone, the mode popped and the autocast cache emptied.
    One thread at a time: entering from a second thread while another is inside raises RuntimeError.
    """
    if _OWNER:
        if _OWNER[0] != threading.get_ident():
            raise RuntimeError("cuda_semantics() is already active in another thread")
        yield
        return
    names = tuple(SUBSTITUTIONS) if only is None else only
    unknown = set(names) - set(SUBSTITUTIONS)
    if unknown:
        raise ValueError(f"unknown substitutions {sorted(unknown)}; known: {sorted(SUBSTITUTIONS)}")
    chosen = [SUBSTITUTIONS[n] for n in SUBSTITUTIONS if n in names]
    _OWNER.append(threading.get_ident())
    try:
        with _patched(tuple(p for s in chosen for p in s.patches)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            with _CudaSemanticsMode(chosen) as mode, reentered_in_modules(mode), reentered_in_recomputation(mode):
                yield
    finally:
        _OWNER.clear()
        _CACHE.copies.clear()


@contextlib.contextmanager
def emulated_autocast(dtype: torch.dtype = torch.float16, *, cache_enabled: bool | None = None) -> Iterator[None]:
    """``torch.autocast("cuda", dtype)`` as a GPU runs it, for meta tensors; enters cuda_semantics if needed."""
    with cuda_semantics(), torch.autocast("cuda", dtype=dtype, cache_enabled=cache_enabled):
        yield
