"""Checking integer operand values and turning them into table indices."""

from __future__ import annotations

import torch
from torch import Tensor


def check_levels(values: Tensor, low: int, high: int, *, name: str, where: str, domain: str = "") -> None:
    """Raise ValueError unless every entry of ``values`` is an integer in [low, high].

    ``values`` may have any integer or floating dtype (a float must hold an integer value;
    NaN and infinities are refused). The message names the argument, the first offending
    value and its index, and the allowed range. TypeError for bool and complex tensors.
    """
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"{where}: {name} must be an integer or floating tensor of integer values, "
                        f"got dtype {values.dtype}")
    if values.numel() == 0:
        return
    lowest, highest = torch.aminmax(values)
    in_range = bool(lowest >= low) and bool(highest <= high)  # NaN compares False: refused
    integral = True if not values.is_floating_point() else not bool((values != values.round()).any())
    if in_range and integral:
        return
    if values.is_floating_point():
        bad = (values != values.round()) | ~((values >= low) & (values <= high))
    else:
        bad = (values < low) | (values > high)
    first = tuple(int(i) for i in bad.nonzero()[0].tolist())
    value = values[first].item()
    scope = f" ({domain})" if domain else ""
    raise ValueError(f"{where}: {name} must hold integers in [{low}, {high}]{scope}, "
                     f"got {value!r} at index {first}")


def to_index(values: Tensor, offset: int, low: int, high: int, *, name: str, where: str,
             domain: str = "") -> Tensor:
    """uint8 table indices ``values + offset`` (contiguous, same shape), in one pass
    (``torchapprox::level_indices``); the errors of :func:`check_levels`."""
    if values.dtype == torch.bool or values.is_complex():
        check_levels(values, low, high, name=name, where=where, domain=domain)  # raises TypeError
    # indices take no gradient: a detached input records no autograd node for the op
    index, bad = torch.ops.torchapprox.level_indices(values.detach(), offset, low, high)
    if bad.item():
        check_levels(values, low, high, name=name, where=where, domain=domain)  # raises with the details
    return index
