"""Make a training step on meta tensors save and allocate what it would on a CUDA GPU.

Meta kernels are not CUDA kernels: dropout builds a float noise tensor where CUDA keeps a bool mask,
scaled_dot_product_attention keeps the L x L attention matrix where CUDA's flash / memory-efficient
kernels keep a logsumexp, ``torch.autocast("cuda")`` switches itself off without a GPU, GradScaler too.
:func:`cuda_semantics` applies a registry of small substitutions, each reproducing one CUDA behaviour,
and restores everything on exit. Substitutions act on meta tensors only, so the context is harmless
around real CUDA tensors.

How the step runner uses it (the whole step, forward to optimizer, inside one context)::

    with cuda_semantics(), predict_cuda_optimizer(optimizer):
        with torch.autocast("cuda", dtype=torch.float16):   # the user's own region, or the runner's
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()                      # scaler: EmulatedGradScaler("cuda")
        scaler.step(optimizer); scaler.update()
"""
from __future__ import annotations

import contextlib
import functools
import re
import threading
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "SUBSTITUTIONS",
    "Substitution",
    "EmulatedGradScaler",
    "cuda_semantics",
    "emulated_autocast",
    "explain_meta_failure",
    "predict_cuda_optimizer",
]

Proceed = Callable[[tuple, dict], Any]  # call the next substitution (or the op itself) with these args


@dataclass(frozen=True)
class Substitution:
    """One CUDA behaviour reproduced on meta tensors while :func:`cuda_semantics` is entered."""

    name: str
    doc: str  #: the CUDA behaviour it reproduces, and the torch versions checked
    #: python-level torch callables whose calls go to ``run`` (through a TorchFunctionMode)
    intercepts: frozenset = frozenset()
    run: Callable[[Callable, tuple, dict, Proceed], Any] | None = None
    #: (owner, attribute, make_replacement(original)) set on enter, put back on exit
    patches: tuple[tuple[Any, str, Callable[[Any], Any]], ...] = ()


SUBSTITUTIONS: dict[str, Substitution] = {}


def _register(sub: Substitution) -> Substitution:
    if sub.name in SUBSTITUTIONS:
        raise ValueError(f"substitution {sub.name!r} registered twice")
    SUBSTITUTIONS[sub.name] = sub
    return sub


def _on_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


# --------------------------------------------------------------------------------------- autocast
# The CUDA lists of aten/src/ATen/autocast_mode.cpp (torch 2.4 .. 2.14), by python-level name.
_LOWER = """conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d convolution
    _convolution cudnn_convolution cudnn_convolution_transpose prelu addmm addmv addr matmul __matmul__
    __rmatmul__ einsum mm mv linear addbmm baddbmm bmm chain_matmul linalg_multi_dot lstm_cell gru_cell
    rnn_tanh_cell rnn_relu_cell _thnn_fused_lstm_cell _thnn_fused_gru_cell scaled_dot_product_attention"""
# cross_entropy is CompositeImplicit on CUDA: log_softmax (fp32 dtype) + nll_loss (fp32) = fp32.
_FP32 = """acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow __pow__
    __rpow__ __rdiv__ __rtruediv__ softplus layer_norm native_layer_norm group_norm frobenius_norm
    nuclear_norm cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d
    hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss
    multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss
    binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp cross_entropy cross_entropy_loss"""
# fp32_set_opt_dtype / fp32_append_dtype: run with dtype=float32 (no fp32 copy of the input).
_FP32_DTYPE = """prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum norm"""
_PROMOTE = """addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put tensordot scatter_add"""
_BANNED = """binary_cross_entropy"""
_NAMESPACES = (torch, F, torch._C._nn, torch.Tensor, torch._C.TensorBase, torch.linalg)


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
    return _on_meta(t) and t.is_floating_point() and t.dtype is not torch.float64


class _WeightCache:
    """Autocast's cast cache: lower-precision copies of fp32 leaf tensors that require grad."""

    def __init__(self) -> None:
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(leaf) -> (leaf, copy)

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        cacheable = (torch.is_autocast_cache_enabled() and dtype == torch.get_autocast_dtype("cuda")
                     and t.dtype is torch.float32 and t.requires_grad and t.is_leaf and not t._is_view())
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
    if policy == "lower":
        dtype = torch.get_autocast_dtype("cuda")
    elif policy == "fp32":
        dtype = torch.float32
    else:  # promote: the widest floating type among eligible inputs
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in _tensors(args, kwargs) if _eligible(t)))
    return proceed(_cast_all(args, dtype), {k: _cast_all(v, dtype) for k, v in kwargs.items()})


def _without_gpu(original: Callable, answer: bool) -> Callable:
    """``original`` where a GPU is present (real autocast handles real tensors), else a constant answer."""
    return original if torch.cuda.is_available() else (lambda *args, **kwargs: answer)


