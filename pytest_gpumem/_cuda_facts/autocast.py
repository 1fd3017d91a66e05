"""torch.autocast('cuda')'s op lists (aten/src/ATen/autocast_mode.cpp), by Python-level op name.

The release the lists were checked against is ``_compat.AUTOCAST_LISTS_CHECKED``.
"""
from __future__ import annotations

import functools

import torch

#: run in the low-precision dtype (inputs cast down, the weight's cast cached for the region)
LOWER: frozenset[str] = frozenset("""conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d
    conv_transpose3d convolution _convolution cudnn_convolution cudnn_convolution_transpose prelu addmm addmv addr
    matmul __matmul__ __rmatmul__ einsum mm mv linear addbmm baddbmm bmm chain_matmul linalg_multi_dot lstm_cell
    gru_cell rnn_tanh_cell rnn_relu_cell _thnn_fused_lstm_cell _thnn_fused_gru_cell
    scaled_dot_product_attention""".split())
#: run in float32 (inputs cast up). cross_entropy is CompositeImplicit on CUDA: log_softmax + nll_loss, fp32
FP32: frozenset[str] = frozenset("""acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh
    tan pow __pow__ __rpow__ __rdiv__ __rtruediv__ softplus layer_norm native_layer_norm group_norm frobenius_norm
    nuclear_norm cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d
    hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss
    multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss
    binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp cross_entropy cross_entropy_loss""".split())
#: fp32_set_opt_dtype / fp32_append_dtype: run with dtype=float32 (no fp32 copy of the input)
FP32_DTYPE: frozenset[str] = frozenset("prod softmax log_softmax cumprod cumsum linalg_vector_norm "
                                       "linalg_matrix_norm sum norm".split())
#: run in the widest input dtype
PROMOTE: frozenset[str] = frozenset("addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put tensordot "
                                    "scatter_add".split())
#: refused under autocast
BANNED: frozenset[str] = frozenset({"binary_cross_entropy"})

#: op name -> its policy ("lower", "fp32", "fp32_dtype", "promote" or "banned"); linalg ops as ``linalg_<name>``
POLICY: dict[str, str] = {name: policy for policy, names in (
    ("lower", LOWER), ("fp32", FP32), ("fp32_dtype", FP32_DTYPE), ("promote", PROMOTE), ("banned", BANNED))
    for name in names}


def eligible(dtype: torch.dtype) -> bool:
    """CUDA autocast's is_eligible: a floating-point tensor that is not float64 may be cast."""
    return dtype.is_floating_point and dtype is not torch.float64


def cast_to(policy: str, autocast_dtype: torch.dtype, eligible_dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype an op of ``policy`` casts its eligible inputs to ("lower", "fp32" or "promote": the widest)."""
    if policy == "lower":
        return autocast_dtype
    if policy == "fp32":
        return torch.float32
    if policy == "promote":
        return functools.reduce(torch.promote_types, eligible_dtypes)
    raise ValueError(f"policy {policy!r} does not cast its inputs")


def weight_cast_cached(dtype: torch.dtype, autocast_dtype: torch.dtype, t_dtype: torch.dtype, requires_grad: bool,
                       is_leaf: bool, is_view: bool, cache_enabled: bool) -> bool:
    """Whether autocast keeps a cast in its cache until the outermost region exits (cached_cast): a cast to the
    region's dtype of an fp32 leaf that requires grad (a parameter), not a view, with the cache on."""
    return (cache_enabled and dtype == autocast_dtype and t_dtype is torch.float32 and requires_grad and is_leaf
            and not is_view)
