"""Attached models stay correct in the setups people run: every way of changing a weight,
threads, saved-tensor hooks and checkpointing, export and tracing, parametrizations.

The oracle throughout is the same computation written with explicit fake-quantized
operands (``F.linear(fq(x), fq(w), b)``), ``fq`` being MinMaxQuant (itself checked against
ATen's fake_quantize_per_tensor_affine in test_quantizers.py).
"""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import torchapprox as ta


def fq(t, bitwidth=4):
    return ta.MinMaxQuant(bitwidth)(t)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def oracle_mlp(model, x, bitwidth=4):
    h = x
    for index in (0, 2, 4):
        h = F.linear(fq(h, bitwidth), fq(model[index].weight, bitwidth), model[index].bias)
        if index < 4:
            h = torch.tanh(h)
    return h


def regression_data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=generator)
    return x, (x[:, :1] * 2 - x[:, 1:2]).sin()


OPTIMIZERS = [
    (torch.optim.Adam, {"lr": 0.01}), (torch.optim.AdamW, {"lr": 0.01}), (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
]


@pytest.mark.parametrize("implementation", ["default", "foreach", "fused"])
@pytest.mark.parametrize("optimizer_cls, kwargs", OPTIMIZERS)
def test_every_optimizer_step_is_seen_by_the_next_forward(optimizer_cls, kwargs, implementation):
    """Fused optimizers do not bump a weight's version counter: nothing may depend on it."""
    model = mlp()
    extra = {} if implementation == "default" else {implementation: True}
    optimizer = optimizer_cls(model.parameters(), **kwargs, **extra)
    ta.attach(model, 4)
    x, y = regression_data()
    losses = []
    for _ in range(15):
        prediction = model(x)
        assert torch.allclose(prediction, oracle_mlp(model, x), atol=1e-6)  # today's weights, not step 0's
        loss = F.mse_loss(prediction, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # and it trains


def _assert_forward_uses_current_weights(model, x):
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), oracle_mlp(model, x), atol=1e-6)


@pytest.mark.parametrize("change", ["data", "copy_", "load_state_dict", "ema", "mul_ under no_grad"])
def test_every_other_way_of_changing_a_weight_is_seen_too(change):
    model, other = mlp(0), mlp(1)
    ta.attach(model, 4)
    x, _ = regression_data()
    _assert_forward_uses_current_weights(model, x)  # a first evaluation, whatever it may keep
    if change == "data":
        model[0].weight.data = other[0].weight.data.clone()
    elif change == "copy_":
        model[0].weight.data.copy_(other[0].weight)
    elif change == "load_state_dict":
        model.load_state_dict(other.state_dict())
    elif change == "ema":
        with torch.no_grad():
            for p, q in zip(model.parameters(), other.parameters()):
                p.mul_(0.5).add_(q, alpha=0.5)
    else:
        with torch.no_grad():
            model[2].weight.mul_(-3.0)
    _assert_forward_uses_current_weights(model, x)


def test_freezing_and_unfreezing_keeps_the_weight_gradient():
    model = mlp()
    ta.attach(model, 4)
    x, y = regression_data()
    model[0].weight.requires_grad_(False)
    F.mse_loss(model(x), y).backward()
    assert model[0].weight.grad is None
    model[0].weight.requires_grad_(True)
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    leaf = fq(model[0].weight).detach().requires_grad_()
    h = torch.tanh(F.linear(fq(x), leaf, model[0].bias))
    h = torch.tanh(F.linear(fq(h), fq(model[2].weight), model[2].bias))
    F.mse_loss(F.linear(fq(h), fq(model[4].weight), model[4].bias), y).backward()
    assert torch.allclose(model[0].weight.grad, leaf.grad, atol=1e-6)


def test_threads_share_one_model_without_touching_its_state():
    model = mlp()
    ta.attach(model, 4, activation_grid="auto")
    model.eval()
    masters = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = {name: p for name, p in model.named_parameters()}
    inputs = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    failures = []

    def serve(thread):
        with torch.no_grad():
            for round_ in range(40):
                index = (thread + round_) % len(inputs)
                if not torch.equal(model(inputs[index]), expected[index]):
                    failures.append((thread, round_))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert dict(model.named_parameters()) == parameters  # the very same Parameter objects
    assert all(torch.equal(v, masters[k]) for k, v in model.state_dict().items())  # float masters, not grid values
    assert all(type(model[i]._parameters["weight"]) is nn.Parameter for i in (0, 2, 4))


def test_user_saved_tensor_hooks_see_every_tensor_saved_for_backward():
    def saved_by(model, x):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            model(x).sum().backward()
        return seen

    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    quantized = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    quantized.load_state_dict(float_model.state_dict())
    ta.attach(quantized, 8)
    x = torch.randn(32, 16, requires_grad=True)
    float_saved, quantized_saved = saved_by(float_model, x), saved_by(quantized, x)
    activations = lambda saved: sorted(tuple(t.shape) for t in saved if t.dim() and t.shape[0] == 32)  # noqa: E731
    assert activations(quantized_saved) == activations(float_saved)  # every activation the hooks see
    assert len(quantized_saved) >= len(float_saved)
    # and a real user hook (offloading to CPU) gives the same gradients as without it
    quantized.zero_grad()
    quantized(x).sum().backward()
    expected = [p.grad.clone() for p in quantized.parameters()]
    quantized.zero_grad()
    with torch.autograd.graph.save_on_cpu():
        quantized(x).sum().backward()
    assert all(torch.equal(p.grad, e) for p, e in zip(quantized.parameters(), expected))


