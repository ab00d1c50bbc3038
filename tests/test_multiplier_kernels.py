"""Approximate matmul and convolution: every path against an elementwise reference.

The reference sums ``Multiplier.product`` (plain indexing of the table) over explicit
operand pairs; the convolution reference walks the kernel offsets with strided slices (no
im2col). An asymmetric table (``T[i, j] = x * w + (x & 1)``, or a broken-array multiplier
with h > 0) makes an input/weight operand swap visible in linear and convolution alike.
"""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import torchapprox.multipliers as tm
from torchapprox.multipliers import cpu_extension, domain, reference

OPS = torch.ops.torchapprox
PATHS = ["decomposition", "table", "reference"]


def _odd_input_table(input_signed: bool) -> torch.Tensor:
    """x * w + (x & 1): depends on which operand is the input (asymmetric)."""
    x, w = domain.operand_grid(input_signed)
    return (x * w + (x & 1)).to(torch.int32)


def _with_bias_decomposition(input_signed: bool) -> tm.Multiplier:
    """The asymmetric table above with its exact rank-2 factorisation [x, x & 1] . [w, 1]:
    its zero input has a nonzero feature only if... (x & 1) is 0 at x = 0, so use +1 too."""
    x = domain.input_values(input_signed)
    w = domain.weight_values()
    x_factors = torch.stack([x, (x & 1) + 1])
    w_factors = torch.stack([w, torch.ones_like(w)])
    table = (x[:, None] * w[None, :] + (x[:, None] & 1) + 1).to(torch.int32)
    return tm.Multiplier(table, input_signed=input_signed, name="odd plus one",
                         decomposition=tm.Decomposition(x_factors, w_factors))


MULTIPLIERS = {
    "exact": lambda s: tm.exact(input_signed=s),
    "drum3": lambda s: tm.drum(3, input_signed=s),
    "truncated4": lambda s: tm.truncated(4, input_signed=s),
    "bam27": lambda s: tm.broken_array(2, 7, input_signed=s),
    "mitchell": lambda s: tm.mitchell(input_signed=s),
    "odd": lambda s: tm.Multiplier(_odd_input_table(s), input_signed=s, name="odd"),
    "odd_plus_one": _with_bias_decomposition,
}


def _levels(shape, input_signed=True, generator=None, extreme=False):
    low, high = domain.input_range(input_signed)
    if extreme:  # the largest magnitudes, one sign: the sums grow with K
        choices = torch.tensor([low, low + 1] if input_signed else [high, high - 1], dtype=torch.float32)
        return choices[torch.randint(0, 2, shape, generator=generator)]
    return torch.randint(low, high + 1, shape, generator=generator).float()


def _weights(shape, generator=None, extreme=False):
    return _levels(shape, True, generator, extreme)


def _explicit_linear(x, w, m):
    """int64 [..., N]: sum_k T[x[..., k], w[n, k]] by plain table indexing."""
    return m.product(x.to(torch.int64)[..., None, :], w.to(torch.int64)).to(torch.int64).sum(-1)


