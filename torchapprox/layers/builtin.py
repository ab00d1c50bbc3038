"""The layer types torchapprox quantizes out of the box, registered like any user's own.

| layer type | weights (output-channel axis) | quantized inputs |
|---|---|---|
| ``nn.Linear`` | weight (0) | input |
| ``nn.Conv1d/2d/3d`` | weight (0) | input |
| ``nn.ConvTranspose1d/2d/3d`` | weight (1; grouped: per group and column) | input |
| ``nn.Embedding``, ``nn.EmbeddingBag`` | weight (0: one scale per row) | none (indices) |
| ``nn.MultiheadAttention`` | in_proj_weight or q/k/v_proj_weight (0) | query, key, value |
| ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` | every weight matrix (0) | input (see ``recurrent``) |
| transformers' ``Conv1D`` | weight (1: stored ``[in, out]``) | input |
| ``nn.AvgPool*``, ``nn.AdaptiveAvgPool*``, ``nn.MaxPool*`` (1d/2d/3d) | none | input, only with ``attach(quantize_pooling=True)`` |

Biases stay in float, except where the input's quantization parameters are constant
(calibrated or running ranges, learned steps): then an integer runtime adds them as int32 at
the product of the input and weight steps, and so do these layers (``functional.quantized_bias``).
MultiheadAttention's ``out_proj`` is an ``nn.Linear`` of its own, quantized (or excluded) as one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batchnorm_fold import fold_of
from .approximate import approximate_conv, approximate_linear, multiplier_of
from .folded import folded_forward
from .attention import multihead_attention_forward
from .functional import quantized_conv, quantized_input, quantized_linear, quantized_weight, quantized_weight_and_qparams
from .recurrent import recurrent_forward, recurrent_weights
from .registry import register_layer


@register_layer(nn.Linear, weights={"weight": 0}, multiplier=True)
def linear_forward(layer: nn.Linear, input: Tensor) -> Tensor:
    weight, weight_qparams = quantized_weight_and_qparams(layer)
    setting = multiplier_of(layer)
    if setting is not None:
        return approximate_linear(layer, input, weight, layer.bias, weight_qparams, setting)
    return quantized_linear(layer, input, weight, layer.bias, weight_qparams=weight_qparams)


@register_layer("transformers.pytorch_utils.Conv1D", weights={"weight": 1}, multiplier=True)
def transformers_conv1d_forward(layer: nn.Module, x: Tensor) -> Tensor:
    # transformers' Conv1D (GPT-2 and relatives) stores its weight [in, out] and computes
    # x @ weight + bias: a linear layer with the transposed weight.
    weight, weight_qparams = quantized_weight_and_qparams(layer)
    setting = multiplier_of(layer)
    if setting is not None:
        return approximate_linear(layer, x, weight.t(), layer.bias, weight_qparams, setting,
                                  weight_layout_transposed=True)
    return quantized_linear(layer, x, weight.t(), layer.bias, weight_qparams=weight_qparams)


def _input_and_padding(layer: nn.Module, input: Tensor) -> tuple[Tensor, list[int]]:
    """The input, padded beforehand where the convolution itself cannot pad (a padding mode
    other than zeros, or "same" padding that is larger on one side), and the padding left
    to the convolution: what ``nn.Conv*d.forward`` does, in public functions."""
    dims = len(layer.kernel_size)
    if layer.padding == "valid":
        pads = [(0, 0)] * dims
    elif layer.padding == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        pads = [(total // 2, total - total // 2) for total in totals]
    else:
        pads = [(p, p) for p in layer.padding]
    if layer.padding_mode == "zeros" and all(left == right for left, right in pads):
        return input, [left for left, _ in pads]
    flat = [value for left, right in reversed(pads) for value in (left, right)]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(input, flat, mode=mode), [0] * dims


def _check_no_multiplier(layer: nn.Module, fold) -> None:
    if multiplier_of(layer) is not None:
        raise ValueError(f"{fold.layer_name}: a layer with its BatchNorm folded cannot compute with an approximate "
                         "multiplier (the folded weight's products are what an integer runtime computes); attach "
                         "with fold_batchnorm=False for approximate products")


def conv_forward(layer: nn.Module, input: Tensor) -> Tensor:
    # Padding copies values (or adds zeros), which changes neither max|x| nor the grid a
    # tensor picks, so quantizing the padded input equals padding the quantized one.
    input, padding = _input_and_padding(layer, input)
    fold = fold_of(layer)
    if fold is not None:
        _check_no_multiplier(layer, fold)
        return folded_forward(layer, fold, input, lambda x, w, b, qp: quantized_conv(
            layer, x, w, b, layer.stride, padding, layer.dilation, layer.groups, weight_qparams=qp))
    weight, weight_qparams = quantized_weight_and_qparams(layer)
    setting = multiplier_of(layer)
    if setting is not None:
        return approximate_conv(layer, input, weight, layer.bias, weight_qparams, setting, layer.stride, padding,
                                layer.dilation, layer.groups)
    return quantized_conv(layer, input, weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups,
                          weight_qparams=weight_qparams)


def conv_transpose_forward(layer: nn.Module, input: Tensor, output_size: list[int] | None = None) -> Tensor:
    if layer.padding_mode != "zeros":
        raise ValueError(f"Only 'zeros' padding mode is supported for {type(layer).__name__}")
    dims = len(layer.kernel_size)
    # nn's own rule for the output padding that gives `output_size`; no public function
    # computes it, and this method reads the layer without changing it.
    output_padding = layer._output_padding(input, output_size, layer.stride, layer.padding, layer.kernel_size, dims,
                                           layer.dilation)
    weight, weight_qparams = quantized_weight_and_qparams(layer)
    return quantized_conv(layer, input, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups,
                          transposed=True, output_padding=output_padding, weight_qparams=weight_qparams)


for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_conv, weights={"weight": 0}, forward=conv_forward, multiplier=True)
def _conv_transpose_weights(layer: nn.Module) -> dict[str, tuple[int, int]]:
    # The weight is [in, out/groups, ...]: with groups, output channel g * (out/groups) + j
    # is column j of group g's rows, so per-channel scales need the groups too.
    return {"weight": (1, layer.groups)}


for _conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_conv, weights=_conv_transpose_weights, forward=conv_transpose_forward)


def _renorm_rows(layer: nn.Module, input: Tensor) -> None:
    # With max_norm, the float layer rescales the looked-up rows of its weight in place on
    # every forward (its documented behaviour): keep doing that to the float master.
    if layer.max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(layer.weight.detach(), input, layer.max_norm, layer.norm_type)


@register_layer(nn.Embedding, weights={"weight": 0}, inputs=())
def embedding_forward(layer: nn.Embedding, input: Tensor) -> Tensor:
    _renorm_rows(layer, input)
    return F.embedding(input, quantized_weight(layer), layer.padding_idx, None, layer.norm_type,
                       layer.scale_grad_by_freq, layer.sparse)


@register_layer(nn.EmbeddingBag, weights={"weight": 0}, inputs=())
def embedding_bag_forward(layer: nn.EmbeddingBag, input: Tensor, offsets: Tensor | None = None,
                          per_sample_weights: Tensor | None = None) -> Tensor:
    _renorm_rows(layer, input)
    return F.embedding_bag(input, quantized_weight(layer), offsets, None, layer.norm_type, layer.scale_grad_by_freq,
                           layer.mode, layer.sparse, per_sample_weights, layer.include_last_offset, layer.padding_idx)


def _attention_weights(layer: nn.MultiheadAttention) -> dict[str, int]:
    if layer.in_proj_weight is not None:  # one packed projection (query, key, value of one size)
        return {"in_proj_weight": 0}
    return {"q_proj_weight": 0, "k_proj_weight": 0, "v_proj_weight": 0}


register_layer(nn.MultiheadAttention, weights=_attention_weights, inputs=("input", "key", "value"),
               forward=multihead_attention_forward)

for _rnn in (nn.RNN, nn.LSTM, nn.GRU):
    register_layer(_rnn, weights=recurrent_weights, forward=recurrent_forward)


def pooling_forward(layer: nn.Module, input: Tensor, *args, **kwargs) -> Tensor:
    # The layer's own computation on its quantized input.
    return type(layer).forward(layer, quantized_input(layer, input), *args, **kwargs)


def quantizable_pooling(layer: nn.Module) -> bool:
    """Whether attach(quantize_pooling=True) quantizes this pooling layer's input: not an
    average pooling with ceil_mode or divisor_override (ONNX Runtime's integer average
    pooling divides a partial window otherwise than torch)."""
    return not (isinstance(layer, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d))
                and (layer.ceil_mode or getattr(layer, "divisor_override", None) is not None))


# Weightless, quantized only with attach(quantize_pooling=True): max pooling commutes with
# rounding and average pooling of a quantized tensor is what an integer runtime averages.
for _pool in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
    register_layer(_pool, weights={}, forward=pooling_forward, pooling=True)
