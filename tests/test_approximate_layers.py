"""Layers whose integer products come from an approximate multiplier (issue 22): exact against
an elementwise table reference, the exact multiplier against the fake-quantized layer, the
operand order, gradients, errors, checkpoint state and export."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta
from torchapprox.multipliers import Multiplier, broken_array, drum, exact, mitchell

torch.manual_seed(0)


def random_table(input_signed=True, seed=0):
    """An asymmetric table with no structure: a swapped operand order cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randint(-20000, 20000, (256, 256), generator=generator, dtype=torch.int32)
    return Multiplier.from_table(table, input_signed=input_signed, name="random", check_layout=False)


def levels_and_scale(quantizer, t):
    fake, qp = quantizer.fake_quantize(t.detach())
    scale = qp.scale.detach().double()
    return torch.round(fake.double() / scale).to(torch.int64), scale


def table_sums(table, x_levels, w_levels, input_signed):
    """sum_k T[x[m, k], w[n, k]] by elementwise lookup: the reference (row = input, column = weight)."""
    rows = x_levels + (128 if input_signed else 0)
    cols = w_levels + 128
    return table.to(torch.int64)[rows[:, None, :], cols[None, :, :]].sum(-1)


def expected_linear(layer, x, multiplier):
    x_lv, s_x = levels_and_scale(layer.input_quantizer, x)
    w_lv, s_w = levels_and_scale(layer.weight_quantizer, layer.weight)
    signed = bool((x_lv < 0).any()) or layer.input_quantizer.grid == "signed"
    table = multiplier.for_input(signed).table
    flat = x_lv.reshape(-1, x_lv.shape[-1])
    sums = table_sums(table, flat, w_lv, signed).double()
    s_w = s_w.reshape(-1) if s_w.dim() else s_w
    s_x = s_x.reshape(-1, 1) if s_x.dim() else s_x
    out = sums * s_x * s_w + layer.bias.detach().double()
    return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("multiplier", [random_table(), broken_array(2, 3), mitchell(), drum(3)],
                         ids=["random", "bam", "mitchell", "drum"])
@pytest.mark.parametrize("weight, input", [
    ({}, {}),
    ({"granularity": "per_channel"}, {"grid": "auto"}),
    ({"bits": 4}, {"bits": 6, "granularity": "per_token"}),
])
def test_linear_equals_the_elementwise_table_reference(multiplier, weight, input):
    layer = nn.Linear(37, 11)
    x = torch.randn(3, 5, 37)
    if input.get("grid") == "auto":
        x = x.relu()  # the auto grid picks the unsigned domain: the table's other form
    if multiplier.name == "random" and input.get("grid") == "auto":
        # a table made for one domain takes an explicit grid (the auto grid is refused for it)
        input, multiplier = {**input, "grid": "unsigned"}, random_table(input_signed=False)
    ta.attach(layer, weight=weight, input=input, multiplier=multiplier)
    used = ta.assigned_multipliers(nn.Sequential(layer))["0"]
    out = layer(x)
    torch.testing.assert_close(out.double(), expected_linear(layer, x, used), rtol=1e-6, atol=1e-6)


def conv_reference(layer, x, multiplier):
    """Conv2d through unfold + elementwise lookups, per group."""
    x_lv, s_x = levels_and_scale(layer.input_quantizer, x)
    w_lv, s_w = levels_and_scale(layer.weight_quantizer, layer.weight)
    table = multiplier.table
    patches = F.unfold(x_lv.double(), layer.kernel_size, layer.dilation, layer.padding, layer.stride).to(torch.int64)
    batch, _, length = patches.shape
    groups, c_out = layer.groups, layer.out_channels
    per_group = patches.shape[1] // groups
    out = torch.empty(batch, c_out, length, dtype=torch.float64)
    w_flat = w_lv.reshape(c_out, -1)
    for g in range(groups):
        xs = patches[:, g * per_group:(g + 1) * per_group].transpose(1, 2).reshape(-1, per_group)
        ws = w_flat[g * (c_out // groups):(g + 1) * (c_out // groups)]
        sums = table_sums(table, xs, ws, True).double().reshape(batch, length, -1)
        out[:, g * (c_out // groups):(g + 1) * (c_out // groups)] = sums.transpose(1, 2)
    s_w = s_w.reshape(-1, 1) if s_w.dim() else s_w
    out = out * s_x * s_w + layer.bias.detach().double()[:, None]
    h = (x.shape[2] + 2 * layer.padding[0] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) // layer.stride[0] + 1
    return out.reshape(batch, c_out, h, -1)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, groups=2, dilation=(1, 2)),
    dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=2),  # depthwise
])
@pytest.mark.parametrize("per_channel", [False, True])
def test_conv2d_equals_the_elementwise_table_reference(kwargs, per_channel):
    layer = nn.Conv2d(**kwargs)
    multiplier = random_table(seed=1)
    ta.attach(layer, weight={"granularity": "per_channel" if per_channel else "per_tensor"}, multiplier=multiplier)
    x = torch.randn(2, kwargs["in_channels"], 9, 8)
    torch.testing.assert_close(layer(x).double(), conv_reference(layer, x, multiplier), rtol=1e-6, atol=1e-6)


