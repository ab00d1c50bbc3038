"""MinMaxQuant and ApproxQuantizer against an independent oracle, grid by grid."""

import pytest
import torch

from oracle import assert_matches_oracle, int_max
from torchapprox.quantizers import ApproxQuantizer, MinMaxQuant

BITWIDTHS = range(2, 17)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(4096) * 3.0


def test_base_class_is_abstract():
    with pytest.raises(TypeError):
        ApproxQuantizer(8)


@pytest.mark.parametrize("bitwidth, expected", [(2, 1), (3, 3), (4, 7), (8, 127), (16, 32767), (32, 2**31 - 1)])
def test_int_max_is_the_narrow_symmetric_range(bitwidth, expected):
    assert MinMaxQuant(bitwidth).int_max == expected


@pytest.mark.parametrize("bitwidth", BITWIDTHS)
def test_quantize_lands_on_the_full_integer_grid(bitwidth, x):
    q = MinMaxQuant(bitwidth)
    x_quant = q.quantize(x)
    assert x_quant.dtype == x.dtype and x_quant.shape == x.shape
    assert torch.equal(x_quant, x_quant.round())
    top = int_max(bitwidth)
    assert x_quant.abs().max().item() == top  # max|x| maps exactly onto int_max
    assert q.scale_factor.item() == pytest.approx(top / x.abs().max().item(), rel=1e-6)
    # A dense ramp over [-1, 1] visits every level of the grid, and no other value.
    ramp = torch.linspace(-1, 1, 8 * (2 * top + 1) + 1)
    levels = q.quantize(ramp).unique()
    assert torch.equal(levels, torch.arange(-top, top + 1, dtype=ramp.dtype))


@pytest.mark.parametrize("bitwidth", BITWIDTHS)
def test_fake_quantization_matches_aten_oracle(bitwidth, x):
    q = MinMaxQuant(bitwidth)
    assert_matches_oracle(q(x), x, bitwidth)


@pytest.mark.parametrize("bitwidth", [2, 4, 8])
def test_forward_is_quantize_times_scale_exactly(bitwidth, x):
    q = MinMaxQuant(bitwidth)
    expected = q.quantize(x) * q.scale  # ONNX's DequantizeLinear of QuantizeLinear
    assert torch.equal(q(x), expected)
    assert torch.allclose(q.scale_factor, 1 / q.scale) and torch.allclose(q(x), q.quantize(x) / q.scale_factor)


def test_known_values_at_four_bits():
    q = MinMaxQuant(4)
    x = torch.tensor([-1.0, 0.2, 0.6, 0.0714])
    assert q.quantize(x).tolist() == [-7.0, 1.0, 4.0, 0.0]
    assert q(x).tolist() == pytest.approx([-1.0, 1 / 7, 4 / 7, 0.0])


def test_rounding_is_onnx_quantize_linear_division_by_the_scale():
    """0.5 * 7 is exactly 3.5, a tie (which half-to-even would round to 4), but 0.5 divided
    by float32(1/7) is 3.4999998: ONNX's QuantizeLinear, and so the quantizer, give 3."""
    q = MinMaxQuant(4)
    assert q.quantize(torch.tensor([-1.0, 0.5])).tolist() == [-7.0, 3.0]
    step = torch.tensor(1.0) / 7
    assert torch.round(torch.tensor(0.5) / step).item() == 3.0


def test_quantize_gradient_is_straight_through_times_scale(x):
    q = MinMaxQuant(8)
    x = x.clone().requires_grad_()
    upstream = torch.randn_like(x)
    q.quantize(x).backward(upstream)
    assert torch.allclose(x.grad, upstream * q.scale_factor)


def test_fake_quantize_gradient_is_identity(x):
    q = MinMaxQuant(3)
    x = x.clone().requires_grad_()
    upstream = torch.randn_like(x)
    q(x).backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_quant_function_is_the_differentiable_node(x):
    minmax = x.abs().max()
    x = x.clone().requires_grad_()
    x_quant = MinMaxQuant.Quant.apply(x, minmax, 7)
    assert torch.equal(x_quant, torch.round(x.detach() * 7 / minmax))
    x_quant.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 7 / minmax.item()))


def test_annealing_the_bitwidth_changes_the_grid(x):
    q = MinMaxQuant(16)
    errors = []
    for bitwidth in (16, 8, 4, 2):
        q.bitwidth = bitwidth
        assert q.int_max == int_max(bitwidth)
        assert q.quantize(x).abs().max().item() == int_max(bitwidth)
        errors.append((q(x) - x).square().mean().item())
    assert errors == sorted(errors)  # coarser grid, larger error


