"""Value-aware emulation: integer/bool data keeps real values beside meta tensors; unknown values follow one policy."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_gpumem._emulation.library_allocations import LIBRARY_NOTES
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


def test_selections_on_unknown_values_keep_every_element_and_note_an_upper_bound():
    w = torch.empty(2, 4, device=META)
    with StorageTracker("meta", round_allocation) as tracker:
        with KnownValues() as mode:
            where = torch.nonzero(w > 0)
            kept = w[w > 0]
            selected = w.masked_select(w > 0)
            rows = torch.where(w.sum(1) > 0)[0]
            # the indices of an all-selected condition are known: every (row, column) of the 2 x 4 grid
            assert where.tolist() == [[r, c] for r in range(2) for c in range(4)] and rows.tolist() == [0, 1]
    assert where.shape == (8, 2) and kept.shape == (8,) and selected.shape == (8,)
    # nonzero's int64 (8, 2) result: 128 B raw, one 512-B block on CUDA
    assert 8 * 2 * 8 in [a.raw for a in tracker.allocations()]
    assert len(mode.notes) == 4 and all("upper bound" in n and f"{HERE}:" in n for n in mode.notes)
    assert any(n.startswith("nonzero") for n in mode.notes)
    assert any(n.startswith("boolean-mask indexing") for n in mode.notes)
    assert any(n.startswith("masked_select") for n in mode.notes)


def test_a_selection_mask_rebuilt_from_assumed_indices_stays_exact():
    """torchvision's sampler: where(matched >= 1) and where(matched == 0) on unknown labels each keep all; a
    mask filled at a capped random subset of them is known again, so the final where() has the real count."""
    matched = torch.empty(10, dtype=torch.long, device=META)
    with KnownValues() as mode:
        positive, negative = torch.where(matched >= 1)[0], torch.where(matched == 0)[0]
        mask = torch.zeros_like(matched, dtype=torch.uint8)   # its value comes from the shape alone
        mask[positive[torch.randperm(positive.numel(), device=META)[:3]]] = 1
        mask[negative[torch.randperm(negative.numel(), device=META)[:4]]] = 1
        sampled = torch.where(mask)[0]
    # 3 positives and 4 negatives drawn from 10 assumed candidates each: 3 to 7 distinct indices, never 10
    assert mode.value_of(mask) is not None and 3 <= sampled.numel() <= 7
    assert sampled.numel() == int(mode.value_of(mask).sum())


def test_factories_like_an_unknown_tensor_have_values_only_when_cheap():
    scores = torch.empty(5000, device=META)
    with KnownValues() as mode:
        mask = torch.zeros_like(scores, dtype=torch.uint8)  # a selection mask: its value comes from the shape
        state = torch.zeros_like(scores)  # 5000 floats, like an optimizer's exp_avg: no host copy kept
        ones = scores.new_ones(3)
    assert mode.value_of(mask).tolist() == [0] * 5000 and mode.value_of(ones).tolist() == [1.0] * 3
    assert mode.value_of(state) is None


def test_shape_deciding_op_without_a_bound_fails_naming_op_line_and_way_out():
    w = torch.empty(8, device=META)
    with KnownValues():
        with pytest.raises(UnknownValueError) as info:
            torch.unique(w)
    message = str(info.value)
    assert "unique" in message and f"{HERE}:" in message and "backend='cpu'" in message
    with KnownValues():
        with pytest.raises(UnknownValueError):
            torch.repeat_interleave(torch.empty(3, dtype=torch.long, device=META))


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
    assert [n for n in emu.notes if n not in LIBRARY_NOTES] == []   # nothing read (no GPU named: the workspace note)
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
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        h = self.linear(x)
        return h[h > 0]  # the mask comes from parameters: its count is unknown


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def forward_temporaries(model: nn.Module, x: torch.Tensor, backend: str) -> tuple[int, tuple[str, ...]]:
    """The steady step's forward temporaries at their peak, and the notes (lr 0: every step sees these weights)."""
    report = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, backend=backend)
    notes = tuple(n for n in report.notes if n not in LIBRARY_NOTES)  # (no GPU named: the workspace note aside)
    return report.steps[-1].phases[Phase.FORWARD].peak_split[Category.TEMPORARIES], notes