def test_an_operand_order_swap_would_be_caught():
    """The reference with rows and columns swapped differs: the tests above can fail."""
    layer = nn.Linear(16, 4)
    multiplier = broken_array(3, 0)
    assert not multiplier.is_symmetric
    ta.attach(layer, multiplier=multiplier)
    x = torch.randn(8, 16)
    x_lv, _ = levels_and_scale(layer.input_quantizer, x)
    w_lv, _ = levels_and_scale(layer.weight_quantizer, layer.weight)
    right = table_sums(multiplier.table, x_lv, w_lv, True)
    swapped = table_sums(multiplier.table.t(), x_lv, w_lv, True)
    assert not torch.equal(right, swapped)
    torch.testing.assert_close(layer(x).double(), expected_linear(layer, x, multiplier), rtol=1e-6, atol=1e-6)


def models():
    """Single layers: in a chain, float rounding of one layer's output (the integer sums times
    the scales, or the float convolution) can move the next layer's input across a rounding
    boundary, one level apart; each layer is compared on its own input."""
    yield "linear", nn.Linear(12, 16), torch.randn(4, 12)
    yield "conv1d-reflect", nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect"), torch.randn(2, 3, 10)
    yield "conv1d-grouped", nn.Conv1d(4, 4, 2, groups=2), torch.randn(2, 4, 9).relu()
    yield "conv2d", nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 7, 7)
    yield "conv2d-depthwise", nn.Conv2d(6, 6, 3, groups=6, padding=(2, 1)), torch.randn(2, 6, 7, 7).relu()
    yield "conv3d", nn.Conv3d(3, 2, (1, 2, 2), stride=(1, 2, 1)), torch.randn(2, 3, 4, 5, 5)
    yield "unbatched", nn.Conv2d(3, 4, 3, padding=1), torch.randn(3, 6, 6)


@pytest.mark.parametrize("name, model, x", list(models()), ids=[m[0] for m in models()])
@pytest.mark.parametrize("spec", [
    dict(weight={}, input={}),
    dict(weight={"granularity": "per_channel", "bits": 4}, input={"grid": "auto", "bits": 5}),
    dict(weight={"quantizer": "lsq", "granularity": "per_channel"}, input={"quantizer": "lsq", "grid": "auto"}),
], ids=["per-tensor", "per-channel-auto", "lsq"])
def test_the_exact_multiplier_reproduces_the_fake_quantized_layer(name, model, x, spec):
    plain, approximate = _copy(model), _copy(model)  # the parametrized model is shared: leave it as it is
    ta.attach(plain, **spec)
    ta.attach(approximate, **spec, multiplier=exact())
    x_a, x_b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain, out_approx = plain(x_a), approximate(x_b)
    torch.testing.assert_close(out_approx, out_plain, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out_plain)
    out_plain.backward(grad)
    out_approx.backward(grad)
    torch.testing.assert_close(x_b.grad, x_a.grad, rtol=1e-4, atol=1e-6)
    for (key, p), q in zip(plain.named_parameters(), approximate.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=key)


