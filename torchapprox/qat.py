"""How quantizers sit on a model: attach, set_bitwidth, statistics, detach (torch only).

Every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.MultiheadAttention`` chosen by ``attach``
gets ``MinMaxQuant`` submodules: ``weight_quantizer`` (``in_proj_weight_quantizer`` and the
like for attention) and ``input_quantizer``. How they act, and why this way:

- The float master weights stay ``nn.Parameter`` attributes of the same modules, so an
  optimizer built earlier keeps training them, ``state_dict()`` keeps the plain keys, and
  ``torch.nn.utils.prune`` still works (pruning first, then quantizing the pruned weight).
- A layer's own ``forward`` is wrapped at the instance: for the duration of one call the
  weight attribute reads as its fake-quantized value, then the Parameter is put back. The
  class's forward is what runs, so subclasses and layers that read ``self.weight`` from
  outside ``forward`` (``nn.MultiheadAttention``) see quantized weights. The model's own
  ``forward`` is never touched: several inputs and keyword arguments keep working.
- Inputs are quantized by a forward pre-hook. Its presence also switches off torch's fused
  inference paths (``nn.TransformerEncoderLayer``), which read weights directly and would
  otherwise skip quantization in eval mode.
"""

from __future__ import annotations

import fnmatch
import functools
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .layer_forward import WEIGHTS_ATTR as _WEIGHTS_ATTR
from .layer_forward import quantize_attention_inputs, quantize_layer_input, quantized_forward
from .quantizers import ApproxQuantizer, MinMaxQuant
from .quantizers.approx_quantizer import check_bitwidth
from .quantizers.minmax_quantizer import GRIDS
from .validation import check_bool, check_overrides, check_patterns

QUANTIZABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
ATTENTION_INPUT_QUANTIZERS = ("input_quantizer", "key_quantizer", "value_quantizer")

# Attributes attach() leaves on a layer (with _WEIGHTS_ATTR); detach() removes exactly these.
_HOOK_ATTR = "_torchapprox_hook_id"


