"""ApproxQuantizer: the contract every quantizer family implements.

A family computes the quantization parameters of a tensor, and that is all a layer, the
bias grid, calibration, statistics and export ever ask of it:

- ``compute_qparams(x) -> QParams`` (abstract): the scale (step), zero point, integer range
  and clip range for ``x`` (see :mod:`torchapprox.quantizers.qparams`). Callers use
  :meth:`ApproxQuantizer.qparams`, which checks x and feeds calibration first.
- the one rounding op, :func:`~torchapprox.quantizers.qparams.quantize_dequantize`,
  applies them; :meth:`fake_quantize` is that pair, and a family may override it with a
  fused kernel that computes the very same values (tests hold it to the pair).
- ``differentiable_qparams``: whether the parameters take a gradient in the current mode
  (learned steps, a range gradient): layers then keep the grid values for backward rather
  than recompute them.
- optional hooks: :meth:`on_bitwidth_change` (a learned step moves to the new grid),
  :meth:`state_tensors` / :meth:`load_state_tensors` (tensors kept between calls, outside
  ``state_dict``), :meth:`synchronize` (their reduction across DDP ranks),
  :meth:`begin_calibration` / :meth:`end_calibration` (static ranges).

A quantizer is built from a :class:`torchapprox.QuantSpec` (``spec``) plus what the layer
knows (``role``: "weight" or "input"; ``channel_axis`` and ``channel_groups`` for
per-channel weights), through the registry (:func:`torchapprox.register_quantizer`).
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch
from torch import nn

MIN_BITWIDTH = 2
MAX_BITWIDTH = 32


def check_bitwidth(bitwidth: object, name: str = "bitwidth") -> int:
    """Return ``bitwidth`` as an int, or raise a TypeError/ValueError that names it.

    bool is rejected even though it is an int subclass: ``True`` bits is a bug, not 1 bit.
    """
    if isinstance(bitwidth, bool) or not isinstance(bitwidth, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an int in {MIN_BITWIDTH}..{MAX_BITWIDTH}, "
            f"got {bitwidth!r} of type {type(bitwidth).__name__}"
        )
    bitwidth = int(bitwidth)
    if not MIN_BITWIDTH <= bitwidth <= MAX_BITWIDTH:
        raise ValueError(
            f"`{name}` must be an int in {MIN_BITWIDTH}..{MAX_BITWIDTH}, got {bitwidth}"
        )
    return bitwidth


def check_float_tensor(x: object, name: str = "x") -> torch.Tensor:
    """``x`` if it is a floating-point tensor; a TypeError naming its dtype otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor (float16, bfloat16, float32 or float64) to be "
            f"quantized, got dtype {x.dtype}"
        )
    return x


class RangeObserver:
    """The lowest and highest values seen during a calibration (float32, on x's device)."""

    def __init__(self) -> None:
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        low, high = torch.aminmax(x.detach().float())
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)

    def range(self) -> torch.Tensor | None:
        return None if self.low is None else torch.stack([self.low, self.high])


