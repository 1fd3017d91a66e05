"""Real architectures issue 14 does not name, for ``estimate_zoo.py --set more``: the estimate is held to them too.

Hugging Face models from small configs (random init, nothing downloaded, eager attention, no padding), timm and
torchvision models at 64 x 64; each trained one step with AdamW (HF) or Adam, estimated with device="cpu" and
measured on the cpu backend by ``estimate_zoo.compare``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

#: (case name, builder) pairs; the builder returns (model, make_optimizer, batch, target, loss_fn)
Builder = Callable[[], tuple[Any, Callable, Any, Any, Callable | None]]

_DECODER = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, attn_implementation="eager")


def _loss_of(out: Any, _target: Any) -> torch.Tensor:
    return out.loss


def _pooled_square(out: Any, _target: Any) -> torch.Tensor:
    """A loss on an encoder's pooled output (CLIP's text tower returns no loss of its own)."""
    return out.pooler_output.pow(2).mean()


def _adamw(m):
    return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])


def _adam(m):
    return torch.optim.Adam(m.parameters())


def _hf_config(kind: str):
    import transformers as tr

    if kind == "mistral":
        return tr.MistralForCausalLM, tr.MistralConfig(**_DECODER, num_key_value_heads=2, sliding_window=32)
    if kind == "qwen2":
        return tr.Qwen2ForCausalLM, tr.Qwen2Config(**_DECODER, num_key_value_heads=2, tie_word_embeddings=True)
    if kind == "qwen3":
        return tr.Qwen3ForCausalLM, tr.Qwen3Config(**_DECODER, num_key_value_heads=2, head_dim=32)
    if kind == "gemma":
        return tr.GemmaForCausalLM, tr.GemmaConfig(**_DECODER, num_key_value_heads=1, head_dim=32)
    if kind == "phi":
        return tr.PhiForCausalLM, tr.PhiConfig(**_DECODER)
    if kind == "phi3":
        return tr.Phi3ForCausalLM, tr.Phi3Config(**_DECODER, num_key_value_heads=2, pad_token_id=0)
    if kind == "gpt_neox":
        return tr.GPTNeoXForCausalLM, tr.GPTNeoXConfig(**_DECODER)
    if kind == "falcon":
        return tr.FalconForCausalLM, tr.FalconConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, attn_implementation="eager")
    if kind == "opt":
        return tr.OPTForCausalLM, tr.OPTConfig(vocab_size=1000, hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=128,
                                               word_embed_proj_dim=128, attn_implementation="eager")
    enc = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               max_position_embeddings=130, attn_implementation="eager")
    if kind == "roberta":
        return tr.RobertaForMaskedLM, tr.RobertaConfig(**enc, pad_token_id=1)
    if kind == "electra":
        return tr.ElectraForMaskedLM, tr.ElectraConfig(**enc, embedding_size=64)
    if kind == "distilbert":
        return tr.DistilBertForMaskedLM, tr.DistilBertConfig(vocab_size=1000, dim=128, n_layers=2, n_heads=4,
                                                             hidden_dim=256, max_position_embeddings=128,
                                                             attn_implementation="eager")
    if kind == "bart":
        return tr.BartForConditionalGeneration, tr.BartConfig(
            vocab_size=1000, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=128,
            attn_implementation="eager")
    raise ValueError(kind)


def hf_text(kind: str) -> Builder:
    def build():
        cls, config = _hf_config(kind)
        m = cls(config)
        m.train()
        ids = torch.randint(3, 1000, (4, 64))
        batch = {"input_ids": ids, "labels": ids[:, :32].clone() if kind == "bart" else ids}
        return m, _adamw, batch, None, _loss_of
    return build


def hf_vit() -> tuple[Any, Callable, Any, Any, Callable | None]:
    import transformers as tr

    m = tr.ViTForImageClassification(tr.ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=256, num_labels=10,
                                                  attn_implementation="eager"))
    m.train()
    return m, _adamw, {"pixel_values": torch.randn(4, 3, 64, 64), "labels": torch.randint(0, 10, (4,))}, None, _loss_of


def hf_clip_text() -> tuple[Any, Callable, Any, Any, Callable | None]:
    import transformers as tr

    m = tr.CLIPTextModel(tr.CLIPTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                           attn_implementation="eager"))
    m.train()
    return m, _adamw, {"input_ids": torch.randint(0, 1000, (4, 77))}, None, _pooled_square


def timm_model(name: str, **kw: Any) -> Builder:
    def build():
        import timm

        m = timm.create_model(name, pretrained=False, num_classes=10, **kw)
        return m, _adam, torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,)), None
    return build


def torchvision_model(name: str) -> Builder:
    def build():
        import torchvision

        m = getattr(torchvision.models, name)(num_classes=10)
        return m, _adam, torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,)), None
    return build


MORE: list[tuple[str, Builder]] = [
    *[(f"hf {k}", hf_text(k)) for k in ("mistral", "qwen2", "qwen3", "gemma", "phi", "phi3", "gpt_neox", "falcon",
                                        "opt", "roberta", "electra", "distilbert", "bart")],
    ("hf vit", hf_vit),
    ("hf clip text", hf_clip_text),
    ("timm resnet18", timm_model("resnet18")),
    ("timm resnet50", timm_model("resnet50")),
    ("timm convnext_atto", timm_model("convnext_atto")),
    ("timm regnety_002", timm_model("regnety_002")),
    ("timm vit_tiny", timm_model("vit_tiny_patch16_224", img_size=64)),
    ("timm deit_tiny", timm_model("deit_tiny_patch16_224", img_size=64)),
    ("timm swin_tiny", timm_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4)),
    ("torchvision mobilenet_v2", torchvision_model("mobilenet_v2")),
    ("torchvision shufflenet_v2_x0_5", torchvision_model("shufflenet_v2_x0_5")),
]
