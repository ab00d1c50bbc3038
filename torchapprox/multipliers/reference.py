"""Plain-torch table matmul and table gradients: the path of every device without the C++ kernels.

Everything is computed by explicit table lookups, tile by tile, so that no tile holds more than
``TILE_ELEMENTS`` lookups (no [M, N, K] tensor for large problems) and the values are the
same integers as the C++ kernels give. Shapes (``G`` groups, optional in ``approx_matmul``):

- ``x_idx``: uint8 [G, M, K] input indices (row of the table);
- ``w_idx``: uint8 [G, N, K] weight indices (column of the table);
- ``table``: int32 [256, 256] on the indices' device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

TILE_ELEMENTS = 1 << 20


def _tiles(G: int, M: int, N: int, K: int) -> Iterator[tuple[slice, slice, slice, slice]]:
    if min(G, M, N, K) == 0:
        return
    kc = min(K, TILE_ELEMENTS)
    nc = min(N, max(1, TILE_ELEMENTS // kc))
    mc = min(M, max(1, TILE_ELEMENTS // (kc * nc)))
    gc = min(G, max(1, TILE_ELEMENTS // (kc * nc * mc)))
    for g in range(0, G, gc):
        for m in range(0, M, mc):
            for n in range(0, N, nc):
                for k in range(0, K, kc):
                    yield slice(g, g + gc), slice(m, m + mc), slice(n, n + nc), slice(k, k + kc)


def _flat_indices(x_idx: Tensor, w_idx: Tensor, g: slice, m: slice, n: slice, k: slice) -> Tensor:
    """int64 [g, m, n, k]: the flat table index ``256 * x + w`` of every product in the tile."""
    rows = x_idx[g, m, k].to(torch.int64) * 256
    return rows[:, :, None, :] + w_idx[g, n, k].to(torch.int64)[:, None, :, :]


def approx_matmul(x_idx: Tensor, w_idx: Tensor, table: Tensor) -> Tensor:
    """int64 ``out[g, m, n] = sum_k table[x_idx[g, m, k], w_idx[g, n, k]]`` ([M, N] for 2-D inputs)."""
    batched = x_idx.dim() == 3
    x3, w3 = (x_idx, w_idx) if batched else (x_idx[None], w_idx[None])
    G, M, K = x3.shape
    N = w3.shape[1]
    out = torch.zeros(G, M, N, dtype=torch.int64, device=x_idx.device)
    if K > 0:
        flat = table.reshape(-1)
        for g, m, n, k in _tiles(G, M, N, K):
            out[g, m, n] += flat[_flat_indices(x3, w3, g, m, n, k)].sum(-1, dtype=torch.int64)
    return out if batched else out[0]


def level_indices(levels: Tensor, offset: int, low: int, high: int) -> tuple[Tensor, Tensor]:
    """(uint8 ``levels + offset``, int64 0-dim count of entries that are not integers in [low, high])."""
    wide = levels.to(torch.float64) if levels.is_floating_point() else levels.to(torch.int64)
    inside = (wide >= low) & (wide <= high)
    safe = torch.where(inside, wide, torch.zeros_like(wide))
    whole = safe.to(torch.int64)
    bad = ~inside | (whole.to(wide.dtype) != safe)
    return (whole + offset).to(torch.uint8).contiguous(), bad.sum()


def index_features(index: Tensor, factors: Tensor) -> Tensor:
    """[..., K] uint8 indices and [256, r] factors -> [..., K * r] (feature f of entry k at k * r + f)."""
    looked_up = F.embedding(index.long(), factors)  # [..., K, r]
    return looked_up.reshape(*index.shape[:-1], index.shape[-1] * factors.shape[1])


def table_slope_matmul(grad: Tensor, a_idx: Tensor, b_idx: Tensor, slopes: Tensor) -> Tensor:
    """``out[g, a, k] = sum_b grad[g, a, b] * slopes[a_idx[g, a, k], b_idx[g, b, k]]`` in grad's dtype.

    The "table" gradient (``gradients.py``): grad_x = (grad, x_idx, w_idx, dP/dx), grad_w =
    (grad^T, w_idx, x_idx, (dP/dw)^T). Shapes: grad [G, A, B], a_idx [G, A, K], b_idx
    [G, B, K] (uint8), slopes [256, 256].
    """
    G, A, K = a_idx.shape
    B = b_idx.shape[1]
    out = torch.zeros(G, A, K, dtype=grad.dtype, device=grad.device)
    flat = slopes.to(grad.dtype).reshape(-1)
    for g, a, b, k in _tiles(G, A, B, K):
        looked_up = flat[_flat_indices(a_idx, b_idx, g, a, b, k)]  # [g, a, b, k]
        out[g, a, k] += torch.einsum("gab,gabk->gak", grad[g, a, b], looked_up)
    return out
