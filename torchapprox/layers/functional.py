"""Building blocks of quantized layer forwards: quantized weights, quantized inputs, the bias
on the accumulator grid, and linear/convolution that keep their float input (not its grid
values) for backward.

Every function reads the layer's quantizers (``<name>_quantizer`` submodules, put there by
``torchapprox.attach``) through the quantizer contract only: ``qparams`` / ``fake_quantize``
and the one rounding op (``torchapprox.quantizers.qparams``). Quantized tensors are passed
explicitly to the functional op: no attribute of the layer is swapped or written during a
forward pass. A layer without a given quantizer computes in float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quantizers import reference
from ..quantizers.approx_quantizer import ApproxQuantizer
from ..quantizers.ops import apply, differentiable, with_eager_twin
from ..quantizers.qparams import QParams, quantize_dequantize, straight_through_mask
from ..quantizers.qparams import _plain_values as rounded_values


def quantizer_of(layer: nn.Module, name: str) -> ApproxQuantizer | None:
    """The layer's quantizer of weight or input ``name`` (``<name>_quantizer``), or None."""
    return layer._modules.get(f"{name}_quantizer")


def _report(layer: nn.Module, name: str, quantizer: ApproxQuantizer, x: Tensor, x_fake: Tensor, qp: QParams) -> None:
    collector = quantizer._collector  # an open statistics collector (torchapprox.statistics)
    if collector is not None:
        collector.record(quantizer, (layer, name), x, x_fake, qp)


def quantized_weight_and_qparams(layer: nn.Module, name: str = "weight") -> tuple[Tensor, QParams | None]:
    """The layer's weight ``name`` fake-quantized by its quantizer, and its quantization
    parameters (the float weight and None without a quantizer).

    The weight is read with ``getattr``, so a pruned weight (``torch.nn.utils.prune``) or a
    parametrized one (``weight_norm``, ``spectral_norm``, any ``torch.nn.utils.parametrize``)
    is quantized on its effective value, with gradients reaching the tensors behind it.
    """
    quantizer, weight = quantizer_of(layer, name), getattr(layer, name)
    if quantizer is None:
        return weight, None
    weight_fake, qp = quantizer.fake_quantize(weight)
    _report(layer, name, quantizer, weight, weight_fake, qp)
    return weight_fake, qp


def quantized_weight(layer: nn.Module, name: str = "weight") -> Tensor:
    """The layer's weight ``name``, fake-quantized by its quantizer (float without one)."""
    return quantized_weight_and_qparams(layer, name)[0]


def quantized_input(layer: nn.Module, x: Tensor, name: str = "input") -> Tensor:
    """The float input ``x`` fake-quantized by the layer's ``<name>_quantizer``."""
    quantizer = quantizer_of(layer, name)
    if quantizer is None:
        return x
    x_fake, qp = quantizer.fake_quantize(x)
    _report(layer, name, quantizer, x, x_fake, qp)
    return x_fake


# An integer runtime adds the bias to the int32 accumulator of input x weight levels.
BIAS_LIMIT = 2**31 - 1


def quantized_bias(bias: Tensor | None, weight_qparams: QParams | None, input_qparams: QParams | None
                   ) -> Tensor | None:
    """The bias on the grid of the int32 accumulator when the input's parameters are constant.

    An integer runtime computes a quantized linear or convolution layer as an int32 sum of
    input levels times weight levels plus the bias quantized to int32 at the product of
    the two steps, ``round(bias / (s_input * s_weight))`` (ONNX's QLinearConv, QGemm and
    MatMulInteger paths). So when the input's parameters are constant (a calibrated or
    running range, a learned step; ``QParams.constant``) the bias is put on that grid here
    too, straight through (no gradient reaches the steps through it), and the exported
    model computes the trained numbers. A channel whose bias does not fit in int32 at that
    step (a tiny step: 16 bits, small weights), or whose grid value its dtype cannot hold
    within half a step (a step below the bias's float resolution), keeps its float bias:
    the bias never moves by more than half its grid step. With scales taken from each tensor the runtime cannot
    precompute the bias's scale and keeps it in float, and so does this function.

    Args:
        bias: the layer's bias (1-D, one per output channel) or None.
        weight_qparams: the weight's parameters (``QParams.channels`` per output channel).
        input_qparams: the input's parameters.
    """
    if bias is None or weight_qparams is None or input_qparams is None or not input_qparams.constant:
        return bias
    if input_qparams.scale.dim() != 0 or input_qparams.zero_point is not None and input_qparams.zero_point.dim():
        return bias  # not one input step: no single accumulator grid
    dtype = reference.compute_dtype(bias.dtype)
    weight_step = weight_qparams.channel_scale().detach()
    step = (input_qparams.scale.detach().to(weight_step.dtype) * weight_step).to(dtype)
    if torch.compiler.is_exporting():
        # The integer bias of the exported graph (export_onnx checks beforehand that every
        # channel fits in int32, where the two computations agree).
        from ..export.ops import bias_on_grid

        return torch.ops.torchapprox.bias_on_grid(bias.detach().to(dtype), step).to(bias.dtype)
    with torch.no_grad():
        compute = bias.detach().to(dtype)
        level = torch.round(compute / step)
        fits = torch.logical_and(level.abs() <= BIAS_LIMIT, torch.isfinite(level))
        on_grid = torch.where(fits, level * step, compute).to(bias.dtype)
        # A step finer than the bias's own float resolution: the grid value cannot be held in
        # the bias's dtype within half a step, so the bias stays as it is.
        held = (on_grid.to(dtype) - compute).abs() <= step / 2
        on_grid = torch.where(held, on_grid, bias.detach())
    if differentiable(bias) and not torch.jit.is_tracing():
        return bias + (on_grid - bias).detach()  # straight through to the bias
    return on_grid


