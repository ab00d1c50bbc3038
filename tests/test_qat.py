"""attach / set_bitwidth / statistics / detach on real models, against the ATen oracle."""

import copy
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import torchapprox as ta
from models import TwoInputNet
from oracle import assert_matches_oracle, int_max, oracle_fake_quantize


def _fq(t, bitwidth):
    """Fake quantization by MinMaxQuant (already checked against the oracle)."""
    return ta.MinMaxQuant(bitwidth)(t)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_attach_names_every_layer_and_registers_visible_quantizers():
    model = nn.Sequential(
        nn.Conv1d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv3d(2, 2, 1),
        nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.MultiheadAttention(4, 2),
    )
    names = ta.attach(model, 6)
    assert names == ["0", "1", "2", "3.0", "4", "4.out_proj"]
    quantizers = [m for m in model.modules() if isinstance(m, ta.MinMaxQuant)]
    # two per layer, attention has three inputs (query, key, value) and one in-projection weight
    assert len(quantizers) == 2 * 5 + 4
    assert all(q.bitwidth == 6 for q in quantizers)
    assert "(weight_quantizer): MinMaxQuant(bitwidth=6)" in repr(model)
    assert "(in_proj_weight_quantizer): MinMaxQuant(bitwidth=6)" in repr(model)


def test_attach_twice_does_not_stack_quantizers():
    model = mlp()
    ta.attach(model, 8)
    ta.attach(model, 4)
    assert sum(isinstance(m, ta.MinMaxQuant) for m in model.modules()) == 4
    x = torch.randn(5, 6)
    h = F.relu(F.linear(_fq(x, 4), _fq(model[0].weight, 4), model[0].bias))
    expected = F.linear(_fq(h, 4), _fq(model[2].weight, 4), model[2].bias)
    assert torch.equal(model(x), expected)


def test_exclude_takes_fnmatch_patterns():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert ta.attach(model, exclude=["1.*"]) == ["0"]
    assert ta.attach(model, exclude="0") == ["1.0", "1.1"]
    assert ta.attach(model, exclude=()) == ["0", "1.0", "1.1"]


@pytest.mark.parametrize("bitwidth", [2, 3, 4, 8])
def test_linear_computes_with_quantized_input_and_weight(bitwidth):
    layer = nn.Linear(32, 16)
    x = torch.randn(8, 32)
    ta.attach(layer, bitwidth)
    ta.enable_statistics(layer)
    y = layer(x)
    stats = ta.statistics(layer)[""]
    # independent oracle for both operands
    expected = F.linear(oracle_fake_quantize(x, bitwidth), oracle_fake_quantize(layer.weight, bitwidth), layer.bias)
    assert torch.allclose(y, expected, atol=2 * layer.weight.abs().max().item() / int_max(bitwidth) * x.abs().max().item())
    assert_matches_oracle(layer.input_quantizer(x), x, bitwidth)
    assert torch.equal(y, F.linear(_fq(x, bitwidth), _fq(layer.weight, bitwidth), layer.bias))
    assert stats["weight"]["scale_factor"].item() == pytest.approx(int_max(bitwidth) / layer.weight.abs().max().item(), rel=1e-6)
    w_err = (oracle_fake_quantize(layer.weight, bitwidth) - layer.weight).square().mean().item()
    assert stats["weight"]["mse"].item() == pytest.approx(w_err, rel=1e-3)
    signal = layer.weight.square().mean().item()
    assert stats["weight"]["sqnr_db"].item() == pytest.approx(10 * torch.log10(torch.tensor(signal / w_err)).item(), abs=1e-3)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_computes_with_quantized_input_and_weight(dims):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, 4, 3, padding=1)
    x = torch.randn(2, 3, *([6] * dims))
    ta.attach(conv, 4)
    forward = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    expected = forward(_fq(x, 4), _fq(conv.weight, 4), conv.bias, padding=1)
    assert torch.equal(conv(x), expected)


def test_weights_only_and_activations_only():
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    ta.attach(layer, 3, activations=False)
    assert torch.equal(layer(x), F.linear(x, _fq(layer.weight, 3), layer.bias))
    ta.attach(layer, 3, weights=False)
    assert torch.equal(layer(x), F.linear(_fq(x, 3), layer.weight, layer.bias))


