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


class ApproxQuantizer(nn.Module, ABC):
    """A quantizer of one tensor onto the symmetric signed integer grid of ``bitwidth`` bits.

    ``quantize(x)`` maps a float tensor to integer values in ``[-int_max, int_max]``;
    calling the module fake-quantizes (the grid values back in the float range of ``x``).

    When ``record_statistics`` is True each call also keeps the quantization error of that
    call (``last_statistics``). It is off by default so that a training step pays nothing
    for statistics it does not log.
    """

    def __init__(self, bitwidth: int = 8) -> None:
        super().__init__()
        self._bitwidth = check_bitwidth(bitwidth)
        self.record_statistics = False
        self.last_statistics: dict[str, torch.Tensor] | None = None
        # When offer_recompute is set (attach sets it on input quantizers), a call with grad
        # enabled leaves (x_fake, x, recompute) here, recompute() giving x_fake again from x:
        # the layer then saves x rather than x_fake for its backward, and clears this at once.
        self.offer_recompute = False
        self.recompute: tuple | None = None

    # Per-call leftovers (tensors of a live autograd graph) that must not be copied or pickled.
    _TRANSIENT = ("recompute", "_weight_cache")
    # Plain attributes written on every call: set directly, without nn.Module.__setattr__'s
    # checks for parameters, buffers and submodules (several microseconds per layer and step).
    _PER_CALL = frozenset(("recompute", "_weight_cache", "_scale_factor", "last_statistics"))

    def __setattr__(self, name: str, value) -> None:
        if name in self._PER_CALL:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: (None if k in self._TRANSIENT else v) for k, v in state.items()}

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fake = self.fake_quantize(x)
        if self.record_statistics and x.numel() > 0:
            self.last_statistics = quantization_error(x, x_fake, self.scale_factor)
        return x_fake

    def extra_repr(self) -> str:
        return f"bitwidth={self._bitwidth}"


@torch.no_grad()
def quantization_error(
    x: torch.Tensor, x_fake: torch.Tensor, scale_factor: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Scale factor, MSE and SQNR (dB) of one quantization, as 0-dim device tensors.

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
    return {"scale_factor": scale_factor.detach().float(), "mse": mse, "sqnr_db": sqnr_db}
