"""MinMaxQuant: the stateless symmetric per-tensor min/max quantizer."""

from __future__ import annotations

import functools

import torch

from .approx_quantizer import ApproxQuantizer
from .kernels import round_to_grid


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Half types cannot hold large grids (fp16 tops out at 65504, bf16 has 8 mantissa bits),
    # so they are quantized in float32 and cast back; float32 and float64 stay as they are.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    # One pass over memory and no |x| temporary: max|x| = max(-min(x), max(x)).
    low, high = torch.aminmax(x.detach())
    minmax = torch.maximum(low.neg(), high)
    dtype = _compute_dtype(x)
    return minmax if minmax.dtype == dtype else minmax.to(dtype)


def _scale_factor(minmax: torch.Tensor, int_max: int) -> torch.Tensor:
    # An all-zero tensor has minmax 0: any finite scale maps it to zeros, so use 1 rather
    # than dividing by zero. torch.where keeps this on the device (no host sync).
    return torch.where(minmax > 0, int_max / minmax, 1.0)


def _fake_quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The grid values of ``x`` for a known scale: the one elementwise pass of FakeQuant."""
    if x.dtype == scale.dtype:  # the common case, without the dispatch of two no-op .to()
        return round_to_grid(x, scale)
    return round_to_grid(x.to(scale.dtype), scale).to(x.dtype)


class MinMaxQuant(ApproxQuantizer):
    """Symmetric per-tensor min/max quantizer.

    ``minmax = max|x|`` of the tensor being quantized, ``scale_factor = int_max / minmax``,
    ``quantize(x) = round(clamp(x, -minmax, minmax) * scale_factor)``. Nothing is accumulated
    between calls: the scale factor of the last call is kept only so it can be read.

    Example::

        >>> q = MinMaxQuant(bitwidth=4)
        >>> q.quantize(torch.tensor([-1.0, 0.2, 0.5]))
        tensor([-7.,  1.,  4.])
        >>> q(torch.tensor([-1.0, 0.2, 0.5]))  # fake-quantized: grid values in x's range
        tensor([-1.0000,  0.1429,  0.5714])
    """

    class Quant(torch.autograd.Function):
        """round(clamp(x, -minmax, minmax) * int_max / minmax), straight through the rounding."""

        @staticmethod
        def forward(ctx, x: torch.Tensor, minmax: torch.Tensor, int_max: int) -> torch.Tensor:
            scale_factor = _scale_factor(minmax, int_max)
            ctx.save_for_backward(scale_factor)
            compute = x.to(minmax.dtype)
            x_quant = torch.clamp(compute, -minmax, minmax).mul_(scale_factor).round_()
            return x_quant.to(x.dtype)

        @staticmethod
        def backward(ctx, grad_x_quant: torch.Tensor):
            (scale_factor,) = ctx.saved_tensors
            return (grad_x_quant * scale_factor).to(grad_x_quant.dtype), None, None

    class FakeQuant(torch.autograd.Function):
        """round(x * scale_factor) / scale_factor in one allocation, identity gradient.

        Equal to ``Quant(...) / scale_factor`` to the last bit: minmax is max|x|, so the
        clamp of ``Quant`` never changes a value and is skipped here.
        """

        @staticmethod
        def forward(ctx, x: torch.Tensor, scale_factor: torch.Tensor) -> torch.Tensor:
            return _fake_quantize_with_scale(x, scale_factor)

        @staticmethod
        def backward(ctx, grad_x_fake: torch.Tensor):
            return grad_x_fake, None

    def __init__(self, bitwidth: int = 8) -> None:
        super().__init__(bitwidth)
        self._scale_factor: torch.Tensor | None = None

    @property
    def scale_factor(self) -> torch.Tensor | None:
        """``int_max / max|x|`` of the last tensor quantized (None before the first)."""
        return self._scale_factor

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        minmax = _abs_max(x)
        self._scale_factor = _scale_factor(minmax, self.int_max)
        return MinMaxQuant.Quant.apply(x, minmax, self.int_max)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        scale = self._scale_factor = _scale_factor(_abs_max(x), self.int_max)
        x_fake = MinMaxQuant.FakeQuant.apply(x, scale)
        if self.offer_recompute and torch.is_grad_enabled():
            # The grid values are a pure function of x and the scale: a layer that saves
            # x_fake for its backward can keep x (alive anyway, most often) and recompute.
            self.recompute = (x_fake, x.detach(), functools.partial(_fake_quantize_with_scale, x.detach(), scale))
        return x_fake
