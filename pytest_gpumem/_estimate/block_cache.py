"""Trace each distinct repeated block once: a 32-layer transformer runs one block's meta kernels, not 32.

While the estimate traces a model on meta tensors, a module that occurs more than once with the same
structure (class, attributes, parameter shapes, recursively) is a *block*. Its first call with a given
*signature* (the block's structure plus its inputs' shapes, strides, dtypes, aliasing and
``requires_grad``, plus grad mode and autocast state) runs for real and is kept as a :class:`Template`:
the calls it made, the tensors each call saved, and, for every storage involved, where it came from (an
input, a parameter or buffer by name, a storage the call created, or one that existed before). A later
call with the same signature is *replayed*: calls and saves are copied with the block's own modules and
parameters, and created storages are fresh meta storages of the same sizes, so deduplication by
storage works exactly as if the block had run. Saved bytes are shapes only, so replay is exact as long as
the block's forward depends on nothing outside its signature (a global flag read in ``forward`` is not
seen; turn reuse off with ``estimate_step(..., reuse_blocks=False)`` for such models).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn
from .._core.tensors import tensors_in as _tensors_in
from .storages import held_by
from .._compat import (MODULE_CHILDREN_DICT, MODULE_TENSOR_DICTS, TorchDispatchMode, forward_hook_counts, storage_key,
                       tree_flatten, tree_map, tree_unflatten)

META = torch.device("meta")


class BlockTracer(Protocol):
    """What the block cache reads and extends of the trace's recorder (``trace._Tracer``)."""

    calls: list[Any]                      #: call records, in call order
    stack: list[int]                      #: indices of the calls running now
    order: list[tuple[int, torch.Tensor]]  #: (call index, saved tensor) in save order
    save_ops: list[int]                   #: per ``order`` entry, the op that saved it
    uses: list[tuple[int, torch.Tensor, int]]  #: (op, tensor, how it was used)
    ops: int                              #: ops run so far
    passthrough: set[int]                 #: ops whose backward hands the grad on unchanged
    scratch: dict[int, tuple[int, ...]]   #: op -> bytes its backward allocates and frees (attention scratch)
    paused: bool                          #: set while a replay makes its own tensors
    #: id(object) -> (the object, tensors a replayed block left in it): a KV cache the block updated
    side_held: dict[int, tuple[Any, list[torch.Tensor]]]

    def new_call(self, **fields: Any) -> Any: ...

    def new_region(self) -> int: ...
_PRIMITIVES = (int, float, str, bool, type(None), torch.dtype, torch.device)
#: attributes every nn.Module has (hook dicts, registries); they say nothing about what forward computes
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
#: attributes that say only where a block sits, not what it computes: Hugging Face's ``layer_idx`` picks the
#: layer's KV-cache slot (per-layer behaviour such as sliding windows is set as attributes of its own, which
#: the signature keeps). Without this no decoder layer of a transformers model is ever replayed. A forward
#: that branches on ``layer_idx`` itself needs ``estimate_step(..., reuse_blocks=False)``.
_POSITION_ONLY = frozenset({"layer_idx"})


def _key(t: torch.Tensor) -> int:
    return storage_key(t)


def _value_signature(v: Any, depth: int = 0, path: str = "") -> Any:
    """Primitives and plain containers of them by value, anything else by identity (shared objects stay shared).

    Containers (tuple, list, dict with primitive keys, set) are compared by value a few levels deep: peft's LoRA
    layers hold ``lora_alpha = {"default": 16}`` and empty cache dicts, each layer its own, equal in value. A
    string naming the module's own place (``path``, the module's dotted path, or a tail of it: peft keeps
    ``kwargs["target_name"] = "model.layers.0.self_attn.q_proj"``) says where it sits, not what it computes."""
    if isinstance(v, str) and path and "." in v and (path == v or path.endswith("." + v)):
        return ("own path",)
    if isinstance(v, _PRIMITIVES):
        return v
    if depth < 4:
        if type(v) in (tuple, list):
            return (type(v).__name__, tuple(_value_signature(x, depth + 1, path) for x in v))
        if type(v) is dict and all(isinstance(k, _PRIMITIVES) for k in v):
            return ("dict", tuple((k, _value_signature(x, depth + 1, path)) for k, x in v.items()))
        if type(v) in (set, frozenset) and all(isinstance(x, _PRIMITIVES) for x in v):
            return (type(v).__name__, frozenset(v))
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), tuple(v.shape), v.dtype, v.requires_grad)
    return ("object", id(v))


