"""Sparse COO tensors on the emulated backend, holding the entries CUDA would hold.

torch's meta kernels keep a sparse tensor's indices and values when it is built, but drop them when it is
cloned (autograd's gradient accumulation clones an embedding's sparse gradient) and cannot coalesce or add
one to a dense tensor. These handlers do what the CUDA kernels do, allocation by allocation, on meta
tensors: ``clone`` copies indices and values; ``_coalesce`` follows ``_coalesce_sparse_cuda`` (a flattened
index copy, two int64 work buffers, values for the unique indices); dense ``+`` sparse follows
``add_out_dense_sparse_cuda`` (in place: nothing allocated); ``sparse_mask`` gathers the dense values at the
mask's indices. How many indices are unique is a value: known when the indices came from the batch
(embedding ids), else taken at its upper bound, every index distinct, with a note.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .substitutions import Substitution, _register
from .value_ops import _SPECIAL, META, _is_meta, aten

if TYPE_CHECKING:
    from .values import KnownValues


def _sparse_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta and t.layout == torch.sparse_coo


def _build(mode: "KnownValues", like: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
           coalesced: bool, index_value: torch.Tensor | None) -> torch.Tensor:
    """A sparse meta tensor over ``indices`` and ``values`` (aliased, as ``alias_into_sparse`` does)."""
    out = aten._sparse_coo_tensor_with_dims_and_tensors.default(
        like.sparse_dim(), like.dense_dim(), list(like.shape), indices, values, dtype=values.dtype,
        layout=torch.sparse_coo, device=META, is_coalesced=coalesced)
    if index_value is not None:
        mode.remember_sparse_indices(out, index_value)
    return out


def _construct(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    indices = args[3]
    if _sparse_meta(out):
        known = mode.value_of(indices) if _is_meta(indices) else indices
        if known is not None:
            mode.remember_sparse_indices(out, known)
    return out


def _clone(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if not _sparse_meta(x):
        out = func(*args, **kwargs)
        mode._propagate(func, args, kwargs, out)
        return out
    # clone_sparse: a new sparse tensor whose indices and values are copies (copy_into_sparse with copy=true)
    return _build(mode, x, x._indices().clone(), x._values().clone(), x.is_coalesced(), mode.sparse_indices(x))


def _unique_count(mode: "KnownValues", x: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """How many distinct (flattened) indices ``x`` has, and the coalesced indices when they are known."""
    known = mode.sparse_indices(x)
    nnz = x._nnz()
    if known is None:
        mode.upper_bound("coalesce of a sparse tensor (Tensor.coalesce, SparseAdam)",
                         f"every index was assumed distinct (first call here: all {nnz})")
        return nnz, None
    unique = torch.unique(known, dim=1) if known.numel() else known
    return unique.shape[1], unique


def _coalesce(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if not _sparse_meta(x):
        return func(*args, **kwargs)
    nnz = x._nnz()
    if nnz < 2:  # _coalesce_sparse_cuda: a clone marked coalesced
        return _build(mode, x, x._indices().clone(), x._values().clone(), True, mode.sparse_indices(x))
    kept, unique = _unique_count(mode, x)
    flat = torch.empty(nnz, dtype=torch.long, device=META)            # indices1D (flatten_indices, cloned)
    work = [torch.empty(nnz, dtype=torch.long, device=META) for _ in range(2)]  # origIndices, uniqueOffsets
    values = torch.empty((kept, *x._values().shape[1:]), dtype=x.dtype, device=META)  # newValues
    if x.sparse_dim() == 1:
        indices = flat[:kept].view(1, kept)  # indices1D.resize_({1, newNnz}) keeps its nnz-element storage
    else:
        indices = torch.empty(x.sparse_dim(), kept, dtype=torch.long, device=META)
    del work
    return _build(mode, x, indices, values, True, unique)


def _add_dense_sparse(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    dense, other = args[0], args[1]
    if not (_is_meta(dense) and dense.layout == torch.strided and _sparse_meta(other)):
        out = func(*args, **kwargs)
        mode._propagate(func, args, kwargs, out)
        return out
    mode._forget_storage(dense)
    if func is aten.add_.Tensor:  # add_out_dense_sparse_cuda with r_ = dense: index_add_ in place
        return dense
    return torch.empty_like(dense, memory_format=torch.contiguous_format)  # r_.resize_as_(dense); copy_


def _sparse_mask(mode: "KnownValues", func: Any, args: tuple, kwargs: dict) -> Any:
    dense, mask = args[0], args[1]
    if not (_is_meta(dense) and _sparse_meta(mask)):
        return func(*args, **kwargs)
    # the result shares the mask's indices and holds the dense values gathered at them (nnz x dense dims)
    values = torch.empty((mask._nnz(), *dense.shape[mask.sparse_dim():]), dtype=dense.dtype, device=META)
    return _build(mode, mask, mask._indices(), values, mask.is_coalesced(), mode.sparse_indices(mask))


_SPECIAL[aten._sparse_coo_tensor_with_dims_and_tensors.default] = _construct
_SPECIAL[aten.clone.default] = _clone
_SPECIAL[aten._coalesce.default] = _coalesce
_SPECIAL[aten.add_.Tensor] = _add_dense_sparse
_SPECIAL[aten.add.Tensor] = _add_dense_sparse
_SPECIAL[aten.sparse_mask.default] = _sparse_mask


def _legacy_sparse_new(func: Any, args: tuple, kwargs: dict, proceed: Any) -> Any:
    """``sparse.new(indices, values, size)`` (SparseAdam's make_sparse): torch's legacy constructor rejects
    SparseMeta; on CUDA it is ``sparse_coo_tensor(indices, values, size)``, aliasing both (no copy)."""
    self = args[0] if args else None
    rest = args[1:]
    if not (_sparse_meta(self) and len(rest) == 3 and not kwargs and all(_is_meta(t) for t in rest[:2])):
        return proceed(args, kwargs)
    indices, values, size = rest
    return torch.sparse_coo_tensor(indices, values, size, dtype=values.dtype, device=META, check_invariants=False)


_register(Substitution(
    "sparse_new",
    "Tensor.new(indices, values, size) on a sparse COO tensor builds one over those indices and values, as on "
    "CUDA; the legacy constructor has no SparseMeta branch (torch 2.4 - 2.14).",
    intercepts=frozenset({torch.Tensor.new}),
    run=_legacy_sparse_new,
))
