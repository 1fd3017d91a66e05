"""Keep a TorchFunctionMode on during activation-checkpoint recomputation.

Autograd runs backward with an empty torch-function mode stack, so a checkpointed block
(``torch.utils.checkpoint``, Hugging Face ``gradient_checkpointing_enable()``) recomputes its forward
without the mode that was on in the original forward: dropout and attention then take other kernels,
save other tensors, and checkpoint rejects the recomputation. :func:`reentered_in_recomputation` wraps
the function checkpoint will recompute (a module, a lambda, a function of ``F.*`` calls; both checkpoint
modes) so that it runs with the mode; :func:`reentered_in_modules` also pushes the mode again around every
module call that runs while it is missing (other libraries' recomputation of checkpointed layers).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from typing import Any, Callable

from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode

from .._compat import checkpoint_recompute_patch_targets, function_mode_stack
from .substitutions import _patched


def _with_mode(fn: Callable, mode: TorchFunctionMode, owner: int) -> Callable:
    """``fn``, run with ``mode`` pushed when it is missing from this thread's stack (backward's recomputation)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner or any(m is mode for m in function_mode_stack()):
            return fn(*args, **kwargs)
        with mode:
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def reentered_in_recomputation(mode: TorchFunctionMode) -> Iterator[None]:
    """While entered, what ``torch.utils.checkpoint`` recomputes in backward runs with ``mode``."""
    owner = threading.get_ident()
    (frame, frame_init), (function, function_forward) = checkpoint_recompute_patch_targets()

    def frame_with_mode(init: Callable) -> Callable:
        def patched(self, recompute_fn, *args, **kwargs):
            init(self, _with_mode(recompute_fn, mode, owner), *args, **kwargs)
        return patched

    def function_with_mode(forward: Callable) -> staticmethod:
        def patched(ctx, run_function, *args):
            return forward(ctx, _with_mode(run_function, mode, owner), *args)
        return staticmethod(patched)

    with _patched(((frame, frame_init, frame_with_mode), (function, function_forward, function_with_mode))):
        yield


@contextlib.contextmanager
def reentered_in_modules(mode: TorchFunctionMode) -> Iterator[None]:
    """While entered, every module call on this thread runs with ``mode`` on the function mode stack."""
    owner = threading.get_ident()
    pushed: list[bool] = []  # one entry per module call in flight: whether its pre-hook pushed the mode

    def before(module, args):
        push = threading.get_ident() == owner and not any(m is mode for m in function_mode_stack())
        if push:
            mode.__enter__()
        pushed.append(push)

    def after(module, args, output):
        if pushed and pushed.pop():
            mode.__exit__(None, None, None)

    pre = module_hooks.register_module_forward_pre_hook(before)
    post = module_hooks.register_module_forward_hook(after, always_call=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()
