"""Ops the value-tracking mode answers itself: reads (item, cpu, equal) and ops whose output shape comes
from values (nonzero, boolean-mask indexing, masked_select, unique, repeat_interleave), plus sparse tensors."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

if TYPE_CHECKING:
    from .values import KnownValues

aten = torch.ops.aten
META = torch.device("meta")
CPU = torch.device("cpu")


def _is_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta


def _to_cpu_device(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "meta":
        return CPU
    return value


Handler = Callable[["KnownValues", Any, tuple, dict], Any]
_SPECIAL: dict[Any, Handler] = {}


def _special(*ops: Any) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for op in ops:
            _SPECIAL[op] = fn
        return fn
    return register


@_special(aten._local_scalar_dense.default)
def _item(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if not _is_meta(x):
        return func(*args, **kwargs)
    return mode.read(x, "Tensor.item() / float() / int() / bool()").item()


@_special(aten._to_copy.default)
def _copy_out(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    x, device = args[0], kwargs.get("device")
    if _is_meta(x) and device is not None and torch.device(device).type == "cpu":
        return func(mode.read(x, "Tensor.cpu() / .tolist() / .to('cpu')"), **kwargs)
    out = func(*args, **kwargs)
    mode._propagate(func, args, kwargs, out)
    return out


@_special(aten.equal.default)
def _equal(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    a, b = (mode.read(t, "torch.equal") if _is_meta(t) else t for t in args[:2])
    return func(a, b)


def _selected(mode: "KnownValues", t: torch.Tensor, op: str) -> torch.Tensor:
    """The value of a selecting mask or condition: known, else every element selected (noted)."""
    known = mode._values.get(t) if _is_meta(t) else t
    if known is not None:
        return known
    mode.upper_bound(op, f"every element was assumed selected (first call here: all {t.numel()})")
    return torch.ones((), dtype=torch.bool).expand(t.shape)


@_special(aten.nonzero.default)
def _nonzero(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    if not _is_meta(args[0]):
        return func(*args, **kwargs)
    condition = _selected(mode, args[0], "nonzero (torch.nonzero, torch.where(cond), argwhere)")
    if condition.numel() > mode.limit:  # a huge unknown condition: the shape without the index values
        return torch.empty(condition.numel(), condition.dim(), dtype=torch.long, device=META)
    return tree_map(mode._meta_like, func(condition, **kwargs))


@_special(aten.masked_select.default)
def _masked_select(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    x, mask = args[0], args[1]
    if not (_is_meta(x) or _is_meta(mask)):
        return func(*args, **kwargs)
    mask_value = _selected(mode, mask, "masked_select (x[mask] with a bool mask)")
    if _is_meta(x) and x not in mode._values:
        count = int(torch.broadcast_to(mask_value, torch.broadcast_shapes(x.shape, mask.shape)).sum())
        return torch.empty(count, dtype=x.dtype, device=META)
    return mode._meta_like(func(mode.need(x, "masked_select"), mask_value))


@_special(aten.index.Tensor)
def _index(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    """x[mask]: CUDA turns bool indices into int64 ones with nonzero (one N x ndim temporary)."""
    x, indices = args[0], list(args[1])
    if not any(_is_meta(i) and i.dtype in (torch.bool, torch.uint8) for i in indices if i is not None):
        out = func(*args, **kwargs)
        mode._propagate(func, args, kwargs, out)
        return out
    converted: list = []
    for index in indices:
        if _is_meta(index) and index.dtype in (torch.bool, torch.uint8):
            where = torch.nonzero(_selected(mode, index, "boolean-mask indexing x[mask]").bool())
            long_index = mode._meta_like(where)
            converted.extend(long_index.unbind(1))
        else:
            converted.append(index)
    out = func(x, converted)
    mode._propagate(func, (x, converted), {}, out)
    return out


_UNIQUE = [getattr(aten, n) for n in ("_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive")
           if hasattr(aten, n)]


def _shape_from_values(op_name: str) -> Handler:
    def handler(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        if not any(_is_meta(t) for t in flat):
            return func(*args, **kwargs)
        values = [mode.need(t, op_name) if _is_meta(t) else _to_cpu_device(t) for t in flat]
        a, k = tree_unflatten(values, spec)
        return tree_map(lambda v: mode._meta_like(v) if isinstance(v, torch.Tensor) else v, func(*a, **k))
    return handler


def _nms_upper_bound(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    """torchvision's nms on unknown boxes or scores: every box kept (the most memory later code can see), with
    the CUDA kernel's device buffers allocated and freed as it does (``_cuda_facts.detection``)."""
    from .._cuda_facts.detection import nms_buffers

    boxes, scores = args[0], args[1]
    n = boxes.shape[0]
    mode.upper_bound("torchvision nms (torchvision.ops.nms / batched_nms)",
                     f"every box was assumed kept (first call here: all {n})")
    held: list[torch.Tensor] = []  # the kernel's buffers, alive until it returns (a dropped one until the next)
    dropped = False
    for buffer in nms_buffers(n, n):
        dtype = {"scores": scores.dtype, "boxes": boxes.dtype}.get(buffer.dtype, buffer.dtype)
        held.append(torch.empty(buffer.shape, dtype=dtype, device=META))
        if dropped:
            del held[-2]
        dropped = buffer.dropped
    return torch.empty(n, dtype=torch.long, device=META)  # order_t.index(keep): every box, in score order


#: ops whose meta kernel refuses data-dependent output shapes, answered with an upper bound on unknown values
UPPER_BOUNDS: dict[str, Handler] = {"torchvision.nms.default": _nms_upper_bound}


for _packet in _UNIQUE:
    for _overload in _packet.overloads():
        _SPECIAL[getattr(_packet, _overload)] = _shape_from_values("unique (torch.unique, unique_consecutive)")


def _repeat_interleave(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    if kwargs.get("output_size") is not None or not _is_meta(args[0]):
        out = func(*args, **kwargs)
        mode._propagate(func, args, kwargs, out)
        return out
    return _shape_from_values("repeat_interleave with tensor repeats")(mode, func, args, kwargs)


_SPECIAL[aten.repeat_interleave.Tensor] = _repeat_interleave
