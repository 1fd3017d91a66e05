"""How a training step is spread over ranks: DDP, FSDP (FSDP2 ``fully_shard``) and ZeRO stage 1 or 2.

Frozen, typed descriptions checked when built; nothing here imports torch (the ``gpu_budget`` marker may
hold one at collection time). What each maps to in torch, and where that differs from DeepSpeed's ZeRO,
is written on each class and in the README (Data-parallel and sharded training).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

#: what ``FSDP(wrap=...)`` accepts, in words (the error names it)
WRAP_ACCEPTED = ("None (the default rule: every element of a ModuleList, else every direct child holding parameters, "
                 "then the root), a module class or tuple of classes (each instance is sharded, then the root), or a "
                 "callable model -> iterable of submodules")


def _check_world_size(owner: str, world_size: Any) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"{owner}(world_size={world_size!r}): world_size must be a whole number >= 1 "
                        f"(ranks, one per GPU), got {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"{owner}(world_size={world_size}): world_size must be >= 1 (ranks, one per GPU)")


def _check_flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}({name}={value!r}): expected True or False, got {type(value).__name__}")


def _check_dtype(owner: str, name: str, value: Any) -> None:
    if value is None:
        return
    import torch  # a dtype was given, so torch is imported already

    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{owner}({name}={value!r}): expected None (keep the parameters' dtype) or a floating "
                        "torch.dtype such as torch.bfloat16")


@dataclass(frozen=True)
class Strategy:
    """A data-parallel or sharded layout of the step over ``world_size`` ranks (the budget is per rank)."""

    #: marks strategy objects for the marker's duck-typed check (``_core`` does not import this room)
    gpumem_strategy: ClassVar[bool] = True
    #: the name in reports, JSON and baselines
    name: ClassVar[str] = ""

    world_size: int

    def settings(self) -> dict[str, Any]:
        """Every field but world_size, as plain JSON values."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, "world_size": self.world_size, **self.settings()}

    def describe(self) -> str:
        """'FSDP(world_size=2, reshard_after_forward=True)': the strategy in words, for reports."""
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "strategy")
        return f"{self.name}({fields})"


@dataclass(frozen=True)
class DDP(Strategy):
    """``torch.nn.parallel.DistributedDataParallel``: every rank holds the whole model, gradients are
    all-reduced in buckets of ``bucket_cap_mb`` MiB (torch's 25 MiB default). With
    ``gradient_as_bucket_view=False`` the buckets are buffers beside ``.grad`` (a second copy of every
    gradient); with True the ``.grad`` tensors are views into them."""

    name: ClassVar[str] = "DDP"

    bucket_cap_mb: float = 25
    gradient_as_bucket_view: bool = False

    def __post_init__(self) -> None:
        _check_world_size("DDP", self.world_size)
        cap = self.bucket_cap_mb
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0 or cap == float("inf"):
            raise ValueError(f"DDP(bucket_cap_mb={cap!r}): expected a finite number of MiB > 0 (torch's default 25)")
        _check_flag("DDP", "gradient_as_bucket_view", self.gradient_as_bucket_view)

    def settings(self) -> dict[str, Any]:
        return {"bucket_cap_mb": self.bucket_cap_mb, "gradient_as_bucket_view": self.gradient_as_bucket_view}


@dataclass(frozen=True)
class FSDP(Strategy):
    """FSDP2: ``torch.distributed.fsdp.fully_shard`` on each unit ``wrap`` picks, then on the root.

    Each parameter is sharded on dim 0 (padded up to a multiple of world_size); a unit's parameters are
    all-gathered before its forward and backward and freed after them (``reshard_after_forward=False``
    keeps them from forward to backward, torch's SHARD_GRAD_OP). ``param_dtype``/``reduce_dtype`` are
    ``MixedPrecisionPolicy``'s: unsharded parameters and gradient reduction in that dtype, the sharded
    parameters (the optimizer's) stay in the model's dtype.
    """

    name: ClassVar[str] = "FSDP"

    reshard_after_forward: bool = True
    param_dtype: Any = None   #: torch.dtype or None
    reduce_dtype: Any = None  #: torch.dtype or None
    #: which submodules become FSDP units (see WRAP_ACCEPTED); the root is always one
    wrap: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_world_size("FSDP", self.world_size)
        _check_flag("FSDP", "reshard_after_forward", self.reshard_after_forward)
        _check_dtype("FSDP", "param_dtype", self.param_dtype)
        _check_dtype("FSDP", "reduce_dtype", self.reduce_dtype)
        wrap = self.wrap
        classes = wrap if isinstance(wrap, tuple) else (wrap,)
        if not (wrap is None or callable(wrap) and not isinstance(wrap, type)
                or classes and all(isinstance(c, type) for c in classes)):
            raise TypeError(f"FSDP(wrap={wrap!r}): expected {WRAP_ACCEPTED}")

    def settings(self) -> dict[str, Any]:
        return {
            "reshard_after_forward": self.reshard_after_forward,
            "param_dtype": _dtype_name(self.param_dtype),
            "reduce_dtype": _dtype_name(self.reduce_dtype),
            "wrap": _wrap_name(self.wrap),
        }


