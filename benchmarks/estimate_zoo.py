"""Estimate (device="cpu") against the cpu backend's measurement, on the cases issue 14 names.

For each case: the peak and every compared category (the most bytes it held at any phase peak), estimated
and measured on real CPU tensors, and the worst relative difference. Hugging Face models are built from tiny
configs with random init (nothing downloaded), ``attn_implementation="eager"`` and no padding, so no
data-dependent mask is built.

    python benchmarks/estimate_zoo.py              # every case the issue names
    python benchmarks/estimate_zoo.py --only gpt2  # cases whose name contains 'gpt2'
    python benchmarks/estimate_zoo.py --set more   # real models the issue does not name (estimate_zoo_more.py)
    python benchmarks/estimate_zoo.py --set all    # both
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import namedtuple
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pytest_gpumem import measure_step
from pytest_gpumem._core.categories import Category
from pytest_gpumem._estimate import estimate_step

COMPARED = (Category.PARAMS, Category.GRADS, Category.OPTIMIZER, Category.BATCH, Category.ACTIVATIONS)


def model_loss(out: Any, _target: Any) -> torch.Tensor:
    """The loss the model computed itself (HF ``ModelOutput.loss``, a dict's "loss", a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["loss"]
    return out.loss


class FunctionalMLP(nn.Module):
    def __init__(self, widths=(784, 128, 10)):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for i, fc in enumerate(self.fc):
            x = fc(x)
            if i < len(self.fc) - 1:
                x = F.relu(x)
        return x


class TwoInputs(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 10)

    def forward(self, x, y=None):
        if y is None:  # one structured argument
            x, y = _unpack(x)
        return self.head(torch.relu(self.a(x)) + torch.relu(self.b(y)))


Pair = namedtuple("Pair", "x y")


@dataclasses.dataclass
class PairDC:
    x: torch.Tensor
    y: torch.Tensor


def _unpack(batch):
    if isinstance(batch, PairDC):
        return batch.x, batch.y
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    return batch


class TokenLM(nn.Module):
    """Embedding -> Linear with cross-entropy inside forward (the model returns its own loss)."""

    def __init__(self, vocab=1000, d=128):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, ids, labels):
        logits = self.head(self.emb(ids))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


class RNNLM(nn.Module):
    def __init__(self, kind="lstm", vocab=1000, d=128, bidirectional=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(d, d, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(d * (2 if bidirectional else 1), vocab)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out).flatten(0, 1)


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, Callable[[nn.Module], torch.optim.Optimizer], Any, Any, Callable | None]]


def adam(m):
    return torch.optim.Adam(m.parameters())


def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.01)


def hf(kind: str):
    def build():
        import transformers as tr

        common = dict(attn_implementation="eager")
        ids = torch.randint(0, 1000, (4, 64))
        if kind == "gpt2":
            m = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=1000, n_positions=128, n_embd=128, n_layer=2, n_head=4,
                                                 **common))
            batch = {"input_ids": ids, "labels": ids}
        elif kind == "llama":
            m = tr.LlamaForCausalLM(tr.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=128, **common))
            batch = {"input_ids": ids, "labels": ids}
        elif kind == "bert":
            m = tr.BertForMaskedLM(tr.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=256,
                                                 max_position_embeddings=128, **common))
            batch = {"input_ids": ids, "labels": ids}
        elif kind == "t5":
            m = tr.T5ForConditionalGeneration(tr.T5Config(vocab_size=1000, d_model=128, d_ff=256, d_kv=32,
                                                          num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                          **common))
            batch = {"input_ids": ids, "labels": ids[:, :32].clone()}
        elif kind == "whisper":
            m = tr.WhisperForConditionalGeneration(tr.WhisperConfig(
                vocab_size=1000, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, num_mel_bins=80,
                max_source_positions=100, max_target_positions=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, decoder_start_token_id=1, **common))
            batch = {"input_features": torch.randn(2, 80, 200), "labels": torch.randint(0, 1000, (2, 32))}
        elif kind == "lora":
            import peft

            base = tr.LlamaForCausalLM(tr.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, max_position_embeddings=128, **common))
            m = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
            batch = {"input_ids": ids, "labels": ids}
        else:
            raise ValueError(kind)
        m.train()
        return m, lambda mm: torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad]), batch, None, model_loss
    return build


def timm_bnact():
    from timm.layers import BatchNormAct2d

    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), BatchNormAct2d(32), nn.Conv2d(32, 32, 3, padding=1),
                      BatchNormAct2d(32), nn.Flatten(), nn.Linear(32 * 16 * 16, 10))
    return m, sgd, torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)), None


def timm_model(name):
    def build():
        import timm

        m = timm.create_model(name, pretrained=False, num_classes=10)
        return m, adam, torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,)), None
    return build


def two_inputs(kind):
    def build():
        x, y = torch.randn(1024, 256), torch.randn(1024, 256)
        batch = {"tuple": (x, y), "list": [x, y], "namedtuple": Pair(x, y), "dict": {"x": x, "y": y},
                 "dataclass": PairDC(x, y)}[kind]
        return TwoInputs(), adam, batch, None, None
    return build


