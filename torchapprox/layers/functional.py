"""Building blocks of quantized layer forwards: quantized weights, quantized inputs, and
linear/convolution that keep their float input (not its grid values) for backward.

Every function reads the layer's quantizers (``<name>_quantizer`` submodules, put there by
``torchapprox.attach``) and passes quantized tensors explicitly to the functional op: no
attribute of the layer is swapped or written during a forward pass, so one model can run
in several threads at once. A layer without a given quantizer computes in float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quantizers import reference
from ..quantizers.approx_quantizer import ApproxQuantizer, check_float_tensor, quantization_error
from ..quantizers.ops import RoundToGrid, apply, differentiable, with_eager_twin


def quantizer_of(layer: nn.Module, name: str) -> ApproxQuantizer | None:
    """The layer's quantizer of weight or input ``name`` (``<name>_quantizer``), or None."""
    return layer._modules.get(f"{name}_quantizer")


def _record(quantizer: ApproxQuantizer, x: Tensor, x_fake: Tensor, scale: Tensor) -> None:
    if quantizer.record_statistics and x.numel() > 0:
        quantizer.last_statistics = quantization_error(x, x_fake, scale)


def quantize_with(quantizer: ApproxQuantizer | None, x: Tensor) -> Tensor:
    """``x`` fake-quantized by ``quantizer`` (as it is without one), statistics recorded."""
    if quantizer is None:
        return x
    x_fake, scale = quantizer.fake_quantize_with_scale(x)
    _record(quantizer, x, x_fake, scale)
    return x_fake


def quantized_weight(layer: nn.Module, name: str = "weight") -> Tensor:
    """The layer's weight ``name``, fake-quantized by its quantizer (float without one).

    The weight is read with ``getattr``, so a pruned weight (``torch.nn.utils.prune``) or a
    parametrized one (``weight_norm``, ``spectral_norm``, any ``torch.nn.utils.parametrize``)
    is quantized on its effective value, with gradients reaching the tensors behind it.
    """
    return quantize_with(quantizer_of(layer, name), getattr(layer, name))


def quantized_weight_and_scale(layer: nn.Module, name: str = "weight") -> tuple[Tensor, Tensor | None]:
    """:func:`quantized_weight` and the step it was quantized with (None without a quantizer)."""
    quantizer, weight = quantizer_of(layer, name), getattr(layer, name)
    if quantizer is None:
        return weight, None
    weight_fake, scale = quantizer.fake_quantize_with_scale(weight)
    _record(quantizer, weight, weight_fake, scale)
    return weight_fake, scale


# An integer runtime adds the bias to the int32 accumulator of input x weight levels.
BIAS_BOUNDS = (-(2**31 - 1), 2**31 - 1)


