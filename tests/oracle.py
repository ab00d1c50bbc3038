"""An independent oracle for symmetric per-tensor fake quantization: ATen's own kernel."""

import torch


def int_max(bitwidth: int) -> int:
    return 2 ** (bitwidth - 1) - 1


def oracle_fake_quantize(x: torch.Tensor, bitwidth: int) -> torch.Tensor:
    """torch.fake_quantize_per_tensor_affine with scale max|x| / int_max, zero point 0."""
    top = int_max(bitwidth)
    minmax = float(x.detach().abs().max().double())
    scale = minmax / top if minmax > 0 else 1.0
    y = torch.fake_quantize_per_tensor_affine(x.detach().float(), scale, 0, -top, top)
    return y.to(x.dtype)


def assert_matches_oracle(actual: torch.Tensor, x: torch.Tensor, bitwidth: int) -> None:
    """Equal to the oracle up to float rounding, except at rounding ties, where the grid
    index may differ by one step.

    The oracle multiplies by 1/scale, we multiply by int_max/minmax: the two products can
    land on either side of a .5 tie, nowhere else. Both are compared in grid units.
    """
    step = float(x.detach().abs().max().double()) / int_max(bitwidth)
    expected = oracle_fake_quantize(x, bitwidth).double() / step
    actual = actual.detach().double() / step
    for grid in (expected, actual):  # both sit on the integer grid, up to float32 rounding
        assert (grid - grid.round()).abs().max() <= 0.01
    index_diff = (actual.round() - expected.round()).abs()
    assert index_diff.max() <= 1, "a value is more than one grid step from the oracle"
    assert index_diff.mean() <= 0.001, f"{int(index_diff.sum())} of {x.numel()} values differ by a step"