def optimizer_case(kind):
    def build():
        if kind == "sparseadam":
            m = nn.Sequential(nn.Embedding(50000, 256, sparse=True), nn.Flatten(), nn.Linear(256 * 8, 10))
            return (m, lambda mm: torch.optim.SparseAdam(list(mm[0].parameters())), torch.randint(0, 50000, (64, 8)),
                    torch.randint(0, 10, (64,)), None)
        m = FunctionalMLP((512, 1024, 1024, 10))
        opt = {"adafactor": lambda mm: torch.optim.Adafactor(mm.parameters()),
               "lbfgs": lambda mm: torch.optim.LBFGS(mm.parameters(), max_iter=2)}[kind]
        return m, opt, torch.randn(64, 512), torch.randint(0, 10, (64,)), None
    return build


CASES = [
    Case("mlp F.relu", lambda: (FunctionalMLP(), adam, torch.randn(64, 784), torch.randint(0, 10, (64,)), None)),
    Case("Linear(8,4) no target", lambda: (nn.Linear(8, 4), sgd, torch.randn(16, 8), None, None)),
    *[Case(f"two inputs {k}", two_inputs(k)) for k in ("tuple", "list", "namedtuple", "dict", "dataclass")],
    Case("Embedding->Linear CE in forward", lambda: (TokenLM(), adam, (torch.randint(0, 1000, (8, 64)),
                                                                       torch.randint(0, 1000, (8, 64))), None, model_loss)),
    Case("timm BatchNormAct2d x2", timm_bnact),
    Case("SiLU(inplace) Sequential", lambda: (nn.Sequential(nn.Linear(256, 512), nn.SiLU(inplace=True), nn.Linear(512, 512),
                                                           nn.SiLU(inplace=True), nn.Linear(512, 10)),
                                              adam, torch.randn(256, 256), torch.randint(0, 10, (256,)), None)),
    Case("LSTM LM", lambda: (RNNLM("lstm"), adam, torch.randint(0, 1000, (8, 32)), torch.randint(0, 1000, (256,)), None)),
    Case("biGRU LM", lambda: (RNNLM("gru", bidirectional=True), adam, torch.randint(0, 1000, (8, 32)),
                              torch.randint(0, 1000, (256,)), None)),
    *[Case(f"hf {k}", hf(k)) for k in ("gpt2", "llama", "bert", "t5", "whisper", "lora")],
    Case("timm efficientnet_b0", timm_model("efficientnet_b0")),
    Case("timm mobilenetv3_small_100", timm_model("mobilenetv3_small_100")),
    *[Case(f"opt {k}", optimizer_case(k)) for k in ("adafactor", "sparseadam", "lbfgs")],
]


def compare(case: Case) -> dict[str, Any]:
    torch.manual_seed(0)
    model, make_opt, batch, target, loss_fn = case.build()
    opt = make_opt(model)
    t0 = time.perf_counter()
    est = estimate_step(model, opt, batch, target=target, loss_fn=loss_fn, device="cpu")
    t_est = time.perf_counter() - t0
    rep = measure_step(model, opt, batch, target=target, loss_fn=loss_fn, backend="cpu")
    rows = {"peak": (est.peak, rep.peak)}
    for c in COMPARED:
        rows[c.value] = (est.category_peak(c), rep.category_peak(c))
    return {"rows": rows, "t_est": t_est}


def rel(e: int, m: int) -> float:
    return 0.0 if e == m else (float("inf") if m == 0 else (e - m) / m)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--set", choices=("named", "more", "all"), default="named")
    args = ap.parse_args(argv)
    cases = list(CASES) if args.set in ("named", "all") else []
    if args.set in ("more", "all"):
        from estimate_zoo_more import MORE

        cases += [Case(name, build) for name, build in MORE]
    print(f"torch {torch.__version__}")
    print(f"{'case':34}{'peak est/meas':>24}{'peak %':>8}  worst category")
    worst_all = 0.0
    for case in cases:
        if args.only not in case.name:
            continue
        try:
            r = compare(case)
        except Exception as exc:  # a case that cannot run is reported, the rest carry on
            print(f"{case.name:34}  FAILED {type(exc).__name__}: {str(exc)[:110]}")
            continue
        rows = r["rows"]
        e, m = rows["peak"]
        worst = max((k for k in rows if k != "peak"), key=lambda k: abs(rel(*rows[k])))
        we, wm = rows[worst]
        worst_all = max(worst_all, abs(rel(e, m)), abs(rel(we, wm)))
        print(f"{case.name:34}{e / 2**20:>11.3f}/{m / 2**20:<11.3f}MiB{rel(e, m):>+7.1%}  "
              f"{worst} {we / 2**20:.3f}/{wm / 2**20:.3f} MiB {rel(we, wm):+.1%}  ({r['t_est']:.2f} s)")
        sys.stdout.flush()
    print(f"worst |difference|: {worst_all:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
