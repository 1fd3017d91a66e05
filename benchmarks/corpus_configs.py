"""The training steps of the recorded CUDA corpus: model, batch, optimizer and step options, device-free.

The recorder (`record_cuda_corpus.py`) runs each on a real GPU as a plain PyTorch step; the replay
tests (`tests/test_cuda_corpus_replay.py`) build the very same step and run it on the emulated backend.
Everything is built on the CPU with a fixed seed; the step moves it to the device. Models stay modest so
that the whole corpus records in well under 8 minutes on one H100/H200.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CorpusConfig:
    """One plain training step: what to build, and the switches it runs under."""

    name: str                                               #: also the file name: letters, digits, '_' and '-'
    model: Callable[[], nn.Module]                          #: built on the CPU after torch.manual_seed(0)
    batch: Callable[[], Batch]                              #: (inputs, target) on the CPU
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    autocast: torch.dtype | None = None                     #: torch.autocast dtype around forward + loss
    scaler: bool = False                                    #: torch.amp.GradScaler around backward/step
    sdpa_backend: str | None = None                         #: SDPBackend member forced with sdpa_kernel
    cudnn_benchmark: bool = False                           #: torch.backends.cudnn.benchmark for the step
    tags: tuple[str, ...] = ()                              #: what the configuration exercises
    extra: dict[str, Any] = field(default_factory=dict)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)


def seeded(build: Callable[[], Any]) -> Any:
    """``build()`` under torch.manual_seed(0), so every backend starts from the same weights and data."""
    torch.manual_seed(0)
    return build()


# -- models ---------------------------------------------------------------------------------------


def mlp(widths: list[int]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        return nn.Sequential(*layers)
    return build


class CheckpointedMLP(nn.Module):
    """8 blocks 512-2048-512 (GELU), each under non-reentrant torch.utils.checkpoint."""

    def __init__(self, width: int = 512, blocks: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head(x)


def conv_bn() -> nn.Module:
    """Three conv + BatchNorm + ReLU stages: cuDNN convolutions and cuDNN batch norm."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
    )


def depthwise_separable() -> nn.Module:
    """MobileNet-style blocks: depthwise 3x3 (groups = channels) then pointwise 1x1, with BatchNorm."""
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU6(),
                nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6()]
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
        *block(32, 64, 1), *block(64, 128, 2), *block(128, 128, 1), *block(128, 256, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 100),
    )


