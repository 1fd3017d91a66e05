"""torch's own MemTracker (a private API) measuring a zoo step on real CPU tensors: the cpu backend's oracle."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_flatten

from pytest_gpumem._core.step_calls import call_model

from .entry import Step


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenSafeMemTracker(MemTracker):
        """MemTracker that installs no gradient hooks on modules with frozen parameters and keeps no per-module peaks.

        MemTracker registers a hook on every parameter to label its gradient, and register_hook raises on a
        parameter that does not require grad (LoRA, Whisper's fixed positions; torch 2.11-2.14). The hooks only
        label bytes; the total comes from dispatch-level storage tracking, which this leaves as it is.
        """

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            trainable = all(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)

        def _update_peak_stats(self, peak_state):
            """The device peak only, as MemTracker computes it; per-module peaks are not kept.

            MemTracker walks every module it has seen on every op to update per-module peaks (ops x modules:
            5 s of CPU for one EfficientNet-B0 step pair). The oracle reads only the device total, which the
            base method updates from the same snapshot whether or not any module is walked.
            """
            modules, self.memory_tracking = self.memory_tracking, {}
            try:
                super()._update_peak_stats(peak_state)
            finally:
                self.memory_tracking = modules

    return FrozenSafeMemTracker


def memtracker_peak(step: Step, steps: int = 2) -> int:
    """Peak bytes MemTracker sees on the CPU over ``steps`` forward/backward/optimizer/zero_grad steps."""
    tracker = _tracker_class()()
    flat, _ = tree_flatten((step.batch, step.target))
    tracker.track_external(step.model, step.optimizer, *[t for t in flat if isinstance(t, torch.Tensor)])
    with tracker:
        for _ in range(steps):
            cast = (torch.autocast("cpu", dtype=step.autocast_dtype) if step.autocast_dtype
                    else contextlib.nullcontext())
            with cast:  # the output is held through backward, as measure_step (and a plain loop) holds it
                output = call_model(step.model, step.batch)
                loss = step.loss(output)
            loss.backward()
            del output, loss
            step.optimizer.step()
            step.optimizer.zero_grad()
            tracker.reset_mod_stats()  # it refuses a second forward of the same module otherwise
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
