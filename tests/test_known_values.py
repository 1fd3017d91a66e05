"""Value-aware emulation: integer/bool data keeps real values beside meta tensors; unknown values follow one policy."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_gpumem import measure_step
from pytest_gpumem._core.categories import Category, Phase
from pytest_gpumem._emulation.values import KnownValues, NoMetaKernelError, UnknownValueError
from pytest_gpumem._measure.allocator import round_allocation
from pytest_gpumem._measure.step import StepFailed
from pytest_gpumem._measure.tracker import StorageTracker

META = torch.device("meta")
HERE = __file__.rsplit("/", 1)[-1]


def meta_with_value(mode: KnownValues, value: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(value, device=META)
    mode.remember(meta, value)
    return meta


# -- values ---------------------------------------------------------------------------------------
def test_ops_on_known_values_compute_values_and_reads_answer_from_them():
    ids = torch.tensor([[5, 7, 0, 0], [1, 2, 3, 4]])
    with KnownValues() as mode:
        meta_ids = meta_with_value(mode, ids)
        mask = meta_ids != 0
        assert mask.device == META and mode.value_of(mask) is not None
        assert not mask.all()              # a padded batch: the value decides this branch
        assert bool(mask[1].all())
        assert mask.sum().item() == 6
        assert (meta_ids * 2).tolist() == [[10, 14, 0, 0], [2, 4, 6, 8]]
        positions = torch.arange(4, device=META).expand(2, 4)  # factories have values too
        assert (positions + meta_ids).max().item() == 8  # row 0: [0+5, 1+7, 2+0, 3+0]
    assert mode.notes == []               # nothing was unknown


def test_in_place_ops_update_values_and_views_alias_them():
    with KnownValues() as mode:
        counts = meta_with_value(mode, torch.zeros(3, dtype=torch.long))
        counts[1:].add_(5)                 # through a view, as the CPU value's view
        counts.add_(1)
        assert counts.tolist() == [1, 6, 6]


def test_unknown_data_written_into_a_known_tensor_forgets_its_value():
    weight = torch.empty(3, device=META)   # parameter-like: no value
    with KnownValues() as mode:
        mask = meta_with_value(mode, torch.tensor([True, False, True]))
        view = mask[:2]
        mask.copy_(weight > 0)
        assert mode.value_of(mask) is None and mode.value_of(view) is None


def test_parameter_derived_tensors_stay_meta_without_values():
    w = torch.empty(4, 4, device=META, requires_grad=True)
    with KnownValues() as mode:
        x = meta_with_value(mode, torch.ones(2, 4))
        y = x @ w
        assert mode.value_of(y) is None
        assert mode.value_of(x + 1) is not None


def test_the_tracker_sees_the_same_storages_with_and_without_values():
    def step():
        ids = torch.empty(2, 16, dtype=torch.long, device=META)
        emb = torch.empty(100, 32, device=META, requires_grad=True)
        mask = (ids != 0).unsqueeze(-1).float()
        (torch.nn.functional.embedding(ids, emb) * mask).sum().backward()

    logs = []
    for with_values in (False, True):
        with StorageTracker("meta", round_allocation) as tracker:
            if with_values:
                with KnownValues():
                    step()
            else:
                step()
        logs.append([(a.size, a.raw) for a in tracker.allocations()])
    assert logs[0] == logs[1]


# -- the policy for unknown values ----------------------------------------------------------------
def test_reading_an_unknown_value_answers_one_and_notes_the_op_and_line():
    w = torch.empty(8, device=META)
    with KnownValues() as mode:
        assert w.norm().item() == 1.0     # the neutral value
        line = mode.notes[0]
    assert "Tensor.item()" in line and f"{HERE}:" in line and "answered as if" in line


def test_finiteness_checks_on_unknown_values_pass():
    grad = torch.empty(1000, device=META)
    with KnownValues() as mode:
        assert bool(torch.isfinite(grad).all())
        assert not bool(torch.isnan(grad).any())
        assert not bool(torch.logical_or(grad.norm().isnan(), grad.norm().isinf()))
    assert all("as if its elements were" in n for n in mode.notes)


def test_clip_grad_norm_with_error_if_nonfinite_runs_on_unknown_grads():
    p = nn.Parameter(torch.empty(10, device=META))
    p.grad = torch.empty(10, device=META)
    with KnownValues() as mode:
        total = torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert total.device == META and total.shape == ()  # the norm is computed, its value stays unknown
    # the one read is clip_grad's finiteness check, answered "not nan/inf" and noted with its line
    (note,) = mode.notes
    assert "clip_grad.py:" in note and "answered as if its elements were False" in note


def test_shape_deciding_op_on_unknown_values_fails_naming_op_line_and_way_out():
    w = torch.empty(8, device=META)
    with KnownValues():
        with pytest.raises(UnknownValueError) as info:
            torch.nonzero(w > 0)
    message = str(info.value)
    assert "nonzero" in message and f"{HERE}:" in message and "backend='cpu'" in message
    with KnownValues():
        for call in (lambda: w[w > 0], lambda: torch.unique(w),
                     lambda: torch.repeat_interleave(torch.empty(3, dtype=torch.long, device=META))):
            with pytest.raises(UnknownValueError):
                call()


def test_shape_deciding_ops_on_known_values_get_the_real_shape_and_are_tracked():
    hidden = torch.empty(2, 4, 8, device=META)
    with StorageTracker("meta", round_allocation) as tracker:
        with KnownValues() as mode:
            mask = meta_with_value(mode, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool())
            kept = hidden[mask]                       # 5 real tokens
            where = torch.nonzero(mask)
            labels = meta_with_value(mode, torch.tensor([3, 3, 1]))
            assert torch.unique(labels).tolist() == [1, 3]
    assert kept.shape == (5, 8) and where.shape == (5, 2)
    raw = [a.raw for a in tracker.allocations() if a.raw > 0]
    # x[mask] on CUDA: nonzero's int64 (5, 2) index temporary (80 B), then the (5, 8) fp32 gather (160 B)
    assert 5 * 2 * 8 in raw and 5 * 8 * 4 in raw


# -- whole steps ----------------------------------------------------------------------------------
class PaddedPooling(nn.Module):
    """Mean over real tokens: the branch and the count come from the attention mask's values."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        hidden = self.emb(input_ids)
        if not attention_mask.all():                          # padded batch
            hidden = hidden[attention_mask.bool()]            # (real tokens, 16)
            return self.head(hidden).mean(0, keepdim=True).expand(input_ids.size(0), 3)
        return self.head(hidden.mean(1))


