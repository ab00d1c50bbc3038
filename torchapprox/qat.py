"""How quantizers sit on a model: attach, set_bitwidth, statistics, detach (torch only).

Every layer whose type is registered in ``torchapprox.layers`` (Linear, Conv, ConvTranspose,
Embedding, EmbeddingBag, MultiheadAttention, RNN/LSTM/GRU, transformers' Conv1D, and any
type a user registers) gets ``MinMaxQuant`` submodules: ``<weight>_quantizer`` for each of
its weights and ``<input>_quantizer`` for each of its float inputs. How they act, and why
this way:

- The float master weights stay where they were (Parameters of the same modules, or the
  originals behind a parametrization or pruning), so an optimizer built earlier keeps
  training them, ``state_dict()`` keeps exactly the plain model's keys, and every route that
  changes a weight (any optimizer implementation, ``.data`` writes, ``load_state_dict``) is
  seen by the next forward: nothing is cached.
- The layer's ``forward`` is replaced at the instance by its registered quantized forward,
  which passes quantized tensors explicitly to the functional op (``F.linear``,
  ``torch.convolution``, ...). A forward pass writes nothing to any module (statistics, when
  turned on, excepted), so a model can serve several threads at once. The model's own
  ``forward`` is never touched: several inputs and keyword arguments keep working.
- Each quantized layer also carries a forward pre-hook that does nothing: its presence is
  what makes torch's fused Transformer inference path (``nn.TransformerEncoderLayer`` in
  eval mode), which reads weights directly and would skip quantization, step aside.
"""

from __future__ import annotations

import fnmatch
import functools
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import find_layer_type
from .layers.registry import LayerType
from .quantizers import ApproxQuantizer, MinMaxQuant
from .quantizers.approx_quantizer import check_bitwidth
from .quantizers.minmax_quantizer import EVAL_RANGES, GRIDS
from .validation import check_bool, check_overrides, check_patterns, check_range_gradient