def torchvision_model(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision import models

        return getattr(models, name)(**kwargs)
    return build


class Block(nn.Module):
    """Pre-norm decoder block calling scaled_dot_product_attention itself (causal), with grouped-query
    attention when ``kv_heads < heads`` (k/v not expanded: ``enable_gqa=True``)."""

    def __init__(self, d: int, heads: int, kv_heads: int, rms: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        norm = nn.RMSNorm if rms else nn.LayerNorm
        self.norm1, self.norm2 = norm(d), norm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """Token embedding, ``layers`` decoder blocks, a vocabulary head; logits flattened per token."""

    def __init__(self, vocab: int = 4096, d: int = 256, heads: int = 4, kv_heads: int | None = None,
                 layers: int = 4, rms: bool = False, checkpointed: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads or heads, rms) for _ in range(layers))
        self.norm = nn.RMSNorm(d) if rms else nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.checkpointed = checkpointed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(self.norm(x)).flatten(0, 1)


class BF16(nn.Module):
    """Wraps a model whose parameters are bf16 (pure bf16 training, no autocast); keeps index inputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class EmbeddingHeavy(nn.Module):
    """A 100k x 128 embedding table (51 MB fp32) pooled per sequence, then a small MLP classifier."""

    def __init__(self, vocab: int = 100_000, d: int = 128, classes: int = 20) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, 512), nn.ReLU(), nn.Linear(512, classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(tokens).mean(dim=1))


# -- batches --------------------------------------------------------------------------------------


def features(n: int, d: int, classes: int = 10) -> Callable[[], Batch]:
    return lambda: (torch.randn(n, d), torch.randint(0, classes, (n,)))


def images(n: int, hw: int, classes: int = 10, c: int = 3) -> Callable[[], Batch]:
    return lambda: (torch.randn(n, c, hw, hw), torch.randint(0, classes, (n,)))


def tokens(n: int, seq: int, vocab: int = 4096) -> Callable[[], Batch]:
    return lambda: (torch.randint(0, vocab, (n, seq)), torch.randint(0, vocab, (n * seq,)))


def sequences(n: int, seq: int, vocab: int = 100_000, classes: int = 20) -> Callable[[], Batch]:
    return lambda: (torch.randint(0, vocab, (n, seq)), torch.randint(0, classes, (n,)))


# -- optimizers -----------------------------------------------------------------------------------


def optim(cls_name: str, **kwargs: Any) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        options = {k: (v() if callable(v) else v) for k, v in kwargs.items()}  # fresh Tensor lr per build
        return getattr(torch.optim, cls_name)(params, **options)
    build.__name__ = f"{cls_name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    return build


def tensor_lr() -> torch.Tensor:
    return torch.tensor(1e-3)


# -- the corpus -----------------------------------------------------------------------------------

MLP = mlp([1024, 4096, 4096, 10])          # 20.99M parameters: 84 MB fp32, optimizer state well above 2 MiB
MLP_BATCH = features(256, 1024)
LM_BATCH = tokens(8, 256)

CONFIGS: tuple[CorpusConfig, ...] = (
    # every optimizer family on the same MLP
    CorpusConfig("mlp_sgd", MLP, MLP_BATCH, optim("SGD", lr=0.01), tags=("optimizer",)),
    CorpusConfig("mlp_sgd_momentum_nesterov", MLP, MLP_BATCH, optim("SGD", lr=0.01, momentum=0.9, nesterov=True),
                 tags=("optimizer", "foreach")),
    CorpusConfig("mlp_adam_foreach", MLP, MLP_BATCH, optim("Adam", lr=1e-3), tags=("optimizer", "foreach")),
    CorpusConfig("mlp_adamw_fused", MLP, MLP_BATCH, optim("AdamW", lr=1e-3, fused=True), tags=("optimizer", "fused")),
    CorpusConfig("mlp_adamw_per_param", MLP, MLP_BATCH, optim("AdamW", lr=1e-3, foreach=False),
                 tags=("optimizer", "per-param loop")),
    CorpusConfig("mlp_adamw_tensor_lr", MLP, MLP_BATCH, optim("AdamW", lr=tensor_lr),
                 tags=("optimizer", "Tensor lr: per-param loop when capturable=False")),
    CorpusConfig("mlp_adagrad", MLP, MLP_BATCH, optim("Adagrad", lr=1e-2), tags=("optimizer",)),
    CorpusConfig("mlp_rmsprop", MLP, MLP_BATCH, optim("RMSprop", lr=1e-3), tags=("optimizer",)),
    CorpusConfig("mlp_adadelta", MLP, MLP_BATCH, optim("Adadelta"), tags=("optimizer",)),
    CorpusConfig("mlp_nadam", MLP, MLP_BATCH, optim("NAdam", lr=1e-3), tags=("optimizer",)),
    CorpusConfig("mlp_radam", MLP, MLP_BATCH, optim("RAdam", lr=1e-3), tags=("optimizer",)),
    CorpusConfig("mlp_adamax", MLP, MLP_BATCH, optim("Adamax", lr=1e-3), tags=("optimizer",)),
    CorpusConfig("mlp_adam_amp_fp16_gradscaler", MLP, MLP_BATCH, optim("Adam", lr=1e-3), autocast=torch.float16,
                 scaler=True, tags=("amp", "GradScaler", "autocast weight cache")),
    CorpusConfig("mlp_checkpointed_sgd", CheckpointedMLP, features(1024, 512), optim("SGD", lr=0.01),
                 tags=("checkpointing",)),
    # cuDNN-heavy CNNs
    CorpusConfig("conv_bn_adam_b64x64", conv_bn, images(64, 64), optim("Adam", lr=1e-3),
                 tags=("cudnn conv", "cudnn batch norm")),
    CorpusConfig("depthwise_separable_adam_b64x96", depthwise_separable, images(64, 96, 100), optim("Adam", lr=1e-3),
                 tags=("cudnn conv", "depthwise")),
    CorpusConfig("resnet18_sgd_momentum_b32x112", torchvision_model("resnet18"), images(32, 112, 1000),
                 optim("SGD", lr=0.1, momentum=0.9), tags=("cudnn conv", "cudnn batch norm")),
    CorpusConfig("resnet18_sgd_momentum_b32x112_cudnn_benchmark", torchvision_model("resnet18"), images(32, 112, 1000),
                 optim("SGD", lr=0.1, momentum=0.9), cudnn_benchmark=True,
                 tags=("cudnn conv", "cudnn.benchmark: every engine tried in the first step")),
    CorpusConfig("resnet18_sgd_amp_fp16_gradscaler_b32x112", torchvision_model("resnet18"), images(32, 112, 1000),
                 optim("SGD", lr=0.1, momentum=0.9), autocast=torch.float16, scaler=True,
                 tags=("cudnn conv", "amp", "GradScaler")),
    CorpusConfig("resnet50_sgd_momentum_bf16_autocast_b16x128", torchvision_model("resnet50"), images(16, 128, 1000),
                 optim("SGD", lr=0.1, momentum=0.9), autocast=torch.bfloat16,
                 tags=("cudnn conv", "bf16 batch norm: no cuDNN reserve")),
    CorpusConfig("mobilenet_v3_small_rmsprop_b32x160", torchvision_model("mobilenet_v3_small"), images(32, 160, 1000),
                 optim("RMSprop", lr=1e-3), tags=("cudnn conv", "depthwise")),
    # transformers: attention backends chosen explicitly
    CorpusConfig("lm_fp32_sdpa_default_adamw", TinyLM, LM_BATCH, optim("AdamW", lr=1e-3),
                 tags=("attention", "fp32: memory-efficient by default")),
    CorpusConfig("lm_fp32_efficient_adamw", TinyLM, LM_BATCH, optim("AdamW", lr=1e-3),
                 sdpa_backend="EFFICIENT_ATTENTION", tags=("attention",)),
    CorpusConfig("lm_fp32_math_adamw", TinyLM, LM_BATCH, optim("AdamW", lr=1e-3), sdpa_backend="MATH",
                 tags=("attention", "math: attention matrix materialised")),
    CorpusConfig("lm_bf16_autocast_flash_adamw", TinyLM, LM_BATCH, optim("AdamW", lr=1e-3), autocast=torch.bfloat16,
                 sdpa_backend="FLASH_ATTENTION", tags=("attention", "bf16")),
    CorpusConfig("lm_bf16_autocast_cudnn_adamw", TinyLM, LM_BATCH, optim("AdamW", lr=1e-3), autocast=torch.bfloat16,
                 sdpa_backend="CUDNN_ATTENTION", tags=("attention", "bf16")),
    CorpusConfig("lm_bf16_autocast_efficient_adamw", TinyLM, LM_BATCH, optim("AdamW", lr=1e-3),
                 autocast=torch.bfloat16, sdpa_backend="EFFICIENT_ATTENTION", tags=("attention", "bf16")),
    CorpusConfig("lm_bf16_autocast_default_checkpointed_adamw", lambda: TinyLM(checkpointed=True), LM_BATCH,
                 optim("AdamW", lr=1e-3), autocast=torch.bfloat16, tags=("attention", "bf16", "checkpointing")),
    CorpusConfig("gqa_pure_bf16_flash_adamw", lambda: BF16(TinyLM(d=512, heads=8, kv_heads=2, rms=True)), LM_BATCH,
                 optim("AdamW", lr=1e-3), sdpa_backend="FLASH_ATTENTION",
                 tags=("attention", "GQA enable_gqa=True", "bf16 parameters")),
    CorpusConfig("gqa_pure_bf16_sdpa_default_adamw", lambda: BF16(TinyLM(d=512, heads=8, kv_heads=2, rms=True)),
                 LM_BATCH, optim("AdamW", lr=1e-3), tags=("attention", "GQA enable_gqa=True", "bf16 parameters")),
    # embeddings
    CorpusConfig("embedding_100k_adam", EmbeddingHeavy, sequences(256, 64), optim("Adam", lr=1e-3),
                 tags=("embedding backward",)),
)

BY_NAME = {c.name: c for c in CONFIGS}


def get(name: str) -> CorpusConfig:
    """The configuration called ``name``, or a KeyError listing the names there are."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no corpus configuration {name!r}; there are: {', '.join(BY_NAME)}") from None
