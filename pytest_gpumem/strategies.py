"""Hypothesis strategies for training steps: model configurations, batch sizes, dtypes and optimizers.

Every strategy is a plain function named as a plural noun with keyword-only ``min_*``/``max_*``
options, validated before anything is drawn. Model configurations are frozen dataclasses that build
a fresh module (``.build(device=...)``) and a matching batch (``.make_batch(batch_size, device=...)``),
so a test never shares a model or optimizer between examples.

Example::

    from hypothesis import given
    from pytest_gpumem import strategies as gst

    @given(gst.mlp_configs(max_width=64), gst.batch_sizes(max_value=8), gst.optimizers())
    def test_step(config, batch_size, make_optimizer):
        model = config.build()
        inputs, target = config.make_batch(batch_size)
        optimizer = make_optimizer(model.parameters())
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

__all__ = [
    "MLPConfig", "CNNConfig", "TransformerConfig", "OptimizerFactory",
    "mlp_configs", "cnn_configs", "transformer_configs",
    "batch_sizes", "float_dtypes", "optimizers", "OPTIMIZER_KINDS",
]

Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- argument checks

def _check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> None:
    """Raise InvalidArgument unless ``value`` is an int in [lo, hi] (hi=None: unbounded)."""
    accepted = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be {accepted}")
    if value < lo or (hi is not None and value > hi):
        raise InvalidArgument(f"{name}={value!r} is out of range: expected {accepted}")


def _check_interval(lo_name: str, lo: Any, hi_name: str, hi: Any, floor: int, ceiling: Optional[int] = None) -> None:
    """Check two integer bounds each in [floor, ceiling] and ordered lo <= hi."""
    _check_int(lo_name, lo, floor, ceiling)
    _check_int(hi_name, hi, floor, ceiling)
    if lo > hi:
        raise InvalidArgument(f"{lo_name}={lo!r} must not exceed {hi_name}={hi!r}")


def _check_probability(name: str, value: Any) -> None:
    """Raise InvalidArgument unless ``value`` is a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InvalidArgument(f"{name}={value!r} must be a number in [0, 1)")


def _check_strategy(name: str, value: Any) -> None:
    if not isinstance(value, st.SearchStrategy):
        raise InvalidArgument(f"{name}={value!r} must be a hypothesis strategy (e.g. st.just(x))")


def _dropouts(min_dropout: float, max_dropout: float) -> st.SearchStrategy[float]:
    """Dropout probabilities from a few round values in the range (and its bounds), shrinking to the lowest.

    The probability does not change memory -- whether a Dropout layer exists does -- so a handful of
    values covers it, and shrinking stays cheap and readable (a float search would try dozens).
    """
    _check_probability("min_dropout", min_dropout)
    _check_probability("max_dropout", max_dropout)
    if min_dropout > max_dropout:
        raise InvalidArgument(f"min_dropout={min_dropout!r} must not exceed max_dropout={max_dropout!r}")
    round_values = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    return st.sampled_from(sorted({min_dropout, max_dropout} | {p for p in round_values
                                                                 if min_dropout <= p <= max_dropout}))


# --------------------------------------------------------------------------- configurations

def _factory(device: Any, dtype: torch.dtype) -> dict[str, Any]:
    return {"device": torch.device(device), "dtype": dtype}


@dataclass(frozen=True)
class MLPConfig:
    """A multilayer perceptron: Linear -> ReLU [-> Dropout] per hidden width, then a Linear head."""

    in_features: int
    widths: tuple[int, ...]      #: hidden layer widths, one per hidden layer (depth = len(widths))
    out_features: int            #: number of classes of the cross-entropy target
    dropout: float = 0.0         #: Dropout probability after each hidden layer; 0 means no Dropout layer
    dtype: torch.dtype = torch.float32

    @property
    def depth(self) -> int:
        return len(self.widths)

    def build(self, device: Any = "cpu") -> nn.Module:
        """A fresh module created directly on ``device`` (no .to(): fake tensors can't swap weakref'd params)."""
        kw = _factory(device, self.dtype)
        layers: list[nn.Module] = []
        previous = self.in_features
        for width in self.widths:
            layers += [nn.Linear(previous, width, **kw), nn.ReLU()]
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            previous = width
        layers.append(nn.Linear(previous, self.out_features, **kw))
        return nn.Sequential(*layers)

    def make_batch(self, batch_size: int, device: Any = "cpu") -> Batch:
        """Random inputs of shape (batch, in_features) and integer class targets of shape (batch,)."""
        inputs = torch.randn(batch_size, self.in_features, device=device, dtype=self.dtype)
        target = torch.randint(self.out_features, (batch_size,), device=device)
        return inputs, target

    def loss_fn(self) -> nn.Module:
        return nn.CrossEntropyLoss()


