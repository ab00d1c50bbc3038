"""Approximate matmul of integer levels: the functional API (convolution: ``conv.py``).

Each product of an input level and a weight level is replaced by the multiplier's table entry,
and the products are summed exactly:

    approx_linear_levels:  out[..., n] = sum_k T[x[..., k], w[n, k]]          (F.linear layout)
    approx_conv_levels:    a ConvNd (1-, 2- or 3-d, grouped, depthwise) with every product
                           replaced the same way (``conv.py``)

Levels are integers held in float tensors (a fake-quantized tensor divided by its scale):
inputs in the multiplier's input range ([-128, 127] signed, [0, 255] unsigned), weights in
[-128, 127]. The result is the exact integer sum rounded once to the output dtype (that of
``torch.promote_types(x.dtype, w.dtype)``; float32 represents every integer up to 2^24, so
larger sums are rounded there and are exact in float64). The caller multiplies by
``s_x * s_w`` to get back to real units. ``approx_matmul_int`` returns the int64 sums.

Paths (``path=``), all giving the same integers:

- ``"decomposition"``: for a multiplier with an exact integer factorisation (exact, DRUM,
  truncated, broken-array): one float32 GEMM on transformed operands, chunked so that
  float32 sums stay exact (``decomposition.py``); convolutions run torch's own CPU
  convolution on the transformed operands (float64 where float32 could round), and im2col +
  GEMM on other devices (whose convolution algorithms may be Winograd or FFT: not exact).
- ``"table"``: the custom op ``torchapprox::approx_matmul``: the C++ kernel on the CPU,
  plain-torch lookups elsewhere (``ops.py``); convolutions through im2col.
- ``"reference"``: the plain-torch lookups (``reference.py``), on any device.
- ``"auto"`` (default): ``select_path``.

Gradients (``gradient=``) for float levels: ``"ste"`` (default) passes straight through the
exact product, as for an exact matmul/convolution of the levels (grad_x = grad_out @ w,
grad_w = grad_out^T @ x); ``"table"`` uses the table's local slopes (``gradients.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quantizers.ops import _functorch_transforms_active, apply, with_eager_twin
from . import reference
from .cpu_extension import kernels_loaded
from .decomposition import exact_bmm, features
from .levels import to_index
from .multiplier import Multiplier

PATHS = ("auto", "decomposition", "table", "reference")
GRADIENTS = ("ste", "table")
# "auto" takes the decomposition while it has at most this many features: each feature is one
# more operand-sized float tensor to build and GEMM. With the C++ table kernel, rank 1 (exact,
# DRUM) is 1.4-2x the fp32 GEMM and rank 2 already 3-6x, about the table kernel's 4x
# (experiments/multiplier_benchmark.py, 1 thread).
AUTO_MAX_RANK = 1


def select_path(multiplier: Multiplier, device: torch.device | str, path: str = "auto") -> str:
    """The path ``path`` resolves to for this multiplier on this device.

    ``"auto"``: the decomposition when the multiplier has one of rank <= ``AUTO_MAX_RANK``, or
    of any rank where no C++ table kernel serves the device; else ``"table"``. An explicit
    ``"decomposition"`` for a multiplier without one raises ValueError.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    decomposition = multiplier.decomposition
    if path == "decomposition" and decomposition is None:
        raise ValueError(f"path='decomposition': multiplier {multiplier.name!r} has no exact decomposition; "
                         "use path='table' or 'auto'")
    if path != "auto":
        return path
    if decomposition is None:
        return "table"
    fast_table = torch.device(device).type == "cpu" and kernels_loaded()
    return "decomposition" if decomposition.rank <= AUTO_MAX_RANK or not fast_table else "table"


# ------------------------------------------------------------------------------- operands
def _input_index(x: Tensor, multiplier: Multiplier, where: str, name: str = "x") -> Tensor:
    return to_index(x, multiplier.input_offset, *multiplier.input_range, name=name, where=where,
                    domain=f"{multiplier.domain} input of multiplier {multiplier.name!r}")


