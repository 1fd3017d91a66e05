"""Real models whose training steps read values: they run on the emulated backend (tiny random-init configs)."""
from __future__ import annotations

import pytest
import torch

from pytest_gpumem._emulation.library_allocations import LIBRARY_NOTES
from pytest_gpumem import measure_step
from pytest_gpumem._core.categories import Category, Phase
from pytest_gpumem._measure.step import StepFailed

transformers = pytest.importorskip("transformers")
HERE = __file__.rsplit("/", 1)[-1]



def value_notes(report) -> tuple:
    """The report's notes about values read, without the attention kernel and library notes the emulation adds."""
    return tuple(n for n in report.notes if not n.startswith("attention assumed on") and n not in LIBRARY_NOTES)

def hf_loss(output, target):
    return output.loss


def both(model, optimizer_cls, batch, **kwargs):
    return {be: measure_step(model, optimizer_cls(model.parameters()), batch, loss_fn=hf_loss, backend=be, **kwargs)
            for be in ("cpu", "emulated")}


def storage_bytes(tensors) -> int:
    """torch's own size of the distinct storages (GPT-2 ties its head to the token embedding)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def same_state(reports, model, batch) -> None:
    """Both backends agree, and with torch's own sizes: parameters and buffers, one grad per trainable
    parameter, every tensor of the batch."""
    cpu, emu = reports["cpu"], reports["emulated"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    closed_form = {Category.PARAMS: storage_bytes([*model.parameters(), *model.buffers()]),
                   Category.GRADS: storage_bytes(trainable), Category.BATCH: storage_bytes(batch.values())}
    for category in (Category.PARAMS, Category.GRADS, Category.BATCH):
        assert emu.category_peak(category) == cpu.category_peak(category) == closed_form[category], category


def padded_ids(vocab: int = 100):
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    return ids, mask


def test_bert_with_a_padded_attention_mask():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertForSequenceClassification(config)
    ids, mask = padded_ids()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    reports = both(model, torch.optim.AdamW, batch)
    same_state(reports, model, batch)
    assert value_notes(reports["emulated"]) == ()


@pytest.mark.parametrize("padded", [False, True])
def test_llama_without_cache_builds_its_causal_mask_from_values(padded):
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=100, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    ids, mask = padded_ids()
    batch = {"input_ids": ids, "labels": ids, "attention_mask": mask if padded else torch.ones_like(mask)}
    reports = both(model, torch.optim.AdamW, batch)
    same_state(reports, model, batch)
    assert value_notes(reports["emulated"]) == ()


def test_gpt2_with_gradient_checkpointing_recomputes_with_cuda_kernels():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    plain = transformers.GPT2LMHeadModel(config)
    checkpointed = transformers.GPT2LMHeadModel(config)
    checkpointed.gradient_checkpointing_enable()
    ids, _ = padded_ids()
    batch = {"input_ids": ids, "labels": ids}
    reports = both(checkpointed, torch.optim.AdamW, batch)
    same_state(reports, checkpointed, batch)
    full = measure_step(plain, torch.optim.AdamW(plain.parameters()), batch, loss_fn=hf_loss, backend="emulated")
    # checkpointing keeps only the layer inputs for backward: fewer activations at the end of forward
    assert reports["emulated"].steps[1].phases["forward"].retained_split[Category.ACTIVATIONS] < \
        full.steps[1].phases["forward"].retained_split[Category.ACTIVATIONS]


def test_adafactor_reads_norms_with_item_and_gets_a_note_naming_the_line():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    ids, _ = padded_ids()
    batch = {"input_ids": ids, "labels": ids}
    reports = both(model, torch.optim.Adafactor, batch)
    same_state(reports, model, batch)
    notes = value_notes(reports["emulated"])
    assert notes and all("Tensor.item()" in n and "answered as if" in n for n in notes)
    assert any("_adafactor.py:" in n for n in notes)


def test_faster_rcnn_in_train_mode_runs_at_the_upper_bound_of_its_proposal_selections():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64).train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 50.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    report = measure_step(model, torch.optim.SGD(model.parameters(), lr=0.01), (images, targets),
                          loss_fn=lambda losses, _: sum(losses.values()), backend="emulated", steps=1)
    notes = [n for n in report.notes if "upper bound" in n]
    # the RPN's proposals come from its head: the small-box filter and nms keep all of them (the ground-truth
    # boxes are known: their degenerate-box check runs on real values); the zoo compares the figure with cpu
    assert any(n.startswith("nonzero") and "torchvision/ops/boxes.py:" in n for n in notes)
    assert any(n.startswith("torchvision nms") for n in notes)
    assert all(f"{HERE}:" in n for n in notes)
    # a one-step run: the first backward leaves one fp32 gradient per trainable parameter
    assert report.steps[0].phases[Phase.BACKWARD].retained_split[Category.GRADS] == \
        sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
