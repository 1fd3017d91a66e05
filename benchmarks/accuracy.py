"""How close are the estimate and the emulation to what a GPU reports? A zoo of training steps.

For every configuration this prints:
  estimate   estimate_step(..., device="cuda"): from structure and shapes, no kernels run
  emulated   measure_step(..., backend="emulated"): the step on meta tensors with CUDA's rules
  cuda       measure_step(..., backend="cuda"): torch.cuda.max_memory_allocated / max_memory_reserved
             -- only when torch.cuda.is_available(); never faked
with relative errors (against cuda when there is a GPU, else estimate against emulated), and their
median and worst.

    python benchmarks/accuracy.py                    # table; on a GPU also writes benchmarks/results/
    python benchmarks/accuracy.py --json out.json    # also write the results as JSON
    python benchmarks/accuracy.py --only resnet18    # configurations whose name contains 'resnet18'
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision import models

from pytest_gpumem import format_bytes, measure_step
from pytest_gpumem._estimate import estimate_step

RESULTS = Path(__file__).resolve().parent / "results"


# -- the zoo --------------------------------------------------------------------------------------


@dataclass
class Config:
    """One training step: how to build the model, optimizer and batch on a device, and how to run it."""

    name: str
    model: Callable[[], nn.Module]                       #: built inside `with torch.device(...)`
    optimizer: Callable[[Any], torch.optim.Optimizer]
    batch: Callable[[torch.device], tuple[Any, Any]]     #: (inputs, target)
    loss_fn: Callable | None = None
    step_options: dict[str, Any] = field(default_factory=dict)  #: extra measure_step/estimate_step keywords (autocast, scaler)
    note: str = ""


def images(n: int, c: int, hw: int, classes: int = 10):
    return lambda d: (torch.randn(n, c, hw, hw, device=d), torch.randint(0, classes, (n,), device=d))


def mlp(widths, bn_dropout=False):
    def build():
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(widths[:-2], widths[1:-1]):
            layers.append(nn.Linear(d_in, d_out))
            if bn_dropout:
                layers += [nn.BatchNorm1d(d_out), nn.ReLU(), nn.Dropout(0.5)]
            else:
                layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[-2], widths[-1]))
        return nn.Sequential(*layers)
    return build


def cnn_bn_dropout():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout2d(0.25), nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(256, 10),
    )


class Encoder(nn.Module):
    """Token embedding + nn.TransformerEncoder + a per-token vocabulary head."""

    def __init__(self, vocab=1000, d_model=256, heads=8, layers=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens))).flatten(0, 1)


def tokens(n: int, seq: int, vocab: int = 1000):
    return lambda d: (torch.randint(0, vocab, (n, seq), device=d), torch.randint(0, vocab, (n * seq,), device=d))


class CheckpointedMLP(nn.Module):
    """8 blocks 256-1024-256 (GELU), each under torch.utils.checkpoint when ``checkpointed``."""

    def __init__(self, checkpointed: bool):
        super().__init__()
        self.checkpointed = checkpointed
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)) for _ in range(8))
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(x)


def sgd(momentum=0.0):
    return lambda p: torch.optim.SGD(p, lr=0.01, momentum=momentum)


def adam(p):
    return torch.optim.Adam(p, lr=1e-3)


def adamw(p):
    return torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01)


def _scaler(backend: str):
    if backend == "estimate":
        return True  # estimate_step counts GradScaler's tensors; it runs no scaler
    if backend == "emulated":
        from pytest_gpumem._emulation import EmulatedGradScaler

        return EmulatedGradScaler("cuda")
    return torch.amp.GradScaler("cuda")


AMP = {"autocast_dtype": torch.float16, "scaler": _scaler}  # the scaler is made per backend

ZOO: list[Config] = [
    Config("mnist_mlp_784-128-10/adam/b64", mlp([784, 128, 10]), adam, images(64, 1, 28)),
    Config("cifar_mlp_3072-128-10/sgd/b64", mlp([3072, 128, 10]), sgd(), images(64, 3, 32)),
    Config("cifar_mlp_bn_dropout/adamw/b128", mlp([3072, 1024, 512, 256, 10], bn_dropout=True), adamw, images(128, 3, 32)),
    Config("cnn_bn_dropout/sgd_momentum/b64", cnn_bn_dropout, sgd(0.9), images(64, 3, 32)),
    Config("resnet18/sgd_momentum/b16x64px", lambda: models.resnet18(num_classes=10), sgd(0.9), images(16, 3, 64)),
    Config("resnet18/adamw/b8x224px", lambda: models.resnet18(), adamw, images(8, 3, 224, 1000)),
    Config("resnet50/sgd_momentum/b8x128px", lambda: models.resnet50(), sgd(0.9), images(8, 3, 128, 1000)),
    Config("mobilenet_v3_small/adam/b16x224px", lambda: models.mobilenet_v3_small(), adam, images(16, 3, 224, 1000)),
    Config("vit_b_16/adamw/b2x224px", lambda: models.vit_b_16(), adamw, images(2, 3, 224, 1000)),
    Config("transformer_encoder_4x256/adamw/b8x128", Encoder, adamw, tokens(8, 128)),
    Config("mlp_1024-4096-4096-10/adam/b512/fp32", mlp([1024, 4096, 4096, 10]), adam,
           lambda d: (torch.randn(512, 1024, device=d), torch.randint(0, 10, (512,), device=d))),
    Config("mlp_1024-4096-4096-10/adam/b512/amp_fp16", mlp([1024, 4096, 4096, 10]), adam,
           lambda d: (torch.randn(512, 1024, device=d), torch.randint(0, 10, (512,), device=d)),
           step_options=AMP),
    Config("resnet18/sgd_momentum/b16x64px/amp_fp16", lambda: models.resnet18(num_classes=10), sgd(0.9),
           images(16, 3, 64), step_options=AMP),
    Config("deep_mlp_8x256-1024/sgd/b1024", lambda: CheckpointedMLP(False), sgd(),
           lambda d: (torch.randn(1024, 256, device=d), torch.randint(0, 10, (1024,), device=d))),
    Config("deep_mlp_8x256-1024/sgd/b1024/checkpointed", lambda: CheckpointedMLP(True), sgd(),
           lambda d: (torch.randn(1024, 256, device=d), torch.randint(0, 10, (1024,), device=d))),
]


# -- running ----------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    params: int
    estimate: int | None = None
    emulated: int | None = None
    emulated_reserved: int | None = None
    cuda: int | None = None
    cuda_reserved: int | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    note: str = ""

    def rel(self, value: int | None, reference: int | None) -> float | None:
        if value is None or not reference:
            return None
        return (value - reference) / reference


def _build(config: Config, device: str):
    with torch.device(device):
        torch.manual_seed(0)
        model = config.model()
    return model, config.optimizer(model.parameters()), config.batch(torch.device(device))


def _options(config: Config, backend: str) -> dict[str, Any]:
    return {k: (v(backend) if k == "scaler" else v) for k, v in config.step_options.items()}


def run(config: Config, *, cuda: bool) -> Row:
    started = time.perf_counter()
    model, _, _ = _build(config, "meta")
    row = Row(config.name, sum(p.numel() for p in model.parameters()), note=config.note)
    try:
        model, optimizer, (inputs, target) = _build(config, "meta")
        row.estimate = estimate_step(model, optimizer, inputs, target=target, loss_fn=config.loss_fn, device="cuda",
                                     **_options(config, "estimate")).peak
    except Exception as exc:  # report and go on: one broken configuration must not hide the others
        row.errors.append(f"estimate: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    try:
        model, optimizer, (inputs, target) = _build(config, "meta")
        report = measure_step(model, optimizer, inputs, target=target, loss_fn=config.loss_fn, backend="emulated",
                              **_options(config, "emulated"))
        row.emulated, row.emulated_reserved = report.peak, report.reserved_peak
    except Exception as exc:
        row.errors.append(f"emulated: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    if cuda:
        try:
            model, optimizer, (inputs, target) = _build(config, "cuda")
            report = measure_step(model, optimizer, inputs, target=target, loss_fn=config.loss_fn, backend="cuda",
                                  **_options(config, "cuda"))
            row.cuda, row.cuda_reserved = report.peak, report.reserved_peak
        except Exception as exc:
            row.errors.append(f"cuda: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        finally:
            del model, optimizer, inputs, target
            gc.collect()
            torch.cuda.empty_cache()
    row.seconds = time.perf_counter() - started
    return row


# -- reporting --------------------------------------------------------------------------------------


def _b(n: int | None) -> str:
    return format_bytes(n) if n is not None else "-"


def _pct(x: float | None) -> str:
    return f"{x * 100:+.1f}%" if x is not None else "-"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def _summary(label: str, values: list[float | None]) -> str:
    vals = [abs(v) for v in values if v is not None]
    if not vals:
        return f"{label}: no data"
    return f"{label}: median |error| {statistics.median(vals) * 100:.1f}%, worst {max(vals) * 100:.1f}% ({len(vals)} configurations)"


def report(rows: list[Row], *, cuda: bool) -> str:
    out = []
    if cuda:
        header = ["configuration", "params", "estimate", "emulated", "cuda alloc", "est err", "emu err",
                  "emu reserved", "cuda reserved", "res err", "s"]
        body = [[r.name, f"{r.params / 1e6:.2f}M", _b(r.estimate), _b(r.emulated), _b(r.cuda),
                 _pct(r.rel(r.estimate, r.cuda)), _pct(r.rel(r.emulated, r.cuda)), _b(r.emulated_reserved),
                 _b(r.cuda_reserved), _pct(r.rel(r.emulated_reserved, r.cuda_reserved)), f"{r.seconds:.1f}"]
                for r in rows]
        out.append(_table(header, body))
        out.append(_summary("estimate vs cuda max_memory_allocated", [r.rel(r.estimate, r.cuda) for r in rows]))
        out.append(_summary("emulated vs cuda max_memory_allocated", [r.rel(r.emulated, r.cuda) for r in rows]))
        out.append(_summary("emulated reserved vs cuda max_memory_reserved",
                            [r.rel(r.emulated_reserved, r.cuda_reserved) for r in rows]))
    else:
        header = ["configuration", "params", "estimate", "emulated", "est vs emu", "emu reserved", "s"]
        body = [[r.name, f"{r.params / 1e6:.2f}M", _b(r.estimate), _b(r.emulated), _pct(r.rel(r.estimate, r.emulated)),
                 _b(r.emulated_reserved), f"{r.seconds:.1f}"] for r in rows]
        out.append(_table(header, body))
        out.append(_summary("estimate vs emulated (agreement of two predictions, not an error against a GPU)",
                            [r.rel(r.estimate, r.emulated) for r in rows]))
        out.append("cuda columns (max_memory_allocated, max_memory_reserved, errors against them) need a GPU: "
                   "torch.cuda.is_available() is False here, so none are shown")
    for r in rows:
        for e in r.errors:
            out.append(f"error in {r.name}: {e}")
        if r.note:
            out.append(f"note on {r.name}: {r.note}")
    return "\n".join(out)


def environment(cuda: bool) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu (no GPU: estimate and emulated only)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (default on a GPU: benchmarks/results/)")
    parser.add_argument("--only", metavar="TEXT", help="run the configurations whose name contains TEXT")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    zoo = [c for c in ZOO if not args.only or args.only in c.name]
    env = environment(cuda)
    print(f"pytest-gpumem accuracy zoo: {len(zoo)} configurations; torch {env['torch']}, device: {env['device']}",
          flush=True)
    rows = []
    for config in zoo:
        rows.append(run(config, cuda=cuda))
        print(f"  {config.name}: {rows[-1].seconds:.1f}s", file=sys.stderr, flush=True)
    print(report(rows, cuda=cuda))
    path = args.json
    if path is None and cuda:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RESULTS / f"accuracy-{torch.cuda.get_device_name().replace(' ', '_')}-{stamp}.json"
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**env, "results": [r.__dict__ for r in rows]}
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