def _conv_out(size: int, kernel: int, stride: int) -> int:
    """Spatial size after a Conv2d with padding kernel // 2."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


@dataclass(frozen=True)
class CNNConfig:
    """A CNN: Conv2d [-> BatchNorm2d] -> ReLU [-> Dropout] per layer, then global pooling and a Linear head."""

    in_channels: int
    image_size: int              #: height = width of the input images
    channels: tuple[int, ...]    #: output channels, one per conv layer
    kernels: tuple[int, ...]     #: kernel sizes (padding kernel // 2)
    strides: tuple[int, ...]
    num_classes: int
    batch_norm: bool = False
    dropout: float = 0.0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not len(self.channels) == len(self.kernels) == len(self.strides) >= 1:
            raise ValueError("channels, kernels and strides need one entry per conv layer (at least one)")
        if self.batch_norm and self.output_size < 2:
            # BatchNorm2d in training needs more than one value per channel even at batch size 1.
            raise ValueError(f"batch_norm needs a final feature map of at least 2x2, got {self.output_size}")

    @property
    def depth(self) -> int:
        return len(self.channels)

    @property
    def output_size(self) -> int:
        """Height = width of the last conv layer's output."""
        size = self.image_size
        for kernel, stride in zip(self.kernels, self.strides):
            size = _conv_out(size, kernel, stride)
        return size

    def build(self, device: Any = "cpu") -> nn.Module:
        """A fresh module created directly on ``device``."""
        kw = _factory(device, self.dtype)
        layers: list[nn.Module] = []
        previous = self.in_channels
        for out, kernel, stride in zip(self.channels, self.kernels, self.strides):
            layers.append(nn.Conv2d(previous, out, kernel, stride=stride, padding=kernel // 2,
                                    bias=not self.batch_norm, **kw))
            if self.batch_norm:
                layers.append(nn.BatchNorm2d(out, **kw))
            layers.append(nn.ReLU())
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            previous = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, self.num_classes, **kw)]
        return nn.Sequential(*layers)

    def make_batch(self, batch_size: int, device: Any = "cpu") -> Batch:
        """Random images (batch, in_channels, size, size) and integer class targets (batch,)."""
        shape = (batch_size, self.in_channels, self.image_size, self.image_size)
        inputs = torch.randn(shape, device=device, dtype=self.dtype)
        target = torch.randint(self.num_classes, (batch_size,), device=device)
        return inputs, target

    def loss_fn(self) -> nn.Module:
        return nn.CrossEntropyLoss()


class _TokenModel(nn.Module):
    """Embedding -> TransformerEncoder -> vocabulary head, logits flattened to (batch * seq, vocab)."""

    def __init__(self, config: "TransformerConfig", device: Any) -> None:
        super().__init__()
        kw = _factory(device, config.dtype)
        self.embed = nn.Embedding(config.vocab_size, config.d_model, **kw)
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(config.d_model, config.n_heads, config.ffn_width,
                                       dropout=config.dropout, batch_first=True, **kw)
            for _ in range(config.depth)
        ])
        self.head = nn.Linear(config.d_model, config.vocab_size, **kw)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.blocks(self.embed(tokens)))
        return logits.reshape(-1, logits.shape[-1])


@dataclass(frozen=True)
class TransformerConfig:
    """A token model of ``depth`` nn.TransformerEncoderLayer blocks trained to predict a token per position."""

    vocab_size: int
    seq_len: int
    d_model: int                 #: a multiple of n_heads
    n_heads: int
    ffn_width: int
    depth: int
    dropout: float = 0.0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")

    def build(self, device: Any = "cpu") -> nn.Module:
        """A fresh module created directly on ``device``."""
        return _TokenModel(self, device)

    def make_batch(self, batch_size: int, device: Any = "cpu") -> Batch:
        """Token ids (batch, seq_len) and next-token targets flattened to (batch * seq_len,)."""
        tokens = torch.randint(self.vocab_size, (batch_size, self.seq_len), device=device)
        target = torch.randint(self.vocab_size, (batch_size * self.seq_len,), device=device)
        return tokens, target

    def loss_fn(self) -> nn.Module:
        return nn.CrossEntropyLoss()


