"""The abstract quantizer interface every torchapprox quantizer implements."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod

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


class ApproxQuantizer(nn.Module, ABC):
    """A quantizer of one tensor onto an integer grid of ``bitwidth`` bits.

    ``quantize(x)`` maps a float tensor to integer values (in x's dtype); calling the module
    fake-quantizes (the grid values back in the float range of ``x``).

    Subclasses implement ``quantize`` and ``scale_factor``. Layers call
    ``fake_quantize_with_scale``, which must not change the quantizer's state (a forward
    pass may run in several threads at once); its default goes through ``fake_quantize``
    and ``scale_factor``, so a subclass that keeps per-call state should override it.

    When ``record_statistics`` is True, each call through a quantized layer (and each call
    of the module) keeps the quantization error of that call in ``last_statistics``. It is
    off by default so that a training step pays nothing for statistics it does not log;
    turning it on is the one case where a forward pass writes to the quantizer.
    """

    def __init__(self, bitwidth: int = 8) -> None:
        super().__init__()
        self._bitwidth = check_bitwidth(bitwidth)
        self.record_statistics = False
        self.last_statistics: dict[str, torch.Tensor] | None = None
        # Read by the quantized layers (see torchapprox.attach): set_bitwidth leaves a pinned
        # quantizer at its own bits; an input quantizer recomputes its grid values in
        # backward rather than keeping them (memory for one elementwise pass).
        self.pinned = False
        self.recompute_in_backward = True
        # "weight" or "input": what attach() put this quantizer on (None when used on its own).
        self.role: str | None = None

    # Plain attributes written on calls: set directly, without nn.Module.__setattr__'s
    # checks for parameters, buffers and submodules (several microseconds per call).
    _PER_CALL = frozenset(("_scale", "last_statistics"))

    def __setattr__(self, name: str, value) -> None:
        if name in self._PER_CALL:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def bitwidth(self) -> int:
        return self._bitwidth

    @bitwidth.setter
    def bitwidth(self, value: int) -> None:
        # Validate before assigning so a rejected value leaves the old bitwidth in place.
        self._bitwidth = check_bitwidth(value)

    @property
    def int_max(self) -> int:
        """Largest grid value: the narrow symmetric range, 8 bits -> [-127, 127]."""
        return 2 ** (self._bitwidth - 1) - 1

    @abstractmethod
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` scaled to the integer range and rounded (integer-valued, x's dtype)."""

    @property
    @abstractmethod
    def scale_factor(self) -> torch.Tensor | None:
        """The factor a float tensor is multiplied by to reach the integer range."""

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Grid values in x's float range. The default divides ``quantize`` by the scale;
        with a straight-through ``quantize`` (gradient * scale) the gradient is identity."""
        return self.quantize(x) / self.scale_factor

    def fake_quantize_with_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fake_quantize(x), scale)``, ``scale`` being the step between levels
        (``1 / scale_factor``), leaving the quantizer unchanged where it can."""
        return self.fake_quantize(x), 1.0 / self.scale_factor

    def constant_scale(self) -> torch.Tensor | None:
        """The step this quantizer uses whatever the tensor (a calibrated or running range
        in its current mode), or None when each tensor's own range decides it."""
        return None

    def fused_kernel_args(self) -> tuple[int, str] | None:
        """``(bitwidth, grid)`` when this quantizer computes exactly
        ``torchapprox::fake_quantize(x, bitwidth, grid, [])`` (a scale from x's own range,
        one per tensor), so that a layer may save x and recompute its grid values in
        backward; None otherwise (the layer then keeps the quantized tensor)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fake = self.fake_quantize(x)
        if self.record_statistics and x.numel() > 0:
            self.last_statistics = quantization_error(x, x_fake, 1.0 / self.scale_factor)
        return x_fake

    def extra_repr(self) -> str:
        return f"bitwidth={self._bitwidth}"


@torch.no_grad()
def quantization_error(
    x: torch.Tensor, x_fake: torch.Tensor, scale: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Scale factor (``1 / scale``, the seed's ``int_max / max|x|``), MSE and SQNR (dB) of
    one quantization, as 0-dim float64 device tensors.

    For a per-channel quantization the scale factor is the mean of the channels' factors.
    float64 because a float64 tensor's factor may exceed float32's range (max|x| = 1e-38
    gives 1.3e40), and a logged inf would read as divergence.
    Nothing here reads a value back to the host. Both powers are clamped to the smallest
    normal float so that an exact quantization (or an all-zero tensor) gives a large finite
    SQNR rather than inf/NaN, which would look like divergence.
    """
    x = x.detach().float()
    error = x_fake.detach().float() - x
    mse = error.square().mean()
    signal = x.square().mean()
    tiny = torch.finfo(torch.float32).tiny
    sqnr_db = 10.0 * (signal.clamp_min(tiny).log10() - mse.clamp_min(tiny).log10())
    scale_factor = 1.0 / scale.detach().double()
    return {"scale_factor": scale_factor.mean(), "mse": mse.double(), "sqnr_db": sqnr_db.double()}
