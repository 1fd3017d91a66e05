"""The engine's speed-ups change no figure: reports with and without them are identical.

The emulated backend runs cheaper stand-ins for torch's slowest meta kernels (_emulation/meta_kernels.py), its
TorchFunctionMode passes calls it has nothing to do for straight through, and measure_step freezes older
objects so its final gc.collect() is short. The reference path here turns all three off.
"""
from __future__ import annotations

import contextlib
import gc
import json

import pytest
import torch
from torch import nn

from pytest_gpumem import measure_step
from pytest_gpumem._emulation import meta_kernels, semantics_mode
from pytest_gpumem._measure import step
from pytest_gpumem._measure.backends import EmulatedBackend

aten = torch.ops.aten


class _ReferenceBackend(EmulatedBackend):
    """The emulated backend running every op through torch's own meta kernel."""

    @property
    def kernel_shortcuts(self):
        return None


class _NeverPassThrough(set):
    def __contains__(self, item) -> bool:
        return False

    def add(self, item) -> None:
        pass


def _mlp_dropout_adam():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.randn(8, 32), {}


def _cnn_bn_sgd():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.randn(4, 3, 16, 16), {}


def _resnet18_adamw():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.randn(2, 3, 32, 32), {}


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _transformer_fp16():
    model = _Encoder()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.randn(2, 8, 32), \
        {"autocast_dtype": torch.float16, "scaler": True}


class _Recurrent(nn.Module):
    def __init__(self, cell) -> None:
        super().__init__()
        self.rnn = cell(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _lstm_adam():
    model = _Recurrent(nn.LSTM)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.randn(3, 7, 16), {}


def _gru_sgd():
    model = _Recurrent(nn.GRU)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.randn(3, 7, 16), {}


def _report(make, backend) -> str:
    torch.manual_seed(0)
    model, opt, x, extra = make()
    y = torch.randint(0, 10, (x.shape[0],))
    return json.dumps(measure_step(model, opt, x, target=y, backend=backend, **extra).to_dict(), sort_keys=True)


@pytest.mark.parametrize("make", [_mlp_dropout_adam, _cnn_bn_sgd, _resnet18_adamw, _transformer_fp16, _lstm_adam,
                                  _gru_sgd])
def test_reports_identical_with_and_without_speedups(make, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(step, "older_objects_frozen", contextlib.nullcontext)
        m.setattr(semantics_mode, "_PASS_THROUGH", _NeverPassThrough())
        reference = _report(make, _ReferenceBackend())
    meta_kernels._memo.clear()
    first = _report(make, "emulated")   # records what meta kernels return
    second = _report(make, "emulated")  # replays it
    assert first == reference
    assert second == reference


# -- meta_kernels units -------------------------------------------------------------------------
def _describe(out):
    flat = out if isinstance(out, (tuple, list)) else (out,)
    return [None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.untyped_storage().nbytes(), t._base is None)
            for t in flat]


def _meta(*shape, dtype=torch.float32, channels_last=False):
    t = torch.empty(*shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


_C = 6
_BN_CASES = {
    "train_4d": lambda: (_meta(2, _C, 5, 5), _meta(_C), _meta(_C), _meta(_C), _meta(_C), True, 0.1, 1e-5),
    "train_channels_last": lambda: (_meta(2, _C, 5, 5, channels_last=True), _meta(_C), _meta(_C), _meta(_C),
                                    _meta(_C), True, 0.1, 1e-5),
    "train_2d_no_stats": lambda: (_meta(4, _C), _meta(_C), _meta(_C), None, None, True, 0.1, 1e-5),
    "eval_3d": lambda: (_meta(2, _C, 7), _meta(_C), _meta(_C), _meta(_C), _meta(_C), False, 0.1, 1e-5),
    "fp16_no_affine": lambda: (_meta(2, _C, 4, 4, dtype=torch.float16), None, None, _meta(_C), _meta(_C), True,
                               0.1, 1e-5),
}


@pytest.mark.parametrize("case", sorted(_BN_CASES))
def test_memoised_batch_norm_matches_torch(case):
    meta_kernels._memo.clear()
    args = _BN_CASES[case]()
    expected = _describe(aten.native_batch_norm.default(*args))
    recorded = meta_kernels.memoised(aten.native_batch_norm.default, args, {})
    replayed = meta_kernels.memoised(aten.native_batch_norm.default, args, {})
    assert _describe(recorded) == expected
    assert _describe(replayed) == expected
    out, save_mean, save_invstd = replayed
    x, w = args[0], args[1]
    mask = [True, w is not None, w is not None]
    grads = aten.native_batch_norm_backward.default(
        out, x, w, args[3], args[4], save_mean, save_invstd, args[5], 1e-5, mask)
    backward_args = (out, x, w, args[3], args[4], save_mean, save_invstd, args[5], 1e-5, mask)
    for _ in range(2):  # record, then replay
        again = meta_kernels.memoised(aten.native_batch_norm_backward.default, backward_args, {})
        assert _describe(again) == _describe(grads)


def test_memoised_never_records_aliasing_outputs():
    meta_kernels._memo.clear()
    x = _meta(3, 4)
    out = meta_kernels.memoised(aten.alias.default, (x,), {})
    assert out.untyped_storage() is x.untyped_storage()
    assert meta_kernels._memo[(aten.alias.default, (meta_kernels._meta_key(x),))] is meta_kernels._UNCACHEABLE
    again = meta_kernels.memoised(aten.alias.default, (x,), {})
    assert again.untyped_storage() is x.untyped_storage()


def test_memoised_runs_torch_for_non_meta_or_unknown_arguments():
    meta_kernels._memo.clear()
    x = torch.ones(3)
    out = meta_kernels.memoised(aten.threshold_backward.default, (x, x, 0.0), {})
    assert out.device.type == "cpu" and out.tolist() == [1.0, 1.0, 1.0]
    assert not meta_kernels._memo


def test_foreach_in_place_skips_only_alike_lists():
    params = [_meta(3, 4), _meta(5)]
    grads = [_meta(3, 4), _meta(5)]
    op = aten._foreach_add_.List
    assert meta_kernels.kernel_for(op) is meta_kernels.foreach_in_place
    assert meta_kernels.kernel_for(aten._foreach_sqrt.default) is meta_kernels.memoised
    assert meta_kernels.kernel_for(aten.gelu.default) is None
    assert meta_kernels.foreach_in_place(op, (params, grads), {}) is op(params, grads)  # None both
    with pytest.raises(Exception) as expected:
        op(params, [_meta(3, 4), _meta(6)])
    with pytest.raises(type(expected.value)):
        meta_kernels.foreach_in_place(op, (params, [_meta(3, 4), _meta(6)]), {})


@pytest.mark.parametrize("frozen_by_caller", [False, True])
def test_measure_step_leaves_gc_freeze_as_found(frozen_by_caller):
    model = nn.Linear(4, 2)
    if frozen_by_caller:
        gc.freeze()
    try:
        before = gc.get_freeze_count()
        measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 4), backend="emulated")
        assert gc.get_freeze_count() == before
    finally:
        if frozen_by_caller:
            gc.unfreeze()
