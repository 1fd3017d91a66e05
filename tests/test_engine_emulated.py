"""The emulated backend: CUDA figures predicted on meta tensors, checked against closed forms and the cpu backend."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from gpumem_factories import mlp
from pytest_gpumem._emulation.library_allocations import LIBRARY_NOTES
from pytest_gpumem import Category, Phase, StepFailed, measure_step
from pytest_gpumem._measure.allocator import SMALL_SEGMENT, round_allocation
from pytest_gpumem._measure.backends import make_backend

F32 = 4


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def mlp_128():
    return mlp(128, 256, 10)


def cnn_bn_dropout(channels=8, side=16, p=0.25):
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(p),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * (side // 2) ** 2, 10),
    )


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=10)


def make(make_model, shape, optimizer="adamw", **opt_kwargs):
    torch.manual_seed(0)
    model = make_model()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **opt_kwargs)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **opt_kwargs)
    return model, opt, torch.randn(*shape), torch.randint(0, 10, (shape[0],))


# -- closed forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_categories_equal_closed_form_sums(optimizer):
    model, opt, x, y = make(mlp_128, (16, 128), optimizer)
    params = list(model.parameters())
    report = measure_step(model, opt, x, target=y, backend="emulated")
    p = nbytes(params)
    # Adam(W)'s 'step' counters stay on the CPU when the params are on a GPU: no device bytes
    opt_bytes = 2 * p if optimizer == "adamw" else p
    assert report.category_peak(Category.PARAMS) == p
    assert report.category_peak(Category.GRADS) == p
    assert report.category_peak(Category.OPTIMIZER) == opt_bytes
    assert report.category_peak(Category.BATCH) == nbytes((x, y))
    # allocated figures are the allocator's: every storage rounded to 512 B blocks, the surplus 'other'
    rounded = sum(round_allocation(t.numel() * t.element_size()) for t in params)
    setup = report.steps[0].phases[Phase.SETUP]
    assert setup.retained == rounded
    assert setup.retained_split[Category.OTHER] == rounded - p
    end = report.steps[-1].phases[Phase.ZERO_GRAD]
    state_rounded = (2 if optimizer == "adamw" else 1) * rounded
    assert end.retained == rounded + state_rounded + round_allocation(nbytes([x])) + round_allocation(nbytes([y]))


def test_reserved_is_whole_segments_and_covers_the_peak():
    report = measure_step(*make(mlp_128, (16, 128))[:3], backend="emulated")
    assert report.reserved_peak is not None
    assert report.reserved_peak >= report.peak
    assert report.reserved_peak % SMALL_SEGMENT == 0
    # every request is <= 1 MiB (the largest, the 256 x 128 fp32 weight, is 128 KiB), so all come from 2 MiB small
    # segments; params + grads + AdamW's two moments are 4 x (128*256 + 256 + 256*10 + 10) x 4 B = 569,504 B, and
    # the batch and activations add tens of KiB: the step fits one segment
    assert report.peak < SMALL_SEGMENT == 2 * 2**20
    assert report.reserved_peak == SMALL_SEGMENT


def test_the_users_objects_are_not_touched():
    model, opt, x, y = make(mlp_128, (16, 128))
    before = [p.detach().clone() for p in model.parameters()]
    measure_step(model, opt, x, target=y, backend="emulated")
    assert all(p.device.type == "cpu" and p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0


# -- emulated vs cpu ---------------------------------------------------------------------------
def dropout_elements(model, shape) -> int:
    """Elements entering each Dropout: worked out from the shapes of this file's CNN."""
    channels = model[0].out_channels
    return shape[0] * channels * shape[2] * shape[3]


