"""Conv1d/2d/3d with their BatchNorm folded into the quantized weight (see
:mod:`torchapprox.batchnorm_fold` for the formulas and their source)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..batchnorm_fold import BatchNormFold
from ..quantizers.qparams import QParams
from .functional import _report, quantizer_of


def folded_weight(layer: nn.Module, fold: BatchNormFold) -> Tensor:
    """``weight * gamma / sqrt(running_var + eps)``, per output channel (axis 0)."""
    factor, _ = fold.factors()
    weight = layer.weight
    return weight * factor.to(weight.dtype).reshape(-1, *[1] * (weight.dim() - 1))


def folded_forward(layer: nn.Module, fold: BatchNormFold, input: Tensor,
                   compute: Callable[[Tensor, Tensor | None, QParams | None], Tensor]) -> Tensor:
    """The layer's output with its BatchNorm folded: ``compute(input, weight, bias,
    weight_qparams)`` is the layer's quantized product (``quantized_conv`` bound to the
    layer's geometry)."""
    factor, shift = fold.factors()
    weight = folded_weight(layer, fold)
    quantizer = quantizer_of(layer, "weight")
    weight_qparams = None
    if quantizer is not None:
        quantized, weight_qparams = quantizer.fake_quantize(weight)
        _report(layer, "weight", quantizer, weight, quantized, weight_qparams)
        weight = quantized
    if fold.uses_running_statistics():
        bias = shift if layer.bias is None else shift + layer.bias * factor
        return compute(input, weight, bias.to(weight.dtype), weight_qparams)
    out = compute(input, weight, None, weight_qparams)
    # Undo the running-statistics scale: the BatchNorm that follows normalises with the
    # batch's statistics. A channel with gamma = 0 has a zero weight: divide by 1 there.
    channel_axis = 0 if _unbatched(layer, input) else 1
    shape = [-1 if d == channel_axis else 1 for d in range(out.dim())]
    safe = torch.where(factor == 0, torch.ones_like(factor), factor).to(out.dtype)
    out = out / safe.reshape(shape)
    if layer.bias is not None:
        out = out + layer.bias.reshape(shape)
    return out


def _unbatched(layer: nn.Module, input: Tensor) -> bool:
    return input.dim() == layer.weight.dim() - 1
