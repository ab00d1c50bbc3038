"""``Multiplier``: an approximate 8x8-bit product held as a [256, 256] table."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import domain, gradients, metrics
from .decomposition import Decomposition
from .levels import check_levels

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


class Multiplier:
    """An approximate product of two 8-bit integers, as a lookup table.

    ``table``: int32 tensor [256, 256] on the CPU. Row = input (activation) operand, column =
    weight operand; ``table[row, col]`` is the approximate product of the input of that row
    and the weight of that column. The weight is signed 8-bit (column = value + 128); the
    input is signed 8-bit (``input_signed=True``, row = value + 128) or unsigned 8-bit
    (``input_signed=False``, row = value). See ``torchapprox.multipliers.domain``.

    Attributes: ``table``, ``input_signed``, ``name``, ``cost`` (relative cost, 1.0 = an
    exact 8x8 array multiplier, None when unknown) and ``decomposition`` (an exact integer
    factorisation of the table used by the fast GEMM path, or None). Treat the table as
    read-only: derived values (metrics, device copies) are cached.

    Build one with the generators (``exact()``, ``truncated(k)``, ``broken_array(h, v)``,
    ``drum(k)``, ``mitchell()``) or with :meth:`from_table`. The constructor checks the table
    like :meth:`from_table` does (shape, integer values within int32) but not its layout.
    A ``decomposition`` given is checked against the table (ValueError if it differs); an
    exact table gets the rank-1 decomposition of the exact product on its own.
    """

    def __init__(self, table: Any, *, input_signed: bool = True, name: str | None = None,
                 cost: float | None = None, decomposition: Decomposition | None = None,
                 builder: Callable[..., Multiplier] | None = None) -> None:
        self.table = _checked_table(table, "Multiplier")
        if not isinstance(input_signed, bool):
            raise TypeError(f"Multiplier: `input_signed` must be True or False, got {input_signed!r}")
        # builder(input_signed=...) makes this design for either input domain (the generators
        # pass themselves); a table from elsewhere has only the domain it was given for.
        self._builder = builder
        self.input_signed = bool(input_signed)
        self.name = name if name is not None else "custom"
        self.cost = None if cost is None else float(cost)
        self._cache: dict[Any, Any] = {}
        if decomposition is not None and not torch.equal(decomposition.table(), self.table.to(torch.int64)):
            wrong = (decomposition.table() != self.table.to(torch.int64)).nonzero()[0].tolist()
            raise ValueError(f"Multiplier {self.name!r}: the decomposition does not reproduce the table "
                             f"(first difference at row {wrong[0]}, column {wrong[1]})")
        if decomposition is None and self.is_exact:
            decomposition = Decomposition(domain.input_values(self.input_signed)[None], domain.weight_values()[None])
        self.decomposition = decomposition
        # The decomposition is the operands themselves: the GEMM may take the levels as they are.
        self.decomposition_is_identity = decomposition is not None and decomposition.is_identity(self.input_signed)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_table(cls, table: Any, *, input_signed: bool = True, name: str | None = None,
                   transpose: bool = False, cost: float | None = None, check_layout: bool = True) -> Multiplier:
        """A multiplier from a table: a tensor, a NumPy array, nested lists or a ``.npy`` path.

        The table must be [256, 256], of integer values (an integer dtype, or floats that all
        hold integers) that fit in int32. Its layout is this package's (class docstring):
        row = input, column = weight, index = value + 128 for a signed operand and = value
        for an unsigned input. A table stored weight-major (row = weight) is accepted with
        ``transpose=True``. A table cannot always be checked for its layout; with
        ``check_layout`` (default) the table is compared with the exact product in the
        stated layout and in the likely mistaken ones (transposed, the other input domain,
        two's-complement byte order ``value & 0xFF``): if one of those fits clearly better
        (mean error distance under a quarter of the stated layout's, which itself is over
        half the mean exact product), ValueError names it and says what to pass.

        Raises ValueError (shape, non-integer values, int32 overflow, layout) or TypeError
        (bool, complex or non-numeric data), naming what was wrong.
        """
        if isinstance(table, (str, os.PathLike)):
            table = _load_npy(table)
        checked = _checked_table(table, "Multiplier.from_table")
        if transpose:
            checked = checked.t().contiguous()
        if check_layout:
            _check_layout(checked, bool(input_signed))
        return cls(checked, input_signed=input_signed, name=name, cost=cost)

    # ------------------------------------------------------------------ domain
    @property
    def input_offset(self) -> int:
        """Row of the input value 0: 128 (signed input) or 0 (unsigned)."""
        return domain.input_offset(self.input_signed)

    @property
    def input_range(self) -> tuple[int, int]:
        return domain.input_range(self.input_signed)

    @property
    def weight_range(self) -> tuple[int, int]:
        return domain.WEIGHT_RANGE

    @property
    def domain(self) -> str:
        return domain.describe(self.input_signed)

    def for_input(self, input_signed: bool, *, where: str = "Multiplier.for_input") -> Multiplier:
        """This design for a signed (True) or unsigned (False) 8-bit input: ``self`` when
        that is its domain, else the same generator's table for the other domain (cached).

        Raises ValueError for a table built for one domain only (:meth:`from_table`, the
        constructor), naming the domain needed: build it for that domain, or quantize the
        input on the grid it was made for (``grid="signed"`` or ``"unsigned"``).
        """
        input_signed = bool(input_signed)
        if input_signed == self.input_signed:
            return self
        if self._builder is None:
            raise ValueError(
                f"{where}: multiplier {self.name!r} is a table for the {self.domain} domain, but the input is on "
                f"the {'signed' if input_signed else 'unsigned'} grid; give a table made for "
                f"input_signed={input_signed}, or quantize the input on the grid the table was made for "
                f"(grid={'signed' if self.input_signed else 'unsigned'!r})")
        key = ("domain", input_signed)
        if key not in self._cache:
            self._cache[key] = self._builder(input_signed=input_signed)
        return self._cache[key]

    # ------------------------------------------------------------------ values
    def product(self, x: Any, w: Any) -> Tensor:
        """Elementwise approximate products ``x * w`` of integer-valued tensors, broadcasting.

        ``x``: inputs in ``input_range``; ``w``: weights in [-128, 127]; any integer or float
        dtype holding integers (or Python numbers/lists). Returns the table's values: int32
        for integer operands, ``torch.result_type(x, w)`` when either is floating. ValueError
        names the argument, the offending value and the allowed range.
        """
        x, w = torch.as_tensor(x), torch.as_tensor(w)
        if x.device != w.device:
            raise ValueError(f"Multiplier.product: x and w must be on one device, got {x.device} and {w.device}")
        check_levels(x, *self.input_range, name="x", where="Multiplier.product", domain=f"{self.domain} input")
        check_levels(w, *self.weight_range, name="w", where="Multiplier.product", domain="signed weight")
        rows = x.to(torch.int64) + self.input_offset
        cols = w.to(torch.int64) + domain.WEIGHT_OFFSET
        values = self.table_on(x.device)[rows, cols]
        if x.is_floating_point() or w.is_floating_point():
            return values.to(torch.result_type(x, w))
        return values

    def table_on(self, device: torch.device | str) -> Tensor:
        """The int32 table on ``device`` (cached)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.table
        key = ("table", device)
        if key not in self._cache:
            self._cache[key] = self.table.to(device)
        return self._cache[key]

    def slope_tables(self, device: torch.device | str, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """[256, 256] local slopes ``(dP/dx, dP/dw)`` of the table on ``device`` in ``dtype``
        (cached), for the "table" gradient (``torchapprox.multipliers.gradients``)."""
        key = ("slopes", torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device=device, dtype=dtype) for t in gradients.slope_tables(self.table))
        return self._cache[key]

    @property
    def is_exact(self) -> bool:
        """True when the table is the exact product of its domain."""
        return torch.equal(self.table, domain.exact_table(self.input_signed))

    @property
    def is_symmetric(self) -> bool:
        """True when swapping the operands never changes the product, over the pairs both
        operands can take (all pairs for a signed input; inputs and weights in 0..127 for an
        unsigned input)."""
        if self.input_signed:
            return torch.equal(self.table, self.table.t())
        shared = self.table[:128, 128:]  # rows: inputs 0..127; columns: weights 0..127
        return torch.equal(shared, shared.t())

    # ------------------------------------------------------------------ error metrics
    def metrics(self) -> dict[str, float]:
        """The error metrics of ``torchapprox.multipliers.metrics`` (uniform over all pairs)."""
        if "metrics" not in self._cache:
            self._cache["metrics"] = metrics.metrics(self.table, self.input_signed)
        return dict(self._cache["metrics"])

    @property
    def mae(self) -> float:
        """Mean absolute error (mean error distance) over all operand pairs."""
        return self.metrics()["mae"]

    @property
    def nmed(self) -> float:
        """Mean error distance over the largest exact product magnitude."""
        return self.metrics()["nmed"]

    @property
    def mred(self) -> float:
        """Mean relative error distance over the pairs with a nonzero exact product."""
        return self.metrics()["mred"]

    @property
    def error_probability(self) -> float:
        """Fraction of operand pairs whose product is not exact."""
        return self.metrics()["error_probability"]

    @property
    def worst_case_error(self) -> int:
        """Largest |approximate - exact| over all operand pairs."""
        return self.metrics()["worst_case_error"]

    @property
    def mean_error(self) -> float:
        """Mean of approximate - exact (the bias) over all operand pairs."""
        return self.metrics()["mean_error"]

    def __repr__(self) -> str:
        cost = "unknown" if self.cost is None else f"{self.cost:.3f}"
        return f"Multiplier({self.name!r}, {self.domain}, cost={cost}, mae={self.mae:.4g})"


# --------------------------------------------------------------------------- checks
def _load_npy(path: str | os.PathLike) -> Any:
    try:
        import numpy
    except ImportError as error:  # pragma: no cover - numpy comes with most torch installs
        raise ImportError(f"Multiplier.from_table: reading {os.fspath(path)!r} needs NumPy") from error
    try:
        return numpy.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"Multiplier.from_table: cannot read a .npy array from {os.fspath(path)!r}: {error}") from None