def quantized_bias(layer: nn.Module, bias: Tensor | None, weight_scale: Tensor | None, name: str = "input"
                   ) -> Tensor | None:
    """The bias on the grid of the accumulator when the input's scale is a constant.

    An integer runtime computes a quantized linear or convolution layer as an int32 sum of
    input levels times weight levels plus the bias quantized to int32 at the product of
    the two steps: ``round(bias / (s_input * s_weight))`` (ONNX's QLinearConv and
    QGemm/MatMulInteger paths; ONNX Runtime rewrites a QDQ graph with constant input
    scales into them). So when the input's scale is a constant (a calibrated or running
    range), the bias is put on that grid here too, with the straight-through gradient,
    and the exported model computes the trained numbers. With scales taken from each
    tensor the runtime cannot precompute the bias's scale, keeps it in float, and so
    does this function. ``weight_scale``: the weight's step, one or one per output channel.
    """
    quantizer = quantizer_of(layer, name)
    if bias is None or weight_scale is None or quantizer is None:
        return bias
    input_scale = quantizer.constant_scale()
    if input_scale is None:
        return bias
    weight_scale = weight_scale.reshape(-1)
    if 1 < weight_scale.numel() < bias.numel():  # grouped transposed convolutions repeat their channels
        weight_scale = weight_scale.repeat(bias.numel() // weight_scale.numel())
    step = (input_scale.to(weight_scale.dtype) * weight_scale).to(reference.compute_dtype(bias.dtype))
    if differentiable(bias) and not torch.jit.is_tracing() and not torch.compiler.is_exporting():
        return apply(RoundToGrid, bias, step, *BIAS_BOUNDS)
    # No gradient to pass (an exported graph: plain ops on constants, folded by the runtime).
    return reference.round_to_grid(bias, step, *BIAS_BOUNDS)


def quantized_input(layer: nn.Module, x: Tensor, name: str = "input") -> Tensor:
    """The float input ``x`` fake-quantized by the layer's ``<name>_quantizer``."""
    return quantize_with(quantizer_of(layer, name), x)


def _recompute_plan(quantizer: ApproxQuantizer | None, x: Tensor, *others: Tensor | None) -> tuple[int, str] | None:
    """(bitwidth, grid) when the layer should save x and recompute its grid values in
    backward; None when there is nothing to save (no grad) or it cannot be recomputed."""
    if quantizer is None or not quantizer.recompute_in_backward:
        return None
    args = quantizer.fused_kernel_args()
    # Under torch.jit.trace the plain composition is recorded: a traced autograd Function
    # is an opaque Python node, and its trace would differ from the no-grad trace check's.
    if args is None or torch.jit.is_tracing() or not differentiable(x, *others):
        return None
    check_float_tensor(x)
    return args


def quantized_linear(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, name: str = "input") -> Tensor:
    """``F.linear(quantized x, weight, bias)``; ``weight`` is already quantized (or float).

    With ``recompute_in_backward`` (the default) the layer saves x, not its grid values,
    and recomputes them in backward: no extra activation lives until backward.
    """
    quantizer = quantizer_of(layer, name)
    plan = _recompute_plan(quantizer, x, weight, bias)
    if plan is None:
        return F.linear(quantize_with(quantizer, x), weight, bias)
    out, x_fake, scale = apply(_QuantizedLinear, x, weight, bias, *plan)
    _record(quantizer, x, x_fake, scale)
    return out


def quantized_conv(
    layer: nn.Module,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    transposed: bool = False,
    output_padding: Sequence[int] | None = None,
    name: str = "input",
) -> Tensor:
    """``torch.convolution`` of the quantized ``x`` (batched or not) with ``weight``
    (already quantized), saving x rather than its grid values for backward (see
    :func:`quantized_linear`). ``padding`` is a list of ints (pad the input beforehand
    for other padding modes)."""
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x = x.unsqueeze(0)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    output_padding = [0] * len(stride) if output_padding is None else list(output_padding)
    quantizer = quantizer_of(layer, name)
    plan = _recompute_plan(quantizer, x, weight, bias)
    if plan is None:
        out = torch.convolution(quantize_with(quantizer, x), weight, bias, stride, padding, dilation, transposed,
                                output_padding, groups)
    else:
        out, x_fake, scale = apply(_QuantizedConv, x, weight, bias, *plan, stride, padding, dilation, transposed,
                                   output_padding, groups)
        _record(quantizer, x, x_fake, scale)
    return out.squeeze(0) if unbatched else out


# ---------------------------------------------------------------- the autograd Functions
def _recompute(x: Tensor, scale: Tensor, bounds: tuple[int, int]) -> Tensor:
    # Differentiable when backward builds a graph itself (double backward), so that the
    # gradient of the gradient passes straight through the rounding to x as well.
    if torch.is_grad_enabled():
        return apply(RoundToGrid, x, scale, *bounds)
    return torch.ops.torchapprox.round_to_grid(x, scale, *bounds)


def _setup(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, bitwidth: int, grid: str, output) -> None:
    _, x_fake, scale = output
    ctx.mark_non_differentiable(x_fake, scale)
    # The outputs x_fake and scale get no gradient: without this autograd would pass a
    # tensor of zeros for each, one input-sized allocation and fill per layer and step.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, scale, weight)
    ctx.bounds = reference.grid_bounds(bitwidth, grid)
    ctx.clips = grid == "unsigned"  # a scale from x's own range clips only below 0 there
    ctx.bias_size = None if bias is None else list(bias.shape)
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)


