"""nn.RNN, nn.LSTM and nn.GRU computed with quantized weight matrices.

What is quantized: every weight matrix (``weight_ih_l*``, ``weight_hh_l*`` and, for an LSTM
with ``proj_size``, ``weight_hr_l*``, each with a quantizer of its own) and the input
sequence (one scale over the whole sequence, or over the data of a ``PackedSequence``).
What stays in float: the biases, the initial state ``hx`` and, inside torch's fused
recurrent kernel, the hidden and cell states of every step and the gates. Quantizing those
would mean running the recurrence step by step in Python, many times slower.

The forward follows ``nn.RNNBase``'s subclasses (packed sequences, unbatched input,
``batch_first``, bidirectional, stacked layers, LSTM projections) and calls the same
functional kernels (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``)
with the quantized weights in the order they take them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .functional import quantized_input, quantized_weight

_KERNELS = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}


def _flat_names(layer: nn.RNNBase) -> list[str]:
    """Parameter names in the order the kernels take them, per layer and direction:
    weight_ih, weight_hh, [bias_ih, bias_hh], [weight_hr] (the documented naming)."""
    names = []
    for index in range(layer.num_layers):
        for suffix in ("", "_reverse") if layer.bidirectional else ("",):
            names += [f"weight_ih_l{index}{suffix}", f"weight_hh_l{index}{suffix}"]
            if layer.bias:
                names += [f"bias_ih_l{index}{suffix}", f"bias_hh_l{index}{suffix}"]
            if layer.proj_size > 0:
                names.append(f"weight_hr_l{index}{suffix}")
    return names


def recurrent_weights(layer: nn.RNNBase) -> dict[str, int]:
    """Every weight matrix of the layer, with output-channel axis 0 (gates x hidden)."""
    return {name: 0 for name in _flat_names(layer) if name.startswith("weight_")}


def _zeros(layer: nn.RNNBase, batch: int, like: Tensor):
    directions = 2 if layer.bidirectional else 1
    output_size = layer.proj_size if layer.proj_size > 0 else layer.hidden_size
    h = torch.zeros(layer.num_layers * directions, batch, output_size, dtype=like.dtype, device=like.device)
    if layer.mode != "LSTM":
        return h
    c = torch.zeros(layer.num_layers * directions, batch, layer.hidden_size, dtype=like.dtype, device=like.device)
    return h, c


def _unbatched_state(layer: nn.RNNBase, hx, batched: bool):
    """Check the state's rank against the input's; an unbatched state gets a batch of 1."""
    states = hx if isinstance(hx, tuple) else (hx,)
    rank = 3 if batched else 2
    if any(state.dim() != rank for state in states):
        shape = ", ".join(f"{state.dim()}-D" for state in states)
        kind = "batched 3-D" if batched else "unbatched 2-D"
        raise RuntimeError(f"For {kind} input, hx{' and cx' if len(states) == 2 else ''} should also be "
                           f"{rank}-D but got ({shape}) tensors")
    if batched:
        return hx
    return tuple(s.unsqueeze(1) for s in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)


def recurrent_forward(layer: nn.RNNBase, input, hx=None):
    kernel = _KERNELS[layer.mode]
    weights = [quantized_weight(layer, name) if name.startswith("weight_") else getattr(layer, name)
               for name in _flat_names(layer)]
    dropout, training = float(layer.dropout), layer.training
    if isinstance(input, PackedSequence):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        hx = _zeros(layer, int(batch_sizes[0]), data) if hx is None else layer.permute_hidden(hx, sorted_indices)
        layer.check_forward_args(data, hx, batch_sizes)
        state = list(hx) if isinstance(hx, tuple) else hx
        result = kernel(quantized_input(layer, data), batch_sizes, state, weights, layer.bias, layer.num_layers,
                        dropout, training, layer.bidirectional)
        hidden = tuple(result[1:]) if layer.mode == "LSTM" else result[1]
        output = PackedSequence(result[0], batch_sizes, sorted_indices, unsorted_indices)
        return output, layer.permute_hidden(hidden, unsorted_indices)

    if input.dim() not in (2, 3):
        raise ValueError(f"{type(layer).__name__}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
    batched = input.dim() == 3
    batch_dim = 0 if layer.batch_first else 1
    if not batched:
        input = input.unsqueeze(batch_dim)
    if hx is None:
        hx = _zeros(layer, input.shape[batch_dim], input)
    else:
        hx = _unbatched_state(layer, hx, batched)
    layer.check_forward_args(input, hx, None)
    state = list(hx) if isinstance(hx, tuple) else hx
    result = kernel(quantized_input(layer, input), state, weights, layer.bias, layer.num_layers, dropout, training,
                    layer.bidirectional, layer.batch_first)
    output = result[0]
    hidden = tuple(result[1:]) if layer.mode == "LSTM" else result[1]
    if not batched:
        output = output.squeeze(batch_dim)
        hidden = tuple(h.squeeze(1) for h in hidden) if isinstance(hidden, tuple) else hidden.squeeze(1)
    return output, layer.permute_hidden(hidden, None)
