"""Every private torch and hypothesis internal pytest-gpumem touches, each behind one named function.

Nothing here falls back silently: an internal a torch release moved raises :class:`TorchInternalMissing`
(naming it and the torch version) when it is used, and tests/test_compat.py has one test per internal that
fails loudly on such a release. Releases checked: torch 2.11 and 2.14 (hypothesis 6.1xx).
"""
from __future__ import annotations

import functools
import types
import warnings
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .distributed import (  # the torch.distributed internals, in their own file; callers import them from here
    WAITS_IN_CPP, completed_work, ddp_meta_patches, dtensor_local, fake_store, fsdp2_meta_patches,
    fsdp_prefetch_patch_target, fsdp_unsharded_params, gloo_collective_patch_targets, is_deferred_work,
    storage_resize_patch_target, tensor_use_count,
)
from .missing import TorchInternalMissing, _require

# Dispatch modes and pytrees: private modules every torch 2.x ships, used by torch's own public tools
# (flop_counter, module_tracker); re-exported so that a move shows up here, once.
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "AUTOCAST_LISTS_CHECKED",
    "GRAD_SCALER_ATTRIBUTES",
    "MODULE_CHILDREN_DICT",
    "MODULE_TENSOR_DICTS",
    "TorchDispatchMode",
    "TorchInternalMissing",
    "WAITS_IN_CPP",
    "allocator_snapshot",
    "amp_availability_patch_target",
    "checkpoint_recompute_patch_targets",
    "checks_torch_function",
    "compiled_original",
    "completed_work",
    "cpu_flash_attention",
    "cuda_cudnn_attention",
    "cuda_efficient_attention",
    "cuda_flash_attention",
    "ddp_meta_patches",
    "dtensor_local",
    "dump_memory_snapshot",
    "fake_store",
    "foreach_sqrt_op",
    "forward_hook_counts",
    "fsdp2_meta_patches",
    "fsdp_prefetch_patch_target",
    "fsdp_unsharded_params",
    "function_mode_stack",
    "fused_devices_patch_target",
    "gloo_collective_patch_targets",
    "grad_scaler_step_patch_target",
    "is_checkpoint_pack_hook",
    "is_deferred_work",
    "is_view",
    "mkldnn_bf16_supported",
    "module_registries",
    "nn_loss_ops",
    "onednn_lstm_layer",
    "op_returns_nothing",
    "python_op_namespaces",
    "record_allocator_trace",
    "record_memory_history",
    "running_backward",
    "sdp_backends_enabled",
    "sequence_nr",
    "set_hypothesis_digest",
    "sparse_parts",
    "stop_memory_history",
    "storage_key",
    "storage_resize_patch_target",
    "tensor_use_count",
    "top_pack_hook",
    "tree_flatten",
    "tree_map",
    "tree_unflatten",
    "warn_if_unchecked",
    "without_torch_function_checks",
]

TORCH_VERSION: tuple[int, int] = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])  # type: ignore[assignment]


class UncheckedTorchWarning(UserWarning):
    """Torch is newer or older than the releases a pinned table (such as autocast's op lists) was checked on."""



# --- tensors and storages -------------------------------------------------------------------------------

def storage_key(t: torch.Tensor) -> int:
    """A tensor's storage identity: the address of its C++ StorageImpl (``untyped_storage()._cdata``).

    The same for every view and every Python wrapper of the storage, meta tensors included (their
    ``data_ptr()`` is 0); unique while the storage lives. torch >= 2.0 (checked 2.11, 2.14).
    """
    return t.untyped_storage()._cdata