def _explicit_conv(x, w, m, stride, padding, dilation, groups):
    """int64 convolution walking the kernel offsets; padding: per-dim (before, after) pairs."""
    dims = w.dim() - 2
    pad = [a for pair in reversed(padding) for a in pair]
    xp = F.pad(x.to(torch.int64), pad)
    out_size = [(xp.shape[2 + i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    batch, c_out, cg = x.shape[0], w.shape[0], w.shape[1]
    out = torch.zeros(batch, c_out, *out_size, dtype=torch.int64)
    per_group = c_out // groups
    for offset in torch.cartesian_prod(*[torch.arange(k) for k in w.shape[2:]]).reshape(-1, dims).tolist():
        index = [slice(None), slice(None)]
        for i in range(dims):
            start = offset[i] * dilation[i]
            index.append(slice(start, start + stride[i] * (out_size[i] - 1) + 1, stride[i]))
        window = xp[tuple(index)]  # [B, C, *out]
        for o in range(c_out):
            g = o // per_group
            xs = window[:, g * cg:(g + 1) * cg]  # [B, cg, *out]
            ws = w[(o, slice(None), *offset)].to(torch.int64).reshape(1, cg, *([1] * dims))
            out[:, o] += m.product(xs, ws).to(torch.int64).sum(1)
    return out


def test_kernels_are_built_and_serve_cpu_calls():
    assert cpu_extension.kernels_loaded(), "the C++ multiplier kernels did not build (is g++ installed?)"


# ----------------------------------------------------------------------------- linear
@pytest.mark.parametrize("input_signed", [True, False])
@pytest.mark.parametrize("name", list(MULTIPLIERS))
def test_linear_paths_equal_the_explicit_sum(name, input_signed):
    m = MULTIPLIERS[name](input_signed)
    generator = torch.Generator().manual_seed(7)
    paths = PATHS if m.decomposition is not None else PATHS[1:]
    for shape_x, n in (((3, 5, 19), 7), ((1,), 4), ((37, 1), 66), ((0, 9), 3), ((130, 300), 2)):
        x = _levels(shape_x, input_signed, generator)
        w = _weights((n, shape_x[-1]), generator)
        expected = _explicit_linear(x, w, m)
        for path in paths:
            out = tm.approx_linear_levels(x, w, m, path=path)
            assert out.shape == (*shape_x[:-1], n) and out.dtype == torch.float32
            assert torch.equal(out.to(torch.int64), expected), (path, shape_x)
            assert torch.equal(tm.approx_matmul_int(x, w, m, path=path), expected), (path, shape_x)


def test_linear_takes_strided_inputs_and_keeps_dtypes():
    m = tm.broken_array(3, 5)
    generator = torch.Generator().manual_seed(3)
    x = _levels((40, 30), generator=generator).double()[::3, 1::2]  # non-contiguous [14, 15]
    w = _weights((15, 22), generator=generator).t()  # a transposed view [22, 15]
    expected = _explicit_linear(x, w, m)
    for path in PATHS:
        out = tm.approx_linear_levels(x, w, m, path=path)
        assert out.dtype == torch.float64 and torch.equal(out.to(torch.int64), expected), path
    half = tm.approx_linear_levels(x.to(torch.bfloat16), w.to(torch.bfloat16), m, path="table")
    assert half.dtype == torch.bfloat16 and torch.equal(half, expected.to(torch.bfloat16))


def test_the_operand_order_is_row_input_column_weight():
    """An asymmetric table: the result must be T[x, w], never T[w, x] (which differs)."""
    m = tm.Multiplier(_odd_input_table(True), name="odd")
    x = torch.tensor([[3.0, -5.0, 7.0]])
    w = torch.tensor([[2.0, 4.0, -6.0]])
    by_hand = (3 * 2 + 1) + (-5 * 4 + 1) + (7 * -6 + 1)  # x odd: +1 each
    swapped = (3 * 2 + 0) + (-5 * 4 + 0) + (7 * -6 + 0)  # the weights are even: +0
    assert by_hand != swapped
    for path in ("table", "reference"):
        assert tm.approx_linear_levels(x, w, m, path=path).item() == by_hand
        conv = tm.approx_conv_levels(x.reshape(1, 3, 1), w.reshape(1, 3, 1), m, path=path)
        assert conv.item() == by_hand
    bam = tm.broken_array(2, 0)
    a, b = torch.tensor([[3.0]]), torch.tensor([[5.0]])
    assert tm.approx_linear_levels(a, b, bam).item() == bam.product(3, 5).item() == 12  # 3 * (5 & ~3)
    assert bam.product(5, 3).item() == 0  # weight 3 has no bit >= 2


# ------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("kernel", ["default", "portable"])
def test_op_equals_the_reference_at_block_edges_and_for_every_plane_count(kernel, monkeypatch):
    if kernel == "portable":
        monkeypatch.setenv("TORCHAPPROX_MULT_KERNEL", "portable")
    generator = torch.Generator().manual_seed(11)
    tables = [
        tm.exact().table,  # two byte planes
        torch.randint(0, 200, (256, 256), generator=generator, dtype=torch.int32),  # one plane
        torch.randint(-(1 << 20), 1 << 20, (256, 256), generator=generator, dtype=torch.int32),  # three
        torch.randint(-(1 << 31), (1 << 31) - 1, (256, 256), generator=generator, dtype=torch.int64).to(torch.int32),
        torch.full((256, 256), -7, dtype=torch.int32),
    ]
    shapes = [(1, 1, 1, 1), (1, 63, 2, 257), (2, 65, 3, 256), (1, 257, 1, 9), (1, 3, 200, 40), (3, 129, 129, 5),
              (1, 0, 4, 3), (1, 4, 0, 3), (2, 5, 6, 0)]
    for t in tables:
        for G, M, N, K in shapes:
            x = torch.randint(0, 256, (G, M, K), generator=generator, dtype=torch.int64).to(torch.uint8)
            w = torch.randint(0, 256, (G, N, K), generator=generator, dtype=torch.int64).to(torch.uint8)
            expected = reference.approx_matmul(x, w, t)
            assert torch.equal(OPS.approx_matmul(x, w, t), expected), (G, M, N, K)
            assert torch.equal(OPS.approx_matmul(x[0], w[0], t), expected[0])
    x = torch.randint(0, 256, (50, 70), generator=generator, dtype=torch.int64).to(torch.uint8)
    w = torch.randint(0, 256, (9, 70), generator=generator, dtype=torch.int64).to(torch.uint8)
    assert torch.equal(OPS.approx_matmul_naive(x, w, tables[3]), reference.approx_matmul(x, w, tables[3]))
    lanes_contiguous = x.t().contiguous().t()  # the layout im2col_k_major gives: copied, not transposed
    assert torch.equal(OPS.approx_matmul(lanes_contiguous, w, tables[0]), reference.approx_matmul(x, w, tables[0]))


def test_op_reference_sums_every_product_once():
    """reference.approx_matmul against a Python loop, on a tile-crossing size."""
    generator = torch.Generator().manual_seed(5)
    t = torch.randint(-1000, 1000, (256, 256), generator=generator, dtype=torch.int32)
    x = torch.randint(0, 256, (2, 3, 4), generator=generator).to(torch.uint8)
    w = torch.randint(0, 256, (2, 5, 4), generator=generator).to(torch.uint8)
    expected = [[[sum(int(t[int(x[g, m, k]), int(w[g, n, k])]) for k in range(4)) for n in range(5)] for m in range(3)]
                for g in range(2)]
    assert reference.approx_matmul(x, w, t).tolist() == expected
    old = reference.TILE_ELEMENTS
    try:
        reference.TILE_ELEMENTS = 3  # every tile a sliver
        assert reference.approx_matmul(x, w, t).tolist() == expected
    finally:
        reference.TILE_ELEMENTS = old


def _op_inputs():
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (2, 70, 9), generator=generator).to(torch.uint8)
    w = torch.randint(0, 256, (2, 5, 9), generator=generator).to(torch.uint8)
    return x, w, tm.mitchell().table


def test_opcheck_approx_matmul():
    x, w, t = _op_inputs()
    torch.library.opcheck(OPS.approx_matmul.default, (x, w, t))
    torch.library.opcheck(OPS.approx_matmul.default, (x[0], w[0], t))
    torch.library.opcheck(OPS.approx_matmul_naive.default, (x, w, t))


def test_opcheck_index_features():
    index = torch.randint(0, 256, (3, 4, 5), dtype=torch.int64).to(torch.uint8)
    factors = torch.randn(256, 3, dtype=torch.float64)
    torch.library.opcheck(OPS.index_features.default, (index, factors))
    out = OPS.index_features(index, factors)
    assert out.shape == (3, 4, 15) and torch.equal(out.reshape(3, 4, 5, 3), factors[index.long()])


def test_opcheck_level_indices():
    levels = torch.tensor([[-3.0, 0.0, 127.0], [5.0, -128.0, 1.0]])
    torch.library.opcheck(OPS.level_indices.default, (levels, 128, -128, 127))
    index, bad = OPS.level_indices(torch.tensor([1.0, 1.5, 300.0, float("nan"), -1.0]), 0, 0, 255)
    assert index[0].item() == 1 and bad.item() == 4
    index, bad = OPS.level_indices(torch.tensor([-128, 0, 127], dtype=torch.int16), 128, -128, 127)
    assert index.tolist() == [0, 128, 255] and bad.item() == 0


def test_table_slope_op_equals_the_reference():
    generator = torch.Generator().manual_seed(17)
    slopes = torch.randn(256, 256, generator=generator, dtype=torch.float64)
    for G, A, B, K in ((1, 1, 1, 1), (2, 37, 5, 19), (1, 3, 70, 300), (1, 0, 3, 2), (1, 2, 0, 3)):
        grad = torch.randn(G, A, B, generator=generator, dtype=torch.float64)
        grad[..., :1] = 0.0  # zero gradients are skipped by the kernel: still summed right
        a = torch.randint(0, 256, (G, A, K), generator=generator).to(torch.uint8)
        b = torch.randint(0, 256, (G, B, K), generator=generator).to(torch.uint8)
        expected = reference.table_slope_matmul(grad, a, b, slopes)
        assert torch.allclose(OPS.table_slope_matmul(grad, a, b, slopes), expected, rtol=1e-12, atol=1e-12)
        out32 = OPS.table_slope_matmul(grad.float(), a, b, slopes.float())
        assert out32.dtype == torch.float32 and torch.allclose(out32, expected.float(), rtol=1e-4, atol=1e-3)
    torch.library.opcheck(OPS.table_slope_matmul.default, (grad, a, b, slopes))


def test_the_ops_reject_what_they_cannot_take():
    x, w, t = _op_inputs()
    with pytest.raises(ValueError, match="uint8 index tensors"):
        OPS.approx_matmul(x.long(), w, t)
    with pytest.raises(ValueError, match=r"int32 \[256, 256\]"):
        OPS.approx_matmul(x, w, t.long())
    with pytest.raises(ValueError, match="share the reduction length K"):
        OPS.approx_matmul(x, w[..., :4], t)


# --------------------------------------------------------------------- exactness, large K
def test_large_reductions_stay_exact_on_every_path():
    """K = 5000 products of magnitude 2^14 sum far beyond float32's 2^24."""
    generator = torch.Generator().manual_seed(9)
    for m in (tm.exact(), tm.drum(3), tm.truncated(4), tm.exact(input_signed=False)):
        x = _levels((3, 5000), m.input_signed, generator, extreme=True)
        w = _weights((4, 5000), generator, extreme=True)
        expected = _explicit_linear(x, w, m)
        assert expected.abs().max() > (1 << 25)  # float32 cannot hold every integer there
        for path in PATHS:
            assert torch.equal(tm.approx_matmul_int(x, w, m, path=path), expected), (m.name, path)
            out32 = tm.approx_linear_levels(x, w, m, path=path)
            assert torch.equal(out32, expected.to(torch.float32)), (m.name, path)  # one rounding
            out64 = tm.approx_linear_levels(x.double(), w.double(), m, path=path)
            assert torch.equal(out64, expected.to(torch.float64)), (m.name, path)
    xc = _levels((1, 600, 3, 3), True, generator, extreme=True)  # conv reduction 600 * 9 = 5400
    wc = _weights((2, 600, 3, 3), generator, extreme=True)
    expected = _explicit_conv(xc, wc, tm.exact(), (1, 1), ((0, 0), (0, 0)), (1, 1), 1)
    for path in PATHS:
        assert torch.equal(tm.approx_conv_levels(xc.double(), wc.double(), tm.exact(), path=path).to(torch.int64),
                           expected), path


# ------------------------------------------------------------------------------ convolution
CONV_CASES = [
    # x shape, w shape, stride, padding, dilation, groups
    ((2, 4, 11), (6, 2, 3), 2, 1, 1, 2),
    ((1, 3, 7, 6), (4, 3, 3, 2), (2, 1), (1, 2), 1, 1),
    ((2, 4, 9, 8), (4, 1, 3, 3), 1, "same", 2, 4),  # depthwise, dilated
    ((1, 2, 6, 7), (2, 2, 2, 2), 1, "same", 1, 1),  # even kernel: asymmetric 'same' padding
    ((1, 2, 4, 5, 5), (4, 1, 2, 3, 2), (1, 2, 1), 1, 1, 2),
    ((0, 3, 5, 5), (2, 3, 3, 3), 1, 0, 1, 1),  # empty batch
    ((3, 5, 5), (2, 3, 1, 1), 1, 0, 1, 1),  # unbatched, 1x1 kernel (K = C)
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_paths_equal_the_explicit_convolution(case):
    from torchapprox.multipliers.im2col import expand, padding_pairs

    x_shape, w_shape, stride, padding, dilation, groups = CONV_CASES[case]
    generator = torch.Generator().manual_seed(case)
    dims = len(w_shape) - 2
    s, d = expand(stride, dims, "stride", "t", 1), expand(dilation, dims, "dilation", "t", 1)
    pads = padding_pairs(padding, w_shape[2:], s, d, "t")
    for name in ("bam27", "odd", "odd_plus_one", "drum3"):
        for input_signed in (True, False):
            m = MULTIPLIERS[name](input_signed)
            x = _levels(x_shape, input_signed, generator)
            w = _weights(w_shape, generator)
            batched = x if len(x_shape) == dims + 2 else x[None]
            expected = _explicit_conv(batched, w, m, s, pads, d, groups)
            if len(x_shape) == dims + 1:
                expected = expected[0]
            for path in PATHS if m.decomposition is not None else PATHS[1:]:
                out = tm.approx_conv_levels(x, w, m, stride, padding, dilation, groups, path=path)
                assert out.shape == expected.shape and torch.equal(out.to(torch.int64), expected), (name, path)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_conv_reduction_past_float32_stays_exact(groups):
    """400 input channels x 9 taps of extreme operands: sums far past 2^24, so the float32
    convolutions run on chunks of input channels added in float64 (ungrouped) or in float64
    (grouped); both give the table's integers."""
    generator = torch.Generator().manual_seed(21)
    for name in ("exact", "drum3", "truncated4"):
        for input_signed in (True, False):
            m = MULTIPLIERS[name](input_signed)
            x = _levels((1, 400, 5, 5), input_signed, generator, extreme=True).double()
            w = _weights((4, 400 // groups, 3, 3), generator, extreme=True).double()
            expected = _explicit_conv(x, w, m, (1, 1), ((1, 1), (1, 1)), (1, 1), groups)
            assert expected.abs().max() > 2 ** 24
            out = tm.approx_conv_levels(x, w, m, 1, 1, 1, groups, path="decomposition")
            assert out.dtype == torch.float64 and torch.equal(out.to(torch.int64), expected), (name, input_signed)


def test_conv_decomposition_through_im2col_as_off_the_cpu(monkeypatch):
    """Devices whose convolution may not be exact take im2col + GEMM for the decomposition."""
    from torchapprox.multipliers import conv

    monkeypatch.setattr(conv, "torch_conv_is_exact", lambda device: False)
    generator = torch.Generator().manual_seed(13)
    for m in (tm.exact(), tm.drum(3), _with_bias_decomposition(True)):
        x = _levels((2, 4, 7, 6), True, generator)
        w = _weights((6, 2, 3, 3), generator)
        expected = _explicit_conv(x, w, m, (2, 1), ((1, 1), (2, 2)), (1, 1), 2)
        out = tm.approx_conv_levels(x, w, m, (2, 1), (1, 2), 1, 2, path="decomposition")
        assert torch.equal(out.to(torch.int64), expected), m.name


def test_a_decomposition_with_large_factors_computes_in_float64():
    """Products up to 128 * 2^10 * 2^10 = 2^27: float32 cannot hold them all, so the GEMM
    runs in float64 and stays exact."""
    x = domain.input_values(True)
    w = domain.weight_values()
    x_factors = torch.stack([x * 1024, (x & 1)])
    w_factors = torch.stack([torch.sign(w) * 1024, torch.ones_like(w)])
    table = (x_factors[:, :, None] * w_factors[:, None, :]).sum(0)
    decomposition = tm.Decomposition(x_factors, w_factors)
    assert decomposition.gemm_dtype == torch.float64
    m = tm.Multiplier(table.to(torch.int32), decomposition=decomposition)
    generator = torch.Generator().manual_seed(6)
    xs = _levels((5, 300), True, generator)
    ws = _weights((3, 300), generator)
    expected = _explicit_linear(xs, ws, m)
    for path in PATHS:
        assert torch.equal(tm.approx_matmul_int(xs, ws, m, path=path), expected), path
    with pytest.raises(ValueError, match="beyond the 2\\^53"):
        tm.Decomposition(x_factors * (1 << 40), w_factors)


def test_exact_conv_equals_torch_conv():
    generator = torch.Generator().manual_seed(4)
    x = _levels((2, 6, 10, 9), True, generator)
    w = _weights((4, 3, 3, 3), generator)
    expected = F.conv2d(x.double(), w.double(), None, 2, 1, 1, 2)
    for path in PATHS:
        out = tm.approx_conv_levels(x.double(), w.double(), tm.exact(), 2, 1, 1, 2, path=path)
        assert torch.equal(out, expected), path


def test_conv_arguments_are_checked():
    m = tm.exact()
    x, w = torch.zeros(1, 4, 5, 5), torch.zeros(2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"groups must be a positive int.*got groups=1"):
        tm.approx_conv_levels(x, w, m)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        tm.approx_conv_levels(x, w, m, stride=2, padding="same", groups=2)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        tm.approx_conv_levels(x, w, m, dilation=3, groups=2)
    with pytest.raises(ValueError, match=r"stride must be an int >= 1 or 2 of them, got \(1, 2, 3\)"):
        tm.approx_conv_levels(x, w, m, stride=(1, 2, 3), groups=2)


# -------------------------------------------------------------------------------- errors
def test_level_errors_name_the_argument_value_and_range():
    m = tm.drum(4, input_signed=False)
    w = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"x must hold integers in \[0, 255\] \(unsigned input x signed weight "
                                         r"input of multiplier 'drum\(4\)'\), got -1.0 at index \(0, 1, 2\)"):
        tm.approx_linear_levels(torch.tensor([[[0.0, 1, 2, 3], [4, 5, -1, 0]]]), w, m)
    with pytest.raises(ValueError,
                       match=r"w must hold integers in \[-128, 127\] \(signed 8-bit weight\), got 0.5 at index \(2, 3\)"):
        tm.approx_linear_levels(torch.zeros(2, 4), torch.tensor([[0.0] * 4, [1.0] * 4, [0, 0, 0, 0.5]]), m)
    with pytest.raises(ValueError, match=r"x must hold integers.*got 256.0"):
        tm.approx_conv_levels(torch.full((1, 1, 3), 256.0), torch.zeros(1, 1, 1), m)
    with pytest.raises(TypeError, match="x must be a floating tensor of integer levels, got torch.int64"):
        tm.approx_linear_levels(torch.zeros(2, 4, dtype=torch.int64), w, m)
    with pytest.raises(ValueError, match=r"x must be \[..., K\] and w \[N, K\] with the same K"):
        tm.approx_linear_levels(torch.zeros(2, 5), w, m)
    with pytest.raises(ValueError, match="has no exact decomposition"):
        tm.approx_linear_levels(torch.zeros(2, 4), w, tm.mitchell(), path="decomposition")
    with pytest.raises(ValueError, match="path must be one of"):
        tm.approx_linear_levels(torch.zeros(2, 4), w, m, path="fast")
    with pytest.raises(ValueError, match="gradient must be one of ste, table"):
        tm.approx_linear_levels(torch.zeros(2, 4), w, m, gradient="exact")


def test_auto_path_selection():
    assert tm.select_path(tm.drum(4), "cpu") == "decomposition"
    assert tm.select_path(tm.exact(), "cpu") == "decomposition"
    assert tm.select_path(tm.mitchell(), "cpu") == "table"
    deep = tm.truncated(3)  # four features
    assert deep.decomposition.rank > tm.AUTO_MAX_RANK and tm.select_path(deep, "cpu") == "table"
    assert tm.select_path(deep, "meta") == "decomposition"  # no C++ kernel there: any rank


# ----------------------------------------------------------------------------- gradients
def _slope(table: torch.Tensor, row: int, col: int, axis: int) -> float:
    """Central difference of the table along rows (axis 0: the input) or columns, one-sided at edges."""
    t = table.to(torch.float64)

    def at(i):
        return (t[i, col] if axis == 0 else t[row, i]).item()

    i = row if axis == 0 else col
    if i == 0:
        return at(1) - at(0)
    if i == 255:
        return at(255) - at(254)
    return (at(i + 1) - at(i - 1)) / 2


@pytest.mark.parametrize("input_signed", [True, False])
def test_table_gradient_equals_the_finite_difference_formula(input_signed):
    m = tm.mitchell(input_signed=input_signed)
    generator = torch.Generator().manual_seed(21)
    x = _levels((4, 6), input_signed, generator)
    x[0, :2] = torch.tensor(domain.input_range(input_signed), dtype=torch.float32)  # the one-sided edges
    w = _weights((3, 6), generator)
    w[0, :2] = torch.tensor([-128.0, 127.0])
    g = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    rows = (x + m.input_offset).long()
    cols = (w + 128).long()
    grad_x = torch.zeros(4, 6, dtype=torch.float64)
    grad_w = torch.zeros(3, 6, dtype=torch.float64)
    for i in range(4):
        for n in range(3):
            for k in range(6):
                r, c = rows[i, k].item(), cols[n, k].item()
                grad_x[i, k] += g[i, n] * _slope(m.table, r, c, 0)
                grad_w[n, k] += g[i, n] * _slope(m.table, r, c, 1)
    for path in ("table", "reference"):
        xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
        tm.approx_linear_levels(xr, wr, m, path=path, gradient="table").backward(g)
        assert torch.allclose(xr.grad, grad_x, rtol=1e-12, atol=1e-9), path
        assert torch.allclose(wr.grad, grad_w, rtol=1e-12, atol=1e-9), path


def test_straight_through_gradient_is_the_exact_matmul_gradient():
    generator = torch.Generator().manual_seed(8)
    x = _levels((2, 5, 7), True, generator).double()
    w = _weights((3, 7), generator).double()
    g = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xe, we).backward(g)
    for m in (tm.drum(3), tm.mitchell()):
        for path in ("decomposition", "table", "reference") if m.decomposition else ("table",):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            tm.approx_linear_levels(xr, wr, m, path=path).backward(g)
            assert torch.allclose(xr.grad, xe.grad, rtol=1e-12) and torch.allclose(wr.grad, we.grad, rtol=1e-12), \
                (m.name, path)
    # For the exact table the table gradient is the straight-through one.
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    tm.approx_linear_levels(xr, wr, tm.exact(), gradient="table").backward(g)
    assert torch.allclose(xr.grad, xe.grad) and torch.allclose(wr.grad, we.grad)


def test_conv_gradients():
    generator = torch.Generator().manual_seed(12)
    x = _levels((2, 4, 6, 5), True, generator).double()
    w = _weights((6, 2, 3, 2), generator).double()
    g = torch.randn(2, 6, 3, 5, generator=generator, dtype=torch.float64)
    geometry = dict(stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv2d(xe, we, None, **geometry).backward(g)
    m = tm.broken_array(2, 5)
    for path in PATHS:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        tm.approx_conv_levels(xr, wr, m, **geometry, path=path).backward(g)
        assert torch.allclose(xr.grad, xe.grad) and torch.allclose(wr.grad, we.grad), path
    # Table gradient of the convolution = table gradient of the linear map on torch's own
    # unfolded patches (F.unfold), taken back to x by autograd through F.unfold.
    xu, wu = x.clone().requires_grad_(), w.clone().requires_grad_()
    patches = F.unfold(xu, (3, 2), dilation=(1, 2), padding=(1, 1), stride=(2, 1))  # [B, C*k, L]
    patches = patches.transpose(1, 2).reshape(-1, 2, 2 * 6)  # [B*L, G, C/G * k]
    outs = [tm.approx_linear_levels(patches[:, group], wu[3 * group:3 * group + 3].reshape(3, -1), m,
                                    gradient="table") for group in range(2)]
    out = torch.cat(outs, 1).reshape(2, 15, 6).transpose(1, 2).reshape(2, 6, 3, 5)
    out.backward(g)
    for path in PATHS:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        value = tm.approx_conv_levels(xr, wr, m, **geometry, path=path, gradient="table")
        assert torch.equal(value, out.detach()), path
        value.backward(g)
        assert torch.allclose(xr.grad, xu.grad) and torch.allclose(wr.grad, wu.grad), path


# ------------------------------------------------------------------------- build fallback
def test_without_the_kernels_the_values_are_the_same():
    code = ("import hashlib, torch, torchapprox.multipliers as tm\n"
            "from torchapprox.multipliers import cpu_extension\n"
            "g = torch.Generator().manual_seed(0)\n"
            "x = torch.randint(0, 256, (1, 300, 40), generator=g).to(torch.uint8)\n"
            "w = torch.randint(0, 256, (1, 9, 40), generator=g).to(torch.uint8)\n"
            "y = torch.ops.torchapprox.approx_matmul(x, w, tm.mitchell().table)\n"
            "print(cpu_extension.kernels_loaded(), hashlib.sha256(y.numpy().tobytes()).hexdigest())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "TORCHAPPROX_COMPILE": "0"})
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 300, 40), generator=g).to(torch.uint8)
    w = torch.randint(0, 256, (1, 9, 40), generator=g).to(torch.uint8)
    y = OPS.approx_matmul(x, w, tm.mitchell().table)
    assert result.stdout.split() == ["False", hashlib.sha256(y.numpy().tobytes()).hexdigest()]
    assert "building" not in result.stderr


def test_a_failed_build_warns_once(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text('#error "no usable compiler here"\n')
    monkeypatch.setattr(cpu_extension, "SOURCE", broken)
    monkeypatch.setattr(cpu_extension, "_state", "untried")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    with pytest.warns(RuntimeWarning, match="approximate-multiplier kernels could not be built.*plain torch ops"):
        assert not cpu_extension.kernels_loaded()
    assert not cpu_extension.kernels_loaded()  # no second attempt, no second warning
    assert not list((tmp_path / "build").glob("*.build-*"))
    assert cpu_extension.library_name().startswith("torchapprox_mult_cpu_")
