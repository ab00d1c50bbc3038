"""Per-layer bitwidths under a budget, solved exactly: ``ta.assign_bitwidths``.

Given, for every quantized layer and every candidate bitwidth, a predicted loss increase
(``ta.sensitivity``) and a cost, choose one bitwidth per layer (its weights and inputs) that
minimises the summed sensitivity with the summed cost within the budget: a multiple-choice
knapsack. It is solved exactly by dynamic programming over the layers on the Pareto front of
(cost, sensitivity) of the partial assignments: a partial assignment that costs at least as
much as another and predicts at least as much loss can never be part of a better solution,
so dropping it loses nothing (the front stays small: a few points per distinct cost).

Costs (``cost=``):

- ``"weights"``: the average bits of the quantized weights, weighted by their number of
  parameters: ``sum_l params_l * b_l / sum_l params_l`` (the budget is in bits, e.g. 3.0);
- ``"bytes"``: the size of the quantized weights, ``sum_l params_l * b_l / 8`` bytes;
- ``"bit_operations"``: bit-operations per sample, ``sum_l MACs_l * b_l * b_l`` (weight
  and input both at ``b_l`` bits; MACs per sample as ``ta.sensitivity`` counted them).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

COSTS = ("weights", "bytes", "bit_operations")


@dataclasses.dataclass(frozen=True)
class Assignment:
    """A per-layer bitwidth assignment.

    ``bits``: ``{layer: bits}``; ``rules``: the same as ``attach``'s rules (``{layer: {"bits":
    b}}``, which pin them); ``cost``: the achieved cost in the budget's unit; ``budget``;
    ``cost_kind``; ``sensitivity``: the summed predicted loss increase.
    """

    bits: dict[str, int]
    cost: float
    budget: float
    cost_kind: str
    sensitivity: float
    groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # as Sensitivity.groups

    def layer_bits(self) -> dict[str, int]:
        """``{layer: bits}`` for every layer, the members of a group (a tied weight) included."""
        return {member: bits for key, bits in self.bits.items() for member in self.groups.get(key, [key])}

    @property
    def rules(self) -> dict[str, dict[str, int]]:
        return {layer: {"bits": bits} for layer, bits in self.layer_bits().items()}

    def table(self) -> str:
        """A plain-text table of the assignment (one line per layer) and the achieved budget."""
        names = {key: " + ".join(self.groups.get(key, [key])) for key in self.bits}
        width = max(len(name) for name in names.values()) if names else 5
        lines = [f"{'layer':{width}s}  bits"] + [f"{names[key]:{width}s}  {bits:4d}" for key, bits in self.bits.items()]
        lines.append(f"{self.cost_kind}: {self.cost:.6g} of a budget of {self.budget:.6g}; "
                     f"predicted loss increase {self.sensitivity:.6g}")
        return "\n".join(lines)


def layer_costs(params: Mapping[str, int], macs: Mapping[str, int | None], choices: Sequence[int],
                cost: str) -> dict[str, dict[int, float]]:
    """``{layer: {bits: cost}}`` in units whose sum is compared with the budget (for
    ``"weights"``: parameter-bits over the total parameters, so the sum is the average)."""
    if cost not in COSTS:
        raise ValueError(f"`cost` must be one of {', '.join(map(repr, COSTS))}, got {cost!r}")
    total = sum(params.values())
    if cost == "weights" and not total:
        raise ValueError("cost='weights' averages the bits of the quantized weights, and no layer has one (attached "
                         "with weights=False?): use cost='bit_operations'")
    result = {}
    for layer in params:
        if cost == "weights":
            result[layer] = {b: params[layer] * b / total for b in choices}
        elif cost == "bytes":
            result[layer] = {b: params[layer] * b / 8 for b in choices}
        else:
            if macs.get(layer) is None:
                raise ValueError(f"cost='bit_operations': the multiply-accumulates of layer {layer!r} were not counted "
                                 "(its type has no MAC count); use cost='weights' or 'bytes'")
            result[layer] = {b: macs[layer] * b * b for b in choices}
    return result


def _check_choices(choices: Sequence[int]) -> tuple[int, ...]:
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not choices:
        raise ValueError(f"`choices` must be a non-empty sequence of bitwidths, got {choices!r}")
    for b in choices:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 2 <= b <= 32:
            raise ValueError(f"`choices` must hold ints in 2..32, got {b!r} in {list(choices)!r}")
    return tuple(sorted(set(int(b) for b in choices)))


def assign_bitwidths(sensitivity: Any, budget: float, choices: Sequence[int] = (2, 3, 4, 8),
                     cost: str = "weights") -> Assignment:
    """The per-layer bitwidths that minimise the summed sensitivity within ``budget``.

    Args:
        sensitivity: what ``ta.sensitivity`` returned (a :class:`torchapprox.Sensitivity`:
            ``values`` ``{layer: {bits: predicted loss increase}}``, ``params`` and ``macs``
            per layer), or any object with those three attributes.
        budget: the largest allowed cost: average bits (``"weights"``), bytes, or
            bit-operations per sample.
        choices: the candidate bitwidths (each must have a sensitivity for every layer).
        cost: ``"weights"``, ``"bytes"`` or ``"bit_operations"`` (module docstring).

    Returns:
        An :class:`Assignment`; ``assignment.rules`` goes to ``ta.attach(rules=...)``.

    Raises:
        ValueError: a bad ``choices``/``cost``/``budget``, a layer without a sensitivity for
            a choice, or an infeasible budget (the message gives the smallest feasible one).
    """
    choices = _check_choices(choices)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not budget > 0:
        raise ValueError(f"`budget` must be a positive number, got {budget!r}")
    if not all(hasattr(sensitivity, name) for name in ("values", "params", "macs")):
        raise TypeError(f"`sensitivity` must be what ta.sensitivity returned (values, params, macs), "
                        f"got {type(sensitivity).__name__}")
    values = sensitivity.values
    if not values:
        raise ValueError("`sensitivity` has no layers")
    for layer, by_bits in values.items():
        missing = [b for b in choices if b not in by_bits]
        if missing:
            raise ValueError(f"layer {layer!r} has no sensitivity at {missing} bits (it has {sorted(by_bits)}); "
                             "measure those bits, or choose among the measured ones")
    costs = layer_costs(sensitivity.params, sensitivity.macs, choices, cost)
    layers = list(values)
    smallest = sum(min(costs[layer].values()) for layer in layers)
    if smallest > budget * (1 + 1e-12):
        raise ValueError(f"budget {budget:.6g} ({cost}) is infeasible: the smallest feasible budget with choices "
                         f"{list(choices)} is {smallest:.6g} (every layer at {choices[0]} bits)")
    bits, total_cost, total_sensitivity = solve(layers, costs, values, choices, budget)
    return Assignment(dict(zip(layers, bits)), total_cost, float(budget), cost, total_sensitivity,
                      dict(getattr(sensitivity, "groups", {}) or {}))


def uniform_bitwidths(params: Mapping[str, int], macs: Mapping[str, int | None], budget: float,
                      choices: Sequence[int] = (2, 3, 4, 8), cost: str = "weights",
                      groups: Mapping[str, list[str]] | None = None) -> Assignment:
    """One bitwidth for every layer: the largest of ``choices`` within ``budget`` (the
    baseline an assignment is compared with). ``sensitivity`` of the result is NaN.
    Raises ValueError for an infeasible budget, as :func:`assign_bitwidths`."""
    choices = _check_choices(choices)
    costs = layer_costs(params, macs, choices, cost)
    fitting = [b for b in choices if sum(costs[layer][b] for layer in params) <= budget * (1 + 1e-12)]
    if not fitting:
        smallest = sum(costs[layer][choices[0]] for layer in params)
        raise ValueError(f"budget {budget:.6g} ({cost}) is infeasible: the smallest feasible budget with choices "
                         f"{list(choices)} is {smallest:.6g} (every layer at {choices[0]} bits)")
    bits = max(fitting)
    return Assignment({layer: bits for layer in params}, sum(costs[layer][bits] for layer in params), float(budget),
                      cost, float("nan"), {k: list(m) for k, m in (groups or {}).items() if len(m) > 1})


def pareto_front(layers: list[str], costs: Mapping[str, Mapping[Any, float]],
                 values: Mapping[str, Mapping[Any, float]], choices: tuple, budget: float
                 ) -> list[tuple[float, float, tuple]]:
    """Every assignment on the Pareto front of (summed cost <= budget, summed value), as
    ``(cost, value, choice per layer)``, by dynamic programming over the layers (the module
    docstring says why pruning dominated partial assignments loses nothing)."""
    limit = budget * (1 + 1e-12)  # float sums of exact budgets (3.0 bits) must not fail by an ulp
    # The front is sorted by cost with strictly decreasing value.
    front: list[tuple[float, float, tuple]] = [(0.0, 0.0, ())]
    for layer in layers:
        candidates = [(c + costs[layer][b], s + float(values[layer][b]), picked + (b,))
                      for c, s, picked in front for b in choices if c + costs[layer][b] <= limit]
        candidates.sort(key=lambda state: (state[0], state[1]))
        front = []
        for state in candidates:
            if not front or state[1] < front[-1][1]:
                front.append(state)
    return front


def solve(layers: list[str], costs: Mapping[str, Mapping[int, float]], values: Mapping[str, Mapping[int, float]],
          choices: tuple[int, ...], budget: float) -> tuple[list[int], float, float]:
    """The exact multiple-choice knapsack: ``(choice per layer, total cost, total value)``
    with the least total value within the budget."""
    best = min(pareto_front(layers, costs, values, choices, budget), key=lambda state: (state[1], state[0]))
    return list(best[2]), best[0], best[1]


__all__ = ["Assignment", "COSTS", "assign_bitwidths", "layer_costs", "pareto_front", "uniform_bitwidths"]
