"""The C++ CPU kernels give the values of the torch-ops reference, and the build never blocks.

The oracle tests in test_quantizers.py run on whichever path a CPU tensor takes (the C++
one on this machine); here the C++ kernels are compared with the reference (plain torch
ops, what every other device runs) value for value, so each is as good as the oracle
says the other is.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import torchapprox as ta
from torchapprox.quantizers import cpu_extension, reference

# Sizes around the vector width and the parallel grain (32768): tails and chunk edges.
SIZES = [1, 7, 8, 9, 1000, 32768, 32769, 100003, (1 << 20) + 3]
OPS = torch.ops.torchapprox


def test_kernels_are_built_and_serve_cpu_calls():
    assert cpu_extension.kernels_loaded(), "the C++ kernels did not build (is g++ installed?)"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN (a NaN is not equal to itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES)
def test_kernels_equal_the_reference(dtype, size):
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(size, generator=generator, dtype=dtype) * 3
    for bitwidth in (2, 3, 4, 8, 16, 24, 32):
        for grid, tensor in (("signed", x), ("auto", x), ("auto", x.abs()), ("unsigned", x)):
            x_fake, scale = OPS.fake_quantize(tensor, bitwidth, grid, [])
            ref_fake, ref_scale = reference.fake_quantize(tensor, bitwidth, grid, [])
            assert _same(scale, ref_scale), (bitwidth, grid)
            assert _same(x_fake, ref_fake), (bitwidth, grid, (x_fake - ref_fake).abs().max())
            assert _same(OPS.minmax_scale(tensor, bitwidth, grid, []), ref_scale)
            assert _same(OPS.round_to_grid(tensor, scale, *reference.grid_bounds(bitwidth, grid)), ref_fake)


@pytest.mark.parametrize("values", [
    [0.0, 0.0, 0.0],                      # all zero: scale 1
    [1.0, float("nan"), -2.0],            # NaN: NaN scale, all NaN
    [1.0, float("inf"), -2.0],            # inf: NaN scale, all NaN
    [1.0, float("-inf"), 2.0],            # -inf too, on every grid
    [1e-40, -3e-39, 0.0],                 # subnormal range: int_max / minmax overflows -> scale 1
    [-0.0, 0.0, 5.0],                     # a negative zero is not below zero for "auto"
    [2.5, 0.5, -1.5, 3.5],                # exact ties at 7 bits: half to even
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_special_values_equal_the_reference(values, dtype):
    x = torch.tensor(values, dtype=dtype)
    for bitwidth, grid in ((8, "signed"), (8, "auto"), (7, "signed"), (3, "auto"), (4, "unsigned")):
        x_fake, scale = OPS.fake_quantize(x, bitwidth, grid, [])
        ref_fake, ref_scale = reference.fake_quantize(x, bitwidth, grid, [])
        assert _same(scale, ref_scale) and _same(x_fake, ref_fake), (values, bitwidth, grid)


@pytest.mark.parametrize("axis", [0, 1, 3])
def test_per_channel_and_strided_inputs_equal_the_reference(axis):
    torch.manual_seed(0)
    channels_last = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    sliced = torch.randn(4, 8, 6, 18)[..., ::3]  # not dense: the reference ATen ops run
    for x in (channels_last, sliced):
        for grid in ("signed", "auto", "unsigned"):
            for axes in ([], [axis]):
                x_fake, scale = OPS.fake_quantize(x, 4, grid, axes)
                ref_fake, ref_scale = reference.fake_quantize(x, 4, grid, axes)
                assert _same(scale, ref_scale) and _same(x_fake, ref_fake), (grid, axes)
    fake, _ = OPS.fake_quantize(channels_last, 5, "signed", [])
    assert fake.is_contiguous(memory_format=torch.channels_last)  # a dense layout is kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, axes", [
    ((16, 3, 3, 3), [0]), ((8, 40000), [0]), ((3, 100003), [0]),  # per output channel: rows around the grain
    ((32, 16, 64), [0, 1]), ((2, 3, 1), [0, 1]), ((5, 7), [0]),   # per token
])
def test_per_row_kernels_equal_the_reference(dtype, shape, axes):
    """Contiguous tensors with a scale per index of the leading dimensions take the row loops."""
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator, dtype=dtype) * 3
    x.view(-1, shape[-1])[1] = 0.0  # an all-zero row: scale 1
    for bitwidth in (2, 4, 8, 16):
        for grid, tensor in (("signed", x), ("auto", x), ("auto", x.abs()), ("unsigned", x)):
            x_fake, scale = OPS.fake_quantize(tensor, bitwidth, grid, axes)
            ref_fake, ref_scale = reference.fake_quantize(tensor, bitwidth, grid, axes)
            assert _same(scale, ref_scale) and _same(x_fake, ref_fake), (bitwidth, grid)
            assert _same(OPS.minmax_scale(tensor, bitwidth, grid, axes), ref_scale)
    for special in (float("nan"), float("inf")):  # one non-finite value: every scale NaN, as the reference
        y = x.clone()
        y.view(-1)[-1] = special
        x_fake, scale = OPS.fake_quantize(y, 4, "signed", axes)
        ref_fake, ref_scale = reference.fake_quantize(y, 4, "signed", axes)
        assert _same(scale, ref_scale) and _same(x_fake, ref_fake) and bool(scale.isnan().all())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the order of one sum (the kernel sums the range term in double), NaN
    where the other has NaN."""
    tolerance = 1e-5 if a.dtype == torch.float32 else 1e-12
    return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, rtol=tolerance, atol=tolerance,
                                                                        equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, axes", [
    ((1,), []), ((9,), []), ((100003,), []),        # one scale: lanes, tails
    ((32, 16, 64), [0, 1]),                         # per token
    ((16, 3, 3, 3), [0]),                           # per output channel
    ((7, 5), [1]), ((4, 6, 8), [0, 2]),             # not leading: the ATen reference runs
])
def test_range_gradient_kernel_equals_the_reference(dtype, shape, axes):
    generator = torch.Generator().manual_seed(len(shape))
    for make in (torch.randn, torch.rand):
        x = make(shape, generator=generator, dtype=dtype)
        integers = torch.randint(-3, 4, shape, generator=generator).to(dtype)  # many ties at the extreme
        grad = torch.randn(shape, generator=generator, dtype=dtype)
        for tensor in (x, integers, x.transpose(0, -1) if len(shape) > 1 else x):
            upstream = grad.reshape(tensor.shape) if tensor.is_contiguous() else grad.transpose(0, -1)
            for bitwidth in (2, 3, 8):
                for grid in ("signed", "unsigned", "auto"):
                    _, scale = OPS.fake_quantize(tensor, bitwidth, grid, axes)
                    got = OPS.range_gradient_backward(upstream, tensor, scale, bitwidth, grid, axes)
                    expected = reference.range_gradient_backward(upstream, tensor, scale, bitwidth, grid, axes)
                    assert _close(got, expected), (bitwidth, grid, (got - expected).abs().max())


