"""What one zoo entry is: a named builder of a real training step, and what makes CUDA differ from the CPU on it."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Step:
    """One training step, built on the CPU with random weights: what ``measure_step`` takes."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Any
    target: Any = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    autocast_dtype: torch.dtype | None = None

    def loss(self, output: Any) -> torch.Tensor:
        """The loss the step computes from the model's output (cross-entropy / MSE by default)."""
        from pytest_gpumem._core.step_calls import default_loss

        return (self.loss_fn or default_loss)(output, self.target)


@dataclass(frozen=True)
class Entry:
    """A named real architecture (tiny config, random init, nothing downloaded) and its CUDA rules."""

    name: str
    family: str                          #: timm, torchvision, transformers, rnn, peft, lightning
    build: Callable[[], Step]            #: seeded by the caller; builds on the CPU
    rules: tuple[str, ...]               #: keys of rules.RULES that make the emulated figures differ from cpu
    requires: tuple[str, ...] = ()       #: importable packages the entry needs
    #: why the emulated backend cannot run it yet: the failing op and the code that calls it (xfail strict)
    emulated_xfail: str | None = None
    notes: str = ""                      #: what is special about the configuration, in words

    def missing(self) -> list[str]:
        """Packages the entry needs that are not installed."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


REGISTRY: dict[str, Entry] = {}
#: rules every entry has: blocks are rounded on CUDA, and every zoo batch starts on the host
BASE_RULES = ("block-rounding", "batch-moved")


def register(entry: Entry) -> Entry:
    """Add ``entry`` (with the base rules) to the registry; a name used twice or an unknown rule is an error."""
    entry = replace(entry, rules=tuple(dict.fromkeys((*BASE_RULES, *entry.rules))))
    if entry.name in REGISTRY:
        raise ValueError(f"zoo entry {entry.name!r} registered twice")
    from .rules import RULES

    unknown = set(entry.rules) - set(RULES)
    if unknown:
        raise ValueError(f"zoo entry {entry.name!r} names unknown rules {sorted(unknown)}; known: {sorted(RULES)}")
    REGISTRY[entry.name] = entry
    return entry


def tokens(batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def token_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position of a Hugging Face output's logits (or a plain logits tensor)."""
    logits = getattr(output, "logits", output)
    return nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())


def adamw(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
