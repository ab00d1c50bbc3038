from __future__ import annotations

import dataclasses
import fnmatch
import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import batchnorm_fold
from .approximation import (check_operands, install_multipliers, multiplier_state, multipliers_from_state,
                            remove_multiplier, report_unable, why_not)
from .layers import find_layer_type
from .layers.approximate import MultiplierSetting
from .layers.builtin import quantizable_pooling
from .layers.folded import folded_weight
from .layers.functional import quantizer_of
from .layers.registry import LayerType
from .multipliers import Multiplier
from .quantizers import ApproxQuantizer
from .quantizers.approx_quantizer import check_bitwidth
from .quantizers.registry import build_quantizer
from .shortcuts import apply_shortcuts
from .spec import LayerSpecs, QuantSpec, as_spec, check_rules, resolve
from .statistics import enable_statistics, statistics
from .validation import check_bool, check_patterns

QUANTIZER_SUFFIX = "_quantizer"

# Attributes attach() leaves on a layer; detach() removes exactly these.
_WEIGHTS_ATTR = "_torchapprox_weights"  # names of the layer's quantized weights
_INPUTS_ATTR = "_torchapprox_inputs"  # names of the layer's quantized inputs
_HOOK_ATTR = "_torchapprox_hook_id"
_NESTED_ATTR = "_torchapprox_use_nested_tensor"


