"""Estimates of Hugging Face Llama configs built on meta: Llama-3-8B and a 70B-class model, full fine-tune and
LoRA (peft), with and without gradient checkpointing. Prints wall time (targets: < 1 s for 8B, < 3 s for 70B),
host memory (tracemalloc peak, ru_maxrss growth) and the estimate's peak and split.

The time is one estimate run without tracemalloc (which slows Python code several-fold), as wall time and as this
process's CPU time (on a shared machine the wall time also counts other processes' turns); the host memory comes
from a second run of the same estimate under tracemalloc (``--skip-memory`` leaves it out).

The models are built under ``torch.device("meta")`` (never materialised) from configs with
``attn_implementation="sdpa"`` and the default ``use_cache`` (``use_cache=False`` makes transformers check
position ids with ``.all()``, which meta tensors cannot answer; issue 13's value-aware emulation is for that);
the batch is token ids without padding, so no data-dependent mask is built; with checkpointing (which turns
the cache off) a 4D additive mask of zeros is passed, which transformers takes as given.
Model construction (transformers' own __init__) is timed apart from the estimate.

    python benchmarks/estimate_scale.py [--seq 2048] [--batch 1] [--only 8b]
"""
from __future__ import annotations

import argparse
import gc
import resource
import time
import tracemalloc

import torch

from pytest_gpumem._core.categories import Category
from pytest_gpumem._core.units import format_bytes
from pytest_gpumem._estimate import estimate_step

CONFIGS = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256),
    "70b-class": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      intermediate_size=28672, vocab_size=128256),
}


def build(name: str, lora: bool, checkpointing: bool):
    import transformers as tr

    config = tr.LlamaConfig(**CONFIGS[name], max_position_embeddings=8192, attn_implementation="sdpa",
                            torch_dtype=torch.bfloat16)
    with torch.device("meta"):
        model = tr.LlamaForCausalLM(config).to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]))
    return model


def _warm_up() -> None:
    import transformers as tr

    with torch.device("meta"):
        model = tr.LlamaForCausalLM(tr.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                                                   attn_implementation="sdpa"))
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    estimate_step(model, torch.optim.AdamW(model.parameters()), {"input_ids": ids, "labels": ids},
                  loss_fn=lambda out, _t: out.loss, device="cuda", steps=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--only", default="")
    ap.add_argument("--skip-memory", action="store_true", help="time only (no second run under tracemalloc)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}; batch {args.batch} x seq {args.seq}; AdamW; bf16 params")
    t0 = time.perf_counter()
    _warm_up()
    print(f"first estimate in this process (a 2-layer config, imports and dispatch caches): "
          f"{time.perf_counter() - t0:.2f} s")
    print(f"{'config':40}{'build s':>9}{'estimate s':>11}{'cpu s':>8}{'tracemalloc':>13}{'rss +':>10}{'peak':>12}"
          f"{'params':>12}{'optimizer':>12}{'activations':>13}")
    for name in CONFIGS:
        for lora in (False, True):
            for ckpt in (False, True):
                label = f"{name} {'lora' if lora else 'full'} {'ckpt' if ckpt else 'no-ckpt'}"
                if args.only not in label:
                    continue
                t0 = time.perf_counter()
                model = build(name, lora, ckpt)
                built = time.perf_counter() - t0
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
                ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
                batch = {"input_ids": ids, "labels": ids}
                if ckpt:
                    # checkpointing turns use_cache off, and then transformers checks position ids with .all():
                    # a 4D additive mask is taken as given (the mask is counted as batch bytes)
                    batch["attention_mask"] = torch.zeros(args.batch, 1, args.seq, args.seq, dtype=torch.bfloat16,
                                                          device="meta")
                gc.collect()
                rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                t0, c0 = time.perf_counter(), time.process_time()
                est = estimate_step(model, opt, batch, loss_fn=lambda out, _t: out.loss, device="cuda", steps=1)
                took, cpu = time.perf_counter() - t0, time.process_time() - c0
                rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
                traced = "-"
                if not args.skip_memory:
                    gc.collect()
                    tracemalloc.start()
                    estimate_step(model, opt, batch, loss_fn=lambda out, _t: out.loss, device="cuda", steps=1)
                    traced = format_bytes(tracemalloc.get_traced_memory()[1])
                    tracemalloc.stop()
                print(f"{label:40}{built:>9.2f}{took:>11.2f}{cpu:>8.2f}{traced:>13}{format_bytes(rss):>10}"
                      f"{format_bytes(est.peak):>12}{format_bytes(est.params):>12}{format_bytes(est.optimizer):>12}"
                      f"{format_bytes(est.category_peak(Category.ACTIVATIONS)):>13}", flush=True)
                del model, opt, est
                gc.collect()


if __name__ == "__main__":
    main()
