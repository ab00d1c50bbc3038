"""The custom ops: torch.library.opcheck, vmap rules, and the numerics of special tensors."""

import pytest
import torch
from torch.func import vmap

import torchapprox as ta
from torchapprox.quantizers import reference
from torchapprox.quantizers.ops import FakeQuantize, apply

OPS = torch.ops.torchapprox


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, requires_grad=True)
    return [
        (x, 4, "signed", []),
        (x, 3, "unsigned", []),
        (x, 8, "auto", []),
        (x.detach().abs().requires_grad_(), 2, "auto", []),
        (x, 4, "signed", [0]),
        (x, 5, "auto", [1]),
        (x.detach().double().requires_grad_(), 16, "signed", [2]),
        (x.detach().half(), 6, "signed", []),
        (torch.randn(3, 4, 5).transpose(0, 2).requires_grad_(), 4, "signed", []),  # strided
    ]


@pytest.mark.parametrize("args", _inputs())
def test_opcheck_fake_quantize_and_minmax_scale(args):
    torch.library.opcheck(OPS.fake_quantize.default, args)
    torch.library.opcheck(OPS.minmax_scale.default, args)


@pytest.mark.parametrize("args", _inputs())
def test_opcheck_round_to_grid(args):
    x, bitwidth, grid, axes = args
    scale = OPS.minmax_scale(x.detach(), bitwidth, grid, axes)
    torch.library.opcheck(OPS.round_to_grid.default, (x, scale, *reference.grid_bounds(bitwidth, grid)))


@pytest.mark.parametrize("args", _inputs())
def test_opcheck_range_gradient_backward(args):
    x, bitwidth, grid, axes = args
    x = x.detach()
    scale = OPS.minmax_scale(x, bitwidth, grid, axes)
    torch.library.opcheck(OPS.range_gradient_backward.default, (torch.randn_like(x), x, scale, bitwidth, grid, axes))


@pytest.mark.parametrize("grid", ["signed", "unsigned", "auto"])
def test_gradient_is_torchs_fake_quantize_gradient(grid):
    """The straight-through rule of torch.fake_quantize_per_tensor_affine: the gradient
    passes where the value is not clipped."""
    torch.manual_seed(0)
    x = (torch.randn(200) * 2).requires_grad_()
    x_fake, scale = OPS.fake_quantize(x, 3, grid, [])
    upstream = torch.randn(200)
    (grad,) = torch.autograd.grad(x_fake, x, upstream)
    qmin, qmax = reference.grid_bounds(3, grid)
    oracle_x = x.detach().clone().requires_grad_()
    quant_min, quant_max = (0, 7) if grid == "unsigned" else (-3, 3)
    oracle = torch.fake_quantize_per_tensor_affine(oracle_x, float(scale), 0, quant_min, quant_max)
    oracle.backward(upstream)
    assert torch.equal(grad, oracle_x.grad)
    assert not scale.requires_grad


@pytest.mark.parametrize("axes", [[], [1]])
@pytest.mark.parametrize("grid", ["signed", "auto", "unsigned"])
def test_vmap_equals_a_loop_over_the_batch(axes, grid):
    torch.manual_seed(0)
    x = torch.randn(5, 4, 3)
    fake, scale = vmap(lambda t: OPS.fake_quantize(t, 4, grid, axes))(x)
    for i in range(5):
        expected_fake, expected_scale = OPS.fake_quantize(x[i], 4, grid, axes)
        assert torch.equal(fake[i], expected_fake) and torch.equal(scale[i], expected_scale)
    scales = vmap(lambda t: OPS.minmax_scale(t, 4, grid, axes), in_dims=1)(x)
    assert torch.equal(scales[2], OPS.minmax_scale(x[:, 2], 4, grid, axes))
    rounded = vmap(lambda t, s: OPS.round_to_grid(t, s, -7, 7), in_dims=(0, 0))(x, scale)
    assert torch.equal(rounded, torch.stack([OPS.round_to_grid(x[i], scale[i], -7, 7) for i in range(5)]))
    fixed = vmap(lambda s: OPS.round_to_grid(x[0], s, -7, 7))(scale)  # only the scale batched
    assert torch.equal(fixed[3], OPS.round_to_grid(x[0], scale[3], -7, 7))


