"""Measuring a training step: the step runner, the storage tracker, the backends and the CUDA allocator model."""
