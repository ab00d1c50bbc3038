"""The arithmetic of fake quantization in plain torch ops: the reference every kernel follows.

These functions are what the custom ops in ``ops.py`` compute on every device; on the CPU
a C++ kernel (``csrc/minmax_cpu.cpp``) computes the same values faster, and the tests hold
the two to equality. Formulas (the symmetric min/max quantizer of the seed, extended), in
the form of ONNX's QuantizeLinear/DequantizeLinear, so that an integer runtime computes the
exported model's values to the last bit:

- grid bounds: signed ``[-(2^(b-1)-1), 2^(b-1)-1]`` (narrow: 4 bits is [-7, 7]), unsigned
  ``[0, 2^b - 1]``; ``auto`` picks the unsigned grid for a tensor (or channel) whose minimum
  is >= 0 and the signed one otherwise.
- ``scale = top / top_level``, the real value of one level (ONNX's ``y_scale``; the seed's
  ``scale_factor = int_max / max|x|`` is its inverse), with ``top = max|x|`` (signed) or
  ``max(max(x), 0)`` (unsigned) and ``top_level`` the grid's largest level.
  Special ranges: a NaN or an infinity anywhere in the tensor gives a NaN scale (so every
  value comes out NaN and the divergence checks fire); ``top == 0`` (an all-zero tensor)
  gives scale 1, so the values round to 0; a scale below the dtype's smallest normal number
  (max|x| below about 1.5e-36 in float32 at 8 bits) is raised to it: such a tiny tensor is
  quantized coarsely, but finitely.
- ``x_fake = clamp(round(x / scale), qmin, qmax) * scale``, rounding half to even.

Half types (float16, bfloat16) are computed in float32 and the result cast back once:
float16 tops out at 65504 and bfloat16 has 8 mantissa bits, too few for large grids.
"""

from __future__ import annotations

import torch

GRIDS = ("signed", "unsigned", "auto")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def int_max(bitwidth: int) -> int:
    """Largest level of the signed grid: 2^(b-1) - 1."""
    return 2 ** (bitwidth - 1) - 1


def unsigned_max(bitwidth: int) -> int:
    """Largest level of the unsigned grid: 2^b - 1."""
    return 2**bitwidth - 1


def grid_bounds(bitwidth: int, grid: str) -> tuple[int, int]:
    """(qmin, qmax) of the grid; for ``auto`` the hull of both grids (each tensor's own
    scale keeps its values inside the grid it picked)."""
    if grid == "signed":
        return -int_max(bitwidth), int_max(bitwidth)
    if grid == "unsigned":
        return 0, unsigned_max(bitwidth)
    return -int_max(bitwidth), unsigned_max(bitwidth)


def scale_shape(x: torch.Tensor, axes: list[int]) -> list[int]:
    """Shape of the scale: () for one scale per tensor, else x's rank with the sizes of
    ``axes`` kept and 1 elsewhere (it broadcasts against x)."""
    if not axes:
        return []
    return [x.shape[d] if d in axes else 1 for d in range(x.dim())]


def minmax_scale(x: torch.Tensor, bitwidth: int, grid: str, axes: list[int]) -> torch.Tensor:
    """The scale (step) of ``x``'s own range (one per slice along ``axes``), in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    if x.numel() == 0:
        return torch.ones(scale_shape(x, axes), dtype=dtype, device=x.device)
    if axes:
        # amin/amax over no dimension would reduce them all: axes that cover every dimension
        # give one scale per element.
        reduce = [d for d in range(x.dim()) if d not in axes]
        low, high = (torch.amin(x, reduce, keepdim=True), torch.amax(x, reduce, keepdim=True)) if reduce else (x, x)
    elif torch.compiler.is_exporting():
        # What the ONNX exporter translates (ReduceMin/ReduceMax), in float32: ONNX Runtime
        # has no bfloat16 reductions on the CPU, and the extremes are the same values.
        compute = x.to(dtype)
        low, high = compute.min(), compute.max()
    else:
        low, high = torch.aminmax(x)
    low, high = low.to(dtype), high.to(dtype)
    # A NaN or an infinity anywhere in the tensor makes every scale NaN.
    nonfinite = torch.logical_not(torch.logical_and(torch.isfinite(low), torch.isfinite(high))).any()
    return range_to_scale(low, high, bitwidth, grid, nonfinite)[0]


def range_to_scale(low: torch.Tensor, high: torch.Tensor, bitwidth: int, grid: str,
                   nonfinite: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, lower, upper) of the range ``[low, high]``: the step between levels (the one
    formula of the module docstring) and the clipping bounds of that grid. ``nonfinite``
    (default: low or high not finite) marks where the scale is NaN."""
    if nonfinite is None:
        nonfinite = torch.logical_not(torch.logical_and(torch.isfinite(low), torch.isfinite(high)))
    if grid == "unsigned":
        top = high.clamp_min(0)
        top_level = torch.full_like(top, unsigned_max(bitwidth))
        lower = torch.zeros_like(top)
    else:
        top = torch.maximum(low.neg(), high)
        top_level = torch.full_like(top, int_max(bitwidth))
        lower = top.neg()
        if grid == "auto":
            unsigned = low >= 0
            top_level = torch.where(unsigned, torch.full_like(top, unsigned_max(bitwidth)), top_level)
            lower = torch.where(unsigned, torch.zeros_like(top), lower)
    return scale_from_range(top, top_level, nonfinite), lower, top


