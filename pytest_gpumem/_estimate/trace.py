"""Trace forward and loss on a meta twin: module calls, saved tensors in order, every op's tensors."""
from __future__ import annotations

import bisect
import contextlib
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .. import _compat
from .._compat import TorchDispatchMode
from . import layer_formulas as formulas
from .block_cache import BlockCache
from .autocast_casts import cuda_autocast_state, cuda_autocast_without_gpu
from .kernel_mode import KernelMode
from .meta_twin import _to_meta, meta_twin
from .segments import split_own_ops
from .storages import _storage_key, _tensors


@dataclass
class _Call:
    """One module call seen while tracing (mutable while the trace runs)."""

    index: int
    name: str
    module: nn.Module | None
    parent: int | None
    depth: int
    saved: list[torch.Tensor] = field(default_factory=list)  #: what this call saved while innermost
    children: int = 0
    items: tuple | None = None       #: formula or hook answer
    method: str = "traced"
    inputs: tuple = ()
    output: Any = None
    end: int = 0                     #: position in the save order when the call ended
    region: int | None = None        #: checkpoint region this call opened (its saves are recomputed, not kept)
    op_start: int = 0                #: op counter (see _Uses) when the call began
    op_end: int = 0                  #: op counter when the call ended
    formula_items: tuple | None = None  #: device="cpu": the closed-form answer, kept as a cross-check


@dataclass
class _Trace:
    calls: list[_Call]
    order: list[tuple[int, torch.Tensor]]  #: (call index, saved tensor) in save order
    param_keys: set[int]
    batch_keys: set[int]
    output: Any
    loss: Any
    twin: nn.Module
    reused: tuple[int, int] = (0, 0)  #: (block calls replayed, block templates recorded)
    loss_params: frozenset[int] = frozenset()  #: ids of twin parameters the loss uses directly (e.g. an L1 penalty)
    uses: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  #: (op, tensor, OUT/IN/GRAD_IN)
    save_ops: list[int] = field(default_factory=list)  #: per entry of ``order``: the op that saved it
    #: twin parameter id -> its gradient's bytes where that is not the parameter's (Embedding(sparse=True))
    grad_bytes: dict[int, int] = field(default_factory=dict)
    user_autocast: str | None = None  #: an autocast region the model or loss entered itself (not traced as such)
    passthrough: frozenset = frozenset()  #: ops whose backward hands the output's grad on unchanged
    #: op -> bytes of each buffer its backward allocates and frees (a CUDA attention kernel's scratch)
    scratch: dict[int, tuple[int, ...]] = field(default_factory=dict)
    #: id(object) -> (object, tensors replayed blocks left in it): a KV cache updated by a replayed layer
    side_held: dict[int, tuple[Any, list[torch.Tensor]]] = field(default_factory=dict)

    def uses_between(self, start: int, end: int) -> list[tuple[int, torch.Tensor, int]]:
        """The entries of ``uses`` with ``start <= op < end`` (``uses`` is in op order: a bisection, not a scan)."""
        ops = self.__dict__.get("_use_ops")
        if ops is None or len(ops) != len(self.uses):
            ops = self.__dict__["_use_ops"] = [u[0] for u in self.uses]
            assert all(a <= b for a, b in zip(ops, ops[1:])), "trace uses out of op order"
        return self.uses[bisect.bisect_left(ops, start):bisect.bisect_left(ops, end)]

    def grad_nbytes(self, p: torch.Tensor) -> int:
        """Bytes of twin parameter ``p``'s gradient after backward."""
        return self.grad_bytes.get(id(p), p.numel() * p.element_size())


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _ask_hook(hook: Any, module, inputs, output, device: str) -> int | None:
    """The activation hook's answer: the first implementation's non-None int (firstresult), or None."""
    if hook is None:
        return None
    return hook.pytest_gpumem_activation_bytes(module=module, inputs=inputs, output=output, device=device)


