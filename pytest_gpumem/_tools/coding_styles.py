"""A hypothesis family of coding styles: one small network written the ways people write it.

The same two-input MLP as ``nn.Module`` layers or as functional calls (``F.linear`` on the module's own
parameters, ``F.relu``), its batch as a tuple, list, dict, namedtuple or dataclass, tiny or large widths, and
either returning logits (the step's loss is cross-entropy) or computing its own loss inside ``forward`` and
returning it in a dict. The estimate must not care how the step was written.
"""
from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

CONTAINERS = ("tuple", "list", "dict", "namedtuple", "dataclass")
PairBatch = namedtuple("PairBatch", "x y")


@dataclasses.dataclass
class DataclassBatch:
    """A batch as a dataclass of two inputs (and the labels when the model computes its own loss)."""

    x: torch.Tensor
    y: torch.Tensor
    labels: Any = None


class _TwoInputNet(nn.Module):
    def __init__(self, d_in: int, width: int, classes: int, functional: bool, returns_loss: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d_in, width), nn.Linear(d_in, width)
        self.head = nn.Linear(width, classes)
        self.act = nn.ReLU()
        self.functional, self.returns_loss = functional, returns_loss

    def forward(self, x: Any, y: Any = None, labels: Any = None) -> Any:
        if y is None:  # one structured argument: a dataclass
            x, y, labels = x.x, x.y, x.labels
        if self.functional:
            h = F.relu(F.linear(x, self.a.weight, self.a.bias)) + F.relu(F.linear(y, self.b.weight, self.b.bias))
            logits = F.linear(h, self.head.weight, self.head.bias)
        else:
            logits = self.head(self.act(self.a(x)) + self.act(self.b(y)))
        if self.returns_loss:
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}
        return logits


@dataclasses.dataclass(frozen=True)
class CodingStyleConfig:
    """One drawn style: layers as modules or functions, the batch's container, widths, who computes the loss."""

    functional: bool
    container: str
    d_in: int
    width: int
    classes: int
    returns_loss: bool

    def build(self, device: Any = "cpu") -> nn.Module:
        with torch.device(device):
            return _TwoInputNet(self.d_in, self.width, self.classes, self.functional, self.returns_loss)

    def make_batch(self, batch_size: int, device: Any = "cpu") -> tuple[Any, Any]:
        """(inputs, target): the target travels inside the batch when the model computes its own loss."""
        x = torch.randn(batch_size, self.d_in, device=device)
        y = torch.randn(batch_size, self.d_in, device=device)
        labels = torch.randint(self.classes, (batch_size,), device=device)
        inner = labels if self.returns_loss else None
        batch: Any = {
            "tuple": lambda: (x, y, inner) if inner is not None else (x, y),
            "list": lambda: [x, y, inner] if inner is not None else [x, y],
            "dict": lambda: {"x": x, "y": y, **({"labels": inner} if inner is not None else {})},
            "namedtuple": lambda: (PairBatch(x, y), inner),
            "dataclass": lambda: DataclassBatch(x, y, inner),
        }[self.container]()
        if self.container == "namedtuple":  # model(*batch): the namedtuple's fields are the two inputs
            batch = (*batch[0], batch[1]) if inner is not None else tuple(batch[0])
        return batch, (None if self.returns_loss else labels)


def style_loss(output: Any, target: Any) -> torch.Tensor:
    """The model's own loss when it returns one (a dict with "loss"), else cross-entropy against ``target``."""
    if isinstance(output, dict):
        return output["loss"]
    return F.cross_entropy(output, target)


def coding_style_configs(*, tiny: tuple[int, int] = (1, 8),
                         large: tuple[int, int] = (256, 1024)) -> st.SearchStrategy[CodingStyleConfig]:
    """Styles with widths drawn from ``tiny`` or ``large`` (inclusive ranges)."""
    widths = st.one_of(st.integers(*tiny), st.integers(*large))
    return st.builds(CodingStyleConfig, functional=st.booleans(), container=st.sampled_from(CONTAINERS),
                     d_in=widths, width=widths, classes=st.integers(2, 16), returns_loss=st.booleans())
