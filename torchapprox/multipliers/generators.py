"""The built-in multipliers: exact, truncated, broken-array, DRUM and Mitchell.

Every generator builds the table for either operand domain: ``input_signed=True`` (signed
8-bit input and weight) or ``input_signed=False`` (unsigned 8-bit input, signed weight).
The approximate designs are unsigned circuits; signed operands go through them in
sign-magnitude form: ``approx(x, w) = sign(x) * sign(w) * M(|x|, |w|)``, with ``M`` the
design's product of the magnitudes (``models.py``; |x| <= 255 for an unsigned input, <= 128
for a signed one; 8-bit magnitudes throughout). So every table is odd in each signed operand
and a zero operand gives a zero product.

``cost`` is the fraction of the 64 partial-product cells (AND gate and its adder cell) of an
8x8 unsigned array multiplier that a design keeps; the sign-magnitude conversion around the
array is not counted. Designs not built from a broken array (DRUM, Mitchell) have no figure
in this model and get ``cost=None``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch
from torch import Tensor

from . import domain, models
from .decomposition import Decomposition
from .multiplier import Multiplier


def _signs_and_magnitudes(values: Tensor) -> tuple[Tensor, Tensor]:
    return torch.sign(values), values.abs()


def _sign_magnitude_table(magnitude_product: Callable[[Tensor, Tensor], Tensor], input_signed: bool) -> Tensor:
    x, w = domain.operand_grid(input_signed)
    (sx, ax), (sw, aw) = _signs_and_magnitudes(x), _signs_and_magnitudes(w)
    return (sx * sw * magnitude_product(ax, aw)).to(torch.int32)


def _check_int(value: int, name: str, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{where}: {name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _array_cost(h: int, v: int) -> float:
    kept = sum(1 for i in range(models.OPERAND_BITS) for j in range(models.OPERAND_BITS) if i >= h and i + j >= v)
    return kept / models.OPERAND_BITS ** 2


def _array_decomposition(h: int, v: int, input_signed: bool) -> Decomposition:
    """Factors of the broken array: row i of partial products is ``b_i 2^i`` times the input
    magnitude with its bits below ``v - i`` cleared; rows sharing that mask share a feature."""
    (sx, ax), (sw, aw) = _signs_and_magnitudes(domain.input_values(input_signed)), \
        _signs_and_magnitudes(domain.weight_values())
    weight_sums: dict[int, Tensor] = {}
    for i in range(h, models.OPERAND_BITS):
        shift = max(0, v - i)
        if shift < models.OPERAND_BITS:
            weight_sums[shift] = weight_sums.get(shift, 0) + sw * (((aw >> i) & 1) << i)
    x_factors = [sx * ((ax >> shift) << shift) for shift in weight_sums]
    w_factors = list(weight_sums.values())
    if not x_factors:  # every cell broken away: the zero multiplier
        x_factors, w_factors = [torch.zeros_like(ax)], [torch.zeros_like(aw)]
    return Decomposition(torch.stack(x_factors), torch.stack(w_factors))


def exact(*, input_signed: bool = True) -> Multiplier:
    """The exact product (cost 1.0)."""
    return Multiplier(domain.exact_table(input_signed), input_signed=input_signed, name="exact", cost=1.0,
                      builder=exact)


def truncated(k: int, *, input_signed: bool = True) -> Multiplier:
    """The truncated array multiplier: partial-product bits of weight below ``2^k`` are not
    generated, ``M(a, b) = sum over i + j >= k of a_j b_i 2^(i+j)`` (no correction constant,
    i.e. direct truncation; the constant-corrected variant is Schulte & Swartzlander,
    "Truncated multiplication with correction constant", VLSI Signal Processing VI, 1993).
    ``k`` in [0, 15]; ``k = 0`` is exact. Always underestimates magnitudes. Same as
    ``broken_array(0, k)``.
    """
    k = _check_int(k, "k", 0, 15, "truncated")
    table = _sign_magnitude_table(lambda a, b: models.array_product(a, b, h=0, v=k), input_signed)
    return Multiplier(table, input_signed=input_signed, name=f"truncated({k})", cost=_array_cost(0, k),
                      decomposition=_array_decomposition(0, k, input_signed), builder=functools.partial(truncated, k))


def broken_array(h: int, v: int, *, input_signed: bool = True) -> Multiplier:
    """The Broken-Array Multiplier (BAM) of Mahdiani, Ahmadi, Fakhraie, Lucas, "Bio-Inspired
    Imprecise Computational Blocks for Efficient VLSI Implementation of Soft-Computing
    Applications", IEEE TCAS-I 57(4):850-862, 2010.

    The carry-save cells of an 8x8 array multiplier are omitted above the horizontal break
    level ``h`` (the partial-product rows of weight bits ``i < h``) and to the right of the
    vertical break level ``v`` (the columns of weight below ``2^v``, ``i + j < v``). What is
    implemented is the functional model: the product is the sum of the partial-product bits
    ``a_j b_i 2^(i+j)`` that remain, ``i >= h`` and ``i + j >= v`` (``a``: input magnitude,
    ``b``: weight magnitude, so rows are weight bits: for ``h > 0`` the table is not
    symmetric). ``h`` in [0, 7], ``v`` in [0, 15]; ``broken_array(0, 0)`` is exact,
    ``broken_array(0, k)`` is ``truncated(k)``. Always underestimates magnitudes.
    """
    h = _check_int(h, "h", 0, 7, "broken_array")
    v = _check_int(v, "v", 0, 15, "broken_array")
    table = _sign_magnitude_table(lambda a, b: models.array_product(a, b, h=h, v=v), input_signed)
    return Multiplier(table, input_signed=input_signed, name=f"broken_array({h}, {v})", cost=_array_cost(h, v),
                      decomposition=_array_decomposition(h, v, input_signed),
                      builder=functools.partial(broken_array, h, v))


def drum(k: int, *, input_signed: bool = True) -> Multiplier:
    """DRUM, the Dynamic Range Unbiased Multiplier of Hashemi, Bahar, Reda, "DRUM: A Dynamic
    Range Unbiased Multiplier for Approximate Applications", ICCAD 2015.

    Each operand magnitude with more than ``k`` significant bits is cut to its leading ``k``
    bits, the lowest kept bit is set to 1 (the unbiasing step) and the dropped bits read as
    zero, i.e. the k-bit product is shifted back; magnitudes of at most ``k`` bits are exact.
    Signs apply afterwards. ``k`` in [1, 8]; ``k = 8`` is exact on 8-bit magnitudes.
    The product is exactly that of the rounded operands, so DRUM is one GEMM on
    transformed operands (rank-1 decomposition). No cost figure (``cost=None``): its area is
    a k x k multiplier plus leading-one detectors and shifters, outside the array model.
    """
    k = _check_int(k, "k", 1, 8, "drum")
    table = _sign_magnitude_table(lambda a, b: models.drum_round(a, k) * models.drum_round(b, k), input_signed)
    (sx, ax), (sw, aw) = _signs_and_magnitudes(domain.input_values(input_signed)), \
        _signs_and_magnitudes(domain.weight_values())
    decomposition = Decomposition((sx * models.drum_round(ax, k))[None], (sw * models.drum_round(aw, k))[None])
    return Multiplier(table, input_signed=input_signed, name=f"drum({k})", cost=None, decomposition=decomposition,
                      builder=functools.partial(drum, k))


def mitchell(*, input_signed: bool = True) -> Multiplier:
    """Mitchell's logarithmic multiplier (J. N. Mitchell, "Computer Multiplication and Division
    Using Binary Logarithms", IRE Trans. Electronic Computers EC-11(4):512-517, 1962), on the
    magnitudes, sign apart: ``log2`` of each operand approximated by its leading-one position
    plus the remaining bits as a linear fraction, the two added, and the sum taken back by the
    same piecewise-linear antilogarithm (``models.mitchell_product``). Never overestimates;
    the relative error is at most about 11.1 %. No cost figure in the array model
    (``cost=None``); no exact low-rank decomposition (table path only).
    """
    table = _sign_magnitude_table(models.mitchell_product, input_signed)
    return Multiplier(table, input_signed=input_signed, name="mitchell", cost=None, builder=mitchell)


_GENERATORS: dict[str, Callable[..., Multiplier]] = {
    "exact": exact, "truncated": truncated, "broken_array": broken_array, "drum": drum, "mitchell": mitchell}
_NAME = re.compile(r"^(\w+)(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?$")


def by_name(name: str, *, input_signed: bool = True) -> Multiplier:
    """The built-in multiplier a generator names itself: ``"exact"``, ``"mitchell"``,
    ``"drum(4)"``, ``"truncated(4)"``, ``"broken_array(2, 6)"`` (what ``Multiplier.name``
    holds for a generator's table). Raises ValueError for any other name."""
    match = _NAME.match(name.strip()) if isinstance(name, str) else None
    generator = _GENERATORS.get(match.group(1)) if match else None
    if generator is None:
        raise ValueError(f"no built-in multiplier is named {name!r}; the built-in ones are exact, mitchell, drum(k), "
                         "truncated(k) and broken_array(h, v)")
    arguments = [int(group) for group in match.groups()[1:] if group is not None]
    try:
        return generator(*arguments, input_signed=input_signed)
    except TypeError:
        raise ValueError(f"multiplier name {name!r}: {match.group(1)} takes "
                         f"{ {'exact': 'no', 'mitchell': 'no', 'drum': 'one', 'truncated': 'one'}.get(match.group(1), 'two')}"
                         " integer argument(s)") from None