def trace_step(model: nn.Module, batch: Any, *, target: Any = None, loss_fn: Callable | None = None,
               device: str = "cuda", hooks: Iterable[Any] = (), autocast_dtype: torch.dtype | None = None,
               reuse_blocks: bool = True) -> _Trace:
    """Run forward and loss on a meta twin, recording each module call and every saved tensor.

    With ``device="cuda"`` the trace runs the kernels ``_cuda_facts`` says CUDA runs (:class:`KernelMode`), so
    dropout, attention and autocast save what CUDA kernels save.
    """
    twin = meta_twin(model)
    tracer = _Tracer(twin, hooks, device)
    cache = BlockCache(twin, tracer) if reuse_blocks else None
    handles = [h for m in twin.modules()
               for h in (m.register_forward_pre_hook(tracer.pre), m.register_forward_hook(tracer.post))]
    try:
        output, loss, inputs, meta_target = tracer.run(batch, target, loss_fn, autocast_dtype)
    finally:
        for h in handles:
            h.remove()
        if cache is not None:
            cache.restore()
    # a loss closing over ``model`` (an L1 penalty) reads the user's own parameters, not the twin's: what it
    # saves of them (abs() saves its input) is a parameter, not an activation
    param_keys = {_storage_key(t) for t in itertools.chain(twin.parameters(), twin.buffers(),
                                                           model.parameters(), model.buffers())}
    batch_keys = {_storage_key(t) for t in _tensors((inputs, meta_target))}
    reused = (cache.hits, cache.records) if cache is not None else (0, 0)
    calls, order = split_own_ops(tracer.calls, tracer.order, tracer.save_ops, tracer.uses, _Call)
    return _Trace(calls, order, param_keys, batch_keys, output, loss, twin, reused,
                  _loss_params(output, loss, dict(zip(map(id, model.parameters()), map(id, twin.parameters())))),
                  tracer.uses, tracer.save_ops, _sparse_grad_bytes(calls), tracer.user_autocast,
                  frozenset(tracer.passthrough), dict(tracer.scratch), dict(tracer.side_held))


def _sparse_grad_bytes(calls: list[_Call]) -> dict[int, int]:
    """An ``Embedding(sparse=True)`` weight's grad is a sparse COO tensor: per looked-up index an int64 index
    and a row of values; calls add up (sparse grads accumulate by concatenation, uncoalesced)."""
    out: dict[int, int] = {}
    for c in calls:
        m = c.module
        if isinstance(m, nn.Embedding) and m.sparse and m.weight.requires_grad and c.inputs:
            n = c.inputs[0].numel()
            out[id(m.weight)] = out.get(id(m.weight), 0) + n * 8 + n * m.weight.shape[1] * m.weight.element_size()
    return out


def _loss_params(output: Any, loss: Any, twin_of: dict[int, int]) -> frozenset[int]:
    """Parameters the loss reaches through autograd nodes made after the model's output (not via the model).

    A loss closing over the user's model uses its real parameters: ``twin_of`` maps their ids to the twin's."""
    made_by_model = [_compat.sequence_nr(t.grad_fn) for t in _tensors(output) if t.grad_fn is not None]
    after = max(made_by_model, default=-1)
    found: set[int] = set()
    todo = [t.grad_fn for t in _tensors(loss) if t.grad_fn is not None]
    # some torch releases (2.11) wrap a node anew on every next_functions access: keep each one visited
    # alive, or a freed wrapper's id() is reused by the next and that node is taken as already seen
    seen: dict[int, Any] = {}
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf parameter
            found.add(twin_of.get(id(node.variable), id(node.variable)))
        elif _compat.sequence_nr(node) > after:
            todo.extend(n for n, _ in node.next_functions)
    return frozenset(found)


#: ops whose backward passes the output's gradient to every input as it is or as a view of it, allocating none
#: (an add of two branches, a residual add, views, sums): a call made only of them makes no input gradient
_aten = torch.ops.aten
PASSTHROUGH_OPS = frozenset({
    _aten.add.Tensor, _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.t.default,
    _aten.transpose.int, _aten.permute.default, _aten.unsqueeze.default, _aten.squeeze.dim, _aten.alias.default,
    _aten.detach.default,
    # a sum's backward expands its output's grad to the input's shape: a view, nothing allocated
    _aten.sum.default, _aten.sum.dim_IntList,
})


#: how an op touched a tensor (``_Uses``): made it, read it, or read it differentiably (a grad flows back)
OUT, IN, GRAD_IN = 0, 1, 2


