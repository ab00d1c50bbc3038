"""Layers whose integer products come from an approximate multiplier.

A layer given a :class:`~torchapprox.multipliers.Multiplier` (``ta.attach(..., multiplier=m)``,
``ta.set_multiplier``) computes, instead of ``F.linear(x_fake, w_fake)`` or the convolution,

    out = s_x * s_w * sum_k T[x_q, w_q]  (+ bias)

with ``x_q = x_fake / s_x`` and ``w_q = w_fake / s_w`` the integer levels of its quantized input
and weight, ``T`` the multiplier's table (row = input, column = weight) and the sum exact
(``torchapprox.multipliers``: decomposition, C++ table kernel or plain-torch reference, one
result). ``s_w`` is per tensor or per output channel, ``s_x`` per tensor or per token. The bias
is the quantized layer's (on the int32 accumulator grid when the input's parameters are
constant). The exact multiplier gives the fake-quantized layer's output up to float rounding.

Gradients: the levels pass the gradient straight through (``d x_q / d x_fake = 1 / s_x``), and
the products take the multiplier's ``gradient``: ``"ste"`` (the exact product's, as the original
library) or ``"table"`` (the table's local slopes). So with the exact multiplier every
gradient, learned steps included, is the fake-quantized layer's.

Operands: at most 8 bits, symmetric (no zero point); the weight on the signed grid, the input
on the signed or the unsigned grid (the multiplier's table for that domain: a built-in design
makes either, a table from a file only the one it was made for). Checked where the layer
computes, with an error naming the layer.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..multipliers import Multiplier, approx_conv_levels, approx_linear_levels
from ..multipliers.functional import GRADIENTS
from ..quantizers.qparams import QParams
from .functional import _report, quantized_bias, quantizer_of

MULTIPLIER_ATTR = "_torchapprox_multiplier"


@dataclasses.dataclass(frozen=True)
class MultiplierSetting:
    """What one layer computes its products with: the multiplier, the gradient of the
    products (``"ste"`` or ``"table"``) and the layer's name (for errors)."""

    multiplier: Multiplier
    gradient: str = "ste"
    layer_name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.multiplier, Multiplier):
            raise TypeError(f"`multiplier` must be a torchapprox.multipliers.Multiplier (or None), "
                            f"got {type(self.multiplier).__name__}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"`multiplier_gradient` must be one of {', '.join(map(repr, GRADIENTS))}, "
                             f"got {self.gradient!r}")


def multiplier_of(layer: nn.Module) -> MultiplierSetting | None:
    """The layer's multiplier setting, or None (exact products)."""
    return layer.__dict__.get(MULTIPLIER_ATTR)


def _integer_levels(fake: Tensor, qp: QParams) -> Tensor:
    """The integer levels of a fake-quantized tensor, float32, with the gradient of
    ``fake / scale`` (so a learned step's gradient reaches the scale as in the plain layer).

    The value is ``round(fake / scale)``: the levels ``fake`` was made from, exactly (for
    levels of at most 8 bits the relative error of ``fake`` in any float dtype, bfloat16
    included, moves ``fake / scale`` by less than half a level)."""
    ratio = fake.to(qp.scale.dtype) / qp.scale
    return ratio + (torch.round(ratio) - ratio).detach()


def _check_operand(setting: MultiplierSetting, qp: QParams, role: str, levels: Tensor) -> bool:
    """Raise unless the parameters give levels the multiplier takes; True for a signed input.

    An "auto" grid spans both domains (its qmin < 0 and qmax > 127): the levels themselves
    say which one this tensor took."""
    where = f"layer {setting.layer_name!r} (multiplier {setting.multiplier.name!r})"
    if qp.zero_point is not None and bool((qp.zero_point != 0).any()):
        raise ValueError(f"{where}: the {role} is quantized with a zero point; a multiplier takes symmetric "
                         "operands (a spec without an offset)")
    low, high = (-128, 127) if role == "weight" else (-128, 255)
    if qp.qmin < low or qp.qmax > high:
        allowed = "-128..127" if role == "weight" else "-128..127 (signed) or 0..255 (unsigned)"
        raise ValueError(f"{where}: the {role} has levels {qp.qmin}..{qp.qmax}, but the multiplier takes 8-bit "
                         f"{role}s ({allowed}): quantize the {role} to 8 bits or fewer before products go "
                         "through the multiplier")
    if role == "weight":
        if qp.qmin >= 0:
            raise ValueError(f"{where}: the weight is on the unsigned grid; the multiplier's weight operand is "
                             "signed (use grid='signed' for weights)")
        return True
    if qp.qmin >= 0:
        return False
    if qp.qmax <= 127:
        return True
    return levels.numel() > 0 and bool(levels.detach().amin() < 0)


