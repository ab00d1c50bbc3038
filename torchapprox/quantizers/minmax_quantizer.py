"""MinMaxQuant: the stateless min/max quantizer (symmetric, signed, per-tensor by default)."""

from __future__ import annotations

import numbers

import torch

from . import reference
from .approx_quantizer import ApproxQuantizer, check_float_tensor
from .ops import apply, differentiable, fake_quantize_ste, round_to_grid_ste
from .range_gradient import FakeQuantizeRangeGradient

GRIDS = reference.GRIDS
EVAL_RANGES = ("batch", "running")


def _scale_factor(minmax: torch.Tensor, int_max: int | torch.Tensor) -> torch.Tensor:
    """The seed node's ``int_max / minmax``: 1 for a zero range or an overflowing quotient,
    NaN for a NaN or infinite range."""
    factor = torch.as_tensor(int_max, device=minmax.device).to(minmax.dtype) / minmax
    factor = torch.where(torch.logical_and(minmax > 0, torch.isfinite(factor)), factor, 1.0)
    return torch.where(torch.isfinite(minmax), factor, float("nan"))


class _QuantizeWithScale(torch.autograd.Function):
    """``clamp(round(x / scale), qmin, qmax)``, straight through the rounding: the gradient
    is ``upstream / scale`` where the value is not clipped."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale, qmin, qmax):
        return torch.clamp(torch.round(x.to(scale.dtype) / scale), qmin, qmax).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, scale, qmin, qmax = inputs
        ctx.save_for_backward(x, scale)
        ctx.bounds = (qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        passing = reference.straight_through_mask(x, scale, *ctx.bounds)
        return (grad / scale * passing).to(grad.dtype), None, None, None


class MinMaxQuant(ApproxQuantizer):
    """Min/max quantizer: symmetric and signed, one scale per tensor, by default.

    ``minmax = max|x|`` of the tensor being quantized, ``scale_factor = int_max / minmax``
    with ``int_max = 2^(b-1) - 1`` (the narrow symmetric grid: 4 bits is [-7, 7]),
    ``quantize(x) = round(x * scale_factor)``; calling the module fake-quantizes,
    ``round(x * scale_factor) / scale_factor``, with a straight-through (identity) gradient.
    The arithmetic is ONNX's QuantizeLinear/DequantizeLinear, so that an integer runtime
    computes an exported model's values to the last bit: with ``scale = minmax / int_max``
    (the step between levels, ``1 / scale_factor``), ``quantize(x) = round(x / scale)`` and
    the fake quantization ``round(x / scale) * scale``. Rounding is half to even.
    Nothing is accumulated between calls: the scale factor of the last direct call is kept
    only so it can be read (quantized layers use ``fake_quantize_with_scale``, which keeps
    nothing).

    Args:
        bitwidth: bits of the grid, an int in 2..32.
        grid: ``"signed"`` (the default, above); ``"unsigned"``: the integer range
            [0, 2^b - 1] with ``minmax = max(x)``, negative values clipped to 0 (with no
            gradient), so a non-negative tensor such as a ReLU's output gets all 2^b
            levels; ``"auto"``: per tensor (or channel), unsigned when ``min(x) >= 0``,
            signed otherwise.
        axis: ``None`` (one scale per tensor, the seed's quantizer) or a dimension ``k``:
            one scale per slice along ``k`` (per-channel), equal to
            ``torch.fake_quantize_per_channel_affine`` with zero point 0 and range
            [-int_max, int_max] up to rounding ties. ``scale_factor`` then has the size of
            dimension ``k``. ``"token"``: one scale per row of the last dimension (per token of
            a ``(batch, sequence, features)`` input: dynamic per-token quantization).
        range_gradient: False (the seed's quantizer): the range ``max|x|`` is treated as a
            constant in backward, the gradient is the straight-through estimator alone.
            True: the gradient also flows through the range to the tensor's extreme
            element (see ``range_gradient.py`` for the formula and its source). Forward
            values are the same either way.

    Special values: an all-zero tensor gets scale 1 and comes out all zero; a range so small
    that the step would fall below the dtype's smallest normal number (max|x| below about
    1.5e-36 in float32 at 8 bits) gets that smallest step: a finite, coarse result. A NaN or
    an infinity anywhere in the tensor gives a NaN scale and an all-NaN result.
    float16 and bfloat16 are quantized in float32 and cast back.

    Raises:
        TypeError: a tensor that is not floating point (integers, bool, complex).
        ValueError: a bad ``bitwidth``, ``grid`` or ``axis``.

    Example::

        >>> q = MinMaxQuant(bitwidth=4)
        >>> q.quantize(torch.tensor([-1.0, 0.2, 0.6]))
        tensor([-7.,  1.,  4.])
        >>> q(torch.tensor([-1.0, 0.2, 0.6]))  # fake-quantized: grid values in x's range
        tensor([-1.0000,  0.1429,  0.5714])
    """

    class Quant(torch.autograd.Function):
        """The seed's node: ``round(clamp(x, -minmax, minmax) * int_max / minmax)``, with the
        gradient ``upstream * int_max / minmax``. ``int_max`` is a Python int or a tensor."""

        # forward/setup_context split and a generated vmap rule: torch.func can run it too.
        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor, minmax: torch.Tensor, int_max) -> torch.Tensor:
            scale = _scale_factor(minmax, int_max)
            compute = x.to(scale.dtype)
            return torch.clamp(compute, -minmax, minmax).mul(scale).round().to(x.dtype)

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            _, minmax, int_max = inputs
            ctx.save_for_backward(_scale_factor(minmax, int_max))

        @staticmethod
        def backward(ctx, grad_x_quant: torch.Tensor):
            (scale_factor,) = ctx.saved_tensors
            return (grad_x_quant * scale_factor).to(grad_x_quant.dtype), None, None

    def __init__(self, bitwidth: int = 8, *, grid: str = "signed", axis: int | None = None,
                 range_gradient: bool = False, eval_range: str = "batch", momentum: float = 0.1) -> None:
        super().__init__(bitwidth)
        if not isinstance(range_gradient, bool):
            raise TypeError(f"`range_gradient` must be True or False, got {range_gradient!r}")
        if eval_range not in EVAL_RANGES:
            raise ValueError(f"`eval_range` must be one of {', '.join(EVAL_RANGES)}, got {eval_range!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
            raise ValueError(f"`momentum` must be a number in (0, 1], got {momentum!r}")
        if eval_range == "running" and axis is not None:
            raise ValueError("`eval_range='running'` keeps one range per tensor: it needs `axis=None`")
        self.range_gradient = range_gradient
        self.eval_range = eval_range
        self.momentum = float(momentum)
        # (low, high) of the tensors seen in training, averaged: outside the state dict, so
        # that checkpoints keep the plain model's keys (the callback saves it in its own state).
        self.register_buffer("running_range", None, persistent=False)
        # A frozen (calibrated) range, used in training and evaluation alike: constant scales
        # for integer-only deployment (see torchapprox.calibrate). Outside the state dict too.
        self.register_buffer("static_range", None, persistent=False)
        if grid not in GRIDS:
            raise ValueError(f"`grid` must be one of {', '.join(GRIDS)}, got {grid!r}")
        if axis is not None and axis != "token" and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
            raise TypeError(f"`axis` must be None (per tensor), an int dimension or 'token', got {axis!r}")
        self.grid = grid
        self.axis = axis if axis is None or axis == "token" else int(axis)
        self._scale: torch.Tensor | None = None

    @property
    def unsigned_max(self) -> int:
        """Largest level of the unsigned grid: 2^b - 1 (4 bits -> [0, 15])."""
        return 2**self.bitwidth - 1

    def extra_repr(self) -> str:
        text = super().extra_repr() + ("" if self.grid == "signed" else f", grid={self.grid!r}")
        text += "" if self.axis is None else f", axis={self.axis}"
        return text + (", range_gradient=True" if self.range_gradient else "")

    @property
    def scale_factor(self) -> torch.Tensor | None:
        """``int_max / max|x|`` of the last tensor given to ``quantize``/``fake_quantize`` or
        the module (None before the first), as ``1 / scale``; per-channel: one per slice,
        shape ``[C]``."""
        return None if self._scale is None else 1.0 / self._scale

    @property
    def scale(self) -> torch.Tensor | None:
        """The step between levels of the last call, ``max|x| / int_max`` (ONNX's ``y_scale``)."""
        return self._scale

    def _axes(self, x: torch.Tensor) -> list[int]:
        if self.axis is None:
            return []
        if self.axis == "token":  # one scale per row of the last dimension: per token, per pixel
            return list(range(x.dim() - 1))
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(f"`axis` {self.axis} is out of range for a tensor of {x.dim()} dimensions {tuple(x.shape)}")
        return [self.axis % x.dim()]

    def _keep(self, scale: torch.Tensor) -> None:
        self._scale = scale if self.axis is None else scale.reshape(-1)

    def fused_kernel_args(self) -> tuple[int, str] | None:
        plain = (self.axis is None and not self.range_gradient and self.eval_range == "batch"
                 and self.static_range is None)
        return (self.bitwidth, self.grid) if plain else None

    def stored_range(self) -> torch.Tensor | None:
        """The ``[low, high]`` range this quantizer uses instead of each tensor's own in its
        current mode (frozen, or running in eval), or None (the tensor's own)."""
        if self.static_range is not None:
            return self.static_range
        if self.eval_range == "running" and not self.training:
            return self.running_range
        return None

    def constant_scale(self) -> torch.Tensor | None:
        stored = self.stored_range()
        return None if stored is None else range_scale(stored, self.bitwidth, self.grid)[0]

    def freeze_range(self, value_range: torch.Tensor | None) -> None:
        """Use the fixed range ``[low, high]`` from now on (None: each tensor's own again).

        Values outside it are clipped. Per-tensor quantizers only."""
        if value_range is None:
            self.static_range = None
            return
        if self.axis is not None:
            raise ValueError("a frozen range is one per tensor: the quantizer must have `axis=None`")
        value_range = torch.as_tensor(value_range).detach().reshape(-1)
        if value_range.numel() != 2 or not value_range.is_floating_point() or \
                not bool(torch.isfinite(value_range).all()) or bool(value_range[0] > value_range[1]):
            raise ValueError(f"`value_range` must hold two finite floats [low, high] with low <= high, "
                             f"got {value_range.tolist()}")
        self.static_range = value_range.clone()

    def compute_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The scale (step) of ``x``'s range (no gradient), in the shape that broadcasts against x."""
        check_float_tensor(x)
        return torch.ops.torchapprox.minmax_scale(x.detach(), self.bitwidth, self.grid, self._axes(x))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.compute_scale(x)
        self._keep(scale)
        if x.numel() == 0:
            return x.clone()
        return _QuantizeWithScale.apply(x, scale, *reference.grid_bounds(self.bitwidth, self.grid))

    def fake_quantize_with_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_float_tensor(x)
        if self.eval_range == "running" and self.training and x.numel() > 0 and self.static_range is None:
            self._track_range(x)
        stored = self.stored_range()
        if stored is not None:
            return fake_quantize_in_range(x, stored, self.bitwidth, self.grid)
        if self.range_gradient and differentiable(x) and not torch.jit.is_tracing():
            return apply(FakeQuantizeRangeGradient, x, self.bitwidth, self.grid, self._axes(x))
        return fake_quantize_ste(x, self.bitwidth, self.grid, self._axes(x))

    @torch.no_grad()
    def _track_range(self, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach())
        batch = torch.stack([low, high]).to(reference.compute_dtype(x.dtype))
        if self.running_range is None:
            self.running_range = batch
        else:
            self.running_range.lerp_(batch.to(self.running_range.device), self.momentum)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        x_fake, scale = self.fake_quantize_with_scale(x)
        self._keep(scale)
        return x_fake


def range_scale(value_range: torch.Tensor, bitwidth: int, grid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, lower, upper) of a stored range ``[low, high]``: the step between levels and
    the clipping bounds, as :func:`fake_quantize_in_range` (and an exported graph) use them."""
    low, high = value_range[0], value_range[1]
    nonfinite = torch.logical_not(torch.logical_and(torch.isfinite(low), torch.isfinite(high)))
    signed_top = torch.maximum(low.neg(), high)
    if grid == "unsigned":
        top, top_level, lower = high.clamp_min(0), torch.full_like(high, reference.unsigned_max(bitwidth)), 0.0
    else:
        top, top_level, lower = signed_top, torch.full_like(high, reference.int_max(bitwidth)), signed_top.neg()
        if grid == "auto":
            unsigned = low >= 0
            top_level = torch.where(unsigned, reference.unsigned_max(bitwidth), top_level)
            lower = torch.where(unsigned, 0.0, lower)
    lower = torch.as_tensor(lower, dtype=top.dtype, device=top.device)
    return reference.scale_from_range(top, top_level, nonfinite), lower, top


def fake_quantize_in_range(x: torch.Tensor, value_range: torch.Tensor, bitwidth: int, grid: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fake, scale) with the scale of a stored range ``[low, high]`` rather than x's own:
    values outside the range are clipped (no gradient there), the rest rounds as usual."""
    scale, lower, upper = range_scale(value_range, bitwidth, grid)
    clipped = torch.clamp(x.to(scale.dtype), lower, upper)
    x_fake = round_to_grid_ste(clipped, scale, *reference.grid_bounds(bitwidth, grid))
    return x_fake.to(x.dtype), scale