def test_gradient_flows_straight_through_to_the_float_master():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before attach
    master = model[0].weight
    ta.attach(model, 4)
    x, target = torch.randn(10, 6), torch.randint(0, 3, (10,))

    # reference: the same computation with the quantized weights as leaves
    w0 = _fq(master, 4).detach().requires_grad_()
    w2 = _fq(model[2].weight, 4).detach().requires_grad_()
    h = F.relu(F.linear(_fq(x, 4), w0, model[0].bias))
    F.cross_entropy(F.linear(_fq(h, 4), w2, model[2].bias), target).backward()

    F.cross_entropy(model(x), target).backward()
    assert model[0].weight is master and isinstance(master, nn.Parameter)
    assert torch.allclose(master.grad, w0.grad) and torch.allclose(model[2].weight.grad, w2.grad)
    before = master.detach().clone()
    optimizer.step()
    assert torch.allclose(master, before - 0.1 * w0.grad)


def test_state_dict_keeps_plain_keys_and_loads_strictly_both_ways():
    plain = mlp()
    quantized = mlp()
    ta.attach(quantized, 4)
    assert list(quantized.state_dict()) == list(plain.state_dict())
    quantized.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(quantized[0].weight, plain[0].weight)  # float masters, not grid values
    other = mlp()
    other.load_state_dict(quantized.state_dict(), strict=True)
    assert torch.equal(other[2].weight, plain[2].weight)


def test_quantization_applies_in_eval_no_grad_and_inference_mode():
    model = mlp()
    x = torch.randn(4, 6)
    float_out = model(x).detach()
    ta.attach(model, 3)
    train_out = model(x).detach()
    model.eval()
    with torch.no_grad():
        no_grad_out = model(x)
    with torch.inference_mode():
        inference_out = model(x)
    assert not torch.allclose(train_out, float_out)
    assert torch.equal(train_out, no_grad_out) and torch.equal(train_out, inference_out)


def test_model_with_several_inputs_and_keyword_arguments():
    model = TwoInputNet()
    image, side = torch.randn(2, 1, 8, 8), torch.randn(2, 3)
    ta.attach(model, 4)
    y = model(image, side, temperature=2.0)
    features = torch.cat([
        F.conv2d(_fq(image, 4), _fq(model.image.weight, 4), model.image.bias, padding=1).flatten(1),
        F.linear(_fq(side, 4), _fq(model.side.weight, 4), model.side.bias),
    ], dim=1)
    expected = F.linear(_fq(features, 4), _fq(model.head.weight, 4), model.head.bias) / 2.0
    assert torch.equal(y, expected)
    assert model.side(input=side).shape == (2, 4)  # keyword input is quantized too
    assert torch.equal(model.side(input=side), model.side(side))


def _reference_attention(attn, query, bitwidth):
    """Self-attention computed by hand with every operand fake-quantized."""
    q = _fq(query, bitwidth)
    embed = attn.embed_dim
    pre = F.multi_head_attention_forward(
        q, q, q, embed, attn.num_heads, _fq(attn.in_proj_weight, bitwidth), attn.in_proj_bias,
        None, None, False, 0.0, torch.eye(embed), torch.zeros(embed), training=False, need_weights=False,
    )[0]
    return F.linear(_fq(pre, bitwidth), _fq(attn.out_proj.weight, bitwidth), attn.out_proj.bias)


def test_multihead_attention_quantizes_in_projection_out_projection_and_inputs():
    attn = nn.MultiheadAttention(8, 2)
    query = torch.randn(5, 3, 8)  # (sequence, batch, embed)
    ta.attach(attn, 4)
    out, weights = attn(query, query, query)
    assert torch.allclose(out, _reference_attention(attn, query, 4), atol=1e-6)
    assert weights.shape == (3, 5, 5)
    attn.eval()
    with torch.no_grad():  # the inference fast path must not skip quantization
        assert torch.allclose(attn(query, query, query, need_weights=False)[0], out, atol=1e-6)


def test_multihead_attention_with_keyword_inputs_and_distinct_key_value():
    attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=5)
    query, key, value = torch.randn(2, 4, 8), torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    names = ta.attach(attn, 8)
    assert names == ["", "out_proj"]
    with ta.collect_statistics(attn) as stats:
        out, _ = attn(query=query, key=key, value=value)
    assert out.shape == (2, 4, 8)
    scale = lambda name: stats.tensors()[""][name]["scale_factor"].item()  # noqa: E731
    assert scale("key") == pytest.approx(127 / key.abs().max().item(), rel=1e-6)
    assert scale("value") == pytest.approx(127 / value.abs().max().item(), rel=1e-6)
    assert scale("q_proj_weight") == pytest.approx(127 / attn.q_proj_weight.abs().max().item(), rel=1e-6)


