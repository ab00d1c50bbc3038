"""Bit-level behavioural models of the built-in approximate multipliers, on magnitudes.

Every function here takes int64 tensors of operand *magnitudes* (values in 0..255; an 8-bit
signed operand has magnitude up to 128) and returns the approximate magnitude of the product,
elementwise with broadcasting. Signs are applied outside (sign-magnitude arithmetic: the
product's sign is sign(x) * sign(w), see ``generators.py``).

Operand roles follow the array multiplier of the tables: ``a`` is the input (activation)
operand, ``b`` the weight operand. In the array models, row ``i`` of partial products holds
``b_i * a`` (weight bit ``i`` times the input), column ``i + j`` collects the bits
``a_j * b_i``.
"""

from __future__ import annotations

import torch
from torch import Tensor

OPERAND_BITS = 8  # magnitudes fit in 8 bits: 0..255 (an unsigned input) or 0..128 (a signed one)


def leading_one(a: Tensor) -> Tensor:
    """Position of the most significant set bit of each positive entry (0 for 1, 7 for 128..255).
    Entries equal to 0 give 0 (callers treat zero apart)."""
    position = torch.zeros_like(a)
    for bit in range(1, OPERAND_BITS + 1):
        position = torch.where(a >= (1 << bit), torch.full_like(a, bit), position)
    return position


def array_product(a: Tensor, b: Tensor, *, h: int = 0, v: int = 0) -> Tensor:
    """Sum of the partial-product bits an (8x8) array multiplier keeps after breaking.

    ``sum over i >= h, i + j >= v of a_j * b_i * 2^(i+j)`` (``a_j``, ``b_i``: bits of the
    input and weight magnitudes). ``h = v = 0`` is the exact product; ``h = 0, v = k`` the
    truncated multiplier that drops the partial-product columns below bit ``k``.
    """
    product = torch.zeros(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.int64, device=a.device)
    for i in range(h, OPERAND_BITS):
        shift = max(0, v - i)  # input bits below this one are dropped from row i
        if shift >= OPERAND_BITS:
            continue
        kept_input = (a >> shift) << shift
        product = product + (((b >> i) & 1) * kept_input << i)
    return product


def drum_round(a: Tensor, k: int) -> Tensor:
    """DRUM's operand approximation (Hashemi, Bahar, Reda, ICCAD 2015): a magnitude with more
    than ``k`` significant bits keeps its leading ``k`` bits, the lowest kept bit is set to 1
    (which centres the truncation error around zero) and the bits below are cleared; a
    magnitude with at most ``k`` significant bits is kept as it is."""
    t = leading_one(a)
    shift = (t - (k - 1)).clamp(min=0)  # number of dropped low bits
    rounded = ((a >> shift) | 1) << shift
    return torch.where(shift > 0, rounded, a)


def mitchell_product(a: Tensor, b: Tensor) -> Tensor:
    """Mitchell's logarithmic product (Mitchell, IRE Trans. Electronic Computers EC-11(4), 1962).

    With ``a = 2^ka (1 + fa)`` and ``b = 2^kb (1 + fb)`` (``ka``, ``kb`` the leading-one
    positions, ``0 <= fa, fb < 1``), ``log2`` is approximated by ``k + f``; the sum of the
    logarithms is taken back by the same piecewise-linear antilogarithm:
    ``2^(ka+kb) (1 + fa + fb)`` when ``fa + fb < 1``, else ``2^(ka+kb+1) (fa + fb)``.
    For 8-bit magnitudes both are integers (``2^ka fa = a - 2^ka``), so no rounding enters.
    The result never exceeds the exact product and is 0 when an operand is 0.
    """
    ka, kb = leading_one(a), leading_one(b)
    ra, rb = a - (1 << ka), b - (1 << kb)  # 2^ka * fa and 2^kb * fb
    cross = (ra << kb) + (rb << ka)  # 2^(ka+kb) * (fa + fb)
    base = 1 << (ka + kb)
    product = torch.where(cross < base, base + cross, 2 * cross)
    return torch.where((a == 0) | (b == 0), torch.zeros_like(product), product)
