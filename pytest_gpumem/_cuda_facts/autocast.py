"""torch.autocast('cuda')'s op lists (aten/src/ATen/autocast_mode.cpp), by Python-level op name.

The release the lists were checked against is ``_compat.AUTOCAST_LISTS_CHECKED``.
"""
from __future__ import annotations

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
