"""Attention as CUDA runs it: the kernel sm90 picks (_cuda_facts/attention.py), what it saves, the scratch its
backward allocates, grouped-query shapes without expanded k/v, and the note naming the kernel in the report."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pytest_gpumem import Category, track
from pytest_gpumem._cuda_facts import attention as facts

MiB = 2**20
SM90, SM80 = facts.GpuProfile(sm=(9, 0), torch=(2, 11)), facts.GpuProfile(sm=(8, 0), torch=(2, 11))
ALL_BUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
DEFAULT = [SDPBackend.CUDNN_ATTENTION, *ALL_BUT_CUDNN]


def call(**changes) -> facts.AttentionCall:
    """The issue's GQA layer: bf16, batch 4, 32 query heads, 8 key/value heads, length 2048, head dim 128, causal."""
    base = dict(batch=4, q_heads=32, kv_heads=8, q_len=2048, kv_len=2048, qk_dim=128, v_dim=128,
                dtype=torch.bfloat16, is_causal=True, enable_gqa=True)
    return facts.AttentionCall(**{**base, **changes})


# --------------------------------------------------------------------------------------------- kernel choice
@pytest.mark.parametrize("changes, profile, kernel", [
    ({}, SM90, facts.CUDNN),                                     # sm90, bf16, head dim 128: cuDNN first
    ({}, SM80, facts.FLASH),                                     # sm80: no cuDNN preference, flash takes GQA
    ({"dtype": torch.float16, "kv_heads": 32, "enable_gqa": False}, SM90, facts.CUDNN),
    ({"qk_dim": 256, "v_dim": 256}, SM90, facts.FLASH),          # cuDNN: head dim above 128
    ({"dropout": 0.1}, SM90, facts.FLASH),                       # 0.1 x 16 = 1.6: not a multiple of 1/16
    ({"dropout": 0.125}, SM90, facts.CUDNN),                     # 0.125 x 16 = 2
    ({"dtype": torch.float32}, SM90, facts.MATH),                # fp32 GQA: no fused kernel in 2.11
    ({"dtype": torch.float32, "kv_heads": 32, "enable_gqa": False}, SM90, facts.EFFICIENT),
    ({"has_mask": True, "qk_dim": 256, "v_dim": 256, "kv_heads": 32}, SM90, facts.EFFICIENT),  # flash: no mask
    ({"has_mask": True}, SM90, facts.CUDNN),                     # cuDNN takes a mask and GQA
    ({"has_mask": True}, SM80, facts.MATH),                      # flash: mask; efficient: GQA
    ({"kv_heads": 8, "enable_gqa": False}, SM90, facts.MATH),    # differing heads need enable_gqa=True
    ({"qk_dim": 6, "v_dim": 6, "dtype": torch.float32, "kv_heads": 32}, SM90, facts.MATH),  # 6 % 4 != 0
    ({"is_causal": True, "q_len": 128, "qk_dim": 256, "v_dim": 256}, SM90, facts.MATH),  # flash: causal, not square
])
def test_kernel_choice_follows_sdp_utils(changes, profile, kernel):
    assert facts.choose(call(**changes), profile).kernel == kernel


def test_deterministic_algorithms_pass_over_cudnn_and_the_choice_says_why():
    choice = facts.choose(call(), SM90, facts.Enabled(deterministic=True))
    assert choice.kernel == facts.FLASH and choice.passed_over == {facts.CUDNN: "deterministic algorithms are on"}
    assert facts.choose(call(), SM90, facts.Enabled(cudnn=False, flash=False)).kernel == facts.MATH


# --------------------------------------------------------------------------------------------- kernel buffers
def test_flash_scratch_rounds_rows_to_128_and_head_dim_to_32():
    # L = 100 -> 128 rows; head dim 80 -> 96 (a multiple of 32 up to 128); 2 query heads over 1 key/value head
    c = call(batch=3, q_heads=2, kv_heads=1, q_len=100, kv_len=100, qk_dim=80, v_dim=80)
    scratch = {b.name: (b.shape, b.dtype) for b in facts.backward_scratch(c, facts.FLASH)}
    assert scratch == {"softmax_d": ((3, 2, 128), torch.float32), "dq_accum": ((3, 128, 2, 96), torch.float32),
                       "dk_expanded": ((3, 100, 2, 80), torch.bfloat16),
                       "dv_expanded": ((3, 100, 2, 80), torch.bfloat16)}


