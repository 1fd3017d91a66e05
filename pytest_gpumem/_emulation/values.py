"""Real values beside meta tensors, so data-dependent code runs on the emulated backend.

Meta tensors carry shapes, not values; yet training code reads values: a padded ``attention_mask``
decides whether a 4-d mask is built (``mask.all()``), labels are compared with ``-100``, optimizers
read norms with ``.item()``. :class:`KnownValues` is a dispatch mode that keeps, for some meta tensors,
a real CPU tensor holding their value:

- **seeded**: integer and bool batch tensors (token ids, masks, labels), small float batch tensors
  (boxes), 0-d tensors, integer/bool buffers (position ids) — :meth:`KnownValues.remember`;
- **computed**: an op whose every tensor input has a value (CPU tensors are their own) gets its
  outputs' values by running the same op on the values on the CPU, when the outputs hold at most
  :data:`VALUE_LIMIT` elements; random ops draw from the mode's own generator when their output is
  integer, bool or small (``torch.randint`` labels on ``gpumem.device``), else have no value, and
  ``empty`` never has one; in-place ops update
  the values (views of a value alias it as the meta views alias their base);
- **unknown**: everything derived from parameters, activations or gradients.

The meta op always runs as before, so the tracker sees exactly the same storages and sizes.

Unknown values follow one policy (see :func:`neutral_reads`): a read whose answer cannot change
memory (``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``) is answered as if every unknown
element were 1 (True): comparisons and finiteness tests on unknown tensors are evaluated that way, so
``torch.isfinite(x).all()`` is True and ``isnan``/``isinf`` are False. Each such read becomes a note
naming the op and the code line. Where the value decides a shape, two policies:

- **upper bound** for selections (``nonzero``, ``torch.where(cond)``, boolean-mask indexing, ``masked_select``,
  torchvision's ``nms``): every element is assumed selected and every box kept, the largest result each such
  op can give (detectors cap what follows at ``post_nms_top_n`` / ``batch_size_per_image``). It bounds each
  selection, and the step in the usual case where later memory grows with what was kept; exclusive
  selections (one ``where`` per FPN level) each get everything. The selected indices become known values
  (so ``zeros_like(m); m[idx] = 1; where(m)`` stays exact), and a note names the op, the line and that the
  figure is an upper bound;
- **fail** where no bound exists (``unique``, ``repeat_interleave`` with tensor repeats): it raises
  :class:`UnknownValueError` naming the op, the line and the way out (``backend="cpu"``).

``*_like`` and ``new_*`` factories (``zeros_like(scores, dtype=uint8)``) take their value from the shape alone
when the result is integer, bool or small (never a parameter-sized ``zeros_like`` of optimizer state).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import sparse_ops  # noqa: F401  (registers the sparse COO handlers)
from .value_ops import _SPECIAL, META, UPPER_BOUNDS, _is_meta, _shape_from_values, _to_cpu_device, aten
from .value_sites import NoMetaKernelError, UnknownValueError, user_site

__all__ = ["KnownValues", "NoMetaKernelError", "UnknownValueError", "VALUE_LIMIT", "SEED_FLOAT_LIMIT", "user_site"]


#: most elements an op's outputs may hold for their values to be computed (16 Mi: a 4096 x 4096 mask)
VALUE_LIMIT = 1 << 24
#: storages with valued tensors remembered before dead ones are swept from the alias index
_MAX_STORAGES = 4096
#: float batch tensors up to this many elements keep their values (boxes, scalars; not images)
SEED_FLOAT_LIMIT = 4096


class _TensorTable:
    """A mapping keyed by tensor identity that forgets a tensor when it dies (cheap lookups by id)."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    @property
    def ids(self) -> dict[int, tuple[weakref.ref, Any]]:
        """id(tensor) -> entry, for membership tests on the hot path (entries leave when tensors die)."""
        return self._entries

    def __setitem__(self, t: torch.Tensor, value: Any) -> None:
        ident, entries = id(t), self._entries

        def forget(ref: weakref.ref) -> None:
            entry = entries.get(ident)
            if entry is not None and entry[0] is ref:
                del entries[ident]

        entries[ident] = (weakref.ref(t, forget), value)

    def get(self, t: torch.Tensor, default: Any = None) -> Any:
        entry = self._entries.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else default

    def __contains__(self, t: torch.Tensor) -> bool:
        entry = self._entries.get(id(t))
        return entry is not None and entry[0]() is t

    def __getitem__(self, t: torch.Tensor) -> Any:
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t:
            raise KeyError("tensor has no entry")
        return entry[1]

    def pop(self, t: torch.Tensor, default: Any = None) -> Any:
        value = self.get(t, default)
        if t in self:
            del self._entries[id(t)]
        return value

    def __len__(self) -> int:
        return len(self._entries)


