"""Which layer types can be quantized, and how each computes with quantized tensors.

A layer type is registered with the names of its weights (and each weight's output-channel
axis, for per-channel scales), the names of its float inputs, and a forward function that
computes the layer from explicitly quantized tensors. ``torchapprox.attach`` quantizes every
module whose type (or a base class) is registered, provided the module does not override
that class's ``forward``: a subclass with its own forward computes something the
registered function does not know, so it stays in float (and the coverage report says so)
until it is registered itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torch import nn

WeightAxes = Mapping[str, "int | tuple[int, int]"]


@dataclass(frozen=True)
class LayerType:
    """How one layer type is quantized (see :func:`register_layer`)."""

    key: type | str
    weights: WeightAxes | Callable[[nn.Module], WeightAxes]
    inputs: tuple[str, ...]
    forward: Callable
    multiplier: bool = False  # the forward computes with an approximate multiplier when the layer has one
    pooling: bool = False  # weightless, its input quantized only on request (attach(quantize_pooling=True))

    def weight_layout(self, layer: nn.Module) -> dict[str, tuple[int, int]]:
        """``{weight name: (output-channel axis, groups)}`` of this layer instance."""
        weights = self.weights(layer) if callable(self.weights) else self.weights
        return {name: (value if isinstance(value, tuple) else (value, 1)) for name, value in weights.items()}

    def weight_axes(self, layer: nn.Module) -> dict[str, int]:
        """``{weight name: output-channel axis}`` of this layer instance."""
        return {name: axis for name, (axis, _) in self.weight_layout(layer).items()}

    @property
    def name(self) -> str:
        return self.key if isinstance(self.key, str) else self.key.__name__


_REGISTRY: dict[type | str, LayerType] = {}


def register_layer(
    layer_type: type | str,
    *,
    weights: WeightAxes | Callable[[nn.Module], WeightAxes],
    inputs: Iterable[str] = ("input",),
    forward: Callable | None = None,
    multiplier: bool = False,
    pooling: bool = False,
):
    """Register how a layer type computes with quantized weights and inputs.

    Args:
        layer_type: the ``nn.Module`` subclass, or its qualified name as a string
            (``"transformers.pytorch_utils.Conv1D"``), which registers a class of a package
            without importing it. Subclasses are covered too unless they override ``forward``.
        weights: ``{attribute name: output-channel axis}`` of the weights to quantize (the
            axis is used with per-channel scales: 0 for ``nn.Linear``, 1 for
            ``nn.ConvTranspose2d``), or a function of the layer returning that dict (for
            layers whose weights depend on their configuration, such as ``nn.LSTM``). An
            axis may be given as ``(axis, groups)`` when the weight's first dimension is
            split into ``groups`` blocks whose columns are different output channels (a
            grouped ``nn.ConvTranspose2d``: ``(1, layer.groups)``).
        inputs: names of the float inputs the forward quantizes; each gets a quantizer
            ``<name>_quantizer`` on the layer. ``()`` for layers whose input is not a float
            tensor (embeddings).
        forward: ``forward(layer, *args, **kwargs)``, called in place of the layer's own
            forward. It reads weights with :func:`torchapprox.layers.quantized_weight` and
            quantizes inputs with :func:`torchapprox.layers.quantized_input` (or the memory-
            saving :func:`~torchapprox.layers.quantized_linear` /
            :func:`~torchapprox.layers.quantized_conv`), and must not change the layer's
            state. A module-level function, so that attached models pickle. Without it,
            ``register_layer`` returns a decorator.
        multiplier: whether the forward computes with an approximate multiplier when the
            layer has one (``torchapprox.layers.approximate.multiplier_of``; the built-in
            Linear, Conv1d/2d/3d and transformers' Conv1D do). ``ta.set_multiplier`` refuses
            a layer type registered without it, by name.
        pooling: a layer without weights whose input is quantized only when asked for
            (``attach(quantize_pooling=True)``): pooling, whose quantized input makes the
            output of the layer before it quantized, which is what an integer runtime fuses
            into that layer's kernel. ``weights`` is ``{}`` then.

    Returns:
        ``forward`` (or the decorator), so that it can decorate the function.

    Example::

        import torch.nn.functional as F
        from torchapprox.layers import quantized_input, quantized_weight, register_layer

        class Scaled(nn.Linear):            # a layer of your own, with its own forward
            def forward(self, x):
                return 2.0 * super().forward(x)

        @register_layer(Scaled, weights={"weight": 0})
        def scaled_forward(layer, x):
            return 2.0 * F.linear(quantized_input(layer, x), quantized_weight(layer, "weight"), layer.bias)

    Raises:
        TypeError: a ``layer_type`` that is neither an ``nn.Module`` subclass nor a string,
            or ``weights``/``inputs`` of the wrong kind.
    """
    if isinstance(layer_type, str):
        if "." not in layer_type:
            raise TypeError(f"`layer_type` as a string must be a qualified class name such as "
                            f"'transformers.pytorch_utils.Conv1D', got {layer_type!r}")
    elif not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"`layer_type` must be an nn.Module subclass or its qualified name, got {layer_type!r}")
    if pooling and (callable(weights) or weights):
        raise TypeError(f"a pooling layer type has no weights: pass weights={{}}, got {weights!r}")
    if not callable(weights) and not pooling:
        if not isinstance(weights, Mapping) or not weights:
            raise TypeError(f"`weights` must be a non-empty dict {{weight name: output-channel axis}}, got {weights!r}")
        for name, axis in weights.items():
            if isinstance(axis, tuple) and len(axis) == 2 and all(isinstance(a, int) and not isinstance(a, bool)
                                                                  for a in axis):
                continue
            if not isinstance(name, str) or isinstance(axis, bool) or not isinstance(axis, int):
                raise TypeError(f"`weights` must map weight names (str) to axes (int), got {name!r}: {axis!r}")
    inputs = (inputs,) if isinstance(inputs, str) else tuple(inputs)
    if not all(isinstance(name, str) and name.isidentifier() for name in inputs):
        raise TypeError(f"`inputs` must be names (identifiers) of the layer's float inputs, got {inputs!r}")

    def register(function: Callable) -> Callable:
        if not callable(function):
            raise TypeError(f"`forward` must be a function forward(layer, *args, **kwargs), got {function!r}")
        _REGISTRY[layer_type] = LayerType(layer_type, weights, inputs, function, bool(multiplier), bool(pooling))
        return function

    return register(forward) if forward is not None else register


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def find_layer_type(module: nn.Module) -> LayerType | None:
    """The registered type that computes ``module``, or None (see the module docstring)."""
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls) or _REGISTRY.get(_qualified_name(cls))
        if entry is not None:
            return entry if type(module).forward is cls.forward else None
    return None


def registered_types() -> list[str]:
    """Names of the registered layer types, in registration order."""
    return [entry.name for entry in _REGISTRY.values()]