class ApproxQuantizer(nn.Module, ABC):
    """A quantizer of one tensor onto an integer grid, as its :class:`QuantSpec` says.

    ``quantize(x)`` gives the integer levels (in x's dtype, with the straight-through
    gradient times ``1 / scale``); calling the module fake-quantizes (the levels back in
    x's float range, straight through). ``scale_factor`` (``1 / scale``) and ``scale`` are
    those of the last direct call, kept only so that they can be read; layers use
    :meth:`qparams` / :meth:`fake_quantize`, which keep nothing.

    Subclasses implement :meth:`compute_qparams` and are registered with
    :func:`torchapprox.register_quantizer` (see the module docstring for the whole contract).
    """

    family: str = ""  # the registered name (set by register_quantizer)
    supports_calibration: bool = False  # whether end_calibration can freeze a static range

    def __init__(self, spec, *, role: str | None = None, channel_axis: int | None = None,
                 channel_groups: int = 1) -> None:
        from ..spec import QuantSpec

        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"`spec` must be a torchapprox.QuantSpec, got {spec!r}")
        self.spec = spec
        self.role = role  # "weight" or "input": what attach() put this quantizer on (None: used alone)
        self.channel_axis = channel_axis
        self.channel_groups = int(channel_groups)
        # set_bitwidth leaves a pinned quantizer (a rule set its bits) at its own bits.
        self.pinned = False
        self._observer: RangeObserver | None = None
        self._collector = None  # set by an open statistics collector (torchapprox.statistics)
        self._last_scale: torch.Tensor | None = None

    @classmethod
    def from_spec(cls, spec, *, role: str | None = None, channel_axis: int | None = None,
                  channel_groups: int = 1, tensor: torch.Tensor | None = None) -> ApproxQuantizer:
        """The quantizer ``spec`` describes, for a tensor of the given role and layout.
        ``tensor``: the weight itself, for weights (a family may initialise from it)."""
        return cls(spec, role=role, channel_axis=channel_axis, channel_groups=channel_groups)

    @classmethod
    def check_spec(cls, spec) -> None:
        """Refuse, with a ValueError naming the field, a spec this family cannot compute
        (called once, when the spec is built). The default accepts every spec."""

    # Plain attributes written on direct calls: set without nn.Module.__setattr__'s checks.
    _PER_CALL = frozenset(("_last_scale", "_collector"))

    def __setattr__(self, name: str, value) -> None:
        if name in self._PER_CALL:
            self.__dict__[name] = value
        elif name == "spec":
            self.__dict__["spec"] = value
            self._refresh_plan()
        else:
            super().__setattr__(name, value)

    def _refresh_plan(self) -> None:
        """Called whenever the spec changes: a family caches what its hot path reads."""

    _NARROW = (torch.float16, torch.bfloat16)

    def _apply(self, fn, recurse: bool = True):
        # model.half() / .to(torch.bfloat16) would narrow the quantizer's own tensors (ranges,
        # learned steps) too, and a step computed from a float16 range is floored at 6e-5:
        # a 16-bit grid would lose most of its levels. They keep their width (and follow the
        # module to its device); the arithmetic runs in float32 for half types anyway.
        # nn.Module._apply is the one place every dtype and device cast goes through; torch
        # offers no public hook for casts.
        originals = {name: t.data for name, t in [*self._parameters.items(), *self._buffers.items()]
                     if t is not None and t.is_floating_point() and t.dtype not in self._NARROW}
        module = super()._apply(fn, recurse)
        for name, original in originals.items():
            tensor = self._parameters.get(name) if name in self._parameters else self._buffers.get(name)
            if tensor is not None and tensor.dtype in self._NARROW:  # the values as they were, on the new device
                if name in self._parameters:
                    tensor.data = original.to(tensor.device)
                else:
                    self._buffers[name] = original.to(tensor.device)
        return module

    # ------------------------------------------------------------------------ the spec
    @property
    def bitwidth(self) -> int:
        return self.spec.bits

    @bitwidth.setter
    def bitwidth(self, value: int) -> None:
        value = check_bitwidth(value)  # a rejected value leaves the old bitwidth in place
        old = self.spec.bits
        if value != old:
            self.spec = self.spec.replace(bits=value)
            self.on_bitwidth_change(old, value)

    @property
    def int_max(self) -> int:
        """Largest level of the signed grid: the narrow symmetric range, 8 bits -> [-127, 127]."""
        return 2 ** (self.bitwidth - 1) - 1

    @property
    def grid(self) -> str:
        return self.spec.grid

    @property
    def recompute_in_backward(self) -> bool:
        """Inputs: a layer recomputes the grid values in backward rather than keep them."""
        return self.spec.recompute

    def constant_qparams(self):
        """The :class:`QParams` this quantizer uses whatever the tensor (a stored or learned
        range), or None when they depend on the tensor's values. Export writes constant
        ones as constants. Default: None (export records ``compute_qparams`` itself)."""
        return None

    @property
    def differentiable_qparams(self) -> bool:
        """Whether :meth:`qparams` takes a gradient in the current mode (default: no)."""
        return False

    # ------------------------------------------------------------------- the contract
    def qparams(self, x: torch.Tensor):
        """The :class:`QParams` of ``x`` (fed to a running calibration first).

        Raises:
            TypeError: x is not a floating-point tensor.
        """
        check_float_tensor(x)
        if self._observer is not None:
            self._observer.observe(x)
        from .qparams import QParams

        qp = self.compute_qparams(x)
        if not (isinstance(qp, QParams) and isinstance(qp.scale, torch.Tensor) and isinstance(qp.qmin, int) and isinstance(qp.qmax, int)
                and qp.qmin < qp.qmax):
            raise TypeError(f"{type(self).__name__}.compute_qparams (family {self.family!r}) must return a QParams "
                            f"with a tensor scale and int qmin < qmax, got {qp!r}"[:300])
        return qp

    @abstractmethod
    def compute_qparams(self, x: torch.Tensor):
        """The family's quantization parameters for ``x`` (a float tensor)."""

    def fake_quantize(self, x: torch.Tensor):
        """``(x_fake, qparams)``: x on its grid, straight through (the one rounding op)."""
        from .qparams import quantize_dequantize

        qp = self.qparams(x)
        return quantize_dequantize(x, qp), qp

    def fake_quantize_with_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_fake, scale)``: :meth:`fake_quantize` with the step alone (the 0.2 API, kept
        for one release)."""
        x_fake, qp = self.fake_quantize(x)
        return x_fake, qp.scale

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integer levels of x, in x's dtype; gradient: straight through, times 1 / scale."""
        from .qparams import quantize_levels

        qp = self.qparams(x)
        self._keep_scale(qp)
        return quantize_levels(x, qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fake, qp = self.fake_quantize(x)
        self._keep_scale(qp)
        if self._collector is not None:
            self._collector.record(self, None, x, x_fake, qp)
        return x_fake

    def _keep_scale(self, qp) -> None:
        # One step per tensor (0-dim), else one per channel or per token, flattened.
        scale = qp.channels if qp.channels is not None else qp.scale
        self._last_scale = scale.detach() if scale.dim() == 0 else scale.detach().reshape(-1)

    @property
    def scale(self) -> torch.Tensor | None:
        """The step of the last direct call (``quantize`` or the module), or None before."""
        return self._last_scale

    @property
    def scale_factor(self) -> torch.Tensor | None:
        """``1 / scale`` of the last direct call (the seed's ``int_max / max|x|``), or None."""
        return None if self._last_scale is None else 1.0 / self._last_scale

    # ------------------------------------------------------------------------- hooks
    def on_bitwidth_change(self, old: int, new: int) -> None:
        """Called after the bits changed (a schedule step, ``set_bitwidth``). Default: nothing."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors kept between calls outside ``state_dict()`` (ranges), by name."""
        return {name: buffer for name, buffer in self._buffers.items()
                if buffer is not None and name in self._non_persistent_buffers_set}

    def check_state_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Raise a ValueError when this quantizer cannot use ``tensor`` as its ``name``."""
        if name not in self._buffers:
            raise ValueError(f"{type(self).__name__} keeps no {name!r}")

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], where: str = "quantizer") -> None:
        """Restore what :meth:`state_tensors` returned; every tensor is checked first."""
        for name, tensor in tensors.items():
            try:
                self.check_state_tensor(name, tensor)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        for name, tensor in tensors.items():
            current = self._buffers.get(name)
            device = current.device if current is not None else self._device()
            setattr(self, name, tensor.detach().clone().to(device))

    def _device(self) -> torch.device:
        tensor = next(iter(self.parameters()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def synchronize(self, all_reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        """Make the state tensors equal on every process: ``all_reduce(tensor, op)`` with op
        "min", "max", "sum" or "mean" returns the reduced tensor. Default: nothing to do."""

    def begin_calibration(self) -> None:
        """Start observing the tensors passed to :meth:`qparams` (``torchapprox.calibrate``)."""
        self._observer = RangeObserver()

    @property
    def observed_anything(self) -> bool:
        """During a calibration: whether a tensor reached this quantizer."""
        return self._observer is not None and self._observer.low is not None

    def end_calibration(self) -> torch.Tensor | None:
        """Stop observing; freeze what was seen. Returns ``[low, high]`` or None (nothing seen).
        The default family cannot use a frozen range: it raises a TypeError."""
        self._observer = None
        raise TypeError(f"{type(self).__name__} (quantizer family {self.family!r}) has no static ranges to calibrate")

    def cancel_calibration(self) -> None:
        self._observer = None

    def extra_repr(self) -> str:
        return f"{self.spec!r}" + ("" if self.role is None else f", role={self.role!r}")
