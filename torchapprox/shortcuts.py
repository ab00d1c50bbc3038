"""The keywords ``attach`` and the callback took before specs (``bitwidth``,
``activation_grid``, ``per_channel_weights``, ``bitwidth_overrides``, ...): shortcuts that
build :class:`~torchapprox.QuantSpec` values and rules, kept for one release.

Each keyword is checked under its own name; one that is given (not None) replaces the
matching field of the spec it applies to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .quantizers.approx_quantizer import check_bitwidth
from .spec import GRIDS, QuantSpec
from .validation import check_bool, check_overrides, check_range_gradient

EVAL_RANGES = ("batch", "running")


def apply_shortcuts(weight: QuantSpec | None, input: QuantSpec | None, rules: dict[str, dict[str, Any]], *,
                    bitwidth: int | None = None, activation_grid: str | None = None,
                    recompute_inputs: bool | None = None, per_channel_weights: bool | None = None,
                    range_gradient: bool | str | None = None, eval_range: str | None = None,
                    per_token_inputs: bool | None = None, bitwidth_overrides: Mapping[str, int] | None = None,
                    ) -> tuple[QuantSpec | None, QuantSpec | None, dict[str, dict[str, Any]]]:
    """(weight spec, input spec, rules) with the given shortcuts applied (None: not given)."""
    weight_changes: dict[str, Any] = {}
    input_changes: dict[str, Any] = {}
    if bitwidth is not None:
        bits = check_bitwidth(bitwidth)
        weight_changes["bits"] = input_changes["bits"] = bits
    if activation_grid is not None:
        if activation_grid not in GRIDS:
            raise ValueError(f"`activation_grid` must be one of {', '.join(GRIDS)}, got {activation_grid!r}")
        input_changes["grid"] = activation_grid
    if recompute_inputs is not None:
        input_changes["recompute"] = check_bool(recompute_inputs, "recompute_inputs")
    if per_channel_weights is not None:
        per_channel = check_bool(per_channel_weights, "per_channel_weights")
        weight_changes["granularity"] = "per_channel" if per_channel else "per_tensor"
    if per_token_inputs is not None:
        per_token = check_bool(per_token_inputs, "per_token_inputs")
        input_changes["granularity"] = "per_token" if per_token else "per_tensor"
    if range_gradient is not None:
        range_gradient = check_range_gradient(range_gradient)
        weight_changes["range_gradient"] = range_gradient in (True, "weights")
        input_changes["range_gradient"] = range_gradient in (True, "inputs")
    if eval_range is not None:
        if eval_range not in EVAL_RANGES:
            raise ValueError(f"`eval_range` must be one of {', '.join(EVAL_RANGES)}, got {eval_range!r}")
        input_changes["range"] = "running" if eval_range == "running" else "dynamic"
    overrides = check_overrides(bitwidth_overrides)
    if weight is not None and weight_changes:
        weight = _replaced(weight, weight_changes, "weight")
    if input is not None and input_changes:
        input = _replaced(input, input_changes, "input")
    rules = dict(rules)
    # The first matching override wins; among rules the last one does: add them reversed.
    for pattern, bits in reversed(list(overrides.items())):
        rules[pattern] = {**rules.get(pattern, {}), "bits": bits}
    return weight, input, rules


_KEYWORDS = {"grid": "activation_grid", "recompute": "recompute_inputs", "range": "eval_range", "bits": "bitwidth"}
_GRANULARITY = {"weight": "per_channel_weights", "input": "per_token_inputs"}


def _replaced(spec: QuantSpec, changes: dict[str, Any], role: str) -> QuantSpec:
    try:
        return spec.replace(**changes)
    except ValueError as error:
        # A contradiction between shortcuts (per_token_inputs with eval_range='running'):
        # name the keywords the user gave.
        names = {**_KEYWORDS, "granularity": _GRANULARITY[role]}
        given = ", ".join(f"`{names.get(k, k)}`" for k in changes)
        raise ValueError(f"{error} (from the keywords {given})") from None