def attach(
    model: nn.Module,
    bitwidth: int | None = None,
    *,
    weight: QuantSpec | Mapping[str, Any] | None = None,
    input: QuantSpec | Mapping[str, Any] | None = None,
    rules: Mapping[str, Mapping[str, Any]] | None = None,
    exclude: str | Iterable[str] = (),
    weights: bool = True,
    activations: bool = True,
    bitwidth_overrides: Mapping[str, int] | None = None,
    activation_grid: str | None = None,
    recompute_inputs: bool | None = None,
    per_channel_weights: bool | None = None,
    range_gradient: bool | str | None = None,
    eval_range: str | None = None,
    per_token_inputs: bool | None = None,
    multiplier: Multiplier | None = None,
    multiplier_gradient: str = "ste",
    fold_batchnorm: bool | None = None,
    quantize_pooling: bool = False,
) -> list[str]:
    """Put quantizers on the weights and inputs of ``model``'s layers, as specs describe.

    All or nothing: when anything is wrong (a bad spec, a rule that cannot apply to a
    layer, a lazy layer) it raises and the model is exactly as it was.

    Args:
        model: any ``nn.Module``; changed in place.
        bitwidth: bits of every quantizer, an int in 2..32 (replaces ``bits`` of both specs;
            default: the specs' own, 8 for the default spec).
        weight: the :class:`~torchapprox.QuantSpec` of every layer's weights (or a dict of
            its fields); default ``QuantSpec()`` (8 bits, min/max, signed, per tensor).
        input: the spec of every layer's float inputs; default ``QuantSpec()``.
        rules: ``{fnmatch pattern over layer names: {field: value}}``: per-layer changes to
            both specs (``{"weight": {...}}`` or ``{"input": {...}}`` for one of them;
            ``{"enabled": False}`` leaves the layer in float). A rule that sets ``bits``
            pins them: ``set_bitwidth`` leaves those quantizers alone. Later rules win.
        exclude: fnmatch patterns over qualified layer names left in float
            (``"classifier"``, ``"*.out_proj"``).
        weights: quantize the weights of each layer (False: ``weight=None``).
        activations: quantize the float inputs of each layer (False: ``input=None``).
        multiplier: a :class:`torchapprox.multipliers.Multiplier` whose table gives every
            integer product of the layers that can take one (Linear, Conv1d/2d/3d,
            transformers' Conv1D; the others keep exact products, named in a warning);
            rules set it per layer (``{"multiplier": m}``, None for exact products).
            Default None: exact products. See :func:`torchapprox.set_multiplier`.
        multiplier_gradient: the products' gradient, ``"ste"`` (the exact product's) or
            ``"table"`` (the table's local slopes); rules may set ``"multiplier_gradient"``.
        fold_batchnorm: ``weight.fold_batchnorm``: fold each BatchNorm that follows a
            quantized Conv1d/2d/3d into its weight, in training too, so that the
            trained integer weights are the exported folded layer's (pairs found with
            ``torch.fx``; see :mod:`torchapprox.batchnorm_fold`). Rules may set it per layer.
        quantize_pooling: also quantize the inputs of pooling layers (AvgPool,
            AdaptiveAvgPool, MaxPool; with the input spec), so that a convolution followed
            by pooling has a quantized output, which ONNX Runtime fuses into an integer
            kernel (``QLinearConv``). Default False.

    Shortcuts (kept for one release; each given one replaces a field of the specs):
        bitwidth_overrides: ``{pattern: bits}``, rules that pin bits (the first matching
            pattern wins).
        activation_grid: ``input.grid`` ("signed", "unsigned" or "auto").
        recompute_inputs: ``input.recompute``: True, layers keep their float input for
            backward and recompute its grid values there (peak memory close to the float
            model's, one more elementwise pass); False, they keep the grid values.
        per_channel_weights: ``weight.granularity = "per_channel"`` (one scale per output
            channel: the axis each layer type declares, 0 for Linear/Conv, 1 for
            ConvTranspose and transformers' Conv1D).
        range_gradient: ``range_gradient`` of both specs (True), of one (``"weights"``,
            ``"inputs"``) or neither (False).
        eval_range: ``"batch"`` or ``"running"``: ``input.range`` "dynamic" or "running".
        per_token_inputs: ``input.granularity = "per_token"`` (one scale per row of the last
            dimension; such inputs cannot be exported to ONNX QDQ).

    Returns:
        The qualified names (as ``model.named_modules()`` spells them) of the quantized
        layers. Attaching again replaces the quantizers rather than stacking them.

    Weights shared by several layers (tied embeddings and output heads) get one quantizer,
    shared by every layer that uses them, so they are quantized the same way everywhere.
    A warning names the layer types whose weights stay in float (see :func:`coverage`).

    Raises:
        TypeError, ValueError: a bad argument, spec or rule (naming it), a spec a layer's
            tensor cannot take (per-token scales on a weight), a lazy layer.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> attach(model, weight=QuantSpec(bits=4, granularity="per_channel"),
        ...        input=QuantSpec(bits=4, grid="auto"), rules={"2": {"bits": 8}})
        ['0', '2']
    """
    _check_model(model)
    weights = check_bool(weights, "weights")
    activations = check_bool(activations, "activations")
    if not (weights or activations):
        raise ValueError("`weights` and `activations` are both False: nothing would be quantized")
    weight_spec = as_spec(weight, "weight", QuantSpec()) if weights else None
    input_spec = as_spec(input, "input", QuantSpec()) if activations else None
    checked_rules = check_rules(rules)
    weight_spec, input_spec, all_rules = apply_shortcuts(
        weight_spec, input_spec, checked_rules, bitwidth=bitwidth, activation_grid=activation_grid,
        recompute_inputs=recompute_inputs, per_channel_weights=per_channel_weights, range_gradient=range_gradient,
        eval_range=eval_range, per_token_inputs=per_token_inputs, bitwidth_overrides=bitwidth_overrides)
    if fold_batchnorm is not None:
        fold = check_bool(fold_batchnorm, "fold_batchnorm")
        if weight_spec is None and fold:
            raise ValueError("`fold_batchnorm=True` folds BatchNorm into quantized weights, and `weights` is False")
        if weight_spec is not None:
            weight_spec = weight_spec.replace(fold_batchnorm=fold)
    patterns = check_patterns(exclude)

    pooling = check_bool(quantize_pooling, "quantize_pooling")
    candidates = {name: (layer, layer_type) for name, layer in model.named_modules()
                  if (layer_type := find_layer_type(layer)) is not None
                  and (not layer_type.pooling or pooling and quantizable_pooling(layer))}
    for argument, given in (("exclude", patterns), ("rules", checked_rules), ("bitwidth_overrides",
                                                                             bitwidth_overrides or {})):
        _warn_unmatched(given, list(candidates), argument)
    plans, layer_settings = {}, {}
    for name, (layer, layer_type) in candidates.items():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        specs = resolve(name, weight_spec, input_spec, all_rules)
        if specs.weight is None and specs.input is None:
            continue
        plan = _plan_layer(name, layer, layer_type, specs)
        if plan.weights or plan.inputs:  # a pooling layer without an input spec has nothing
            plans[name] = plan
            layer_settings[name] = specs.layer
    products = _plan_products(plans, layer_settings, multiplier, multiplier_gradient)
    pairs = _plan_folds(model, plans, products)
    _apply(model, plans)
    install_multipliers(model, products)
    batchnorm_fold.install(model, pairs)
    _warn_float_layers(model, excluded=[n for n in candidates if n not in plans])
    return list(plans)


