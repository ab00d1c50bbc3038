"""Fake quantization whose gradient also reaches the range: through ``max|x|`` to the
tensor's extreme element.

With the scale taken from the tensor itself, ``x_fake = round(x * L / m) * m / L`` (``m``
the range, ``max|x|`` on the signed grid or ``max(x)`` on the unsigned one, ``L`` the top
level). The seed's quantizer detaches ``m``: the gradient is the straight-through
estimator alone. Letting ``m`` take its gradient adds, for each element,
``d x_fake / d m = (round(u) - u) / L`` with ``u = x * L / m`` (0 where the value is
clipped), the signal LSQ learns its step size from (Esser et al., "Learned Step Size
Quantization", ICLR 2020, eq. 3), here routed to the element that sets the range:
``d m / d x_j = sign(x_j)`` for the extreme element(s) ``j`` (shared evenly between ties,
as ``torch.amax``'s gradient is). Brevitas' abs-max scaling passes the same gradient.

The forward values are those of ``torchapprox::fake_quantize``, bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .ops import with_eager_twin


def _per_slice(tensor: Tensor, reduce: list[int], op) -> Tensor:
    """``op`` over the dimensions in ``reduce``, kept as size 1 (nothing to reduce: as is)."""
    return op(tensor, reduce, keepdim=True) if reduce else tensor


def range_gradient_backward(grad: Tensor, x: Tensor, scale: Tensor, bitwidth: int, grid: str,
                            axes: list[int]) -> Tensor:
    """The gradient of ``fake_quantize(x)`` with respect to x, range term included."""
    compute = x.to(scale.dtype)
    grad_c = grad.to(scale.dtype)
    u = compute / scale
    rounded = torch.round(u)
    qmin, qmax = reference.grid_bounds(bitwidth, grid)
    passing = torch.logical_and(rounded >= qmin, rounded <= qmax)
    reduce = [d for d in range(x.dim()) if d not in axes]
    if grid == "unsigned":
        magnitude = compute
        top_level = torch.full_like(scale, reference.unsigned_max(bitwidth))
    else:
        magnitude = compute.abs()
        top_level = torch.full_like(scale, reference.int_max(bitwidth))
        if grid == "auto":
            unsigned = _per_slice(compute, reduce, torch.amin) >= 0
            top_level = torch.where(unsigned, reference.unsigned_max(bitwidth), top_level)
    top = _per_slice(magnitude, reduce, torch.amax)
    # d loss / d range, per slice; none where the scale is the special 1 (zero range, overflow)
    d_range = _per_slice(grad_c * (rounded - u) * passing, reduce, torch.sum) / top_level
    d_range = torch.where(torch.logical_and(top > 0, torch.isfinite(top_level / top)), d_range, 0.0)
    extreme = magnitude == top
    ties = _per_slice(extreme.to(compute.dtype), reduce, torch.sum).clamp_min(1)
    grad_x = grad_c * passing + extreme * torch.sign(compute) * d_range / ties
    return grad_x.to(x.dtype)


@with_eager_twin
class FakeQuantizeRangeGradient(torch.autograd.Function):
    """``apply(FakeQuantizeRangeGradient, x, bitwidth, grid, axes) -> (x_fake, scale)``:
    the values of ``torchapprox::fake_quantize``, the gradient of the module docstring."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, bitwidth, grid, axes):
        return torch.ops.torchapprox.fake_quantize(x, bitwidth, grid, axes)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, bitwidth, grid, axes = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, output[1])
        ctx.args = (bitwidth, grid, list(axes))

    @staticmethod
    def backward(ctx, grad, _grad_scale):
        if grad is None:
            return None, None, None, None
        x, scale = ctx.saved_tensors
        return range_gradient_backward(grad, x, scale, *ctx.args), None, None, None
