"""MinMaxQuant: the min/max quantizer family (the seed's semantics, and the default).

The scale of a tensor comes from its own range (or a stored one):
``scale = top / top_level`` with ``top = max|x|`` on the signed grid (``max(max(x), 0)`` on
the unsigned one) and ``top_level`` the grid's largest level (``2^(b-1) - 1``, or
``2^b - 1`` unsigned); the formula lives in ``reference.scale_from_range`` (and the C++
kernel held to it). Rounding is the one rounding op of ``qparams.py``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from . import reference
from .approx_quantizer import ApproxQuantizer, check_bitwidth, check_float_tensor
from .ops import FakeQuantize, apply
from .qparams import QParams
from .range_gradient import FakeQuantizeRangeGradient
from .registry import register_quantizer

GRIDS = reference.GRIDS
EVAL_RANGES = ("batch", "running")


class _Plan(NamedTuple):
    """What the hot path reads of the spec, computed once per spec."""

    bits: int
    grid: str
    per_channel: bool
    per_token: bool
    running: bool
    range_gradient: bool
    qmin: int
    qmax: int
    may_clamp: bool


def _seed_scale_factor(minmax: torch.Tensor, int_max: int | torch.Tensor) -> torch.Tensor:
    """The seed node's ``int_max / minmax`` (only :class:`MinMaxQuant.Quant` uses it): 1 for
    a zero range or an overflowing quotient, NaN for a NaN or infinite range."""
    factor = torch.as_tensor(int_max, device=minmax.device).to(minmax.dtype) / minmax
    factor = torch.where(torch.logical_and(minmax > 0, torch.isfinite(factor)), factor, 1.0)
    return torch.where(torch.isfinite(minmax), factor, float("nan"))


@register_quantizer("minmax")
class MinMaxQuant(ApproxQuantizer):
    """Min/max quantizer: symmetric and signed, one scale per tensor, by default.

    ``scale = max|x| / int_max`` with ``int_max = 2^(b-1) - 1`` (the narrow symmetric grid:
    4 bits is [-7, 7]); ``quantize(x) = round(x / scale)`` (the integer levels) and calling
    the module fake-quantizes, ``round(x / scale) * scale``, with a straight-through
    (identity) gradient. ``scale_factor = 1 / scale`` is the seed's ``int_max / max|x|``.
    The arithmetic is ONNX's QuantizeLinear/DequantizeLinear (rounding half to even), so
    an integer runtime computes an exported model's values to the last bit. Nothing is
    accumulated between calls (except a running range in training, when asked for): the
    scale of the last direct call is kept only so that it can be read.

    Args:
        bitwidth: bits of the grid, an int in 2..32; or a :class:`torchapprox.QuantSpec`
            (then the other arguments keep their defaults).
        grid: ``"signed"`` (the default, above); ``"unsigned"``: the integer range
            [0, 2^b - 1] with ``top = max(x)``, negative values clipped to 0 (with no
            gradient), so a non-negative tensor such as a ReLU's output gets all 2^b
            levels; ``"auto"``: per tensor (or channel), unsigned when ``min(x) >= 0``,
            signed otherwise.
        axis: ``None`` (one scale per tensor, the seed's quantizer) or a dimension ``k``:
            one scale per slice along ``k`` (per-channel), equal to
            ``torch.fake_quantize_per_channel_affine`` with zero point 0 and range
            [-int_max, int_max] up to rounding ties; ``"token"``: one scale per row of the
            last dimension (dynamic per-token quantization).
        range_gradient: False (the seed's quantizer): the range ``max|x|`` is a constant in
            backward, the gradient is the straight-through estimator alone. True: the
            gradient also flows through the range to the tensor's extreme element (see
            ``range_gradient.py`` for the formula and its source). Forward values are the
            same either way.
        eval_range: ``"batch"`` (each tensor's own range in eval too) or ``"running"`` (in
            eval mode, an exponential moving average, weight ``momentum``, of the ranges
            seen in training mode; per tensor only).

    Special values: an all-zero tensor gets scale 1 and comes out all zero; a range so small
    that the step would fall below the dtype's smallest normal number (max|x| below about
    1.5e-36 in float32 at 8 bits) gets that smallest step: a finite, coarse result. A NaN or
    an infinity anywhere in the tensor gives a NaN scale and an all-NaN result.
    float16 and bfloat16 are quantized in float32 and cast back.

    Stored ranges (outside ``state_dict()``: ``torchapprox.quantizer_state``): ``running_range``
    (``range='running'``) and ``static_range`` (frozen by :meth:`freeze_range` or
    ``torchapprox.calibrate``: values outside it are clipped, in training and eval).

    Raises:
        TypeError: a tensor that is not floating point (integers, bool, complex).
        ValueError: a bad ``bitwidth``, ``grid``, ``axis``, ``eval_range`` or ``momentum``.

    Example::

        >>> q = MinMaxQuant(bitwidth=4)
        >>> q.quantize(torch.tensor([-1.0, 0.2, 0.6]))
        tensor([-7.,  1.,  4.])
        >>> q(torch.tensor([-1.0, 0.2, 0.6]))  # fake-quantized: grid values in x's range
        tensor([-1.0000,  0.1429,  0.5714])
    """

    supports_calibration = True

    class Quant(torch.autograd.Function):
        """The seed's node: ``round(clamp(x, -minmax, minmax) * int_max / minmax)``, with the
        gradient ``upstream * int_max / minmax``. ``int_max`` is a Python int or a tensor.
        Kept for code written against the seed; layers use the quantization parameters."""

        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor, minmax: torch.Tensor, int_max) -> torch.Tensor:
            scale = _seed_scale_factor(minmax, int_max)
            compute = x.to(scale.dtype)
            return torch.clamp(compute, -minmax, minmax).mul(scale).round().to(x.dtype)

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            _, minmax, int_max = inputs
            ctx.save_for_backward(_seed_scale_factor(minmax, int_max))

        @staticmethod
        def backward(ctx, grad_x_quant: torch.Tensor):
            (scale_factor,) = ctx.saved_tensors
            return (grad_x_quant * scale_factor).to(grad_x_quant.dtype), None, None

    def __init__(self, bitwidth=8, *, grid: str = "signed", axis: int | str | None = None,
                 range_gradient: bool = False, eval_range: str = "batch", momentum: float = 0.1,
                 role: str | None = None, channel_axis: int | None = None, channel_groups: int = 1) -> None:
        from ..spec import QuantSpec

        if isinstance(bitwidth, QuantSpec):
            spec = bitwidth
            if channel_axis is None and spec.granularity == "per_channel":
                channel_axis = 0
        else:
            spec, channel_axis = _spec_from_arguments(bitwidth, grid, axis, range_gradient, eval_range, momentum)
        super().__init__(spec, role=role, channel_axis=channel_axis, channel_groups=channel_groups)
        # Outside the state dict, so that checkpoints keep the plain model's keys.
        self.register_buffer("running_range", None, persistent=False)  # (low, high), averaged in training
        self.register_buffer("static_range", None, persistent=False)  # frozen (calibrated) (low, high)
        self._saved_static: torch.Tensor | None = None

    @classmethod
    def from_spec(cls, spec, *, role=None, channel_axis=None, channel_groups=1, tensor=None) -> MinMaxQuant:
        return cls(spec, role=role, channel_axis=channel_axis, channel_groups=channel_groups)

    @classmethod
    def check_spec(cls, spec) -> None:
        if spec.options:
            raise ValueError(f"QuantSpec `options` {dict(spec.options)!r}: the 'minmax' family takes no options")

    # ------------------------------------------------------------------- read-only views
    @property
    def axis(self) -> int | str | None:
        """None (per tensor), the channel dimension (per channel) or "token"."""
        granularity = self.spec.granularity
        return None if granularity == "per_tensor" else "token" if granularity == "per_token" else self.channel_axis

    @property
    def range_gradient(self) -> bool:
        return self.spec.range_gradient

    @property
    def eval_range(self) -> str:
        return "running" if self.spec.range == "running" else "batch"

    @property
    def momentum(self) -> float:
        return self.spec.momentum

    @property
    def unsigned_max(self) -> int:
        """Largest level of the unsigned grid: 2^b - 1 (4 bits -> [0, 15])."""
        return 2**self.bitwidth - 1

    def extra_repr(self) -> str:
        text = f"bitwidth={self.bitwidth}" + ("" if self.grid == "signed" else f", grid={self.grid!r}")
        text += "" if self.axis is None else f", axis={self.axis!r}"
        text += ", range_gradient=True" if self.range_gradient else ""
        return text + ("" if self.spec.range == "dynamic" else f", range={self.spec.range!r}")

    # ------------------------------------------------------------------------ ranges
    def stored_range(self) -> torch.Tensor | None:
        """The ``[low, high]`` this quantizer uses instead of each tensor's own in its
        current mode (frozen, or running in eval), or None (the tensor's own)."""
        if self.static_range is not None:
            return self.static_range
        if self.spec.range == "running" and not self.training:
            return self.running_range
        return None

    @property
    def differentiable_qparams(self) -> bool:
        plan = self._plan
        return plan.range_gradient and self._buffers["static_range"] is None and (self.training or not plan.running)

    def constant_qparams(self) -> QParams | None:
        if self.stored_range() is None:
            return None
        return self.compute_qparams(torch.zeros((), dtype=self.stored_range().dtype))

    def freeze_range(self, value_range: torch.Tensor | None) -> None:
        """Use the fixed range ``[low, high]`` from now on (None: each tensor's own again).

        Values outside it are clipped. Per-tensor quantizers only."""
        if value_range is None:
            self.static_range = None
            return
        if self.axis is not None:
            raise ValueError("a frozen range is one per tensor: the quantizer must have `axis=None`")
        self.static_range = _checked_range(value_range, "value_range")

    @torch.no_grad()
    def _track_range(self, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach())
        batch = torch.stack([low, high]).to(reference.compute_dtype(x.dtype))
        if self.running_range is None:
            self.running_range = batch
        else:
            self.running_range.lerp_(batch.to(self.running_range.device), self.spec.momentum)

    # -------------------------------------------------------------------- the contract
    def _axes(self, x: torch.Tensor) -> list[int]:
        granularity = self.spec.granularity
        if granularity == "per_tensor":
            return []
        if granularity == "per_token":  # one scale per row of the last dimension: per token, per pixel
            return list(range(x.dim() - 1))
        axis = self.channel_axis
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"`axis` {axis} is out of range for a tensor of {x.dim()} dimensions {tuple(x.shape)}")
        return [axis % x.dim()]

    def _grouped(self, x: torch.Tensor) -> bool:
        return self.spec.granularity == "per_channel" and self.channel_groups > 1

    def _dynamic_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale broadcasting against x, scale per output channel or None) of x's own range."""
        # Under torch.export (ONNX export) the plain-ops reference, which the exporter
        # records op by op: the graph computes the scale with the very formula.
        scale_of = reference.minmax_scale if torch.compiler.is_exporting() else torch.ops.torchapprox.minmax_scale
        if self._grouped(x):
            return self._grouped_scale(x.detach(), scale_of)
        scale = scale_of(x.detach(), self.spec.bits, self.spec.grid, self._axes(x))
        return scale, (scale.reshape(-1) if self.spec.granularity == "per_channel" else None)

    def _grouped_scale(self, x: torch.Tensor, scale_of) -> tuple[torch.Tensor, torch.Tensor]:
        # A grouped transposed convolution stores its weight [in, out/groups, ...]: output
        # channel g * (out/groups) + j is column j of the rows of group g. One scale per
        # output channel: reduce each group's rows apart, then repeat the scale over them.
        groups, axis = self.channel_groups, self._axes(x)[0]
        if axis != 1 or x.shape[0] % groups:
            raise ValueError(f"per-channel scales with {groups} groups need the channels on axis 1 of a weight whose "
                             f"first dimension divides into the groups, got axis {axis} and shape {tuple(x.shape)}")
        view = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        scale = scale_of(view, self.spec.bits, self.spec.grid, [0, 2])  # [groups, 1, out/groups, 1, ...]
        channels = scale.reshape(-1)
        full = scale.expand(groups, x.shape[0] // groups, *scale.shape[2:]).reshape(x.shape[0], *scale.shape[2:])
        return full, channels

    def compute_qparams(self, x: torch.Tensor) -> QParams:
        spec = self.spec
        if spec.range == "running" and self.training and self.static_range is None and x.numel() > 0:
            self._track_range(x)
        qmin, qmax = reference.grid_bounds(spec.bits, spec.grid)
        stored = self.stored_range()
        if stored is not None:
            scale, lower, upper = range_scale(stored, spec.bits, spec.grid)
            return QParams(scale, qmin, qmax, clip=(lower, upper), constant=True, may_clamp=False)
        scale, channels = self._dynamic_scale(x)
        return QParams(scale, qmin, qmax, may_clamp=spec.grid == "unsigned", channels=channels)

    def fake_quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """The contract's ``qparams`` + rounding; for a scale from x's own range, one fused
        kernel (``torchapprox::fake_quantize``: the same values; with ``range_gradient``,
        the gradient through the range as well). The hot path of every layer: it reads the
        spec through ``_plan`` (refreshed when the spec changes) and the buffers directly."""
        check_float_tensor(x)
        plan = self._plan
        if (self._observer is not None or self._buffers["static_range"] is not None
                or (plan.running and not self.training) or torch.compiler.is_exporting()):
            return super().fake_quantize(x)
        if plan.running and self.training and x.numel() > 0:
            self._track_range(x)
        grouped = plan.per_channel and self.channel_groups > 1
        if grouped:
            source, axes = x.reshape(self.channel_groups, x.shape[0] // self.channel_groups, *x.shape[1:]), [0, 2]
        else:
            source, axes = x, (self._axes(x) if plan.per_channel or plan.per_token else [])
        gradient = torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing()
        if gradient:
            x_fake, scale = apply(FakeQuantizeRangeGradient if plan.range_gradient else FakeQuantize, source,
                                  plan.bits, plan.grid, axes)
        else:
            x_fake, scale = torch.ops.torchapprox.fake_quantize(source, plan.bits, plan.grid, axes)
        channels = scale.reshape(-1) if plan.per_channel else None
        if grouped:
            x_fake = x_fake.reshape(x.shape)
            scale = scale.expand(*source.shape[:2], *scale.shape[2:]).reshape(x.shape[0], *scale.shape[2:])
        return x_fake, QParams(scale, plan.qmin, plan.qmax, None, None, False, plan.may_clamp, channels)

    def _refresh_plan(self) -> None:
        spec = self.spec
        qmin, qmax = reference.grid_bounds(spec.bits, spec.grid)
        self.__dict__["_plan"] = _Plan(spec.bits, spec.grid, spec.granularity == "per_channel",
                                       spec.granularity == "per_token", spec.range == "running",
                                       spec.range_gradient, qmin, qmax, spec.grid == "unsigned")

    def compute_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The scale (step) of ``x``'s own range (no gradient), in the shape that broadcasts against x."""
        check_float_tensor(x)
        return self._dynamic_scale(x)[0]

    # ------------------------------------------------------------------------- state
    def check_state_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if name == "running_range":
            if self.spec.range != "running":
                raise ValueError(f"a running range is used only by a quantizer with range='running' "
                                 f"(eval_range='running'); this one has range={self.spec.range!r}, so it would be "
                                 "ignored: attach with the options the state was saved with")
            _checked_range(tensor, name)
        elif name == "static_range":
            if self.spec.granularity != "per_tensor":
                raise ValueError(f"a static (calibrated) range is one per tensor; this quantizer has "
                                 f"granularity={self.spec.granularity!r}")
            _checked_range(tensor, name)
        else:
            raise ValueError(f"MinMaxQuant keeps no {name!r} (its state: running_range, static_range)")

    def synchronize(self, all_reduce) -> None:
        # The same collectives on every process, whether this one holds a range or not (a
        # layer that runs on some processes only): the decision follows the spec alone.
        if self.spec.range == "running":
            running = self.running_range
            mine = torch.zeros(3, dtype=torch.float64) if running is None else \
                torch.cat([running.double().cpu(), torch.ones(1, dtype=torch.float64)])
            total = all_reduce(mine, "sum")
            if total[2] > 0:
                device = running.device if running is not None else self._device()
                dtype = running.dtype if running is not None else torch.float32
                self.running_range = (total[:2] / total[2]).to(device, dtype)
        if self.role == "input" and self.spec.granularity == "per_tensor":
            frozen = self.static_range  # the hull: min of the lows, max of the highs
            mine = torch.full((3,), -float("inf"), dtype=torch.float64) if frozen is None else \
                torch.stack([-frozen[0].double().cpu(), frozen[1].double().cpu(), torch.ones((), dtype=torch.float64)])
            widest = all_reduce(mine, "max")
            if widest[2] > 0:
                device = frozen.device if frozen is not None else self._device()
                self.static_range = torch.stack([-widest[0], widest[1]]).to(device, torch.float32
                                                                          if frozen is None else frozen.dtype)

    def begin_calibration(self) -> None:
        # Observe with dynamic ranges: a previous calibration is not applied meanwhile.
        super().begin_calibration()
        self._saved_static, self.static_range = self.static_range, None

    def end_calibration(self) -> torch.Tensor | None:
        observed = self._observer.range() if self._observer is not None else None
        self._observer = None
        if observed is None:
            self.static_range, self._saved_static = self._saved_static, None
            return None
        self._saved_static = None
        self.freeze_range(observed)
        return self.static_range

    def cancel_calibration(self) -> None:
        self._observer = None
        self.static_range, self._saved_static = self._saved_static, None


def _checked_range(value_range, name: str) -> torch.Tensor:
    value_range = torch.as_tensor(value_range).detach().reshape(-1)
    if value_range.numel() != 2 or not value_range.is_floating_point() or \
            not bool(torch.isfinite(value_range).all()) or bool(value_range[0] > value_range[1]):
        raise ValueError(f"`{name}` must hold two finite floats [low, high] with low <= high, "
                         f"got {value_range.tolist()}")
    return value_range.clone()


def _spec_from_arguments(bitwidth, grid, axis, range_gradient, eval_range, momentum):
    """MinMaxQuant's own keywords (each checked under its own name) as a QuantSpec."""
    from ..spec import QuantSpec

    check_bitwidth(bitwidth)
    if grid not in GRIDS:
        raise ValueError(f"`grid` must be one of {', '.join(GRIDS)}, got {grid!r}")
    if not isinstance(range_gradient, bool):
        raise TypeError(f"`range_gradient` must be True or False, got {range_gradient!r}")
    if eval_range not in EVAL_RANGES:
        raise ValueError(f"`eval_range` must be one of {', '.join(EVAL_RANGES)}, got {eval_range!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
        raise ValueError(f"`momentum` must be a number in (0, 1], got {momentum!r}")
    if axis is not None and axis != "token" and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"`axis` must be None (per tensor), an int dimension or 'token', got {axis!r}")
    if eval_range == "running" and axis is not None:
        raise ValueError("`eval_range='running'` keeps one range per tensor: it needs `axis=None`")
    granularity = "per_tensor" if axis is None else "per_token" if axis == "token" else "per_channel"
    spec = QuantSpec(bits=bitwidth, grid=grid, granularity=granularity, range_gradient=range_gradient,
                     range="running" if eval_range == "running" else "dynamic", momentum=momentum)
    return spec, (int(axis) if granularity == "per_channel" else None)


def range_scale(value_range: torch.Tensor, bitwidth: int, grid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, lower, upper) of a stored range ``[low, high]``: the step between levels and
    the clipping bounds (the same ``reference.range_to_scale`` as a tensor's own range)."""
    return reference.range_to_scale(value_range[0], value_range[1], bitwidth, grid)
