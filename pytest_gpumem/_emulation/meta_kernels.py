"""Cheaper, exact stand-ins for torch's slowest meta kernels, used by the emulated backend's tracker.

A meta kernel computes nothing, yet some cost milliseconds: batch norm's is a Python decomposition that
runs some forty elementwise refs (~4 ms a call, half of an emulated ResNet-50 step), and foreach optimizer
ops run a Python ref per parameter. Two shortcuts, neither changing what is allocated:

- **memoised**: ops that return fresh tensors whose metadata depends only on their inputs' metadata. The
  first call with given input metadata runs torch's kernel and records each output's shape, strides and
  dtype; later calls make empty tensors just like them. Outputs that alias an input, share a storage, or
  are views are never recorded: those calls always run torch's kernel.
- **in-place foreach**: on meta tensors they return nothing and allocate nothing; when every tensor list
  is index-wise alike (same shape and dtype, all on meta) torch's checks pass and the call is skipped.

Anything else, or any argument of an unexpected kind, runs torch's own kernel.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from .._compat import foreach_sqrt_op, is_view, op_returns_nothing, tree_flatten, tree_unflatten

aten = torch.ops.aten

Kernel = Callable[[Any, tuple, dict], Any]  # (func, args, kwargs) -> what func(*args, **kwargs) returns

#: ops whose outputs are fresh tensors shaped by the inputs' metadata (checked per call before recording)
MEMOISED = frozenset({
    aten.native_batch_norm.default,
    aten.native_batch_norm_backward.default,
    aten.threshold_backward.default,
    aten.zeros_like.default,  # optimizer state
    foreach_sqrt_op(),
    # Python refs (~0.2-0.7 ms a call): the gate arithmetic of LSTM/GRU steps, run per time step
    aten.sigmoid_backward.default,
    aten.tanh_backward.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.mul.Tensor,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.addmm.default,
    aten.cat.default,
    aten.sum.dim_IntList,
})

#: in-place unary ops that return their (meta, floating) input unchanged in shape, dtype and storage
UNARY_IN_PLACE = frozenset({aten.sigmoid_.default, aten.tanh_.default, aten.relu_.default})

_PLAIN = (bool, int, float, torch.dtype, torch.layout, torch.device, torch.memory_format)
_UNCACHEABLE = object()
_MAX_ENTRIES = 4096
#: (func, input metadata) -> (output pytree spec, [(shape, stride, dtype) | None]) or _UNCACHEABLE;
#: module-level, so repeated measurements of one model reuse it (meta kernels are pure functions of it)
_memo: dict[tuple, Any] = {}


def _meta_key(value: Any) -> Any:
    """What a meta kernel can see of ``value``; None where an argument is of a kind not handled here."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta" or value.layout != torch.strided:
            return None
        return (tuple(value.shape), value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, (list, tuple)):
        parts = tuple(_meta_key(v) for v in value)
        return None if None in parts else ("seq", parts)
    if value is None or isinstance(value, _PLAIN):
        return (type(value), value)
    return None


def memoised(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)``, replayed from the recorded output metadata when seen before."""
    parts = tuple(_meta_key(a) for a in args) + tuple((k, _meta_key(v)) for k, v in sorted(kwargs.items()))
    if None in parts or any(p[1] is None for p in parts[len(args):]):  # an argument of a kind not handled
        return func(*args, **kwargs)
    key = (func, parts)
    recorded = _memo.get(key)
    if recorded is _UNCACHEABLE:
        return func(*args, **kwargs)
    if recorded is not None:
        spec, metas = recorded
        return tree_unflatten(
            [None if m is None else torch.empty_strided(m[0], m[1], dtype=m[2], device="meta") for m in metas], spec
        )
    out = func(*args, **kwargs)
    if len(_memo) >= _MAX_ENTRIES:
        _memo.clear()
    _memo[key] = _record(out, args)
    return out


def _record(out: Any, args: tuple) -> Any:
    """The metadata to rebuild ``out`` from, or _UNCACHEABLE when empty tensors would not be the same."""
    leaves, spec = tree_flatten(out)
    inputs, _ = tree_flatten(args)
    seen = [t.untyped_storage() for t in inputs if isinstance(t, torch.Tensor)]
    metas = []
    for leaf in leaves:
        if leaf is None:
            metas.append(None)
            continue
        if not isinstance(leaf, torch.Tensor) or leaf.device.type != "meta" or is_view(leaf) \
                or leaf.storage_offset() != 0 or leaf.layout != torch.strided:
            return _UNCACHEABLE
        storage = leaf.untyped_storage()
        if any(storage is s for s in seen):  # aliases an input or another output
            return _UNCACHEABLE
        seen.append(storage)
        like = torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device="meta")
        if like.untyped_storage().nbytes() != storage.nbytes():
            return _UNCACHEABLE
        metas.append((tuple(leaf.shape), leaf.stride(), leaf.dtype))
    return spec, metas


def foreach_in_place(func: Any, args: tuple, kwargs: dict) -> Any:
    """An in-place foreach op on meta tensors: nothing to compute when its lists are index-wise alike."""
    self = args[0] if args else None
    if kwargs or not isinstance(self, (list, tuple)):
        return func(*args, **kwargs)
    for t in self:
        if not (isinstance(t, torch.Tensor) and t.device.type == "meta" and t.is_contiguous()):
            return func(*args, **kwargs)
    n = len(self)
    for arg in args[1:]:
        if isinstance(arg, (bool, int, float)):
            continue
        if not isinstance(arg, (list, tuple)) or len(arg) != n:
            return func(*args, **kwargs)
        for t, s in zip(arg, self):
            if isinstance(t, torch.Tensor):
                if t.device.type != "meta" or t.dtype != s.dtype or t.shape != s.shape:
                    return func(*args, **kwargs)
            elif not isinstance(t, (bool, int, float)):
                return func(*args, **kwargs)
    return None


def unary_in_place(func: Any, args: tuple, kwargs: dict) -> Any:
    """sigmoid_/tanh_/relu_ on a floating meta tensor: nothing to compute or allocate; the input is the output."""
    self = args[0] if len(args) == 1 and not kwargs else None
    if isinstance(self, torch.Tensor) and self.device.type == "meta" and self.is_floating_point():
        return self
    return func(*args, **kwargs)


def kernel_for(func: Any) -> Kernel | None:
    """The shortcut for ``func`` (an aten OpOverload), or None to run torch's own kernel."""
    if func in MEMOISED:
        return memoised
    if func in UNARY_IN_PLACE:
        return unary_in_place
    name = getattr(func, "__name__", "")
    if name.startswith("_foreach_") and name.split(".")[0].endswith("_") and op_returns_nothing(func):
        return foreach_in_place
    return None
