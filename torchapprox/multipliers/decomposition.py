"""Exact low-rank integer factorisations of multiplier tables, and exact GEMMs on them.

Some approximate multipliers are a few ordinary products of transformed operands:

    T[i, j] = sum_f x_factors[f, i] * w_factors[f, j]          (exactly, as integers)

(``i``: input index, ``j``: weight index, see ``domain.py``). Then
``sum_k T[x_k, w_k] = sum_k sum_f X_f[x_k] W_f[w_k]``: one ordinary matrix product of
``[M, K*r]`` by ``[K*r, N]`` feature matrices, which the BLAS computes far faster than any
table lookup. The exact multiplier is rank 1 (the operands themselves), DRUM rank 1 (the
operands rounded to their leading bits), a truncated or broken-array multiplier one feature
per distinct input mask of its kept partial-product rows (``generators.py``).

Float32 holds every integer up to 2^24 exactly. Each feature product is bounded by
``term_bound`` (the largest |x_factor| times the largest |w_factor|), so a sum of at most
``2^24 // term_bound`` of them is exact in any summation order; longer reductions are split
into such chunks whose (exact) float32 results are added in float64 (exact up to 2^53).
A decomposition whose products can pass 2^24 computes in float64 (``gemm_dtype``). The
built-in decompositions have features of at most 8 significant bits, exact in bfloat16 and
TF32 as well: reduced-precision matmul settings do not change their results while the
accumulation stays in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import domain

FLOAT32_EXACT = 1 << 24
FLOAT64_EXACT = 1 << 53


class Decomposition:
    """``T = x_factors.T @ w_factors``: integer factors of a [256, 256] table.

    ``x_factors``: int64 [r, 256], one row per feature, indexed by input index;
    ``w_factors``: int64 [r, 256], indexed by weight index. ``rank`` = r.
    """

    def __init__(self, x_factors: Tensor, w_factors: Tensor) -> None:
        x_factors = torch.as_tensor(x_factors).to(torch.int64).cpu()
        w_factors = torch.as_tensor(w_factors).to(torch.int64).cpu()
        if x_factors.dim() != 2 or x_factors.shape[1] != domain.SIZE or x_factors.shape != w_factors.shape \
                or x_factors.shape[0] == 0:
            raise ValueError(f"Decomposition: x_factors and w_factors must both have shape [r, 256] with r >= 1, "
                             f"got {tuple(x_factors.shape)} and {tuple(w_factors.shape)}")
        self.x_factors, self.w_factors = x_factors.contiguous(), w_factors.contiguous()
        self.rank = x_factors.shape[0]
        # Python integers: no int64 wrap-around for large factors.
        self.term_bound = max(1, max(int(a) * int(b) for a, b in zip(x_factors.abs().amax(1).tolist(),
                                                                     w_factors.abs().amax(1).tolist())))
        if self.term_bound >= FLOAT64_EXACT:
            raise ValueError(f"Decomposition: a feature product can reach {self.term_bound}, beyond the 2^53 "
                             "that float64 GEMMs sum exactly")
        largest = max(int(x_factors.abs().max()), int(w_factors.abs().max()))
        # float32 when every factor and every product is an integer it holds exactly.
        self.gemm_dtype = torch.float32 if max(largest, self.term_bound) <= FLOAT32_EXACT else torch.float64
        self._features: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def table(self) -> Tensor:
        """int64 [256, 256]: the table these factors give."""
        return (self.x_factors[:, :, None] * self.w_factors[:, None, :]).sum(0)

    def is_identity(self, input_signed: bool) -> bool:
        """True when the only feature is the operand values themselves (the exact product)."""
        return self.rank == 1 and torch.equal(self.x_factors[0], domain.input_values(input_signed)) \
            and torch.equal(self.w_factors[0], domain.weight_values())

    def zero_input_is_zero(self, input_signed: bool) -> bool:
        """True when every input feature of the value 0 is 0 (zero padding stays zero)."""
        return bool((self.x_factors[:, domain.input_offset(input_signed)] == 0).all())

    def factor_tables(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """The factors as [256, r] lookup tables (float32 by default) on ``device``, cached."""
        key = (torch.device(device), dtype)
        if key not in self._features:
            self._features[key] = (self.x_factors.t().to(device=device, dtype=dtype).contiguous(),
                                   self.w_factors.t().to(device=device, dtype=dtype).contiguous())
        return self._features[key]

    def __repr__(self) -> str:
        return f"Decomposition(rank={self.rank}, term_bound={self.term_bound})"


def features(index: Tensor, factor_table: Tensor) -> Tensor:
    """[..., K] uint8 indices -> [..., K * r] float features (feature f of entry k at k*r + f),
    by the op ``torchapprox::index_features``."""
    return torch.ops.torchapprox.index_features(index, factor_table)


def exact_bmm(a: Tensor, b: Tensor, term_bound: int, out_dtype: torch.dtype) -> Tensor:
    """``a @ b.transpose(-1, -2)`` for float32 or float64 tensors of integers, exact, in ``out_dtype``.

    a: [G, M, K], b: [G, N, K] of one dtype, every |a[.., k] * b[.., k]| <= term_bound (which
    the dtype must hold exactly). Returns [G, M, N]: the exact integer sums rounded once to
    ``out_dtype``.
    """
    length = a.shape[-1]
    chunk = max(1, (FLOAT32_EXACT if a.dtype == torch.float32 else FLOAT64_EXACT) // term_bound)
    if length <= chunk:
        return torch.bmm(a, b.transpose(1, 2)).to(out_dtype)
    total = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, length, chunk):
        part = torch.bmm(a[..., start:start + chunk], b[..., start:start + chunk].transpose(1, 2))
        total += part
    return total.to(out_dtype)
