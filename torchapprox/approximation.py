"""Which layers compute their products with an approximate multiplier, and switching them.

    ta.attach(model, multiplier=drum(4))                 # every layer that can take one
    ta.set_multiplier(model, mitchell(), pattern="conv*")  # later: switch some
    ta.set_multiplier(model, None)                        # back to exact products
    ta.assigned_multipliers(model)                                 # {layer: Multiplier}

A layer computes ``s_x * s_w * sum table[x_q, w_q]`` then (``torchapprox.layers.approximate``).
The assignment is kept on the layers (not in ``state_dict``); :func:`multiplier_state` and
:func:`restore_multipliers` carry it through checkpoints (``ta.quantization_state`` holds it).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .layers import find_layer_type
from .layers.approximate import MULTIPLIER_ATTR, MultiplierSetting, multiplier_of
from .layers.functional import quantizer_of
from .multipliers import Multiplier, by_name
from .validation import check_patterns


def set_multiplier(model: nn.Module, multiplier: Multiplier | None, pattern: str | Iterable[str] = "*", *,
                   gradient: str = "ste") -> list[str]:
    """Compute the products of the quantized layers matching ``pattern`` with ``multiplier``
    (None: exact products again). Returns the names of the layers set.

    Args:
        model: a model with quantizers (``ta.attach``).
        multiplier: a :class:`~torchapprox.multipliers.Multiplier`, or None.
        pattern: fnmatch pattern(s) over qualified layer names.
        gradient: ``"ste"`` (the exact product's gradient) or ``"table"`` (the table's
            local slopes); see ``torchapprox.multipliers.functional``.

    Layers that match but cannot take a multiplier (a layer type registered without one,
    such as Embedding, MultiheadAttention, LSTM or ConvTranspose; a layer whose weight or
    input is not quantized) keep exact products, and a warning names them by type.
    All or nothing: nothing changes when it raises.

    Raises:
        TypeError: ``model`` is not a module, ``multiplier`` not a Multiplier or None.
        ValueError: no quantized layer matches, none of those matching can take a
            multiplier, a layer's current bits or grid the multiplier cannot take (over 8
            bits, unsigned weights, a table made for the other input domain), or a bad
            ``gradient``.
    """
    from .qat import quantized_layers

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if multiplier is not None and not isinstance(multiplier, Multiplier):
        raise TypeError(f"`multiplier` must be a torchapprox.multipliers.Multiplier or None, "
                        f"got {type(multiplier).__name__}")
    patterns = check_patterns(pattern, "pattern")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("`model` has no quantized layers: call ta.attach(model) before set_multiplier")
    matched = {name: layer for name, layer in layers.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    if not matched:
        raise ValueError(f"`pattern` {patterns!r} matches no quantized layer; the layers are: "
                         f"{', '.join(list(layers)[:20])}{' ...' if len(layers) > 20 else ''}")
    settings = plan_multipliers(matched, multiplier, gradient)
    for name, layer in matched.items():
        if name in settings:
            _install(layer, settings[name])
    return list(settings)


def plan_multipliers(layers: Mapping[str, nn.Module], multiplier: Multiplier | None, gradient: str,
                     check: bool = True) -> dict[str, MultiplierSetting | None]:
    """``{layer name: setting}`` for the layers that can take ``multiplier`` (all of them for
    None), checked against their quantizers (``check``); warns about the ones that cannot,
    raises if none can."""
    if multiplier is None:
        return {name: None for name in layers}
    MultiplierSetting(multiplier, gradient)  # checks the arguments once
    settings, unable = {}, {}
    for name, layer in layers.items():
        reason = _why_not(layer)
        if reason is None:
            setting = MultiplierSetting(multiplier, gradient, name)
            if check:
                check_layer(layer, setting)
            settings[name] = setting
        else:
            unable.setdefault(reason, []).append(name)
    report_unable(unable, bool(settings), f"no matching layer can take multiplier {multiplier.name!r}",
                  f"multiplier {multiplier.name!r}")
    return settings


def report_unable(unable: Mapping[str, list[str]], some_can: bool, error: str, warning: str) -> None:
    """``{reason: layer names}`` of layers that cannot take a multiplier: a ValueError
    (``error: reasons``) when none of the layers asked can, else a warning naming them."""
    if not unable:
        return
    described = "; ".join(f"{reason} ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
                          for reason, names in unable.items())
    if not some_can:
        raise ValueError(f"{error}: {described}")
    warnings.warn(f"{warning}: these layers keep exact products: {described}", UserWarning, stacklevel=4)


def why_not(layer_type_name: str, takes_multiplier: bool, both_quantized: bool) -> str | None:
    """Why a layer cannot take a multiplier, or None."""
    if not takes_multiplier:
        return f"{layer_type_name} cannot take a multiplier (only Linear, Conv1d/2d/3d and transformers' Conv1D can)"
    if not both_quantized:
        return "the weight or the input is not quantized (a multiplier multiplies integer levels of both)"
    return None


def _why_not(layer: nn.Module, quantizers: bool = True) -> str | None:
    layer_type = find_layer_type(layer)
    if layer_type is None:
        return why_not(type(layer).__name__, False, False)
    both = not quantizers or (any(quantizer_of(layer, w) for w in layer_type.weight_axes(layer))
                              and any(quantizer_of(layer, i) for i in layer_type.inputs))
    return why_not(layer_type.name, layer_type.multiplier, both)


def check_layer(layer: nn.Module, setting: MultiplierSetting) -> None:
    """Raise ValueError when the layer's quantizers, as they are now, give operands the
    multiplier cannot take (checked again, from the actual levels, at every forward)."""
    layer_type = find_layer_type(layer)
    operands = [(role, q.bitwidth, q.grid) for role, names in (("weight", layer_type.weight_axes(layer)),
                                                               ("input", layer_type.inputs))
                for name in names if (q := quantizer_of(layer, name)) is not None]
    per_token = any(q.spec.granularity == "per_token" for name in layer_type.inputs
                    if (q := quantizer_of(layer, name)) is not None)
    check_operands(setting, operands, convolution=isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), per_token=per_token)


def check_operands(setting: MultiplierSetting, operands: Iterable[tuple[str, int, str]],
                   convolution: bool = False, per_token: bool = False) -> None:
    """Raise ValueError unless every ``(role, bits, grid)`` is an operand the multiplier takes:
    at most 8 bits, a signed or auto-grid weight, an input on a grid it has a table for."""
    where = f"layer {setting.layer_name!r} (multiplier {setting.multiplier.name!r})"
    if convolution and per_token:
        raise ValueError(f"{where}: a convolution with a multiplier takes one input scale per tensor, and the input "
                         "is per token; use granularity='per_tensor' for convolution inputs")
    for role, bits, grid in operands:
        if bits > 8:
            raise ValueError(f"{where}: the {role} is quantized to {bits} bits, but the multiplier takes 8-bit "
                             "operands: set 8 bits or fewer first (ta.set_bitwidth, the spec, or the schedule)")
        if role == "weight" and grid == "unsigned":
            raise ValueError(f"{where}: the weight is on the unsigned grid; the multiplier's weight operand is "
                             "signed (use grid='signed' for weights)")
        if role == "input" and grid in ("signed", "unsigned"):
            setting.multiplier.for_input(grid == "signed", where=where)
        if role == "input" and grid == "auto" and setting.multiplier._builder is None:
            # the auto grid puts non-negative tensors on the unsigned grid: a table made for one
            # domain would fail mid-training on the first such input
            raise ValueError(f"{where}: a table for the {setting.multiplier.domain} domain only, but the input is "
                             f"on the 'auto' grid, which picks signed or unsigned per tensor; set the input grid to "
                             f"{'signed' if setting.multiplier.input_signed else 'unsigned'!r}")


def _install(layer: nn.Module, setting: MultiplierSetting | None) -> None:
    if setting is None:
        layer.__dict__.pop(MULTIPLIER_ATTR, None)
    else:
        layer.__dict__[MULTIPLIER_ATTR] = setting


def remove_multiplier(layer: nn.Module) -> None:
    """Exact products again (``detach`` calls it)."""
    layer.__dict__.pop(MULTIPLIER_ATTR, None)


def assigned_multipliers(model: nn.Module) -> dict[str, Multiplier]:
    """``{layer name: Multiplier}`` of the layers that compute with one."""
    return {name: setting.multiplier for name, layer in model.named_modules()
            if (setting := multiplier_of(layer)) is not None}


# ------------------------------------------------------------------ checkpoint state
def multiplier_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer: {"name", "input_signed", "gradient", "cost", "table"}}``: the assignment,
    as plain values (a table only for a multiplier no generator makes by its name)."""
    state = {}
    for name, layer in model.named_modules():
        setting = multiplier_of(layer)
        if setting is None:
            continue
        m = setting.multiplier
        entry = {"name": m.name, "input_signed": m.input_signed, "gradient": setting.gradient, "cost": m.cost}
        if _built_in(m) is None:
            entry["table"] = m.table.clone()
        state[name] = entry
    return state