@pytest.mark.parametrize("bad", [8.0, "8", True, None, [8]])
def test_non_int_bitwidth_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"`bitwidth`.*2\.\.32.*got"):
        MinMaxQuant(bad)
    q = MinMaxQuant(6)
    with pytest.raises(TypeError, match="bitwidth"):
        q.bitwidth = bad
    assert q.bitwidth == 6


@pytest.mark.parametrize("bad", [-4, 0, 1, 33, 64])
def test_out_of_range_bitwidth_is_a_value_error(bad):
    with pytest.raises(ValueError, match=rf"`bitwidth` must be an int in 2\.\.32, got {bad}"):
        MinMaxQuant(bad)
    q = MinMaxQuant(6)
    with pytest.raises(ValueError):
        q.bitwidth = bad
    assert q.bitwidth == 6


def test_all_zero_tensor_gives_zeros_and_a_finite_scale():
    q = MinMaxQuant(8)
    zeros = torch.zeros(5, requires_grad=True)
    assert torch.equal(q(zeros), torch.zeros(5))
    assert torch.isfinite(q.scale_factor).all()
    assert torch.equal(q.quantize(zeros), torch.zeros(5))
    q.quantize(zeros).sum().backward()
    assert torch.isfinite(zeros.grad).all()


def test_empty_tensor_gives_an_empty_tensor():
    q = MinMaxQuant(8)
    empty = torch.empty(0, 3)
    assert q(empty).shape == (0, 3)
    assert q.quantize(empty).shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_kept_and_values_match_the_oracle(dtype, x):
    q = MinMaxQuant(6)
    x = x.to(dtype)
    y = q(x)
    assert y.dtype == dtype and q.quantize(x).dtype == dtype
    if dtype == torch.float64:
        assert_matches_oracle(y, x, 6)
    else:  # half types are quantized in float32 and rounded once on the way back
        expected = q.quantize(x.float()) / q.scale_factor
        assert torch.equal(y, expected.to(dtype))


def test_forward_needs_no_values_on_the_host():
    """On the meta device tensors have no data: any .item() or bool(tensor) would raise,
    so this passing shows the forward and backward do no host-device synchronisation."""
    q = MinMaxQuant(8)
    x = torch.randn(64, 32, device="meta", requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert y.device.type == "meta" and x.grad.shape == x.shape
    q.quantize(x.detach())


def test_scale_factor_is_none_before_the_first_call():
    assert MinMaxQuant(8).scale_factor is None


# ------------------------------------------------------------- unsigned and auto grids
def unsigned_oracle(x, bitwidth):
    top = 2**bitwidth - 1
    scale = float(x.max()) / top
    return torch.fake_quantize_per_tensor_affine(x, scale, 0, 0, top)


@pytest.mark.parametrize("bitwidth", [2, 3, 4, 8])
def test_unsigned_grid_uses_every_level_from_zero(bitwidth):
    q = MinMaxQuant(bitwidth, grid="unsigned")
    top = 2**bitwidth - 1
    assert q.unsigned_max == top
    ramp = torch.linspace(0, 1, 8 * (top + 1) + 1)
    assert torch.equal(q.quantize(ramp).unique(), torch.arange(0, top + 1, dtype=ramp.dtype))
    x = torch.rand(4096) * 2
    grid_step = float(x.max()) / top
    differs = ((q(x) - unsigned_oracle(x, bitwidth)).abs() > grid_step / 2).float().mean()
    assert differs <= 0.001  # equal but at rounding ties
    assert torch.allclose(q(x), q.quantize(x) / q.scale_factor)


def test_unsigned_grid_clips_negative_values_to_zero():
    q = MinMaxQuant(2, grid="unsigned")
    x = torch.tensor([-1.0, 0.3, 1.0], requires_grad=True)
    assert q.quantize(x).tolist() == [0.0, 1.0, 3.0]
    y = q(x)
    assert torch.allclose(y, torch.tensor([0.0, 1 / 3, 1.0]))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0]  # clipped values pass no gradient


