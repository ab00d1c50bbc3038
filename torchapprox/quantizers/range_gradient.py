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

The forward values are those of ``torchapprox::fake_quantize``, bit for bit; the backward is
``torchapprox::range_gradient_backward`` (values: ``reference.range_gradient_backward``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .ops import with_eager_twin


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
        if torch.is_grad_enabled():
            # A graph of this backward is being recorded (double backward, torch.func's
            # transforms): differentiable torch ops, which vmap batches too.
            return reference.range_gradient_backward(grad, x, scale, *ctx.args), None, None, None
        # The usual backward: one custom op (on the CPU one C++ kernel, two passes over x).
        return torch.ops.torchapprox.range_gradient_backward(grad, x, scale, *ctx.args), None, None, None