def test_transformer_encoder_layer_is_quantized_on_its_inference_fast_path():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    src = torch.randn(2, 5, 8)
    ta.attach(layer, 4)
    train_out = layer(src).detach()  # training mode: the plain Python path
    layer.eval()
    with torch.no_grad():
        eval_out = layer(src)
    with torch.inference_mode():
        inference_out = layer(src)
    assert torch.allclose(train_out, eval_out, atol=1e-6)
    assert torch.allclose(train_out, inference_out, atol=1e-6)
    ta.detach(layer)
    with torch.no_grad():
        float_out = layer(src)
    assert not torch.allclose(float_out, eval_out, atol=1e-3)


def test_pruning_after_attach_quantizes_the_pruned_weight():
    layer = nn.Linear(16, 8)
    ta.attach(layer, 4)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    x = torch.randn(3, 16)
    pruned = layer.weight_orig * layer.weight_mask
    assert torch.equal(layer(x), F.linear(_fq(x, 4), _fq(pruned, 4), layer.bias))
    assert isinstance(layer.weight_orig, nn.Parameter)
    ta.detach(layer, bake=True)
    assert torch.equal(layer.weight, _fq(pruned, 4))
    assert int((layer.weight == 0).sum()) >= 64  # pruned entries stay zero


def test_pruning_before_attach_works_too():
    layer = nn.Linear(16, 8)
    prune.random_unstructured(layer, "weight", amount=0.25)
    ta.attach(layer, 3)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), F.linear(_fq(x, 3), _fq(layer.weight_orig * layer.weight_mask, 3), layer.bias))


def test_detach_restores_the_float_model_and_bake_keeps_grid_values():
    model = mlp()
    x = torch.randn(4, 6)
    float_out = model(x)
    ta.attach(model, 4)
    ta.detach(model)
    assert torch.equal(model(x), float_out)
    assert not any(isinstance(m, ta.MinMaxQuant) for m in model.modules())
    assert "forward" not in vars(model[0]) and not model[0]._forward_pre_hooks

    ta.attach(model, 4, activations=False)
    quantized_out = model(x)
    masters = [model[i].weight.detach().clone() for i in (0, 2)]
    assert ta.detach(model, bake=True) == ["0", "2"]
    assert torch.equal(model(x), quantized_out)
    for i, master in zip((0, 2), masters):
        assert torch.equal(model[i].weight, _fq(master, 4))
        steps = model[i].weight * (int_max(4) / master.abs().max())
        assert torch.allclose(steps, steps.round(), atol=1e-5)


def test_set_bitwidth_anneals_every_quantizer():
    model = mlp()
    ta.attach(model, 16)
    ta.enable_statistics(model)
    x = torch.randn(64, 6)
    sqnr = {}
    for bitwidth in (8, 6, 4):
        assert ta.set_bitwidth(model, bitwidth) == 4
        assert {q.bitwidth for q in model.modules() if isinstance(q, ta.MinMaxQuant)} == {bitwidth}
        model(x)
        sqnr[bitwidth] = ta.statistics(model)["0"]["weight"]["sqnr_db"].item()
    # each bit buys about 6 dB of signal-to-quantization-noise ratio
    assert 9 < sqnr[8] - sqnr[6] < 15 and 9 < sqnr[6] - sqnr[4] < 15


def test_statistics_are_recorded_only_when_enabled():
    model = mlp()
    ta.attach(model, 8)
    model(torch.randn(2, 6))
    assert ta.statistics(model) == {}
    ta.enable_statistics(model)
    model(torch.randn(2, 6))
    assert set(ta.statistics(model)) == {"0", "2"}
    assert set(ta.statistics(model)["0"]) == {"weight", "input"}


def test_attached_model_deepcopies_and_pickles():
    model = TwoInputNet()
    ta.attach(model, 4)
    image, side = torch.randn(2, 1, 8, 8), torch.randn(2, 3)
    expected = model(image, side)
    assert torch.equal(copy.deepcopy(model)(image, side), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(image, side), expected)


