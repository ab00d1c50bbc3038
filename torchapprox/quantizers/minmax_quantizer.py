"""MinMaxQuant: the stateless per-tensor min/max quantizer (symmetric signed by default)."""

from __future__ import annotations

import functools

import torch

from .approx_quantizer import ApproxQuantizer
from .kernels import fused_cpu_ops, round_to_grid


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
    # than dividing by zero. torch.where keeps this on the device (no host sync). A true
    # division (`int_max / tensor` would multiply by the reciprocal, off by an ulp at times),
    # as the fused CPU kernel divides.
    return torch.where(minmax > 0, torch.full_like(minmax, int_max).div_(minmax), 1.0)


GRIDS = ("signed", "unsigned", "auto")


def _grid_range(x: torch.Tensor, bitwidth: int, grid: str):
    """(lower, upper, scale) of the unsigned grid [0, 2^b - 1], or for ``grid="auto"`` of
    whichever grid fits this tensor: unsigned when min(x) >= 0, else signed. The choice is
    a torch.where on the device, so it costs no host sync."""
    low, high = torch.aminmax(x.detach())
    dtype = _compute_dtype(x)
    low, high = low.to(dtype), high.to(dtype)
    unsigned_max, signed_max = 2**bitwidth - 1, 2 ** (bitwidth - 1) - 1
    if grid == "unsigned":
        upper = high.clamp_min(0)
        return torch.zeros_like(upper), upper, _scale_factor(upper, unsigned_max)
    unsigned = low >= 0
    upper = torch.maximum(low.neg(), high)  # == high when unsigned
    # Both scales computed as in the fixed grids, so "auto" equals one of them bit for bit.
    scale = torch.where(unsigned, _scale_factor(upper, unsigned_max), _scale_factor(upper, signed_max))
    return torch.where(unsigned, 0.0, -upper), upper, scale


def _clamp_scale_round(x: torch.Tensor, lower, upper, scale: torch.Tensor) -> torch.Tensor:
    """round(clamp(x, lower, upper) * scale) in the compute dtype, returned in x's dtype."""
    compute = x.to(scale.dtype)
    return torch.clamp(compute, lower, upper).mul_(scale).round_().to(x.dtype)