class ModuleSignatures:
    """What a module's forward can depend on besides its inputs (class, attributes, tensors, and its submodules'
    the same way), as a small int: equal for modules whose whole trees match. Memoised bottom-up, so signing
    every module of a model costs one visit per module (peft's LoRA layers nest five deep)."""

    def __init__(self, model: nn.Module) -> None:
        self._ids: dict[tuple, int] = {}
        self._of: dict[int, int] = {}  #: id(module) -> its signature
        self._paths = {id(m): name for name, m in model.named_modules()}

    def __call__(self, module: nn.Module) -> int:
        found = self._of.get(id(module))
        if found is None:
            found = self._of[id(module)] = self._ids.setdefault(self._parts(module), len(self._ids))
        return found

    def _parts(self, module: nn.Module) -> tuple:
        path = self._paths.get(id(module), "")
        attrs = tuple(sorted((k, _value_signature(v, 0, path)) for k, v in vars(module).items()
                             if k not in _MODULE_INTERNALS and k not in _POSITION_ONLY and k != "forward"))
        params, buffers = (getattr(module, name) for name in MODULE_TENSOR_DICTS)
        return (type(module), attrs,
                tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in params.items() if p is not None),
                tuple((n, tuple(b.shape), b.dtype) for n, b in buffers.items() if b is not None),
                tuple((n, self(c)) for n, c in getattr(module, MODULE_CHILDREN_DICT).items() if c is not None))