def test_attached_model_runs_on_meta_device_without_host_sync():
    model = mlp().to("meta")
    ta.attach(model, 8)
    ta.enable_statistics(model)
    out = model(torch.randn(4, 6, device="meta"))
    out.sum().backward()
    assert out.shape == (4, 3)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: ta.attach("model"), TypeError, r"`model` must be a torch.nn.Module, got str"),
        (lambda m: ta.attach(m, 1), ValueError, r"`bitwidth` must be an int in 2\.\.32, got 1"),
        (lambda m: ta.attach(m, 4.0), TypeError, r"`bitwidth`.*got 4\.0"),
        (lambda m: ta.attach(m, weights="yes"), TypeError, r"`weights` must be True or False, got 'yes'"),
        (lambda m: ta.attach(m, weights=False, activations=False), ValueError, "nothing would be quantized"),
        (lambda m: ta.attach(m, exclude=[3]), TypeError, r"`exclude` must hold fnmatch patterns"),
        (lambda m: ta.attach(m, exclude=5), TypeError, r"`exclude` must be a pattern"),
        (lambda m: ta.set_bitwidth(m, 33), ValueError, r"`bitwidth` must be an int in 2\.\.32, got 33"),
        (lambda m: ta.set_bitwidth(m, 4), ValueError, r"no quantizers.*attach"),
        (lambda m: ta.detach(m, bake=1), TypeError, r"`bake` must be True or False"),
        (lambda m: ta.attach(m, recompute_inputs="no"), TypeError, r"`recompute_inputs` must be True or False, got 'no'"),
    ],
)
def test_bad_arguments_are_rejected_with_clear_messages(call, error, message):
    with pytest.raises(error, match=message):
        call(mlp())


def test_lazy_layer_must_be_materialized_first():
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"'0' is a lazy module.*forward pass before attach"):
        ta.attach(model)
    model(torch.randn(2, 5))
    assert ta.attach(model) == ["0"]


def test_importing_torchapprox_imports_no_lightning_hydra_or_omegaconf():
    code = (
        "import sys, torchapprox, torchapprox.qat, torchapprox.quantizers.minmax_quantizer\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'lightning', 'pytorch_lightning', 'lightning_fabric', 'hydra', 'omegaconf'})\n"
        "print(bad)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_bitwidth_overrides_pin_layers_whatever_set_bitwidth_says():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    ta.attach(model, 4, bitwidth_overrides={"0": 8, "4": 8})
    assert ta.set_bitwidth(model, 2) == 2  # only layer 2's two quantizers follow
    bits = {name: {q.bitwidth for q in layer.children()} for name, layer in ta.quantized_layers(model).items()}
    assert bits == {"0": {8}, "2": {2}, "4": {8}}
    x = torch.randn(3, 4)
    h = F.relu(F.linear(_fq(x, 8), _fq(model[0].weight, 8), model[0].bias))
    h = F.relu(F.linear(_fq(h, 2), _fq(model[2].weight, 2), model[2].bias))
    assert torch.equal(model(x), F.linear(_fq(h, 8), _fq(model[4].weight, 8), model[4].bias))


def test_activation_grid_applies_to_inputs_only():
    model = mlp()
    ta.attach(model, 3, activation_grid="auto")
    assert model[2].input_quantizer.grid == "auto" and model[2].weight_quantizer.grid == "signed"
    x = torch.randn(5, 6)
    hidden = F.relu(model[0](x))
    unsigned = ta.MinMaxQuant(3, grid="unsigned")
    assert torch.equal(model(x), F.linear(unsigned(hidden), _fq(model[2].weight, 3), model[2].bias))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"bitwidth_overrides": {"0": 1}}, ValueError, r"`bitwidth_overrides\['0'\]` must be an int in 2\.\.32, got 1"),
        ({"bitwidth_overrides": [("0", 8)]}, TypeError, r"`bitwidth_overrides` must be a dict"),
        ({"bitwidth_overrides": {0: 8}}, TypeError, r"keys must be fnmatch patterns"),
        ({"activation_grid": "unsigend"}, ValueError, r"`activation_grid` must be one of signed, unsigned, auto"),
    ],
)
def test_bad_low_bit_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        ta.attach(mlp(), 4, **kwargs)


def test_patterns_that_match_no_layer_are_warned_about():
    with pytest.warns(UserWarning, match=r"`exclude` pattern 'fc\*' matches no quantizable layer; the layers are: 0, 2"):
        ta.attach(mlp(), 4, exclude=["fc*"])
    with pytest.warns(UserWarning, match=r"`bitwidth_overrides` pattern 'head' matches no quantizable layer"):
        ta.attach(mlp(), 4, bitwidth_overrides={"head": 8})


def test_transformer_encoder_with_padding_mask_in_eval_mode():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    src = torch.randn(3, 5, 8)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    ta.attach(encoder, 4)
    train_out = encoder(src, src_key_padding_mask=mask).detach()  # the plain Python path
    encoder.eval()
    with torch.no_grad():  # here torch would switch to nested tensors, which quantizers cannot take
        eval_out = encoder(src, src_key_padding_mask=mask)
    assert torch.allclose(eval_out[~mask], train_out[~mask], atol=1e-6)
    ta.detach(encoder)
    assert encoder.use_nested_tensor  # the encoder's own setting is back


def test_per_sample_gradients_with_torch_func_match_a_loop_over_samples():
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ta.attach(model, 4, activation_grid="auto")
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0])
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-6), (i, name)
