"""What a quantized layer does when it is called: the wrapped forward and the input hooks.

``torchapprox.qat.attach`` installs these; they read the quantizers it registered on the
layer (``<weight>_quantizer``, ``input_quantizer``, ``key_quantizer``, ``value_quantizer``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ApproxQuantizer

WEIGHTS_ATTR = "_torchapprox_weights"  # on a quantized layer: the names of its quantized weights
INPUT_QUANTIZERS = ("input_quantizer", "key_quantizer", "value_quantizer")


def quantized_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run the layer's class forward with its weights read as fake-quantized values."""
    swaps = [
        (layer, name, quantized_weight(getattr(layer, f"{name}_quantizer"), getattr(layer, name)))
        for name in getattr(layer, WEIGHTS_ATTR)
    ]
    out_proj = getattr(layer, "out_proj", None) if isinstance(layer, nn.MultiheadAttention) else None
    out_proj_quantized = out_proj is not None and hasattr(out_proj, WEIGHTS_ATTR)
    if out_proj_quantized:
        # Attention applies out_proj with F.linear inside its kernel, so the projection's
        # input cannot be reached there. Let the kernel project with the identity (exact:
        # x @ I + 0 == x) and apply the quantized projection here instead.
        weight = out_proj.weight
        identity = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        zeros = torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
        swaps += [(out_proj, "weight", identity), (out_proj, "bias", zeros)]

    originals = [_swap(module, name, value) for module, name, value in swaps]
    saving = _save_inputs_not_grid_values(layer)
    try:
        if saving is None:
            output = type(layer).forward(layer, *args, **kwargs)
        else:
            with saving:
                output = type(layer).forward(layer, *args, **kwargs)
    finally:
        for (module, name, _), original in zip(swaps, originals):
            _swap(module, name, original)

    if out_proj_quantized:
        attn_output, attn_weights = output
        output = (_quantized_linear(out_proj, attn_output), attn_weights)
    return output


def quantized_weight(quantizer: ApproxQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """``quantizer(weight)``, computed once for as long as the weight does not change.

    A layer called several times per step, and every batch of an evaluation, reuses the
    value. The key holds the weight's version counter (bumped by every in-place update,
    optimizer steps included) and the modes that decide what kind of tensor is returned.
    """
    # Statistics describe a fresh call; under torch.func transforms the weight is a wrapper
    # without storage to key on (and its value may differ per call).
    if quantizer.record_statistics or torch._C._are_functorch_transforms_active():
        return quantizer(weight)
    key = (id(weight), weight._version, weight.data_ptr(), quantizer.bitwidth,
           torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    cached = quantizer.__dict__.get("_weight_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    value = quantizer(weight)
    quantizer.__dict__["_weight_cache"] = (key, value)
    return value


def _save_inputs_not_grid_values(layer: nn.Module) -> _SaveInputsNotGridValues | None:
    """While the layer runs, save for backward the float input (alive anyway, as a rule)
    in place of its grid values, which are recomputed when backward needs them. None when
    there is nothing to recompute.

    Without this every quantized layer would keep one extra activation until backward:
    the fake-quantized input its convolution or matmul saves.
    """
    if not torch.is_grad_enabled():
        return None
    offers = []
    for name in INPUT_QUANTIZERS:
        quantizer = layer._modules.get(name)
        if quantizer is not None and quantizer.recompute is not None:
            offers.append(quantizer.recompute)
            quantizer.recompute = None  # drop the references now, whatever happens next
    return _SaveInputsNotGridValues(offers) if offers else None


class _SaveInputsNotGridValues:
    """saved_tensors_hooks that store a saved view of grid values as a _Recomputable."""

    def __init__(self, offers: list) -> None:
        # The address range of each x_fake's storage: a saved tensor that starts inside it
        # is x_fake or a view of it (storages never overlap), found without storage objects.
        self.offers = []
        for x_fake, x, recompute in offers:
            start = x_fake.untyped_storage().data_ptr()
            self.offers.append((start, start + x_fake.untyped_storage().nbytes(), x_fake, x, recompute))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)

    def __enter__(self) -> None:
        self.hooks.__enter__()

    def __exit__(self, *exc_info) -> None:
        self.hooks.__exit__(*exc_info)
        # Every saved tensor keeps a reference to `pack`, hence to `offers`: empty it, or
        # the inputs it names would live until backward even where nothing was recomputed.
        self.offers.clear()

    def pack(self, tensor: torch.Tensor):
        address = tensor.data_ptr()
        for start, end, x_fake, x, recompute in self.offers:
            if tensor is x_fake:
                return _Recomputable(recompute, x, None)
            if start <= address < end and tensor.dtype == x_fake.dtype:
                return _Recomputable(recompute, x, tensor)
        return tensor


def _unpack(packed):
    return packed.value() if type(packed) is _Recomputable else packed


class _Recomputable:
    """Saved grid values (or a view of them: ``view``), stored as the recipe to compute them again."""

    __slots__ = ("geometry", "recompute", "source", "version")

    def __init__(self, recompute, source: torch.Tensor, view: torch.Tensor | None) -> None:
        self.recompute, self.source, self.version = recompute, source, source._version
        self.geometry = None if view is None else (view.size(), view.stride(), view.storage_offset())

    def value(self) -> torch.Tensor:
        if self.source._version != self.version:
            raise RuntimeError(
                "torchapprox: the input of a quantized layer was modified in place after the layer "
                "used it, so its quantized value cannot be recomputed for backward; avoid the in-place "
                "operation (e.g. nn.ReLU(inplace=True) applied to a tensor a quantized layer already read)"
            )
        value = self.recompute()
        return value if self.geometry is None else value.as_strided(*self.geometry)


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
    for position, name, quantizer_name in zip((0, 1, 2), ("query", "key", "value"), INPUT_QUANTIZERS):
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
    if input_quantizer is not None:
        x = input_quantizer(x)
        input_quantizer.recompute = None
    weight = quantized_weight(weight_quantizer, layer.weight) if weight_quantizer is not None else layer.weight
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