def _keeps_grid_values(quantizer: ApproxQuantizer, *tensors: Tensor | None) -> bool:
    """Whether a layer quantizes its input outside its own autograd node (and so keeps the
    grid values for backward): no gradient to compute, the quantization parameters take
    a gradient themselves (a range gradient, a learned step), the quantizer asks for it,
    or torch.jit.trace (which records the plain composition: a traced autograd Function is
    an opaque Python node)."""
    return (quantizer.differentiable_qparams or _learns(quantizer) or not quantizer.recompute_in_backward
            or torch.jit.is_tracing() or not differentiable(*tensors))


def _learns(quantizer: ApproxQuantizer) -> bool:
    """Whether the quantizer has parameters of its own that train (a learned step)."""
    return any(p.requires_grad for p in quantizer._parameters.values() if p is not None)


def quantized_linear(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, name: str = "input", *,
                     weight_qparams: QParams | None = None) -> Tensor:
    """``F.linear(quantized x, weight, bias)``; ``weight`` is already quantized (or float).

    With the quantizer's ``recompute`` (the default) the layer saves x, not its grid
    values, and recomputes them in backward: no extra activation lives until backward.
    ``weight_qparams`` (the weight's parameters) puts the bias on the accumulator grid
    when the input's parameters are constant (:func:`quantized_bias`).
    """
    quantizer = quantizer_of(layer, name)
    if quantizer is None:
        return F.linear(x, weight, bias)
    if _keeps_grid_values(quantizer, x, weight, bias):
        x_fake, qp = quantizer.fake_quantize(x)
        _report(layer, name, quantizer, x, x_fake, qp)
        return F.linear(x_fake, weight, quantized_bias(bias, weight_qparams, qp))
    # The quantizer's own fake_quantize (a fused kernel) runs inside the node.
    out, x_fake, qp = apply(_QuantizedLinear, x, weight, bias, quantizer, weight_qparams)
    _report(layer, name, quantizer, x, x_fake, qp)
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
    *,
    weight_qparams: QParams | None = None,
) -> Tensor:
    """``torch.convolution`` of the quantized ``x`` (batched or not) with ``weight``
    (already quantized), saving x rather than its grid values for backward (see
    :func:`quantized_linear`). ``padding`` is a list of ints (pad the input beforehand
    for other padding modes)."""
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x = x.unsqueeze(0)
    geometry = (list(stride), list(padding), list(dilation), transposed,
                [0] * len(stride) if output_padding is None else list(output_padding), groups)
    quantizer = quantizer_of(layer, name)
    if quantizer is None:
        out = torch.convolution(x, weight, bias, *geometry)
    elif _keeps_grid_values(quantizer, x, weight, bias):
        x_fake, qp = quantizer.fake_quantize(x)
        _report(layer, name, quantizer, x, x_fake, qp)
        out = torch.convolution(x_fake, weight, quantized_bias(bias, weight_qparams, qp), *geometry)
    else:
        out, x_fake, qp = apply(_QuantizedConv, x, weight, bias, quantizer, weight_qparams, *geometry)
        _report(layer, name, quantizer, x, x_fake, qp)
    return out.squeeze(0) if unbatched else out


# ---------------------------------------------------------------- the autograd Functions
def _flat(qp: QParams) -> tuple:
    """The parameters an autograd Function takes (tensors and ints, no NamedTuple)."""
    low, high = (None, None) if qp.clip is None else qp.clip
    return qp.scale, qp.zero_point, low, high, qp.qmin, qp.qmax, qp.may_clamp


def _unflat(scale, zero_point, low, high, qmin, qmax, may_clamp) -> QParams:
    return QParams(scale, qmin, qmax, zero_point, None if low is None else (low, high), may_clamp=may_clamp)


def _recompute(x: Tensor, qp: QParams) -> Tensor:
    # Differentiable when backward builds a graph itself (double backward), so that the
    # gradient of the gradient passes straight through the rounding to x as well.
    if torch.is_grad_enabled():
        return quantize_dequantize(x, qp)
    return rounded_values(x, qp)


def _setup(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, qp_args: tuple, output) -> None:
    """Save x, the weight and the parameters' tensors (not the grid values)."""
    _, x_fake = output
    ctx.mark_non_differentiable(x_fake)
    # x_fake gets no gradient: without this autograd would pass a tensor of zeros for it,
    # one input-sized allocation and fill per layer and step.
    ctx.set_materialize_grads(False)
    scale, zero_point, low, high, qmin, qmax, may_clamp = qp_args
    ctx.save_for_backward(x, weight, scale, zero_point, low, high)
    ctx.bounds = (qmin, qmax, may_clamp)
    ctx.bias_size = None if bias is None else list(bias.shape)
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)