def _copy(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    for parameter in copy.parameters():
        parameter.grad = None
    return copy


def test_transformers_conv1d_takes_a_multiplier():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(7, 9)  # weight [9, 7]: x @ weight + bias
    linear = nn.Linear(9, 7)
    with torch.no_grad():
        linear.weight.copy_(layer.weight.t())
        linear.bias.copy_(layer.bias)
    multiplier = random_table(seed=3)
    ta.attach(layer, weight={"granularity": "per_channel"}, multiplier=multiplier)
    ta.attach(linear, weight={"granularity": "per_channel"}, multiplier=multiplier)
    x = torch.randn(2, 3, 9)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(linear(x).double(), expected_linear(linear, x, multiplier), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gradient", ["ste", "table"])
def test_gradients_through_an_approximate_layer_match_the_functional_op(gradient):
    """The layer's gradient is the functional op's (tested there against finite differences
    of the table) chained with d level / d x = 1 / scale inside the grid."""
    from torchapprox.multipliers import approx_linear_levels

    layer = nn.Linear(10, 4, bias=False)
    multiplier = mitchell()
    ta.attach(layer, multiplier=multiplier, multiplier_gradient=gradient)
    x = torch.randn(6, 10, requires_grad=True)
    layer(x).sum().backward()
    x_lv, s_x = levels_and_scale(layer.input_quantizer, x)
    w_lv, s_w = levels_and_scale(layer.weight_quantizer, layer.weight)
    x_ref = x_lv.float().requires_grad_()
    w_ref = w_lv.float().requires_grad_()
    (approx_linear_levels(x_ref, w_ref, multiplier, gradient=gradient) * float(s_x * s_w)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad / float(s_x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad / float(s_w), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- setting
def test_set_multiplier_switches_layers_by_pattern_and_back():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ta.attach(model)
    x = torch.randn(5, 8)
    exact_out = model(x)
    assert ta.set_multiplier(model, drum(3), pattern="2") == ["2"]
    assert list(ta.assigned_multipliers(model)) == ["2"]
    assert not torch.allclose(model(x), exact_out)
    assert ta.set_multiplier(model, None) == ["0", "2"]
    assert ta.assigned_multipliers(model) == {}
    torch.testing.assert_close(model(x), exact_out)


def test_rules_set_the_multiplier_per_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ta.attach(model, multiplier=drum(4), rules={"2": {"multiplier": None}, "0": {"multiplier_gradient": "table"}})
    assert list(ta.assigned_multipliers(model)) == ["0"]
    assert model[0]._torchapprox_multiplier.gradient == "table"
    ta.attach(model, rules={"2": {"multiplier": mitchell()}})
    assert {k: m.name for k, m in ta.assigned_multipliers(model).items()} == {"2": "mitchell"}
    ta.detach(model)
    assert ta.assigned_multipliers(model) == {}


def test_layers_that_cannot_take_a_multiplier_are_named():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ConvTranspose1d(8, 4, 3))
    with pytest.warns(UserWarning, match="Embedding cannot take a multiplier.*ConvTranspose1d cannot take"):
        ta.attach(model, multiplier=drum(4))
    assert list(ta.assigned_multipliers(model)) == ["1"]
    only_embedding = nn.Sequential(nn.Embedding(10, 8))
    ta.attach(only_embedding)
    with pytest.raises(ValueError, match="no matching layer can take multiplier 'exact': Embedding cannot take"):
        ta.set_multiplier(only_embedding, exact())


@pytest.mark.parametrize("setup, message", [
    (dict(bitwidth=16), "the weight is quantized to 16 bits, but the multiplier takes 8-bit operands"),
    (dict(weight={"grid": "unsigned"}), "the weight is on the unsigned grid"),
    (dict(input={"grid": "unsigned"}), "is a table for the signed x signed domain, but the input is on the unsigned"),
])
def test_operands_the_multiplier_cannot_take_are_refused_before_anything_changes(setup, message):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=message):
        ta.attach(model, multiplier=random_table(), **setup)
    assert ta.quantized_layers(model) == {} and ta.assigned_multipliers(model) == {}


def test_bits_raised_after_the_switch_fail_at_the_forward_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 4))
    ta.attach(model, multiplier=drum(4))
    ta.set_bitwidth(model, 12)
    with pytest.raises(ValueError, match=r"layer '0' \(multiplier 'drum\(4\)'\): the weight has levels -2047..2047"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="the weight is quantized to 12 bits"):
        ta.set_multiplier(model, drum(4))


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="`multiplier` must be a torchapprox.multipliers.Multiplier"):
        ta.attach(model, multiplier="drum(4)")
    ta.attach(model)
    with pytest.raises(ValueError, match="`multiplier_gradient` must be one of 'ste', 'table', got 'exact'"):
        ta.set_multiplier(model, drum(4), gradient="exact")
    with pytest.raises(ValueError, match="`pattern` .* matches no quantized layer"):
        ta.set_multiplier(model, drum(4), pattern="fc*")
    with pytest.raises(ValueError, match="unknown field 'multiplyer'"):
        ta.attach(model, rules={"0": {"multiplyer": drum(4)}})


