"""Operand domains of an 8x8-bit multiplier table and the index convention of its rows and columns.

A table ``T`` of shape [256, 256] has ONE operand order: row = input (activation) operand,
column = weight operand, ``T[row, col] ~ input * weight``.

- weight (columns), always signed 8-bit: value ``w`` in [-128, 127], column ``w + 128``;
- input (rows), signed 8-bit: value ``x`` in [-128, 127], row ``x + 128``;
- input (rows), unsigned 8-bit: value ``x`` in [0, 255], row ``x``.

So row/column 128 is the value 0 for signed operands, and row 0 is the value 0 for an
unsigned input.
"""

from __future__ import annotations

import torch
from torch import Tensor

SIZE = 256
WEIGHT_OFFSET = 128
WEIGHT_RANGE = (-128, 127)


def input_offset(input_signed: bool) -> int:
    """Row index of the input value 0: 128 for a signed input, 0 for an unsigned one."""
    return 128 if input_signed else 0


def input_range(input_signed: bool) -> tuple[int, int]:
    """Smallest and largest input value: (-128, 127) signed, (0, 255) unsigned."""
    return (-128, 127) if input_signed else (0, 255)


def describe(input_signed: bool) -> str:
    return "signed x signed" if input_signed else "unsigned input x signed weight"


def input_values(input_signed: bool, device: torch.device | None = None) -> Tensor:
    """int64 [256]: the input value of each row."""
    return torch.arange(SIZE, dtype=torch.int64, device=device) - input_offset(input_signed)


def weight_values(device: torch.device | None = None) -> Tensor:
    """int64 [256]: the weight value of each column."""
    return torch.arange(SIZE, dtype=torch.int64, device=device) - WEIGHT_OFFSET


def operand_grid(input_signed: bool) -> tuple[Tensor, Tensor]:
    """int64 [256, 1] input values and [1, 256] weight values: the operands of every entry."""
    return input_values(input_signed)[:, None], weight_values()[None, :]


def exact_table(input_signed: bool) -> Tensor:
    """int32 [256, 256]: the exact product of every (input, weight) pair of the domain."""
    x, w = operand_grid(input_signed)
    return (x * w).to(torch.int32)
