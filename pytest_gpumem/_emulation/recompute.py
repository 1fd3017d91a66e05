"""Keep a TorchFunctionMode on during activation-checkpoint recomputation.

Autograd runs backward with an empty torch-function mode stack, so a checkpointed block
(``torch.utils.checkpoint``, Hugging Face ``gradient_checkpointing_enable()``) recomputes its forward
without the mode that was on in the original forward: dropout and attention then take other kernels,
save other tensors, and checkpoint rejects the recomputation. :func:`reentered_in_modules` pushes the
mode again around every module call that runs while it is missing (checkpointed layers call their
submodules: attention, dropout, linear), and pops it when the call returns or raises.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode

from .._compat import function_mode_stack


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