def _checked_table(table: Any, where: str) -> Tensor:
    """The table as a contiguous int32 CPU tensor [256, 256], or a clear error."""
    try:
        tensor = torch.as_tensor(table)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{where}: the table must be a tensor, an array or nested lists of integers, "
                        f"got {type(table).__name__} ({error})") from None
    tensor = tensor.detach().cpu()
    if tensor.shape != (domain.SIZE, domain.SIZE):
        raise ValueError(f"{where}: the table must have shape [256, 256] (row = input, column = weight), "
                         f"got {list(tensor.shape)}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{where}: the table must hold integers, got dtype {tensor.dtype}")
    if tensor.is_floating_point():
        wide = tensor.to(torch.float64)
        bad = ~torch.isfinite(wide) | (wide != wide.round())
        if bad.any():
            row, col = bad.nonzero()[0].tolist()
            raise ValueError(f"{where}: the table must hold integers; entry [{row}, {col}] is "
                             f"{tensor[row, col].item()!r} (dtype {tensor.dtype})")
    elif tensor.dtype == torch.uint64:  # to int64 would wrap values >= 2^63 to small ones
        wide = tensor.to(torch.float64)
    else:
        wide = tensor.to(torch.int64)
    out_of_range = (wide < INT32_MIN) | (wide > INT32_MAX)
    if out_of_range.any():
        row, col = out_of_range.nonzero()[0].tolist()
        raise ValueError(f"{where}: table values must fit in int32 [{INT32_MIN}, {INT32_MAX}]; "
                         f"entry [{row}, {col}] is {tensor[row, col].item()!r}")
    return wide.to(torch.int32).contiguous()


