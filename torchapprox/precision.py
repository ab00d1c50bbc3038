"""How many bits a quantized model holds and computes with: ``ta.precision_summary``.

Per quantized layer: its weight parameters, its multiply-accumulates per sample (counted on
one forward pass: Linear, Conv1d/2d/3d, transformers' Conv1D, MultiheadAttention's input
projection, embeddings (none: a lookup); other types count None), its weight and input bits. Summed:

- ``average_bits``: the quantized weights' bits weighted by their parameters;
- ``size_bytes``: the quantized weights' size, ``sum params * bits / 8`` (float parameters
  such as biases and norms, the same for every bitwidth, are not counted);
- ``bit_operations``: per sample, ``sum MACs * weight bits * input bits`` (an input left in
  float counts 32 bits); None when a layer's MACs could not be counted;
- ``multiplier_cost``: over the layers that can take an approximate multiplier, ``sum MACs *
  cost of the layer's multiplier / sum MACs`` (exact products cost 1.0; ``Multiplier.cost``);
  None when a multiplier has no cost figure or no MACs were counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .layers import find_layer_type
from .layers.functional import quantizer_of

FLOAT_BITS = 32


def _macs_of(layer: nn.Module, inputs: tuple, output: Any, kwargs: dict | None = None) -> int | None:
    """Multiply-accumulates of one call (all samples)."""
    out = output[0] if isinstance(output, tuple) else output
    if not isinstance(out, Tensor):
        return None
    if isinstance(layer, nn.Linear):
        return out.numel() * layer.in_features
    if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        return 0  # a lookup: no multiplication
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        taps = 1
        for k in layer.kernel_size:
            taps *= k
        return out.numel() * (layer.in_channels // layer.groups) * taps
    if isinstance(layer, nn.MultiheadAttention):  # the input projections of query, key and value
        kwargs = kwargs or {}
        operands = [inputs[i] if len(inputs) > i else kwargs.get(key)
                    for i, key in enumerate(("query", "key", "value"))]
        dims = (layer.embed_dim, layer.kdim, layer.vdim)
        return sum(t.numel() // t.shape[-1] * d * layer.embed_dim for t, d in zip(operands, dims)
                   if isinstance(t, Tensor))
    layer_type = find_layer_type(layer)
    if layer_type is not None and layer_type.pooling:
        return 0  # no products: only its input is quantized (attach(quantize_pooling=True))
    if layer_type is not None and layer_type.name == "transformers.pytorch_utils.Conv1D":
        return out.numel() * layer.weight.shape[0]
    return None


@torch.no_grad()
def count_macs(model: nn.Module, layers: dict[str, nn.Module], run: Callable[[], Any], batch_size: int
               ) -> dict[str, int | None]:
    """``{layer: multiply-accumulates per sample}`` over one call of ``run()`` (a forward of
    ``model`` on a batch of ``batch_size`` samples); None for a layer type not counted."""
    counted: dict[str, int | None] = {name: 0 for name in layers}

    def hook(name):
        def record(layer, inputs, kwargs, output):
            macs = _macs_of(layer, inputs, output, kwargs)
            counted[name] = None if macs is None or counted[name] is None else counted[name] + macs
        return record

    handles = [layer.register_forward_hook(hook(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: None if value is None else value // max(batch_size, 1) for name, value in counted.items()}


def precision_summary(model: nn.Module, example_inputs: Tensor | tuple) -> dict[str, float | None]:
    """``{"average_bits", "size_bytes", "bit_operations"}`` of the quantized model as its
    quantizers are now (module docstring), MACs counted on ``model(*example_inputs)`` (in
    eval mode, no gradient; the batch dimension first). The model is left as it was.

    Raises:
        ValueError: a model without quantized layers.
    """
    from .qat import quantized_layers, quantized_tensor_names

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("`model` has no quantized layers: call ta.attach(model) first")
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    batch = inputs[0].shape[0] if inputs and isinstance(inputs[0], Tensor) and inputs[0].dim() else 1
    from .sensitivity import preserved_random_state

    was_training = model.training
    model.eval()
    try:
        with preserved_random_state(model):
            macs = count_macs(model, layers, lambda: model(*inputs), batch)
    finally:
        model.train(was_training)
    parameter_bits = parameters = 0
    operations: float | None = 0
    counted: set[int] = set()  # a tied weight (one quantizer in several layers) is stored once
    for name, layer in layers.items():
        weights, input_names = quantized_tensor_names(layer)
        weight_bits = [(getattr(layer, w).numel(), quantizer_of(layer, w).bitwidth) for w in weights]
        for w in weights:
            quantizer = quantizer_of(layer, w)
            if id(quantizer) not in counted:
                counted.add(id(quantizer))
                parameters += getattr(layer, w).numel()
                parameter_bits += getattr(layer, w).numel() * quantizer.bitwidth
        if operations is not None:
            if macs[name] is None:
                operations = None
                continue
            w_bits = max((b for _, b in weight_bits), default=FLOAT_BITS)
            a_bits = max((quantizer_of(layer, i).bitwidth for i in input_names), default=FLOAT_BITS)
            operations += macs[name] * w_bits * a_bits
    return {"average_bits": parameter_bits / parameters if parameters else None,
            "size_bytes": parameter_bits / 8, "bit_operations": operations,
            "multiplier_cost": _multiplier_cost(layers, macs)}


def _multiplier_cost(layers: dict[str, nn.Module], macs: dict[str, int | None]) -> float | None:
    from .layers.approximate import multiplier_of

    spent = total = 0.0
    for name, layer in layers.items():
        layer_type = find_layer_type(layer)
        if layer_type is None or not layer_type.multiplier:
            continue
        setting = multiplier_of(layer)
        cost = 1.0 if setting is None else setting.multiplier.cost
        if cost is None or macs.get(name) is None:
            return None
        spent += macs[name] * cost
        total += macs[name]
    return spent / total if total else None


__all__ = ["count_macs", "precision_summary"]