def test_a_selection_on_parameter_data_is_measured_at_its_upper_bound_with_a_note_naming_the_line():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    random_model = UnknownMask(256)
    positive_model = UnknownMask(256)
    with torch.no_grad():  # positive weights and bias on positive inputs: every h > 0, all 16384 kept
        positive_model.linear.weight.abs_()
        positive_model.linear.bias.fill_(0.1)
        kept = int((random_model.linear(x) > 0).sum())
        assert bool((positive_model.linear(x.abs()) > 0).all())
    assert 0 < kept < 64 * 256
    cpu_all, _ = forward_temporaries(positive_model, x.abs(), "cpu")
    cpu_some, _ = forward_temporaries(random_model, x, "cpu")
    emu_all, notes = forward_temporaries(positive_model, x.abs(), "emulated")
    emu_some, _ = forward_temporaries(random_model, x, "emulated")
    # the bound does not depend on the values: both emulated steps keep all 16384 elements
    assert emu_some == emu_all and cpu_some < cpu_all
    # where the cpu keeps all too, CUDA adds only nonzero's int64 (16384, 2) index of the 2-d mask:
    # 16384 x 2 x 8 = 262144 B (the other temporaries are 512-B multiples but the 0-d loss, rounded up < 512 B)
    assert 0 <= emu_all - cpu_all - 16384 * 2 * 8 < 512
    (note,) = notes
    assert note.startswith("boolean-mask indexing x[mask]") and f"{HERE}:" in note and "upper bound" in note


class UniqueOfActivations(UnknownMask):
    def forward(self, x):
        return torch.unique(self.linear(x))  # how many distinct values there are has no useful bound


def test_shape_deciding_op_without_a_bound_fails_the_step_naming_the_user_line():
    model = UniqueOfActivations()
    with pytest.raises(StepFailed) as info:
        measure_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 8), backend="emulated")
    message = str(info.value)
    assert "UnknownValueError during forward of step 0" in message
    assert "unique" in message and f"{HERE}:" in message and "backend='cpu'" in message
    assert info.value.partial is not None


def test_nms_runs_on_known_values_and_keeps_every_box_on_unknown_with_the_cuda_kernels_buffers():
    torchvision = pytest.importorskip("torchvision")
    with KnownValues() as mode:
        boxes = meta_with_value(mode, torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.0]]))
        scores = meta_with_value(mode, torch.tensor([0.9, 0.8, 0.7]))
        # box 1 overlaps box 0 with IoU 81/100 > 0.5 and is suppressed; box 2 overlaps nothing
        assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert mode.notes == []
    n = 130
    with StorageTracker("meta", round_allocation) as tracker:
        with KnownValues() as mode:
            keep = torchvision.ops.nms(torch.empty(n, 4, device=META), torch.empty(n, device=META), 0.5)
    assert keep.shape == (n,) and keep.dtype == torch.long
    raw = [a.raw for a in tracker.allocations()]
    # the CUDA kernel's buffers for 130 boxes: sorted scores 520 B, order_t 1040 B, sorted boxes 2080 B,
    # the suppression mask 130 x ceil(130 / 64) = 390 int64 words = 3120 B, keep on the device 1040 B
    for nbytes in (n * 4, n * 8, n * 4 * 4, n * 3 * 8):
        assert nbytes in raw
    (note,) = mode.notes
    # the line inside torchvision that ran it, and the caller's own line
    assert note.startswith("torchvision nms") and "upper bound" in note and "every box was assumed kept" in note
    assert "torchvision/ops/boxes.py:" in note and f"(called from {__file__}:" in note


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
