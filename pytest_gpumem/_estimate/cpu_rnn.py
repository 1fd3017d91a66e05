"""CPU LSTM on meta: ``torch.lstm`` as aten runs it on the CPU, through oneDNN, saving oneDNN's workspace.

On the CPU (oneDNN built in and enabled, float32 input, or bfloat16 where the CPU runs oneDNN in it; no projections;
not a PackedSequence) aten runs each layer and direction as ``mkldnn_rnn_layer``, whose autograd node keeps the
layer's input, weights, hx/cx, output, hy/cy and an opaque uint8 workspace for backward. Meta returns that workspace
empty; :func:`onednn_lstm_workspace_bytes` gives its size. GRU and vanilla RNN take aten's own path on the CPU, which
the meta trace already follows. A CPU kernel fact: CUDA's LSTM (cuDNN) is in ``_cuda_facts.rnn``, not here.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import _compat

#: oneDNN aligns each workspace part to a page and pads leading dimensions to 64 bytes (never a multiple of 256
#: elements, which would alias in the 4 KiB cache sets): rnn_utils get_good_ld / set_offsets
_PAGE = 4096
_LINE = 64


def _good_ld(dim: int, itemsize: int) -> int:
    per_line = _LINE // itemsize
    ld = -(-dim // per_line) * per_line
    return ld + per_line if ld % 256 == 0 else ld


def _page(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


def onednn_lstm_workspace_bytes(steps: int, batch: int, input_size: int, hidden: int, itemsize: int) -> int:
    """Bytes of the workspace one ``mkldnn_rnn_layer`` call (one layer, one direction) keeps for backward.

    oneDNN's training workspace, each part starting on a page: the 4 gates per step, h per step, then five
    (layers + 1 = 2) x (steps + 1) x batch state buffers: h (its row padded to the wider of input and hidden),
    c, and the diff buffers for h-from-the-layer-below, h-from-the-previous-step and c. Gates, h and c are in the
    input's dtype (``itemsize``), the diff buffers in float32. Checked on torch 2.11 and 2.14 against the
    workspace the CPU saves, float32 and bfloat16, over shapes from 1 x 1 x 1 x 1 to T=50, B=33, I=300, H=512.
    """
    wide = max(input_size, hidden)
    rows = 2 * (steps + 1) * batch
    parts = (steps * batch * _good_ld(4 * hidden, itemsize) * itemsize,   # gates
             steps * batch * _good_ld(hidden, itemsize) * itemsize,       # h per step
             rows * _good_ld(wide, itemsize) * itemsize,                  # h states
             rows * hidden * itemsize,                                    # c states
             rows * _good_ld(wide, 4) * 4,                                # d(h) from the layer above
             rows * _good_ld(wide, 4) * 4,                                # d(h) from the next step
             rows * hidden * 4)                                           # d(c)
    end = 0
    for n in parts:
        end = _page(end) + n
    return _page(end)


def _runs_onednn(x: torch.Tensor, hx: Any) -> bool:
    """Whether aten's CPU LSTM takes oneDNN for this call (RNN.cpp ``use_mkldnn``; projections stay native)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) or x.numel() == 0:
        return False
    if not (isinstance(hx, (list, tuple)) and len(hx) == 2 and hx[0].size(-1) == hx[1].size(-1)):
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _compat.mkldnn_bf16_supported())


def cpu_lstm(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``torch.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)`` on meta
    as the CPU runs it, or None where the CPU takes aten's native path (the caller then runs it as it is)."""
    names = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")
    if len(args) + len(kwargs) != len(names) or not isinstance(args[1] if len(args) > 1 else kwargs.get("hx"),
                                                                (list, tuple)):
        return None  # the PackedSequence overload (data, batch_sizes, ...) runs natively
    b = {**dict(zip(names, args)), **kwargs}
    x, hx = b["input"], b["hx"]
    if x.device.type != "meta" or not _runs_onednn(x, hx):
        return None
    layers, dirs = int(b["num_layers"]), 2 if b["bidirectional"] else 1
    params, per = list(b["params"]), 4 if b["has_biases"] else 2
    flags = dict(num_layers=layers, has_biases=bool(b["has_biases"]), bidirectional=bool(b["bidirectional"]),
                 batch_first=bool(b["batch_first"]), train=bool(b["train"]))
    layer_in = (x.transpose(0, 1) if b["batch_first"] else x).contiguous()
    hys, cys = [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            i = layer * dirs + d
            w = params[i * per:(i + 1) * per]
            if per == 2:  # no biases: aten passes zeros shaped like the weights, and the node saves them
                w = [w[0], w[1], torch.zeros_like(w[0]), torch.zeros_like(w[1])]
            out, hy, cy, ws = _compat.onednn_lstm_layer(layer_in, tuple(w), hx[0][i], hx[1][i], reverse=d == 1,
                                                        **flags)
            ws.untyped_storage().resize_(onednn_lstm_workspace_bytes(
                layer_in.size(0), layer_in.size(1), layer_in.size(2), hx[1].size(-1), x.element_size()))
            outs.append(out)
            hys.append(hy)
            cys.append(cy)
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, 2)
        if b["dropout"] and b["train"] and layer < layers - 1:
            layer_in = torch.dropout(layer_in, float(b["dropout"]), True)
    output = layer_in.transpose(0, 1) if b["batch_first"] else layer_in
    return output, torch.stack(hys, 0), torch.stack(cys, 0)