def _built_in(m: Multiplier) -> Multiplier | None:
    try:
        rebuilt = by_name(m.name, input_signed=m.input_signed)
    except ValueError:
        return None
    return rebuilt if torch.equal(rebuilt.table, m.table) else None


def multipliers_from_state(model: nn.Module, state: Mapping[str, Mapping[str, Any]]) -> dict[str, MultiplierSetting]:
    """The settings a :func:`multiplier_state` record describes, checked against ``model``
    (its layers must exist and be able to take them); nothing is installed."""
    settings = {}
    built: dict[tuple, Multiplier] = {}
    for name, entry in state.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the saved multiplier assignment names layer {name!r}, which the model does not "
                             "have") from None
        key = (entry["name"], bool(entry["input_signed"]), None if "table" not in entry else id(entry["table"]))
        if key not in built:
            if "table" in entry:
                built[key] = Multiplier(entry["table"], input_signed=bool(entry["input_signed"]), name=entry["name"],
                                        cost=entry.get("cost"))
            else:
                built[key] = by_name(entry["name"], input_signed=bool(entry["input_signed"]))
        settings[name] = MultiplierSetting(built[key], entry.get("gradient", "ste"), name)
        reason = _why_not(layer, quantizers=False)  # the quantizers are restored with it
        if reason is not None:
            raise ValueError(f"the saved multiplier assignment gives layer {name!r} multiplier {entry['name']!r}, "
                             f"but {reason}")
    return settings


def install_multipliers(model: nn.Module, settings: Mapping[str, MultiplierSetting]) -> None:
    for name, setting in settings.items():
        _install(model.get_submodule(name), setting)


__all__ = ["assigned_multipliers", "multiplier_state", "set_multiplier"]
