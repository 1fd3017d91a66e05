"""The named rules that make an emulated step's figures differ from the same step on real CPU tensors.

Each rule is a fact about CUDA (or about where the step's tensors start) and names the categories it may
change; tests/test_zoo.py checks that every per-phase, per-category difference between the ``cpu`` and the
``emulated`` report of a zoo entry is covered by a rule the entry names, and checks the rules that have a
closed form (``adam-step-on-host``, ``foreach-optimizer`` for Adam-family optimizers, ``batch-moved``) exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from pytest_gpumem import Category

A, T, G, O, B, X = (Category.ACTIVATIONS, Category.TEMPORARIES, Category.GRADS, Category.OPTIMIZER,
                    Category.BATCH, Category.OTHER)


@dataclass(frozen=True)
class Rule:
    """Why the emulated figure differs, and which categories (in which phases) it may move."""

    why: str
    categories: frozenset[Category]
    phases: frozenset[str] = frozenset({"setup", "batch", "forward", "backward", "optimizer", "zero_grad"})


#: a rule that changes what backward keeps can move the backward peak to another op, where another set of
#: gradients is live: those rules also cover ``grads`` in the backward phase
_SAVES = frozenset({A, T})

RULES: dict[str, Rule] = {
    "block-rounding": Rule(
        "the CUDA caching allocator hands out 512-B multiples, and a whole cached block when a split would leave "
        "under 1 MiB (CUDACachingAllocator.cpp); the surplus is `other`, the cpu backend counts exact bytes",
        frozenset({X})),
    "batch-moved": Rule(
        "the batch is built on the host: on `cpu` it is already on the device at setup, the emulated step copies it "
        "to the device in the `batch` phase (as a CUDA step does)",
        frozenset({B}), frozenset({"setup"})),
    "adam-step-on-host": Rule(
        "non-capturable, non-fused Adam-family optimizers keep `step` as a CPU scalar on CUDA: 4 B per parameter "
        "tensor leave the device's optimizer state",
        frozenset({O})),
    "foreach-optimizer": Rule(
        "CUDA defaults to the foreach implementation: Adam's sqrt(exp_avg_sq) exists for all parameters at once "
        "(one parameter-sized list) instead of one parameter at a time in the CPU loop",
        frozenset({T}), frozenset({"optimizer"})),
    "dropout-bool-mask": Rule(
        "training dropout on CUDA runs fused native_dropout and saves a 1 B/element bool mask; the CPU saves an "
        "input-dtype noise tensor (4 B/element in fp32)",
        _SAVES | {G}, frozenset({"forward", "backward"})),
    "sdpa-cuda-kernel": Rule(
        "scaled_dot_product_attention on CUDA runs flash / memory-efficient / cuDNN kernels that save the output and "
        "a logsumexp (padded to 32 rows on the memory-efficient path) and allocate backward scratch; the CPU runs its "
        "own flash kernel",
        _SAVES | {G}, frozenset({"forward", "backward"})),
    "autocast-cuda": Rule(
        "torch.autocast('cuda') casts by CUDA's op lists (bf16 matmuls, fp32 softmax and norms) and caches weight "
        "casts; the cpu backend runs CPU autocast's lists",
        _SAVES | {G}, frozenset({"forward", "backward"})),
    "selection-upper-bound": Rule(
        "selections decided by values computed from parameters (torchvision's remove_small_boxes, score filters, "
        "nms, the proposal matcher's where()) keep every candidate on the emulated backend: an upper bound, noted "
        "per op and line; the real step keeps fewer",
        _SAVES | {G}, frozenset({"forward", "backward"})),
    "rnn-kernels": Rule(
        "the CPU runs ATen's fused LSTM/GRU kernels, the emulated step torch's per-cell decomposition of aten.lstm "
        "/ aten.gru; neither is cuDNN's fused RNN with its reserve buffer, which is not modelled yet",
        _SAVES | {G}, frozenset({"forward", "backward"})),
}
