"""Recurrent models, a LoRA adapter through peft, and a Lightning module."""
from __future__ import annotations

import torch
from torch import nn

from .entry import Entry, Step, adamw, register, token_loss, tokens
from .text import TINY

RNN_RULES = ("adam-step-on-host", "foreach-optimizer", "rnn-kernels")


class RecurrentLM(nn.Module):
    """Embedding -> LSTM/GRU -> vocabulary head: a word-level language model."""

    def __init__(self, cell: str = "lstm", vocab: int = 256, hidden: int = 64, layers: int = 2,
                 bidirectional: bool = False, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(hidden, hidden, layers, batch_first=True, bidirectional=bidirectional, dropout=dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), vocab)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


class GRUClassifier(nn.Module):
    """Bidirectional GRU over a sequence of feature vectors, classified from the last step."""

    def __init__(self, features: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.rnn = nn.GRU(features, hidden, 2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _rnn_lm(**kwargs) -> Step:
    model = RecurrentLM(**kwargs)
    ids = tokens(2, 32, 256)
    return Step(model, adamw(model), ids, ids.clone(), token_loss)


def _gru_classifier() -> Step:
    model = GRUClassifier()
    return Step(model, adamw(model), torch.randn(2, 16, 32), torch.randint(0, 10, (2,)))  # 16 steps of 32 features


register(Entry("lstm_lm", "rnn", _rnn_lm, RNN_RULES))
register(Entry("lstm_lm_dropout", "rnn", lambda: _rnn_lm(dropout=0.25), (*RNN_RULES, "dropout-bool-mask")))
register(Entry("gru_bidirectional", "rnn", _gru_classifier, RNN_RULES))
register(Entry("lstm_bidirectional_lm", "rnn", lambda: _rnn_lm(bidirectional=True), RNN_RULES))


def _lora(base: str) -> Step:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if base == "llama":
        config, targets = LlamaConfig(**{**TINY, "num_key_value_heads": 2}), ["q_proj", "v_proj"]
    else:
        config, targets = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0), ["c_attn"]
    model = get_peft_model(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.05,
                                      fan_in_fan_out=base == "gpt2"))
    ids = tokens(2, 32, 256)
    return Step(model, adamw(model), {"input_ids": ids}, ids.clone(), token_loss)


LORA_RULES = ("adam-step-on-host", "foreach-optimizer", "sdpa-cuda-kernel", "dropout-bool-mask")
register(Entry("peft_lora_llama", "peft", lambda: _lora("llama"), LORA_RULES, ("peft", "transformers"),
               notes="r=8 on q_proj and v_proj; only the adapters train"))
register(Entry("peft_lora_gpt2", "peft", lambda: _lora("gpt2"), LORA_RULES, ("peft", "transformers"),
               notes="r=8 on the fused c_attn (Conv1D, fan_in_fan_out)"))


def _lightning() -> Step:
    import lightning.pytorch as pl

    class LitClassifier(pl.LightningModule):
        """A LightningModule: forward, training_step and configure_optimizers as users write them."""

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.1), nn.Linear(256, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    model = LitClassifier()
    return Step(model, model.configure_optimizers(), torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))


register(Entry("lightning_module", "lightning", _lightning,
               ("adam-step-on-host", "foreach-optimizer", "dropout-bool-mask"), ("lightning",),
               notes="forward() measured with the loss training_step computes (cross-entropy)"))
