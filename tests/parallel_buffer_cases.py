"""Communication buffers of gloo ranks, measured in a fresh interpreter for tests/test_parallel_comm_buffers.py.

Run as a script: every (model, layout) of ``LAYOUTS`` on real gloo ranks; prints one JSON object on the last line
of stdout, case id -> each rank's report as a dict. A fresh interpreter because FSDP2 run in a process keeps it
from forking ranks that run backward (see parallel_agreement_cases.py).
"""
from __future__ import annotations

import json
import sys

import torch

from pytest_gpumem import DDP, FSDP, ZeRO

from parallel_agreement_cases import case, case_id

LAYOUTS = [DDP(2), ZeRO(1, 4), FSDP(2), FSDP(4), FSDP(2, reshard_after_forward=False),
           FSDP(4, param_dtype=torch.bfloat16), FSDP(2, reshard_after_forward=False, param_dtype=torch.bfloat16),
           ZeRO(2, 2), ZeRO(2, 4)]


def nested_units(model):
    """Each transformer block and, inside it, its MLP: nested FSDP units."""
    return [*model.blocks, *(block.mlp for block in model.blocks)]


CASES = [(name, layout) for name in ("mlp", "transformer") for layout in LAYOUTS] + [
    ("transformer", FSDP(2, wrap=nested_units)),
    ("transformer", FSDP(4, wrap=nested_units, param_dtype=torch.bfloat16))]


def main() -> None:
    from pytest_gpumem import measure_parallel_step

    out = {}
    for name, layout in CASES:
        model, optimizer, batch, target, loss = case(name)
        result = measure_parallel_step(model, optimizer, batch, target=target, loss_fn=loss, parallel=layout,
                                       backend="cpu", timeout=120)
        out[case_id(name, layout)] = result.to_dict()
    sys.stdout.write("\n" + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