def _fake_quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The grid values of ``x`` for a known scale: the one elementwise pass of FakeQuant."""
    if x.dtype == scale.dtype:  # the common case, without the dispatch of two no-op .to()
        return round_to_grid(x, scale)
    return round_to_grid(x.to(scale.dtype), scale).to(x.dtype)


class MinMaxQuant(ApproxQuantizer):
    """Per-tensor min/max quantizer, symmetric and signed by default.

    ``minmax = max|x|`` of the tensor being quantized, ``scale_factor = int_max / minmax``,
    ``quantize(x) = round(clamp(x, -minmax, minmax) * scale_factor)``. Nothing is accumulated
    between calls: the scale factor of the last call is kept only so it can be read.

    ``grid="unsigned"`` uses the integer range [0, 2^b - 1] with ``minmax = max(x)``
    (negative values are clipped to 0): a non-negative tensor, such as the output of a ReLU,
    gets all 2^b levels instead of the 2^(b-1) non-negative levels of the signed grid.
    ``grid="auto"`` chooses per tensor: unsigned when ``min(x) >= 0``, signed otherwise.

    Example::

        >>> q = MinMaxQuant(bitwidth=4)
        >>> q.quantize(torch.tensor([-1.0, 0.2, 0.5]))
        tensor([-7.,  1.,  4.])
        >>> q(torch.tensor([-1.0, 0.2, 0.5]))  # fake-quantized: grid values in x's range
        tensor([-1.0000,  0.1429,  0.5714])
    """

    class Quant(torch.autograd.Function):
        """round(clamp(x, -minmax, minmax) * int_max / minmax), straight through the rounding."""

        # forward/setup_context split and a generated vmap rule: torch.func (vmap, grad)
        # can run it too.
        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor, minmax: torch.Tensor, int_max: int) -> torch.Tensor:
            return _clamp_scale_round(x, -minmax, minmax, _scale_factor(minmax, int_max))

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            _, minmax, int_max = inputs
            ctx.save_for_backward(_scale_factor(minmax, int_max))

        @staticmethod
        def backward(ctx, grad_x_quant: torch.Tensor):
            (scale_factor,) = ctx.saved_tensors
            return (grad_x_quant * scale_factor).to(grad_x_quant.dtype), None, None

    class FakeQuant(torch.autograd.Function):
        """round(x * scale_factor) / scale_factor in one allocation, identity gradient.

        Equal to ``Quant(...) / scale_factor`` to the last bit: minmax is max|x|, so the
        clamp of ``Quant`` never changes a value and is skipped here.
        """

        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor, scale_factor: torch.Tensor) -> torch.Tensor:
            return _fake_quantize_with_scale(x, scale_factor)

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            pass

        @staticmethod
        def backward(ctx, grad_x_fake: torch.Tensor):
            return grad_x_fake, None

    class QuantRange(torch.autograd.Function):
        """round(clamp(x, lower, upper) * scale), straight through the rounding (any grid)."""

        generate_vmap_rule = True

        @staticmethod
        def forward(x, lower, upper, scale):
            return _clamp_scale_round(x, lower, upper, scale)

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            ctx.save_for_backward(inputs[3])

        @staticmethod
        def backward(ctx, grad):
            (scale,) = ctx.saved_tensors
            return (grad * scale).to(grad.dtype), None, None, None

    def __init__(self, bitwidth: int = 8, *, grid: str = "signed") -> None:
        super().__init__(bitwidth)
        if grid not in GRIDS:
            raise ValueError(f"`grid` must be one of {', '.join(GRIDS)}, got {grid!r}")
        self.grid = grid
        self._scale_factor: torch.Tensor | None = None

    @property
    def unsigned_max(self) -> int:
        """Largest level of the unsigned grid: 2^b - 1 (4 bits -> [0, 15])."""
        return 2**self.bitwidth - 1

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.grid == "signed" else f", grid={self.grid!r}")

    @property
    def scale_factor(self) -> torch.Tensor | None:
        """``int_max / max|x|`` of the last tensor quantized (None before the first)."""
        return self._scale_factor

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        if self.grid != "signed":
            lower, upper, self._scale_factor = _grid_range(x, self.bitwidth, self.grid)
            return MinMaxQuant.QuantRange.apply(x, lower, upper, self._scale_factor)
        minmax = _abs_max(x)
        self._scale_factor = _scale_factor(minmax, self.int_max)
        return MinMaxQuant.Quant.apply(x, minmax, self.int_max)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        # Signed and auto grids have an identity gradient: one fused call where it runs.
        ops = fused_cpu_ops(x) if self.grid != "unsigned" else None
        if ops is not None:
            x_fake, scale = ops.fake_quantize_minmax(x, self.bitwidth, self.grid == "auto")
            recompute = ops.round_to_grid
        else:
            if self.grid == "signed":
                scale = _scale_factor(_abs_max(x), self.int_max)
            else:
                _, _, scale = _grid_range(x, self.bitwidth, self.grid)
                if self.grid == "unsigned":
                    x = x.clamp_min(0)  # below the grid: clipped, with clipped gradient
            x_fake = MinMaxQuant.FakeQuant.apply(x, scale)
            recompute = _fake_quantize_with_scale
        self._scale_factor = scale
        # (Not under torch.func transforms: they do not support saved-tensor hooks.)
        if self.offer_recompute and torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            # The grid values are a pure function of x and the scale: a layer that saves
            # x_fake for its backward can keep x (alive anyway, most often) and recompute.
            source = x.detach()
            self.recompute = (x_fake, source, functools.partial(recompute, source, scale))
        return x_fake
