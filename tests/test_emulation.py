"""cuda_semantics and friends: each substitution checked by what meta tensors save and keep alive."""
from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from gpumem_factories import mlp
from pytest_gpumem._emulation import (
    SUBSTITUTIONS,
    EmulatedGradScaler,
    cuda_semantics,
    emulated_autocast,
    explain_meta_failure,
    predict_cuda_optimizer,
)

META = torch.device("meta")


def saved(fn):
    """(result, tensors autograd saved while running fn), one entry per distinct storage."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage()._cdata, t)
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, list(seen.values())


def nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def function_modes():
    return len(torch.overrides._get_current_function_mode_stack())


# ----------------------------------------------------------------------------------- registry
def test_every_substitution_documents_itself_in_one_line():
    assert {"autocast", "dropout", "sdpa", "grad_scaler"} <= set(SUBSTITUTIONS)
    for name, sub in SUBSTITUTIONS.items():
        assert sub.name == name and sub.doc and "\n" not in sub.doc and "torch" in sub.doc
        assert sub.run is not None or sub.patches


def test_exit_restores_everything_even_after_an_exception():
    originals = [(o, a, getattr(o, a)) for s in SUBSTITUTIONS.values() for o, a, _ in s.patches]
    modes = function_modes()
    with pytest.raises(ZeroDivisionError):
        with cuda_semantics():
            assert torch.cuda.is_bf16_supported()
            1 / 0
    assert [(o, a, getattr(o, a)) for o, a, _ in originals] == originals
    assert function_modes() == modes
    x = torch.ones(16, 16, device=META, requires_grad=True)
    _, kept = saved(lambda: F.dropout(x * 1, 0.5, True))
    assert [t.dtype for t in kept] == [torch.float32]  # meta's own noise tensor again


def test_nested_use_is_a_no_op_and_keeps_the_outer_context():
    x = torch.ones(16, 16, device=META, requires_grad=True)
    with cuda_semantics():
        with cuda_semantics():
            pass
        _, kept = saved(lambda: F.dropout(x * 1, 0.5, True))
        assert [t.dtype for t in kept] == [torch.bool]


def test_a_second_thread_is_refused_while_one_is_inside():
    import threading

    errors = []

    def enter():
        try:
            with cuda_semantics():
                pass
        except RuntimeError as exc:
            errors.append(exc)

    with cuda_semantics():
        worker = threading.Thread(target=enter)
        worker.start()
        worker.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])


def test_unknown_substitution_names_are_rejected():
    with pytest.raises(ValueError, match="unknown substitutions"):
        with cuda_semantics(only=("dropuot",)):
            pass


# ------------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_saves_a_bool_mask_like_cuda(dtype):
    shape = (8, 3, 5)
    x = torch.ones(shape, device=META, dtype=dtype, requires_grad=True)
    numel, itemsize = math.prod(shape), x.element_size()
    _, meta_saved = saved(lambda: F.dropout(x * 1, 0.25, True))
    with cuda_semantics():
        out, cuda_saved = saved(lambda: nn.Dropout(0.25)(x * 1))
        out.sum().backward()
    assert nbytes(meta_saved) == numel * itemsize  # float noise
    assert nbytes(cuda_saved) == numel * 1         # bool mask of native_dropout
    assert x.grad.shape == shape


@pytest.mark.parametrize("call", [
    lambda x: F.dropout(x, 0.5, True, inplace=True),   # at::dropout_: unfused on CUDA too
    lambda x: F.dropout2d(x, 0.5, True),               # feature noise (N, C, 1, 1) everywhere
    lambda x: F.alpha_dropout(x, 0.5, True),
    lambda x: F.dropout(x, 0.5, False),
    lambda x: F.dropout(x, 0.0, True),
], ids=["inplace", "dropout2d", "alpha", "eval", "p0"])
def test_dropout_left_alone_where_cuda_takes_the_same_path(call):
    x = torch.ones(4, 6, 3, 3, device=META, requires_grad=True)
    _, plain = saved(lambda: call(x * 1))
    with cuda_semantics():
        _, emulated = saved(lambda: call(x * 1))
    assert [(t.shape, t.dtype) for t in emulated] == [(t.shape, t.dtype) for t in plain]


# ------------------------------------------------------------------------------------- attention
def qkv(b, h, l, s, d, dtype):
    q = torch.ones(b, h, l, d, device=META, dtype=dtype, requires_grad=True)
    k, v = (torch.ones(b, h, s, d, device=META, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])  # flash, memory-efficient
def test_sdpa_saves_logsumexp_not_the_attention_matrix(dtype):
    b, h, l, s, d = 2, 3, 40, 24, 16
    q, k, v = qkv(b, h, l, s, d, dtype)
    _, plain = saved(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))
    with cuda_semantics():
        out, kept = saved(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))
        out.sum().backward()
    assert any(t.numel() == b * h * l * s for t in plain)
    assert not any(t.numel() == b * h * l * s for t in kept)
    isz = q.element_size()
    # torch's meta kernels (_meta_registrations.py) give the figures: fp16 takes flash, whose fp32 logsumexp is
    # (B, H, L) = 2*3*40 = 240 floats and whose rng state is a uint64[2] seed + a uint64 offset = 24 B; fp32 takes
    # memory-efficient, which pads L to a multiple of 32 (40 -> 64): 2*3*64 = 384 floats, int64 seed + offset = 16 B
    lse, rng = (b * h * l, 2 * 8 + 8) if dtype is torch.float16 else (b * h * 64, 8 + 8)
    assert max(t.numel() for t in kept if t.dtype is torch.float32 and t.dim() == 3) == lse
    assert sum(t.untyped_storage().nbytes() for t in kept if not t.is_floating_point()) == rng
    # q and the output (B, H, L, D), k and v (B, H, S, D); fp16: 25,560 B, fp32: 50,704 B
    assert nbytes(kept) == (b * h * l * d * 2 + b * h * s * d * 2) * isz + lse * 4 + rng
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_sdpa_with_a_bool_mask_takes_a_fused_kernel_with_an_additive_bias():  # cuDNN on sm90
    b, h, l, d = 2, 2, 20, 8
    q, k, v = qkv(b, h, l, l, d, torch.float16)
    mask = torch.ones(l, l, dtype=torch.bool, device=META).tril()
    with cuda_semantics():
        out, kept = saved(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        out.sum().backward()
    assert out.shape == q.shape and out.dtype is torch.float16
    assert not any(t.dtype is torch.bool for t in kept)  # CUDA turns the mask into an additive bias


def test_sdpa_falls_back_to_math_where_cuda_would():
    q, k, v = qkv(1, 2, 10, 10, 6, torch.float32)  # head_dim 6: not aligned for the efficient kernel
    with cuda_semantics():
        _, kept = saved(lambda: F.scaled_dot_product_attention(q, k, v))
    assert any(t.numel() == 2 * 10 * 10 for t in kept)


def test_transformer_encoder_layer_attention_is_seen_through_multihead_attention():
    n, l, e, heads = 2, 30, 32, 4
    layer = nn.TransformerEncoderLayer(e, heads, 64, batch_first=True, device=META)
    x = torch.ones(n, l, e, device=META, requires_grad=True)
    _, plain = saved(lambda: layer(x))
    with cuda_semantics():
        out, kept = saved(lambda: layer(x))
        out.sum().backward()
    assert any(t.numel() == n * heads * l * l for t in plain)
    assert not any(t.numel() == n * heads * l * l for t in kept)
    assert sum(t.dtype is torch.bool for t in kept) == 3  # attention-output, ffn and residual dropout masks
    assert x.grad.shape == x.shape
    padding = torch.zeros(n, l, dtype=torch.bool, device=META)  # merged into a float bias, efficient kernel
    with cuda_semantics():
        out, kept = saved(lambda: layer(x, src_key_padding_mask=padding))
        out.sum().backward()
    assert max(t.untyped_storage().nbytes() for t in kept) < n * heads * l * l * 4  # no L x L storage


def test_cnn_with_pooling_batchnorm_and_dropout_trains_under_autocast():
    # F.max_pool2d hands its __torch_function__ check to a boolean-dispatch wrapper: must not recurse
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Dropout(0.5), nn.Linear(8 * 7 * 7, 10)).to(META)
    x = torch.ones(4, 3, 16, 16, device=META)
    with cuda_semantics():
        with torch.autocast("cuda"):
            out, kept = saved(lambda: model(x))
            loss = F.cross_entropy(out, torch.zeros(4, dtype=torch.long, device=META))
        loss.backward()
    assert out.dtype is torch.float16 and loss.dtype is torch.float32
    assert sum(t.dtype is torch.bool and t.numel() == 4 * 8 * 7 * 7 for t in kept) == 1  # the dropout mask
    assert all(p.grad is not None and p.grad.dtype is torch.float32 for p in model.parameters())


def test_vit_b_16_trains_on_meta_without_attention_matrices():
    torchvision = pytest.importorskip("torchvision")
    with torch.device(META):  # built on meta directly: initialising 86M weights on the CPU first costs ~0.6 s
        model = torchvision.models.vit_b_16(weights=None)
    x = torch.ones(2, 3, 224, 224, device=META)
    tokens = (224 // 16) ** 2 + 1
    with cuda_semantics():
        out, kept = saved(lambda: model(x))
        out.sum().backward()
    assert out.shape == (2, 1000)
    assert not any(t.numel() == 2 * 12 * tokens * tokens for t in kept)


# ------------------------------------------------------------------------------------- autocast
def meta_mlp():
    return mlp(32, 64, 8, device=META)


class CastRecorder(TorchDispatchMode):
    """Weak references to the outputs of every dtype cast (aten._to_copy), keyed by the input's shape."""

    def __init__(self):
        super().__init__()
        self.casts: list[tuple[tuple, torch.dtype, weakref.ref]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.casts.append((tuple(args[0].shape), out.dtype, weakref.ref(out)))
        return out


def test_autocast_cuda_runs_linear_in_fp16_and_caches_weight_copies_until_exit():
    model, x = meta_mlp(), torch.ones(16, 32, device=META)
    params = sorted(tuple(p.shape) for p in model.parameters())
    with cuda_semantics(), CastRecorder() as casts:
        with torch.autocast("cuda"):
            out = model(x)  # (saved_tensors_hooks returning the tensor itself would keep the graph alive)
            assert out.dtype is torch.float16
            assert sorted(shape for shape, dtype, _ in casts.casts) == sorted(params + [tuple(x.shape)])
            assert {dtype for _, dtype, _ in casts.casts} == {torch.float16}
            del out
            gc.collect()
            alive = sorted(shape for shape, _, ref in casts.casts if ref() is not None)
            assert alive == params  # every parameter's fp16 copy, held by the cache; x's copy went with the graph
        gc.collect()
        assert all(ref() is None for _, _, ref in casts.casts)


def test_autocast_saves_fp16_activations_for_linear_layers():
    model, x = meta_mlp(), torch.ones(16, 32, device=META)
    with cuda_semantics(), torch.autocast("cuda"):
        _, kept = saved(lambda: model(x))
    assert {t.dtype for t in kept} == {torch.float16}  # linear inputs, relu output, weight copies
    assert nbytes(kept) == (16 * 32 + 16 * 64 + 64 * 8) * 2  # x, relu output (also 2nd linear's input), w2


def test_autocast_without_cache_frees_weight_copies_with_the_graph():
    model, x = meta_mlp(), torch.ones(16, 32, device=META)
    with cuda_semantics(), CastRecorder() as casts, torch.autocast("cuda", cache_enabled=False):
        out = model(x)
        assert len(casts.casts) == 5
        del out
        gc.collect()
        assert all(ref() is None for _, _, ref in casts.casts)


def test_autocast_policies_follow_the_cuda_lists():
    half = torch.ones(4, 8, device=META, dtype=torch.float16, requires_grad=True)
    single = torch.ones(4, 8, device=META, requires_grad=True)
    double = torch.ones(8, 8, device=META, dtype=torch.float64)
    with cuda_semantics(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert (single @ single.t()).dtype is torch.bfloat16                 # lower precision
        assert F.layer_norm(half, (8,)).dtype is torch.float32               # fp32
        assert torch.softmax(half, -1).dtype is torch.float32                # fp32 via dtype=
        assert half.sum().dtype is torch.float32
        assert half.sum(dtype=torch.float16).dtype is torch.float16          # explicit dtype wins
        assert torch.addcmul(half, half, single).dtype is torch.float32      # promote
        assert torch.mm(double, double).dtype is torch.float64               # float64 is not eligible
        assert F.cross_entropy(half, torch.zeros(4, dtype=torch.long, device=META)).dtype is torch.float32
        with torch.autocast("cuda", enabled=False):
            assert (single @ single.t()).dtype is torch.float32
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            F.binary_cross_entropy(torch.sigmoid(half), half)


def test_emulated_autocast_works_on_its_own_and_cleans_up():
    model, x = meta_mlp(), torch.ones(16, 32, device=META)
    with CastRecorder() as casts:
        with emulated_autocast(torch.bfloat16):
            assert model(x).dtype is torch.bfloat16
        gc.collect()
        assert casts.casts and all(ref() is None for _, _, ref in casts.casts)
    assert model(x).dtype is torch.float32


def test_autocast_cuda_stays_disabled_outside_cuda_semantics():
    if torch.cuda.is_available():
        pytest.skip("a real GPU enables autocast by itself")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cuda"):
            assert not torch.is_autocast_enabled("cuda")


# ------------------------------------------------------------------------------------- GradScaler
def test_emulated_grad_scaler_runs_a_full_step_on_meta():
    model = meta_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = EmulatedGradScaler("cuda", init_scale=8.0, growth_interval=2)
    assert scaler.is_enabled()
    with cuda_semantics(), predict_cuda_optimizer(opt):
        for _ in range(2):
            with torch.autocast("cuda"):
                loss = model(torch.ones(4, 32, device=META)).float().pow(2).mean()
            scaled = scaler.scale(loss)
            assert scaled.shape == loss.shape and scaled.device == META
            scaled.backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    assert scaler._scale.device == META and scaler._scale.dtype is torch.float32
    assert scaler._growth_tracker.dtype is torch.int32
    assert scaler.get_scale() == 16.0  # grew once after growth_interval finite steps


def test_torch_grad_scaler_is_enabled_and_steps_inside_cuda_semantics():
    model = meta_mlp()
    opt = torch.optim.Adam(model.parameters())
    with cuda_semantics():
        scaler = torch.amp.GradScaler("cuda")
        assert scaler.is_enabled()
        scaler.scale(model(torch.ones(4, 32, device=META)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert all(len(opt.state[p]) == 3 for p in model.parameters())  # the step really ran


# ------------------------------------------------------------------------------------ optimizers
FOREACH = [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop,
           torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta, torch.optim.ASGD,
           torch.optim.Rprop]


@pytest.mark.parametrize("cls", FOREACH, ids=lambda c: c.__name__)
def test_predict_cuda_optimizer_picks_foreach_and_restores(cls):
    params = [nn.Parameter(torch.ones(5, 3, device=META)), nn.Parameter(torch.ones(3, device=META))]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = cls(params, lr=0.1)
    assert opt.param_groups[0]["foreach"] is None
    with predict_cuda_optimizer(opt):
        assert opt.param_groups[0]["foreach"] is True
        if cls is torch.optim.ASGD:  # keeps `step` on the device and reads it with .item(), foreach or not
            with pytest.raises(RuntimeError, match="item"):
                opt.step()
        else:
            opt.step()
    assert opt.param_groups[0]["foreach"] is None


def test_predict_cuda_optimizer_keeps_explicit_choices():
    p = nn.Parameter(torch.ones(3, device=META))
    opt = torch.optim.Adam([{"params": [p], "foreach": False}])
    lbfgs = torch.optim.LBFGS([nn.Parameter(torch.ones(3))])
    with predict_cuda_optimizer(opt), predict_cuda_optimizer(lbfgs):
        assert opt.param_groups[0]["foreach"] is False
        assert "foreach" not in lbfgs.param_groups[0]


@pytest.mark.parametrize("foreach", [False, True])
def test_non_capturable_adam_keeps_step_on_the_cpu(foreach):
    p = nn.Parameter(torch.ones(10, device=META))
    p.grad = torch.ones_like(p)
    opt = torch.optim.Adam([p], foreach=foreach)
    opt.step()
    state = opt.state[p]
    assert state["step"].device.type == "cpu"  # host memory, not device memory
    assert state["exp_avg"].device == META and state["exp_avg_sq"].device == META


# ----------------------------------------------------------------------------- meta failures
@pytest.mark.parametrize("call, op", [
    (lambda x: x.sum().item(), "aten._local_scalar_dense"),
    (lambda x: bool(x.sum() > 0), "aten._local_scalar_dense"),
    (lambda x: x.nonzero(), "aten.nonzero"),
    (lambda x: x[x > 0], "aten.nonzero"),
    (lambda x: x.masked_select(x > 0), "aten.masked_select"),
    (lambda x: torch.unique(x), "aten._unique2"),
    (lambda x: x.tolist(), "aten._to_copy"),
    (lambda x: x.numpy(), "Tensor.numpy"),
])
def test_explain_meta_failure_names_the_op_and_the_way_out(call, op):
    x = torch.ones(4, 4, device=META)
    with pytest.raises(Exception) as info:
        call(x)
    text = explain_meta_failure(info.value)
    assert text is not None and op in text
    assert "meta tensors" in text and "backend='cpu'" in text


def test_explain_meta_failure_follows_the_cause_and_ignores_other_errors():
    try:
        try:
            torch.ones(2, device=META).sum().item()
        except RuntimeError as inner:
            raise ValueError("step failed") from inner
    except ValueError as outer:
        assert "aten._local_scalar_dense" in explain_meta_failure(outer)
    assert explain_meta_failure(ValueError("shapes do not match")) is None