def test_auto_grid_chooses_per_tensor():
    torch.manual_seed(0)
    auto, signed, unsigned = MinMaxQuant(3, grid="auto"), MinMaxQuant(3), MinMaxQuant(3, grid="unsigned")
    positive = torch.rand(1000)
    mixed = torch.randn(1000)
    assert torch.equal(auto(positive), unsigned(positive))
    assert torch.equal(auto.quantize(positive), unsigned.quantize(positive))
    assert torch.equal(auto(mixed), signed(mixed))
    assert torch.equal(auto.quantize(mixed), signed.quantize(mixed))
    assert auto(torch.zeros(4)).tolist() == [0.0] * 4 and torch.isfinite(auto.scale_factor)


def test_auto_grid_needs_no_values_on_the_host():
    q = MinMaxQuant(4, grid="auto")
    x = torch.randn(16, device="meta", requires_grad=True)
    q(x).sum().backward()
    q.quantize(x.detach())


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match=r"`grid` must be one of signed, unsigned, auto, got 'positive'"):
        MinMaxQuant(4, grid="positive")


# ----------------------------------------------------------- gradient through the range
def _range_gradient_reference(x, bits, grid):
    """Plain torch autograd, the range left attached: x_fake = STE(round(x L / m)) m / L."""
    top = 2 ** (bits - 1) - 1
    if grid == "unsigned":
        top, m = 2**bits - 1, x.amax().clamp_min(0)
    else:
        m = x.abs().amax()
        if grid == "auto" and bool(x.detach().amin() >= 0):
            top = 2**bits - 1
    u = x * top / m
    r = u + (u.round() - u).detach()
    return (r.clamp(0, top) if grid == "unsigned" else r) * m / top


@pytest.mark.parametrize("grid", ["signed", "unsigned", "auto"])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_range_gradient_equals_autograd_through_the_abs_max(grid, bits):
    torch.manual_seed(bits)
    for x in (torch.randn(300, dtype=torch.float64), torch.rand(300, dtype=torch.float64)):
        x = x.requires_grad_()
        upstream = torch.randn(300, dtype=torch.float64)
        q = MinMaxQuant(bits, grid=grid, range_gradient=True)
        y = q(x)
        assert torch.equal(y, MinMaxQuant(bits, grid=grid)(x))  # same values as the seed's quantizer
        (grad,) = torch.autograd.grad(y, x, upstream)
        (expected,) = torch.autograd.grad(_range_gradient_reference(x, bits, grid), x, upstream)
        assert torch.allclose(grad, expected, atol=1e-12)
        # only the extreme element gets more than the straight-through gradient
        (plain,) = torch.autograd.grad(MinMaxQuant(bits, grid=grid)(x), x, upstream)
        assert int((grad != plain).sum()) == 1


def test_range_gradient_per_channel_goes_to_each_channels_extreme():
    torch.manual_seed(0)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    y = MinMaxQuant(3, axis=0, range_gradient=True)(x)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(x))
    changed = grad != 1.0
    assert changed.sum(dim=1).tolist() == [1, 1, 1, 1]
    assert torch.equal(changed.nonzero()[:, 1], x.detach().abs().argmax(dim=1))


@pytest.mark.parametrize("bad", [[1.0, -1.0], [float("nan"), 1.0], [0.0, float("inf")], [1.0]])
def test_a_frozen_range_must_be_finite_and_ordered(bad):
    with pytest.raises(ValueError, match=r"`value_range` must hold two finite floats \[low, high\] with low <= high"):
        MinMaxQuant(4).freeze_range(torch.tensor(bad))


def test_an_axis_that_covers_every_dimension_gives_one_scale_per_element():
    """amin/amax over an empty list of dimensions reduce them all; the scale must not."""
    x = torch.tensor([0.3, -2.0, 5.0, 0.0])
    q = MinMaxQuant(3, axis=0)
    assert torch.equal(q(x), x)  # each element is its own extreme: exactly representable
    assert q.scale.tolist() == pytest.approx([0.1, 2 / 3, 5 / 3, 1.0])  # a zero slice gets scale 1
    batched = torch.func.vmap(q)(torch.stack([x, 2 * x]))
    assert torch.equal(batched, torch.stack([x, 2 * x]))


@pytest.mark.parametrize("shape, axis", [((0,), None), ((2, 0), 0), ((0, 3), "token")])
def test_range_gradient_of_an_empty_tensor_is_empty(shape, axis):
    x = torch.empty(shape, requires_grad=True)
    MinMaxQuant(8, axis=axis, range_gradient=True)(x).sum().backward()
    assert x.grad.shape == x.shape


