"""The fused C++ CPU kernels give the bits of the plain torch ops, and fail over cleanly.

The oracle tests in test_quantizers.py run on whichever path a CPU float tensor takes (the
fused one on this machine); here the fused path is compared with the plain ops bit for bit,
so each is as good as the oracle says the other is.
"""

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta
from torchapprox.quantizers import cpu_extension, kernels

# Sizes around the vector width and the parallel grain (32768): tails and chunk edges.
SIZES = [1, 7, 8, 9, 1000, 32768, 32769, 100003, (1 << 20) + 3]


def test_fused_kernels_are_built_and_used_on_cpu():
    assert kernels.fused_cpu_ops(torch.ones(3)) is not None, "the C++ kernels did not build (is g++ installed?)"
    assert kernels.fused_cpu_ops(torch.ones(3, dtype=torch.float16)) is None  # half: plain ops in float32
    assert kernels.fused_cpu_ops(torch.ones(3, device="meta")) is None


def _fused_and_plain(quantizer_factory, x, monkeypatch):
    fused = quantizer_factory()
    x_fused = fused(x)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "fused_ops", lambda: None)
        plain = quantizer_factory()
        x_plain = plain(x)
    return (x_fused, fused.scale_factor), (x_plain, plain.scale_factor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES)
def test_fused_equals_plain_ops_bit_for_bit(dtype, size, monkeypatch):
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(size, generator=generator, dtype=dtype) * 3
    for bitwidth in (2, 3, 4, 8, 16, 24, 32):
        for grid, tensor in (("signed", x), ("auto", x), ("auto", x.abs())):
            (fused, fused_scale), (plain, plain_scale) = _fused_and_plain(
                functools.partial(ta.MinMaxQuant, bitwidth, grid=grid), tensor, monkeypatch)
            assert fused.dtype == dtype and fused_scale.dtype == dtype
            assert torch.equal(fused_scale, plain_scale), (bitwidth, grid)
            assert torch.equal(fused, plain), (bitwidth, grid, (fused - plain).abs().max())


@pytest.mark.parametrize("values", [
    [0.0, 0.0, 0.0],                      # all zero: scale 1
    [1.0, float("nan"), -2.0],            # NaN: scale 1, NaN stays NaN
    [1.0, float("inf"), -2.0],            # inf: scale 0, everything NaN
    [1e-40, -3e-39, 0.0],                 # subnormal range: int_max / minmax overflows
    [-0.0, 0.0, 5.0],                     # a negative zero is not below zero for "auto"
    [2.5, 0.5, -1.5, 3.5],                # exact ties at 7 bits: half to even
])
def test_special_values_match_the_plain_ops(values, monkeypatch):
    x = torch.tensor(values)
    for bitwidth, grid in ((8, "signed"), (8, "auto"), (7, "signed"), (3, "auto")):
        (fused, fused_scale), (plain, plain_scale) = _fused_and_plain(
            functools.partial(ta.MinMaxQuant, bitwidth, grid=grid), x, monkeypatch)
        assert torch.equal(fused_scale, plain_scale) or (fused_scale.isnan() & plain_scale.isnan())
        assert torch.equal(fused.isnan(), plain.isnan())
        assert torch.equal(fused.nan_to_num(7.0), plain.nan_to_num(7.0))


def test_strided_inputs_keep_their_layout_and_values(monkeypatch):
    torch.manual_seed(0)
    channels_last = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    transposed = torch.randn(50, 40).t()  # non-contiguous but dense
    sliced = torch.randn(50, 40)[:, ::3]  # not dense: computed on a contiguous copy
    for x in (channels_last, transposed, sliced):
        (fused, _), (plain, _) = _fused_and_plain(lambda: ta.MinMaxQuant(5), x, monkeypatch)
        assert torch.equal(fused, plain)
        if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
            assert fused.is_contiguous(memory_format=torch.channels_last)


def test_gradient_is_identity_and_scale_is_not_differentiable():
    torch.manual_seed(0)
    x = torch.randn(40000, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(40000, dtype=torch.float64)
    q = ta.MinMaxQuant(4)
    y = q(x)
    assert y.grad_fn is not None and not q.scale_factor.requires_grad
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_training_a_conv_net_gives_the_plain_ops_numbers(monkeypatch):
    def train(steps=3):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 3))
        ta.attach(model, 4, activation_grid="auto")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    fused = train()
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "fused_ops", lambda: None)
        plain = train()
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


def test_round_to_grid_rejects_what_it_cannot_take():
    ops = kernels.fused_cpu_ops(torch.ones(1))
    with pytest.raises(RuntimeError, match="expected float32 or float64, got Int"):
        ops.round_to_grid(torch.ones(3, dtype=torch.int32), torch.tensor(1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="scale must be a 0-dim CPU tensor of x's dtype"):
        ops.round_to_grid(torch.ones(3), torch.ones(2))
    with pytest.raises(RuntimeError, match="bitwidth must be in 2..32, got 40"):
        ops.fake_quantize_minmax(torch.ones(3), 40, False)


def test_a_failed_build_warns_once_and_uses_plain_ops(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text('#error "no usable compiler here"\n')
    monkeypatch.setattr(cpu_extension, "SOURCE", broken)
    monkeypatch.setattr(cpu_extension, "_state", "untried")
    monkeypatch.setattr(cpu_extension, "_ops", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    x = torch.randn(100)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels could not be built or loaded.*plain torch ops"):
        y = ta.MinMaxQuant(8)(x)
    assert kernels.fused_cpu_ops(x) is None  # no second attempt, no second warning
    monkeypatch.setattr(kernels, "fused_ops", lambda: None)
    assert torch.equal(y, ta.MinMaxQuant(8)(x))


def test_a_fresh_process_loads_the_built_kernels_quietly():
    code = "import torch, torchapprox as ta; print(ta.MinMaxQuant(4)(torch.tensor([-1.0, 0.2, 0.5])).tolist())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "TORCHAPPROX_COMPILE": "1"})
    assert result.stdout.strip() == str(torch.tensor([-1.0, 1 / 7, 4 / 7]).tolist())  # float32 values
    assert "building" not in result.stderr and "Warning" not in result.stderr


def test_torch_compile_of_an_attached_model_gives_the_eager_numbers():
    # While dynamo traces, the plain ops run (the opaque C++ op is skipped), so the compiled
    # model must still equal the eager one, which runs the fused kernels, bit for bit.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ta.attach(model, 4, activation_grid="auto")
    x = torch.randn(5, 8)
    eager = model(x)
    compiled = torch.compile(model)(x)
    assert torch.equal(compiled, eager)
    compiled.sum().backward()
    assert model[0].weight.grad is not None