def _clear_autocast_cache(original: Callable) -> Callable:
    def clear_autocast_cache() -> None:
        original()
        _CACHE.copies.clear()
    return clear_autocast_cache


_register(Substitution(
    "autocast",
    "torch.autocast('cuda') casts meta tensors by CUDA's op lists and caches weight casts until the region exits "
    "(torch 2.4-2.14; it would be disabled without a GPU, and real autocast never touches meta tensors).",
    intercepts=frozenset(_POLICY),
    run=_autocast,
    patches=(
        (torch.cuda.amp.common, "amp_definitely_not_available", lambda original: _without_gpu(original, False)),
        (torch.cuda, "is_bf16_supported", lambda original: _without_gpu(original, True)),  # as on sm80+
        (torch, "clear_autocast_cache", _clear_autocast_cache),
    ),
))


# ---------------------------------------------------------------------------------------- dropout
def _fused_dropout(func: Callable, args: tuple, kwargs: dict, proceed: Proceed) -> Any:
    """at::dropout on CUDA: native_dropout (a bool mask saved) when training, 0 < p < 1, numel > 0."""
    x, p = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "p", 0.5)
    training = _arg(args, kwargs, 2, "training" if func is F.dropout else "train", True)
    inplace = func is F.dropout and _arg(args, kwargs, 3, "inplace", False)
    if not (_on_meta(x) and training and not inplace and 0 < p < 1 and x.numel() > 0):
        return proceed(args, kwargs)
    return torch.native_dropout(x, p, True)[0]


_register(Substitution(
    "dropout",
    "F.dropout/nn.Dropout in training on CUDA run the fused native_dropout, saving a 1 B/elem bool mask, "
    "not an itemsize B/elem noise tensor (torch >= 1.12; inplace, feature and alpha dropout are unfused everywhere).",
    intercepts=frozenset({F.dropout, torch.dropout}),
    run=_fused_dropout,
))


# ------------------------------------------------------------------------ scaled_dot_product_attention
def _cuda_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> str:
    """The SDPA kernel an sm80+ GPU picks: flash, else memory-efficient, else math (cuDNN not modelled)."""
    qk_dim, v_dim = q.size(-1), v.size(-1)
    if not (q.dim() == k.dim() == v.dim() == 4 and k.size(-1) == qk_dim and q.size(1) == k.size(1) == v.size(1)
            and q.dtype == k.dtype == v.dtype):
        return "math"  # GQA, 3-d inputs, mixed dtypes: not modelled, leave meta's path
    low_precision = q.dtype in (torch.float16, torch.bfloat16)
    if low_precision and mask is None and v_dim == qk_dim <= 256 and qk_dim % 8 == 0:
        return "flash"
    align = 8 if low_precision else 4  # memory-efficient kernel's alignment of the head dims
    if (low_precision or q.dtype is torch.float32) and qk_dim % align == 0 and v_dim % align == 0:
        return "efficient"
    return "math"


def _attention_bias(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """CUDA's preprocess_mask: bool -> additive float mask, last dim padded to 16, expanded to (B, H, L, S)."""
    if mask is None:
        return None
    if mask.dtype is torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill(mask.logical_not(), float("-inf"))
    last = mask.size(-1)
    if last % 16:
        mask = F.pad(mask, (0, 16 - last % 16))[..., :last]
    return mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))


def _efficient_attention(func: Callable, args: tuple, kwargs: dict, proceed: Proceed) -> Any:
    """Run the flash / memory-efficient aten op CUDA would pick, so its saved tensors are recorded."""
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = _arg(args, kwargs, 3, "attn_mask")
    dropout_p, is_causal = _arg(args, kwargs, 4, "dropout_p", 0.0), _arg(args, kwargs, 5, "is_causal", False)
    scale = kwargs.get("scale")
    if not all(map(_on_meta, (q, k, v))) or kwargs.get("enable_gqa") or len(args) > 6:
        return proceed(args, kwargs)
    kernel = _cuda_attention_kernel(q, k, v, mask)
    if kernel == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    if kernel == "efficient":
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, _attention_bias(mask, q, k), needs_lse, dropout_p, is_causal, scale=scale)[0]
    return proceed(args, kwargs)


_register(Substitution(
    "sdpa",
    "scaled_dot_product_attention on CUDA (sm80+) runs flash or memory-efficient kernels that save output + "
    "logsumexp (+ rng state), not the B*H*L*S attention matrix the meta math path saves (torch 2.4-2.14).",
    intercepts=frozenset({F.scaled_dot_product_attention}),
    run=_efficient_attention,
))