@dataclass(frozen=True)
class ZeRO(Strategy):
    """ZeRO stage 1 or 2 as torch builds it.

    Stage 1: DDP plus ``torch.distributed.optim.ZeroRedundancyOptimizer`` (each rank keeps the optimizer
    state of whole parameters assigned to it, balanced by size; DeepSpeed shards a flat buffer element-wise).
    Stage 2: torch has no ZeRO-2 class; this is FSDP2 with ``reshard_after_forward=False`` (SHARD_GRAD_OP,
    which torch calls ZeRO-2-like): gradients and optimizer state sharded, and, unlike DeepSpeed, the
    parameters too between steps (gathered once per step, kept from forward to backward).
    """

    name: ClassVar[str] = "ZeRO"

    stage: int = 1
    world_size: int = 1  # type: ignore[misc]  (keyword order: ZeRO(stage, world_size))

    def __init__(self, stage: int, world_size: int) -> None:
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "world_size", world_size)
        self.__post_init__()

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or self.stage not in (1, 2):
            raise ValueError(f"ZeRO(stage={self.stage!r}): expected 1 (sharded optimizer state) or 2 (sharded "
                             "gradients and optimizer state); stage 3 is FSDP(world_size=...)")
        _check_world_size("ZeRO", self.world_size)

    def settings(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def __repr__(self) -> str:
        return f"ZeRO(stage={self.stage!r}, world_size={self.world_size!r})"

    def as_fsdp(self) -> FSDP:
        """Stage 2 as torch runs it: FSDP2 that keeps parameters unsharded from forward to backward."""
        return FSDP(self.world_size, reshard_after_forward=False)


STRATEGIES: tuple[type[Strategy], ...] = (DDP, FSDP, ZeRO)


def check_strategy(value: Any, where: str = "parallel") -> Strategy:
    """``value`` when it is a strategy; TypeError naming what was given and what is accepted."""
    if isinstance(value, Strategy):
        return value
    raise TypeError(f"{where}={value!r}: expected DDP(world_size=...), FSDP(world_size=...) or "
                    "ZeRO(stage=1|2, world_size=...) from pytest_gpumem")


def strategy_from_dict(data: dict[str, Any]) -> Strategy:
    """The strategy of ``to_dict()`` (dtypes by name; a custom ``wrap`` is not restored)."""
    kind = data.get("strategy")
    if kind == "DDP":
        return DDP(int(data["world_size"]), data.get("bucket_cap_mb", 25), bool(data.get("gradient_as_bucket_view")))
    if kind == "ZeRO":
        return ZeRO(int(data["stage"]), int(data["world_size"]))
    if kind == "FSDP":
        return FSDP(int(data["world_size"]), bool(data.get("reshard_after_forward", True)),
                    _dtype_of(data.get("param_dtype")), _dtype_of(data.get("reduce_dtype")))
    raise ValueError(f"unknown strategy {kind!r} (expected DDP, FSDP or ZeRO)")


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _dtype_of(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _wrap_name(wrap: Any) -> str | None:
    if wrap is None:
        return None
    if isinstance(wrap, tuple):
        return ",".join(c.__name__ for c in wrap)
    return getattr(wrap, "__qualname__", None) or type(wrap).__name__


def units_by_class(classes: Iterable[type]) -> Callable[[Any], list[Any]]:
    """A ``wrap`` callable sharding every instance of ``classes`` (the tuple form, spelled as a function)."""
    wanted = tuple(classes)
    return lambda model: [m for m in model.modules() if isinstance(m, wanted) and m is not model]