def _in_backward_dtype(grad: Tensor, *tensors: Tensor) -> list[Tensor]:
    # Under autocast the forward ran in a lower precision than x and weight hold; compute
    # the gradients in the dtype of the incoming gradient, as autograd's casts would.
    return [t if t.dtype == grad.dtype else t.to(grad.dtype) for t in tensors]


def _input_gradient(ctx, grad_x: Tensor | None, x: Tensor, scale: Tensor) -> Tensor | None:
    if grad_x is None:
        return None
    if ctx.clips:
        grad_x = grad_x * reference.straight_through_mask(x, scale, *ctx.bounds)
    return _cast(grad_x, ctx.dtypes[0])


def _cast(grad: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return grad if grad is None or grad.dtype == dtype else grad.to(dtype)


@with_eager_twin
class _QuantizedLinear(torch.autograd.Function):
    """``F.linear(fake_quantize(x), weight, bias)`` that saves x and the scale, not the grid
    values; returns ``(out, x_fake, scale)`` (the last two for statistics only)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, bitwidth, grid):
        x_fake, scale = torch.ops.torchapprox.fake_quantize(x, bitwidth, grid, [])
        return F.linear(x_fake, weight, bias), x_fake, scale

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _setup(ctx, *inputs, output)

    @staticmethod
    def backward(ctx, grad_out, _grad_x_fake, _grad_scale):
        if grad_out is None:  # the output was not used (see set_materialize_grads)
            return None, None, None, None, None
        x, scale, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if needs_x:
            (weight_cast,) = _in_backward_dtype(grad_out, weight)
            grad_x = grad_out.matmul(weight_cast)
        if needs_weight:
            (x_fake,) = _in_backward_dtype(grad_out, _recompute(x, scale, ctx.bounds))
            grad_weight = flat_grad.t().mm(x_fake.reshape(-1, x_fake.shape[-1]))
        if needs_bias:
            grad_bias = flat_grad.sum(0)
        return (_input_gradient(ctx, grad_x, x, scale), _cast(grad_weight, ctx.dtypes[1]),
                _cast(grad_bias, ctx.dtypes[2]), None, None)


@with_eager_twin
class _QuantizedConv(torch.autograd.Function):
    """``torch.convolution(fake_quantize(x), weight, bias, ...)`` that saves x and the scale,
    not the grid values; returns ``(out, x_fake, scale)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, bitwidth, grid, stride, padding, dilation, transposed, output_padding, groups):
        x_fake, scale = torch.ops.torchapprox.fake_quantize(x, bitwidth, grid, [])
        out = torch.convolution(x_fake, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        return out, x_fake, scale

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, bitwidth, grid, *geometry = inputs
        _setup(ctx, x, weight, bias, bitwidth, grid, output)
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad_out, _grad_x_fake, _grad_scale):
        if grad_out is None:  # the output was not used (see set_materialize_grads)
            return (None,) * 11
        x, scale, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        stride, padding, dilation, transposed, output_padding, groups = ctx.geometry
        # The grid values matter only to the weight's gradient; the input's needs x's shape.
        source = _recompute(x, scale, ctx.bounds) if needs[1] else x
        x_fake, weight_cast = _in_backward_dtype(grad_out, source, weight)
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, x_fake, weight_cast, ctx.bias_size, stride, padding, dilation, transposed, output_padding,
            groups, [needs[0], needs[1], needs[2] and ctx.bias_size is not None],
        )
        return (_input_gradient(ctx, grad_x if needs[0] else None, x, scale),
                _cast(grad_weight if needs[1] else None, ctx.dtypes[1]),
                _cast(grad_bias if needs[2] else None, ctx.dtypes[2]),
                None, None, None, None, None, None, None, None)