# ------------------------------------------------------------------------------------ GradScaler
def _step_without_inf_check(original: Callable) -> Callable:
    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        if any(_on_meta(t) for t in optimizer_state["found_inf_per_device"].values()):
            return optimizer.step(*args, **kwargs)  # meta grads hold no values: assume finite, as most steps are
        return original(self, optimizer, optimizer_state, *args, **kwargs)
    return _maybe_opt_step


_register(Substitution(
    "grad_scaler",
    "torch.amp.GradScaler('cuda') stays enabled without a GPU and steps without reading found_inf from a meta "
    "tensor (torch 2.4-2.14; its scale, growth tracker, found_inf and unscale run as on CUDA).",
    patches=((torch.amp.grad_scaler.GradScaler, "_maybe_opt_step", _step_without_inf_check),),
))


class EmulatedGradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler that works on meta tensors: same tensors and kernels, finite grads assumed."""

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True) -> None:
        with _patched(SUBSTITUTIONS["autocast"].patches[:1]):  # stay enabled without a GPU
            super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        self._known_scale, self._known_growth = float(init_scale), 0  #: what the meta scale would hold

    _maybe_opt_step = _step_without_inf_check(torch.amp.GradScaler._maybe_opt_step)

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        super().update(new_scale)
        if not self._enabled:
            return
        if new_scale is not None:
            self._known_scale, self._known_growth = float(new_scale), 0
            return
        self._known_growth += 1
        if self._known_growth == self._growth_interval:
            self._known_scale, self._known_growth = self._known_scale * self._growth_factor, 0

    def get_scale(self) -> float:
        if self._enabled and _on_meta(self._scale):
            return self._known_scale
        return super().get_scale()

    def _get_growth_tracker(self) -> int:
        if self._enabled and _on_meta(self._growth_tracker):
            return self._known_growth
        return super()._get_growth_tracker()


# ------------------------------------------------------------------------------------------ the mode
_NO_TORCH_FUNCTION = {name: (lambda *args: False) for name in
                      ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")}


def _checks_torch_function(func: Any) -> bool:
    """A python function of torch.nn.functional that does its own has_torch_function check."""
    return (isinstance(func, types.FunctionType) and func.__module__ == F.__name__
            and not _NO_TORCH_FUNCTION.keys().isdisjoint(func.__code__.co_names))


_PASS_THROUGH: set[Any] = set()  #: callables seen not to need the mode (no substitution, not an F function)


@functools.lru_cache(maxsize=None)
def _transparent(func: types.FunctionType) -> types.FunctionType:
    """A copy of a python torch.nn.functional function without its own __torch_function__ check.

    A TorchFunctionMode sees F.multi_head_attention_forward but not the linear / sdpa / dropout calls inside
    it (the mode is off while it handles a call); running this copy with the mode on lets it see them.
    """
    clone = types.FunctionType(func.__code__, {**func.__globals__, **_NO_TORCH_FUNCTION}, func.__name__,
                               func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


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


@contextlib.contextmanager
def _patched(patches: tuple) -> Iterator[None]:
    """Set each (owner, attribute, make_replacement) for the duration; always put the originals back."""
    saved = []
    try:
        for owner, attr, make in patches:
            original = getattr(owner, attr)
            saved.append((owner, attr, original))
            setattr(owner, attr, make(original))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


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
            with _CudaSemanticsMode(chosen):
                yield
    finally:
        _OWNER.clear()
        _CACHE.copies.clear()


@contextlib.contextmanager
def emulated_autocast(dtype: torch.dtype = torch.float16, *, cache_enabled: bool | None = None) -> Iterator[None]:
    """``torch.autocast("cuda", dtype)`` as a GPU runs it, for meta tensors; enters cuda_semantics if needed."""
    with cuda_semantics(), torch.autocast("cuda", dtype=dtype, cache_enabled=cache_enabled):
        yield


# ------------------------------------------------------------------------------------- optimizers
_FOREACH_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam",
                       "Adadelta", "ASGD", "Rprop")


@contextlib.contextmanager
def predict_cuda_optimizer(optimizer: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """Make ``optimizer`` take the implementation CUDA would default to: foreach, where foreach is unset.

    On CUDA, _default_to_fused_or_foreach picks foreach for groups with foreach=None, fused not set and
    differentiable=False; on the CPU or meta it picks the per-parameter loop. Restored on exit.
    """
    changed = []
    if type(optimizer).__name__ in _FOREACH_OPTIMIZERS and isinstance(optimizer, torch.optim.Optimizer):
        for group in optimizer.param_groups:
            if "foreach" in group and group["foreach"] is None and not group.get("fused") \
                    and not group.get("differentiable"):
                group["foreach"] = True
                changed.append(group)
    try:
        yield optimizer
    finally:
        for group in changed:
            group["foreach"] = None


# ------------------------------------------------------------------------------- meta failures
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
