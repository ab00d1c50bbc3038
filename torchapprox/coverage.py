"""What share of a model is quantized, by layer type: no layer stays in float unnoticed."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .layers import find_layer_type
from .quantizers import ApproxQuantizer


def _owned_parameters(model: nn.Module):
    """(layer name, layer, its own parameters) for every layer holding parameters; the
    originals behind a parametrization count as the parametrized layer's."""
    for name, layer in model.named_modules():
        if isinstance(layer, (parametrize.ParametrizationList, ApproxQuantizer)) or name.endswith("parametrizations"):
            continue
        parameters = list(layer._parameters.values())
        if parametrize.is_parametrized(layer):
            parameters += list(layer.parametrizations.parameters())
        parameters = [p for p in parameters if p is not None]
        if parameters:
            yield name, layer, parameters


def _quantized_parameter_ids(model: nn.Module) -> set[int]:
    from .qat import _WEIGHTS_ATTR, weight_source

    ids = set()
    for _, layer in model.named_modules():
        for weight_name in getattr(layer, _WEIGHTS_ATTR, ()):
            source = weight_source(layer, weight_name)
            tensors = source.parameters() if isinstance(source, nn.Module) else [source]
            ids.update(id(t) for t in tensors)
    return ids


def coverage(model: nn.Module, *, excluded: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One row per layer type that holds parameters, largest share first.

    Each row: ``layer_type`` (the class name), ``layers`` (how many), ``quantized_layers``,
    ``parameters`` and ``quantized_parameters`` (element counts; a tied weight counts once,
    for the first layer holding it), ``share`` (the type's share of all the model's
    parameters, 0..1), ``quantized_share`` (its quantized parameters' share of all),
    ``float_weighted_layers`` (layers with a parameter of two or more dimensions of which
    none is quantized) and ``registered`` (whether torchapprox knows how to quantize the
    type; False for layers that need :func:`torchapprox.register_layer`). ``excluded``
    names layers left in float on purpose: they count as registered.
    """
    quantized = _quantized_parameter_ids(model)
    seen: set[int] = set()
    total = 0
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {
        "layers": 0, "quantized_layers": 0, "parameters": 0, "quantized_parameters": 0,
        "float_weighted_layers": 0, "registered": True,
    })
    for name, layer, parameters in _owned_parameters(model):
        fresh = [p for p in parameters if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        layer_type = parametrize.type_before_parametrizations(layer).__name__
        row = rows[layer_type]
        count = sum(p.numel() for p in fresh)
        quantized_count = sum(p.numel() for p in fresh if id(p) in quantized)
        total += count
        row["layers"] += 1
        row["parameters"] += count
        row["quantized_parameters"] += quantized_count
        is_quantized = any(id(p) in quantized for p in parameters)
        row["quantized_layers"] += is_quantized
        if not is_quantized and any(p.dim() >= 2 for p in parameters):
            row["float_weighted_layers"] += 1
            if find_layer_type(layer) is None and name not in excluded:
                row["registered"] = False
    result = []
    for layer_type, row in rows.items():
        row["share"] = row["parameters"] / total if total else 0.0
        row["quantized_share"] = row["quantized_parameters"] / total if total else 0.0
        result.append({"layer_type": layer_type, **row})
    return sorted(result, key=lambda r: -r["parameters"])


def _percent(fraction: float) -> str:
    if fraction == 0:
        return "0%"
    if fraction < 0.001:
        return "<0.1%"
    return f"{100 * fraction:.1f}%"


def describe_float_layers(rows: list[dict[str, Any]]) -> str:
    """A sentence naming the layer types whose weights stay in float for want of a
    registered layer type, with their share of the parameters; "" when there are none."""
    unregistered = [r for r in rows if not r["registered"]]
    if not unregistered:
        return ""
    parts = [f"{r['layer_type']} ({r['float_weighted_layers']} layer{'s' if r['float_weighted_layers'] != 1 else ''}, "
             f"{_percent(r['share'] - r['quantized_share'])} of parameters)" for r in unregistered]
    quantized = sum(r["quantized_share"] for r in rows)
    return (f"{', '.join(parts)} left in float: torchapprox has no quantized layer type for "
            f"{'them' if len(parts) > 1 else 'it'} (torchapprox.register_layer adds one); "
            f"{_percent(quantized)} of the model's parameters are quantized")


def coverage_summary(model: nn.Module) -> str:
    """One line: the quantized share of the parameters, then each layer type's count."""
    rows = coverage(model)
    quantized = sum(r["quantized_share"] for r in rows)
    parts = []
    for row in rows:
        if row["quantized_layers"]:
            parts.append(f"{row['layer_type']} {row['quantized_layers']}/{row['layers']}")
        elif row["float_weighted_layers"]:
            parts.append(f"{row['layer_type']} 0/{row['layers']} ({_percent(row['share'])} of parameters, in float)")
    return f"quantized {_percent(quantized)} of parameters: " + ", ".join(parts)
