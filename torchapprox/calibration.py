"""Static activation scales: freeze each input quantizer's range from calibration data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .quantizers import MinMaxQuant
from .quantizers.approx_quantizer import check_float_tensor


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])  # (inputs, targets), as data loaders yield
    raise TypeError(f"cannot call the model on a batch of type {type(batch).__name__}: pass `forward`")


class _RangeObserver:
    """Wraps an input quantizer's calls during calibration: the quantizer computes as
    usual (dynamic ranges), and the observer keeps the lowest and highest values seen."""

    def __init__(self, quantizer: MinMaxQuant) -> None:
        self.quantizer = quantizer
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        check_float_tensor(x)
        if x.numel() == 0:
            return
        low, high = torch.aminmax(x.detach().float())
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)


def input_quantizers(model: nn.Module) -> dict[str, MinMaxQuant]:
    """The input quantizers ``attach`` put on ``model``, by qualified name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, MinMaxQuant) and module.role == "input"}


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Freeze every input quantizer's range to the min and max it sees on ``batches``.

    From then on each input is quantized with a constant scale (values outside the
    calibrated range are clipped), in training and evaluation alike: what integer-only
    hardware and an ONNX QDQ graph with constant scales compute. Weights keep their own
    ranges. The ranges are non-persistent buffers, outside ``model.state_dict()``:
    :func:`torchapprox.quantizer_state` returns them (the callback keeps them in its
    checkpoint state). Calibrating again replaces them; ``quantizer.freeze_range(None)``
    returns a quantizer to dynamic ranges.

    The model runs in eval mode under ``torch.no_grad()`` (its mode is restored after),
    with dynamic ranges while observing (a previous calibration is not applied).

    Args:
        model: an attached model (``torchapprox.attach``).
        batches: an iterable of batches: tensors, ``(inputs, targets)`` tuples (the inputs
            are passed to the model) or dicts of keyword arguments.
        forward: ``forward(model, batch)`` for other batch layouts.
        max_batches: stop after this many batches (None: all).

    Returns:
        ``{quantizer name: tensor([low, high])}``, float32.

    Raises:
        ValueError: a model without input quantizers, or batches that never reached one.
    """
    quantizers = input_quantizers(model)
    if not quantizers:
        raise ValueError("`model` has no input quantizers to calibrate: attach(model, activations=True) first")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"`max_batches` must be None or an int >= 1, got {max_batches!r}")
    forward = forward or _default_forward
    observers = {name: _RangeObserver(q) for name, q in quantizers.items()}
    saved = {name: (q.static_range, q.fake_quantize_with_scale) for name, q in quantizers.items()}
    was_training = model.training
    try:
        for name, quantizer in quantizers.items():
            quantizer.static_range = None
            observer, original = observers[name], saved[name][1]

            def observed(x, observer=observer, original=original):
                observer.observe(x)
                return original(x)

            # For the duration of this call only (removed below): every route a layer takes to
            # its input quantizer goes through fake_quantize_with_scale.
            quantizer.fake_quantize_with_scale = observed
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                forward(model, batch)
    finally:
        model.train(was_training)
        for name, quantizer in quantizers.items():
            del quantizer.fake_quantize_with_scale
            quantizer.static_range = saved[name][0]
    unseen = [name for name, observer in observers.items() if observer.low is None]
    if len(unseen) == len(observers):
        raise ValueError("no calibration batch reached an input quantizer: is `batches` empty?")
    ranges = {}
    for name, observer in observers.items():
        if observer.low is not None:
            value_range = torch.stack([observer.low, observer.high])
            quantizers[name].freeze_range(value_range)
            ranges[name] = value_range
    return ranges