# --------------------------------------------------------------------------- strategies

def _default_dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.just(torch.float32)


def mlp_configs(
    *,
    min_depth: int = 1, max_depth: int = 4,
    min_width: int = 1, max_width: int = 512,
    min_in_features: int = 1, max_in_features: int = 512,
    min_classes: int = 2, max_classes: int = 16,
    min_dropout: float = 0.0, max_dropout: float = 0.5,
    dtypes: Optional[st.SearchStrategy[torch.dtype]] = None,
) -> st.SearchStrategy[MLPConfig]:
    """MLP configurations; widths, depth and batch shrink towards their minimums.

    ``min_dropout=max_dropout=0`` gives MLPs without Dropout; ``dtypes`` defaults to float32.

    >>> mlp_configs(max_depth=2, max_width=64, dtypes=float_dtypes(sizes=(16, 32))).example()  # doctest: +SKIP
    MLPConfig(in_features=3, widths=(17, 5), out_features=2, dropout=0.0, dtype=torch.float16)
    """
    _check_interval("min_depth", min_depth, "max_depth", max_depth, 1)
    _check_interval("min_width", min_width, "max_width", max_width, 1)
    _check_interval("min_in_features", min_in_features, "max_in_features", max_in_features, 1)
    _check_interval("min_classes", min_classes, "max_classes", max_classes, 1)
    dropouts = _dropouts(min_dropout, max_dropout)
    dtypes = _default_dtypes() if dtypes is None else dtypes
    _check_strategy("dtypes", dtypes)
    return st.builds(
        MLPConfig,
        in_features=st.integers(min_in_features, max_in_features),
        widths=st.lists(st.integers(min_width, max_width), min_size=min_depth, max_size=max_depth).map(tuple),
        out_features=st.integers(min_classes, max_classes),
        dropout=dropouts,
        dtype=dtypes,
    )


@st.composite
def _cnn(draw, *, depth, channels, kernels, strides, in_channels, image_sizes, classes, batch_norm, dropouts, dtypes):
    n = draw(depth)
    layers = draw(st.lists(st.tuples(channels, kernels, strides), min_size=n, max_size=n))
    bn = draw(batch_norm)
    config = dict(
        in_channels=draw(in_channels), channels=tuple(c for c, _, _ in layers),
        kernels=tuple(k for _, k, _ in layers), strides=tuple(s for _, _, s in layers),
        num_classes=draw(classes), batch_norm=bn, dropout=draw(dropouts), dtype=draw(dtypes),
    )
    lo, hi = image_sizes
    if bn:
        # Smallest image whose final feature map is >= 2x2: grow lo until it is (sizes are monotone in the input).
        while _conv_out_all(lo, config["kernels"], config["strides"]) < 2:
            lo += 1
        hi = max(hi, lo)
    return CNNConfig(image_size=draw(st.integers(lo, hi)), **config)


