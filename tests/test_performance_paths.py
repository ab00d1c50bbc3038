"""The fast paths (compiled kernel, recompute instead of save, weight cache) give exactly the
numbers of the plain path, and the benchmark runs. Speed itself is measured by
`python -m experiments.benchmark`, never asserted here."""

import gc
import json
import os
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta
from torchapprox.quantizers import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_kernel_equals_eager_ops_bit_for_bit():
    torch.manual_seed(0)
    x = torch.randn(kernels.COMPILE_MIN_ELEMENTS + 17) * 5
    for bitwidth in (2, 4, 8, 16):
        scale = (2 ** (bitwidth - 1) - 1) / x.abs().max()
        assert torch.equal(kernels.round_to_grid_compiled(x, scale), kernels.round_to_grid_eager(x, scale))
    q = ta.MinMaxQuant(8)
    large = x.reshape(-1, 1).expand(-1, 2).contiguous()  # 2-D: the flat compiled kernel serves any shape
    assert torch.equal(q(large), q.quantize(large) / q.scale_factor)


def test_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(x, scale):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "_compiled", broken)
    monkeypatch.setattr(kernels, "_compile_disabled", False)
    x = torch.randn(kernels.COMPILE_MIN_ELEMENTS)
    scale = torch.tensor(3.0)
    with pytest.warns(RuntimeWarning, match="torch.compile of the fake-quantization kernel failed.*no C\\+\\+ compiler"):
        y = kernels.round_to_grid_compiled(x, scale)
    assert torch.equal(y, kernels.round_to_grid_eager(x, scale))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: compilation stays off
        kernels.round_to_grid_compiled(x, scale)


def test_environment_variable_turns_compilation_off():
    code = ("import torch; from torchapprox.quantizers import kernels; "
            "print(kernels._compile_disabled, kernels.fused_cpu_ops(torch.ones(3)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "TORCHAPPROX_COMPILE": "0"})
    assert result.stdout.strip() == "True None"
    assert "building" not in result.stderr


def conv_block():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_recomputed_grid_values_give_the_reference_gradients():
    model = conv_block()
    ta.attach(model, 4)
    x = torch.randn(5, 3, 6, 6)
    model(x).square().sum().backward()
    fq = lambda t: ta.MinMaxQuant(4)(t)  # noqa: E731
    leaves = [fq(model[i].weight).detach().requires_grad_() for i in (0, 3, 5)]
    h = F.relu(model[1](F.conv2d(fq(x), leaves[0], model[0].bias, padding=1)))
    h = F.conv2d(fq(h), leaves[1], model[3].bias, padding=1).flatten(1)
    F.linear(fq(h), leaves[2], model[5].bias).square().sum().backward()
    for i, leaf in zip((0, 3, 5), leaves):
        assert torch.allclose(model[i].weight.grad, leaf.grad, rtol=1e-5, atol=1e-6)


def _grid_values_alive_after_forward(recompute_inputs: bool) -> bool:
    layer = nn.Conv2d(3, 8, 3)
    ta.attach(layer, 8, recompute_inputs=recompute_inputs)
    captured = {}
    layer.input_quantizer.register_forward_hook(lambda m, args, out: captured.update(ref=weakref.ref(out)))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = layer(x)  # the graph (and whatever it saved) lives as long as `out`
    gc.collect()
    alive = captured["ref"]() is not None
    out.sum().backward()
    return alive


def test_layer_saves_its_float_input_not_the_grid_values():
    assert not _grid_values_alive_after_forward(recompute_inputs=True)  # the default
    assert _grid_values_alive_after_forward(recompute_inputs=False)  # kept: the conv saved them


def test_both_input_modes_give_identical_training():
    def train(recompute_inputs):
        model = conv_block()
        ta.attach(model, 4, recompute_inputs=recompute_inputs)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 1, 0, 1])
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    for recomputed, kept in zip(train(True), train(False)):
        assert torch.equal(recomputed, kept)


def test_input_modified_in_place_after_use_is_a_clear_error():
    layer = nn.Linear(4, 3)
    ta.attach(layer, 8)
    x = torch.randn(2, 4).relu()
    x.requires_grad_()
    h = x * 1.0
    out = layer(h)
    h.add_(1.0)  # autograd would not notice: the layer saved h's grid values, not h
    with pytest.raises(RuntimeError, match="modified in place after the layer used it"):
        out.sum().backward()


def test_weight_value_is_cached_until_the_weight_changes():
    layer = nn.Linear(8, 4)
    ta.attach(layer, 4, activations=False)
    x = torch.randn(3, 8)
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        cached = layer.weight_quantizer._weight_cache[1]
        second = layer(x)
        assert layer.weight_quantizer._weight_cache[1] is cached and torch.equal(first, second)
        layer.weight.mul_(2.0)  # an in-place update: a new version
        third = layer(x)
    assert layer.weight_quantizer._weight_cache[1] is not cached
    assert torch.equal(third, F.linear(x, ta.MinMaxQuant(4)(layer.weight), layer.bias))


def test_cached_weight_gives_correct_gradients_across_steps_and_shared_use():
    layer = nn.Linear(6, 6)
    ta.attach(layer, 4, activations=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 6)
    for _ in range(3):
        optimizer.zero_grad()
        layer(layer(x)).sum().backward()  # the layer read twice in one step
        w = ta.MinMaxQuant(4)(layer.weight).detach().requires_grad_()
        F.linear(F.linear(x, w, layer.bias), w, layer.bias).sum().backward()
        assert torch.allclose(layer.weight.grad, w.grad, atol=1e-6)
        optimizer.step()


def test_benchmark_runs_in_its_quick_configuration(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--quick", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training step" in result.stdout and "Quantizer alone" in result.stdout
    data = json.loads(out.read_text())
    variants = {row["variant"] for row in data["training"]}
    assert {"fp32", "fp32 again", "torchapprox", "torchapprox, keep inputs"} <= variants
    assert all(row["ratio_to_fp32"] > 0 and row["step_ms"] > 0 for row in data["training"])
    fp32 = [row for row in data["training"] if row["variant"] == "fp32"]
    assert all(row["ratio_to_fp32"] == 1.0 for row in fp32)
    assert {row["elements"] for row in data["quantizer"]} == {4096, 65536}
    assert {row["variant"] for row in data["quantizer"]} >= {"clone", "torchapprox", "plain ops", "aten fused"}
    if data["memory"]:
        assert {row["variant"] for row in data["memory"]} >= {"fp32", "torchapprox", "torchapprox, keep inputs"}
        assert all(row["peak_growth_mb"] >= 0 for row in data["memory"])