def _saved(ctx) -> tuple[Tensor, Tensor, QParams]:
    x, weight, scale, zero_point, low, high = ctx.saved_tensors
    return x, weight, _unflat(scale, zero_point, low, high, *ctx.bounds)


def _in_backward_dtype(grad: Tensor, *tensors: Tensor) -> list[Tensor]:
    # Under autocast the forward ran in a lower precision than x and weight hold; compute
    # the gradients in the dtype of the incoming gradient, as autograd's casts would.
    return [t if t.dtype == grad.dtype else t.to(grad.dtype) for t in tensors]


def _input_gradient(ctx, grad_x: Tensor | None, x: Tensor, qp: QParams) -> Tensor | None:
    if grad_x is None:
        return None
    mask = straight_through_mask(x, qp)
    if mask is not None:
        grad_x = grad_x * mask
    return _cast(grad_x, ctx.dtypes[0])


def _cast(grad: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return grad if grad is None or grad.dtype == dtype else grad.to(dtype)


def _linear_backward(ctx, grad_out: Tensor) -> tuple:
    """Gradients of (x, weight, bias)."""
    x, weight, qp = _saved(ctx)
    needs = ctx.needs_input_grad
    grad_fake = grad_weight = grad_bias = None
    flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
    if needs[0]:
        (weight_cast,) = _in_backward_dtype(grad_out, weight)
        grad_fake = grad_out.matmul(weight_cast)
    if needs[1]:
        (x_fake,) = _in_backward_dtype(grad_out, _recompute(x, qp))
        grad_weight = flat_grad.t().mm(x_fake.reshape(-1, x_fake.shape[-1]))
    if needs[2]:
        grad_bias = flat_grad.sum(0)
    return (_input_gradient(ctx, grad_fake, x, qp), _cast(grad_weight, ctx.dtypes[1]),
            _cast(grad_bias, ctx.dtypes[2]))


@with_eager_twin
class _QuantizedLinear(torch.autograd.Function):
    """``F.linear(fake-quantized x, weight, bias)`` that saves x and the quantization
    parameters, not the grid values, and recomputes the grid values in backward with the
    one rounding op. The quantizer's own ``fake_quantize`` runs inside (one fused kernel for
    the min/max family), and the bias goes on the accumulator grid there when the input's
    parameters are constant (straight through). Returns ``(out, x_fake, qparams)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, quantizer, weight_qparams):
        x_fake, qp = quantizer.fake_quantize(x)  # in no-grad mode here: qp holds no history
        return F.linear(x_fake, weight, quantized_bias(bias, weight_qparams, qp)), x_fake, qp

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, _, _ = inputs
        _setup(ctx, x, weight, bias, _flat(output[2]), output[:2])

    @staticmethod
    def backward(ctx, grad_out, _grad_x_fake, *_):
        if grad_out is None:  # the output was not used (see set_materialize_grads)
            return (None,) * 5
        return (*_linear_backward(ctx, grad_out), None, None)


def _conv_backward(ctx, grad_out: Tensor) -> tuple:
    """Gradients of (x, weight, bias)."""
    x, weight, qp = _saved(ctx)
    needs = ctx.needs_input_grad
    stride, padding, dilation, transposed, output_padding, groups = ctx.geometry
    # The grid values matter only to the weight's gradient; the input's needs x's shape.
    source = _recompute(x, qp) if needs[1] else x
    x_fake, weight_cast = _in_backward_dtype(grad_out, source, weight)
    grad_fake, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out, x_fake, weight_cast, ctx.bias_size, stride, padding, dilation, transposed, output_padding,
        groups, [needs[0], needs[1], needs[2] and ctx.bias_size is not None],
    )
    return (_input_gradient(ctx, grad_fake if needs[0] else None, x, qp),
            _cast(grad_weight if needs[1] else None, ctx.dtypes[1]), _cast(grad_bias if needs[2] else None, ctx.dtypes[2]))


@with_eager_twin
class _QuantizedConv(torch.autograd.Function):
    """``torch.convolution(fake-quantized x, weight, bias, ...)`` that saves x and the
    quantization parameters, not the grid values (see :class:`_QuantizedLinear`); returns
    ``(out, x_fake, qparams)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, quantizer, weight_qparams, stride, padding, dilation, transposed, output_padding,
                groups):
        x_fake, qp = quantizer.fake_quantize(x)  # in no-grad mode here: qp holds no history
        bias = quantized_bias(bias, weight_qparams, qp)
        out = torch.convolution(x_fake, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        return out, x_fake, qp

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, _, _, *geometry = inputs
        _setup(ctx, x, weight, bias, _flat(output[2]), output[:2])
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad_out, _grad_x_fake, *_):
        if grad_out is None:
            return (None,) * 11
        return (*_conv_backward(ctx, grad_out),) + (None,) * 8
