"""Approximate convolution of integer levels (1-, 2- and 3-d, grouped, depthwise).

``approx_conv_levels`` is a ConvNd with every product of an input level and a weight level
replaced by the multiplier's table entry, summed exactly (paths, dtypes and gradients as in
``functional.py``). Zero padding is the level 0, whose products go through the table like any
other. The table paths run the table matmul on im2col patches of the uint8 indices; the
decomposition runs torch's CPU convolution on the transformed operands.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quantizers.ops import apply, with_eager_twin
from .decomposition import FLOAT32_EXACT, features
from .functional import (_apply_ste_or_table, _check_gradient, _check_levels_tensor, _check_multiplier,
                         _grouped_products, _input_index, _table_sums, _weight_index, select_path)
from .im2col import expand, flat_pad, im2col, im2col_k_major, padding_pairs
from .multiplier import Multiplier


def approx_conv_levels(x: Tensor, w: Tensor, multiplier: Multiplier, stride: int | Sequence[int] = 1,
                       padding: str | int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                       *, path: str = "auto", gradient: str = "ste") -> Tensor:
    """A 1-, 2- or 3-d convolution of levels with every product taken from the table.

    x: float [B, C, *spatial] (or unbatched [C, *spatial]) input levels; w: float
    [C_out, C / groups, *kernel] weight levels; ``stride``, ``padding`` (ints, ``"valid"``
    or ``"same"``), ``dilation`` and ``groups`` as for ``F.conv{1,2,3}d``; zero padding only
    (pad other modes with ``F.pad`` first). Padded positions are the level 0 and go through
    the table (``T[0, w]`` need not be 0 for a custom table). Returns [B, C_out, *out_spatial]
    in ``promote_types(x.dtype, w.dtype)``: exact sums, rounded once. Errors as for
    :func:`approx_linear_levels`.
    """
    where = "approx_conv_levels"
    _check_multiplier(multiplier, where)
    _check_levels_tensor(x, "x", where)
    _check_levels_tensor(w, "w", where)
    _check_gradient(gradient, where)
    dims = w.dim() - 2
    if dims not in (1, 2, 3) or x.dim() not in (dims + 1, dims + 2):
        raise ValueError(f"{where}: w must be [C_out, C/groups, *kernel] with 1 to 3 kernel dimensions and x "
                         f"[B, C, *spatial] or [C, *spatial] to match, got x {list(x.shape)} and w {list(w.shape)}")
    if x.device != w.device:
        raise ValueError(f"{where}: x and w must be on one device, got {x.device} and {w.device}")
    unbatched = x.dim() == dims + 1
    channels = x.shape[0] if unbatched else x.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels != w.shape[1] * groups \
            or w.shape[0] % groups:
        raise ValueError(f"{where}: groups must be a positive int dividing C_out ({w.shape[0]}) with "
                         f"C ({channels}) = groups * w.shape[1] ({w.shape[1]}), got groups={groups!r}")
    kernel = tuple(w.shape[2:])
    stride = expand(stride, dims, "stride", where, 1)
    dilation = expand(dilation, dims, "dilation", where, 1)
    pads = padding_pairs(padding, kernel, stride, dilation, where)
    for size, (before, after), k, d in zip(x.shape[-dims:], pads, kernel, dilation):
        if size + before + after < d * (k - 1) + 1:
            raise ValueError(f"{where}: the padded input {list(x.shape[-dims:])} (padding {pads}) is smaller than "
                             f"the dilated kernel {list(kernel)} (dilation {dilation})")
    path = select_path(multiplier, x.device, path)
    x_idx, w_idx = _input_index(x, multiplier, where), _weight_index(w, where)
    if unbatched:
        x, x_idx = x[None], x_idx[None]
    out_dtype = torch.promote_types(x.dtype, w.dtype)
    geometry = (stride, dilation, groups)
    offset = multiplier.input_offset
    differentiable = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if differentiable and gradient == "table":
        x, x_idx = _pad(x, x_idx, pads, offset)
        out = _conv_through_matmul(x, w, x_idx, w_idx, multiplier, path, gradient, out_dtype, geometry)
    else:
        symmetric = all(before == after for before, after in pads)
        if not symmetric:
            x, x_idx = _pad(x, x_idx, pads, offset)
        conv_padding = tuple(before for before, _ in pads) if symmetric else (0,) * dims
        arguments = (x, w, x_idx, w_idx, multiplier, path, conv_padding, geometry, out_dtype)
        out = apply(_ApproxConv, *arguments) if differentiable else _conv_products(*arguments)
    return out[0] if unbatched else out


def torch_conv_is_exact(device: torch.device) -> bool:
    """Whether torch's convolution sums plain products on this device (exact on small integers).

    The CPU convolutions are direct or im2col + GEMM; other devices may pick Winograd or FFT
    algorithms, which are not exact: the decomposition takes im2col + GEMM there."""
    return device.type == "cpu"


def _pad(x: Tensor, x_idx: Tensor, pads, offset: int) -> tuple[Tensor, Tensor]:
    """Zero padding of the levels, and the index of the level 0 around their indices."""
    return F.pad(x, flat_pad(pads)), F.pad(x_idx, flat_pad(pads), value=offset)


def _conv_products(x: Tensor, w: Tensor, x_idx: Tensor, w_idx: Tensor, multiplier: Multiplier, path: str,
                   padding: tuple[int, ...], geometry: tuple, out_dtype: torch.dtype) -> Tensor:
    """Forward of the convolution on ``path`` with symmetric zero padding ``padding``."""
    stride, dilation, groups = geometry
    dims = len(stride)
    decomposition = multiplier.decomposition
    on_cpu = torch_conv_is_exact(x.device)
    if path == "decomposition" and on_cpu and (decomposition.zero_input_is_zero(multiplier.input_signed)
                                               or not any(padding)):
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        kernel = 1
        for k in w.shape[2:]:
            kernel *= k
        # The most one input channel adds to an output: r features x kernel taps x the bound.
        per_channel = decomposition.rank * kernel * decomposition.term_bound
        in_channels = w.shape[1]
        float32 = decomposition.gemm_dtype == torch.float32
        # Input channels per float32 convolution whose sums stay below 2^24 (exact): one
        # convolution when they all fit; chunks added in float64 when not (ungrouped), which
        # is much faster than one float64 convolution; float64 otherwise.
        chunk = FLOAT32_EXACT // per_channel if float32 else 0
        dtype = torch.float32 if chunk >= in_channels or (chunk >= 1 and groups == 1) else torch.float64
        if multiplier.decomposition_is_identity:
            a, b = x.to(dtype), w.to(dtype)
        else:
            x_table, w_table = decomposition.factor_tables(x.device, dtype)
            a, b = _feature_channels(x_idx, x_table), _feature_channels(w_idx, w_table)
        if dtype == torch.float64 or chunk >= in_channels:
            return conv(a, b, None, stride, padding, dilation, groups).to(out_dtype)
        width = chunk * decomposition.rank  # feature channels c * r + f: chunks on channel boundaries
        total = None
        for start in range(0, a.shape[1], width):
            part = conv(a[:, start:start + width], b[:, start:start + width], None, stride, padding, dilation, 1)
            total = part.double() if total is None else total + part
        return total.to(out_dtype)
    if any(padding):  # table paths, and a decomposition whose zero input has features: pad explicitly
        x, x_idx = _pad(x, x_idx, [(p, p) for p in padding], multiplier.input_offset)
        padding = (0,) * dims
    if path == "decomposition" and on_cpu:
        return _conv_products(x, w, x_idx, w_idx, multiplier, path, padding, geometry, out_dtype)
    # im2col of the uint8 indices (and of the levels for the decomposition off the CPU).
    kernel = tuple(w.shape[2:])
    batch, c_out = x.shape[0], w.shape[0]
    if path == "decomposition":
        patches, out_spatial = im2col(x_idx, kernel, stride, dilation)  # [B, L, C * k]
        x_idx3, w_idx3 = _grouped(patches, w_idx, groups)
        x3, w3 = _grouped(im2col(x, kernel, stride, dilation)[0], w, groups)
        sums = _grouped_products(x3, w3, x_idx3, w_idx3, multiplier, path, out_dtype)
        return _columns_to_image(sums, batch, patches.shape[1], c_out, out_spatial)
    rows, out_spatial = im2col_k_major(x_idx, kernel, stride, dilation)  # [C * k, B * L]
    length = rows.shape[1] // batch if batch else _spatial_size(out_spatial)
    x_idx3 = rows.reshape(groups, rows.shape[0] // groups, rows.shape[1]).transpose(1, 2)  # [G, B*L, C/G*k]
    w_idx3 = w_idx.reshape(groups, c_out // groups, rows.shape[0] // groups)
    sums = _table_sums(x_idx3, w_idx3, multiplier, path).to(out_dtype)  # [G, B * L, C_out/G]
    return _columns_to_image(sums, batch, length, c_out, out_spatial)


def _spatial_size(sizes: tuple[int, ...]) -> int:
    total = 1
    for size in sizes:
        total *= size
    return total


def _grouped(patches: Tensor, w: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """[B, L, C * k] patches and [C_out, C/G, *k] weights -> [G, B * L, C/G * k], [G, C_out/G, C/G * k]."""
    batch, length, width = patches.shape
    x3 = patches.reshape(batch * length, groups, width // groups).transpose(0, 1)
    return x3, w.reshape(groups, w.shape[0] // groups, width // groups)


def _columns_to_image(out3: Tensor, batch: int, length: int, c_out: int, out_spatial: tuple[int, ...]) -> Tensor:
    """[G, B * L, C_out/G] -> [B, C_out, *out_spatial]."""
    out = out3.transpose(0, 1).reshape(batch, length, c_out)
    return out.permute(0, 2, 1).reshape(batch, c_out, *out_spatial)


def _feature_channels(index: Tensor, table: Tensor) -> Tensor:
    """[B, C, *S] uint8 -> [B, C * r, *S] features, feature f of channel c at channel c * r + f."""
    looked_up = features(index.movedim(1, -1), table)  # [B, *S, C * r]
    return looked_up.movedim(-1, 1)


def _conv_through_matmul(x: Tensor, w: Tensor, x_idx: Tensor, w_idx: Tensor, multiplier: Multiplier, path: str,
                         gradient: str, out_dtype: torch.dtype, geometry: tuple) -> Tensor:
    """Convolution of an already padded x as a grouped matmul of its im2col patches, in the
    autograd graph (so the table gradient of the patches flows back to x)."""
    stride, dilation, groups = geometry
    kernel = tuple(w.shape[2:])
    patches, out_spatial = im2col(x, kernel, stride, dilation)  # [B, L, C * k]
    index_patches, _ = im2col(x_idx, kernel, stride, dilation)
    x3, w3 = _grouped(patches, w, groups)
    x_idx3, w_idx3 = _grouped(index_patches, w_idx, groups)
    out3 = _apply_ste_or_table(x3, w3, x_idx3, w_idx3, multiplier, path, gradient, out_dtype)
    return _columns_to_image(out3, x.shape[0], patches.shape[1], w.shape[0], out_spatial)


@with_eager_twin
class _ApproxConv(torch.autograd.Function):
    """Approximate convolution with the straight-through gradient of the exact convolution
    (setup_context style for torch.func; ``apply`` runs the old-style twin otherwise)."""

    @staticmethod
    def forward(x, w, x_idx, w_idx, multiplier, path, padding, geometry, out_dtype):
        return _conv_products(x, w, x_idx, w_idx, multiplier, path, padding, geometry, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, _, _, _, _, padding, geometry, _ = inputs
        ctx.save_for_backward(x, w)
        ctx.padding, ctx.geometry = padding, geometry

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        stride, dilation, groups = ctx.geometry
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x.to(grad.dtype), w.to(grad.dtype), None, list(stride), list(ctx.padding), list(dilation), False,
            [0] * len(stride), groups, mask)
        grad_x = grad_x.to(x.dtype) if mask[0] else None
        grad_w = grad_w.to(w.dtype) if mask[1] else None
        return grad_x, grad_w, None, None, None, None, None, None, None
