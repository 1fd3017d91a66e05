"""What value tracking costs the emulated backend: the same step with and without it, side by side.

Three variants of ``measure_step(backend="emulated")`` interleave (median of the repeats): as shipped
(values kept beside meta tensors), without the value-tracking mode, and with an empty pass-through
dispatch mode in its place (the cost of one more Python mode layer, the floor of any such mode).
Models: torchvision ResNet-50 (batch 8, 224x224, AdamW) and a Hugging Face GPT-2 (4 layers, hidden 256,
batch 4 x 128 tokens, labels = input_ids) when transformers is installed. Peaks must be identical.

    python benchmarks/value_overhead.py [--repeats N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pytest_gpumem import measure_step  # noqa: E402
from pytest_gpumem._measure.backends import EmulatedBackend  # noqa: E402


class _PassThrough(TorchDispatchMode):
    notes: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))

    @staticmethod
    def worth_seeding(t) -> bool:
        return False


class WithoutValues(EmulatedBackend):
    def make_value_mode(self):
        return None


class PassThrough(EmulatedBackend):
    def make_value_mode(self):
        return _PassThrough()


def _cases():
    import torchvision

    yield "resnet50", torchvision.models.resnet50(), torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,)), None
    try:
        import transformers
    except ImportError:
        return
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=1000))
    ids = torch.randint(0, 1000, (4, 128))
    yield "gpt2", model, {"input_ids": ids, "labels": ids}, None, lambda out, _: out.loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    for name, model, batch, target, loss_fn in _cases():
        variants = {"values": EmulatedBackend, "without": WithoutValues, "pass_through": PassThrough}
        times: dict[str, list[float]] = {v: [] for v in variants}
        peaks = {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for variant, backend in variants.items():
                start = time.perf_counter()
                report = measure_step(model, torch.optim.AdamW(model.parameters()), batch, target=target,
                                      loss_fn=loss_fn, backend=backend())
                times[variant].append(time.perf_counter() - start)
                peaks[variant] = report.peak
        median = {v: statistics.median(t[1:]) for v, t in times.items()}
        results[name] = {"median_s": median, "peaks": peaks,
                         "values_over_without": median["values"] / median["without"],
                         "pass_through_over_without": median["pass_through"] / median["without"]}
        print(f"{name}: without values {median['without']:.3f} s, pass-through mode "
              f"{median['pass_through']:.3f} s ({results[name]['pass_through_over_without']:.2f}x), with values "
              f"{median['values']:.3f} s ({results[name]['values_over_without']:.2f}x); peaks equal: "
              f"{len(set(peaks.values())) == 1}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
