"""The ops an exported model computes with: QDQ in torch, one ONNX pattern each.

``export_onnx`` runs the model's eval computation under ``torch.export``, where the one
rounding op (``torchapprox.quantizers.qparams.quantize_dequantize``) records itself as
``export_qdq``, and weights are integer buffers read through ``dequantize``:

- ``torchapprox::dequantize(Tensor q, Tensor scale, Tensor? zero_point, int axis)``: integer
  weights ``q`` (an int8/int16 buffer, exported as an integer initializer) on their grid
  (one scale per tensor, or one per slice along ``axis``): ONNX ``DequantizeLinear``; scales
  along several dimensions (a grouped ConvTranspose's per-channel ones): ``Cast`` and ``Mul``.
- ``torchapprox::bias_on_grid(Tensor bias, Tensor step)``: a layer's bias on the int32
  accumulator grid (``step``: the input's step times the weight's, one per output channel or
  one): ONNX ``DequantizeLinear`` of the int32 levels ``round(bias / step)``, which ONNX
  Runtime computes once (constant folding) and reads as the integer kernel's bias.
- ``torchapprox::export_qdq(Tensor x, Tensor scale, Tensor? zero_point, int qmin, int qmax,
  bool may_clamp)``: x (in the scale's dtype, float32) on the grid of ``scale``: ONNX
  ``QuantizeLinear`` + ``DequantizeLinear`` in the smallest integer type that holds
  [qmin, qmax] (unsigned for non-negative levels), with an integer ``Clip`` between them
  where the grid is narrower than that type and values may fall outside it.

Everything else (the scale of a tensor's own range, a clip to a calibrated range, casts
of half types to float32) is recorded op by op from the quantizer's own torch code, so the
graph computes the quantization parameters with the very formula PyTorch uses, in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Integer types of QuantizeLinear/DequantizeLinear, smallest first: (dtype, low, high).
CONTAINERS = ((torch.int8, -128, 127), (torch.uint8, 0, 255), (torch.int16, -(2**15), 2**15 - 1),
              (torch.uint16, 0, 2**16 - 1))


def container(qmin: int, qmax: int) -> torch.dtype:
    """The smallest ONNX integer type that holds the levels [qmin, qmax]; an unsigned one
    for non-negative levels (zero point 0 at the type's minimum, which lets ONNX Runtime
    drop a ReLU before the QuantizeLinear and fuse the layer before it).

    Raises:
        ValueError: a range wider than ONNX's 16-bit integer types.
    """
    for dtype, low, high in CONTAINERS:
        if qmin >= 0 and low < 0:
            continue
        if low <= qmin and qmax <= high:
            return dtype
    raise ValueError(f"levels {qmin}..{qmax} do not fit ONNX's integer types (QuantizeLinear holds at most 16 bits)")


def activation_container(qmin: int, qmax: int) -> tuple[torch.dtype, int]:
    """``(type, shift)`` of an activation's levels [qmin, qmax] in ONNX: uint8 (uint16) for
    non-negative levels; signed levels that fit in int8 go to uint8 as well, shifted by 128
    (zero point 128: the same values), because ONNX Runtime's integer convolution takes
    uint8 activations on x86 (and the same type on its input and output); int16 otherwise.

    Raises:
        ValueError: a range wider than ONNX's 16-bit integer types.
    """
    if qmin < 0 and -128 <= qmin and qmax <= 127:
        return torch.uint8, 128
    return container(qmin, qmax), 0


def check_grid(bits: int, grid: str, where: str) -> None:
    """Raise a ValueError naming ``where`` when a grid's levels fit no ONNX integer type."""
    from ..quantizers import reference

    try:
        container(*reference.grid_bounds(bits, grid))
    except ValueError:
        auto = "; the auto grid needs a type for both its signed and unsigned levels: at most 15 bits"
        raise ValueError(f"{where}: a {bits}-bit {grid} grid does not fit ONNX's integer types (QuantizeLinear holds "
                         f"at most 16 bits{auto if grid == 'auto' else ''})") from None


def _step(scale: Tensor, q: Tensor, axis: int) -> Tensor:
    return scale if scale.dim() == 0 else scale.reshape([-1 if d == axis else 1 for d in range(q.dim())])


# ``axis`` of dequantize: a dimension (per-axis scales), -1 (one scale per tensor) or
# ELEMENTWISE: a scale that broadcasts against q along several dimensions (a grouped
# ConvTranspose's per-channel scales), which DequantizeLinear cannot take: q * scale.
ELEMENTWISE = -2


@torch.library.custom_op("torchapprox::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int) -> Tensor:
    if axis == ELEMENTWISE:
        return q.to(scale.dtype) * scale
    levels = q.to(scale.dtype)
    if zero_point is not None:
        levels = levels - _step(zero_point.to(scale.dtype), q, axis)
    return levels * _step(scale, q, axis)


@dequantize.register_fake
def _(q, scale, zero_point, axis):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


@torch.library.custom_op("torchapprox::export_qdq", mutates_args=())
def export_qdq_op(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, may_clamp: bool) -> Tensor:
    level = torch.round(x / scale)
    if zero_point is not None:
        level = level + zero_point
    level = torch.clamp(level, qmin, qmax)
    if zero_point is not None:
        level = level - zero_point
    return level * scale


@export_qdq_op.register_fake
def _(x, scale, zero_point, qmin, qmax, may_clamp):
    return torch.empty_like(x)


@torch.library.custom_op("torchapprox::bias_on_grid", mutates_args=())
def bias_on_grid(bias: Tensor, step: Tensor) -> Tensor:
    return torch.round(bias / step) * step


@bias_on_grid.register_fake
def _(bias, step):
    return torch.empty(torch.broadcast_shapes(bias.shape, step.shape), dtype=bias.dtype, device=bias.device)


def export_qdq(x: Tensor, qp) -> Tensor:
    """The one rounding op as it is exported: casts and the clip as plain ops, the rounding
    as ``torchapprox::export_qdq``. Values equal ``quantize_dequantize``'s."""
    qp = qp.detach()
    compute = x.to(qp.scale.dtype)
    if qp.clip is not None:
        compute = torch.clamp(compute, qp.clip[0].to(compute.dtype), qp.clip[1].to(compute.dtype))
    container(qp.qmin, qp.qmax)  # fails here, before the exporter does, with the levels named
    if qp.scale.dim() > 1 and sum(size > 1 for size in qp.scale.shape) > 0 and qp.scale.shape[-1] == 1:
        # One scale per token (per row of the last dimension), computed in the graph:
        # QuantizeLinear takes one scale per tensor or per axis, so the rounding is written
        # as float ops (ONNX's Round is half to even, as torch.round): the same values, and
        # no integer kernel for ONNX Runtime to run.
        level = torch.round(compute / qp.scale)
        if qp.zero_point is not None:
            level = level + qp.zero_point
        level = torch.clamp(level, qp.qmin, qp.qmax)
        if qp.zero_point is not None:
            level = level - qp.zero_point
        return (level * qp.scale).to(x.dtype)
    out = torch.ops.torchapprox.export_qdq(compute, qp.scale, qp.zero_point, qp.qmin, qp.qmax,
                                           qp.may_clamp and qp.clip is None)
    return out.to(x.dtype)