class _Uses(TorchDispatchMode):
    """Every op's tensors in order, numbered by op: when a storage appears and when grad last flows into it.

    Module hooks see only module calls; a residual add in a parent's forward is an op, and it is what keeps
    the block input (forward) and its gradient (backward) alive across the calls in between."""

    def __init__(self, tracer: "_Tracer") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tr = self.tracer
        if not tr.paused:
            op = tr.ops
            tr.ops += 1
            if func in PASSTHROUGH_OPS and (func is not torch.ops.aten.add.Tensor or kwargs.get("alpha", 1) == 1):
                tr.passthrough.add(op)
            for t in _tensors((args, kwargs)):
                tr.uses.append((op, t, GRAD_IN if t.requires_grad and t.is_floating_point() else IN))
            for t in _tensors(out):
                tr.uses.append((op, t, OUT))
        return out


def _weak_pack(tracer: "_Tracer") -> Callable[[torch.Tensor], torch.Tensor]:
    """``tracer.pack`` through a weak reference. Autograd keeps a pack hook in every graph node that saved a
    tensor, and the tracer holds the graph's tensors: a strong hook would close a cycle through C++ that gc
    cannot collect, keeping the traced tensors alive after the estimate (the user's own parameters too,
    when the loss closes over the model: a false leak warning)."""
    ref = weakref.ref(tracer)

    def pack(t: torch.Tensor) -> torch.Tensor:
        alive = ref()
        return alive.pack(t) if alive is not None else t
    return pack