_Tensor = torch.Tensor


def _metas(tree: Any, found: list | None = None) -> list:
    """The meta tensors among the leaves of nested tuples, lists and dict values (hot path: kept plain)."""
    if found is None:
        found = []
    kind = type(tree)
    if kind is tuple or kind is list:
        for x in tree:
            k = type(x)
            if k is tuple or k is list or k is dict:
                _metas(x, found)
            elif isinstance(x, _Tensor) and x.is_meta:
                found.append(x)
    elif kind is dict:
        _metas(list(tree.values()), found)
    elif isinstance(tree, _Tensor) and tree.is_meta:
        found.append(tree)
    return found


def _numel(outs: list) -> int:
    return sum(t.numel() for t in outs if isinstance(t, torch.Tensor))


_NO_VALUE_PREFIXES = ("empty", "new_empty", "resize", "set_", "_foreach_", "record_stream", "_has_compatible")
#: in-place ops that overwrite their destination whole: its old value is not needed
_OVERWRITE = frozenset({aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default, aten.copy_.default})
#: ops whose output value depends on their input's shape and dtype only (``zeros_like(scores)``: a mask to fill)
_SHAPE_ONLY = frozenset({
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.new_zeros.default,
    aten.new_ones.default, aten.new_full.default,
})
#: reductions that keep a constant (a fill) constant
_FILL_REDUCTIONS = frozenset({
    aten.all.default, aten.all.dim, aten.any.default, aten.any.dim, aten.amax.default, aten.amin.default,
    aten.max.default, aten.min.default, aten.all.dims, aten.any.dims,
})


class _OpInfo:
    """What the mode needs to know of an op, computed once per op."""

    __slots__ = ("mutated", "random", "seedable", "no_value", "pointwise", "tensor_positions", "tensor_names")

    def __init__(self, func: Any) -> None:
        schema = func._schema
        #: where tensors (or lists of them) can appear among the arguments
        self.tensor_positions = tuple(i for i, a in enumerate(schema.arguments) if "Tensor" in str(a.type))
        self.tensor_names = frozenset(a.name for a in schema.arguments if "Tensor" in str(a.type))
        self.mutated = tuple(i for i, a in enumerate(schema.arguments)
                             if a.alias_info is not None and a.alias_info.is_write)
        tags = getattr(func, "tags", ())
        self.random = torch.Tag.nondeterministic_seeded in tags
        #: random ops drawn from the mode's own generator (never the user's global RNG) when their output is
        #: integer, bool or small: labels and ids made with torch.randint on gpumem.device, randperm samplers
        self.seedable = self.random
        name = func.__name__.split(".")[0]
        self.no_value = name.startswith(_NO_VALUE_PREFIXES)
        self.pointwise = torch.Tag.pointwise in tags