CASES = {
    "mlp": (mlp_128, (16, 128)),
    "cnn_bn_dropout": (cnn_bn_dropout, (8, 3, 16, 16)),
    "resnet18": (resnet18, (4, 3, 64, 64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_agrees_with_cpu_within_one_percent(case):
    make_model, shape = CASES[case]
    # foreach=True on both: emulation predicts CUDA's default (foreach) while the CPU default is a loop;
    # like is compared with like
    model, opt, x, y = make(make_model, shape, foreach=True)
    emulated = measure_step(model, opt, x, target=y, backend="emulated")
    model, opt, x, y = make(make_model, shape, foreach=True)
    cpu = measure_step(model, opt, x, target=y, backend="cpu")

    emulated_raw = emulated.peak - emulated.peak_split[Category.OTHER]  # without the 512-B rounding
    if case != "cnn_bn_dropout":
        assert emulated_raw == pytest.approx(cpu.peak, rel=0.01)
        return
    # Dropout in training: CUDA runs native_dropout and saves a 1 B/elem bool mask; the CPU kernel saves
    # a float32 noise tensor (4 B/elem). Emulation saves what CUDA saves, so while the mask is alive the
    # emulated activations are 3 B/elem smaller; exactly that, after the forward:
    n = dropout_elements(model, shape)
    cpu_act = cpu.steps[-1].phases[Phase.FORWARD].retained_split[Category.ACTIVATIONS]
    emu_act = emulated.steps[-1].phases[Phase.FORWARD].retained_split[Category.ACTIVATIONS]
    assert cpu_act - emu_act == (F32 - 1) * n
    # and the peaks agree once that difference is added back (the peak falls while the mask is alive)
    assert emulated_raw + (F32 - 1) * n == pytest.approx(cpu.peak, rel=0.01)


# -- failures ----------------------------------------------------------------------------------
class ItemInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        scale = self.linear.weight.abs().max().item()  # a parameter's value: the emulated backend has none
        return self.linear(x) / scale


def test_an_unknown_value_read_is_answered_and_noted_naming_the_line():
    """A parameter's value is unknown on meta: .item() reads the neutral value 1.0, and the report says
    where (see _emulation/values.py for the policy)."""
    model = ItemInForward()
    report = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 8), backend="emulated")
    (note,) = [n for n in report.notes if n not in LIBRARY_NOTES]   # (the note that no GPU was named aside)
    assert "Tensor.item()" in note and "test_engine_emulated.py:" in note and "answered as if" in note
    assert report.category_peak(Category.GRADS) == nbytes(model.parameters())


class RepeatInForward(ItemInForward):
    def forward(self, x):
        h = self.linear(x)
        counts = (h[:, 0] > 0).long() + 1
        return torch.repeat_interleave(h, counts, dim=0)  # how many rows come out depends on the values


def test_data_dependent_shape_fails_naming_the_op_and_the_way_out():
    model = RepeatInForward()
    with pytest.raises(StepFailed) as info:
        measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 8), backend="emulated")
    message = str(info.value)
    assert "forward of step 0" in message
    assert "repeat_interleave" in message and "test_engine_emulated.py:" in message
    assert "backend='cpu'" in message
    # what was measured before the failure travels with it
    assert info.value.partial is not None
    assert info.value.partial.steps[0].phases[Phase.SETUP].retained_split[Category.PARAMS] == nbytes(model.parameters())


def test_the_same_model_runs_on_the_cpu_backend():
    model = ItemInForward()
    report = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 8), backend="cpu")
    assert report.category_peak(Category.GRADS) == nbytes(model.parameters())


def test_loss_closing_over_the_model_sees_the_emulated_parameters():
    """An L1 penalty reads model.parameters() inside the loss: on the emulated backend those must be the
    meta copies (a CPU parameter would fail to mix with meta tensors), and the model gets its own back."""
    import torch.nn.functional as F

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    originals = [p for p in model.parameters()]
    seen_devices = set()

    def l1_loss(out, target):
        seen_devices.update(p.device.type for p in model.parameters())
        return F.cross_entropy(out, target) + 1e-4 * sum(p.abs().sum() for p in model.parameters())

    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    report = measure_step(model, optimizer, x, target=y, loss_fn=l1_loss, backend="emulated")
    assert seen_devices == {"meta"}
    assert [p for p in model.parameters()] == originals and all(p.device.type == "cpu" for p in originals)
    # the penalty's abs() outputs are temporaries of the forward, made and freed one parameter at a time: at
    # least the largest, |W1| of 32 x 64 fp32 = 8192 B (a whole number of 512-B blocks)
    forward = report.steps[0].phases[Phase.FORWARD]
    assert forward.peak_split[Category.TEMPORARIES] >= 32 * 64 * 4


def test_large_block_without_a_split_counts_whole_as_on_cuda():
    """The caching allocator splits a large block only when more than 1 MiB would remain, and counts the
    whole block as allocated: an 11.5 MiB batch gets a 12 MiB segment (2 MiB rounding) and holds all 12."""
    from pytest_gpumem._measure.allocator import segment_size

    batch_bytes = 11 * 2**20 + 2**19
    rows = batch_bytes // (64 * 4)
    model = nn.Linear(64, 1, bias=False)
    x = torch.randn(rows, 64)
    report = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, backend="emulated", steps=1)
    batch_phase = report.steps[0].phases[Phase.BATCH]
    assert segment_size(batch_bytes) == 12 * 2**20
    surplus = segment_size(batch_bytes) - round_allocation(batch_bytes)  # 0.5 MiB: too small to split off
    assert batch_phase.retained - report.steps[0].phases[Phase.SETUP].retained == batch_bytes + surplus
    assert batch_phase.retained_split[Category.BATCH] == batch_bytes


