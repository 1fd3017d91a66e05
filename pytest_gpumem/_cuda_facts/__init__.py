"""Facts about CUDA kernels that the estimate and the emulated backend both read, in one place.

Data and pure functions only (no TorchFunctionMode, no substitution): which dropout kernel runs and what
it saves, which optimizer implementation CUDA defaults to, autocast's op lists. The emulation applies these
facts to meta tensors; the estimate reads them without running the emulation, so a wrong fact shows up as
a disagreement with a real GPU, not as two copies of one mistake. Each module names its source.
"""