def _plan_folds(model: nn.Module, plans: dict[str, _LayerPlan], products: dict) -> dict[str, str]:
    """``{layer: BatchNorm}`` to fold: the planned layers whose weight spec asks for it."""
    asked = [name for name, plan in plans.items() if any(entry[0].fold_batchnorm for entry in plan.weights.values())]
    pairs = batchnorm_fold.find_pairs(model, asked)
    if asked and not pairs:
        warnings.warn("fold_batchnorm=True found no Conv1d/2d/3d followed by BatchNorm to fold",
                      UserWarning, stacklevel=3)
    both = [name for name in pairs if products.get(name) is not None]
    if both:
        raise ValueError(f"layers {', '.join(both[:8])} would both fold their BatchNorm and compute with an approximate "
                         "multiplier, which is not supported: exclude them from one of the two with a rule")
    return pairs


def _plan_products(plans: dict[str, _LayerPlan], layer_settings: dict[str, dict[str, Any]],
                   multiplier: Multiplier | None, gradient: str) -> dict[str, MultiplierSetting]:
    """The multiplier of each planned layer (attach's, or a rule's), checked against the
    specs it will have; warns about layers that cannot take one, raises if none of those
    asked to can."""
    settings: dict[str, MultiplierSetting] = {}
    unable: dict[str, list[str]] = {}
    for name, plan in plans.items():
        chosen = layer_settings[name].get("multiplier", multiplier)
        if chosen is None:
            continue
        setting = MultiplierSetting(chosen, layer_settings[name].get("multiplier_gradient", gradient), name)
        reason = why_not(plan.layer_type.name, plan.layer_type.multiplier, bool(plan.weights and plan.inputs))
        if reason is not None:
            unable.setdefault(reason, []).append(name)
            continue
        check_operands(setting, [("weight", spec.bits, spec.grid) for spec, *_ in plan.weights.values()]
                       + [("input", spec.bits, spec.grid) for spec, _ in plan.inputs.values()],
                       convolution=isinstance(plan.layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
                       per_token=any(spec.granularity == "per_token" for spec, _ in plan.inputs.values()))
        settings[name] = setting
    report_unable(unable, bool(settings), "attach: no layer can take the multiplier", "attach")
    return settings


@dataclasses.dataclass
class _LayerPlan:
    """The quantizers one layer gets: ``{tensor name: (spec, pinned, channel axis, groups)}``."""

    layer: nn.Module
    layer_type: LayerType
    weights: dict[str, tuple[QuantSpec, bool, int | None, int]]
    inputs: dict[str, tuple[QuantSpec, bool]]


def _plan_layer(name: str, layer: nn.Module, layer_type: LayerType, specs: LayerSpecs) -> _LayerPlan:
    layout = layer_type.weight_layout(layer)
    weights, inputs = {}, {}
    if specs.weight is not None:
        _check_role(specs.weight, "weight", name)
        _check_materialized(name, layer, layout)
        weights = {w: (specs.weight, specs.weight_pinned, axis, groups) for w, (axis, groups) in layout.items()}
    if specs.input is not None and layer_type.inputs:
        _check_role(specs.input, "input", name)
        inputs = {i: (specs.input, specs.input_pinned) for i in layer_type.inputs}
    return _LayerPlan(layer, layer_type, weights, inputs)


def _check_role(spec: QuantSpec, role: str, layer_name: str) -> None:
    if role == "weight" and spec.granularity == "per_token":
        raise ValueError(f"layer {layer_name!r}: the weight spec has granularity='per_token', which is for inputs "
                         "(one scale per token); weights take 'per_tensor' or 'per_channel'")
    if role == "weight" and spec.range != "dynamic":
        raise ValueError(f"layer {layer_name!r}: the weight spec has range={spec.range!r}, which is for inputs "
                         "(a weight's scale comes from the weight itself): use range='dynamic'")
    if role == "input" and spec.fold_batchnorm:
        raise ValueError(f"layer {layer_name!r}: the input spec has fold_batchnorm=True, which is for weights "
                         "(the BatchNorm after a layer is folded into its weight)")
    if role == "input" and spec.granularity == "per_channel":
        raise ValueError(f"layer {layer_name!r}: the input spec has granularity='per_channel', which is for weights; "
                         "inputs take 'per_tensor' or 'per_token' (a rule can set one role: {'weight': {...}})")


def _apply(model: nn.Module, plans: dict[str, _LayerPlan]) -> None:
    """Build every quantizer first (anything that fails leaves the model untouched), then
    replace the model's quantizers with them."""
    _install_built(model, plans, _build(plans))


def _build(plans: dict[str, _LayerPlan]) -> dict[str, tuple[dict[str, ApproxQuantizer], dict[str, ApproxQuantizer]]]:
    """The quantizers of every planned layer, ``{layer: (weights, inputs)}``; nothing installed."""
    shared = _SharedWeightQuantizers()
    built = {}
    for name, plan in plans.items():
        weight_quantizers = {w: shared.quantizer(name, plan.layer, w, *entry) for w, entry in plan.weights.items()}
        input_quantizers = {}
        for input_name, (spec, pinned) in plan.inputs.items():
            quantizer = build_quantizer(spec, role="input")
            quantizer.pinned = pinned
            input_quantizers[input_name] = quantizer
        built[name] = (weight_quantizers, input_quantizers)
    return built


def _install_built(model: nn.Module, plans: dict[str, _LayerPlan], built: dict) -> None:
    detach(model)
    for name, plan in plans.items():
        weight_quantizers, input_quantizers = built[name]
        for tensor_name, quantizer in {**weight_quantizers, **input_quantizers}.items():
            plan.layer.add_module(f"{tensor_name}_quantizer", quantizer)
        _install(plan.layer, plan.layer_type, tuple(weight_quantizers), tuple(input_quantizers))
    for name, layer in model.named_modules():
        if isinstance(layer, nn.MultiheadAttention) and name not in plans and hasattr(layer.out_proj, _WEIGHTS_ATTR):
            # Float attention reads its out_proj's weight directly instead of calling it: run
            # it through the quantized forward (no quantizers of its own), which calls it.
            _install(layer, find_layer_type(layer), (), ())
        elif isinstance(layer, nn.TransformerEncoder) and any(hasattr(m, _WEIGHTS_ATTR) for m in layer.modules()):
            # In eval mode with a padding mask the encoder turns its input into a nested
            # tensor before its layers run, and quantizers cannot take a nested tensor: the
            # encoder's own switch for that path stays off while quantizers are attached.
            setattr(layer, _NESTED_ATTR, layer.use_nested_tensor)
            layer.use_nested_tensor = False


class _SharedWeightQuantizers:
    """One quantizer per weight source: a Parameter used by several layers (tied weights)
    is quantized by the same module wherever it is used."""

    def __init__(self) -> None:
        self.by_source: dict[int, tuple[ApproxQuantizer, str, int | None]] = {}

    def quantizer(self, layer_name: str, layer: nn.Module, weight_name: str, spec: QuantSpec, pinned: bool,
                  axis: int | None, groups: int) -> ApproxQuantizer:
        source = weight_source(layer, weight_name)
        if id(source) not in self.by_source:
            quantizer = build_quantizer(spec, role="weight", channel_axis=axis, channel_groups=groups,
                                        tensor=getattr(layer, weight_name))
            quantizer.pinned = pinned
            self.by_source[id(source)] = (quantizer, layer_name, axis)
            return quantizer
        quantizer, first, first_axis = self.by_source[id(source)]
        if spec.granularity == "per_channel" and quantizer.spec.granularity == "per_channel" and first_axis != axis:
            # No per-channel axis fits both uses: one scale for the tensor.
            quantizer.spec = quantizer.spec.replace(granularity="per_tensor")
            warnings.warn(f"tied weight {weight_name!r} of {layer_name!r} and {first!r}: their output-channel axes "
                          "differ, so it is quantized with one scale per tensor in both", UserWarning, stacklevel=5)
        elif spec != quantizer.spec or quantizer.pinned != pinned:
            warnings.warn(f"tied weight {weight_name!r} of {layer_name!r} is also used by {first!r}: it is quantized "
                          f"as there ({quantizer.bitwidth} bits{', pinned' if quantizer.pinned else ''}) in both",
                          UserWarning, stacklevel=5)
        return quantizer


def weight_source(layer: nn.Module, name: str) -> object:
    """What a weight's value comes from: its Parameter, the parametrization behind it, or
    the ``<name>_orig`` Parameter of a pruned weight."""
    if parametrize.is_parametrized(layer, name):
        return layer.parametrizations[name]
    if f"{name}_orig" in layer._parameters:
        return layer._parameters[f"{name}_orig"]
    return getattr(layer, name)


def _install(layer: nn.Module, layer_type: LayerType, weight_names: tuple[str, ...],
             input_names: tuple[str, ...]) -> None:
    setattr(layer, _WEIGHTS_ATTR, weight_names)
    setattr(layer, _INPUTS_ATTR, input_names)
    # functools.partial of a module-level function, unlike a bound method, survives
    # pickling and deepcopy of the whole model.
    layer.forward = functools.partial(layer_type.forward, layer)
    handle = layer.register_forward_pre_hook(_keeps_fused_inference_paths_off)
    setattr(layer, _HOOK_ATTR, handle.id)


def _keeps_fused_inference_paths_off(module: nn.Module, args: tuple) -> None:
    """Does nothing. torch's fused Transformer inference path steps aside for modules with
    hooks (TransformerEncoderLayer.forward checks for them), and it would read the float
    weights directly."""


def set_bitwidth(model: nn.Module, bitwidth: int) -> int:
    """Set every quantizer in ``model`` to ``bitwidth``, except those pinned by a rule (or
    ``bitwidth_overrides``); returns how many were set. A family that learns its step
    moves it to the new grid (``ApproxQuantizer.on_bitwidth_change``)."""
    bitwidth = check_bitwidth(bitwidth)
    quantizers = _quantizers(model)
    if not quantizers:
        raise ValueError("`model` has no quantizers to set a bitwidth on: call attach(model) first")
    free = [q for q in quantizers if not q.pinned]
    for quantizer in free:
        quantizer.bitwidth = bitwidth
    return len(free)


def _quantizers(model: nn.Module) -> list[ApproxQuantizer]:
    return [m for m in model.modules() if isinstance(m, ApproxQuantizer)]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` that carry quantizers, by qualified name."""
    return {
        name: layer
        for name, layer in model.named_modules()
        if any(isinstance(child, ApproxQuantizer) for child in layer.children())
    }


def quantized_tensor_names(layer: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(quantized weight names, quantized input names) of an attached layer."""
    return getattr(layer, _WEIGHTS_ATTR, ()), getattr(layer, _INPUTS_ATTR, ())


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors quantizers keep between calls (running ranges, frozen ranges), by
    qualified name (``"net.0.input_quantizer.running_range"``), detached, on their device.

    They live outside ``model.state_dict()`` (which keeps exactly the plain model's keys):
    save them beside it, e.g. in the callback's checkpoint state, and restore them with
    :func:`load_quantizer_state`. Plain tensors: they load with
    ``torch.load(weights_only=True)``. (Learned steps are Parameters: in ``state_dict``.)
    """
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ApproxQuantizer):
            for tensor_name, tensor in module.state_tensors().items():
                state[f"{name}.{tensor_name}" if name else tensor_name] = tensor.detach().clone()
    return state


def load_quantizer_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`quantizer_state` returned onto an attached model. Every entry is
    checked before any is loaded.

    Raises:
        KeyError: a name that is not a quantizer of ``model`` (attached with other options?).
        ValueError: state the quantizer cannot use (a running range on a quantizer without
            ``range='running'``, a static range on a per-channel one), naming the quantizer.
        TypeError: an entry that is not a tensor.
    """
    quantizers = {name: module for name, module in model.named_modules() if isinstance(module, ApproxQuantizer)}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        owner, _, tensor_name = key.rpartition(".")
        quantizer = quantizers.get(owner)
        if quantizer is None:
            raise KeyError(f"quantizer state {key!r} has no quantizer in the model (quantizers: "
                           f"{', '.join(list(quantizers)[:10])}{' ...' if len(quantizers) > 10 else ''})")
        _check_state_entry(quantizer, owner, tensor_name, key, tensor)
        grouped.setdefault(owner, {})[tensor_name] = tensor
    for owner, tensors in grouped.items():
        quantizers[owner].load_state_tensors(tensors, owner)


def synchronize_quantizers(model: nn.Module, all_reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
    """Make every quantizer's state (running and calibrated ranges) the same on every
    process: ``all_reduce(tensor, op)`` reduces over the processes with op "min", "max",
    "sum" or "mean" (running ranges are averaged; calibrated ranges take the min of the
    lows and the max of the highs). Every process must call it, in the same order."""
    seen = set()
    for quantizer in _quantizers(model):
        if id(quantizer) not in seen:
            seen.add(id(quantizer))
            quantizer.synchronize(all_reduce)


# ------------------------------------------------------------- saving and restoring
def float_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the quantizers' own entries (learned steps and their flags:
    every key with a path component named ``<tensor>_quantizer``), so that a checkpoint of
    a quantized model loads into the plain float model strictly:
    ``model.load_state_dict(ta.float_state_dict(checkpoint["state_dict"]))``."""
    return {key: value for key, value in state_dict.items()
            if not any(part.endswith(QUANTIZER_SUFFIX) for part in key.split(".")[:-1])}



STATE_FORMAT = 1


def quantization_state(model: nn.Module) -> dict[str, Any]:
    """Everything needed to quantize a copy of ``model`` exactly as it is: each quantized
    layer's quantizers (spec with its current bits, pinning, channel layout) and their state
    tensors, and the layers' multipliers (``torchapprox.approximation.multiplier_state``), as
    plain Python and tensors (loads with ``torch.load(weights_only=True)``).
    :func:`restore_quantization` puts it back; learned Parameters travel in ``state_dict``."""
    layers: dict[str, dict[str, Any]] = {}
    for name, layer in quantized_layers(model).items():
        weights, inputs = quantized_tensor_names(layer)
        layers[name] = {tensor: {"role": quantizer.role, "spec": quantizer.spec.to_dict(), "pinned": quantizer.pinned,
                                 "channel_axis": quantizer.channel_axis, "channel_groups": quantizer.channel_groups}
                        for tensor in (*weights, *inputs) if (quantizer := quantizer_of(layer, tensor)) is not None}
    tensors = {key: value.cpu() for key, value in quantizer_state(model).items()}
    return {"format": STATE_FORMAT, "layers": layers, "tensors": tensors, "multipliers": multiplier_state(model),
            "batchnorm_folds": batchnorm_fold.folds(model), "batchnorm_frozen": batchnorm_fold.frozen_layers(model)}


def restore_quantization(model: nn.Module, state: Mapping[str, Any]) -> list[str]:
    """Quantize ``model`` as :func:`quantization_state` recorded it (specs, bits, ranges),
    replacing any quantizers it has. All or nothing: everything is checked before the model
    changes. Returns the quantized layers' names.

    For a model with learned steps, call this before ``model.load_state_dict(...)``: the
    steps are Parameters of the quantizers it creates.

    Raises:
        ValueError: ``state`` is not such a record, names a layer ``model`` lacks or cannot
            quantize, a tensor the layer type does not quantize in that role, a channel axis
            the weight does not have, or holds state its quantizers cannot use.
        TypeError: a state tensor that is not a tensor.
    """
    _check_model(model)
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT or "layers" not in state:
        raise ValueError("`state` must be what torchapprox.quantization_state returned (a dict with format "
                         f"{STATE_FORMAT} and 'layers'), got {type(state).__name__}"
                         f"{' with keys ' + ', '.join(map(str, state)) if isinstance(state, Mapping) else ''}")
    plans = {name: _restored_plan(model, name, tensors) for name, tensors in state["layers"].items()}
    built = _build(plans)
    tensors = dict(state.get("tensors") or {})
    products = multipliers_from_state(model, state.get("multipliers") or {})
    quantizers = {f"{name}.{tensor}_quantizer": quantizer for name, (weights, inputs) in built.items()
                  for tensor, quantizer in {**weights, **inputs}.items()}
    for key, tensor in tensors.items():
        owner, _, tensor_name = key.rpartition(".")
        if owner not in quantizers:
            raise ValueError(f"the saved quantizer state {key!r} belongs to no saved quantizer")
        _check_state_entry(quantizers[owner], owner, tensor_name, key, tensor)
    folds = dict(state.get("batchnorm_folds") or {})
    for layer_name, batchnorm_name in folds.items():
        if layer_name not in plans:
            raise ValueError(f"the saved quantization folds a BatchNorm into {layer_name!r}, which it does not quantize")
        try:
            batchnorm = model.get_submodule(batchnorm_name)
        except AttributeError:
            raise ValueError(f"the saved quantization folds {batchnorm_name!r}, which the model does not have") from None
        if not batchnorm_fold.foldable(plans[layer_name].layer, batchnorm):
            raise ValueError(f"the saved quantization folds {batchnorm_name!r} ({type(batchnorm).__name__}) into "
                             f"{layer_name!r}, which cannot take it")
    _install_built(model, plans, built)
    install_multipliers(model, products)
    batchnorm_fold.install(model, folds)
    for layer_name in state.get("batchnorm_frozen") or ():
        fold = batchnorm_fold.fold_of(model.get_submodule(layer_name)) if layer_name in folds else None
        if fold is not None:
            fold.frozen = True
    for key, tensor in tensors.items():
        owner, _, tensor_name = key.rpartition(".")
        quantizers[owner].load_state_tensors({tensor_name: tensor}, owner)
    return list(plans)


def _restored_plan(model: nn.Module, name: str, tensors: Mapping[str, Any]) -> _LayerPlan:
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the saved quantization names layer {name!r}, which the model does not have") from None
    layer_type = find_layer_type(layer)
    if layer_type is None:
        raise ValueError(f"the saved quantization names layer {name!r}, a {type(layer).__name__}, which has no "
                         "registered quantized layer type")
    layout = layer_type.weight_layout(layer)
    weights, inputs = {}, {}
    for tensor, entry in tensors.items():
        spec = QuantSpec.from_dict(entry["spec"])
        role = entry.get("role")
        if role == "weight" and tensor in layout:
            axis = entry.get("channel_axis")
            weight = getattr(layer, tensor)
            if axis is not None and not -weight.dim() <= int(axis) < weight.dim():
                raise ValueError(f"the saved quantization of {name}.{tensor} has channel axis {axis}, which a weight "
                                 f"of shape {tuple(weight.shape)} does not have")
            weights[tensor] = (spec, bool(entry["pinned"]), axis, int(entry.get("channel_groups", 1)))
        elif role == "input" and tensor in layer_type.inputs:
            inputs[tensor] = (spec, bool(entry["pinned"]))
        else:
            raise ValueError(f"the saved quantization names {role!r} tensor {tensor!r} of layer {name!r}, which a "
                             f"{type(layer).__name__} does not quantize (weights: {', '.join(layout)}; inputs: "
                             f"{', '.join(layer_type.inputs) or 'none'})")
    return _LayerPlan(layer, layer_type, weights, inputs)


def _check_state_entry(quantizer: ApproxQuantizer, owner: str, tensor_name: str, key: str, tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantizer state {key!r} must be a tensor, got {type(tensor).__name__}")
    try:
        quantizer.check_state_tensor(tensor_name, tensor)
    except ValueError as error:
        raise ValueError(f"quantizer state {key!r} cannot be loaded into {owner!r}: {error}") from None


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
    batchnorm_fold.remove(model)
    detached = []
    for name, layer in model.named_modules():
        if hasattr(layer, _NESTED_ATTR):
            layer.use_nested_tensor = layer.__dict__.pop(_NESTED_ATTR)
        if not hasattr(layer, _WEIGHTS_ATTR):
            continue
        del layer.forward
        remove_multiplier(layer)
        layer._forward_pre_hooks.pop(getattr(layer, _HOOK_ATTR), None)
        for child_name, child in list(layer.named_children()):
            if isinstance(child, ApproxQuantizer):
                delattr(layer, child_name)
        delattr(layer, _WEIGHTS_ATTR)
        layer.__dict__.pop(_INPUTS_ATTR, None)
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
                quantizer = quantizer_of(layer, weight_name)
                fold = batchnorm_fold.fold_of(layer)
                if fold is not None and weight_name == "weight":
                    # The folded weight's grid values, unfolded: the BatchNorm (running
                    # statistics) scales them back in eval.
                    value, _ = quantizer.fake_quantize(folded_weight(layer, fold))
                    factor = fold.factors()[0]
                    safe = torch.where(factor == 0, torch.ones_like(factor), factor)
                    value = value / safe.reshape(-1, *[1] * (value.dim() - 1))
                else:
                    value, _ = quantizer.fake_quantize(getattr(layer, weight_name))
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
    "float_state_dict",
    "load_quantizer_state",
    "quantization_state",
    "quantized_layers",
    "quantizer_state",
    "restore_quantization",
    "set_bitwidth",
    "statistics",
    "synchronize_quantizers",
    "weight_source",
]
