"""What a quantized layer does when it is called: the wrapped forward and the input hooks.

``torchapprox.qat.attach`` installs these; they read the quantizers it registered on the
layer (``<weight>_quantizer``, ``input_quantizer``, ``key_quantizer``, ``value_quantizer``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_WEIGHTS_ATTR = "_torchapprox_weights"


def quantized_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run the layer's class forward with its weights read as fake-quantized values."""
    swaps = [
        (layer, name, getattr(layer, f"{name}_quantizer")(getattr(layer, name)))
        for name in getattr(layer, _WEIGHTS_ATTR)
    ]
    out_proj = getattr(layer, "out_proj", None) if isinstance(layer, nn.MultiheadAttention) else None
    out_proj_quantized = out_proj is not None and hasattr(out_proj, _WEIGHTS_ATTR)
    if out_proj_quantized:
        # Attention applies out_proj with F.linear inside its kernel, so the projection's
        # input cannot be reached there. Let the kernel project with the identity (exact:
        # x @ I + 0 == x) and apply the quantized projection here instead.
        weight = out_proj.weight
        identity = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        zeros = torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
        swaps += [(out_proj, "weight", identity), (out_proj, "bias", zeros)]

    originals = [_swap(module, name, value) for module, name, value in swaps]
    try:
        output = type(layer).forward(layer, *args, **kwargs)
    finally:
        for (module, name, _), original in zip(swaps, originals):
            _swap(module, name, original)

    if out_proj_quantized:
        attn_output, attn_weights = output
        output = (_quantized_linear(out_proj, attn_output), attn_weights)
    return output


def quantize_layer_input(layer: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """Forward pre-hook of Linear/Conv: quantize the input (first argument or ``input=``)."""
    quantizer = layer._modules.get("input_quantizer")
    if quantizer is None:
        return None
    if args:
        return (quantizer(args[0]), *args[1:]), kwargs
    if "input" in kwargs:
        return args, {**kwargs, "input": quantizer(kwargs["input"])}
    return None


def quantize_attention_inputs(layer: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """Forward pre-hook of MultiheadAttention: quantize query, key and value.

    A tensor passed in several places (self-attention: query is key is value) is quantized
    once and passed on as one tensor, so attention still recognises self-attention.
    """
    if layer._modules.get("input_quantizer") is None:
        return None
    args, kwargs = list(args), dict(kwargs)
    done: dict[int, torch.Tensor] = {}
    for position, name, quantizer_name in (
        (0, "query", "input_quantizer"),
        (1, "key", "key_quantizer"),
        (2, "value", "value_quantizer"),
    ):
        container, key = (args, position) if position < len(args) else (kwargs, name)
        if container is kwargs and name not in kwargs:
            continue
        tensor = container[key]
        if id(tensor) not in done:
            done[id(tensor)] = getattr(layer, quantizer_name)(tensor)
        container[key] = done[id(tensor)]
    return tuple(args), kwargs


def _quantized_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    input_quantizer = layer._modules.get("input_quantizer")
    weight_quantizer = layer._modules.get("weight_quantizer")
    x = input_quantizer(x) if input_quantizer is not None else x
    weight = weight_quantizer(layer.weight) if weight_quantizer is not None else layer.weight
    return F.linear(x, weight, layer.bias)


def _swap(module: nn.Module, name: str, value: torch.Tensor | None) -> torch.Tensor | None:
    """Make ``module.<name>`` read as ``value`` and return what it read before.

    A Parameter is swapped inside ``_parameters`` (bypassing the Parameter type check) so
    that putting it back leaves the very same Parameter object. A weight that
    ``torch.nn.utils.prune`` turned into a plain attribute is swapped in ``__dict__``.
    """
    if name in module._parameters:
        original = module._parameters[name]
        module._parameters[name] = value
    else:
        original = module.__dict__[name]
        module.__dict__[name] = value
    return original