@pytest.mark.parametrize("values", [
    [0.0, 0.0, 0.0], [1.0, float("nan"), -2.0], [1.0, float("inf"), -2.0], [1e-40, -3e-39, 0.0],
    [-0.0, 0.0, 5.0], [2.5, 0.5, -1.5, 3.5], [-3.0, 3.0, 1.0],
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_range_gradient_kernel_special_values_equal_the_reference(values, dtype):
    x = torch.tensor(values, dtype=dtype)
    grad = torch.linspace(-1, 1, len(values), dtype=dtype)
    for bitwidth, grid in ((8, "signed"), (3, "auto"), (4, "unsigned")):
        _, scale = OPS.fake_quantize(x, bitwidth, grid, [])
        got = OPS.range_gradient_backward(grad, x, scale, bitwidth, grid, [])
        assert _close(got, reference.range_gradient_backward(grad, x, scale, bitwidth, grid, [])), (values, grid)


def test_the_ops_reject_what_they_cannot_take():
    with pytest.raises(RuntimeError, match="expected a floating-point tensor, got Int"):
        OPS.fake_quantize(torch.ones(3, dtype=torch.int32), 8, "signed", [])
    with pytest.raises(RuntimeError, match="bitwidth must be in 2..32, got 40"):
        OPS.fake_quantize(torch.ones(3), 40, "signed", [])
    with pytest.raises(RuntimeError, match="grid must be one of signed, unsigned, auto, got 'both'"):
        OPS.minmax_scale(torch.ones(3), 8, "both", [])
    with pytest.raises(RuntimeError, match="axes must be sorted, distinct dimensions"):
        OPS.fake_quantize(torch.ones(3, 2), 8, "signed", [2])
    with pytest.raises(RuntimeError, match=r"grad must have x's shape \[3, 2\], got \[3\]"):
        OPS.range_gradient_backward(torch.ones(3), torch.ones(3, 2), torch.tensor(1.0), 8, "signed", [])


def test_without_the_kernels_the_values_are_the_same():
    code = ("import hashlib, torch, torchapprox as ta\n"
            "from torchapprox.quantizers import cpu_extension\n"
            "torch.manual_seed(0); x = torch.randn(40000) * 3\n"
            "y, s = torch.ops.torchapprox.fake_quantize(x, 4, 'auto', [])\n"
            "print(cpu_extension.kernels_loaded(), hashlib.sha256(y.numpy().tobytes()).hexdigest(), repr(s.item()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "TORCHAPPROX_COMPILE": "0"})
    torch.manual_seed(0)
    x = torch.randn(40000) * 3
    y, s = OPS.fake_quantize(x, 4, "auto", [])
    assert result.stdout.split() == ["False", hashlib.sha256(y.numpy().tobytes()).hexdigest(), repr(s.item())]
    assert "building" not in result.stderr


def test_a_failed_build_warns_once_and_uses_plain_ops(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text('#error "no usable compiler here"\n')
    monkeypatch.setattr(cpu_extension, "SOURCE", broken)
    monkeypatch.setattr(cpu_extension, "_state", "untried")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels could not be built or loaded.*plain torch ops"):
        assert not cpu_extension.kernels_loaded()
    assert not cpu_extension.kernels_loaded()  # no second attempt, no second warning
    assert not list((tmp_path / "build").glob("*.build-*"))  # the scratch folder is gone


def test_a_fresh_process_loads_the_built_kernels_quietly():
    code = "import torch, torchapprox as ta; print(ta.MinMaxQuant(4)(torch.tensor([-1.0, 0.2, 0.6])).tolist())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "TORCHAPPROX_COMPILE": "1"})
    assert result.stdout.strip() == str(torch.tensor([-1.0, 1 / 7, 4 / 7]).tolist())  # float32 values
    assert "building" not in result.stderr and "Warning" not in result.stderr


def test_build_key_covers_the_torch_installation(monkeypatch, tmp_path):
    key = cpu_extension.build_key()
    fake_torch = tmp_path / "other-env" / "torch" / "__init__.py"
    fake_torch.parent.mkdir(parents=True)
    monkeypatch.setattr(torch, "__file__", str(fake_torch))
    assert cpu_extension.build_key() != key  # same torch version, another installation


def _start_build(extensions_dir, **env):
    code = "import torch, torchapprox as ta; print(ta.MinMaxQuant(4)(torch.tensor([-1.0, 0.2, 0.6])).tolist())"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir), **env})


def test_a_killed_build_does_not_block_the_next_process(tmp_path):
    """A build killed midway (kill -9) leaves its lock file and scratch folder behind; the
    next process must still finish, within a bounded time, with the right values."""
    first = _start_build(tmp_path)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*.build-*/*")) and time.monotonic() < deadline:
        time.sleep(0.2)  # wait until the compiler is at work in its scratch folder
    assert first.poll() is None, first.communicate()
    time.sleep(2.0)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert list(tmp_path.glob("*.lock")) and list(tmp_path.glob("*.build-*"))  # what it left behind
    second = _start_build(tmp_path, TORCHAPPROX_BUILD_TIMEOUT="300")
    out, err = second.communicate(timeout=400)
    assert second.returncode == 0, err[-2000:]
    assert out.strip() == str(torch.tensor([-1.0, 1 / 7, 4 / 7]).tolist())
    assert "building the C++ CPU kernels" in err and "could not be built" not in err
    assert not list(tmp_path.glob("*.build-*"))  # the stale scratch folder was cleared


def test_a_process_that_waits_too_long_for_a_build_falls_back(tmp_path):
    import fcntl

    name = f"torchapprox_cpu_{cpu_extension.build_key()}"
    with open(tmp_path / f"{name}.lock", "a+") as held:  # a live builder holding the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        process = _start_build(tmp_path, TORCHAPPROX_BUILD_TIMEOUT="2")
        out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert out.strip() == str(torch.tensor([-1.0, 1 / 7, 4 / 7]).tolist())
    assert "could not be built or loaded (TimeoutError" in err and "TORCHAPPROX_BUILD_TIMEOUT" in err
    assert ta.MinMaxQuant(4)(torch.tensor([0.5])).item() == 0.5
