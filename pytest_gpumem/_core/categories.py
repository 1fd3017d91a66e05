"""The shared vocabulary: phases of a training step, categories of live bytes, backend names."""
from __future__ import annotations

import enum


class Phase(str, enum.Enum):
    """A stage of one training step, in the order it runs."""

    SETUP = "setup"          #: model and optimizer on the device
    BATCH = "batch"          #: inputs (and targets) on the device
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"  #: optimizer.step()
    ZERO_GRAD = "zero_grad"

    def __str__(self) -> str:
        return self.value


class Category(str, enum.Enum):
    """What a live byte is for."""

    PARAMS = "params"            #: parameters and buffers
    GRADS = "grads"              #: .grad of parameters
    OPTIMIZER = "optimizer"      #: optimizer state (moments, momentum buffers, step tensors)
    BATCH = "batch"              #: inputs and targets
    ACTIVATIONS = "activations"  #: tensors saved for backward
    TEMPORARIES = "temporaries"  #: transient op outputs and workspaces
    OTHER = "other"              #: allocator rounding, library workspaces, untracked bytes

    def __str__(self) -> str:
        return self.value


#: Where bytes come from: auto (cuda with a GPU, else emulated), cuda, cpu, emulated.
BACKENDS: tuple[str, ...] = ("auto", "cuda", "cpu", "emulated")


def estimate_device(backend: str) -> str:
    """The device an estimate describes for a backend: 'cpu' for the cpu backend, else 'cuda' (emulated predicts CUDA)."""
    return "cpu" if backend == "cpu" else "cuda"


PHASES: tuple[Phase, ...] = tuple(Phase)
CATEGORIES: tuple[Category, ...] = tuple(Category)
