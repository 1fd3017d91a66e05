"""The CUDA rules that make an emulated step's figures differ from the same step on real CPU tensors."""
from __future__ import annotations

RULES: dict[str, str] = {
    "block-rounding": "the CUDA caching allocator hands out 512-B multiples, and whole blocks when a split would "
                      "leave under 1 MiB (c10/cuda/CUDACachingAllocator.cpp); the cpu backend counts exact bytes",
    "adam-step-on-host": "non-capturable, non-fused Adam-family optimizers keep `step` as a CPU scalar on CUDA "
                         "(4 B per parameter tensor leave the device's optimizer state)",
    "foreach-optimizer": "CUDA defaults to the foreach implementation: each update's temporaries exist for all "
                         "parameters at once instead of one parameter at a time as in the CPU loop",
    "dropout-bool-mask": "training dropout on CUDA runs fused native_dropout and saves a 1 B/element bool mask; "
                         "the CPU saves an input-dtype noise tensor (4 B/element in fp32)",
    "sdpa-cuda-kernel": "scaled_dot_product_attention on CUDA runs flash / memory-efficient / cuDNN kernels "
                        "that save the output and a logsumexp (the CPU runs its own flash kernel or the math path)",
    "mha-fast-path": "nn.MultiheadAttention's math is the same on both devices; it reaches SDPA through "
                     "F.multi_head_attention_forward",
    "autocast-cuda": "torch.autocast('cuda') casts by CUDA's op lists (bf16 matmuls, fp32 softmax/norms) and "
                     "caches weight casts; the cpu backend runs the CPU autocast lists",
    "rnn-without-cudnn": "emulated RNNs run the native per-cell kernels (as the CPU does), not cuDNN's fused RNN "
                         "with its reserve buffer: the one CUDA difference not modelled yet",
}