def scale_from_range(top: torch.Tensor, top_level: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """``top / top_level``, at least the dtype's smallest normal number; 1 where ``top`` is
    0, NaN where ``nonfinite``. A true division, as the C++ kernel and ONNX divide."""
    scale = top.div(top_level).clamp_min(torch.finfo(top.dtype).tiny)
    scale = torch.where(top > 0, scale, 1.0)
    return torch.where(nonfinite, float("nan"), scale)


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` in the scale's dtype, returned in x's."""
    compute = x.to(scale.dtype)
    return torch.clamp(torch.round(compute / scale), qmin, qmax).mul_(scale).to(x.dtype)


def fake_quantize(x: torch.Tensor, bitwidth: int, grid: str, axes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fake, scale): ``x`` on the grid of its own range, and that range's scale."""
    scale = minmax_scale(x, bitwidth, grid, axes)
    if x.numel() == 0:
        return x.clone(), scale
    return round_to_grid(x, scale, *grid_bounds(bitwidth, grid)), scale


def straight_through_mask(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Where the gradient passes: the rounded value lies inside the grid (not clipped).

    The rule of ``torch.fake_quantize_per_tensor_affine``'s gradient."""
    rounded = torch.round(x.to(scale.dtype) / scale)
    return torch.logical_and(rounded >= qmin, rounded <= qmax)


def range_gradient_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, bitwidth: int, grid: str,
                            axes: list[int]) -> torch.Tensor:
    """The gradient of ``fake_quantize(x)`` with respect to x with the range ``m`` left
    attached (formula and source: ``range_gradient.py``): ``grad * passing`` plus, at each
    slice's extreme element(s), ``sign(x) * sum(grad * (round(u) - u) * passing) / top_level``
    shared evenly between ties (``u = x / scale``); no range term where the scale is not
    ``top / top_level`` (zero range, NaN or infinity, a step raised to the dtype's smallest
    normal number). In x's dtype.

    Linear in ``grad``; x enters through piecewise-constant terms only (detached), so a
    second derivative through it is 0, as for the straight-through composition."""
    if x.numel() == 0:
        return torch.zeros_like(x)
    x = x.detach()
    compute = x.to(scale.dtype)
    grad_c = grad.to(scale.dtype)
    u = compute / scale
    rounded = torch.round(u)
    qmin, qmax = grid_bounds(bitwidth, grid)
    passing = torch.logical_and(rounded >= qmin, rounded <= qmax)
    reduce = [d for d in range(x.dim()) if d not in axes]

    def per_slice(tensor, op):  # op over the reduced dimensions, kept as size 1
        return op(tensor, reduce, keepdim=True) if reduce else tensor

    if grid == "unsigned":
        magnitude = compute
        top_level = torch.full_like(scale, unsigned_max(bitwidth))
    else:
        magnitude = compute.abs()
        top_level = torch.full_like(scale, int_max(bitwidth))
        if grid == "auto":
            top_level = torch.where(per_slice(compute, torch.amin) >= 0, unsigned_max(bitwidth), top_level)
    top = per_slice(magnitude, torch.amax)
    d_range = per_slice(grad_c * (rounded - u) * passing, torch.sum) / top_level
    d_range = torch.where(top / top_level == scale, d_range, 0.0)  # the scale is the plain division
    extreme = magnitude == top
    ties = per_slice(extreme.to(compute.dtype), torch.sum).clamp_min(1)
    grad_x = grad_c * passing + extreme * torch.sign(compute) * d_range / ties
    return grad_x.to(x.dtype)


def learned_step_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of ``round(clamp(x / scale, qmin, qmax)) * scale`` (LSQ, Esser et al.
    2020, eq. 3): ``(grad_x, grad_scale)``. x passes where ``qmin <= x / scale <= qmax``; the
    scale gets ``grad * (round(u) - u)`` there (``u = x / scale``) and ``grad * qmin`` or
    ``grad * qmax`` where clipped, summed to the scale's shape. In the scale's dtype (grad_x
    in x's)."""
    compute, g = x.detach().to(scale.dtype), grad.to(scale.dtype)
    u = compute / scale
    below, above = u < qmin, u > qmax
    inside = torch.logical_not(torch.logical_or(below, above))
    grad_x = (g * inside).to(x.dtype)
    terms = g * torch.where(inside, torch.round(u) - u, torch.where(below, float(qmin), float(qmax)))
    if scale.dim() == 0:
        return grad_x, terms.sum()
    reduce = [d for d in range(terms.dim()) if scale.shape[d] == 1 and terms.shape[d] != 1]
    return grad_x, terms.sum(reduce, keepdim=True) if reduce else terms
