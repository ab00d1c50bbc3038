"""Error metrics of an approximate multiplier table against the exact product.

All metrics are taken over every operand pair of the table's domain, each pair equally
likely (the uniform input distribution used by the references below). With ``P`` the exact
product, ``P'`` the approximate one and ``ED = |P' - P|`` the error distance:

- ``mae``: mean error distance, MED = E[ED] (called MAE in much of the multiplier literature);
- ``nmed``: MED normalised by the largest exact product magnitude of the domain;
- ``mred``: mean relative error distance, E[ED / |P|] over the pairs with ``P != 0``;
- ``error_probability``: ER, the fraction of pairs with ``P' != P``;
- ``worst_case_error``: max ED;
- ``mean_error``: E[P' - P], the bias (positive: the multiplier overestimates on average).

Definitions: J. Liang, J. Han, F. Lombardi, "New Metrics for the Reliability of Approximate and
Probabilistic Adders", IEEE Trans. Computers 62(9), 2013 (ER, MED, NMED, MRED), applied to
multipliers as in H. Jiang, C. Liu, F. Lombardi, J. Han, "A Comparative Evaluation of
Approximate Multipliers", IEEE/ACM NANOARCH 2016.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import domain

METRIC_NAMES = ("mae", "nmed", "mred", "error_probability", "worst_case_error", "mean_error")


def error_table(table: Tensor, input_signed: bool) -> Tensor:
    """int64 [256, 256]: approximate minus exact product of every pair."""
    return table.to(torch.int64) - domain.exact_table(input_signed).to(torch.int64)


def metrics(table: Tensor, input_signed: bool) -> dict[str, float]:
    """All the metrics above as Python numbers (floats; ``worst_case_error`` an int)."""
    exact = domain.exact_table(input_signed).to(torch.float64)
    error = error_table(table, input_signed).to(torch.float64)
    distance = error.abs()
    nonzero = exact != 0
    return {
        "mae": distance.mean().item(),
        "nmed": (distance.mean() / exact.abs().max()).item(),
        "mred": (distance[nonzero] / exact[nonzero].abs()).mean().item(),
        "error_probability": (error != 0).to(torch.float64).mean().item(),
        "worst_case_error": int(distance.max().item()),
        "mean_error": error.mean().item(),
    }
