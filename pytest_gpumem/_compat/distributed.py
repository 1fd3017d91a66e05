"""The torch.distributed internals of ``_compat``: the fake process group, FSDP2's device and meta checks, DTensor
shards, unsharded parameters, storage resizes, the prefetch hook, and what settles the gloo ranks' collectives.
Imported through ``pytest_gpumem._compat``; each has its test in tests/test_compat.py (DTensor ones on a gloo group,
tests/test_parallel_gloo.py)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .missing import TorchInternalMissing, _require

# --- torch.distributed in one process, on meta tensors (the emulated per-rank step) ----------------------

def fake_store() -> Any:
    """A store for torch's ``"fake"`` process-group backend, whose collectives return at once and touch no data
    (``torch.testing._internal.distributed.fake_pg.FakeStore``; torch >= 2.2, checked 2.11 and 2.14)."""
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as exc:
        raise TorchInternalMissing("torch.testing._internal.distributed.fake_pg.FakeStore", str(exc)) from exc
    return FakeStore()


def _fsdp2_modules() -> tuple[Any, ...]:
    try:
        from torch.distributed.fsdp._fully_shard import (_fsdp_collectives, _fsdp_init, _fsdp_param_group,
                                                         _fsdp_state, _fully_shard)
    except ImportError as exc:
        raise TorchInternalMissing("torch.distributed.fsdp._fully_shard", str(exc)) from exc
    return _fsdp_collectives, _fsdp_init, _fsdp_param_group, _fsdp_state, _fully_shard


def fsdp2_meta_patches() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, replacement) that let FSDP2's ``fully_shard`` train a meta-device model.

    FSDP2 takes its device from the mesh (``_get_device_from_mesh``: cpu or an accelerator), its streams and
    events from that device's module (``_get_device_handle``, imported by name into four modules), and refuses
    meta parameters at lazy init (``FSDPParamGroup._validate_no_meta_params``). Patched: the device is meta, its
    handle ``torch.cpu``'s (streams and events that do nothing: the step runs in program order), meta allowed.
    torch >= 2.6 (checked 2.11, 2.14).
    """
    collectives, init, param_group, state, fully_shard = _fsdp2_modules()
    meta = torch.device("meta")
    original = _require(init, "_get_device_handle", "torch.distributed.fsdp._fully_shard._fsdp_init")

    def device_handle(device_type: str) -> Any:
        return original("cpu" if device_type == "meta" else device_type)

    group_cls = _require(param_group, "FSDPParamGroup", "torch.distributed.fsdp._fully_shard._fsdp_param_group")
    _require(group_cls, "_validate_no_meta_params", "FSDPParamGroup")
    patches: list[tuple[Any, str, Any]] = [(group_cls, "_validate_no_meta_params", lambda self: None)]
    for owner in (init, fully_shard):
        _require(owner, "_get_device_from_mesh", owner.__name__)
        patches.append((owner, "_get_device_from_mesh", lambda mesh: meta))
    for owner in (collectives, init, param_group, state):
        _require(owner, "_get_device_handle", owner.__name__)
        patches.append((owner, "_get_device_handle", device_handle))
    return patches


