"""cuDNN's fused RNN (LSTM, GRU, RNN) on CUDA, and what the emulated backend cannot know of it.

Source: aten/src/ATen/native/cudnn/RNN.cpp, ``_cudnn_rnn`` (torch 2.4 .. 2.14). In training
(``fn_train``), the sizes come from cuDNN itself, ``cudnnGetRNNTempSpaceSizes(handle, rnn_desc,
CUDNN_FWD_MODE_TRAINING, x_desc, &workspace_size, &reserve_size)`` (``cudnnGetRNNTrainingReserveSize`` with
the pre-v8 API), and both buffers are ``at::empty(size, input.options().dtype(kByte))``: they go through
the caching allocator. The workspace is freed when the call returns; the reserve space is an output of
``_cudnn_rnn`` that autograd saves for ``_cudnn_rnn_backward`` (it holds the per-step gate activations
cuDNN needs), so it is an activation until backward. Its size depends on the cuDNN version, the algorithm,
the math type and the GPU, and no formula for it is published: it cannot be computed without cuDNN.
"""
from __future__ import annotations

#: RNN module classes (torch.nn) that run cuDNN's fused kernel on CUDA
CUDNN_RNN_MODULES: frozenset[str] = frozenset({"LSTM", "GRU", "RNN"})

#: the report note of an emulated step that trains an RNN module
RESERVE_NOTE = ("cuDNN RNN reserve space is not in these figures: on CUDA, training LSTM/GRU/RNN layers run "
                "cuDNN's fused kernel, which keeps a reserve buffer (sized by cudnnGetRNNTempSpaceSizes, known only "
                "to cuDNN) from forward to backward and a workspace during each call; the emulated step runs torch's "
                "per-cell decomposition instead, whose saved gate activations stand in for it")


def trains_cudnn_rnn(modules) -> bool:
    """Whether any of ``modules`` is an nn.LSTM / GRU / RNN in training mode (cuDNN's fused kernel on CUDA)."""
    return any(type(m).__name__ in CUDNN_RNN_MODULES and m.training for m in modules
               if type(m).__module__.startswith("torch.nn"))