def test_track_applies_cuda_semantics_on_the_emulated_backend():
    """A hand-written loop under track() saves dropout's 1-byte mask, as train_step does."""
    from pytest_gpumem import track

    model = nn.Sequential(nn.Linear(32, 256), nn.Dropout(0.5)).to("meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 32, device="meta")
    with track(model, optimizer, x, backend="emulated") as handle:
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    mask_bytes = 64 * 256  # bool: one byte per element (a float noise tensor would be 4 x that)
    forward = handle.report.steps[0].phases[Phase.FORWARD]
    assert forward.retained_split[Category.ACTIVATIONS] == mask_bytes


def test_track_keeps_the_larger_peak_of_a_phase_that_recurs_in_a_step():
    """Gradient accumulation: two backward passes before one optimizer step; the big one must not be lost."""
    from pytest_gpumem import track

    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 8)).to("meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    big, small = torch.randn(256, 64, device="meta"), torch.randn(4, 64, device="meta")
    with track(model, optimizer, backend="emulated") as handle:
        model(big).sum().backward()
        model(small).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with track(model, optimizer, backend="emulated") as alone:
        model(big).sum().backward()
    first = handle.report.steps[0].phases[Phase.BACKWARD].peak
    assert first >= alone.report.steps[0].phases[Phase.BACKWARD].peak


def test_models_holding_weights_outside_their_registries_run_and_are_left_untouched():
    """An LSTM keeps its weights in _flat_weights, a custom module keeps a plain list of parameters: the
    step runs on a twin whose copies are remapped everywhere, and the user's model keeps no meta tensor."""
    class ListHolder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))
            self.ws = [self.w]

        def forward(self, x):
            return x @ self.ws[0]

    for model, x in ((nn.LSTM(8, 16, batch_first=True), torch.randn(4, 5, 8)), (ListHolder(), torch.randn(4, 16))):
        loss_fn = (lambda out, target: out[0].sum()) if isinstance(model, nn.LSTM) else None
        backend = make_backend("emulated")
        measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, loss_fn=loss_fn, backend=backend)
        tensors = [v for v in vars(model).values() if isinstance(v, torch.Tensor)]
        tensors += [t for v in vars(model).values() if isinstance(v, list) for t in v if isinstance(t, torch.Tensor)]
        tensors += list(model.parameters())
        assert tensors and all(t.device.type == "cpu" for t in tensors)
        gc.collect()
        assert backend.trackers[-1].live_bytes() == 0  # nothing the step made outlives it


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


class _CheckpointedFunction(nn.Module):
    """A checkpointed plain function of F.* calls (no module inside the region): Linear, GELU, dropout, Linear."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.pre, self.up, self.down, self.reentrant = nn.Linear(64, 64), nn.Linear(64, 1024), nn.Linear(1024, 8), reentrant

    def forward(self, x):
        def block(h):
            h = torch.nn.functional.dropout(torch.nn.functional.gelu(
                torch.nn.functional.linear(h, self.up.weight, self.up.bias)), 0.1, True)
            return torch.nn.functional.linear(h, self.down.weight, self.down.bias)
        return torch.utils.checkpoint.checkpoint(block, self.pre(x), use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_plain_function_recomputes_with_the_cuda_kernels(reentrant):
    # The recomputation used to run without the emulation: non-reentrant checkpoint refused it (the forward saved
    # dropout's bool mask, the recompute an fp32 one); reentrant silently kept the CPU's fp32 mask.
    reports = {}
    for backend in ("cpu", "emulated"):
        torch.manual_seed(0)
        model = _CheckpointedFunction(reentrant)
        reports[backend] = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(256, 64),
                                        target=torch.randint(0, 8, (256,)), backend=backend)

    def saved_and_transient(report, phase):
        split = report.steps[-1].phases[phase].peak_split
        return split[Category.ACTIVATIONS] + split[Category.TEMPORARIES]

    # dropout over 256 x 1024 elements: the CPU keeps fp32 noise (4 B each), CUDA a bool mask (1 B each), both
    # in the forward (under no_grad, a temporary) and in the recomputation (saved for backward):
    # 256 * 1024 * (4 - 1) = 786432 B less on the emulated backend; every other tensor is a 512-B multiple
    for phase in (Phase.FORWARD, Phase.BACKWARD):
        assert saved_and_transient(reports["cpu"], phase) - saved_and_transient(reports["emulated"], phase) == 786432


def test_checkpoint_recomputes_under_the_emulated_autocast():
    # Checkpointing asks the inputs' device which autocast state to replay; on meta tensors that was "meta"
    # (off), so the recomputed Linear saved an fp32 input where the forward saved bf16 and checkpoint refused.
    model = nn.Sequential(_Checkpointed(nn.Sequential(nn.Linear(256, 256), nn.ReLU())), nn.Linear(256, 8))
    report = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 256),
                          target=torch.randint(0, 8, (4,)), backend="emulated", autocast_dtype=torch.bfloat16)
    # fp32 grads (the 512-B rounding counts under other): 256*256*4 = 262144, 256*4 = 1024, 8*256*4 = 8192, 8*4 = 32
    assert report.category_peak(Category.GRADS) == 262144 + 1024 + 8192 + 32
    assert report.phase_peaks()[Phase.BACKWARD] > 0
