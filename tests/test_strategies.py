"""Tests of pytest_gpumem.strategies: argument validation, bounds, buildability, shrinking, composition."""
from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import find, given
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

from pytest_gpumem import strategies as gst
from pytest_gpumem.strategies import CNNConfig, MLPConfig, OptimizerFactory, TransformerConfig

# --------------------------------------------------------------------------- validation, one table

INVALID = [
    (gst.mlp_configs, {"min_depth": 0}, "min_depth=0"),
    (gst.mlp_configs, {"min_depth": 3, "max_depth": 2}, "min_depth=3 must not exceed max_depth=2"),
    (gst.mlp_configs, {"max_width": 0}, "max_width=0"),
    (gst.mlp_configs, {"min_width": 1.5}, "min_width=1.5 must be an integer"),
    (gst.mlp_configs, {"min_width": True}, "min_width=True must be an integer"),
    (gst.mlp_configs, {"min_in_features": -1}, "expected an integer >= 1"),
    (gst.mlp_configs, {"max_dropout": 1.0}, "max_dropout=1.0 must be a number in [0, 1)"),
    (gst.mlp_configs, {"min_dropout": -0.1}, "min_dropout=-0.1"),
    (gst.mlp_configs, {"min_dropout": 0.4, "max_dropout": 0.2}, "min_dropout=0.4 must not exceed max_dropout=0.2"),
    (gst.mlp_configs, {"dtypes": torch.float32}, "dtypes=torch.float32 must be a hypothesis strategy"),
    (gst.cnn_configs, {"min_kernel": 0}, "min_kernel=0"),
    (gst.cnn_configs, {"min_stride": 2, "max_stride": 1}, "min_stride=2 must not exceed max_stride=1"),
    (gst.cnn_configs, {"max_channels": "64"}, "max_channels='64' must be an integer"),
    (gst.cnn_configs, {"min_image_size": 0}, "min_image_size=0"),
    (gst.cnn_configs, {"batch_norm": "yes"}, "batch_norm='yes' must be None"),
    (gst.transformer_configs, {"min_heads": 0}, "min_heads=0"),
    (gst.transformer_configs, {"min_seq_len": 9, "max_seq_len": 8}, "min_seq_len=9 must not exceed max_seq_len=8"),
    (gst.transformer_configs, {"max_dropout": 2}, "max_dropout=2"),
    (gst.batch_sizes, {"min_value": 0}, "min_value=0 is out of range: expected an integer >= 1"),
    (gst.batch_sizes, {"min_value": 8, "max_value": 4}, "min_value=8 must not exceed max_value=4"),
    (gst.float_dtypes, {"sizes": (8,)}, "sizes=(8,) must be a non-empty subset of (16, 32, 64)"),
    (gst.float_dtypes, {"sizes": ()}, "sizes=() must be a non-empty subset"),
    (gst.float_dtypes, {"bfloat16": 1}, "bfloat16=1 must be True or False"),
    (gst.optimizers, {"kinds": []}, "kinds=[] must be a non-empty sequence"),
    (gst.optimizers, {"kinds": "adam"}, "kinds='adam' must be a non-empty sequence"),
    (gst.optimizers, {"kinds": ["adam", "lion"]}, "unknown ['lion']"),
    (gst.optimizers, {"lrs": 0.1}, "lrs=0.1 must be a hypothesis strategy"),
]


@pytest.mark.parametrize(("strategy", "kwargs", "message"), INVALID,
                         ids=[f"{s.__name__}-{'-'.join(k)}" for s, k, _ in INVALID])
def test_invalid_arguments_are_rejected_when_called(strategy, kwargs, message):
    with pytest.raises(InvalidArgument) as info:
        strategy(**kwargs)  # raised at call time, before anything is drawn
    assert message in str(info.value)


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        gst.batch_sizes(1, 4)  # type: ignore[misc]


# --------------------------------------------------------------------------- drawn values respect bounds

@given(gst.mlp_configs(min_depth=2, max_depth=3, min_width=4, max_width=9, max_in_features=5, max_dropout=0.0))
def test_mlp_configs_respect_bounds(config):
    assert 2 <= config.depth <= 3
    assert all(4 <= w <= 9 for w in config.widths)
    assert 1 <= config.in_features <= 5 and config.dropout == 0.0


@given(gst.cnn_configs(max_depth=3, min_kernel=2, max_kernel=4, min_stride=2, max_stride=3, batch_norm=False))
def test_cnn_configs_respect_bounds(config):
    assert 1 <= config.depth <= 3 and not config.batch_norm
    assert all(2 <= k <= 4 for k in config.kernels) and all(2 <= s <= 3 for s in config.strides)


@given(gst.transformer_configs(min_heads=2, max_heads=3, max_head_dim=4))
def test_transformer_d_model_is_heads_times_head_dim(config):
    assert config.n_heads in (2, 3) and config.d_model % config.n_heads == 0
    assert config.d_model // config.n_heads <= 4


@given(gst.float_dtypes(sizes=(16,), bfloat16=False))
def test_float_dtypes_only_the_sizes_asked_for(dtype):
    assert dtype == torch.float16


# --------------------------------------------------------------------------- configs build and train

def _train_once(config, batch_size):
    model = config.build(device="cpu")
    inputs, target = config.make_batch(batch_size, device="cpu")
    output = model(inputs)
    loss = config.loss_fn()(output.float(), target)
    loss.backward()
    return model, output


