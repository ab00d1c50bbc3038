"""Quantized layer types: the registry, the built-in types and the building blocks of a
quantized forward (see :func:`register_layer` to add a layer type of your own)."""

from . import builtin  # noqa: F401 - registers the built-in layer types
from .functional import (quantized_bias, quantized_conv, quantized_input, quantized_linear, quantized_weight,
                         quantized_weight_and_qparams, quantizer_of)
from .registry import LayerType, find_layer_type, register_layer, registered_types

__all__ = [
    "LayerType",
    "find_layer_type",
    "quantized_bias",
    "quantized_conv",
    "quantized_input",
    "quantized_linear",
    "quantized_weight",
    "quantized_weight_and_qparams",
    "quantizer_of",
    "register_layer",
    "registered_types",
]