def _layout_candidates(input_signed: bool) -> list[tuple[str, Tensor]]:
    """Exact tables of the stated layout (first) and of the layouts a table is often mistaken in."""
    stated = domain.exact_table(input_signed)
    other = domain.exact_table(not input_signed)
    signed_dims = (0, 1) if input_signed else (1,)
    candidates = [
        ("stated", stated),
        ("stored weight-major (row = weight, column = input); pass transpose=True", stated.t()),
        (f"made for the {domain.describe(not input_signed)} domain; pass input_signed={not input_signed}", other),
        (f"made for the {domain.describe(not input_signed)} domain and stored weight-major; "
         f"pass input_signed={not input_signed}, transpose=True", other.t()),
        ("indexed by two's-complement bytes (value & 0xFF) rather than value + 128; reorder it with "
         f"torch.roll(table, shifts={[128] * len(signed_dims)}, dims={list(signed_dims)})",
         torch.roll(stated, shifts=[128] * len(signed_dims), dims=list(signed_dims))),
    ]
    return [(label, exact) for i, (label, exact) in enumerate(candidates)
            if i == 0 or not torch.equal(exact, stated)]


def _check_layout(table: Tensor, input_signed: bool) -> None:
    wide = table.to(torch.float64)

    def relative_error(exact: Tensor) -> float:
        exact = exact.to(torch.float64)
        return float((wide - exact).abs().mean() / exact.abs().mean())

    (_, stated), *others = _layout_candidates(input_signed)
    stated_error = relative_error(stated)
    if stated_error <= 0.5:
        return
    label, error = min(((label, relative_error(exact)) for label, exact in others), key=lambda item: item[1])
    if error < stated_error / 4:
        raise ValueError(
            f"Multiplier.from_table: the table does not look like row = input, column = weight for the "
            f"{domain.describe(input_signed)} domain (mean error distance {stated_error:.3g} of the mean exact "
            f"product), but it fits a table {label} (relative error {error:.3g}). "
            "Pass check_layout=False to keep it as given.")