def attach(
    model: nn.Module,
    bitwidth: int = 8,
    *,
    weights: bool = True,
    activations: bool = True,
    exclude: str | Iterable[str] = (),
    bitwidth_overrides: Mapping[str, int] | None = None,
    activation_grid: str = "signed",
    recompute_inputs: bool = True,
) -> list[str]:
    """Put ``MinMaxQuant`` quantizers on the weights and inputs of ``model``'s layers.

    Args:
        model: any ``nn.Module``; changed in place.
        bitwidth: bits of every quantizer, an int in 2..32.
        weights: quantize the weights of each layer.
        activations: quantize the input of each layer.
        exclude: fnmatch patterns over qualified layer names (``"classifier"``, ``"*.out_proj"``).
        bitwidth_overrides: ``{pattern: bits}``: layers whose name matches keep these bits,
            whatever ``set_bitwidth`` later sets (e.g. first and last layer at 8 bits). The
            first matching pattern wins.
        activation_grid: grid of the input quantizers: ``"signed"`` (symmetric, the
            default), ``"unsigned"`` ([0, 2^b - 1]) or ``"auto"`` (unsigned for a
            non-negative input, such as a ReLU's output, chosen per tensor). Weights are
            always quantized on the signed grid.
        recompute_inputs: what a layer keeps of its quantized input for backward. True
            (the default): nothing; it keeps the float input (alive anyway, as a rule) and
            recomputes the grid values when backward needs them, so peak memory stays close
            to the float model's, for one more elementwise pass per layer in backward.
            False: the grid values themselves, one extra activation per layer until
            backward: a few percent faster per step, about a third more activation memory
            (``python -m experiments.benchmark`` measures both).

    Returns:
        The qualified names (as ``model.named_modules()`` spells them) of the quantized
        layers. Attaching again replaces the quantizers rather than stacking them.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> attach(model, bitwidth=4, exclude=["2"])
        ['0']
    """
    _check_model(model)
    bitwidth = check_bitwidth(bitwidth)
    weights = check_bool(weights, "weights")
    activations = check_bool(activations, "activations")
    if not (weights or activations):
        raise ValueError("`weights` and `activations` are both False: nothing would be quantized")
    patterns = check_patterns(exclude)
    overrides = check_overrides(bitwidth_overrides)
    if activation_grid not in GRIDS:
        raise ValueError(f"`activation_grid` must be one of {', '.join(GRIDS)}, got {activation_grid!r}")
    recompute_inputs = check_bool(recompute_inputs, "recompute_inputs")

    detach(model)
    candidates = [name for name, layer in model.named_modules() if isinstance(layer, QUANTIZABLE_LAYERS)]
    _warn_unmatched(patterns, candidates, "exclude")
    _warn_unmatched(overrides, candidates, "bitwidth_overrides")
    chosen = {
        name: layer
        for name, layer in model.named_modules()
        if isinstance(layer, QUANTIZABLE_LAYERS)
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }
    for name, layer in chosen.items():
        _check_materialized(name, layer)
        pinned = next((bits for pattern, bits in overrides.items() if fnmatch.fnmatchcase(name, pattern)), None)
        layer_bits = bitwidth if pinned is None else pinned
        weight_names = _weight_names(layer) if weights else ()
        for weight_name in weight_names:
            layer.add_module(f"{weight_name}_quantizer", _quantizer(layer_bits, pinned is not None))
        if activations:
            inputs = ATTENTION_INPUT_QUANTIZERS if _is_attention(layer) else ("input_quantizer",)
            for input_name in inputs:
                quantizer = _quantizer(layer_bits, pinned is not None, grid=activation_grid)
                quantizer.offer_recompute = recompute_inputs  # see layer_forward._save_inputs_not_grid_values
                layer.add_module(input_name, quantizer)
        _wrap(layer, weight_names)
    # Attention reads its out_proj's weight directly instead of calling it, so an attention
    # layer whose out_proj is quantized needs its forward wrapped even when it is excluded.
    for name, layer in model.named_modules():
        if _is_attention(layer) and name not in chosen and hasattr(layer.out_proj, _WEIGHTS_ATTR):
            _wrap(layer, ())
        elif isinstance(layer, nn.TransformerEncoder) and any(hasattr(m, _WEIGHTS_ATTR) for m in layer.modules()):
            # In eval mode with a padding mask the encoder turns its input into a nested
            # tensor before its layers run, and quantizers cannot take a nested tensor: the
            # encoder's own switch for that path keeps it off while quantizers are attached.
            layer._torchapprox_use_nested_tensor = layer.use_nested_tensor
            layer.use_nested_tensor = False
    return list(chosen)


def set_bitwidth(model: nn.Module, bitwidth: int) -> int:
    """Set every quantizer in ``model`` to ``bitwidth``, except those pinned by
    ``bitwidth_overrides``; returns how many were set."""
    bitwidth = check_bitwidth(bitwidth)
    quantizers = [m for m in model.modules() if isinstance(m, ApproxQuantizer)]
    if not quantizers:
        raise ValueError("`model` has no quantizers to set a bitwidth on: call attach(model) first")
    free = [q for q in quantizers if not getattr(q, "pinned", False)]
    for quantizer in free:
        quantizer.bitwidth = bitwidth
    return len(free)