def _call_signature(args: tuple, kwargs: dict) -> tuple[tuple, list[Any]]:
    """(hashable signature of the call's arguments and global modes, the flattened argument leaves)."""
    leaves, spec = tree_flatten((args, kwargs))
    first_of: dict[int, int] = {}
    parts: list[Any] = []
    for i, v in enumerate(leaves):
        if isinstance(v, torch.Tensor):
            alias = first_of.setdefault(_key(v), i)  # which earlier argument shares this storage
            parts.append(("t", tuple(v.shape), v.stride(), v.storage_offset(), v.dtype, v.device.type,
                          v.requires_grad, alias))
        else:
            parts.append(_value_signature(v))
    modes = (torch.is_grad_enabled(),
             *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu")))
    return (str(spec), tuple(parts), modes), leaves


class _NewStorages(TorchDispatchMode):
    """Storages first seen as an op's output while active: the ones the traced call created."""

    def __init__(self) -> None:
        super().__init__()
        self.before: set[int] = set()
        self.created: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        for t in flat:
            if isinstance(t, torch.Tensor) and _key(t) not in self.created:
                self.before.add(_key(t))
        out = func(*args, **(kwargs or {}))
        if func is not torch.ops.aten.set_.source_Storage_storage_offset:  # set_ re-points, creates nothing
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and _key(t) not in self.before:
                    self.created.add(_key(t))
        return out


@dataclass(frozen=True)
class _Desc:
    """How to rebuild one template tensor in a replay: a view of slot ``slot``'s storage."""

    slot: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    requires_grad: bool
    exact: bool  #: the slot's own tensor object (an argument or parameter as passed), not a new view


@dataclass
class Template:
    """One recorded block call: its nested calls and saves, and where each storage came from."""

    name: str
    depth: int
    first_call: int
    first_save: int
    children: int
    calls: list[Any]                        #: the tracer's call records made inside the block, in order
    order: list[tuple[int, torch.Tensor]]   #: (call index, saved tensor) made inside the block
    saved: list[torch.Tensor]               #: what the block call itself saved while innermost
    output: Any
    paths: dict[int, str]                   #: id(submodule) -> its path inside the block
    #: per slot: ("arg", leaf index) | ("param", name) | ("fixed", tensor) | ("new", nbytes)
    slots: list[tuple[str, Any]] = field(default_factory=list)
    descs: dict[int, _Desc] = field(default_factory=dict)  #: id(template tensor) -> how to rebuild it
    first_op: int = 0                       #: the tracer's op counter when the block began
    n_ops: int = 0                          #: ops the block ran
    passthrough: frozenset = frozenset()    #: ops (from first_op) whose backward passes the grad on as is
    scratch: dict[int, tuple[int, ...]] = field(default_factory=dict)  #: op (from first_op) -> backward scratch
    uses: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  #: the tracer's op uses inside
    save_ops: list[int] = field(default_factory=list)  #: per entry of ``order``: the op that saved it
    #: (argument leaf index, tensor): storages the block made and left in an object it was passed (a KV cache)
    side: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class _Outputs(torch.autograd.Function):
    """Makes replayed outputs non-leaf tensors that require grad (so later in-place ops are allowed)."""

    @staticmethod
    def forward(ctx, anchor, build):  # noqa: D102
        return build()

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102  (never run: estimates do not backpropagate)
        return None, None


class BlockCache:
    """Wraps the forward of every repeated module of a traced model with record-or-replay.

    ``tracer`` is the trace's recorder as :class:`BlockTracer` describes it (its call records have index,
    name, module, parent, depth, saved, children, items, method, inputs, output, end, op_start, op_end).
    """

    def __init__(self, model: nn.Module, tracer: BlockTracer) -> None:
        self.tracer = tracer
        self.templates: dict[tuple, Template] = {}
        self.hits = 0
        self.records = 0
        self._undo: list[Callable[[], None]] = []
        signatures = {}
        sign = ModuleSignatures(model)
        for m in model.modules():
            if m is model or not any(True for _ in m.children()):
                continue
            if max(forward_hook_counts(m)) > 1:
                continue  # a user's hook would be skipped by a replay
            signatures[m] = sign(m)
        counts: dict[int, int] = {}
        for sig in signatures.values():
            counts[sig] = counts.get(sig, 0) + 1
        self._module_sig: dict[int, int] = {}
        for m, sig in signatures.items():
            if counts[sig] > 1:
                self._module_sig[id(m)] = sig
                self._wrap(m)

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _wrap(self, module: nn.Module) -> None:
        had = "forward" in vars(module)
        original = module.forward

        def forward(*args, **kwargs):
            return self._call(module, original, args, kwargs)

        module.forward = forward  # type: ignore[method-assign]

        def undo() -> None:
            if had:
                module.forward = original  # type: ignore[method-assign]
            else:
                vars(module).pop("forward", None)

        self._undo.append(undo)

    # -- record or replay ----------------------------------------------------------------------
    def _call(self, module: nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        tr = self.tracer
        if not tr.stack or tr.calls[tr.stack[-1]].module is not module:
            return original(*args, **kwargs)  # called without the tracer's hooks: nothing to record
        sig, leaves = _call_signature(args, kwargs)
        key = (self._module_sig[id(module)], sig)
        template = self.templates.get(key)
        if template is not None:
            self.hits += 1
            return self._replay(template, module, leaves)
        first_call, first_save = tr.stack[-1], len(tr.order)
        first_op, first_use = tr.ops, len(tr.uses)
        with _NewStorages() as seen:
            output = original(*args, **kwargs)
        self.records += 1
        uses = tr.uses[first_use:]
        template = self._record(module, leaves, output, first_call, first_save, seen.created, uses)
        template.first_op, template.n_ops = first_op, tr.ops - first_op
        template.passthrough = frozenset(op - first_op for op in tr.passthrough if op >= first_op)
        template.scratch = {op - first_op: n for op, n in tr.scratch.items() if op >= first_op}
        self.templates[key] = template
        return output

    def _record(self, module: nn.Module, leaves: list[Any], output: Any, first_call: int, first_save: int,
                created: set[int], uses: list[tuple[int, torch.Tensor, int]]) -> Template:
        tr = self.tracer
        block = tr.calls[first_call]
        t = Template(block.name, block.depth, first_call, first_save, block.children,
                     list(tr.calls[first_call + 1:]), list(tr.order[first_save:]), list(block.saved), output,
                     {id(m): n for n, m in module.named_modules(remove_duplicate=False)}, uses=uses,
                     save_ops=list(tr.save_ops[first_save:]))
        slot_of: dict[int, int] = {}
        exact: dict[int, int] = {}

        def add_slot(tensor: torch.Tensor, kind: str, value: Any, is_exact: bool) -> None:
            k = _key(tensor)
            if k not in slot_of:
                slot_of[k] = len(t.slots)
                t.slots.append((kind, value))
                if is_exact:
                    exact[id(tensor)] = slot_of[k]

        for i, v in enumerate(leaves):
            if isinstance(v, torch.Tensor):
                add_slot(v, "arg", i, True)
        named = itertools.chain(module.named_parameters(remove_duplicate=False),
                                module.named_buffers(remove_duplicate=False))
        for name, p in named:
            add_slot(p, "param", name, True)

        def describe(x: Any) -> Any:
            if not isinstance(x, torch.Tensor) or id(x) in t.descs:
                return x
            k = _key(x)
            if k not in slot_of:
                if k in created:
                    add_slot(x, "new", x.untyped_storage().nbytes(), False)
                else:
                    add_slot(x, "fixed", x, True)
            t.descs[id(x)] = _Desc(slot_of[k], x.dtype, tuple(x.shape), x.stride(), x.storage_offset(),
                                   x.requires_grad, exact.get(id(x)) == slot_of[k])
            return x

        tree_map(describe, output)
        for c in t.calls:
            for obj in (c.inputs, c.output, c.saved, c.items or ()):
                tree_map(describe, obj)
        for _, x in t.order:
            describe(x)
        for x in t.saved:
            describe(x)
        for _, x, _ in t.uses:
            describe(x)
        t.side = _left_in_arguments(leaves, created)
        for _, x in t.side:
            describe(x)
        return t

    def _replay(self, t: Template, module: nn.Module, leaves: list[Any]) -> Any:
        tr = self.tracer
        block_index = tr.stack[-1]
        block = tr.calls[block_index]
        assert block_index == len(tr.calls) - 1, "a replayed block must be the latest call"
        paused, tr.paused = tr.paused, True  # the replay's own empty/set_ ops are not the block's ops
        try:
            return self._replay_paused(t, module, leaves, block_index, block)
        finally:
            tr.paused = paused

    def _replay_paused(self, t: Template, module: nn.Module, leaves: list[Any], block_index: int, block: Any) -> Any:
        tr = self.tracer
        rebuilt = _Rebuilt(t, module, leaves)
        output = rebuilt.outputs()
        make = rebuilt.make
        shift_call, shift_op = block_index - t.first_call, tr.ops - t.first_op
        self._replay_calls(t, module, block, make, shift_call, len(tr.order) - t.first_save, shift_op)
        tr.order.extend((i + shift_call, make(x)) for i, x in t.order)
        tr.save_ops.extend(op + shift_op for op in t.save_ops)
        tr.uses.extend((op + shift_op, make(x), kind) for op, x, kind in t.uses)
        tr.passthrough.update(op + tr.ops for op in t.passthrough)
        tr.scratch.update({op + tr.ops: n for op, n in t.scratch.items()})
        tr.ops += t.n_ops
        block.saved.extend(make(x) for x in t.saved)
        block.children = t.children
        for i, x in t.side:  # what the block would have left in the object (a cache update) is kept by it
            tr.side_held.setdefault(id(leaves[i]), (leaves[i], []))[1].append(make(x))
        return output

    def _replay_calls(self, t: Template, module: nn.Module, block: Any, make: Callable[[Any], Any],
                      shift_call: int, shift_save: int, shift_op: int) -> None:
        """The template's nested call records, renumbered for this replay and holding the rebuilt tensors."""
        tr = self.tracer
        # each checkpoint region of the template is, in this replay, a region of its own (the checkpoint may wrap
        # the block's forward, outside this replay, as transformers' GradientCheckpointingLayer does)
        regions: dict[int, int] = {}
        modules = dict(module.named_modules(remove_duplicate=False))
        for c in t.calls:
            tr.calls.append(tr.new_call(
                index=c.index + shift_call,
                name=block.name + c.name[len(t.name):] if c.name.startswith(t.name) else c.name,
                module=modules.get(t.paths.get(id(c.module), ""), None) if c.module is not None else None,
                parent=c.parent + shift_call if c.parent is not None else None,
                depth=c.depth - t.depth + block.depth,
                saved=[make(x) for x in c.saved],
                children=c.children,
                items=tuple(make(x) for x in c.items) if c.items is not None else None,
                method=c.method,
                formula_items=tuple(make(x) for x in c.formula_items) if c.formula_items is not None else None,
                inputs=tuple(make(x) for x in c.inputs),
                output=tree_map(make, c.output),
                end=c.end + shift_save,
                op_start=c.op_start + shift_op,
                op_end=c.op_end + shift_op,
                region=regions.setdefault(c.region, tr.new_region()) if c.region is not None else None,
            ))


def _left_in_arguments(leaves: list[Any], created: set[int]) -> list[tuple[int, torch.Tensor]]:
    """Tensors the block made that an object it was passed now keeps (a Hugging Face cache's ``update`` stores
    each layer's keys and values in the cache): a replay does not run the block, so they are noted instead."""
    out = []
    for i, v in enumerate(leaves):
        if isinstance(v, (torch.Tensor, nn.Module) + _PRIMITIVES):
            continue
        out.extend((i, x) for x in held_by(v) if _key(x) in created)
    return out


class _Rebuilt:
    """A template's tensors made anew for one replay: each slot's storage (the call's arguments, the module's own
    parameters, fixed tensors, fresh storages), and views of them as the template describes."""

    def __init__(self, t: Template, module: nn.Module, leaves: list[Any]) -> None:
        self.t = t
        by_name = dict(itertools.chain(module.named_parameters(remove_duplicate=False),
                                       module.named_buffers(remove_duplicate=False)))
        self.bases: list[torch.Tensor] = []
        for kind, value in t.slots:
            if kind == "arg":
                self.bases.append(leaves[value])
            elif kind == "param":
                self.bases.append(by_name[value])
            elif kind == "fixed":
                self.bases.append(value)
            else:
                self.bases.append(torch.empty(value, dtype=torch.uint8, device=META))
        self.made: dict[int, torch.Tensor] = {}

    def make(self, x: Any) -> Any:
        """The replay's tensor for template tensor ``x`` (anything else as it is)."""
        if not isinstance(x, torch.Tensor):
            return x
        new = self.made.get(id(x))
        if new is None:
            d = self.t.descs[id(x)]
            new = self.bases[d.slot]
            if not d.exact:
                with torch.no_grad():
                    new = torch.empty(0, dtype=d.dtype, device=META).set_(
                        new.untyped_storage(), d.offset, d.size, d.stride)
                if d.requires_grad:
                    new.requires_grad_()
            self.made[id(x)] = new
        return new

    def outputs(self) -> Any:
        """The block's output, rebuilt first: the tensors that require grad come out of an autograd node, as real
        outputs do."""
        t, bases = self.t, self.bases
        out_leaves, spec = tree_flatten(t.output)
        fresh = [x for x in out_leaves if isinstance(x, torch.Tensor) and x.requires_grad
                 and not t.descs[id(x)].exact]
        if fresh:
            plain = [dict(vars(t.descs[id(x)])) for x in fresh]

            def build() -> tuple[torch.Tensor, ...]:
                outs = []
                for d in plain:
                    base = bases[d["slot"]]
                    outs.append(torch.empty(0, dtype=d["dtype"], device=META).set_(
                        base.untyped_storage(), d["offset"], d["size"], d["stride"]))
                return tuple(outs)

            anchor = torch.empty(0, device=META, requires_grad=True)
            for x, new in zip(fresh, _Outputs.apply(anchor, build)):
                self.made[id(x)] = new
        return tree_unflatten([self.make(x) for x in out_leaves], spec)
