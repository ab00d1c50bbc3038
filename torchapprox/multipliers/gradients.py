"""Local slopes of a multiplier table, for the optional "table" gradient.

An approximate product ``P(x, w) = T[x, w]`` is a function on the integer grid; its partial
derivatives are approximated by finite differences of the table (step: one integer level):

    dP/dx (x, w) ~ (T[x + 1, w] - T[x - 1, w]) / 2          (central difference along a row)
    dP/dw (x, w) ~ (T[x, w + 1] - T[x, w - 1]) / 2          (central difference along a column)

and one-sided differences at the edges of the domain (``T[1, w] - T[0, w]`` at the first row,
``T[255, w] - T[254, w]`` at the last; the same for columns). For the exact table these are
``w`` and ``x``: the "table" gradient then equals the straight-through one. A layer output
``out[m, n] = sum_k P(x[m, k], w[n, k])`` gets, by the chain rule,

    grad_x[m, k] = sum_n grad_out[m, n] * dP/dx (x[m, k], w[n, k])
    grad_w[n, k] = sum_m grad_out[m, n] * dP/dw (x[m, k], w[n, k])

(the op ``torchapprox::table_slope_matmul``: C++ on the CPU, ``reference.table_slope_matmul``
elsewhere). Indices are rows/columns of the table (``domain.py``);
adjacent rows and columns differ by one level in both domains, so the differences are per level.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _differences(table: Tensor, dim: int) -> Tensor:
    t = table.to(torch.float64).movedim(dim, 0)
    slope = torch.empty_like(t)
    slope[1:-1] = (t[2:] - t[:-2]) / 2
    slope[0] = t[1] - t[0]
    slope[-1] = t[-1] - t[-2]
    return slope.movedim(0, dim).contiguous()


def slope_tables(table: Tensor) -> tuple[Tensor, Tensor]:
    """float64 [256, 256] ``(dP/dx, dP/dw)`` of an int [256, 256] table, as defined above."""
    return _differences(table, 0), _differences(table, 1)
