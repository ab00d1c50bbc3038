"""The approximate-multiplier custom ops (``torch.library``), in the ``torchapprox`` namespace.

- ``torchapprox::approx_matmul(Tensor x_idx, Tensor w_idx, Tensor table) -> Tensor``
- ``torchapprox::approx_matmul_naive(Tensor x_idx, Tensor w_idx, Tensor table) -> Tensor``
- ``torchapprox::level_indices(Tensor levels, int offset, int low, int high) -> (Tensor, Tensor)``
- ``torchapprox::index_features(Tensor index, Tensor factors) -> Tensor``
- ``torchapprox::table_slope_matmul(Tensor grad, Tensor a_idx, Tensor b_idx, Tensor slopes) -> Tensor``

``out[g, m, n] = sum_k table[x_idx[g, m, k], w_idx[g, n, k]]``, exactly, as int64:
``x_idx`` uint8 [G, M, K] (or [M, K]) row indices (input operand), ``w_idx`` uint8 [G, N, K]
(or [N, K], the ``F.linear`` layout) column indices (weight operand), ``table`` int32
[256, 256] on the same device; the result is int64 [G, M, N] (or [M, N]).

On the CPU, once built (``cpu_extension.py``), C++ kernels serve every op:
``approx_matmul`` a vectorised, threaded kernel (see the .cpp file), ``approx_matmul_naive``
the straightforward loop ``acc += table[x][w]`` (a baseline for the benchmark). Every other
device, and the CPU without the kernels, runs the plain-torch lookups of ``reference.py``:
the same values.

``level_indices`` turns integer levels (any real dtype) into uint8 table indices
``level + offset`` in one pass and counts the entries that are not integers in [low, high]
(int64 0-dim; their indices are meaningless): ``levels.to_index`` reports them.

``index_features`` looks up the features of a decomposition: uint8 index [..., K] and float
factors [256, r] give [..., K * r], feature f of entry k at k * r + f.

``table_slope_matmul`` is the "table" gradient (``gradients.py``):
``out[g, a, k] = sum_b grad[g, a, b] * slopes[a_idx[g, a, k], b_idx[g, b, k]]`` for float
grad [G, A, B], uint8 a_idx [G, A, K] and b_idx [G, B, K], slopes [256, 256] of grad's dtype:
grad_x with (grad, x_idx, w_idx, dP/dx), grad_w with (grad^T, w_idx, x_idx, (dP/dw)^T).

The ops register no autograd formula; the float-level functions of ``functional.py`` and
``conv.py`` carry the autograd (and call ``table_slope_matmul`` in their backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .cpu_extension import kernels_loaded

MAX_REDUCTION = 1 << 23  # the C++ kernel's per-plane int32 sums stay exact up to 255 * 2^23 < 2^31


def check_matmul_arguments(x_idx: Tensor, w_idx: Tensor, table: Tensor,
                           where: str = "torchapprox::approx_matmul") -> None:
    if x_idx.dtype != torch.uint8 or w_idx.dtype != torch.uint8:
        raise ValueError(f"{where}: x_idx and w_idx must be uint8 index tensors, got {x_idx.dtype} and {w_idx.dtype}")
    if table.dtype != torch.int32 or tuple(table.shape) != (256, 256):
        raise ValueError(f"{where}: table must be int32 [256, 256], got {table.dtype} {list(table.shape)}")
    if x_idx.dim() not in (2, 3) or w_idx.dim() != x_idx.dim():
        raise ValueError(f"{where}: x_idx and w_idx must both be [M, K]/[N, K] or [G, M, K]/[G, N, K], "
                         f"got {list(x_idx.shape)} and {list(w_idx.shape)}")
    if x_idx.shape[-1] != w_idx.shape[-1] or (x_idx.dim() == 3 and x_idx.shape[0] != w_idx.shape[0]):
        raise ValueError(f"{where}: x_idx {list(x_idx.shape)} and w_idx {list(w_idx.shape)} must share the "
                         "reduction length K (last dimension) and the group count G (first, if 3-D)")
    if x_idx.shape[-1] > MAX_REDUCTION:
        raise ValueError(f"{where}: the reduction length K must be at most {MAX_REDUCTION}, got {x_idx.shape[-1]}")
    if not (x_idx.device == w_idx.device == table.device):
        raise ValueError(f"{where}: x_idx, w_idx and table must be on one device, "
                         f"got {x_idx.device}, {w_idx.device}, {table.device}")


def _cpu_kernels_take(x: Tensor) -> bool:
    # The first CPU call loads the C++ kernels; from then on the dispatcher sends CPU calls
    # straight to them and the Python implementation below sees only the other devices.
    return x.device.type == "cpu" and kernels_loaded()


@torch.library.custom_op("torchapprox::approx_matmul", mutates_args=())
def approx_matmul(x_idx: Tensor, w_idx: Tensor, table: Tensor) -> Tensor:
    check_matmul_arguments(x_idx, w_idx, table)
    if _cpu_kernels_take(x_idx):
        return torch.ops.torchapprox.approx_matmul(x_idx, w_idx, table)
    return reference.approx_matmul(x_idx, w_idx, table)


@torch.library.custom_op("torchapprox::approx_matmul_naive", mutates_args=())
def approx_matmul_naive(x_idx: Tensor, w_idx: Tensor, table: Tensor) -> Tensor:
    check_matmul_arguments(x_idx, w_idx, table, "torchapprox::approx_matmul_naive")
    if _cpu_kernels_take(x_idx):
        return torch.ops.torchapprox.approx_matmul_naive(x_idx, w_idx, table)
    return reference.approx_matmul(x_idx, w_idx, table)


@torch.library.custom_op("torchapprox::level_indices", mutates_args=())
def level_indices(levels: Tensor, offset: int, low: int, high: int) -> tuple[Tensor, Tensor]:
    if not (low <= high and 0 <= low + offset and high + offset <= 255):
        raise ValueError(f"torchapprox::level_indices: [low, high] + offset must map into 0..255, "
                         f"got [{low}, {high}] + {offset}")
    if levels.dtype == torch.bool or levels.is_complex():
        raise ValueError(f"torchapprox::level_indices: levels must be a real tensor, got {levels.dtype}")
    if _cpu_kernels_take(levels):
        return torch.ops.torchapprox.level_indices(levels, offset, low, high)
    return reference.level_indices(levels, offset, low, high)


@level_indices.register_fake
def _(levels, offset, low, high):
    return torch.empty_like(levels, dtype=torch.uint8, memory_format=torch.contiguous_format), \
        levels.new_empty((), dtype=torch.int64)


@torch.library.custom_op("torchapprox::index_features", mutates_args=())
def index_features(index: Tensor, factors: Tensor) -> Tensor:
    if index.dtype != torch.uint8 or index.dim() < 1:
        raise ValueError(f"torchapprox::index_features: index must be uint8 with a last dimension, "
                         f"got {index.dtype} {list(index.shape)}")
    if factors.dim() != 2 or factors.shape[0] != 256 or factors.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"torchapprox::index_features: factors must be float32/float64 [256, r], "
                         f"got {factors.dtype} {list(factors.shape)}")
    if _cpu_kernels_take(index):
        return torch.ops.torchapprox.index_features(index, factors)
    return reference.index_features(index, factors)


@index_features.register_fake
def _(index, factors):
    return factors.new_empty((*index.shape[:-1], index.shape[-1] * factors.shape[1]))


@torch.library.custom_op("torchapprox::table_slope_matmul", mutates_args=())
def table_slope_matmul(grad: Tensor, a_idx: Tensor, b_idx: Tensor, slopes: Tensor) -> Tensor:
    if a_idx.dtype != torch.uint8 or b_idx.dtype != torch.uint8 or a_idx.dim() != 3 or b_idx.dim() != 3 \
            or a_idx.shape[0] != b_idx.shape[0] or a_idx.shape[2] != b_idx.shape[2]:
        raise ValueError("torchapprox::table_slope_matmul: a_idx [G, A, K] and b_idx [G, B, K] must be uint8, got "
                         f"{a_idx.dtype} {list(a_idx.shape)} and {b_idx.dtype} {list(b_idx.shape)}")
    if tuple(grad.shape) != (a_idx.shape[0], a_idx.shape[1], b_idx.shape[1]):
        raise ValueError(f"torchapprox::table_slope_matmul: grad must be [G, A, B] = "
                         f"{[a_idx.shape[0], a_idx.shape[1], b_idx.shape[1]]}, got {list(grad.shape)}")
    if tuple(slopes.shape) != (256, 256) or slopes.dtype != grad.dtype or not grad.is_floating_point():
        raise ValueError(f"torchapprox::table_slope_matmul: slopes must be [256, 256] of grad's (float) dtype, "
                         f"got {slopes.dtype} {list(slopes.shape)} for grad {grad.dtype}")
    if _cpu_kernels_take(grad) and grad.dtype in (torch.float32, torch.float64):
        return torch.ops.torchapprox.table_slope_matmul(grad, a_idx, b_idx, slopes)
    return reference.table_slope_matmul(grad, a_idx, b_idx, slopes)


@table_slope_matmul.register_fake
def _(grad, a_idx, b_idx, slopes):
    return grad.new_empty(a_idx.shape)


def _fake_matmul(x_idx, w_idx, table):
    return x_idx.new_empty((*x_idx.shape[:-1], w_idx.shape[-2]), dtype=torch.int64)


approx_matmul.register_fake(_fake_matmul)
approx_matmul_naive.register_fake(_fake_matmul)