def ddp_meta_patches() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, replacement) that let ``DistributedDataParallel`` wrap a meta-device model.

    Its constructor checks parameter shapes across ranks with a collective whose result it reads with
    ``.item()`` (``torch.nn.parallel.distributed._verify_param_shape_across_processes``), which meta tensors
    cannot answer; under the fake process group every rank is this one, so the check is skipped.
    torch >= 1.11 (checked 2.11, 2.14).
    """
    import torch.nn.parallel.distributed as ddp_module

    _require(ddp_module, "_verify_param_shape_across_processes", "torch.nn.parallel.distributed")
    return [(ddp_module, "_verify_param_shape_across_processes", lambda *args, **kwargs: None)]

# --- torch.distributed: DTensor shards, FSDP2 internals, storage resizes ------------------------------------

def dtensor_local(t: torch.Tensor) -> torch.Tensor | None:
    """This rank's local tensor of a DTensor (``_local_tensor``, what ``to_local()`` views without autograd);
    None for any other tensor. Read without dispatching, so a dispatch mode can call it. torch >= 2.4."""
    local = getattr(t, "_local_tensor", None)
    if local is None or type(t).__name__ != "DTensor":
        return None
    return local


def fsdp_unsharded_params(module: nn.Module) -> list[torch.Tensor]:
    """The unsharded (all-gathered) parameters FSDP2 keeps for ``module`` and its FSDP submodules.

    ``FSDPModule._get_fsdp_state()._fsdp_param_group.fsdp_params[i]._unsharded_param``: created on the
    first all-gather, its storage resized to 0 when resharded and back when gathered again.
    """
    found: list[torch.Tensor] = []
    for sub in module.modules():
        get_state = getattr(sub, "_get_fsdp_state", None)
        if get_state is None:
            continue
        state = get_state()
        if not hasattr(state, "_fsdp_param_group"):
            raise TorchInternalMissing("FSDPState._fsdp_param_group")
        group = state._fsdp_param_group
        if group is None:  # an FSDP unit without parameters of its own
            continue
        for fsdp_param in _require(group, "fsdp_params", "FSDPParamGroup"):
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                found.append(unsharded)
    return found


def storage_resize_patch_target() -> tuple[type, str]:
    """``torch.UntypedStorage.resize_``: FSDP2 frees and re-allocates unsharded parameters by resizing their
    storage in place, which no dispatch mode sees; the distributed tracker wraps it while it measures."""
    _require(torch.UntypedStorage, "resize_", "torch.UntypedStorage")
    return torch.UntypedStorage, "resize_"


def fsdp_prefetch_patch_target() -> tuple[type, str]:
    """``FSDPParamGroup._prefetch_unshard`` (a staticmethod): FSDP2 all-gathers the next unit's parameters
    through it (backward by default, forward when asked); wrapping it tells a prefetch from a unit's own gather."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    _require(FSDPParamGroup, "_prefetch_unshard", "FSDPParamGroup")
    return FSDPParamGroup, "_prefetch_unshard"

# --- gloo ranks: collectives that settle before the step goes on -------------------------------------------

#: the torch.distributed functions whose gloo Work can outlive the call holding buffers, called by module attribute
#: (so wrapping them there reaches the callers): FSDP2's all-gathers and reduce-scatters (``all_gather_single``
#: and ``reduce_scatter_single`` on torch 2.14; ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` on 2.11,
#: which 2.14 keeps as deprecated wrappers), ZeroRedundancyOptimizer's ``broadcast`` of its parameter buckets, and
#: what DDP's constructor runs in C++, waiting there (no ``async_op``): ``_verify_params_across_processes`` gathers
#: every rank's parameter shapes, ``_broadcast_coalesced`` sends rank 0's module states in flattened buckets
_SETTLED_COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor",
                        "broadcast", "_broadcast_coalesced", "_verify_params_across_processes")
WAITS_IN_CPP = frozenset({"_broadcast_coalesced", "_verify_params_across_processes"})


def gloo_collective_patch_targets() -> tuple[Any, tuple[str, ...]]:
    """(``torch.distributed``, names of ``_SETTLED_COLLECTIVES`` it has); TorchInternalMissing unless an
    all-gather, a reduce-scatter and both of DDP's C++ collectives are among them."""
    import torch.distributed as dist

    names = tuple(name for name in _SETTLED_COLLECTIVES if callable(getattr(dist, name, None)))
    if not any("gather" in n for n in names) or not any("scatter" in n for n in names) \
            or not WAITS_IN_CPP.issubset(names):
        raise TorchInternalMissing("torch.distributed.{all_gather_single, reduce_scatter_single} or "
                                   "{all_gather_into_tensor, reduce_scatter_tensor}, _broadcast_coalesced, "
                                   "_verify_params_across_processes")
    return dist, names


def completed_work() -> Any:
    """A ``torch.distributed.Work`` that is already done (``_create_work_from_future`` on a finished future):
    what a settled async collective hands back, so the caller's ``wait()`` returns at once. Its future's value is
    None (torch's holds the output tensors): DDP, FSDP2 and ZeroRedundancyOptimizer only wait. torch >= 2.0."""
    create = _require(torch._C._distributed_c10d, "_create_work_from_future", "torch._C._distributed_c10d")
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(None)
    return create(future)


def is_deferred_work(work: Any) -> bool:
    """Whether a collective handed back the placeholder torch gives inside ``_coalescing_manager`` (``_IllegalWork``:
    the collective runs when the block ends, and waiting on it raises). torch >= 2.1 (checked 2.11, 2.14)."""
    from torch.distributed import distributed_c10d

    return isinstance(work, _require(distributed_c10d, "_IllegalWork", "torch.distributed.distributed_c10d"))


def tensor_use_count(t: torch.Tensor) -> int:
    """How many C++ owners ``t``'s TensorImpl has (``Tensor._use_count()``): a collective's Work holds its
    tensors, so the count drops back when the Work is gone. torch >= 2.0 (checked 2.11, 2.14)."""
    return t._use_count()