# ------------------------------------------------------------------ numerics of odd tensors
def _every_path(x: torch.Tensor, grid: str = "signed"):
    """(x_fake, scale) from each way a tensor gets quantized."""
    q = ta.MinMaxQuant(8, grid=grid)
    fake = q(x)
    yield fake, q.scale_factor
    yield q.quantize(x) / q.scale_factor, q.scale_factor
    x_fake, qp = q.fake_quantize(x)  # the contract: (values, quantization parameters)
    yield x_fake, 1 / qp.scale
    yield reference.fake_quantize(x, 8, grid, [])  # the plain ops every other device runs
    yield OPS.fake_quantize(x, 8, grid, [])
    layer = torch.nn.Linear(x.shape[-1], 2, dtype=x.dtype)
    ta.attach(layer, 8, weights=False, activation_grid=grid)
    with ta.collect_statistics(layer) as collector:
        layer(x)
    stats = collector.results()[""]["input"]
    yield torch.full_like(x, stats["mse"].item()), stats["scale_factor"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_tiny_nonzero_range_gives_zeros_and_a_finite_scale(dtype):
    tiny = 1e-38 if dtype in (torch.float32, torch.float64) else 1e-30
    x = torch.tensor([tiny, -tiny / 3, 0.0], dtype=dtype)
    if dtype in (torch.float16, torch.bfloat16):
        x = torch.tensor([1e-7, -3e-8, 0.0], dtype=dtype)  # below float16's range: quantized in float32
    for grid in ("signed", "unsigned", "auto"):
        for fake, scale in _every_path(x.float() if dtype in (torch.float16, torch.bfloat16) else x, grid):
            assert torch.isfinite(scale).all() and torch.isfinite(fake).all(), grid


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("grid", ["signed", "unsigned", "auto"])
def test_nan_or_inf_anywhere_gives_all_nan_and_a_nan_scale(bad, grid):
    x = torch.tensor([0.3, -2.7, bad, 1.0])
    for fake, scale in _every_path(x, grid):
        assert scale.isnan().all() and fake.isnan().all(), (grid, fake, scale)
    per_channel = ta.MinMaxQuant(4, axis=0)
    fake = per_channel(torch.stack([x, torch.ones(4)]))
    assert fake.isnan().all() and per_channel.scale_factor.isnan().all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_tensors_are_a_type_error_naming_the_dtype(dtype):
    x = torch.ones(4, dtype=dtype)
    q = ta.MinMaxQuant(8)
    for call in (q, q.quantize, q.fake_quantize, q.compute_scale):
        with pytest.raises(TypeError, match=rf"must be a floating-point tensor.*got dtype {dtype}"):
            call(x)
    layer = torch.nn.Linear(4, 2)
    ta.attach(layer, 8)
    with pytest.raises(TypeError, match=rf"got dtype {dtype}"):
        layer(x)


def test_the_seeds_quant_node_takes_int_max_as_an_int_or_a_tensor():
    torch.manual_seed(0)
    x = torch.randn(50, requires_grad=True)
    minmax = x.detach().abs().max()
    as_int = ta.MinMaxQuant.Quant.apply(x, minmax, 127)
    as_tensor = ta.MinMaxQuant.Quant.apply(x, minmax, torch.tensor(127.0))
    assert torch.equal(as_int, as_tensor)
    assert torch.equal(as_int, torch.round(x.detach() * (127 / minmax)))
    as_tensor.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 127 / minmax.item()))


def test_fake_quantize_function_runs_under_torch_func():
    x = torch.randn(4, 3)
    grads = vmap(torch.func.grad(lambda t: apply(FakeQuantize, t, 4, "unsigned", [])[0].sum()))(x)
    assert torch.equal(grads, (torch.round(x / OPS.minmax_scale(x, 4, "unsigned", [0])) >= 0).float())