def _weight_index(w: Tensor, where: str, name: str = "w") -> Tensor:
    return to_index(w, 128, -128, 127, name=name, where=where, domain="signed 8-bit weight")


def _check_multiplier(multiplier: Multiplier, where: str) -> None:
    if not isinstance(multiplier, Multiplier):
        raise TypeError(f"{where}: multiplier must be a torchapprox.multipliers.Multiplier, "
                        f"got {type(multiplier).__name__}")


def _check_gradient(gradient: str, where: str) -> None:
    if gradient not in GRADIENTS:
        raise ValueError(f"{where}: gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")


def _check_levels_tensor(t: Tensor, name: str, where: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating tensor of integer levels, got {t.dtype} "
                        "(approx_matmul_int takes integer tensors)")


# ------------------------------------------------------------------------------ products
def _grouped_products(x3: Tensor, w3: Tensor, x_idx: Tensor, w_idx: Tensor, multiplier: Multiplier, path: str,
                      out_dtype: torch.dtype) -> Tensor:
    """[G, M, K] x [G, N, K] levels (and their uint8 indices, already checked) -> [G, M, N]
    exact sums in ``out_dtype``, on ``path`` (resolved)."""
    if path == "decomposition":
        decomposition = multiplier.decomposition
        if multiplier.decomposition_is_identity:  # the levels are their own features
            a, b = x3.to(torch.float32), w3.to(torch.float32)
        else:
            x_table, w_table = decomposition.factor_tables(x3.device, decomposition.gemm_dtype)
            a, b = features(x_idx, x_table), features(w_idx, w_table)
        return exact_bmm(a, b, decomposition.term_bound, out_dtype)
    return _table_sums(x_idx, w_idx, multiplier, path).to(out_dtype)


def _table_sums(x_idx: Tensor, w_idx: Tensor, multiplier: Multiplier, path: str) -> Tensor:
    """int64 sums of table entries on the "table" (custom op) or "reference" path."""
    table = multiplier.table_on(x_idx.device)
    if path == "table":
        return torch.ops.torchapprox.approx_matmul(x_idx, w_idx, table)
    return reference.approx_matmul(x_idx, w_idx, table)


def _apply_ste_or_table(x3: Tensor, w3: Tensor, x_idx: Tensor, w_idx: Tensor, multiplier: Multiplier, path: str,
                        gradient: str, out_dtype: torch.dtype) -> Tensor:
    if torch.is_grad_enabled() and (x3.requires_grad or w3.requires_grad):
        return apply(_ApproxMatmul, x3, w3, x_idx, w_idx, multiplier, path, gradient, out_dtype)
    return _grouped_products(x3, w3, x_idx, w_idx, multiplier, path, out_dtype)


