"""Hugging Face transformers built from tiny configs (hidden 64, 2 layers, sequence 32, batch 2), random init."""
from __future__ import annotations

import torch

from .entry import Entry, Step, adamw, register, token_loss, tokens

BATCH, SEQ, VOCAB = 2, 32, 256
HF_RULES = ("adam-step-on-host", "foreach-optimizer", "sdpa-cuda-kernel", "dropout-bool-mask")
DECODER_RULES = ("adam-step-on-host", "foreach-optimizer", "sdpa-cuda-kernel")  # Llama-style: no dropout
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, vocab_size=VOCAB)


def _causal_lm(config, optimizer=adamw, autocast_dtype=None, checkpointing=False, mask=None) -> Step:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = tokens(BATCH, SEQ, VOCAB)
    batch = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    return Step(model, optimizer(model), batch, ids.clone(), token_loss, autocast_dtype)  # labels: their own tensor


def _llama(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, "num_key_value_heads": 2, **overrides})


def _gpt2(**overrides):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                      eos_token_id=0, **overrides)


def _adafactor(model):
    return torch.optim.Adafactor(model.parameters(), lr=1e-2)


def _padded_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ // 2:] = 0  # the second sequence is half padding
    return mask


def _decoders() -> None:
    req = ("transformers",)
    register(Entry("hf_gpt2", "transformers", lambda: _causal_lm(_gpt2()), HF_RULES, req))
    register(Entry("hf_gpt2_checkpointing", "transformers", lambda: _causal_lm(_gpt2(), checkpointing=True),
                   HF_RULES, req))
    register(Entry("hf_gpt2_adafactor", "transformers", lambda: _causal_lm(_gpt2(), optimizer=_adafactor),
                   HF_RULES, req))
    register(Entry("hf_llama_gqa", "transformers", lambda: _causal_lm(_llama()), DECODER_RULES, req,
                   notes="4 query heads, 2 key/value heads (GQA: HF passes enable_gqa=True)"))
    register(Entry("hf_llama_no_cache", "transformers", lambda: _causal_lm(_llama(use_cache=False)),
                   DECODER_RULES, req))
    register(Entry("hf_llama_bf16_autocast", "transformers",
                   lambda: _causal_lm(_llama(), autocast_dtype=torch.bfloat16), (*DECODER_RULES, "autocast-cuda"), req))
    register(Entry("hf_qwen2_tied", "transformers", lambda: _causal_lm(_qwen2()), DECODER_RULES, req,
                   notes="tied input/output embeddings, GQA"))
    register(Entry("hf_mistral_sliding_window", "transformers", lambda: _causal_lm(_mistral()), DECODER_RULES,
                   req, notes="sliding window 16 < sequence 32: an explicit mask, not is_causal"))


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(**{**TINY, "num_key_value_heads": 2, "tie_word_embeddings": True})


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(**{**TINY, "num_key_value_heads": 2, "sliding_window": 16})


def _bert(mask=None) -> Step:
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(**TINY, type_vocab_size=2))
    ids = tokens(BATCH, SEQ, VOCAB)
    batch = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    return Step(model, adamw(model), batch, ids.clone(), token_loss)


def _t5() -> Step:
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                num_heads=4, decoder_start_token_id=0, pad_token_id=0))
    ids, labels = tokens(BATCH, SEQ, VOCAB), tokens(BATCH, SEQ // 2, VOCAB)
    return Step(model, adamw(model), {"input_ids": ids, "decoder_input_ids": labels}, labels.clone(), token_loss)


def _vit() -> Step:
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, image_size=32, patch_size=8, num_labels=10))
    return Step(model, adamw(model), {"pixel_values": torch.randn(BATCH, 3, 32, 32)},
                torch.randint(0, 10, (BATCH,)), token_loss)


def _whisper() -> Step:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=32, max_target_positions=32,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    model = WhisperForConditionalGeneration(config)
    features = torch.randn(BATCH, 16, 64)  # 64 frames -> 32 positions after the stride-2 convolution
    labels = tokens(BATCH, SEQ // 2, VOCAB)
    return Step(model, adamw(model), {"input_features": features, "decoder_input_ids": labels}, labels.clone(), token_loss)


def _encoders() -> None:
    req = ("transformers",)
    register(Entry("hf_bert_mlm", "transformers", _bert, HF_RULES, req))
    register(Entry("hf_bert_padded", "transformers", lambda: _bert(_padded_mask()), HF_RULES, req,
                   notes="the second sequence is half padding: an explicit mask"))
    register(Entry("hf_t5", "transformers", _t5, (*HF_RULES,), req))
    register(Entry("hf_vit", "transformers", _vit, HF_RULES, req))
    register(Entry("hf_whisper", "transformers", _whisper, HF_RULES, req))


_decoders()
_encoders()