# ------------------------------------------------------------------------------ state
def test_the_assignment_travels_through_quantization_state(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    custom = random_table(seed=7)
    ta.attach(model, multiplier=drum(4), rules={"3": {"multiplier": custom, "multiplier_gradient": "table"}})
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    torch.save({"state": ta.quantization_state(model), "weights": model.state_dict()}, tmp_path / "q.pt")
    saved = torch.load(tmp_path / "q.pt", weights_only=True)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    ta.restore_quantization(fresh, saved["state"])
    fresh.load_state_dict(saved["weights"])
    assert {k: m.name for k, m in ta.assigned_multipliers(fresh).items()} == {"0": "drum(4)", "3": "random"}
    assert torch.equal(ta.assigned_multipliers(fresh)["3"].table, custom.table)
    assert fresh[3]._torchapprox_multiplier.gradient == "table"
    torch.testing.assert_close(fresh(x), expected)


def test_export_refuses_approximate_products_unless_asked_for_exact_ones(tmp_path):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = _copy(model)
    ta.attach(model, multiplier=drum(4), rules={"2": {"multiplier": mitchell()}})
    ta.attach(reference)
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"these layers compute with one: 0 \(drum\(4\)\), 2 \(mitchell\); "
                                         "pass exact_products=True"):
        ta.export_onnx(model, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    path = ta.export_onnx(model, x, tmp_path / "m.onnx", exact_products=True)
    assert list(ta.assigned_multipliers(model)) == ["0", "2"]  # the model itself keeps them
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, reference.eval()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_combinations_that_would_fail_mid_training_are_refused_at_attach():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="a convolution with a multiplier takes one input scale per tensor"):
        ta.attach(conv, input={"granularity": "per_token"}, multiplier=exact())
    signed_only = random_table()
    with pytest.raises(ValueError, match="a table for the signed x signed domain only, but the input is on the 'auto'"):
        ta.attach(nn.Sequential(nn.Linear(4, 4)), input={"grid": "auto"}, multiplier=signed_only)
    with pytest.raises(TypeError, match="`input_signed` must be True or False, got 'no'"):
        Multiplier.from_table(exact().table, input_signed="no")


def test_under_autocast_a_linear_layer_gives_autocast_s_dtype_as_without_a_multiplier():
    plain, approximate = nn.Linear(8, 3), nn.Linear(8, 3)
    approximate.load_state_dict(plain.state_dict())
    ta.attach(plain)
    ta.attach(approximate, multiplier=exact())
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = plain(x), approximate(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("multiplier", [exact(), mitchell(), drum(4)], ids=lambda m: m.name)
def test_torch_func_grad_through_approximate_layers_equals_autograd(multiplier):
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    ta.attach(net, multiplier=multiplier)
    x = torch.randn(2, 2, 5, 5)
    params = {k: v.detach() for k, v in net.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(net, p, (x,)).square().sum())(params)
    net(x).square().sum().backward()
    for name, parameter in net.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, msg=name)


def test_the_table_gradient_under_torch_func_is_a_clear_error():
    layer = nn.Linear(4, 3)
    ta.attach(layer, multiplier=mitchell(), multiplier_gradient="table")
    params = {k: v.detach() for k, v in layer.named_parameters()}
    with pytest.raises(RuntimeError, match="'table' gradient .* cannot run under torch.func .* use gradient='ste'"):
        torch.func.grad(lambda p: torch.func.functional_call(layer, p, (torch.randn(2, 4),)).sum())(params)
