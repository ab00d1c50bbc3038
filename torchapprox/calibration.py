"""Static activation scales: freeze each input quantizer's range from calibration data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .quantizers import ApproxQuantizer


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])  # (inputs, targets), as data loaders yield
    raise TypeError(f"cannot call the model on a batch of type {type(batch).__name__}: pass `forward`")


def takes_static_range(quantizer: ApproxQuantizer) -> bool:
    """Whether calibration can freeze this quantizer's range: a family with static ranges,
    one range per tensor."""
    return quantizer.supports_calibration and quantizer.spec.granularity == "per_tensor"


def input_quantizers(model: nn.Module) -> dict[str, ApproxQuantizer]:
    """The input quantizers ``attach`` put on ``model``, by qualified name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, ApproxQuantizer) and module.role == "input"}


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

    Calibration goes through the quantizer contract (``begin_calibration``: every tensor
    passed to ``qparams`` is observed; ``end_calibration``: the range is frozen). The model
    runs in eval mode under ``torch.no_grad()`` (its mode is restored after), with dynamic
    ranges while observing (a previous calibration is not applied). Input quantizers without
    static ranges (learned steps: already constant; per-token scales) are left as they are.

    Args:
        model: an attached model (``torchapprox.attach``).
        batches: an iterable of batches: tensors, ``(inputs, targets)`` tuples (the inputs
            are passed to the model) or dicts of keyword arguments.
        forward: ``forward(model, batch)`` for other batch layouts.
        max_batches: stop after this many batches (None: all).

    Returns:
        ``{quantizer name: tensor([low, high])}``, float32.

    Raises:
        ValueError: a model without input quantizers, none that takes a static range, or
            batches that never reached one.
    """
    attached = input_quantizers(model)
    quantizers = {name: q for name, q in attached.items() if takes_static_range(q)}
    if not attached:
        raise ValueError("`model` has no input quantizers to calibrate: attach(model, activations=True) first")
    if not quantizers:
        kinds = sorted({f"{q.spec.quantizer} {q.spec.granularity}" for q in attached.values()})
        raise ValueError(f"none of the model's {len(attached)} input quantizers takes a static range ({', '.join(kinds)}"
                         "): a learned step is a constant already, and per-token scales follow each token; "
                         "calibration freezes per-tensor 'minmax' ranges")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"`max_batches` must be None or an int >= 1, got {max_batches!r}")
    forward = forward or _default_forward
    was_training = model.training
    for quantizer in quantizers.values():
        quantizer.begin_calibration()
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                forward(model, batch)
    except BaseException:
        for quantizer in quantizers.values():
            quantizer.cancel_calibration()
        raise
    finally:
        model.train(was_training)
    if not any(q.observed_anything for q in quantizers.values()):
        for quantizer in quantizers.values():
            quantizer.cancel_calibration()
        raise ValueError("no calibration batch reached an input quantizer: is `batches` empty?")
    ranges = {}
    for name, quantizer in quantizers.items():
        frozen = quantizer.end_calibration()
        if frozen is not None:
            ranges[name] = frozen.float()
    return ranges