class KnownValues(TorchDispatchMode):
    """Keeps real CPU values beside meta tensors whose values are known; answers reads from them.

    Enter it above the storage tracker (pushed after it): the meta op runs below, so every storage
    the tracker sees is one the step would allocate on CUDA; the CPU values are invisible to it.
    """

    def __init__(self, limit: int = VALUE_LIMIT) -> None:
        super().__init__()
        self.limit = limit
        self._values = _TensorTable()  # meta tensor -> CPU tensor
        self._fills = _TensorTable()   # meta tensor -> assumed constant
        self._sparse = _TensorTable()  # sparse COO meta tensor -> the CPU value of its indices
        self._sharing: dict[int, dict[int, Any]] = {}  # id(meta storage) -> {id(tensor): weakref}
        self._ops: dict[Any, _OpInfo] = {}
        self._draws = 0  #: seeds random ops drawn for values, in order (deterministic across runs)
        #: one line per (op, code line) where an unknown value was read and answered with a neutral one
        self.notes: list[str] = []
        self._noted: set[tuple[str, str]] = set()

    # -- the table ---------------------------------------------------------------------------
    def remember(self, meta: torch.Tensor, value: torch.Tensor, *, owned: bool = False) -> None:
        """Record that ``meta`` holds ``value`` (a CPU tensor of the same shape and dtype).

        A value the caller still holds (the user's batch or buffer) is copied, so in-place ops on the meta
        tensor never write into it; ``owned`` values (computed here) are kept as they are, views included.
        """
        if not _is_meta(meta) or meta.layout != torch.strided or value.shape != meta.shape:
            return
        value = value.detach()
        if value.device.type != "cpu" or value.dtype != meta.dtype:
            value = value.to("cpu", meta.dtype)
        elif not owned:
            value = value.clone()
        self._values[meta] = value
        if len(self._sharing) >= _MAX_STORAGES:  # a long loop: forget storages whose tensors all died
            self._sharing = {k: refs for k, refs in self._sharing.items() if any(r() is not None for r in refs.values())}
        self._sharing.setdefault(id(meta.untyped_storage()), {})[id(meta)] = weakref.ref(meta)

    def remember_sparse_indices(self, sparse: torch.Tensor, indices: torch.Tensor) -> None:
        """Record the value of a sparse COO meta tensor's indices (embedding ids: how many are distinct)."""
        self._sparse[sparse] = indices.detach().to("cpu", torch.long)

    def sparse_indices(self, sparse: torch.Tensor) -> torch.Tensor | None:
        """The known indices of a sparse COO meta tensor (None when unknown)."""
        return self._sparse.get(sparse)

    def value_of(self, t: torch.Tensor) -> torch.Tensor | None:
        """The known CPU value of meta tensor ``t`` (None when unknown)."""
        return self._values.get(t)

    @staticmethod
    def worth_seeding(t: torch.Tensor) -> bool:
        """Batch and buffer tensors whose values are kept: integer, bool, 0-d and small float ones."""
        if t.layout != torch.strided or t.is_complex():
            return False
        if t.dim() == 0 or not t.is_floating_point():
            return True
        return t.numel() <= SEED_FLOAT_LIMIT

    def _forget_storage(self, t: torch.Tensor) -> None:
        try:
            sharing = self._sharing.pop(id(t.untyped_storage()), None)
        except (RuntimeError, NotImplementedError):
            return
        for ref in (sharing or {}).values():
            tensor = ref()
            if tensor is not None:
                self._values.pop(tensor, None)
        self._fills.pop(t, None)

    def _info(self, func: Any) -> _OpInfo:
        info = self._ops.get(func)
        if info is None:
            info = self._ops[func] = _OpInfo(func)
        return info

    # -- dispatch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(self, func, args, kwargs)
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as exc:
            if isinstance(exc, (NoMetaKernelError, UnknownValueError)):
                raise
            if "data-dependent" in str(exc):  # torchvision's nms & co: run on the values when they are known
                bound = UPPER_BOUNDS.get(str(func))
                if bound is not None and not self._all_known(args, kwargs):
                    return bound(self, func, args, kwargs)
                return _shape_from_values(str(func))(self, func, args, kwargs)
            if isinstance(exc, NotImplementedError) and "Meta" in str(exc):
                raise NoMetaKernelError(
                    f"{func} has no meta kernel, so the emulated backend cannot run it; called at {user_site()}. "
                    "Measure this step with backend='cpu', or keep this op out of the measured step.") from exc
            raise
        self._propagate(func, args, kwargs, out)
        return out

    def _propagate(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Give ``out`` the values of running ``func`` on the inputs' values, or forget stale ones."""
        if isinstance(out, _Tensor):
            metas_out = [out] if out.is_meta else []
        else:
            metas_out = _metas(out)
        info = self._info(func)
        if not metas_out and not info.mutated:
            return
        metas_in: list = []
        for i in info.tensor_positions:
            if i < len(args):
                arg = args[i]
                if isinstance(arg, _Tensor):
                    if arg.is_meta:
                        metas_in.append(arg)
                elif arg is not None:
                    _metas(arg, metas_in)
        for name, arg in kwargs.items():
            if name in info.tensor_names:
                _metas(arg, metas_in)
        values, fills = self._values.ids, self._fills.ids  # a dead tensor's id leaves these at once
        if func in _SHAPE_ONLY:
            self._from_shape(func, args, kwargs, out)
            return
        if metas_in and not any(id(t) in values for t in metas_in):  # the common case: parameter-derived data
            for i in info.mutated:
                if i < len(args) and _is_meta(args[i]):
                    self._forget_storage(args[i])
            if metas_out and not info.random and ((info.pointwise and metas_out[0].dtype is torch.bool)
                                                  or (fills and any(id(t) in fills for t in metas_in))):
                self._assume(func, info, args, kwargs, metas_out)
            return
        unknown = [t for t in metas_in if id(t) not in values]
        if info.mutated and func in _OVERWRITE and len(unknown) == 1 and unknown[0] is args[0]:
            unknown = []  # the destination's old value is overwritten whole
            self.remember(args[0], torch.empty_strided(args[0].shape, args[0].stride(), dtype=args[0].dtype),
                          owned=True)
        random_unknown = info.random and not (info.seedable and all(map(self.worth_seeding, metas_out)))
        if unknown or random_unknown or info.no_value or _numel(metas_out) > self.limit:
            for i in info.mutated:
                if i < len(args) and _is_meta(args[i]):
                    self._forget_storage(args[i])
            if unknown and not info.random:
                self._assume(func, info, args, kwargs, metas_out)
            return
        self._compute(func, args, kwargs, out)

    def _compute(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        def value(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return self._values[x] if x.is_meta else x
            return _to_cpu_device(x)

        try:
            if self._info(func).random:  # the CPU generator's state is put back: the user's RNG never moves
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(self._draws)
                    self._draws += 1
                    result = func(*tree_map(value, args), **tree_map(value, kwargs))
            else:
                result = func(*tree_map(value, args), **tree_map(value, kwargs))
        except Exception:  # an op the CPU does not run for these dtypes: the values stay unknown
            for i in self._info(func).mutated:
                if i < len(args) and _is_meta(args[i]):
                    self._forget_storage(args[i])
            return
        metas, _ = tree_flatten(out)
        values, _ = tree_flatten(result)
        if len(metas) != len(values):
            return
        for m, v in zip(metas, values):
            if _is_meta(m) and isinstance(v, torch.Tensor) and v.shape == m.shape and v.dtype == m.dtype:
                self.remember(m, v, owned=True)

    def _from_shape(self, func: Any, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        """The value of a ``*_like`` / ``new_*`` factory: the same op on a CPU stand-in of the input."""
        source = args[0]
        if not _is_meta(out) or out.numel() > self.limit or not self.worth_seeding(out):
            return  # integer/bool masks and small tensors only: never a parameter-sized optimizer state
        stand_in = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype)
        cpu_kwargs = {k: _to_cpu_device(v) for k, v in kwargs.items()}
        self.remember(out, func(stand_in, *args[1:], **cpu_kwargs), owned=True)

    def _assume(self, func: Any, info: _OpInfo, args: tuple, kwargs: dict, metas_out: list) -> None:
        """Evaluate comparisons and finiteness tests as if unknown elements were 1 (kept as constants)."""
        if len(metas_out) != 1:
            return
        target = metas_out[0]
        flat_in, spec = tree_flatten((args, kwargs))
        if func in _FILL_REDUCTIONS:
            source = flat_in[0]
            if _is_meta(source) and source in self._fills:
                self._fills[target] = self._fills[source]
            elif _is_meta(source) and source.dtype is torch.bool:
                self._fills.pop(target, None)
            return
        if not info.pointwise:
            return
        has_fill = any(_is_meta(t) and t in self._fills for t in flat_in)
        if target.dtype is not torch.bool and not has_fill:
            return  # a number computed from ones: it reads as 1 anyway
        scalars = []
        for x in flat_in:
            if isinstance(x, torch.Tensor):
                if x.device.type == "meta":
                    known = self._values.get(x)
                    if known is not None:
                        if known.numel() != 1:
                            return
                        scalars.append(known.reshape(()))
                        continue
                    scalars.append(torch.tensor(self._fills.get(x, 1), dtype=x.dtype))
                elif x.numel() == 1:
                    scalars.append(x.reshape(()))
                else:
                    return
            else:
                scalars.append(_to_cpu_device(x))
        a, k = tree_unflatten(scalars, spec)
        try:
            result = func(*a, **k)
        except Exception:
            return
        if isinstance(result, torch.Tensor) and result.numel() == 1:
            self._fills[target] = result.item()

    # -- reads -------------------------------------------------------------------------------
    def read(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """The value of ``t`` for a read: known, or the neutral assumption (noted)."""
        known = self._values.get(t)
        if known is not None:
            return known
        fill = self._fills.get(t, 1)
        site = user_site()
        if (op, site) not in self._noted:
            self._noted.add((op, site))
            self.notes.append(
                f"{op} read a value the emulated backend does not know (computed from parameters, activations "
                f"or gradients) at {site}; answered as if its elements were {fill!r} (a neutral value: memory "
                "is assumed not to depend on it)"
            )
        neutral = torch.full((), fill, dtype=t.dtype)
        # a large read (logits.cpu()) gets a broadcast view, not gigabytes of host memory
        return neutral.expand(t.shape) if t.numel() > self.limit else neutral.expand(t.shape).clone()

    def _all_known(self, args: tuple, kwargs: dict) -> bool:
        """Whether every meta tensor among the arguments has a known value."""
        return all(t in self._values for t in _metas([list(args), kwargs]))

    def upper_bound(self, op: str, assumption: str) -> None:
        """Note (once per op and code line) that a shape was decided by an unknown value, taken at its maximum."""
        site = user_site()
        if (op, site) in self._noted:
            return
        self._noted.add((op, site))
        self.notes.append(
            f"{op} at {site} decides a shape from values the emulated backend does not know (computed from "
            f"parameters, activations or gradients): {assumption}; the figures are an upper bound for this op, "
            "and a real GPU keeps fewer (measure with backend='cpu' for the figure on these values)")

    def need(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """The value of ``t`` where it decides a shape: known, else UnknownValueError."""
        known = self._values.get(t) if _is_meta(t) else t
        if known is not None:
            return known
        raise UnknownValueError(
            f"{op} at {user_site()} needs the values of a tensor computed from parameters, activations or "
            "gradients, and its output shape depends on them; the emulated backend has shapes only (meta "
            "tensors). Measure this step with backend='cpu', or keep this code out of the measured step."
        )

    def _meta_like(self, value: torch.Tensor) -> torch.Tensor:
        """A meta tensor for ``value`` (allocated below this mode, so the tracker sees it), remembered."""
        meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=META)
        self.remember(meta, value, owned=True)
        return meta
