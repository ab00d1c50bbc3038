"""Rebuild a trained quantized model from a checkpoint written with the callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchapprox as ta

STATE_KEY = "QuantizationAwareTraining"


def quantization_from_checkpoint(checkpoint: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The callback's state in a Lightning checkpoint (a path, or the loaded dict).

    Raises:
        ValueError: the checkpoint holds no state of QuantizationAwareTraining (a float
            run), or one from torchapprox 0.2, which did not record the options.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, weights_only=True, map_location="cpu")
    state = (checkpoint.get("callbacks") or {}).get(STATE_KEY)
    if state is None:
        raise ValueError("the checkpoint holds no QuantizationAwareTraining state: the run trained in float")
    if state.get("quantization") is None:
        raise ValueError("the checkpoint comes from torchapprox 0.2, which did not record the quantization options: "
                         "attach the model with the options it was trained with, then "
                         "torchapprox.load_quantizer_state(model, state['quantizer_state'])")
    return state


def restore_quantized(model: nn.Module, checkpoint: str | Path | dict[str, Any], *, strict: bool = True) -> nn.Module:
    """``model`` (a freshly built instance of the trained module) quantized exactly as in
    ``checkpoint`` (a Lightning checkpoint written with ``QuantizationAwareTraining``: its
    specs, per-layer bits, calibrated and running ranges) and holding its trained weights,
    in eval mode. Returns ``model``.

    Example::

        model = restore_quantized(MyModel(), "outputs/<run>/checkpoints/last.ckpt")
        torchapprox.export_onnx(model, example, "model.onnx")
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, weights_only=True, map_location="cpu")
    state = quantization_from_checkpoint(checkpoint)
    ta.restore_quantization(model, state["quantization"])
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model.eval()