def _conv_out_all(size: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    for kernel, stride in zip(kernels, strides):
        size = _conv_out(size, kernel, stride)
    return size


def cnn_configs(
    *,
    min_depth: int = 1, max_depth: int = 4,
    min_channels: int = 1, max_channels: int = 64,
    min_kernel: int = 1, max_kernel: int = 5,
    min_stride: int = 1, max_stride: int = 2,
    min_in_channels: int = 1, max_in_channels: int = 3,
    min_image_size: int = 1, max_image_size: int = 32,
    min_classes: int = 2, max_classes: int = 16,
    batch_norm: Optional[bool] = None,
    min_dropout: float = 0.0, max_dropout: float = 0.5,
    dtypes: Optional[st.SearchStrategy[torch.dtype]] = None,
) -> st.SearchStrategy[CNNConfig]:
    """CNN configurations with optional BatchNorm (``batch_norm=None``: drawn) and Dropout.

    With BatchNorm the image size is raised where needed so the last feature map is at least 2x2
    (BatchNorm2d cannot train on a single value per channel); ``max_image_size`` may then be exceeded.

    >>> cnn_configs(max_depth=2, batch_norm=True).example()  # doctest: +SKIP
    CNNConfig(in_channels=1, image_size=5, channels=(3, 8), kernels=(3, 1), strides=(2, 1), ...)
    """
    _check_interval("min_depth", min_depth, "max_depth", max_depth, 1)
    _check_interval("min_channels", min_channels, "max_channels", max_channels, 1)
    _check_interval("min_kernel", min_kernel, "max_kernel", max_kernel, 1)
    _check_interval("min_stride", min_stride, "max_stride", max_stride, 1)
    _check_interval("min_in_channels", min_in_channels, "max_in_channels", max_in_channels, 1)
    _check_interval("min_image_size", min_image_size, "max_image_size", max_image_size, 1)
    _check_interval("min_classes", min_classes, "max_classes", max_classes, 1)
    if batch_norm not in (None, True, False):
        raise InvalidArgument(f"batch_norm={batch_norm!r} must be None (drawn), True or False")
    dropouts = _dropouts(min_dropout, max_dropout)
    dtypes = _default_dtypes() if dtypes is None else dtypes
    _check_strategy("dtypes", dtypes)
    return _cnn(
        depth=st.integers(min_depth, max_depth),
        channels=st.integers(min_channels, max_channels),
        kernels=st.integers(min_kernel, max_kernel),
        strides=st.integers(min_stride, max_stride),
        in_channels=st.integers(min_in_channels, max_in_channels),
        image_sizes=(min_image_size, max_image_size),
        classes=st.integers(min_classes, max_classes),
        batch_norm=st.booleans() if batch_norm is None else st.just(batch_norm),
        dropouts=dropouts,
        dtypes=dtypes,
    )


@st.composite
def _transformer(draw, *, depth, heads, head_dims, ffn_widths, seq_lens, vocab_sizes, dropouts, dtypes):
    n_heads = draw(heads)
    return TransformerConfig(
        vocab_size=draw(vocab_sizes), seq_len=draw(seq_lens), d_model=n_heads * draw(head_dims),
        n_heads=n_heads, ffn_width=draw(ffn_widths), depth=draw(depth),
        dropout=draw(dropouts), dtype=draw(dtypes),
    )


def transformer_configs(
    *,
    min_depth: int = 1, max_depth: int = 2,
    min_heads: int = 1, max_heads: int = 4,
    min_head_dim: int = 1, max_head_dim: int = 32,
    min_ffn_width: int = 1, max_ffn_width: int = 256,
    min_seq_len: int = 1, max_seq_len: int = 32,
    min_vocab_size: int = 2, max_vocab_size: int = 128,
    min_dropout: float = 0.0, max_dropout: float = 0.3,
    dtypes: Optional[st.SearchStrategy[torch.dtype]] = None,
) -> st.SearchStrategy[TransformerConfig]:
    """Transformer encoder configurations; d_model is drawn as heads x head_dim so it always divides.

    >>> transformer_configs(max_depth=1, max_seq_len=8).example()  # doctest: +SKIP
    TransformerConfig(vocab_size=5, seq_len=3, d_model=8, n_heads=2, ffn_width=16, depth=1, ...)
    """
    _check_interval("min_depth", min_depth, "max_depth", max_depth, 1)
    _check_interval("min_heads", min_heads, "max_heads", max_heads, 1)
    _check_interval("min_head_dim", min_head_dim, "max_head_dim", max_head_dim, 1)
    _check_interval("min_ffn_width", min_ffn_width, "max_ffn_width", max_ffn_width, 1)
    _check_interval("min_seq_len", min_seq_len, "max_seq_len", max_seq_len, 1)
    _check_interval("min_vocab_size", min_vocab_size, "max_vocab_size", max_vocab_size, 1)
    dropouts = _dropouts(min_dropout, max_dropout)
    dtypes = _default_dtypes() if dtypes is None else dtypes
    _check_strategy("dtypes", dtypes)
    return _transformer(
        depth=st.integers(min_depth, max_depth), heads=st.integers(min_heads, max_heads),
        head_dims=st.integers(min_head_dim, max_head_dim), ffn_widths=st.integers(min_ffn_width, max_ffn_width),
        seq_lens=st.integers(min_seq_len, max_seq_len), vocab_sizes=st.integers(min_vocab_size, max_vocab_size),
        dropouts=dropouts, dtypes=dtypes,
    )


def batch_sizes(*, min_value: int = 1, max_value: int = 64) -> st.SearchStrategy[int]:
    """Batch sizes in [min_value, max_value], shrinking towards min_value.

    >>> batch_sizes(min_value=2, max_value=8).example()  # doctest: +SKIP
    5
    """
    _check_interval("min_value", min_value, "max_value", max_value, 1)
    return st.integers(min_value, max_value)


_DTYPES_BY_SIZE = {16: (torch.float16,), 32: (torch.float32,), 64: (torch.float64,)}


def float_dtypes(*, sizes: Iterable[int] = (16, 32, 64), bfloat16: bool = True) -> st.SearchStrategy[torch.dtype]:
    """Floating-point torch dtypes of the given bit ``sizes`` (plus bfloat16 when 16 is one and ``bfloat16``).

    Shrinks towards the first dtype listed, float32 first when it is included.

    >>> float_dtypes(sizes=(16, 32)).example()  # doctest: +SKIP
    torch.bfloat16
    """
    sizes = tuple(sizes) if not isinstance(sizes, int) else (sizes,)
    if not sizes or any(s not in _DTYPES_BY_SIZE for s in sizes):
        raise InvalidArgument(f"sizes={sizes!r} must be a non-empty subset of (16, 32, 64)")
    if not isinstance(bfloat16, bool):
        raise InvalidArgument(f"bfloat16={bfloat16!r} must be True or False")
    ordered = sorted(set(sizes), key=lambda s: (s != 32, s))   # float32 first: the natural minimal example
    dtypes = [d for s in ordered for d in _DTYPES_BY_SIZE[s]]
    if 16 in sizes and bfloat16:
        dtypes.append(torch.bfloat16)
    return st.sampled_from(dtypes)


# --------------------------------------------------------------------------- optimizers

@dataclass(frozen=True)
class OptimizerFactory:
    """A picklable, printable ``callable(params) -> Optimizer``: the class plus its keyword arguments."""

    cls: type
    kwargs: tuple[tuple[str, Any], ...] = ()   #: sorted (name, value) pairs, a tuple so the factory is hashable

    def __call__(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        return self.cls(params, **dict(self.kwargs))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.cls.__name__}({args})"

    @classmethod
    def of(cls, optimizer_cls: type, **kwargs: Any) -> "OptimizerFactory":
        """``OptimizerFactory.of(torch.optim.AdamW, lr=1e-3)`` -- the usual way to make one by hand."""
        return cls(optimizer_cls, tuple(sorted(kwargs.items())))


#: The optimizer kinds ``optimizers()`` knows, from the least state to the most (the shrink order).
OPTIMIZER_KINDS: dict[str, Callable[[float], OptimizerFactory]] = {
    "sgd": lambda lr: OptimizerFactory.of(torch.optim.SGD, lr=lr),                       # no state
    "sgd_momentum": lambda lr: OptimizerFactory.of(torch.optim.SGD, lr=lr, momentum=0.9),  # 1 buffer / param
    "rmsprop": lambda lr: OptimizerFactory.of(torch.optim.RMSprop, lr=lr),                # square_avg + step
    "adagrad": lambda lr: OptimizerFactory.of(torch.optim.Adagrad, lr=lr),                # sum + step
    "adam": lambda lr: OptimizerFactory.of(torch.optim.Adam, lr=lr),                      # 2 moments + step
    "adamw": lambda lr: OptimizerFactory.of(torch.optim.AdamW, lr=lr),                    # 2 moments + step
}


def optimizers(
    *, kinds: Sequence[str] = tuple(OPTIMIZER_KINDS), lrs: Optional[st.SearchStrategy[float]] = None,
) -> st.SearchStrategy[OptimizerFactory]:
    """Optimizer factories ``callable(params) -> Optimizer`` of the named ``kinds``, shrinking towards SGD.

    ``lrs`` draws the learning rate (default 1e-3; it does not change memory). Combine with your own
    factories: ``optimizers(kinds=["adam"]) | st.just(my_factory)``.

    >>> optimizers(kinds=["adamw"]).example()  # doctest: +SKIP
    AdamW(lr=0.001)
    """
    if isinstance(kinds, str) or not isinstance(kinds, Sequence) or not kinds:
        raise InvalidArgument(f"kinds={kinds!r} must be a non-empty sequence of {sorted(OPTIMIZER_KINDS)}")
    unknown = [k for k in kinds if k not in OPTIMIZER_KINDS]
    if unknown:
        raise InvalidArgument(f"kinds={kinds!r}: unknown {unknown}; expected some of {sorted(OPTIMIZER_KINDS)}")
    lrs = st.just(1e-3) if lrs is None else lrs
    _check_strategy("lrs", lrs)
    ordered = [k for k in OPTIMIZER_KINDS if k in kinds]
    return st.tuples(st.sampled_from(ordered), lrs).map(lambda kl: OPTIMIZER_KINDS[kl[0]](kl[1]))
