"""``measure_parallel_step``: one training step spread over ranks, measured per rank, checked before it runs.

The batch given is the global batch: each rank takes its slice of dim 0 (what a DistributedSampler
with the same per-rank batch size hands it), so the world size must divide every batched tensor's dim 0.
"""
from __future__ import annotations

from typing import Any

from .._core.parallel import ParallelReport
from .._measure.step import LossFn, check_step_arguments, needs_closure
from .runners import DEFAULT_TIMEOUT_S, ParallelStep, parallel_backend, runner_for
from .strategies import FSDP, ZeRO, Strategy, check_strategy


def measure_parallel_step(
    model: Any,
    optimizer: Any,
    batch: Any,
    *,
    parallel: Strategy,
    loss_fn: LossFn | None = None,
    target: Any = None,
    steps: int = 2,
    backend: str | None = "auto",
    set_to_none: bool = True,
    autocast_dtype: Any = None,
    scaler: Any = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    device: Any = None,
) -> ParallelReport:
    """Run ``steps`` training steps of ``model`` laid out by ``parallel`` on every rank; report each rank.

    ``backend='cpu'`` runs ``world_size`` real processes with gloo (the ground truth without GPUs),
    ``'emulated'`` predicts what each CUDA rank would hold, ``'auto'`` picks emulated when available. The
    user's model, optimizer and batch are never changed: ranks work on their own copies. ``device`` names the
    GPU the emulated ranks predict ('H100', a DeviceProfile), as ``measure_step``'s emulated backend takes it.
    """
    __tracebackhide__ = True
    strategy = check_strategy(parallel)
    check_step_arguments(model, optimizer, steps)
    check_parallel_arguments(model, optimizer, strategy, (batch, target), scaler)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout={timeout!r}: expected seconds > 0 for the whole distributed step")
    step = ParallelStep(model, optimizer, batch, strategy, loss_fn, target, steps, set_to_none, autocast_dtype,
                        scaler, float(timeout), device)
    reports = runner_for(parallel_backend(backend))(step)
    return ParallelReport(strategy.to_dict(), tuple(reports))


def check_parallel_arguments(model: Any, optimizer: Any, strategy: Strategy, batch: Any, scaler: Any) -> None:
    """ValueError before anything runs for a layout the step cannot take, naming what and why."""
    __tracebackhide__ = True
    shards = isinstance(strategy, (FSDP, ZeRO))
    if shards and needs_closure(optimizer):
        raise ValueError(
            f"{strategy.describe()} cannot shard {type(optimizer).__name__}: its step takes a closure and keeps "
            "state over all parameters together (a history of whole-model vectors), so each rank cannot update "
            "only its shard; use an element-wise optimizer (SGD, Adam, AdamW, ...) or DDP")
    if shards and type(optimizer).__name__ == "ZeroRedundancyOptimizer":
        raise ValueError(f"{strategy.describe()} shards the optimizer itself: pass the plain optimizer "
                         "(e.g. torch.optim.AdamW(model.parameters())), not a ZeroRedundancyOptimizer")
    if scaler is not None and scaler is not False:
        raise ValueError(f"scaler= is not supported with parallel= yet ({strategy.describe()}); FSDP needs "
                         "torch's ShardedGradScaler: measure without a scaler (bf16 autocast needs none)")
    check_batch_divides(batch, strategy.world_size)


def check_batch_divides(batch: Any, world_size: int) -> None:
    """Every batched tensor's dim 0 splits evenly over the ranks; ValueError naming the tensor and its size."""
    from .._core.tensors import tensors_in

    for index, tensor in enumerate(tensors_in(batch)):
        if tensor.dim() == 0:
            continue  # a scalar goes to every rank as it is
        rows = tensor.shape[0]
        if rows % world_size:
            raise ValueError(
                f"world_size={world_size} does not divide the global batch: tensor {index} of the batch "
                f"(shape {tuple(tensor.shape)}) has {rows} rows on dim 0, and each rank takes an equal slice of "
                f"dim 0; use a batch of a multiple of {world_size} rows (e.g. {rows - rows % world_size or world_size}) "
                "or another world_size")
