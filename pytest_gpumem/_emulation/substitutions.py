"""The registry of substitutions, each reproducing one CUDA behaviour on meta tensors, and patching."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


Proceed = Callable[[tuple, dict], Any]  # call the next substitution (or the op itself) with these args


@dataclass(frozen=True)
class Substitution:
    """One CUDA behaviour reproduced on meta tensors while :func:`cuda_semantics` is entered."""

    name: str
    doc: str  #: the CUDA behaviour it reproduces, and the torch versions checked
    #: python-level torch callables whose calls go to ``run`` (through a TorchFunctionMode)
    intercepts: frozenset = frozenset()
    run: Callable[[Callable, tuple, dict, Proceed], Any] | None = None
    #: (owner, attribute, make_replacement(original)) set on enter, put back on exit
    patches: tuple[tuple[Any, str, Callable[[Any], Any]], ...] = ()


SUBSTITUTIONS: dict[str, Substitution] = {}


def _register(sub: Substitution) -> Substitution:
    if sub.name in SUBSTITUTIONS:
        raise ValueError(f"substitution {sub.name!r} registered twice")
    SUBSTITUTIONS[sub.name] = sub
    return sub


def _on_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


@contextlib.contextmanager
def _patched(patches: tuple) -> Iterator[None]:
    """Set each (owner, attribute, make_replacement) for the duration; always put the originals back (a class's
    own attribute as it was stored: a staticmethod stays one)."""
    saved = []
    try:
        for owner, attr, make in patches:
            original = getattr(owner, attr)
            stored = vars(owner).get(attr, original) if isinstance(owner, type) else original
            saved.append((owner, attr, stored))
            setattr(owner, attr, make(original))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)
