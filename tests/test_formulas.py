"""Each activation formula against what torch really saves on a CPU forward (saved_tensors_hooks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_gpumem._estimate.layer_formulas import ACTIVATION_FORMULAS, activation_formula, formula_for


def real_saved_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes the module's forward saves on the CPU, deduped by storage, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()} | {
        b.untyped_storage().data_ptr() for b in module.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return sum(seen.values()), out


def formula_bytes(module: nn.Module, x: torch.Tensor, out: torch.Tensor, device: str) -> int:
    """The formula's items summed the same way (tensors deduped by storage, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}
    total = 0
    for item in formula_for(module)(module, (x,), out, device):
        if isinstance(item, torch.Tensor):
            ptr = item.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = item.untyped_storage().nbytes()
        else:
            total += item
    return total + sum(seen.values())


CASES = [
    ("linear", lambda: nn.Linear(16, 8), (4, 16)),
    ("linear-3d", lambda: nn.Linear(16, 8), (2, 3, 16)),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3), (2, 4, 10)),
    ("conv2d", lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 8, 8)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 3), (1, 2, 5, 5, 5)),
    ("bn1d", lambda: nn.BatchNorm1d(6), (4, 6)),
    ("bn2d", lambda: nn.BatchNorm2d(3), (2, 3, 4, 4)),
    ("bn3d", lambda: nn.BatchNorm3d(3), (2, 3, 2, 4, 4)),
    ("layernorm", lambda: nn.LayerNorm(16), (2, 5, 16)),
    ("layernorm-2d", lambda: nn.LayerNorm((5, 16)), (2, 5, 16)),
    ("groupnorm", lambda: nn.GroupNorm(2, 4), (3, 4, 5, 5)),
    ("relu", lambda: nn.ReLU(), (4, 16)),
    ("relu-inplace", lambda: nn.ReLU(inplace=True), (4, 16)),
    ("gelu", lambda: nn.GELU(), (4, 16)),
    ("silu", lambda: nn.SiLU(), (4, 16)),
    ("tanh", lambda: nn.Tanh(), (4, 16)),
    ("sigmoid", lambda: nn.Sigmoid(), (4, 16)),
    ("leakyrelu", lambda: nn.LeakyReLU(0.1), (4, 16)),
    ("softmax", lambda: nn.Softmax(dim=-1), (4, 16)),
    ("logsoftmax", lambda: nn.LogSoftmax(dim=-1), (4, 16)),
    ("dropout", lambda: nn.Dropout(0.3), (4, 16)),
    ("dropout-eval", lambda: nn.Dropout(0.3).eval(), (4, 16)),
    ("maxpool2d", lambda: nn.MaxPool2d(2), (2, 3, 8, 8)),
    ("maxpool3d", lambda: nn.MaxPool3d(2), (1, 2, 4, 4, 4)),
    ("avgpool2d", lambda: nn.AvgPool2d(2), (2, 3, 8, 8)),
    ("flatten", lambda: nn.Flatten(), (2, 3, 4)),
    ("identity", lambda: nn.Identity(), (2, 3)),
]


@pytest.mark.parametrize("make,shape", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_formula_matches_cpu_saved_tensors(make, shape, dtype):
    module = make().to(dtype)
    # The input comes from an earlier layer in a real network, so it requires grad.
    x = (torch.randn(shape, dtype=dtype, requires_grad=True) * 1.0)
    expected, out = real_saved_bytes(module, x)
    assert formula_bytes(module, x, out, "cpu") == expected


def test_frozen_linear_on_batch_saves_nothing():
    """No grad needed anywhere -> nothing saved (the first frozen layer of a fine-tuned model)."""
    module = nn.Linear(8, 4).requires_grad_(False)
    x = torch.randn(2, 8)
    expected, out = real_saved_bytes(module, x)
    assert expected == 0 == formula_bytes(module, x, out, "cpu")


def test_dropout_on_cuda_saves_a_bool_mask():
    """CUDA's native_dropout keeps a bool mask: 1 B per element whatever the dtype (meta native_dropout agrees)."""
    x = torch.randn(4, 16, dtype=torch.float32, device="meta", requires_grad=True)
    _, mask = torch.native_dropout(x, 0.3, True)
    module = nn.Dropout(0.3)
    assert formula_for(module)(module, (x,), x, "cuda") == (mask.numel() * mask.element_size(),)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        activation_formula(nn.Linear)(lambda *a: ())


def test_every_formula_is_documented():
    """One-line docstrings say the arithmetic."""
    assert all(fn.__doc__ for fn in ACTIVATION_FORMULAS.values())