# Attributes attach() leaves on a layer; detach() removes exactly these.
_WEIGHTS_ATTR = "_torchapprox_weights"  # names of the layer's quantized weights
_HOOK_ATTR = "_torchapprox_hook_id"
_NESTED_ATTR = "_torchapprox_use_nested_tensor"


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
    per_channel_weights: bool = False,
    range_gradient: bool | str = False,
    eval_range: str = "batch",
    per_token_inputs: bool = False,
) -> list[str]:
    """Put ``MinMaxQuant`` quantizers on the weights and inputs of ``model``'s layers.

    Args:
        model: any ``nn.Module``; changed in place.
        bitwidth: bits of every quantizer, an int in 2..32.
        weights: quantize the weights of each layer.
        activations: quantize the float inputs of each layer.
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
            recomputes the grid values when backward needs them, inside the layer's own
            autograd node, so peak memory stays close to the float model's, for one more
            elementwise pass per layer in backward. False: the grid values themselves, one
            extra activation per layer until backward, a few percent faster per step.
        per_channel_weights: one scale per output channel of each weight (the axis each
            layer type declares: 0 for Linear/Conv weights, 1 for ConvTranspose and
            transformers' Conv1D) instead of one per tensor. Inputs keep one scale each.
        range_gradient: let the gradient flow through each quantizer's range ``max|x|`` to
            the extreme element (see :class:`MinMaxQuant`): False (the default), True, or
            ``"weights"``/``"inputs"`` for one kind of quantizer only. Layers whose inputs
            take it keep their quantized input for backward, as with ``recompute_inputs=False``.
        eval_range: the range an input quantizer uses in eval mode: ``"batch"`` (the
            default: each tensor's own, as in training) or ``"running"`` (an exponential
            moving average, momentum 0.1, of the ranges seen in training mode; it lives
            outside the state dict).
        per_token_inputs: one scale per row of each input's last dimension (each token of a
            ``(batch, sequence, features)`` input) instead of one per tensor: what outliers in
            a few tokens cost the others. Such inputs cannot be exported to ONNX QDQ.

    Returns:
        The qualified names (as ``model.named_modules()`` spells them) of the quantized
        layers. Attaching again replaces the quantizers rather than stacking them.

    Weights shared by several layers (tied embeddings and output heads) get one quantizer,
    shared by every layer that uses them, so they are quantized the same way everywhere.
    A warning names the layer types whose weights stay in float (see :func:`coverage`).

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
    per_channel_weights = check_bool(per_channel_weights, "per_channel_weights")
    per_token_inputs = check_bool(per_token_inputs, "per_token_inputs")
    range_gradient = check_range_gradient(range_gradient)
    if eval_range not in EVAL_RANGES:
        raise ValueError(f"`eval_range` must be one of {', '.join(EVAL_RANGES)}, got {eval_range!r}")

    detach(model)
    candidates = {name: (layer, spec) for name, layer in model.named_modules()
                  if (spec := find_layer_type(layer)) is not None}
    _warn_unmatched(patterns, list(candidates), "exclude")
    _warn_unmatched(overrides, list(candidates), "bitwidth_overrides")
    chosen = {name: entry for name, entry in candidates.items()
              if not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)}
    shared = _SharedWeightQuantizers()
    for name, (layer, spec) in chosen.items():
        axes = spec.weight_axes(layer)
        _check_materialized(name, layer, axes)
        pinned = next((bits for pattern, bits in overrides.items() if fnmatch.fnmatchcase(name, pattern)), None)
        layer_bits = bitwidth if pinned is None else pinned
        weight_names = tuple(axes) if weights else ()
        for weight_name in weight_names:
            axis = axes[weight_name] if per_channel_weights else None
            quantizer = shared.quantizer(name, layer, weight_name, axis, layer_bits, pinned is not None)
            quantizer.range_gradient = range_gradient in (True, "weights")
            quantizer.role = "weight"
            layer.add_module(f"{weight_name}_quantizer", quantizer)
        for input_name in spec.inputs if activations else ():
            quantizer = _quantizer(layer_bits, pinned is not None, grid=activation_grid, eval_range=eval_range,
                                   axis="token" if per_token_inputs else None)
            quantizer.recompute_in_backward = recompute_inputs
            quantizer.range_gradient = range_gradient in (True, "inputs")
            quantizer.role = "input"
            layer.add_module(f"{input_name}_quantizer", quantizer)
        _install(layer, spec, weight_names)
    for name, layer in model.named_modules():
        if isinstance(layer, nn.MultiheadAttention) and name not in chosen and hasattr(layer.out_proj, _WEIGHTS_ATTR):
            # Float attention reads its out_proj's weight directly instead of calling it: run
            # it through the quantized forward (no quantizers of its own), which calls it.
            _install(layer, find_layer_type(layer), ())
        elif isinstance(layer, nn.TransformerEncoder) and any(hasattr(m, _WEIGHTS_ATTR) for m in layer.modules()):
            # In eval mode with a padding mask the encoder turns its input into a nested
            # tensor before its layers run, and quantizers cannot take a nested tensor: the
            # encoder's own switch for that path stays off while quantizers are attached.
            setattr(layer, _NESTED_ATTR, layer.use_nested_tensor)
            layer.use_nested_tensor = False
    _warn_float_layers(model, excluded=[n for n in candidates if n not in chosen])
    return list(chosen)


class _SharedWeightQuantizers:
    """One quantizer per weight source: a Parameter used by several layers (tied weights)
    is quantized by the same module wherever it is used."""

    def __init__(self) -> None:
        self.by_source: dict[int, tuple[MinMaxQuant, str]] = {}

    def quantizer(self, layer_name: str, layer: nn.Module, weight_name: str, axis: int | None, bits: int,
                  pinned: bool) -> MinMaxQuant:
        source = weight_source(layer, weight_name)
        if id(source) not in self.by_source:
            quantizer = _quantizer(bits, pinned, axis=axis)
            self.by_source[id(source)] = (quantizer, layer_name)
            return quantizer
        quantizer, first = self.by_source[id(source)]
        if quantizer.axis != axis:
            quantizer.axis = None  # no per-channel axis fits both uses: one scale for the tensor
            warnings.warn(f"tied weight {weight_name!r} of {layer_name!r} and {first!r}: their output-channel axes "
                          "differ, so it is quantized with one scale per tensor in both", UserWarning, stacklevel=4)
        if quantizer.bitwidth != bits or quantizer.pinned != pinned:
            warnings.warn(f"tied weight {weight_name!r} of {layer_name!r} is also used by {first!r}: it is quantized "
                          f"as there ({quantizer.bitwidth} bits{', pinned' if quantizer.pinned else ''}) in both",
                          UserWarning, stacklevel=4)
        return quantizer


def weight_source(layer: nn.Module, name: str) -> object:
    """What a weight's value comes from: its Parameter, the parametrization behind it, or
    the ``<name>_orig`` Parameter of a pruned weight."""
    if parametrize.is_parametrized(layer, name):
        return layer.parametrizations[name]
    if f"{name}_orig" in layer._parameters:
        return layer._parameters[f"{name}_orig"]
    return getattr(layer, name)


def _install(layer: nn.Module, spec: LayerType, weight_names: tuple[str, ...]) -> None:
    setattr(layer, _WEIGHTS_ATTR, weight_names)
    # functools.partial of a module-level function, unlike a bound method, survives
    # pickling and deepcopy of the whole model.
    layer.forward = functools.partial(spec.forward, layer)
    handle = layer.register_forward_pre_hook(_keeps_fused_inference_paths_off)
    setattr(layer, _HOOK_ATTR, handle.id)


def _keeps_fused_inference_paths_off(module: nn.Module, args: tuple) -> None:
    """Does nothing. torch's fused Transformer inference path steps aside for modules with
    hooks (TransformerEncoderLayer.forward checks for them), and it would read the float
    weights directly."""


def set_bitwidth(model: nn.Module, bitwidth: int) -> int:
    """Set every quantizer in ``model`` to ``bitwidth``, except those pinned by
    ``bitwidth_overrides``; returns how many were set."""
    bitwidth = check_bitwidth(bitwidth)
    quantizers = [m for m in model.modules() if isinstance(m, ApproxQuantizer)]
    if not quantizers:
        raise ValueError("`model` has no quantizers to set a bitwidth on: call attach(model) first")
    free = [q for q in quantizers if not q.pinned]
    for quantizer in free:
        quantizer.bitwidth = bitwidth
    return len(free)


def _quantizer(bitwidth: int, pinned: bool, grid: str = "signed", axis: int | None = None,
               eval_range: str = "batch") -> MinMaxQuant:
    quantizer = MinMaxQuant(bitwidth, grid=grid, axis=axis, eval_range=eval_range)
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
    Values stay on the model's device (no host sync); ``float(value)`` reads one. "weight"
    is the layer's first quantized weight (attention: the input projection; LSTM:
    ``weight_ih_l0``), "input" its first input (attention: the query). With per-channel
    weights, ``scale_factor`` is the mean of the channels' scales.
    """
    result: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, layer in quantized_layers(model).items():
        entry = {}
        weight_quantizer = next((layer._modules.get(f"{w}_quantizer") for w in getattr(layer, _WEIGHTS_ATTR, ())), None)
        for kind, quantizer in (("weight", weight_quantizer), ("input", layer._modules.get("input_quantizer"))):
            if quantizer is not None and quantizer.last_statistics is not None:
                entry[kind] = dict(quantizer.last_statistics)
        if entry:
            result[name] = entry
    return result


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors quantizers keep between calls (running ranges, frozen ranges), by
    qualified name (``"net.0.input_quantizer.running_range"``), detached, on their device.

    They are non-persistent buffers, outside ``model.state_dict()`` (which keeps exactly the
    plain model's keys): save them beside it, e.g. in the callback's checkpoint state, and
    restore them with :func:`load_quantizer_state`. Plain tensors: they load with
    ``torch.load(weights_only=True)``.
    """
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ApproxQuantizer):
            for buffer_name, buffer in module._buffers.items():
                if buffer is not None:
                    state[f"{name}.{buffer_name}" if name else buffer_name] = buffer.detach().clone()
    return state


def load_quantizer_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`quantizer_state` returned onto an attached model.

    Raises:
        KeyError: a name that is not a quantizer buffer of ``model`` (attached with other options?).
    """
    quantizers = {name: module for name, module in model.named_modules() if isinstance(module, ApproxQuantizer)}
    for key, tensor in state.items():
        owner, _, buffer_name = key.rpartition(".")
        quantizer = quantizers.get(owner)
        if quantizer is None or buffer_name not in quantizer._buffers:
            raise KeyError(f"quantizer state {key!r} has no quantizer buffer in the model (quantizers: "
                           f"{', '.join(list(quantizers)[:10])}{' ...' if len(quantizers) > 10 else ''})")
        current = quantizer._buffers[buffer_name]
        device = current.device if current is not None else next(
            (t.device for t in model.parameters()), tensor.device)
        setattr(quantizer, buffer_name, tensor.detach().clone().to(device))


def detach(model: nn.Module, bake: bool = False) -> list[str]:
    """Remove every quantizer from ``model``; returns the names of the layers it left.

    Without ``bake`` the model is the float model again. With ``bake=True`` each weight's
    fake-quantized value is first written into the tensor it comes from (the Parameter;
    ``weight_orig`` of a pruned weight; a parametrized weight becomes a plain Parameter
    holding its quantized value, as ``parametrize.remove_parametrizations`` leaves it), so
    that the plain model computes in eval what the attached one computed with its weights.
    A tied weight is written once.

    Raises:
        ValueError: with ``bake=True``, when a quantized weight is also used by a layer that
            does not quantize it (writing grid values would change that layer too). Nothing
            is changed then.
    """
    _check_model(model)
    bake = check_bool(bake, "bake")
    if bake:
        _bake(model)
    detached = []
    for name, layer in model.named_modules():
        if hasattr(layer, _NESTED_ATTR):
            layer.use_nested_tensor = layer.__dict__.pop(_NESTED_ATTR)
        if not hasattr(layer, _WEIGHTS_ATTR):
            continue
        del layer.forward
        layer._forward_pre_hooks.pop(getattr(layer, _HOOK_ATTR), None)
        for child_name, child in list(layer.named_children()):
            if isinstance(child, ApproxQuantizer):
                delattr(layer, child_name)
        delattr(layer, _WEIGHTS_ATTR)
        delattr(layer, _HOOK_ATTR)
        detached.append(name)
    return detached


@torch.no_grad()
def _bake(model: nn.Module) -> None:
    # Every value is computed before anything is written, and a tied weight once.
    plans: dict[int, tuple[nn.Module, str, torch.Tensor]] = {}
    users: dict[int, list[str]] = {}
    for layer_name, layer in model.named_modules():
        for weight_name in getattr(layer, _WEIGHTS_ATTR, ()):
            source = weight_source(layer, weight_name)
            users.setdefault(id(source), []).append(f"{layer_name}.{weight_name}" if layer_name else weight_name)
            if id(source) not in plans:
                quantizer = layer._modules[f"{weight_name}_quantizer"]
                value, _ = quantizer.fake_quantize_with_scale(getattr(layer, weight_name))
                plans[id(source)] = (layer, weight_name, value)
    _check_no_float_users(model, plans, users)
    for layer, weight_name, value in plans.values():
        if parametrize.is_parametrized(layer, weight_name):
            parametrize.remove_parametrizations(layer, weight_name, leave_parametrized=True)
            getattr(layer, weight_name).copy_(value)
        elif f"{weight_name}_orig" in layer._parameters:  # torch.nn.utils.prune
            mask = getattr(layer, f"{weight_name}_mask")
            layer._parameters[f"{weight_name}_orig"].copy_(value)
            # prune refreshes the plain attribute only on the next forward: refresh it now.
            layer.__dict__[weight_name] = layer._parameters[f"{weight_name}_orig"] * mask
        else:
            getattr(layer, weight_name).copy_(value)


def _check_no_float_users(model: nn.Module, plans: dict, users: dict[int, list[str]]) -> None:
    quantized = {_source_slot(layer, name) for _, layer in model.named_modules()
                 for name in getattr(layer, _WEIGHTS_ATTR, ())}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter_name, parameter in module._parameters.items():
            if id(parameter) in plans and (id(module), parameter_name) not in quantized:
                owner = f"{module_name}.{parameter_name}" if module_name else parameter_name
                raise ValueError(
                    f"cannot bake: the weight quantized as {', '.join(users[id(parameter)])} is also used, in float, "
                    f"as {owner!r}; baking grid values into it would change that layer too. Quantize that layer as "
                    "well (it may need a registered layer type), or detach without bake"
                )


def _source_slot(layer: nn.Module, name: str) -> tuple[int, str]:
    """(module, attribute) where a quantized weight's Parameter is held."""
    return (id(layer), f"{name}_orig" if f"{name}_orig" in layer._parameters else name)


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


def _check_materialized(name: str, layer: nn.Module, weight_names: Iterable[str]) -> None:
    for weight_name in weight_names:
        if isinstance(getattr(layer, weight_name), nn.parameter.UninitializedParameter):
            raise ValueError(
                f"layer {name!r} is a lazy module whose {weight_name!r} is not initialized yet: "
                "run one forward pass before attach()"
            )


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")


def _warn_float_layers(model: nn.Module, excluded: list[str]) -> None:
    from .coverage import coverage, describe_float_layers

    message = describe_float_layers(coverage(model, excluded=excluded))
    if message:
        warnings.warn(f"torchapprox.attach: {message}", UserWarning, stacklevel=3)


__all__ = [
    "attach",
    "detach",
    "enable_statistics",
    "load_quantizer_state",
    "quantized_layers",
    "quantizer_state",
    "set_bitwidth",
    "statistics",
    "weight_source",
]