@with_eager_twin
class _ApproxMatmul(torch.autograd.Function):
    """Grouped approximate matmul of levels with the "ste" or "table" gradient (a
    setup_context Function, so that torch.func transforms take it; ``apply`` runs its
    old-style twin otherwise)."""

    @staticmethod
    def forward(x3, w3, x_idx, w_idx, multiplier, path, gradient, out_dtype):
        return _grouped_products(x3, w3, x_idx, w_idx, multiplier, path, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x3, w3, x_idx, w_idx, multiplier, _, gradient, _ = inputs
        ctx.multiplier, ctx.gradient = multiplier, gradient
        ctx.dtypes = (x3.dtype, w3.dtype)
        ctx.save_for_backward(*((x3, w3) if gradient == "ste" else (x_idx, w_idx)))

    @staticmethod
    def backward(ctx, grad):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        a, b = ctx.saved_tensors
        if ctx.gradient == "ste":
            grad_x = torch.bmm(grad, b.to(grad.dtype)) if need_x else None
            grad_w = torch.bmm(grad.transpose(1, 2), a.to(grad.dtype)) if need_w else None
        else:  # a, b: the input and weight indices
            if _functorch_transforms_active():
                # table_slope_matmul has no derivative of its own, which torch.func's backward needs
                raise RuntimeError("the 'table' gradient of an approximate multiplier cannot run under torch.func "
                                   "transforms (grad, jacrev, ...); use gradient='ste' there")
            dx, dw = ctx.multiplier.slope_tables(grad.device, grad.dtype)
            op = torch.ops.torchapprox.table_slope_matmul
            grad_x = op(grad.contiguous(), a, b, dx) if need_x else None
            grad_w = op(grad.transpose(1, 2).contiguous(), b, a, dw.t()) if need_w else None
        grad_x = None if grad_x is None else grad_x.to(ctx.dtypes[0])
        grad_w = None if grad_w is None else grad_w.to(ctx.dtypes[1])
        return grad_x, grad_w, None, None, None, None, None, None


# --------------------------------------------------------------------------------- linear
def _check_linear_shapes(x: Tensor, w: Tensor, where: str) -> None:
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{where}: x must be [..., K] and w [N, K] with the same K, "
                         f"got x {list(x.shape)} and w {list(w.shape)}")
    if x.device != w.device:
        raise ValueError(f"{where}: x and w must be on one device, got {x.device} and {w.device}")


def approx_linear_levels(x: Tensor, w: Tensor, multiplier: Multiplier, *, path: str = "auto",
                         gradient: str = "ste") -> Tensor:
    """``out[..., n] = sum_k T[x[..., k], w[n, k]]``: ``F.linear`` of levels through the table.

    x: float [..., K] input levels (in ``multiplier.input_range``); w: float [N, K] weight
    levels in [-128, 127]; same device. Returns [..., N] in ``promote_types(x.dtype,
    w.dtype)``: exact integer sums, rounded once. Differentiable in x and w (``gradient``).
    Raises TypeError (non-float tensors, not a Multiplier) or ValueError (shapes, a level out
    of range or not an integer: the argument, value and index are named; an unknown path or
    gradient).
    """
    where = "approx_linear_levels"
    _check_multiplier(multiplier, where)
    _check_levels_tensor(x, "x", where)
    _check_levels_tensor(w, "w", where)
    _check_gradient(gradient, where)
    _check_linear_shapes(x, w, where)
    path = select_path(multiplier, x.device, path)
    x_idx, w_idx = _input_index(x, multiplier, where), _weight_index(w, where)
    k = x.shape[-1]
    out = _apply_ste_or_table(x.reshape(1, -1, k), w[None], x_idx.reshape(1, -1, k), w_idx[None], multiplier, path,
                              gradient, torch.promote_types(x.dtype, w.dtype))
    return out.reshape(*x.shape[:-1], w.shape[0])


def approx_matmul_int(x: Tensor, w: Tensor, multiplier: Multiplier, *, path: str = "auto") -> Tensor:
    """int64 ``out[..., n] = sum_k T[x[..., k], w[n, k]]``, exact for any K (up to 2^23).

    x: [..., K], w: [N, K], any integer or float dtype holding integer levels. No gradient.
    Errors as for :func:`approx_linear_levels`.
    """
    where = "approx_matmul_int"
    _check_multiplier(multiplier, where)
    _check_linear_shapes(x, w, where)
    path = select_path(multiplier, x.device, path)
    x_idx, w_idx = _input_index(x, multiplier, where), _weight_index(w, where)
    k = x.shape[-1]
    x_idx, w_idx = x_idx.reshape(1, -1, k), w_idx[None]
    with torch.no_grad():
        if path == "decomposition":  # float64 holds the exact sums (< 2^53)
            out = _grouped_products(x.reshape(1, -1, k), w[None], x_idx, w_idx, multiplier, path,
                                    torch.float64).to(torch.int64)
        else:
            out = _table_sums(x_idx, w_idx, multiplier, path)
    return out.reshape(*x.shape[:-1], w.shape[0])