def test_no_range_term_where_the_step_was_raised_to_the_smallest_normal_number():
    """max|x| / 127 below float32's smallest normal: the step is clamped, a constant; only
    the straight-through gradient is left (autograd through clamp_min gives the same)."""
    x = torch.tensor([1e-36, 0.37e-36], requires_grad=True)
    MinMaxQuant(8, range_gradient=True)(x).backward(torch.ones(2))
    assert x.grad.tolist() == [1.0, 1.0]


def test_range_gradient_double_backward_equals_the_plain_composition():
    """A gradient penalty through the quantizer: the second derivative of the straight-
    through composition with the range attached (``x_fake = round_ste(x / s) * s``,
    ``s = max|x| / 7``), where only the upstream gradient depends on x."""
    def composition(x):
        step = x.abs().amax() / 7
        u = x / step
        return (u + (torch.round(u) - u).detach()) * step

    torch.manual_seed(0)
    x = torch.randn(20, dtype=torch.float64)
    results = []
    for f in (MinMaxQuant(4, range_gradient=True), composition):
        leaf = x.clone().requires_grad_()
        (first,) = torch.autograd.grad(f(leaf).pow(2).sum(), leaf, create_graph=True)
        (second,) = torch.autograd.grad(first.pow(2).sum(), leaf)
        results.append((first.detach(), second))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-12)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-10)


def test_range_gradient_under_torch_func_and_double_backward_matches_autograd():
    """A backward that records a graph (torch.func.grad, create_graph=True) runs the
    differentiable reference; the plain backward runs the op: the same gradient."""
    torch.manual_seed(0)
    x = torch.randn(5, 40, dtype=torch.float64)
    upstream = torch.randn(5, 40, dtype=torch.float64)
    for axis in (None, 0, "token"):
        q = MinMaxQuant(3, axis=axis, range_gradient=True)
        leaf = x.clone().requires_grad_()
        (plain,) = torch.autograd.grad((q(leaf) * upstream).sum(), leaf)
        functional = torch.func.grad(lambda t: (q(t) * upstream).sum())(x)
        assert torch.allclose(plain, functional, atol=1e-12), axis
        (recorded,) = torch.autograd.grad((q(leaf) * upstream).sum(), leaf, create_graph=True)
        assert torch.allclose(plain, recorded.detach(), atol=1e-12), axis
        assert not recorded.requires_grad  # piecewise linear in x: no second derivative through x
        per_sample = torch.func.vmap(torch.func.grad(lambda t: (q(t) * upstream[0]).sum()))(x)
        for row in range(5):
            single = x[row].clone().requires_grad_()
            (expected,) = torch.autograd.grad((q(single) * upstream[0]).sum(), single)
            assert torch.allclose(per_sample[row], expected, atol=1e-12), (axis, row)


# ------------------------------------------------------------- running ranges in eval
def test_running_eval_range_averages_training_ranges_and_clips_in_eval():
    q = MinMaxQuant(4, eval_range="running", momentum=0.5)
    assert q.running_range is None
    q.train()
    q(torch.tensor([-1.0, 2.0]))
    q(torch.tensor([-3.0, 4.0]))
    assert q.running_range.tolist() == [-2.0, 3.0]  # (-1 + -3) / 2, (2 + 4) / 2
    q.eval()
    x = torch.tensor([-5.0, 0.4, 3.0])
    y = q(x)
    assert y.tolist() == pytest.approx([-3.0, 3 / 7, 3.0])  # clipped to the running range 3
    assert q.scale_factor.item() == pytest.approx(7 / 3)
    assert "running_range" not in q.state_dict()  # outside the state dict
    with pytest.raises(ValueError, match="`eval_range` must be one of batch, running, got 'ema'"):
        MinMaxQuant(4, eval_range="ema")
    with pytest.raises(ValueError, match=r"`momentum` must be a number in \(0, 1\], got 0"):
        MinMaxQuant(4, eval_range="running", momentum=0)


def test_per_token_scales_are_one_per_row_of_the_last_dimension():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8) * torch.linspace(0.1, 10, 5).reshape(1, 5, 1)  # rows of very different ranges
    q = MinMaxQuant(4, axis="token")
    y = q(x)
    rows = torch.stack([torch.stack([MinMaxQuant(4)(x[b, t]) for t in range(5)]) for b in range(2)])
    assert torch.equal(y, rows)
    assert q.scale_factor.shape == (10,)
    with pytest.raises(TypeError, match="`axis` must be None \\(per tensor\\), an int dimension or 'token'"):
        MinMaxQuant(4, axis="row")
