"""Gloo ranks measured in a fresh interpreter, for tests/test_parallel_gloo.py (run as a script; prints JSON).

A process that has started autograd's device threads (a CUDA backward, an emulated FSDP2 step: other tests in
the same xdist worker) cannot fork ranks that run backward, so the measurements happen here, in a process
that has done nothing else. Output: one JSON object on the last line of stdout.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch import nn

from pytest_gpumem import DDP, FSDP, ZeRO, measure_parallel_step
from pytest_gpumem._measure.step import StepFailed

CASES = [DDP(2), DDP(2, gradient_as_bucket_view=True), FSDP(2), ZeRO(1, 2), ZeRO(2, 2), FSDP(4), ZeRO(1, 4),
         FSDP(2, param_dtype=torch.bfloat16)]


def uneven() -> nn.Module:
    """dim 0 of 7 and 3 rows: padded on 2 ranks (7 -> 4+4) and on 4 ranks (7 -> 2x4, 3 -> 1x4); a LayerNorm too."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.LayerNorm(3))


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def children() -> list[int]:
    """Processes whose parent is this one (Linux /proc; empty elsewhere), zombies excluded."""
    me, found = os.getpid(), []
    if not os.path.isdir("/proc"):
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                found.append(int(entry))
    return found


def _failure(loss, timeout: float) -> dict:
    model = uneven()
    started = time.monotonic()
    try:
        measure_parallel_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 5), parallel=DDP(2),
                              backend="cpu", loss_fn=loss, timeout=timeout)
        message = None
    except StepFailed as exc:
        message = str(exc)
    return {"message": message, "seconds": time.monotonic() - started, "children": children()}


def _raising_loss(output, target):
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("rank one's own error")
    return output.sum()


def _slow_loss(output, target):
    if torch.distributed.get_rank() == 0:
        time.sleep(60)
    return output.sum()


def _fsdp_internals() -> dict:
    """The private FSDP2 / DTensor internals pytest_gpumem._compat reads, on a one-rank gloo group."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from pytest_gpumem import _compat

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), 1), rank=0, world_size=1)
        try:
            model = nn.Linear(4, 3)
            fully_shard(model)
            local = _compat.dtensor_local(model.weight)
            before = len(_compat.fsdp_unsharded_params(model))
            model(torch.ones(2, 4)).sum().backward()
            after = _compat.fsdp_unsharded_params(model)
            return {"local_shape": list(local.shape) if local is not None else None,
                    "local_is_plain": type(local) is torch.Tensor, "unsharded_before": before,
                    "unsharded_after": [list(t.shape) for t in after]}
        finally:
            dist.destroy_process_group()


def _measured(strategy) -> dict:
    """One measurement of ``strategy`` on the uneven model, as a dict."""
    model = uneven()
    return measure_parallel_step(model, adam(model), torch.randn(8, 5), parallel=strategy, backend="cpu",
                                 timeout=120).to_dict()


#: runs of one sharded step for the repeat check: before the ranks settled their collectives, gloo's worker thread
#: freed a staged reduce-scatter copy after the rank's next allocations in about 1 run in 3 of this step (a rank's
#: backward peak 6,135,688 B instead of 5,644,168 B), so 6 runs caught it with a chance of 1 - (2/3)^6, 91%
REPEATS = 6


def _repeated() -> list[dict]:
    """The MLP of parallel_layout_cases on FSDP(2), REPEATS times: every rank's report, as dicts."""
    from parallel_layout_cases import case

    runs = []
    for _ in range(REPEATS):
        model, optimizer, batch, target, loss = case("mlp")
        runs.append(measure_parallel_step(model, optimizer, batch, target=target, loss_fn=loss, parallel=FSDP(2),
                                          backend="cpu", timeout=120).to_dict())
    return runs


def main() -> None:
    runs = [_measured(strategy) for strategy in CASES]
    out = {"runs": runs, "repeats": _repeated(), "raises": _failure(_raising_loss, 60),
           "timeout": _failure(_slow_loss, 3)}
    out["compat"] = _fsdp_internals()  # last: FSDP2 in this process would keep it from forking ranks again
    sys.stdout.write("\n" + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