def test_memory_efficient_logsumexp_is_padded_to_32_rows():
    c = call(dtype=torch.float32, kv_heads=32, q_len=40, kv_len=40, enable_gqa=False)
    saved = {b.name: b.shape for b in facts.forward_saves(c, facts.EFFICIENT)}
    assert saved["logsumexp"] == (4, 32, 64)  # 40 -> 64
    assert [b.name for b in facts.backward_scratch(c, facts.EFFICIENT)] == ["delta"]  # fp32: no fp32 accumulator


# ---------------------------------------------------------------------------- the GQA layer, end to end on meta
B, HQ, HKV, L, D = 4, 32, 8, 2048, 128


def gqa_layer_step(backends) -> tuple:
    """One causal GQA attention call and its backward on the emulated backend, q/k/v/grad_out as the batch."""
    with sdpa_kernel(backends):
        q = torch.empty(B, HQ, L, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.empty(B, HKV, L, D, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        grad_out = torch.empty(B, HQ, L, D, device="meta", dtype=torch.bfloat16)
        with track(batch=(q, k, v, grad_out), backend="emulated") as handle:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad_out)
    return handle.report, q, k


def test_gqa_layer_on_the_flash_path_matches_its_closed_form():
    report, q, k = gqa_layer_step(ALL_BUT_CUDNN)  # cuDNN off: sm90 would pick it first
    bf16, fp32 = 2, 4
    q_bytes = B * HQ * L * D * bf16                     # 64 MiB: q, the output, grad_out, dq, dk/dv expanded
    kv_bytes = B * HKV * L * D * bf16                   # 16 MiB: k, v, dk, dv
    lse = B * HQ * L * fp32                             # 1 MiB logsumexp, saved
    rng = 2 * 512                                       # rng_state uint64[2] and an unused uint64, 512-B blocks
    saved = q_bytes + lse + rng                         # the output and logsumexp (q, k, v are the batch)
    batch = 2 * q_bytes + 2 * kv_bytes                  # q, grad_out, k, v = 160 MiB
    grads = q_bytes + 2 * kv_bytes                      # dq, dk, dv = 96 MiB
    scratch = (B * HQ * L * fp32                        # softmax_d (B, H, round128(L)) = 1 MiB
               + B * L * HQ * D * fp32                  # dq_accum (B, round128(L), H, round32(D)) fp32 = 128 MiB
               + 2 * B * L * HQ * D * bf16)             # dk_expanded, dv_expanded at 32 heads = 2 x 64 MiB
    closed_form = batch + saved + grads + scratch       # 160 + 65 + 96 + 257 MiB = 578 MiB + 1 KiB
    assert report.peak == pytest.approx(closed_form, rel=0.05)
    assert report.peak < 600 * MiB  # the math path with k/v expanded keeps ~6.6 GiB
    # k and v were not expanded: what forward kept is the output, the logsumexp and the rng state only
    assert report.category_peak(Category.ACTIVATIONS) == pytest.approx(saved, abs=1024)
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    assert report.notes == ("attention assumed on flash attention (bfloat16, batch 4, 32 query / 8 key-value "
                            "heads, length 2048, head dim 128) [not cuDNN attention: disabled]",)


def test_gqa_layer_takes_cudnn_by_default_with_its_workspace():
    report, _, _ = gqa_layer_step(DEFAULT)
    q_bytes, kv_bytes, lse = B * HQ * L * D * 2, B * HKV * L * D * 2, B * HQ * L * 4
    saved = q_bytes + lse + 2 * 512                     # output, stats (B, H, L, 1) fp32, philox seed and offset
    scratch = B * HQ * L * D * 4 + B * HQ * L * 4       # dQ accumulator fp32 128 MiB + softmax sum 1 MiB
    closed_form = (2 * q_bytes + 2 * kv_bytes) + saved + (q_bytes + 2 * kv_bytes) + scratch  # 450 MiB + 1 KiB
    assert report.peak == pytest.approx(closed_form, rel=0.05)
    assert "attention assumed on cuDNN attention" in report.notes[0]


def test_backward_scratch_is_freed_when_the_kernel_returns():
    report, _, _ = gqa_layer_step(ALL_BUT_CUDNN)
    backward = report.phases[next(p for p in report.phases if p.value == "backward")]
    assert backward.peak_split[Category.TEMPORARIES] >= 257 * MiB  # dq_accum, softmax_d, dk/dv expanded live
    assert backward.retained_split.get(Category.TEMPORARIES, 0) < 97 * MiB  # only dq/dk/dv outlive the kernel
