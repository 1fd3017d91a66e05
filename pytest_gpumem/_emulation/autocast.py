"""torch.autocast('cuda') on meta tensors: CUDA's op lists, casts and its weight-cast cache."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from .. import _compat
from .._cuda_facts import autocast as facts
from .substitutions import Proceed, Substitution, _on_meta, _register


# The CUDA lists (_cuda_facts.autocast, checked for the torch releases in _compat.AUTOCAST_LISTS_CHECKED);
# another torch release gets an UncheckedTorchWarning on import.
_compat.warn_if_unchecked("the emulation's autocast op lists", _compat.AUTOCAST_LISTS_CHECKED)
_LOWER, _FP32, _FP32_DTYPE, _PROMOTE, _BANNED = (" ".join(sorted(names)) for names in (
    facts.LOWER, facts.FP32, facts.FP32_DTYPE, facts.PROMOTE, facts.BANNED))
_NAMESPACES = _compat.python_op_namespaces()


def _callables(names: str) -> frozenset:
    """Every python-level torch callable spelled by one of ``names`` (torch.x, F.x, Tensor.x, ...)."""
    found = set()
    for name in names.split():
        for ns in _NAMESPACES:
            attr = name[len("linalg_"):] if ns is torch.linalg and name.startswith("linalg_") else name
            fn = getattr(ns, attr, None)
            if callable(fn) and not isinstance(fn, type):
                found.add(fn)
    return frozenset(found)


_POLICY: dict[Any, str] = {}
for _policy, _names in (("lower", _LOWER), ("fp32", _FP32), ("fp32_dtype", _FP32_DTYPE),
                        ("promote", _PROMOTE), ("banned", _BANNED)):
    for _fn in _callables(_names):
        assert _fn not in _POLICY, f"{_fn} in two autocast policies"
        _POLICY[_fn] = _policy


def _eligible(t: Any) -> bool:
    """CUDA autocast's is_eligible, for meta tensors: floating point and not float64."""
    return _on_meta(t) and facts.eligible(t.dtype)


class _WeightCache:
    """Autocast's cast cache: lower-precision copies of fp32 leaf tensors that require grad."""

    def __init__(self) -> None:
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(leaf) -> (leaf, copy)

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        cacheable = facts.weight_cast_cached(dtype, torch.get_autocast_dtype("cuda"), t.dtype, t.requires_grad,
                                             t.is_leaf, _compat.is_view(t), torch.is_autocast_cache_enabled())
        if not cacheable:
            return t.to(dtype)
        hit = self.copies.get(id(t))
        if hit is None or hit[0] is not t:
            hit = self.copies[id(t)] = (t, t.to(dtype))
        return hit[1]


_CACHE = _WeightCache()


def _cast_all(value: Any, dtype: torch.dtype) -> Any:
    if _eligible(value) and value.dtype is not dtype:
        return _CACHE.cast(value, dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_all(v, dtype) for v in value)
    return value


def _tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    for v in (*args, *kwargs.values()):
        for t in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(t, torch.Tensor):
                yield t


def _autocast(func: Callable, args: tuple, kwargs: dict, proceed: Proceed) -> Any:
    """Cast the op's inputs as CUDA autocast would, then run it (recorded by autograd, like the real casts)."""
    policy = _POLICY[func]
    if not torch.is_autocast_enabled("cuda") or "out" in kwargs or not any(map(_eligible, _tensors(args, kwargs))):
        return proceed(args, kwargs)
    if policy == "banned":
        raise RuntimeError("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to "
                           "autocast; use binary_cross_entropy_with_logits or BCEWithLogitsLoss.")
    if policy == "fp32_dtype":
        first = next(_tensors(args, kwargs))
        explicit = kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args)
        if explicit or not _eligible(first):
            return proceed(args, kwargs)
        return proceed(args, {**kwargs, "dtype": torch.float32})
    dtype = facts.cast_to(policy, torch.get_autocast_dtype("cuda"),
                          [t.dtype for t in _tensors(args, kwargs) if _eligible(t)])
    return proceed(_cast_all(args, dtype), {k: _cast_all(v, dtype) for k, v in kwargs.items()})


def _without_gpu(original: Callable, answer: bool) -> Callable:
    """``original`` where a GPU is present (real autocast handles real tensors), else a constant answer."""
    return original if torch.cuda.is_available() else (lambda *args, **kwargs: answer)


def _clear_autocast_cache(original: Callable) -> Callable:
    def clear_autocast_cache() -> None:
        original()
        _CACHE.copies.clear()
    return clear_autocast_cache


def _checkpoint_on_cuda(original: Callable) -> Callable:
    """Checkpointing on meta tensors replays CUDA's autocast state in recomputation, as it does on a GPU."""
    def infer_device_type(*args):
        found = original(*args)
        return "cuda" if found == "meta" else found
    return infer_device_type


_register(Substitution(
    "autocast",
    "torch.autocast('cuda') casts meta tensors by CUDA's op lists and caches weight casts until the region exits "
    "(torch 2.4-2.14; it would be disabled without a GPU, and real autocast never touches meta tensors); "
    "checkpoint recomputation replays it, as on a GPU.",
    intercepts=frozenset(_POLICY),
    run=_autocast,
    patches=(
        (*_compat.amp_availability_patch_target(), lambda original: _without_gpu(original, False)),
        (torch.cuda, "is_bf16_supported", lambda original: _without_gpu(original, True)),  # as on sm80+
        (torch, "clear_autocast_cache", _clear_autocast_cache),
        (*_compat.checkpoint_device_type_patch_target(), _checkpoint_on_cuda),
    ),
))
