"""QuantSpec, rules, the quantizer registry with a second family, the one contract, all-or-
nothing attach, and restoring a quantized model from what was saved."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta
from families import FixedClip, fixed_clip_reference
from oracle import oracle_fake_quantize
from torchapprox.quantizers.qparams import quantize_dequantize


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def quantizer_specs(model):
    return {name: m.spec for name, m in model.named_modules() if isinstance(m, ta.ApproxQuantizer)}


# ---------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("field, value, error, message", [
    ("bits", 1, ValueError, r"`bits` must be an int in 2\.\.32, got 1"),
    ("bits", "8", TypeError, r"`bits` must be an int in 2\.\.32, got '8'"),
    ("quantizer", "nope", ValueError, r"`quantizer` must name a registered quantizer family \('minmax'.*got 'nope'"),
    ("quantizer", 3, TypeError, r"`quantizer` must be the name of a registered quantizer family, got 3"),
    ("grid", "positive", ValueError, r"`grid` must be one of 'signed', 'unsigned', 'auto', got 'positive'"),
    ("granularity", "per_row", ValueError, r"`granularity` must be one of 'per_tensor', 'per_channel', 'per_token'"),
    ("range", "ema", ValueError, r"`range` must be one of 'dynamic', 'running', 'static', got 'ema'"),
    ("range_gradient", "yes", TypeError, r"`range_gradient` must be True or False, got 'yes'"),
    ("momentum", 0, ValueError, r"`momentum` must be a number in \(0, 1\], got 0"),
    ("recompute", 1, TypeError, r"`recompute` must be True or False, got 1"),
    ("options", [1], TypeError, r"`options` must be a dict"),
    ("options", {"clip": 1.0}, ValueError, r"the 'minmax' family takes no options"),
])
def test_each_bad_field_is_one_error_naming_field_value_and_choices(field, value, error, message):
    with pytest.raises(error, match=message):
        ta.QuantSpec(**{field: value})
    with pytest.raises(error, match=message):  # replace checks again
        ta.QuantSpec().replace(**{field: value})


@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
@pytest.mark.parametrize("value_range", ["running", "static"])
def test_contradictory_pairs_are_refused_at_construction(granularity, value_range):
    with pytest.raises(ValueError, match=rf"`range='{value_range}'` keeps one range per tensor.*'{granularity}'"):
        ta.QuantSpec(granularity=granularity, range=value_range)


def test_a_spec_is_frozen_plain_and_round_trips(tmp_path):
    spec = ta.QuantSpec(bits=4, grid="auto", granularity="per_token", range_gradient=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 2
    assert spec.replace(bits=2).bits == 2 and spec.bits == 4
    torch.save(spec.to_dict(), tmp_path / "spec.pt")
    assert ta.QuantSpec.from_dict(torch.load(tmp_path / "spec.pt", weights_only=True)) == spec
    assert hash(spec) == hash(ta.QuantSpec.from_dict(spec.to_dict()))
    assert repr(spec) == "QuantSpec(bits=4, grid='auto', granularity='per_token', range_gradient=True)"
    with pytest.raises(ValueError, match=r"unknown QuantSpec field 'bitwidth'; the fields are: bits, quantizer"):
        spec.replace(bitwidth=3)


def test_specs_and_the_old_keywords_build_the_same_quantizers():
    by_keywords, by_specs = mlp(), mlp()
    ta.attach(by_keywords, 4, activation_grid="auto", per_channel_weights=True, range_gradient="inputs",
              eval_range="running", bitwidth_overrides={"2": 8}, recompute_inputs=False)
    ta.attach(by_specs, weight=ta.QuantSpec(bits=4, granularity="per_channel"),
              input=ta.QuantSpec(bits=4, grid="auto", range_gradient=True, range="running", recompute=False),
              rules={"2": {"bits": 8}})
    assert quantizer_specs(by_keywords) == quantizer_specs(by_specs)
    assert [m.pinned for m in by_specs.modules() if isinstance(m, ta.ApproxQuantizer)] == [False, False, True, True]


def test_rules_change_one_role_pin_bits_and_disable_layers():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    names = ta.attach(model, 4, rules={
        "0": {"weight": {"granularity": "per_channel"}, "input": {"grid": "unsigned"}},
        "*": {"range_gradient": True},           # both roles of every layer
        "4": {"bits": 8, "input": {"bits": 6}},  # pinned; the input pinned at 6 (the role wins)
        "2": {"enabled": False},                 # left in float
    })
    assert names == ["0", "4"]
    assert model[0].weight_quantizer.spec == ta.QuantSpec(bits=4, granularity="per_channel", range_gradient=True)
    assert model[0].input_quantizer.spec == ta.QuantSpec(bits=4, grid="unsigned", range_gradient=True)
    assert (model[4].weight_quantizer.bitwidth, model[4].input_quantizer.bitwidth) == (8, 6)
    ta.set_bitwidth(model, 2)
    assert [q.bitwidth for q in (model[0].weight_quantizer, model[4].weight_quantizer, model[4].input_quantizer)] \
        == [2, 8, 6]
    assert not hasattr(model[2], "weight_quantizer")


@pytest.mark.parametrize("rules, error, message", [
    ([("0", {})], TypeError, r"`rules` must be a dict"),
    ({"0": {"bitz": 8}}, ValueError, r"`rules\['0'\]`: unknown field 'bitz'"),
    ({"0": {"bits": 40}}, ValueError, r"`rules` for layer '0' \(weight\): `bits` must be an int in 2\.\.32, got 40"),
    ({"0": {"granularity": "per_channel"}}, ValueError, r"layer '0': the input spec has granularity='per_channel'"),
    ({"0": {"weight": {"granularity": "per_token"}}}, ValueError, r"the weight spec has granularity='per_token'"),
    ({"0": {"enabled": "no"}}, TypeError, r"\['enabled'\]` must be True or False"),
])
def test_bad_rules_are_clear_errors_and_change_nothing(rules, error, message):
    model = mlp()
    before = copy.deepcopy(model)
    with pytest.raises(error, match=message):
        ta.attach(model, 4, rules=rules)
    assert str(model) == str(before) and not ta.quantized_layers(model)


# -------------------------------------------------------------- all-or-nothing attach
def test_a_failed_attach_leaves_the_model_exactly_as_it_was():
    model = mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="keeps one range per tensor"):
        ta.attach(model, per_token_inputs=True, eval_range="running")
    assert not any(isinstance(m, ta.ApproxQuantizer) for m in model.modules())
    assert "forward" not in model[0].__dict__ and not model[0]._forward_pre_hooks
    assert ta.detach(model) == [] and model.state_dict().keys() == state.keys()
    # An attached model keeps its quantizers when a second attach fails.
    ta.attach(model, 4)
    specs = quantizer_specs(model)
    lazy = nn.Sequential(model, nn.LazyLinear(2))
    with pytest.raises(ValueError, match="lazy module"):
        ta.attach(lazy, 8)
    assert quantizer_specs(model) == specs


def test_a_failed_restore_or_state_load_changes_nothing():
    model = mlp()
    ta.attach(model, 4, eval_range="running")
    model(torch.randn(5, 6))
    specs, state = quantizer_specs(model), ta.quantizer_state(model)
    with pytest.raises(ValueError, match="names layer '7'"):
        ta.restore_quantization(model, {"format": 1, "layers": {"7": {}}, "tensors": {}})
    bad = {**state, "2.input_quantizer.static_range": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match=r"'2\.input_quantizer'.*static_range.*finite"):
        ta.load_quantizer_state(model, bad)
    assert quantizer_specs(model) == specs
    assert all(torch.equal(ta.quantizer_state(model)[k], v) for k, v in state.items())
    assert set(ta.quantizer_state(model)) == set(state)


def test_restore_rebuilds_specs_bits_and_ranges_exactly():
    model = mlp()
    ta.attach(model, 6, weight=ta.QuantSpec(granularity="per_channel"), input=ta.QuantSpec(grid="auto"),
              rules={"2": {"bits": 8}})
    ta.set_bitwidth(model, 3)
    ta.calibrate(model, [torch.randn(8, 6)])
    saved = ta.quantization_state(model)
    fresh = mlp()
    fresh.load_state_dict(model.state_dict())
    assert ta.restore_quantization(fresh, saved) == ["0", "2"]
    assert quantizer_specs(fresh) == quantizer_specs(model)
    x = torch.randn(7, 6) * 3
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    ta.set_bitwidth(fresh, 2)  # the pinning came back too
    assert fresh[2].weight_quantizer.bitwidth == 8


# ------------------------------------------------------ the registry: a second family
def test_a_registered_family_runs_through_attach_layers_and_statistics():
    assert "fixed_clip" in ta.quantizers.registered_quantizers()
    spec = ta.QuantSpec(bits=4, quantizer="fixed_clip", options={"clip": 0.5})
    model = nn.Sequential(nn.Linear(6, 5))
    ta.attach(model, weight=spec, input=spec.replace(options={"clip": 2.0}))
    assert isinstance(model[0].weight_quantizer, FixedClip)
    x = torch.randn(9, 6, requires_grad=True)
    with ta.collect_statistics(model) as stats:
        out = model(x)
    expected = F.linear(fixed_clip_reference(x, 4, 2.0), fixed_clip_reference(model[0].weight, 4, 0.5),
                        # a constant input step: the bias on the int32 accumulator grid
                        torch.round(model[0].bias / (2.0 / 7 * 0.5 / 7)) * (2.0 / 7 * 0.5 / 7))
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None
    assert stats.results()["0"]["input"]["scale_factor"].item() == pytest.approx(7 / 2.0)
    with pytest.raises(ValueError, match=r"`options\['clip'\]` must be a number > 0 for the 'fixed_clip' family"):
        ta.QuantSpec(quantizer="fixed_clip", options={"clip": -1})


def test_the_second_family_straight_through_gradient_stops_where_values_clamp():
    q = ta.quantizers.build_quantizer(ta.QuantSpec(bits=3, quantizer="fixed_clip", options={"clip": 1.0}))
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 1.2], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # 1.2 / (1/3) rounds to 4 > 3: clamped
    assert torch.equal(q(x), fixed_clip_reference(x, 3, 1.0))


def test_the_second_family_exports_and_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    spec = ta.QuantSpec(bits=4, quantizer="fixed_clip", options={"clip": 1.5})
    ta.attach(model, weight=ta.QuantSpec(bits=4), input=spec)
    model.eval()
    x = torch.randn(32, 6)
    path = ta.export_onnx(model, x[:2], tmp_path / "fixed.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(actual - expected).max() <= 1e-5 * abs(expected).max()
    with pytest.raises(ValueError, match="none of the model's 2 input quantizers takes a static range"):
        ta.calibrate(model, [x])  # a constant range is not calibrated


# ----------------------------------------------------------------- the one contract
CASES = {
    "dynamic signed": dict(bitwidth=4),
    "dynamic unsigned": dict(bitwidth=3, grid="unsigned"),
    "dynamic auto": dict(bitwidth=5, grid="auto"),
    "per channel": dict(bitwidth=4, axis=0),
    "per token": dict(bitwidth=4, axis="token"),
    "range gradient": dict(bitwidth=4, range_gradient=True),
}


@pytest.mark.parametrize("case", CASES)
def test_every_path_is_qparams_then_the_one_rounding_op(case):
    q = ta.MinMaxQuant(**CASES[case])
    x = torch.randn(3, 5, 8) * torch.linspace(0.5, 3, 8)
    x_fast = x.clone().requires_grad_()
    x_generic = x.clone().requires_grad_()
    fused, qp = q.fake_quantize(x_fast)  # the family's fused kernel
    generic = quantize_dequantize(x_generic, q.qparams(x_generic.detach()))  # the contract, step by step
    assert torch.equal(fused, generic) and torch.equal(q(x), fused)
    assert torch.allclose(q.quantize(x) * qp.scale, fused)
    if not q.range_gradient:  # the range gradient adds a term at the extreme element only
        upstream = torch.randn_like(x)
        fused.backward(upstream)
        generic.backward(upstream)
        assert torch.equal(x_fast.grad, x_generic.grad)


@pytest.mark.parametrize("setup", ["frozen", "running"])
def test_quantize_agrees_with_calling_the_quantizer_for_stored_ranges(setup):
    q = ta.MinMaxQuant(2, eval_range="running" if setup == "running" else "batch")
    if setup == "frozen":
        q.freeze_range(torch.tensor([-1.0, 1.0]))
    else:
        q(torch.tensor([-1.0, 1.0]))  # training mode: the running range is [-1, 1]
        q.eval()
    x = torch.tensor([-2.0, -0.4, 0.2, 3.0])
    assert q(x).tolist() == [-1.0, 0.0, 0.0, 1.0]  # clipped to the range, then rounded
    assert (q.quantize(x) / q.scale_factor).tolist() == q(x).tolist()
    assert q.quantize(x).tolist() == [-1.0, 0.0, 0.0, 1.0]


def test_oracle_agreement_through_the_contract():
    x = torch.randn(4096) * 2
    q = ta.MinMaxQuant(8)
    qp = q.qparams(x)
    assert torch.allclose(quantize_dequantize(x, qp), oracle_fake_quantize(x, 8), atol=1e-6)


def test_statistics_report_only_layers_that_ran():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, use_b):
            return self.b(x) if use_b else self.a(x)

    model = Branchy()
    ta.attach(model, 8)
    with ta.collect_statistics(model) as first:
        model(torch.randn(2, 4), use_b=False)
    with ta.collect_statistics(model) as second:
        model(torch.randn(2, 4), use_b=True)
    assert set(first.results()) == {"a"} and set(second.results()) == {"b"}  # not the old numbers of "a"
    reduced = second.reduced()
    assert set(reduced) == {f"quant/b/{kind}/{stat}" for kind in ("weight", "input")
                            for stat in ("scale_factor", "mse", "sqnr_db")}
    assert all(q._collector is None for q in model.modules() if isinstance(q, ta.ApproxQuantizer))


# ------------------------------------------------------- found by trying to break it
def test_doctored_or_mistyped_state_is_a_clear_error():
    model = mlp()
    ta.attach(model, 4, eval_range="running")
    model(torch.randn(3, 6))
    with pytest.raises(TypeError, match=r"'0.input_quantizer.running_range' must be a tensor, got list"):
        ta.load_quantizer_state(model, {"0.input_quantizer.running_range": [-1.0, 1.0]})
    saved = ta.quantization_state(model)
    saved["layers"]["0"]["bias"] = dict(saved["layers"]["0"]["weight"])
    with pytest.raises(ValueError, match=r"names 'weight' tensor 'bias' of layer '0', which a Linear does not quantize"):
        ta.restore_quantization(mlp(), saved)
    saved = ta.quantization_state(model)
    saved["layers"]["0"]["weight"]["channel_axis"] = 7
    with pytest.raises(ValueError, match=r"channel axis 7, which a weight of shape \(16, 6\) does not have"):
        ta.restore_quantization(mlp(), saved)


def test_a_family_returning_bad_parameters_is_told_what_the_contract_wants():
    @ta.register_quantizer("float_scale")
    class FloatScale(ta.ApproxQuantizer):
        def compute_qparams(self, x):
            return ta.QParams(0.1, -7, 7)

    model = nn.Sequential(nn.Linear(4, 2))
    ta.attach(model, input=ta.QuantSpec(bits=4, quantizer="float_scale"))
    with pytest.raises(TypeError, match=r"FloatScale.compute_qparams \(family 'float_scale'\) must return a QParams "
                                        r"with a tensor scale"):
        model(torch.randn(2, 4))


def test_contradicting_shortcuts_name_the_keywords_given():
    with pytest.raises(ValueError, match=r"from the keywords `per_token_inputs`, `eval_range`"):
        ta.attach(mlp(), per_token_inputs=True, eval_range="running")


def test_a_bias_finer_than_its_float_resolution_is_left_as_it_is():
    from torchapprox.layers import quantized_bias

    bias = torch.tensor([1000.0, 0.5])
    weight_qp = ta.QParams(torch.tensor([1e-7, 1e-2]).reshape(2, 1), -127, 127, channels=torch.tensor([1e-7, 1e-2]))
    input_qp = ta.QParams(torch.tensor(1e-3), -127, 127, constant=True)
    out = quantized_bias(bias, weight_qp, input_qp)
    steps = torch.tensor([1e-10, 1e-5])
    assert ((out - bias).abs() <= steps / 2).all()  # 1000 has a float32 resolution of 6e-5 >> 1e-10
    assert out[0] == bias[0]  # left as it is
    assert torch.allclose(out[1], torch.round(bias[1] / steps[1]) * steps[1])  # on its grid