def _quantizer(bitwidth: int, pinned: bool, grid: str = "signed") -> MinMaxQuant:
    quantizer = MinMaxQuant(bitwidth, grid=grid)
    quantizer.pinned = pinned  # set_bitwidth leaves a pinned quantizer at its own bits
    return quantizer


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` that carry quantizers, by qualified name."""
    return {
        name: layer
        for name, layer in model.named_modules()
        if any(isinstance(child, ApproxQuantizer) for child in layer.children())
    }


def enable_statistics(model: nn.Module, enabled: bool = True) -> None:
    """Make every quantizer keep (or stop keeping) the error of its next calls.

    Off by default: computing MSE and SQNR costs a pass over every weight and input, so a
    training loop turns it on only for the steps it logs.
    """
    enabled = check_bool(enabled, "enabled")
    for module in model.modules():
        if isinstance(module, ApproxQuantizer):
            module.record_statistics = enabled


def statistics(model: nn.Module) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per-layer statistics recorded in the last forward pass with statistics enabled.

    Returns ``{layer: {"weight" | "input": {"scale_factor", "mse", "sqnr_db": 0-dim tensor}}}``.
    Values stay on the model's device (no host sync); ``float(value)`` reads one. For
    attention, "weight" is the (first) input-projection weight and "input" the query.
    """
    result: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, layer in quantized_layers(model).items():
        entry = {}
        weight_quantizer = next(
            (q for q_name, q in layer.named_children()
             if q_name.endswith("weight_quantizer") and isinstance(q, ApproxQuantizer)),
            None,
        )
        for kind, quantizer in (("weight", weight_quantizer),
                                ("input", getattr(layer, "input_quantizer", None))):
            if quantizer is not None and quantizer.last_statistics is not None:
                entry[kind] = dict(quantizer.last_statistics)
        if entry:
            result[name] = entry
    return result


def detach(model: nn.Module, bake: bool = False) -> list[str]:
    """Remove every quantizer from ``model``; returns the names of the layers it left.

    Without ``bake`` the model is the float model again. With ``bake=True`` each weight's
    fake-quantized value is first written into its float Parameter (into ``weight_orig``
    for a pruned weight), so the plain model computes with the quantized weights.
    """
    _check_model(model)
    bake = check_bool(bake, "bake")
    detached = []
    for name, layer in model.named_modules():
        if hasattr(layer, "_torchapprox_use_nested_tensor"):
            layer.use_nested_tensor = layer.__dict__.pop("_torchapprox_use_nested_tensor")
        if not hasattr(layer, _WEIGHTS_ATTR):
            continue
        if bake:
            _bake_weights(layer)
        del layer.forward
        hook_id = getattr(layer, _HOOK_ATTR)
        layer._forward_pre_hooks.pop(hook_id, None)
        layer._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        for child_name, child in list(layer.named_children()):
            if isinstance(child, ApproxQuantizer):
                delattr(layer, child_name)
        delattr(layer, _WEIGHTS_ATTR)
        delattr(layer, _HOOK_ATTR)
        detached.append(name)
    return detached


def _wrap(layer: nn.Module, weight_names: tuple[str, ...]) -> None:
    setattr(layer, _WEIGHTS_ATTR, tuple(weight_names))
    # functools.partial of a module-level function, unlike a bound method, survives
    # pickling and deepcopy of the whole model.
    layer.forward = functools.partial(quantized_forward, layer)
    hook = quantize_attention_inputs if _is_attention(layer) else quantize_layer_input
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(layer, _HOOK_ATTR, handle.id)


@torch.no_grad()
def _bake_weights(layer: nn.Module) -> None:
    for weight_name in getattr(layer, _WEIGHTS_ATTR):
        quantizer = getattr(layer, f"{weight_name}_quantizer")
        original = getattr(layer, f"{weight_name}_orig", None)
        if original is not None:  # torch.nn.utils.prune: weight = weight_orig * weight_mask
            mask = getattr(layer, f"{weight_name}_mask")
            original.copy_(quantizer.fake_quantize(original * mask))
            # prune refreshes the plain attribute only on the next forward: refresh it now.
            layer.__dict__[weight_name] = original * mask
        else:
            parameter = getattr(layer, weight_name)
            parameter.copy_(quantizer.fake_quantize(parameter))


def _warn_unmatched(patterns: Iterable[str], names: list[str], argument: str) -> None:
    # A typo in a pattern would otherwise pass in silence: the layer stays quantized, or
    # runs at the scheduled bits instead of the pinned ones.
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            warnings.warn(
                f"`{argument}` pattern {pattern!r} matches no quantizable layer; the layers are: "
                f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}",
                UserWarning,
                stacklevel=3,
            )


def _is_attention(layer: nn.Module) -> bool:
    return isinstance(layer, nn.MultiheadAttention)


def _weight_names(layer: nn.Module) -> tuple[str, ...]:
    if _is_attention(layer):
        if layer._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    return ("weight",)


def _check_materialized(name: str, layer: nn.Module) -> None:
    for weight_name in _weight_names(layer):
        if isinstance(getattr(layer, weight_name), nn.parameter.UninitializedParameter):
            raise ValueError(
                f"layer {name!r} is a lazy module whose {weight_name!r} is not initialized yet: "
                "run one forward pass before attach()"
            )


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")


__all__ = [
    "attach",
    "detach",
    "enable_statistics",
    "quantized_layers",
    "set_bitwidth",
    "statistics",
]
