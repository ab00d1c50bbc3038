"""QuantSpec: one frozen, validated description of how a tensor is quantized.

Everything below the spec reads it and nothing re-validates: ``ta.attach`` turns a weight
spec and an input spec (and per-layer ``rules``) into one quantizer per tensor, the
quantizer family named by ``spec.quantizer`` (see :func:`torchapprox.register_quantizer`)
computes the quantization parameters, and the callback, the Hydra configs
(``conf/quant/``) and checkpoints carry specs as they are (``QuantSpec.to_dict()`` is plain
Python, so a checkpoint holding one loads with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from collections.abc import Mapping
from typing import Any

from .quantizers.approx_quantizer import check_bitwidth

GRIDS = ("signed", "unsigned", "auto")
GRANULARITIES = ("per_tensor", "per_channel", "per_token")
RANGES = ("dynamic", "running", "static")


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"QuantSpec `{field}` must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _flag(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"QuantSpec `{field}` must be True or False, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a layer's weight, or one of its inputs) is quantized.

    Fields (each checked at construction: a bad value raises a ``ValueError`` or
    ``TypeError`` naming the field, the value and what is allowed):

    - ``bits``: bits of the integer grid, an int in 2..32 (``set_bitwidth`` and the
      callback's schedule change it later, except where a rule pins it).
    - ``quantizer``: the quantizer family, a name registered with
      :func:`torchapprox.register_quantizer` (``"minmax"``: :class:`MinMaxQuant`, the
      default; ``"lsq"``: learned step sizes).
    - ``grid``: ``"signed"``: the narrow symmetric grid ``[-(2^(b-1)-1), 2^(b-1)-1]``;
      ``"unsigned"``: ``[0, 2^b - 1]`` (negative values clip to 0); ``"auto"``: unsigned for
      a non-negative tensor (or channel), signed otherwise, chosen per call.
    - ``granularity``: ``"per_tensor"`` (one scale), ``"per_channel"`` (weights: one scale
      per output channel, the axis the layer type declares), ``"per_token"`` (inputs: one
      scale per row of the last dimension).
    - ``range``: where the scale comes from. ``"dynamic"``: each tensor's own range;
      ``"running"``: inputs, in eval mode, an exponential moving average (``momentum``) of
      the ranges seen in training; ``"static"``: a frozen range set by
      :func:`torchapprox.calibrate` (each tensor's own range until then).
    - ``range_gradient``: the gradient also reaches the range ``max|x|`` (minmax family,
      where the range comes from the tensor; see :class:`MinMaxQuant`).
    - ``momentum``: the running range's update weight, in (0, 1].
    - ``recompute``: inputs: a layer keeps its float input for backward and recomputes the
      grid values there (True), or keeps the grid values (False: faster, more memory).
    - ``fold_batchnorm``: weights of a Conv1d/2d/3d followed by BatchNorm: fold
      the BatchNorm into the weight before quantizing it, in training too (the integer
      weights are the folded layer's; see :mod:`torchapprox.batchnorm_fold`). Weights only.
    - ``options``: family-specific settings, a dict (checked by the family, e.g.
      ``{"clip": 1.0}``); stored as a sorted tuple of pairs so that the spec stays hashable.

    Contradictions are refused at construction: a running or static range with per-channel
    or per-token scales (a stored range is one per tensor).

    Example::

        >>> spec = QuantSpec(bits=4, grid="auto", granularity="per_token")
        >>> spec.replace(bits=2).bits
        2
    """

    bits: int = 8
    quantizer: str = "minmax"
    grid: str = "signed"
    granularity: str = "per_tensor"
    range: str = "dynamic"
    range_gradient: bool = False
    momentum: float = 0.1
    recompute: bool = True
    fold_batchnorm: bool = False
    options: Any = ()

    def __post_init__(self) -> None:
        from .quantizers.registry import quantizer_class

        set_ = object.__setattr__  # the dataclass is frozen: normalise once, here
        set_(self, "bits", check_bitwidth(self.bits, "bits"))
        if not isinstance(self.quantizer, str):
            raise TypeError(f"QuantSpec `quantizer` must be the name of a registered quantizer family, "
                            f"got {self.quantizer!r}")
        family = quantizer_class(self.quantizer)  # a ValueError naming the registered families
        _choice("grid", self.grid, GRIDS)
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("range", self.range, RANGES)
        _flag("range_gradient", self.range_gradient)
        _flag("recompute", self.recompute)
        _flag("fold_batchnorm", self.fold_batchnorm)
        momentum = self.momentum
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 < momentum <= 1:
            raise ValueError(f"QuantSpec `momentum` must be a number in (0, 1], got {momentum!r}")
        set_(self, "momentum", float(momentum))
        set_(self, "options", _frozen_options(self.options))
        if self.range != "dynamic" and self.granularity != "per_tensor":
            raise ValueError(f"QuantSpec `range={self.range!r}` keeps one range per tensor: it cannot go with "
                             f"`granularity={self.granularity!r}`; use granularity='per_tensor' or range='dynamic'")
        family.check_spec(self)

    # ------------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with ``changes`` applied, validated again."""
        unknown = [name for name in changes if name not in FIELD_NAMES]
        if unknown:
            raise ValueError(f"unknown QuantSpec field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                             f"the fields are: {', '.join(FIELD_NAMES)}")
        return dataclasses.replace(self, **changes)

    def option(self, name: str, default: Any = None) -> Any:
        """A family-specific option (see ``options``)."""
        return dict(self.options).get(name, default)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (ints, floats, strings, bools, dicts): for checkpoints and configs."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["options"] = dict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """The spec :meth:`to_dict` wrote (or any subset of the fields)."""
        if isinstance(data, QuantSpec):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"a QuantSpec is given as a QuantSpec or a dict of its fields, got {data!r}")
        data = {k: v for k, v in data.items() if k != "_target_"}
        unknown = [name for name in data if name not in FIELD_NAMES]
        if unknown:
            raise ValueError(f"unknown QuantSpec field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                             f"the fields are: {', '.join(FIELD_NAMES)}")
        return cls(**data)

    def __repr__(self) -> str:
        default = _DEFAULT_VALUES
        changed = [f"{name}={getattr(self, name)!r}" for name in FIELD_NAMES
                   if name != "options" and getattr(self, name) != default[name]]
        if self.options:
            changed.append(f"options={dict(self.options)!r}")
        return f"QuantSpec({', '.join(changed)})"


def _frozen_options(options: object) -> tuple[tuple[str, Any], ...]:
    if options is None:
        return ()
    if isinstance(options, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in options):
        options = dict(options)
    if not isinstance(options, Mapping):
        raise TypeError(f"QuantSpec `options` must be a dict of family-specific settings, got {options!r}")
    for key in options:
        if not isinstance(key, str):
            raise TypeError(f"QuantSpec `options` keys must be strings, got {key!r}")
    return tuple(sorted((key, _plain(value)) for key, value in options.items()))


def _plain(value: Any) -> Any:
    # Values from a Hydra config arrive as ListConfig/DictConfig: keep specs plain Python.
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(QuantSpec))
_DEFAULT_VALUES = {f.name: f.default for f in dataclasses.fields(QuantSpec)}


def as_spec(value: QuantSpec | Mapping[str, Any] | None, argument: str, default: QuantSpec) -> QuantSpec:
    """``value`` as a QuantSpec (a dict of fields is accepted too); ``default`` for None."""
    if value is None:
        return default
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, Mapping):
        try:
            return default.replace(**{k: v for k, v in value.items() if k != "_target_"})
        except (TypeError, ValueError) as error:
            raise type(error)(f"`{argument}`: {error}") from None
    raise TypeError(f"`{argument}` must be a QuantSpec or a dict of its fields, got {value!r}")


# ------------------------------------------------------------------------------- rules
ROLES = ("weight", "input")
LAYER_KEYS = ("multiplier", "multiplier_gradient")  # settings of the layer's products, not of a spec
WEIGHT_ONLY = ("fold_batchnorm",)  # a rule's field that only a weight spec takes
RULE_KEYS = (*FIELD_NAMES, "weight", "input", "enabled", *LAYER_KEYS)


def check_rules(rules: Mapping[str, Mapping[str, Any]] | None, argument: str = "rules") -> dict[str, dict[str, Any]]:
    """``{fnmatch pattern over layer names: {field: value}}``, checked.

    A rule's fields apply to both the weight and the input specs of the layers it matches;
    ``{"weight": {...}}`` or ``{"input": {...}}`` inside a rule applies to one of them only,
    and ``{"enabled": False}`` leaves the matching layers in float. Every field is validated
    against the specs it will build (in :func:`resolve`); here, the shape of the rules.
    """
    if rules is None:
        return {}
    if not isinstance(rules, Mapping):
        raise TypeError(f"`{argument}` must be a dict {{layer pattern: {{field: value}}}}, got {rules!r}")
    checked: dict[str, dict[str, Any]] = {}
    for pattern, fields in rules.items():
        if not isinstance(pattern, str):
            raise TypeError(f"`{argument}` keys must be fnmatch patterns over layer names (str), got {pattern!r}")
        if not isinstance(fields, Mapping):
            raise TypeError(f"`{argument}[{pattern!r}]` must be a dict {{field: value}}, got {fields!r}")
        unknown = [key for key in fields if key not in RULE_KEYS]
        if unknown:
            raise ValueError(f"`{argument}[{pattern!r}]`: unknown field{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; a rule takes the QuantSpec fields "
                             f"({', '.join(FIELD_NAMES)}), 'weight' or 'input' (a dict of fields for one of "
                             "them), 'enabled', 'multiplier' and 'multiplier_gradient'")
        for role in ROLES:
            if role in fields:
                inner = fields[role]
                if not isinstance(inner, Mapping) or any(k not in FIELD_NAMES for k in inner):
                    raise ValueError(f"`{argument}[{pattern!r}][{role!r}]` must be a dict of QuantSpec fields "
                                     f"({', '.join(FIELD_NAMES)}), got {inner!r}")
        if "enabled" in fields and not isinstance(fields["enabled"], bool):
            raise TypeError(f"`{argument}[{pattern!r}]['enabled']` must be True or False, got {fields['enabled']!r}")
        checked[pattern] = {k: (dict(v) if k in ROLES else v) for k, v in fields.items()}
    return checked


@dataclasses.dataclass(frozen=True)
class LayerSpecs:
    """What :func:`resolve` gives one layer: its weight and input specs (None: not
    quantized) and whether a rule pinned their bits (``set_bitwidth`` leaves them)."""

    weight: QuantSpec | None
    input: QuantSpec | None
    weight_pinned: bool = False
    input_pinned: bool = False
    layer: dict = dataclasses.field(default_factory=dict)  # the rules' LAYER_KEYS for this layer


def resolve(layer_name: str, weight: QuantSpec | None, input: QuantSpec | None,
            rules: Mapping[str, Mapping[str, Any]], argument: str = "rules") -> LayerSpecs:
    """The specs of layer ``layer_name``: the base specs with every matching rule applied
    in order (a later rule wins over an earlier one for the fields both set)."""
    changes: dict[str, dict[str, Any]] = {"weight": {}, "input": {}}
    enabled = True
    layer: dict[str, Any] = {}
    for pattern, fields in rules.items():
        if not fnmatch.fnmatchcase(layer_name, pattern):
            continue
        for key, value in fields.items():
            if key == "enabled":
                enabled = value
            elif key in LAYER_KEYS:
                layer[key] = value
            elif key in ROLES:
                changes[key].update(value)
            elif key in WEIGHT_ONLY:
                changes["weight"][key] = value
            else:
                changes["weight"][key] = value
                changes["input"][key] = value
    if not enabled:
        return LayerSpecs(None, None)
    specs = {}
    for role, base in (("weight", weight), ("input", input)):
        if base is None or not changes[role]:
            specs[role] = base
            continue
        try:
            specs[role] = base.replace(**changes[role])
        except (TypeError, ValueError) as error:
            raise type(error)(f"`{argument}` for layer {layer_name!r} ({role}): {error}") from None
    return LayerSpecs(specs["weight"], specs["input"], weight_pinned="bits" in changes["weight"],
                      input_pinned="bits" in changes["input"], layer=layer)


__all__ = ["GRANULARITIES", "GRIDS", "LayerSpecs", "QuantSpec", "RANGES", "as_spec", "check_rules", "resolve"]