class _Tracer:
    """Forward hooks and the saved-tensor hook of one trace: call records and saves in order."""

    def __init__(self, twin: nn.Module, hooks: Iterable[Any], device: str) -> None:
        self.hooks = list(hooks)
        self.device = device
        self.calls: list[_Call] = []
        self.stack: list[int] = []
        self.order: list[tuple[int, torch.Tensor]] = []
        self.save_ops: list[int] = []  #: per entry of ``order``: the op that saved it (autograd packs after the op ran)
        self.names = {id(m): n for n, m in twin.named_modules()}
        self.twin = twin
        self.regions: dict[Any, int] = {}  #: checkpoint pack hook -> region number (one per checkpoint call)
        self.pushed: list[tuple[int, Any]] = []  #: (call index, our saved-tensors hooks pushed over a checkpoint's)
        self.ops = 0  #: ops run so far (the _Uses counter)
        self.passthrough: set[int] = set()  #: ops whose backward hands the output's grad on unchanged (add, views)
        self.scratch: dict[int, tuple[int, ...]] = {}  #: op -> its backward's scratch buffers (bytes each)
        self.uses: list[tuple[int, torch.Tensor, int]] = []  #: (op, tensor, OUT/IN/GRAD_IN) per op tensor
        self.paused = False  #: a block replay makes its own tensors: _Uses records nothing meanwhile
        self.side_held: dict[int, tuple[Any, list[torch.Tensor]]] = {}  #: what replayed blocks left in objects
        #: autocast the model or loss entered itself (meta tensors ignore it, so the trace ran in full precision)
        self.user_autocast: str | None = None
        self.watch_autocast = True

    new_call = staticmethod(lambda **fields: _Call(**fields))

    def pre(self, module, args):
        if self.user_autocast is None and self.watch_autocast:
            # module hooks run above autocast (a dispatch mode runs below it and sees it off)
            # a CUDA region is cast by the trace (KernelMode) when estimating for CUDA; a CPU region never is
            for device in ("cpu",) if self.device == "cuda" else ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    self.user_autocast = f"torch.autocast({device!r}, dtype={torch.get_autocast_dtype(device)})"
        parent = self.stack[-1] if self.stack else None
        call = _Call(len(self.calls), self.names.get(id(module), "") or type(module).__name__, module, parent,
                     len(self.stack))
        if parent is not None:
            self.calls[parent].children += 1
        call.inputs = tuple(_tensors(args))
        call.op_start = self.ops
        self.calls.append(call)
        self.stack.append(call.index)
        foreign = _compat.top_pack_hook()
        if foreign is not None and _compat.is_checkpoint_pack_hook(foreign):
            # Inside torch.utils.checkpoint: record what the call would save (backward recomputes exactly
            # that) by putting our hook back on top until the call ends; the saves are tagged, not kept.
            call.region = self.regions.setdefault(foreign, len(self.regions))
            hooks = torch.autograd.graph.saved_tensors_hooks(_weak_pack(self), _identity)
            hooks.__enter__()
            self.pushed.append((call.index, hooks))

    def add_scratch(self, output: torch.Tensor, nbytes: tuple[int, ...]) -> None:
        """The op that made ``output`` (a CUDA attention kernel, just run) allocates ``nbytes`` in its backward
        (ops after it, such as autograd's detach of the saved output, are not it)."""
        if self.paused:
            return
        key, made, since = _storage_key(output), None, 0
        for op, t, kind in reversed(self.uses):  # the storage's first appearance: the kernel made it
            if kind == OUT and _storage_key(t) == key:
                made, since = op, 0
            since += 1
            if made is not None and since > 64:
                break
        if made is not None:
            self.scratch[made] = nbytes

    def new_region(self) -> int:
        """A checkpoint region number of its own (for a replayed block's region)."""
        return self.regions.setdefault(object(), len(self.regions))

    def post(self, module, args, output):
        call = self.calls[self.stack.pop()]
        if self.pushed and self.pushed[-1][0] == call.index:
            self.pushed.pop()[1].__exit__(None, None, None)
        call.output, call.end, call.op_end = output, len(self.order), self.ops
        for h in self.hooks:
            answer = _ask_hook(h, module, call.inputs, output, self.device)
            if answer is not None:
                call.items, call.method = (int(answer),), "hook"
                return
        fn = formulas.formula_for(module, autocast=torch.is_autocast_enabled("cuda"))
        if fn is None:
            return
        items = tuple(fn(module, call.inputs, output, self.device))
        if self.device == "cuda":
            # CUDA kernels save what the formulas say (cuDNN, fused dropout), not what meta's CPU-like kernels do
            call.items, call.method = items, "formula"
        else:
            # on the CPU what the meta trace saves is what the CPU saves: the formula is a cross-check only
            # (a subclass overriding forward, timm's BatchNormAct2d, or an inplace activation is not its base)
            call.formula_items = items

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.stack:
            self.calls[self.stack[-1]].saved.append(t)
            self.order.append((self.stack[-1], t))
            self.save_ops.append(self.ops - 1)
        return t

    def unwind(self) -> None:
        """Pop hooks a checkpointed call pushed and never popped (its forward raised)."""
        while self.pushed:
            self.pushed.pop()[1].__exit__(None, None, None)

    def run(self, batch: Any, target: Any, loss_fn: Callable | None, autocast_dtype: torch.dtype | None):
        """Forward and loss on meta copies of the batch; returns (output, loss, inputs, target) on meta."""
        from .._core.step_calls import call_model, default_loss

        inputs, meta_target = _to_meta(batch), _to_meta(target)
        self.watch_autocast = autocast_dtype is None
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_weak_pack(self), _identity))
            stack.enter_context(_Uses(self))
            stack.callback(self.unwind)
            # the kernels the device runs (CUDA's from _cuda_facts; the CPU's attention), and autocast as the
            # trace's own casts: real autocast ignores meta tensors. device="cpu" casts by CUDA's lists, which cast
            # the same matmul/conv ops to the low-precision dtype as the CPU's.
            if self.device == "cuda":
                stack.enter_context(cuda_autocast_without_gpu())
            stack.enter_context(cuda_autocast_state(autocast_dtype))
            stack.enter_context(KernelMode(self.device, self.add_scratch))
            output = call_model(self.twin, inputs)
            loss_call = _Call(len(self.calls), "loss", None, None, 0)
            loss_call.inputs = tuple(_tensors(output))
            loss_call.op_start = self.ops
            self.calls.append(loss_call)
            self.stack.append(loss_call.index)
            loss = (loss_fn or default_loss)(output, meta_target)
            self.stack.pop()
            loss_call.output, loss_call.end, loss_call.op_end = loss, len(self.order), self.ops
        return output, loss, inputs, meta_target