def test_a_model_branching_on_its_padding_mask_runs_emulated_with_the_cpu_figures():
    torch.manual_seed(0)
    model = PaddedPooling()
    mask = torch.tensor([[1] * 6 + [0] * 2, [1] * 8])
    batch = {"input_ids": torch.randint(1, 50, (2, 8)), "attention_mask": mask}
    target = torch.tensor([0, 2])
    reports = {be: measure_step(model, torch.optim.Adam(model.parameters()), batch, target=target, backend=be)
               for be in ("cpu", "emulated")}
    cpu, emu = reports["cpu"], reports["emulated"]
    assert emu.notes == ()
    # (optimizer state differs by Adam's 0-d 'step' counters: on CUDA they stay on the host, uncounted)
    # params and grads: Embedding(50, 16) + Linear(16, 3) = 800 + 48 + 3 = 851 fp32 = 3,404 B; the batch: ids and
    # mask 2 x 8 int64 each and the 2 int64 labels = (16 + 16 + 2) x 8 = 272 B
    closed_form = {Category.PARAMS: 851 * 4, Category.GRADS: 851 * 4, Category.BATCH: (16 + 16 + 2) * 8}
    for category in (Category.PARAMS, Category.GRADS, Category.BATCH):
        assert emu.category_peak(category) == cpu.category_peak(category) == closed_form[category], category
    # the gathered (14 real tokens, 16) fp32 activations exist on both: same activations in raw bytes
    assert emu.steps[1].phases[Phase.FORWARD].retained_split[Category.ACTIVATIONS] == \
        cpu.steps[1].phases[Phase.FORWARD].retained_split[Category.ACTIVATIONS]


class UnknownMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        h = self.linear(x)
        return h[h > 0]  # the mask comes from parameters: its count is unknown


def test_shape_deciding_op_on_parameter_data_fails_the_step_naming_the_user_line():
    model = UnknownMask()
    with pytest.raises(StepFailed) as info:
        measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 8), backend="emulated")
    message = str(info.value)
    assert "UnknownValueError during forward of step 0" in message
    assert "boolean-mask indexing" in message and f"{HERE}:" in message and "backend='cpu'" in message
    assert info.value.partial is not None


def test_extension_ops_with_data_dependent_shapes_run_on_known_values_and_fail_clearly_on_unknown():
    torchvision = pytest.importorskip("torchvision")
    with KnownValues() as mode:
        boxes = meta_with_value(mode, torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.0]]))
        scores = meta_with_value(mode, torch.tensor([0.9, 0.8, 0.7]))
        # box 1 overlaps box 0 with IoU 81/100 > 0.5 and is suppressed; box 2 overlaps nothing
        assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == [0, 2]
        with pytest.raises(UnknownValueError) as info:
            torchvision.ops.nms(torch.empty(5, 4, device=META), torch.empty(5, device=META), 0.5)
    # the line inside torchvision that ran it, and the caller's own line
    assert "torchvision.nms" in str(info.value) and "backend='cpu'" in str(info.value)
    assert "torchvision/ops/boxes.py:" in str(info.value) and f"(called from {__file__}:" in str(info.value)


def test_an_op_without_a_meta_kernel_fails_naming_the_op_and_the_line():
    with KnownValues():
        with pytest.raises(NoMetaKernelError) as info:
            torch.ops.aten._nested_tensor_from_mask(torch.empty(2, 3, 4, device=META),
                                                   torch.empty(2, 3, dtype=torch.bool, device=META))
    assert "_nested_tensor_from_mask" in str(info.value) and f"{HERE}:" in str(info.value)
    assert "backend='cpu'" in str(info.value)


class RewritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids):
        ids.masked_fill_(ids == 0, 9)  # in place on the step's copy of the batch
        return self.emb(ids).sum(1)


def test_in_place_ops_on_the_batch_copy_leave_the_users_batch_alone():
    model = RewritesItsInput()
    ids = torch.tensor([[0, 1, 2], [3, 0, 5]])
    measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), ids, backend="emulated")
    assert ids.tolist() == [[0, 1, 2], [3, 0, 5]]


def test_random_integer_and_small_tensors_made_on_meta_get_values_without_touching_the_users_rng():
    state = torch.random.get_rng_state()
    with KnownValues() as mode:
        labels = torch.randint(0, 5, (8,), device=META)
        small = torch.randn(4, 4, device=META)
        images = torch.randn(8, 3, 32, 32, device=META)  # 24,576 floats: above the 4096-element limit
        assert mode.value_of(labels) is not None and 0 <= labels.min().item() and labels.max().item() < 5
        assert mode.value_of(small) is not None
        assert mode.value_of(images) is None
    assert torch.equal(torch.random.get_rng_state(), state)
