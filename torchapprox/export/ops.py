"""The ops an exported model computes with: QDQ in torch, one ONNX pattern each.

``export_onnx`` rewrites a copy of the model so that its quantizers call these, then hands
it to ``torch.onnx.export`` with a translation of each into standard ONNX operators:

- ``torchapprox::dequantize(Tensor q, Tensor scale, int axis)``: integer weights ``q``
  (an int8/int16 buffer, exported as an integer initializer) times their scale (one per
  tensor, or one per slice along ``axis``): ONNX ``DequantizeLinear``.
- ``torchapprox::quantize_dequantize(Tensor x, int bitwidth, str grid)``: x on the grid of
  its own range, the scale computed in the graph (``ReduceMax(Abs(x))``): ONNX
  ``QuantizeLinear`` + ``DequantizeLinear`` with that scale.
- ``torchapprox::quantize_dequantize_static(Tensor x, Tensor scale, float low, float high,
  int bitwidth, str grid)``: x clipped to a calibrated range ``[low, high]`` and put on the
  grid of a constant scale: ``Clip`` + ``QuantizeLinear`` + ``DequantizeLinear``.

Scales are the step between levels (``MinMaxQuant.scale``), and the arithmetic is the
quantizer's: ``x_fake = clamp(round(x / scale), qmin, qmax) * scale``, so that ONNX
Runtime computes the model's values to the last bit (the tests check it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quantizers import reference


def container(bitwidth: int, grid: str) -> torch.dtype:
    """The integer type that holds a grid's levels: int8/uint8 up to 8 bits, 16 bits above.

    The "auto" grid picks signed or unsigned at run time, so its type must hold both:
    int8 up to 7 bits (unsigned levels <= 127), int16 up to 15.

    Raises:
        ValueError: a grid wider than ONNX's 16-bit integer types.
    """
    if grid == "signed" and bitwidth <= 16:
        return torch.int8 if bitwidth <= 8 else torch.int16
    if grid == "unsigned" and bitwidth <= 16:
        return torch.uint8 if bitwidth <= 8 else torch.uint16
    if grid == "auto" and bitwidth <= 15:
        return torch.int8 if bitwidth <= 7 else torch.int16
    raise ValueError(
        f"a {bitwidth}-bit {grid} grid does not fit ONNX's integer types (QuantizeLinear holds at most 16 bits"
        f"{'; the auto grid needs a type for both its signed and unsigned levels: at most 15 bits' if grid == 'auto' else ''})"
    )


def _step(scale: Tensor, q: Tensor, axis: int) -> Tensor:
    return scale if scale.dim() == 0 else scale.reshape([-1 if d == axis else 1 for d in range(q.dim())])


@torch.library.custom_op("torchapprox::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    return q.to(scale.dtype) * _step(scale, q, axis)


@dequantize.register_fake
def _(q, scale, axis):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


def dynamic_step(x: Tensor, bitwidth: int, grid: str) -> Tensor:
    """ONNX's scale for x's own range: ``top / top_level``, 1 for an all-zero tensor."""
    low, high = torch.aminmax(x.detach().float())
    if grid == "unsigned":
        top, level = high.clamp_min(0), torch.tensor(float(reference.unsigned_max(bitwidth)))
    else:
        top = torch.maximum(low.neg(), high)
        level = torch.tensor(float(reference.int_max(bitwidth)))
        if grid == "auto":
            level = torch.where(low >= 0, float(reference.unsigned_max(bitwidth)), level)
    return torch.where(top > 0, (top / level).clamp_min(torch.finfo(torch.float32).tiny), 1.0)


@torch.library.custom_op("torchapprox::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: Tensor, bitwidth: int, grid: str) -> Tensor:
    step = dynamic_step(x, bitwidth, grid)
    qmin, qmax = reference.grid_bounds(bitwidth, grid)
    return (torch.clamp(torch.round(x.float() / step), qmin, qmax) * step).to(x.dtype)


@quantize_dequantize.register_fake
def _(x, bitwidth, grid):
    return torch.empty_like(x)


@torch.library.custom_op("torchapprox::quantize_dequantize_static", mutates_args=())
def quantize_dequantize_static(x: Tensor, scale: Tensor, low: float, high: float, bitwidth: int, grid: str) -> Tensor:
    qmin, qmax = reference.grid_bounds(bitwidth, grid)
    clipped = torch.clamp(x.float(), low, high)
    return (torch.clamp(torch.round(clipped / scale), qmin, qmax) * scale).to(x.dtype)


@quantize_dequantize_static.register_fake
def _(x, scale, low, high, bitwidth, grid):
    return torch.empty_like(x)