def is_view(t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of another tensor's storage (``Tensor._is_view()``; torch 1.x .. 2.14)."""
    return t._is_view()


def sequence_nr(node: Any) -> int:
    """An autograd node's creation order (``Node._sequence_nr()``; torch 1.x .. 2.14): later nodes, higher."""
    return node._sequence_nr()


def running_backward() -> bool:
    """True inside the autograd engine's backward (``torch._C._current_graph_task_id() != -1``; torch >= 2.1)."""
    return torch._C._current_graph_task_id() != -1


# --- nn.Module registries ---------------------------------------------------------------------------------

def module_registries(module: nn.Module) -> tuple[dict, dict]:
    """``module``'s own parameter and buffer dicts (``_parameters``, ``_buffers``), which it reads by name."""
    return module._parameters, module._buffers


#: The keys of an nn.Module's ``__dict__`` holding its parameter and buffer dicts, and its children (torch 1.x .. 2.14).
MODULE_TENSOR_DICTS = ("_parameters", "_buffers")
MODULE_CHILDREN_DICT = "_modules"


def forward_hook_counts(module: nn.Module) -> tuple[int, int]:
    """How many forward hooks and forward pre-hooks ``module`` holds (``_forward_hooks``, ``_forward_pre_hooks``)."""
    return len(module._forward_hooks), len(module._forward_pre_hooks)


# --- aten ops --------------------------------------------------------------------------------------------

def op_returns_nothing(op: Any) -> bool:
    """Whether an aten OpOverload's schema declares no return values (``op._schema.returns``)."""
    return not op._schema.returns


def foreach_sqrt_op() -> Any:
    """``aten._foreach_sqrt.default``: the foreach kernel optimizers use for their denominators."""
    return torch.ops.aten._foreach_sqrt.default


def cpu_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                        attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """The output of ``aten._scaled_dot_product_flash_attention_for_cpu`` (dropout 0; torch >= 2.3)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]


def onednn_lstm_layer(x: torch.Tensor, weights: tuple[torch.Tensor, ...], hx: torch.Tensor, cx: torch.Tensor, *,
                      reverse: bool, num_layers: int, has_biases: bool, bidirectional: bool, batch_first: bool,
                      train: bool) -> tuple[torch.Tensor, ...]:
    """(output, hy, cy, workspace) of ``aten::mkldnn_rnn_layer``: one direction of one LSTM layer as the CPU runs it
    (oneDNN; torch >= 2.1). ``weights`` are (w_ih, w_hh, b_ih, b_hh); on meta the workspace comes back empty."""
    return torch.ops.aten.mkldnn_rnn_layer(x, *weights, hx, cx, reverse, [], 2, hx.size(-1), num_layers,
                                           has_biases, bidirectional, batch_first, train)


def nn_loss_ops() -> tuple[Any, ...]:
    """``torch._C._nn``'s mse_loss, smooth_l1_loss, soft_margin_loss and binary_cross_entropy: the callables the F
    functions hand on to, which a torch-function mode sees on their own (checked on torch 2.11 and 2.14)."""
    names = ("mse_loss", "smooth_l1_loss", "soft_margin_loss", "binary_cross_entropy")
    return tuple(_require(torch._C._nn, name, "torch._C._nn") for name in names)


def mkldnn_bf16_supported() -> bool:
    """Whether this CPU runs oneDNN in bfloat16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported``): aten's LSTM takes
    the oneDNN path for bf16 input only then."""
    return bool(_require(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", "torch.ops.mkldnn")())


def cuda_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float, is_causal: bool,
                         scale: float | None) -> torch.Tensor:
    """The output of ``aten._scaled_dot_product_flash_attention`` (CUDA's flash kernel; torch >= 2.1)."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]


def cuda_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, *,
                             compute_log_sumexp: bool, dropout_p: float, is_causal: bool,
                             scale: float | None) -> torch.Tensor:
    """The output of ``aten._scaled_dot_product_efficient_attention`` (memory-efficient kernel; torch >= 2.1)."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, compute_log_sumexp, dropout_p, is_causal, scale=scale)[0]


def cuda_cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, *,
                         compute_log_sumexp: bool, dropout_p: float, is_causal: bool,
                         scale: float | None) -> torch.Tensor:
    """The output of ``aten._scaled_dot_product_cudnn_attention`` (cuDNN's fused kernel; torch >= 2.5)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, bias, compute_log_sumexp, dropout_p, is_causal, False, scale=scale)[0]


def sdp_backends_enabled() -> dict[str, bool]:
    """torch.backends.cuda's switches for the SDPA kernels (what ``sdpa_kernel(...)`` sets), readable without a GPU."""
    cuda = torch.backends.cuda
    return {"flash": cuda.flash_sdp_enabled(), "cudnn": cuda.cudnn_sdp_enabled(),
            "efficient": cuda.mem_efficient_sdp_enabled(), "math": cuda.math_sdp_enabled()}


# --- saved-tensors hooks and checkpointing ---------------------------------------------------------------

def top_pack_hook() -> Any:
    """The pack function of the innermost saved-tensors hooks now active, or None without any.

    ``torch._C._autograd._top_saved_tensors_default_hooks(False)`` (torch >= 2.3; checked 2.11, 2.14).
    Raises :class:`TorchInternalMissing` where torch lacks it: without it, checkpointed regions would be
    counted as kept activations, a wrong figure.
    """
    top = _require(torch._C._autograd, "_top_saved_tensors_default_hooks", "torch._C._autograd")(False)
    return top[0] if top else None


@functools.lru_cache(maxsize=None)
def _checkpoint_pack_codes() -> frozenset:
    """The code objects of the pack hooks non-reentrant torch.utils.checkpoint installs.

    ``torch.utils.checkpoint._checkpoint_hook.__init__`` defines ``pack_hook`` (torch 2.1 .. 2.14; 2.14 also
    marks it ``_checkpoint_internal``, 2.11 does not), so identity of its code object recognises it on both.
    """
    hook_class = _require(torch.utils.checkpoint, "_checkpoint_hook", "torch.utils.checkpoint")
    codes = frozenset(c for c in hook_class.__init__.__code__.co_consts
                      if isinstance(c, types.CodeType) and c.co_name == "pack_hook")
    if not codes:
        raise TorchInternalMissing("torch.utils.checkpoint._checkpoint_hook.__init__'s pack_hook",
                                   "no function named pack_hook is defined there")
    return codes


def is_checkpoint_pack_hook(pack: Any) -> bool:
    """Whether ``pack`` is torch.utils.checkpoint's (non-reentrant) pack hook: what it packs is recomputed."""
    return getattr(pack, "__code__", None) in _checkpoint_pack_codes()


# --- torch.nn.functional's own __torch_function__ checks -------------------------------------------------

#: The names torch.nn.functional's python functions call to hand themselves to __torch_function__ handlers.
HAS_TORCH_FUNCTION_NAMES = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def checks_torch_function(func: Any) -> bool:
    """A python function of torch.nn.functional that does its own has_torch_function check (by its code's names)."""
    return (isinstance(func, types.FunctionType) and func.__module__ == F.__name__
            and not set(HAS_TORCH_FUNCTION_NAMES).isdisjoint(func.__code__.co_names))


@functools.lru_cache(maxsize=None)
def without_torch_function_checks(func: types.FunctionType) -> types.FunctionType:
    """A copy of a python torch.nn.functional function whose has_torch_function checks answer False.

    A TorchFunctionMode sees e.g. F.multi_head_attention_forward but not the calls inside it (the mode is
    off while it handles a call); running this copy with the mode on lets it see them. The copy shares
    ``func``'s code object, defaults and closure, with the three check names rebound in its globals.
    """
    no_check = dict.fromkeys(HAS_TORCH_FUNCTION_NAMES, lambda *args: False)
    clone = types.FunctionType(func.__code__, {**func.__globals__, **no_check}, func.__name__,
                               func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


# --- autocast and GradScaler ------------------------------------------------------------------------------

#: torch releases (inclusive) whose aten/src/ATen/autocast_mode.cpp CUDA op lists _emulation/autocast.py copies.
AUTOCAST_LISTS_CHECKED = ((2, 4), (2, 14))


def warn_if_unchecked(what: str, checked: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    """Warn (UncheckedTorchWarning) when this torch is outside ``checked``; True when it is inside."""
    low, high = checked
    if low <= TORCH_VERSION <= high:
        return True
    warnings.warn(f"pytest-gpumem: {what} was checked on torch {low[0]}.{low[1]} .. {high[0]}.{high[1]}, "
                  f"not on torch {torch.__version__}; emulated figures may differ from a GPU's",
                  UncheckedTorchWarning, stacklevel=2)
    return False


def python_op_namespaces() -> tuple:
    """Where python-level torch callables live: torch, F, torch._C._nn, Tensor, torch._C.TensorBase, linalg."""
    return (torch, F, _require(torch._C, "_nn", "torch._C"), torch.Tensor,
            _require(torch._C, "TensorBase", "torch._C"), torch.linalg)


def amp_availability_patch_target() -> tuple[Any, str]:
    """(owner, name) of the check GradScaler('cuda') and autocast call to disable themselves without a GPU.

    ``torch.cuda.amp.common.amp_definitely_not_available``, looked up through the module at each call
    (torch 2.4 .. 2.14), so patching the module attribute takes effect.
    """
    common = _require(torch.cuda.amp, "common", "torch.cuda.amp")
    _require(common, "amp_definitely_not_available", "torch.cuda.amp.common")
    return common, "amp_definitely_not_available"


def checkpoint_device_type_patch_target() -> tuple[Any, str]:
    """(owner, name) of the function activation checkpointing asks which device's autocast state to replay.

    ``torch.utils.checkpoint._infer_device_type``, called through the module by both checkpoint
    implementations (torch 2.4 .. 2.14); on meta tensors it answers "meta", whose autocast state is off.
    """
    import torch.utils.checkpoint as checkpoint

    _require(checkpoint, "_infer_device_type", "torch.utils.checkpoint")
    return checkpoint, "_infer_device_type"


def checkpoint_recompute_patch_targets() -> tuple[tuple[type, str], tuple[type, str]]:
    """Where activation checkpointing receives the function it will recompute in backward, for both modes.

    Non-reentrant: ``torch.utils.checkpoint._CheckpointFrame.__init__(self, recompute_fn, ...)`` (its unpack
    hook calls ``frame.recompute_fn``); reentrant: the static ``CheckpointFunction.forward(ctx, run_function,
    preserve_rng_state, *args)`` (its backward calls ``ctx.run_function``). Checked on torch 2.11 and 2.14.
    """
    import torch.utils.checkpoint as checkpoint

    frame = _require(checkpoint, "_CheckpointFrame", "torch.utils.checkpoint")
    function = _require(checkpoint, "CheckpointFunction", "torch.utils.checkpoint")
    for owner, name, first in ((frame, "__init__", "recompute_fn"), (function, "forward", "run_function")):
        code = getattr(getattr(owner, name), "__code__", None)
        names = code.co_varnames[:code.co_argcount] if code is not None else ()
        if names[1:2] != (first,):
            raise TorchInternalMissing(f"torch.utils.checkpoint.{owner.__name__}.{name}",
                                       f"its second parameter is not {first!r} (found {names})")
    return (frame, "__init__"), (function, "forward")


def fused_devices_patch_target() -> tuple[Any, str]:
    """(owner, name) of the function the optimizers' ``fused=True`` device check asks for the supported devices.

    ``torch.optim.optimizer._get_fused_kernels_supported_devices``, called through the module by
    ``_device_dtype_check_for_fused`` (Adam, AdamW, SGD, Adagrad; torch 2.4 .. 2.14).
    """
    import torch.optim.optimizer as optimizer

    _require(optimizer, "_device_dtype_check_for_fused", "torch.optim.optimizer")
    _require(optimizer, "_get_fused_kernels_supported_devices", "torch.optim.optimizer")
    return optimizer, "_get_fused_kernels_supported_devices"


#: Private GradScaler attributes EmulatedGradScaler reads or overrides (torch 2.3 .. 2.14).
GRAD_SCALER_ATTRIBUTES = ("_maybe_opt_step", "_get_growth_tracker", "_enabled", "_scale", "_growth_tracker",
                          "_growth_interval", "_growth_factor")


def grad_scaler_step_patch_target() -> tuple[type, str]:
    """(GradScaler, "_maybe_opt_step"): the method ``GradScaler.step`` calls to step unless found_inf."""
    _require(torch.amp.GradScaler, "_maybe_opt_step", "torch.amp.GradScaler")
    return torch.amp.GradScaler, "_maybe_opt_step"


# --- CUDA allocator history -------------------------------------------------------------------------------

def record_memory_history(max_entries: int) -> None:
    """Start recording CUDA allocator history (``torch.cuda.memory._record_memory_history``; torch >= 2.1)."""
    _require(torch.cuda.memory, "_record_memory_history", "torch.cuda.memory")(max_entries=max_entries)


def stop_memory_history() -> None:
    """Stop recording CUDA allocator history (``_record_memory_history(enabled=None)``)."""
    _require(torch.cuda.memory, "_record_memory_history", "torch.cuda.memory")(enabled=None)


def record_allocator_trace(max_entries: int, *, stacks: str = "all") -> None:
    """Record every allocator action and, for allocations, the stack that asked (``_record_memory_history``
    with ``context="alloc"``; ``stacks="all"`` adds C++ frames, ``"python"`` keeps Python ones only)."""
    _require(torch.cuda.memory, "_record_memory_history", "torch.cuda.memory")(
        enabled="all", context="alloc", stacks=stacks, max_entries=max_entries)


def allocator_snapshot() -> dict[str, Any]:
    """The allocator's segments, recorded trace and settings as plain dicts (``torch.cuda.memory._snapshot``)."""
    return _require(torch.cuda.memory, "_snapshot", "torch.cuda.memory")()


def dump_memory_snapshot(path: str) -> None:
    """Write the recorded history as a pickle memory_viz reads (``torch.cuda.memory._dump_snapshot``)."""
    _require(torch.cuda.memory, "_dump_snapshot", "torch.cuda.memory")(path)


# --- hypothesis -------------------------------------------------------------------------------------------

def set_hypothesis_digest(test: Any, digest: bytes) -> None:
    """Mix ``digest`` into the example-database key of a @given test (``inner_test._hypothesis_internal_add_digest``,
    read by hypothesis.internal.reflection.function_digest; hypothesis 6.x), so saved failures replay only
    in the same call."""
    test.hypothesis.inner_test._hypothesis_internal_add_digest = digest


def function_mode_stack() -> list[Any]:
    """The torch-function modes active on this thread, outermost first (``torch.overrides`` private)."""
    return _require(torch.overrides, "_get_current_function_mode_stack", "torch.overrides")()


def compiled_original(model: Any) -> Any:
    """The eager module inside a ``torch.compile``d one (dynamo's OptimizedModule), else None."""
    optimized = getattr(getattr(torch, "_dynamo", None), "OptimizedModule", None)
    if optimized is not None and isinstance(model, optimized):
        return model._orig_mod
    return None


def sparse_parts(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The indices and values tensors of a sparse COO tensor, coalesced or not (no copy)."""
    return (t._indices(), t._values())
