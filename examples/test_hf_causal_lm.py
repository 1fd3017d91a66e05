"""Fine-tuning a Hugging Face causal language model under a memory budget: full fine-tune and LoRA.

The model is Llama-shaped and built from a config in code (random weights, nothing downloaded): hidden 256,
4 layers, 8 query heads sharing 2 key/value heads (grouped-query attention), vocabulary 2048; batch 4 of
256 tokens, bf16 autocast, AdamW.

Where the memory goes:
- full fine-tune: every weight is trained, so fp32 weights, gradients and AdamW's two moments cost 16 B per
  parameter; autocast adds bf16 copies of the weights it casts, and activations grow with batch x tokens;
  the logits (batch x tokens x vocabulary) and their fp32 cross-entropy are the largest single tensors.
- LoRA (peft, rank 8 on the attention projections): the base weights are frozen -- no gradients, no optimizer
  state -- so the fixed part nearly disappears; activations stay, because backward still runs through the
  frozen layers to reach the adapters.
Attention runs on the kernel an H100/H200 would pick for bf16 (cuDNN), without expanding k/v for GQA;
the report's notes name it.

Needs the ``zoo`` extra (``pip install -e '.[zoo]'``); skipped without transformers / peft.
"""
import pytest
import torch
from torch import nn

from pytest_gpumem import Category

transformers = pytest.importorskip("transformers")

BATCH, TOKENS, VOCAB = 4, 256, 2048


def llama(device):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=TOKENS)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device)


def next_token_loss(output, labels):
    """Cross-entropy of each position's logits against the next token."""
    logits = output.logits[:, :-1].flatten(0, 1)
    return nn.functional.cross_entropy(logits, labels[:, 1:].flatten())


def tokens(device):
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), device=device)
    return {"input_ids": ids}, ids.clone()


# measured on the emulated backend (torch 2.14.1, transformers 5.24): peak 135.46 MiB; budget = peak + 25%
@pytest.mark.gpu_budget("170MiB")
def test_llama_full_fine_tune_bf16(gpumem):
    model = llama(gpumem.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    batch, labels = tokens(gpumem.device)

    report = gpumem.train_step(model, optimizer, batch, target=labels, loss_fn=next_token_loss,
                               autocast_dtype=torch.bfloat16)

    n_params = sum(p.numel() for p in model.parameters())
    assert report.category_peak(Category.OPTIMIZER) >= 2 * 4 * n_params  # AdamW: two fp32 moments per weight


# measured on the emulated backend (torch 2.14.1, transformers 5.24, peft 0.21): peak 87.89 MiB;
# budget = peak + 25%. The default estimate check is on: estimated 86.89 MiB (-1.1%).
@pytest.mark.gpu_budget("110MiB")
def test_llama_lora_bf16(gpumem):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(gpumem.device), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch, labels = tokens(gpumem.device)

    report = gpumem.train_step(model, optimizer, batch, target=labels, loss_fn=next_token_loss,
                               autocast_dtype=torch.bfloat16)

    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    assert report.category_peak(Category.GRADS) <= adapter_bytes * 1.05  # frozen weights get no gradients