SMALL = dict(max_depth=2)


@given(st.one_of(
    gst.mlp_configs(max_width=16, max_in_features=16, **SMALL),
    gst.cnn_configs(max_channels=4, max_image_size=9, **SMALL),
    gst.transformer_configs(max_head_dim=4, max_ffn_width=8, max_seq_len=4, max_vocab_size=8, max_heads=2, **SMALL),
), gst.batch_sizes(max_value=3))
def test_configs_build_a_trainable_model_and_a_matching_batch(config, batch_size):
    model, output = _train_once(config, batch_size)
    classes = getattr(config, "out_features", None) or getattr(config, "num_classes", None) or config.vocab_size
    rows = batch_size * getattr(config, "seq_len", 1)
    assert output.shape == (rows, classes)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@given(gst.cnn_configs(max_depth=4, max_channels=2, min_stride=2, max_image_size=2, batch_norm=True))
def test_batch_norm_cnns_train_even_at_batch_size_one(config):
    # The strategy raises the image size until the last feature map is >= 2x2, so BatchNorm2d never sees
    # a single value per channel; with these bounds (stride 2, image <= 2) that always needs raising.
    assert config.output_size >= 2
    _train_once(config, 1)


@given(gst.mlp_configs(max_depth=1, max_width=4, max_in_features=4, dtypes=gst.float_dtypes()))
def test_dtype_reaches_parameters_and_inputs(config):
    model = config.build()
    inputs, _ = config.make_batch(2)
    assert {p.dtype for p in model.parameters()} == {config.dtype} == {inputs.dtype}


def test_dropout_layers_present_exactly_when_dropout_is_positive():
    with_dropout = MLPConfig(4, (3, 3), 2, dropout=0.25).build()
    without = MLPConfig(4, (3, 3), 2, dropout=0.0).build()
    assert sum(isinstance(m, nn.Dropout) for m in with_dropout.modules()) == 2
    assert not any(isinstance(m, nn.Dropout) for m in without.modules())


def test_config_validation_of_hand_made_configs():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        TransformerConfig(vocab_size=4, seq_len=2, d_model=6, n_heads=4, ffn_width=4, depth=1)
    with pytest.raises(ValueError, match="at least 2x2"):
        CNNConfig(1, 2, (2,), (3,), (2,), 3, batch_norm=True)  # 2x2 image, stride 2 -> 1x1 map


def test_build_returns_a_fresh_model_each_time():
    config = MLPConfig(3, (5,), 2)
    first, second = config.build(), config.build()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first.parameters(), second.parameters()))


# --------------------------------------------------------------------------- shrinking

def test_configs_shrink_to_the_smallest_layers():
    assert find(gst.mlp_configs(min_depth=2, min_width=3), lambda c: True) == MLPConfig(1, (3, 3), 2, 0.0)
    cnn = find(gst.cnn_configs(min_channels=2, batch_norm=False), lambda c: True)
    assert cnn == CNNConfig(1, 1, (2,), (1,), (1,), 2, batch_norm=False, dropout=0.0)
    assert find(gst.optimizers(), lambda f: True) == OptimizerFactory.of(torch.optim.SGD, lr=1e-3)
    assert find(gst.float_dtypes(), lambda d: True) == torch.float32


def test_shrinking_keeps_only_what_the_failure_needs():
    # The smallest MLP with a hidden layer wider than 100 is one layer of width exactly 101.
    config = find(gst.mlp_configs(max_width=512), lambda c: max(c.widths) > 100)
    assert config.widths == (101,) and config.in_features == 1 and config.dropout == 0.0


# --------------------------------------------------------------------------- optimizers and composition

def test_optimizer_factories_build_the_optimizer_they_print():
    factory = OptimizerFactory.of(torch.optim.AdamW, lr=0.01, weight_decay=0.1)
    assert repr(factory) == "AdamW(lr=0.01, weight_decay=0.1)"
    param = nn.Parameter(torch.zeros(3))
    optimizer = factory([param])
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == 0.01 and optimizer.param_groups[0]["weight_decay"] == 0.1
    # The docstring promises a picklable factory (unlike a lambda, it can go to a multiprocessing or spawned worker,
    # which pickles its arguments); nothing in the package pickles it. The bytes are made here, from an object this
    # test built, and never leave memory: not a file a user gave us, which the no-pickle-loads rule is about.
    assert pickle.loads(pickle.dumps(factory)) == factory


@given(gst.optimizers(kinds=["sgd_momentum", "adam"], lrs=st.sampled_from([0.1, 0.2])))
def test_optimizers_draw_only_the_kinds_asked_for(factory):
    optimizer = factory([nn.Parameter(torch.zeros(2))])
    assert type(optimizer) in (torch.optim.SGD, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] in (0.1, 0.2)
    if type(optimizer) is torch.optim.SGD:
        assert optimizer.param_groups[0]["momentum"] == 0.9


def _my_factory(params):
    return torch.optim.SGD(params, lr=0.5)


@given(
    gst.optimizers(kinds=["sgd"]) | st.just(_my_factory),
    gst.mlp_configs(max_depth=1, max_width=4).map(lambda c: MLPConfig(c.in_features, c.widths * 2, 3)),
)
def test_composes_with_users_strategies_and_factories(make_optimizer, config):
    assert config.depth == 2 and config.out_features == 3
    model = config.build()
    assert isinstance(make_optimizer(model.parameters()), torch.optim.SGD)
