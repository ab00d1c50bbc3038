"""The contract between a quantizer and everything that uses it: quantization parameters,
and the one rounding op that applies them.

A quantizer family computes :class:`QParams` for a tensor (``ApproxQuantizer.qparams``);
layers, the bias grid, calibration, statistics and export all go through these and
:func:`quantize_dequantize` (or :func:`levels`), so the rounding is written once:

    x_c    = clamp(x, clip_low, clip_high)                  (when a clip range is set)
    level  = clamp(round(x_c / scale) + zero_point, qmin, qmax)   (half to even)
    x_fake = (level - zero_point) * scale

which is ONNX's ``QuantizeLinear`` / ``DequantizeLinear`` (with a ``Clip`` before), so an
exported graph computes the same values to the last bit. Half types are computed in the
scale's dtype (float32) and cast back once.

Gradients (``quantize_dequantize`` under autograd): the straight-through estimator for x
(the gradient passes where the value was neither clipped nor clamped to the grid, as in
``torch.fake_quantize_per_tensor_affine``); when the scale requires a gradient (learned
steps), the LSQ gradient of Esser et al., "Learned Step Size Quantization", ICLR 2020,
eq. 3: ``d x_fake / d scale = level - zero_point - x_c / scale`` inside the grid and
``qmin - zero_point`` / ``qmax - zero_point`` where clamped, summed over the elements that
share a scale; when the zero point requires one (a learned offset), ``-scale`` where
clamped and 0 inside (the straight-through estimator of the rounding).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from .ops import RoundToGrid, apply, differentiable, with_eager_twin


class QParams(NamedTuple):
    """Quantization parameters of one tensor (see the module docstring for the formula).

    - ``scale``: the step between levels (ONNX's ``y_scale``), float32 (float64 for a
      float64 tensor); 0-dim for one scale per tensor, else a shape that broadcasts
      against the tensor (per channel: the channel axis kept, size 1 elsewhere).
    - ``qmin``, ``qmax``: the integer range (ints); 4-bit signed is -7, 7.
    - ``zero_point``: None (0, symmetric) or a tensor of the scale's shape, integer-valued.
    - ``clip``: None or ``(low, high)`` 0-dim tensors: x is clamped to this real range first
      (a stored, calibrated range); no gradient passes outside it.
    - ``constant``: the parameters do not depend on the tensor's values (a stored or
      learned range): a runtime can precompute them, so the bias goes on the int32 grid.
    - ``may_clamp``: values may fall outside [qmin, qmax] before clamping (False when the
      scale comes from the tensor's own range on a grid that holds it whole).
    - ``channels``: weights only: the scale of each output channel, 1-D in the order of the
      layer's output channels (for the bias grid), or None for one scale per tensor.
    """

    scale: Tensor
    qmin: int
    qmax: int
    zero_point: Tensor | None = None
    clip: tuple[Tensor, Tensor] | None = None
    constant: bool = False
    may_clamp: bool = True
    channels: Tensor | None = None

    def channel_scale(self) -> Tensor:
        """The step per output channel (1-D), or the one step (0-dim)."""
        return self.channels if self.channels is not None else self.scale

    def detach(self) -> QParams:
        """The same parameters with no autograd history (for export, bias, statistics)."""
        def plain(t):
            return None if t is None else t.detach()

        clip = None if self.clip is None else (self.clip[0].detach(), self.clip[1].detach())
        return self._replace(scale=self.scale.detach(), zero_point=plain(self.zero_point), clip=clip,
                             channels=plain(self.channels))

    @property
    def needs_grad(self) -> bool:
        """Whether the parameters themselves take a gradient (learned or range-attached)."""
        tensors = (self.scale, self.zero_point, *(self.clip or ()))
        return any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- forward values
def _clipped(x: Tensor, qp: QParams) -> Tensor:
    compute = x.to(qp.scale.dtype)
    if qp.clip is not None:
        compute = torch.clamp(compute, qp.clip[0].to(compute.dtype), qp.clip[1].to(compute.dtype))
    return compute


def levels(x: Tensor, qp: QParams) -> Tensor:
    """The integer levels of x (``clamp(round(x_c / scale) + zero_point, qmin, qmax)``), in
    the scale's dtype; no gradient."""
    with torch.no_grad():
        u = torch.round(_clipped(x.detach(), qp) / qp.scale.detach())
        if qp.zero_point is not None:
            u = u + qp.zero_point.detach()
        return torch.clamp(u, qp.qmin, qp.qmax)


def _plain_values(x: Tensor, qp: QParams) -> Tensor:
    """x_fake without autograd: the custom op where it applies (C++ on the CPU)."""
    if qp.zero_point is None:
        source = x if qp.clip is None else _clipped(x, qp)
        out = torch.ops.torchapprox.round_to_grid(source, qp.scale, qp.qmin, qp.qmax)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    level = levels(x, qp)
    return ((level - qp.zero_point) * qp.scale).to(x.dtype)


def straight_through_mask(x: Tensor, qp: QParams) -> Tensor | None:
    """Where the straight-through gradient of x passes (None: everywhere)."""
    if qp.clip is None and not qp.may_clamp:
        return None
    with torch.no_grad():
        compute = x.detach().to(qp.scale.dtype)
        mask = None
        if qp.clip is not None:
            mask = (compute >= qp.clip[0]) & (compute <= qp.clip[1])
        if qp.may_clamp:
            u = torch.round(_clipped(compute, qp) / qp.scale.detach())
            if qp.zero_point is not None:
                u = u + qp.zero_point.detach()
            inside = (u >= qp.qmin) & (u <= qp.qmax)
            mask = inside if mask is None else mask & inside
        return mask


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (the scale's)."""
    if grad.shape == shape:
        return grad
    extra = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(extra))) if extra > 0 else grad
    dims = tuple(d for d, size in enumerate(shape) if size == 1 and grad.shape[d] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def rounding_gradients(grad: Tensor, x: Tensor, qp: QParams, needs: tuple[bool, bool, bool, bool, bool]) -> tuple:
    """The gradients of ``quantize_dequantize(x, qp)`` given the upstream ``grad``:
    ``(x, scale, zero_point, clip low, clip high)``, each None unless ``needs`` asks for it
    (see the module docstring for the formulas). With ``u = x_c / scale + zero_point``
    rounded to ``r``: x passes where ``qmin <= r <= qmax`` and inside the clip range; the
    scale gets ``r - zero_point - x_c / scale`` inside and the clamped level minus the zero
    point outside; the zero point ``-scale`` outside; a clip bound the gradient of the
    values clamped to it (the values it moved pass straight through the rounding)."""
    scale, zero_point = qp.scale.detach(), None if qp.zero_point is None else qp.zero_point.detach()
    low, high = (None, None) if qp.clip is None else (qp.clip[0].detach(), qp.clip[1].detach())
    compute_grad = grad.to(scale.dtype)
    compute = x.detach().to(scale.dtype)
    x_c = compute if low is None else torch.clamp(compute, low, high)
    rounded = torch.round(x_c / scale)
    if zero_point is not None:
        rounded = rounded + zero_point
    below, above = rounded < qp.qmin, rounded > qp.qmax
    inside = ~(below | above)
    grads: list[Tensor | None] = [None] * 5
    if needs[0]:
        passing = inside if low is None else inside & (compute >= low) & (compute <= high)
        grads[0] = (compute_grad * passing).to(x.dtype)
    zp = 0.0 if zero_point is None else zero_point
    if needs[1]:
        clamped = torch.where(below, qp.qmin - zp, qp.qmax - zp)
        grads[1] = _reduce_to(compute_grad * torch.where(inside, rounded - zp - x_c / scale, clamped), scale.shape)
    if needs[2] and zero_point is not None:
        grads[2] = _reduce_to(compute_grad * torch.where(inside, 0.0, -scale), zero_point.shape)
    if low is not None and (needs[3] or needs[4]):
        through = compute_grad * inside
        if needs[3]:
            grads[3] = _reduce_to(through * (compute < low), low.shape)
        if needs[4]:
            grads[4] = _reduce_to(through * (compute > high), high.shape)
    return tuple(grads)


def _setup_qparams(ctx, inputs, output) -> None:
    """setup_context of the Functions below: they take ``(x, scale, zero_point, low, high,
    qmin, qmax)`` and keep x and the parameters."""
    x, scale, zero_point, low, high, qmin, qmax = inputs
    ctx.save_for_backward(x, scale, zero_point, low, high)
    ctx.bounds = (qmin, qmax)


def _saved_qparams(ctx) -> tuple[Tensor, QParams]:
    x, scale, zero_point, low, high = ctx.saved_tensors
    return x, QParams(scale, *ctx.bounds, zero_point, None if low is None else (low, high))


@with_eager_twin
class _QuantizeDequantize(torch.autograd.Function):
    """The rounding with gradients for x, the scale, the zero point and the clip range."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale, zero_point, low, high, qmin, qmax):
        return _plain_values(x, QParams(scale, qmin, qmax, zero_point, None if low is None else (low, high)))

    setup_context = staticmethod(_setup_qparams)

    @staticmethod
    def backward(ctx, grad):
        x, qp = _saved_qparams(ctx)
        return (*rounding_gradients(grad, x, qp, tuple(ctx.needs_input_grad[:5])), None, None)


def quantize_dequantize(x: Tensor, qp: QParams) -> Tensor:
    """``x`` on the grid ``qp`` describes, in x's dtype (the module docstring's formula),
    with the straight-through gradient for x and LSQ's for a scale that requires one.

    Under ``torch.export`` (ONNX export) the rounding is recorded as one
    ``torchapprox::export_qdq`` op, which the exporter writes as QuantizeLinear /
    DequantizeLinear.

    Raises:
        TypeError: x is not a floating-point tensor.
    """
    if torch.compiler.is_exporting():
        from ..export.ops import export_qdq

        return export_qdq(x, qp)
    if x.numel() == 0:
        return x.clone() if not differentiable(x) else x * 1.0
    if not differentiable(x, qp.scale, qp.zero_point, *(qp.clip or ())) or torch.jit.is_tracing():
        return _plain_values(x, qp)
    if qp.needs_grad or qp.zero_point is not None or qp.clip is not None:  # the general node
        low, high = (None, None) if qp.clip is None else qp.clip
        return apply(_QuantizeDequantize, x, qp.scale, qp.zero_point, low, high, qp.qmin, qp.qmax)
    # The common case: a constant scale, straight through to x (one C++ call on the CPU).
    return apply(RoundToGrid, x, qp.scale, qp.qmin, qp.qmax)


@with_eager_twin
class _Levels(torch.autograd.Function):
    """The integer levels, with the straight-through gradient times ``1 / scale``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale, zero_point, low, high, qmin, qmax):
        return levels(x, QParams(scale, qmin, qmax, zero_point, None if low is None else (low, high))).to(x.dtype)

    setup_context = staticmethod(_setup_qparams)

    @staticmethod
    def backward(ctx, grad):
        x, qp = _saved_qparams(ctx)
        grad_x = grad.to(qp.scale.dtype) / qp.scale
        mask = straight_through_mask(x, qp)
        if mask is not None:
            grad_x = grad_x * mask
        return grad_x.to(grad.dtype), None, None, None, None, None, None


def quantize_levels(x: Tensor, qp: QParams) -> Tensor:
    """The integer levels of x in x's dtype, with the straight-through gradient times
    ``1 / scale`` (the seed's ``quantize``)."""
    if x.numel() == 0 or not differentiable(x) or torch.jit.is_tracing():
        return levels(x, qp).to(x.dtype)
    qp = qp.detach()
    low, high = (None, None) if qp.clip is None else qp.clip
    return apply(_Levels, x, qp.scale, qp.zero_point, low, high, qp.qmin, qp.qmax)


def grid_bounds(bits: int, grid: str) -> tuple[int, int]:
    """(qmin, qmax) of a grid (``reference.grid_bounds``)."""
    return reference.grid_bounds(bits, grid)


__all__ = ["QParams", "rounding_gradients", "grid_bounds", "levels", "quantize_dequantize", "quantize_levels", "straight_through_mask"]
