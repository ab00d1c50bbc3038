"""A multiplier per layer under a cost budget: ``ta.multiplier_sensitivity`` and
``ta.assign_multipliers``.

The sensitivity of a layer to a multiplier is measured directly: the loss increase when only
that layer's products go through it (on a copy of the model in eval mode, the others as they
are). Its cost is the multiplier's relative cost (``Multiplier.cost``: 1.0 for an exact array
multiplier) times the layer's multiply-accumulates per sample, so the summed cost of an
assignment, over that of exact products everywhere, is the fraction of multiplier energy
(in that cost model) the network spends. The assignment is the same exact knapsack as for
bitwidths (``torchapprox.assignment.solve``): within a cost budget the least summed loss
increase, or (``max_loss_increase``) the cheapest assignment whose predicted increase stays
within a limit.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .approximation import set_multiplier
from .layers import find_layer_type
from .layers.approximate import multiplier_of
from .multipliers import Multiplier
from .precision import count_macs


@dataclasses.dataclass
class MultiplierSensitivity:
    """``values``: ``{layer: {multiplier name: measured loss increase}}``; ``macs``: per
    sample; ``multipliers``: ``{name: Multiplier}``; ``passes``: forward passes."""

    values: dict[str, dict[str, float]]
    macs: dict[str, int]
    multipliers: dict[str, Multiplier]
    passes: int


@dataclasses.dataclass(frozen=True)
class MultiplierAssignment:
    """``multipliers``: ``{layer: Multiplier}``; ``cost``: the summed cost over that of exact
    products everywhere (a fraction); ``loss_increase``: the summed predicted increase."""

    multipliers: dict[str, Multiplier]
    cost: float
    loss_increase: float

    def apply(self, model: nn.Module, gradient: str = "ste") -> None:
        """Set each layer's multiplier on ``model`` (``ta.set_multiplier`` per layer)."""
        for layer, multiplier in self.multipliers.items():
            set_multiplier(model, multiplier, _exact_pattern(layer), gradient=gradient)

    def table(self) -> str:
        width = max(len(layer) for layer in self.multipliers) if self.multipliers else 5
        lines = [f"{'layer':{width}s}  multiplier"] + [f"{layer:{width}s}  {m.name}" for layer, m in
                                                        self.multipliers.items()]
        lines.append(f"cost: {self.cost:.4f} of exact products; predicted loss increase {self.loss_increase:.6g}")
        return "\n".join(lines)


def _exact_pattern(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` (brackets escape the wildcards)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def multiplier_sensitivity(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor],
                           candidates: Sequence[Multiplier]) -> MultiplierSensitivity:
    """The measured loss increase of each layer that can take a multiplier, with each
    candidate alone in that layer (module docstring). The model is left as it was.

    Args:
        model: a model with quantizers at <= 8 bits (``ta.attach``).
        batches: batches for ``loss_fn(model, batch) -> scalar``, the batch dimension first.
        candidates: multipliers with a ``cost`` figure (exact, truncated, broken-array, or
            a table given a cost), distinct names.

    Raises:
        ValueError: no candidates, a candidate without a cost or a repeated name, no batch,
            no layer that can take a multiplier.
    """
    from .qat import quantized_layers
    from .sensitivity import _loss, batch_size, preserved_random_state, working_copy

    candidates = list(candidates)
    if not candidates or not all(isinstance(m, Multiplier) for m in candidates):
        raise ValueError("`candidates` must be a non-empty list of torchapprox.multipliers.Multiplier")
    names = [m.name for m in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"`candidates` must have distinct names, got {names}")
    without_cost = [m.name for m in candidates if m.cost is None]
    if without_cost:
        raise ValueError(f"multipliers {without_cost} have no cost figure (Multiplier.cost): give them one, or "
                         "choose among exact, truncated(k) and broken_array(h, v)")
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty")
    with preserved_random_state(model):
        work = working_copy(model)
        layers = {name: layer for name, layer in quantized_layers(work).items()
                  if (t := find_layer_type(layer)) is not None and t.multiplier}
        if not layers:
            raise ValueError("`model` has no quantized layer that can take a multiplier (Linear, Conv1d/2d/3d)")
        macs = count_macs(work, layers, lambda: _loss(work, batches[0], loss_fn), batch_size(batches[0]))

        def mean_loss() -> float:
            with torch.no_grad():
                return sum(float(_loss(work, batch, loss_fn)) for batch in batches) / len(batches)

        reference = mean_loss()
        values: dict[str, dict[str, float]] = {}
        for name, layer in layers.items():
            before = multiplier_of(layer)
            values[name] = {}
            try:
                for multiplier in candidates:
                    set_multiplier(work, multiplier, _exact_pattern(name))
                    values[name][multiplier.name] = mean_loss() - reference
            finally:
                set_multiplier(work, None if before is None else before.multiplier, _exact_pattern(name),
                               gradient="ste" if before is None else before.gradient)
    return MultiplierSensitivity(values, {k: int(v or 0) for k, v in macs.items()},
                                 {m.name: m for m in candidates}, len(batches) * (1 + len(layers) * len(candidates)))


def assign_multipliers(sensitivity: MultiplierSensitivity, budget: float | None = None, *,
                       max_loss_increase: float | None = None) -> MultiplierAssignment:
    """A multiplier per layer: the least summed loss increase within ``budget`` (a fraction
    of the cost of exact products everywhere, e.g. 0.5), or, with ``max_loss_increase``, the
    cheapest assignment whose summed increase is at most that. Exactly one of the two.

    Raises:
        ValueError: neither or both given, a non-positive value, or an infeasible request
            (the message gives the cheapest feasible cost, or the smallest reachable loss).
    """
    from .assignment import pareto_front

    if (budget is None) == (max_loss_increase is None):
        raise ValueError("give exactly one of `budget` (a fraction of the exact products' cost) and "
                         "`max_loss_increase`")
    for name, value in (("budget", budget), ("max_loss_increase", max_loss_increase)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value
                                  or (name == "budget" and not value > 0)):
            raise ValueError(f"`{name}` must be a {'positive ' if name == 'budget' else ''}number, got {value!r}")
    layers = list(sensitivity.values)
    total = sum(sensitivity.macs[layer] for layer in layers) or 1
    choices = tuple(sensitivity.multipliers)
    costs = {layer: {c: sensitivity.macs[layer] * sensitivity.multipliers[c].cost / total for c in choices}
             for layer in layers}
    cheapest = sum(min(costs[layer].values()) for layer in layers)
    limit = float("inf") if budget is None else float(budget)
    if cheapest > limit * (1 + 1e-12):
        raise ValueError(f"budget {budget:.6g} is infeasible: the cheapest assignment costs {cheapest:.6g} of the "
                         "exact products")
    front = pareto_front(layers, costs, sensitivity.values, choices, limit)
    if budget is not None:
        cost, loss, picked = min(front, key=lambda state: (state[1], state[0]))
    else:
        within = [state for state in front if state[1] <= max_loss_increase]
        if not within:
            best = min(state[1] for state in front)
            raise ValueError(f"no assignment predicts a loss increase of at most {max_loss_increase:.6g}; the "
                             f"smallest is {best:.6g}")
        cost, loss, picked = min(within, key=lambda state: (state[0], state[1]))
    return MultiplierAssignment({layer: sensitivity.multipliers[c] for layer, c in zip(layers, picked)}, cost, loss)


__all__ = ["MultiplierAssignment", "MultiplierSensitivity", "assign_multipliers", "multiplier_sensitivity"]
