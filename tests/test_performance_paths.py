"""The memory-saving path (recompute the grid values in backward instead of keeping them)
gives the numbers of the plain path, and the benchmark runs. Speed itself is measured by
`python -m experiments.benchmark`, never asserted here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta

ROOT = Path(__file__).resolve().parents[1]


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


def _saved_activations(recompute_inputs: bool) -> list[torch.Tensor]:
    """The input-sized tensors a quantized conv saves for backward, and its input."""
    layer = nn.Conv2d(3, 8, 3)
    ta.attach(layer, 8, recompute_inputs=recompute_inputs)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    return [t for t in saved if t.shape == x.shape], x


def test_layer_saves_its_float_input_not_the_grid_values():
    saved, x = _saved_activations(recompute_inputs=True)  # the default
    assert len(saved) == 1 and saved[0] is x  # x itself: no extra activation until backward
    saved, x = _saved_activations(recompute_inputs=False)
    assert len(saved) == 1 and saved[0] is not x  # the grid values, kept until backward
    assert not torch.equal(saved[0], x)


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
    h.add_(1.0)  # the layer saved h itself (to recompute its grid values): autograd notices
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


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