CHECKPOINT_PROBE = r"""
import json, sys, torch, torchapprox as ta
from torch import nn
from torch.utils.checkpoint import checkpoint
variant, reentrant = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
blocks = nn.ModuleList(nn.Sequential(nn.Linear(512, 512), nn.Tanh()) for _ in range(8))
if variant != "float":
    ta.attach(blocks, 8, recompute_inputs=variant == "recompute")
x = torch.randn(4096, 512, requires_grad=True)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def stack(h):
    for block in blocks:
        h = block(h)
    return h
def forward(h):  # one checkpointed segment: only its input is kept, the rest recomputed
    return checkpoint(stack, h, use_reentrant=reentrant)
forward(x).sum().backward()  # warm up: kernels, allocator
x.grad = None
before = rss()
out = forward(x)
held = rss() - before
out.sum().backward()
print(json.dumps({"held_mib": held / 2**20}))
"""


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_keeps_its_saving(reentrant):
    def held(variant):
        # Large blocks go straight to mmap and back, so the resident set follows live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", CHECKPOINT_PROBE, variant, str(int(reentrant))],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])["held_mib"]

    float_mib, quantized_mib = held("float"), held("recompute")
    # the segment keeps its 8 MiB input and output; without checkpointing: ~130 MiB
    assert quantized_mib < 1.25 * float_mib + 4, (float_mib, quantized_mib)


def test_double_backward_equals_the_oracle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Conv1d(1, 2, 3))
    ta.attach(model[0], 4)
    ta.attach(model[2], 4, activation_grid="unsigned")
    x = torch.randn(3, 5, requires_grad=True)

    def penalty(forward):
        x.grad = None
        out = forward(x)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        return x.grad.clone(), [p.grad.clone() for p in model.parameters()]

    def oracle(t):
        h = torch.tanh(F.linear(fq(t), fq(model[0].weight), model[0].bias)).unsqueeze(1)
        return F.conv1d(ta.MinMaxQuant(4, grid="unsigned")(h), fq(model[2].weight), model[2].bias)

    actual = penalty(lambda t: model[2](model[1](model[0](t)).unsqueeze(1)))
    model.zero_grad()
    expected = penalty(oracle)
    assert torch.allclose(actual[0], expected[0], atol=1e-5)
    for a, e in zip(actual[1], expected[1]):
        assert torch.allclose(a, e, atol=1e-5)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("bitwidth, grid", [(2, "signed"), (4, "auto"), (8, "unsigned"), (16, "signed")])
@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_computes_the_eager_numbers(bitwidth, grid, strict):
    torch.manual_seed(0)
    model = ConvNet()
    ta.attach(model, bitwidth, activation_grid=grid)
    x = torch.randn(2, 3, 6, 6)
    eager = model(x)
    program = torch.export.export(model, (x,), strict=strict)
    assert torch.equal(program.module()(x), eager)
    other = torch.randn(2, 3, 6, 6) * 5
    assert torch.equal(program.module()(other), model(other))  # the scale is computed, not a constant
    ops = {str(node.target) for graph_module in program.graph_module.modules() if hasattr(graph_module, "graph")
           for node in graph_module.graph.nodes if node.op == "call_function"}
    assert any("torchapprox" in op for op in ops)  # the quantizers are in the program


def test_jit_trace_passes_its_own_check_and_computes_the_eager_numbers():
    torch.manual_seed(0)
    model = ConvNet()
    ta.attach(model, 4)
    x = torch.randn(2, 3, 6, 6)
    traced = torch.jit.trace(model, (x,))  # check_trace=True compares a second run
    other = torch.randn(2, 3, 6, 6)
    assert torch.equal(traced(other), model(other))


def test_torch_compile_is_close_to_eager():
    # Compiled kernels may round the float arithmetic around the quantizers differently,
    # so outputs agree up to float rounding, not bit for bit.
    torch.manual_seed(0)
    model = ConvNet()
    ta.attach(model, 8, activation_grid="auto")
    x = torch.randn(2, 3, 6, 6)
    eager = model(x)
    compiled = torch.compile(model)(x)
    assert torch.allclose(compiled, eager, atol=1e-4)
    compiled.sum().backward()
    assert model.conv.weight.grad is not None


class Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "custom"])
def test_parametrized_weights_are_quantized_on_their_effective_value(kind):
    torch.manual_seed(0)
    layer = nn.Linear(6, 6)
    if kind == "weight_norm":
        parametrizations.weight_norm(layer)
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(layer)
        layer.eval()  # no power iteration: the effective weight is the same on every read
    else:
        parametrize.register_parametrization(layer, "weight", Symmetric())
    keys = list(layer.state_dict())
    assert ta.attach(layer, 4) == [""]
    assert list(layer.state_dict()) == keys
    x = torch.randn(5, 6)
    out = layer(x)
    with torch.no_grad():
        effective = layer.weight.clone()
    assert torch.allclose(out, F.linear(fq(x), fq(effective), layer.bias), atol=1e-6)
    out.square().sum().backward()
    originals = list(layer.parametrizations.weight.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in originals)
    reference_grads = torch.autograd.grad(
        F.linear(fq(x), fq(layer.weight), layer.bias).square().sum(), originals)
    for p, expected in zip(originals, reference_grads):
        assert torch.allclose(p.grad, expected, atol=1e-5)
