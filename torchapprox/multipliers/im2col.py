"""Convolution arguments and im2col for 1-, 2- and 3-d convolutions (any dtype, differentiable)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def expand(value: int | Sequence[int], dims: int, name: str, where: str, minimum: int) -> tuple[int, ...]:
    """An int or a sequence of ``dims`` ints, each >= minimum, as a tuple of ``dims`` ints."""
    values = (value,) * dims if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != dims or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{where}: {name} must be an int >= {minimum} or {dims} of them, got {value!r}")
    return values


def padding_pairs(padding: str | int | Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                  dilation: Sequence[int], where: str) -> tuple[tuple[int, int], ...]:
    """(before, after) zero padding per spatial dimension, as torch's ConvNd reads ``padding``:
    ints, ``"valid"`` (none) or ``"same"`` (stride 1 only; an odd total puts the extra level
    after, as torch does)."""
    if isinstance(padding, str):
        if padding == "valid":
            return tuple((0, 0) for _ in kernel)
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{where}: padding='same' needs stride 1, got stride {tuple(stride)}")
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise ValueError(f"{where}: padding must be 'valid', 'same', an int or {len(kernel)} ints, got {padding!r}")
    return tuple((p, p) for p in expand(padding, len(kernel), "padding", where, 0))


def flat_pad(pairs: Sequence[tuple[int, int]]) -> list[int]:
    """The ``F.pad`` argument (last dimension first) for per-dimension (before, after) pairs."""
    return [amount for pair in reversed(pairs) for amount in pair]


def _windows(x: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """A view [B, C, *out_spatial, *kernel] of the windows of a padded [B, C, *spatial] tensor."""
    windows = x
    for i in range(len(kernel)):
        span = dilation[i] * (kernel[i] - 1) + 1
        windows = windows.unfold(2 + i, span, stride[i])  # window appended as the last dimension
        if dilation[i] > 1:
            windows = windows[..., :: dilation[i]]
    return windows


def _product(sizes: Sequence[int]) -> int:
    total = 1
    for size in sizes:
        total *= size
    return total


def im2col(x: Tensor, kernel: Sequence[int], stride: Sequence[int],
           dilation: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    """Patches of an (already padded) [B, C, *spatial] tensor: ([B, L, C * prod(kernel)], out_spatial).

    ``L = prod(out_spatial)``; a patch's entries run over (channel, kernel position) in the
    order of a ConvNd weight ``[C_out, C, *kernel]`` flattened per output channel.
    """
    dims = len(kernel)
    windows = _windows(x, kernel, stride, dilation)
    out_spatial = tuple(windows.shape[2:2 + dims])
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]  # [B, *out, C, *kernel]
    patches = windows.permute(order)
    return patches.reshape(x.shape[0], _product(out_spatial), x.shape[1] * _product(kernel)), out_spatial


def im2col_k_major(x: Tensor, kernel: Sequence[int], stride: Sequence[int],
                   dilation: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    """The same patches transposed, ([C * prod(kernel), B * L], out_spatial): each row one
    (channel, kernel position) over every output position, copied in runs along the last
    spatial dimension (faster than :func:`im2col` for byte tensors; the table kernel takes
    its transpose view without a further transposition)."""
    dims = len(kernel)
    windows = _windows(x, kernel, stride, dilation)
    out_spatial = tuple(windows.shape[2:2 + dims])
    order = [1, *range(2 + dims, 2 + 2 * dims), 0, *range(2, 2 + dims)]  # [C, *kernel, B, *out]
    patches = windows.permute(order)
    return patches.reshape(x.shape[1] * _product(kernel), x.shape[0] * _product(out_spatial)), out_spatial
