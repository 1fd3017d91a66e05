"""estimate_step(device="cuda") against measure_step(backend="emulated"): the two CUDA predictions agree.

Both trace under emulation.cuda_semantics (bool dropout masks, flash/efficient attention, foreach optimizers),
so a disagreement is in the estimate's peak model, not in what is saved.
"""
from __future__ import annotations

import pytest
import torch

from pytest_gpumem.contradiction import compare
from pytest_gpumem.estimate import estimate_step
from pytest_gpumem.step import measure_step
from test_estimate import MODELS, OPTIMIZERS

# TransformerEncoder: the estimate is 1.9-2.2% under the emulation in backward; not yet diagnosed (a guess:
# the MHA leaf's dq, dk, dv backward transients, the leaf model counts one input); SGD crosses 2%.
_KNOWN = {("transformer", "sgd"): "estimate 2.23% under the emulated backward peak (undiagnosed)"}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_cuda_estimate_matches_emulated_backend(model_name, opt_name, request):
    if (model_name, opt_name) in _KNOWN:
        request.applymarker(pytest.mark.xfail(reason=_KNOWN[model_name, opt_name], strict=True))
    torch.manual_seed(0)
    model, batch, target = MODELS[model_name]()
    rep = measure_step(model, OPTIMIZERS[opt_name](model.parameters()), batch, target=target, backend="emulated")
    est = estimate_step(model, OPTIMIZERS[opt_name](model.parameters()), batch, target=target, device="cuda")
    assert abs(est.peak - rep.peak) <= 0.02 * rep.peak, compare(rep, est, 0.02).message