def _operands(layer: nn.Module, setting: MultiplierSetting, x: Tensor, weight: Tensor, weight_qparams: QParams,
              name: str) -> tuple[Tensor, QParams, Multiplier]:
    """(input levels, input parameters, the multiplier for the input's domain), the weight's
    parameters checked."""
    quantizer = quantizer_of(layer, name)
    if quantizer is None or weight_qparams is None:
        raise ValueError(f"layer {setting.layer_name!r}: a multiplier multiplies integer levels, so the layer's "
                         f"weight and its {name} must both be quantized (attach with weights and activations)")
    x_fake, qp = quantizer.fake_quantize(x)
    _report(layer, name, quantizer, x, x_fake, qp)
    _check_operand(setting, weight_qparams, "weight", weight)
    x_levels = _integer_levels(x_fake, qp)
    signed = _check_operand(setting, qp, "input", x_levels)
    multiplier = setting.multiplier.for_input(
        signed, where=f"layer {setting.layer_name!r} (multiplier {setting.multiplier.name!r})")
    return x_levels, qp, multiplier


def _output_scale(weight_scale: Tensor) -> Tensor:
    """The weight's step per output channel (1-D) or its one step (0-dim), in the layer
    layout (output channels first)."""
    return weight_scale.reshape(-1) if weight_scale.dim() else weight_scale


def approximate_linear(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, weight_qparams: QParams,
                       setting: MultiplierSetting, name: str = "input", *, weight_layout_transposed: bool = False
                       ) -> Tensor:
    """A linear layer with approximate products: ``weight`` [N, K] already fake-quantized
    (``weight_layout_transposed``: it is the transpose of the quantized tensor, whose
    parameters ``weight_qparams`` describe, as transformers' Conv1D stores it)."""
    x_levels, qp, multiplier = _operands(layer, setting, x, weight, weight_qparams, name)
    scale = weight_qparams.scale.t() if weight_layout_transposed and weight_qparams.scale.dim() else weight_qparams.scale
    w_levels = _integer_levels(weight, weight_qparams._replace(scale=scale))
    sums = approx_linear_levels(x_levels, w_levels, multiplier, gradient=setting.gradient)
    collector = quantizer_of(layer, name)._collector
    if collector is not None:  # a statistics step: the exact sums of the same levels, exact in float64
        collector.record_products(layer, sums, F.linear(x_levels.detach().double(), w_levels.detach().double()))
    out = sums * qp.scale * _output_scale(scale)
    bias = quantized_bias(bias, weight_qparams, qp)
    # the dtype F.linear would give: autocast's, else the operands' promotion
    device = x.device.type
    autocast = torch.is_autocast_enabled(device) if device in ("cpu", "cuda") else False
    dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(x.dtype, weight.dtype)
    return (out if bias is None else out + bias).to(dtype)


def approximate_conv(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, weight_qparams: QParams,
                     setting: MultiplierSetting, stride, padding, dilation, groups: int, name: str = "input"
                     ) -> Tensor:
    """A ConvNd (zero ``padding`` as ints, grouped, batched or not) with approximate products."""
    if x.dim() == weight.dim() - 1:  # unbatched: quantized as a batch of one, as the exact layer does
        return approximate_conv(layer, x[None], weight, bias, weight_qparams, setting, stride, padding, dilation,
                                groups, name)[0]
    x_levels, qp, multiplier = _operands(layer, setting, x, weight, weight_qparams, name)
    w_levels = _integer_levels(weight, weight_qparams)
    if qp.scale.dim():
        raise ValueError(f"layer {setting.layer_name!r}: a convolution with a multiplier takes one input scale per "
                         f"tensor, got scales of shape {list(qp.scale.shape)}")
    sums = approx_conv_levels(x_levels, w_levels, multiplier, stride, list(padding), dilation, groups,
                              gradient=setting.gradient)
    collector = quantizer_of(layer, name)._collector
    if collector is not None:  # a statistics step: the exact sums of the same levels, exact in float64
        exact = torch.convolution(x_levels.detach().double(), w_levels.detach().double(), None, list(stride),
                                  list(padding), list(dilation), False, [0] * len(stride), groups)
        collector.record_products(layer, sums, exact)
    spatial = [1] * (weight.dim() - 2)  # output channels come before the spatial dimensions
    w_scale = _output_scale(weight_qparams.scale)
    if w_scale.dim():
        w_scale = w_scale.reshape(-1, *spatial)
    out = (sums * qp.scale * w_scale).to(torch.promote_types(x.dtype, weight.dtype))
    bias = quantized_bias(bias, weight_qparams, qp)
    return out if bias is None else out + bias.reshape(-1, *spatial)
