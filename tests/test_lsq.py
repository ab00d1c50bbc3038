"""The "lsq" family (learned step sizes): gradients against autograd through the paper's
formula, initialisation, annealing, training state in checkpoints, bake and export."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import torchapprox as ta
from callbacks import QuantizationAwareTraining, restore_quantized
from lit_helpers import TinyClassifier, make_trainer


@pytest.fixture(autouse=True)
def seed():
    seed_everything(0, verbose=False)


def bounds(bits, grid, x):
    unsigned = grid == "unsigned" or (grid == "auto" and bool(x.min() >= 0))
    return (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)


def lsq_reference(x, step, bits, grid, per_step, channel_axis=None):
    """Esser et al. 2020 (eq. 1-3) written with autograd: the step's gradient scaled by
    g = 1 / sqrt(N * Qp), x / s clipped to [-Qn, Qp], round() straight through."""
    qp = 2**bits - 1 if grid == "unsigned" else 2 ** (bits - 1) - 1
    g = 1.0 / math.sqrt(per_step * qp)
    s = (step - step * g).detach() + step * g
    s = s.abs()
    if channel_axis is not None:
        s = s.reshape([-1 if d == channel_axis else 1 for d in range(x.dim())])
    qmin, qmax = bounds(bits, grid, x)
    clipped = torch.clamp(x / s, qmin, qmax)  # eq. 1: clip, then round, straight through
    return (clipped + (torch.round(clipped) - clipped).detach()) * s


def lsq_spec(bits=4, **fields):
    return ta.QuantSpec(bits=bits, quantizer="lsq", **fields)


@pytest.mark.parametrize("grid", ["signed", "unsigned", "auto"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_an_input_step_and_its_gradients_are_the_papers(grid, bits):
    quantizer = ta.quantizers.build_quantizer(lsq_spec(bits, grid=grid), role="input")
    x = torch.randn(6, 10) * 2
    if grid != "signed":
        x = x.relu() if grid == "unsigned" else x  # auto: signed here, and non-negative below
    quantizer(x.detach())  # initialises the step from the first tensor
    for data in (x, x.abs()):
        data = data.clone().requires_grad_()
        reference_x = data.detach().clone().requires_grad_()
        step = quantizer.step.detach().clone().requires_grad_()
        out = quantizer(data)
        expected = lsq_reference(reference_x, step, bits, grid, per_step=10)
        assert torch.allclose(out, expected, atol=1e-6)
        upstream = torch.randn_like(out)
        out.backward(upstream)
        expected.backward(upstream)
        assert torch.allclose(data.grad, reference_x.grad)
        assert torch.allclose(quantizer.step.grad, step.grad, rtol=1e-3, atol=1e-6)  # sums in another order
        quantizer.step.grad = None


@pytest.mark.parametrize("make, axis", [(lambda: nn.Linear(12, 5), 0), (lambda: nn.Conv2d(3, 4, 3), 0),
                                        (lambda: nn.ConvTranspose2d(3, 4, 3), 1)])
def test_layers_with_learned_steps_match_the_functional_reference(make, axis):
    layer = make()
    reference = copy.deepcopy(layer)
    ta.attach(nn.Sequential(layer), weight=lsq_spec(4, granularity="per_channel"), input=lsq_spec(4, grid="auto"))
    x = (torch.randn(5, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 6, 6)).relu()
    x.requires_grad_()
    out = layer(x)  # initialises the input step; the weights' were set at attach
    w_step = layer.weight_quantizer.step.detach().clone().requires_grad_()
    x_step = layer.input_quantizer.step.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight = reference.weight.detach().clone().requires_grad_()
    per_channel = weight.numel() // weight.shape[axis]
    w_fake = lsq_reference(weight, w_step, 4, "signed", per_channel, channel_axis=axis)
    x_fake = lsq_reference(x_ref, x_step, 4, "auto", x.numel() // x.shape[0])
    # a constant input step: the bias on the accumulator grid, straight through, steps not in it
    bias_step = (x_step.detach() * w_step.detach().abs()).reshape(-1)
    bias = reference.bias + (torch.round(reference.bias / bias_step) * bias_step - reference.bias).detach()
    if isinstance(layer, nn.Linear):
        expected = F.linear(x_fake, w_fake, bias)
    elif isinstance(layer, nn.Conv2d):
        expected = F.conv2d(x_fake, w_fake, bias)
    else:
        expected = F.conv_transpose2d(x_fake, w_fake, bias)
    assert torch.allclose(out, expected, atol=1e-5)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert torch.allclose(layer.weight.grad, weight.grad, atol=1e-5)
    assert torch.allclose(layer.weight_quantizer.step.grad, w_step.grad, rtol=1e-3, atol=1e-6)
    assert torch.allclose(layer.input_quantizer.step.grad, x_step.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("init", ["lsq", "minmax"])
def test_steps_start_from_the_tensors_statistics(init):
    layer = nn.Linear(16, 4)
    ta.attach(nn.Sequential(layer), weight=lsq_spec(4, granularity="per_channel", options={"init": init}),
              input=lsq_spec(4, options={"init": init}))
    weight = layer.weight.detach()
    if init == "lsq":  # 2 * mean|w| / sqrt(Qp), per channel, at attach
        expected = 2 * weight.abs().mean(1) / math.sqrt(7)
    else:  # max|w| / Qp
        expected = weight.abs().amax(1) / 7
    assert torch.allclose(layer.weight_quantizer.step.detach(), expected)
    assert not bool(layer.input_quantizer.initialized)
    x = torch.randn(8, 16)
    layer(x)
    first = 2 * x.abs().mean() / math.sqrt(7) if init == "lsq" else x.abs().max() / 7
    assert torch.allclose(layer.input_quantizer.step.detach(), first)
    layer(x * 100)  # later tensors do not re-initialise it
    assert torch.allclose(layer.input_quantizer.step.detach(), first)


@pytest.mark.parametrize("grid", ["signed", "unsigned"])
def test_rescale_anneal_keeps_the_learned_clipping_range(grid):
    model = nn.Sequential(nn.Linear(8, 8))
    options = {"anneal": "rescale", "init": "minmax"}
    ta.attach(model, weight=lsq_spec(16, options=options), input=lsq_spec(16, grid=grid, options=options))
    model(torch.rand(4, 8))
    quantizers = (model[0].weight_quantizer, model[0].input_quantizer)
    top = {"signed": lambda b: 2 ** (b - 1) - 1, "unsigned": lambda b: 2**b - 1}
    ranges = [q.step.detach() * top["signed" if q.role == "weight" else grid](16) for q in quantizers]
    for bits in (8, 4):
        ta.set_bitwidth(model, bits)
        for quantizer, clipping in zip(quantizers, ranges):
            levels = top["signed" if quantizer.role == "weight" else grid](bits)
            assert torch.allclose(quantizer.step.detach() * levels, clipping, rtol=1e-6)
    # max|w| on the grid at 4 bits: the weight still spans it (levels -7..7)
    assert model[0].weight_quantizer.quantize(model[0].weight).abs().max() == 7


def test_reinit_anneal_starts_each_phase_from_the_data_at_its_bits():
    model = nn.Sequential(nn.Linear(8, 8))
    ta.attach(model, weight=lsq_spec(16), input=lsq_spec(16))
    x = torch.randn(4, 8)
    model(x)
    at_16 = model[0].input_quantizer.step.detach().clone()
    ta.set_bitwidth(model, 4)
    model(x)
    weight = model[0].weight.detach()
    assert torch.allclose(model[0].weight_quantizer.step.detach(), 2 * weight.abs().mean() / math.sqrt(7))
    assert torch.allclose(model[0].input_quantizer.step.detach(), 2 * x.abs().mean() / math.sqrt(7))
    assert model[0].input_quantizer.step.detach() / at_16 == pytest.approx(math.sqrt(32767 / 7), rel=1e-5)
    assert model[0].weight_quantizer.quantize(model[0].weight).unique().numel() > 5  # spans the grid


@pytest.mark.parametrize("field, value, message", [
    ("range", "running", "neither running nor calibrated"),
    ("range_gradient", True, "is a 'minmax' option"), ("options", {"init": "max"}, r"`options\['init'\]` must be"),
    ("options", {"clip": 1.0}, "takes only 'init'"), ("options", {"anneal": "keep"}, r"`options\['anneal'\]`"),
])
def test_specs_the_family_cannot_compute_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        lsq_spec(4, **{field: value})


def test_bake_and_float_state_dict():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ta.attach(model, weight=lsq_spec(3), input=lsq_spec(3, grid="auto"))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)  # built after attach: it trains the steps
    before = model[0].weight_quantizer.step.detach().clone()
    for _ in range(5):
        loss = model(torch.randn(16, 6)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(model[0].weight_quantizer.step.detach(), before)
    state = model.state_dict()
    assert "0.weight_quantizer.step" in state and "2.input_quantizer.initialized" in state
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    plain.load_state_dict(ta.float_state_dict(state))  # strict: only the quantizers' keys went
    with torch.no_grad():
        expected = [model[i].weight_quantizer(model[i].weight).clone() for i in (0, 2)]
    ta.detach(model, bake=True)
    assert all(torch.equal(model[i].weight, w) for i, w in zip((0, 2), expected))


@pytest.mark.parametrize("bits, grid", [(8, "signed"), (4, "unsigned"), (2, "auto"), (4, "auto")])
def test_learned_steps_export_as_constant_scales_and_onnx_runtime_agrees(bits, grid, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    ta.attach(model, weight=lsq_spec(bits, granularity="per_channel"), input=lsq_spec(bits, grid=grid))
    model(torch.randn(32, 10))
    model.eval()
    x = torch.randn(64, 10) * 1.5  # beyond the learned ranges too: values clamp
    path = ta.export_onnx(model, x[:2], tmp_path / "lsq.onnx")
    graph = onnx.load(str(path))
    assert "ReduceMax" not in [n.op_type for n in graph.graph.node]  # constant scales, no range computed
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


class LSQClassifier(TinyClassifier):
    def configure_optimizers(self):  # after the callback's setup: the steps are parameters by now
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _lsq_callback():
    return QuantizationAwareTraining({0: 8, 1: 4}, weight=lsq_spec(granularity="per_channel"),
                                     input=lsq_spec(grid="auto"), verbose=False)


def test_training_state_resumes_exactly_and_restores_in_one_call(tmp_path):
    seed_everything(0, verbose=False)
    whole = LSQClassifier()
    make_trainer(tmp_path / "whole", [_lsq_callback()], max_epochs=3).fit(whole)
    assert any("step" in name for name, _ in whole.named_parameters())

    seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path / "first", [_lsq_callback(), checkpoint], max_epochs=2).fit(LSQClassifier())
    seed_everything(0, verbose=False)
    resumed = LSQClassifier()
    make_trainer(tmp_path / "second", [_lsq_callback()], max_epochs=3).fit(
        resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    restored = restore_quantized(LSQClassifier(), tmp_path / "ckpt" / "last.ckpt")
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(restored.net[0].input_quantizer.step, saved["net.0.input_quantizer.step"])
    x = torch.randn(7, 8)
    plain = TinyClassifier()
    plain.load_state_dict(ta.float_state_dict(saved))
    assert torch.equal(plain.net[0].weight, restored.net[0].weight)
    with torch.no_grad():
        assert restored(x).shape == (7, 3)


def test_the_learned_step_is_logged(tmp_path):
    from lit_helpers import read_scalars

    make_trainer(tmp_path, [_lsq_callback()], max_epochs=1).fit(LSQClassifier())
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    assert "quant/net.0/input/step" in scalars and "quant/net.2/weight/step" in scalars
    assert all(value > 0 for _, value in scalars["quant/net.0/input/step"])


@pytest.mark.parametrize("shape, scale_shape", [((5000,), ()), ((6, 40), (6, 1)), ((4, 5, 3, 3), (4, 1, 1, 1)),
                                                ((2, 7, 9), (2, 7, 1)), ((3, 4), (1, 4))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_learned_step_kernel_matches_its_reference(shape, scale_shape, dtype):
    from torchapprox.quantizers import reference

    x = torch.randn(shape, dtype=dtype) * 3
    grad = torch.randn(shape, dtype=dtype)
    scale = torch.rand(scale_shape, dtype=dtype) * 0.5 + 0.1
    grad_x, grad_scale = torch.ops.torchapprox.learned_step_backward(grad, x, scale, -7, 7)
    expected_x, expected_scale = reference.learned_step_backward(grad, x, scale, -7, 7)
    assert torch.equal(grad_x, expected_x) and grad_scale.shape == scale.shape
    assert torch.allclose(grad_scale, expected_scale, rtol=1e-5, atol=1e-5)  # sums in another order
    strided = x.transpose(0, -1) if x.dim() > 1 else x[::2]
    grad_strided = torch.randn_like(strided)
    if scale.dim() == 0:
        got = torch.ops.torchapprox.learned_step_backward(grad_strided, strided, scale, -7, 7)
        want = reference.learned_step_backward(grad_strided, strided, scale, -7, 7)
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.torchapprox.learned_step_backward.default, (grad, x, scale, -7, 7))


@pytest.mark.parametrize("grid", ["signed", "unsigned"])
def test_per_token_steps_are_a_learned_fraction_of_each_tokens_range(grid):
    x = torch.randn(3, 5, 8) * torch.linspace(0.2, 4, 5).reshape(1, 5, 1)
    x = x.relu() if grid == "unsigned" else x
    quantizer = ta.quantizers.build_quantizer(lsq_spec(3, grid=grid, granularity="per_token"), role="input")
    assert torch.equal(quantizer(x), ta.MinMaxQuant(3, grid=grid, axis="token")(x))  # the ratio starts at 1
    with torch.no_grad():
        quantizer.step.fill_(0.7)
    data = x.clone().requires_grad_()
    out = quantizer(data)
    ratio = torch.tensor(0.7, requires_grad=True)
    top = 2**3 - 1 if grid == "unsigned" else 2**2 - 1
    ranges = (x.abs().amax(-1, keepdim=True) / top).clamp_min(torch.finfo(torch.float32).tiny)
    g = 1.0 / math.sqrt(40 * top)  # the features of one sample, times Qp
    scale = ((ratio - ratio * g).detach() + ratio * g) * ranges
    qmin, qmax = (0, top) if grid == "unsigned" else (-top, top)
    clipped = torch.clamp(x / scale, qmin, qmax)
    expected = (clipped + (torch.round(clipped) - clipped).detach()) * scale
    assert torch.allclose(out, expected, atol=1e-6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    assert torch.allclose(quantizer.step.grad, ratio.grad, rtol=1e-3, atol=1e-6)
    assert torch.equal(data.grad, upstream * (x / scale.detach()).ge(qmin).logical_and((x / scale.detach()).le(qmax)))


# ------------------------------------------------------- found by trying to break it
def test_half_precision_after_attach_keeps_the_quantizers_tensors_wide():
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    x = torch.randn(8, 16) * 1e-3
    ta.attach(model, weight=ta.QuantSpec(bits=16), input=ta.QuantSpec(bits=16))
    ta.calibrate(model, [x])
    wide = model[0].input_quantizer.qparams(x).scale
    model.half()
    assert model[0].input_quantizer.static_range.dtype == torch.float32
    assert torch.equal(model[0].input_quantizer.qparams(x.half()).scale, wide)  # not floored at 6e-5
    learned = nn.Sequential(nn.Linear(4, 4))
    ta.attach(learned, weight=lsq_spec(8), input=lsq_spec(8))
    step = learned[0].weight_quantizer.step
    learned.to(torch.bfloat16)
    assert learned[0].weight_quantizer.step is step and step.dtype == torch.float32  # the optimizer's Parameter


def test_a_new_callback_with_the_same_options_keeps_what_the_model_learned(tmp_path):
    model = LSQClassifier()
    make_trainer(tmp_path / "fit", [_lsq_callback()], max_epochs=2).fit(model)
    steps = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("step")}
    x = torch.randn(16, 8)
    with torch.no_grad():
        before = model.eval()(x)
    make_trainer(tmp_path / "test", [_lsq_callback()]).test(model, verbose=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in steps.items())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), before)
    with pytest.warns(UserWarning, match="they are replaced, and their learned steps"):
        make_trainer(tmp_path / "other", [QuantizationAwareTraining(4, verbose=False)]).test(model, verbose=False)


def test_a_failed_restore_keeps_the_learned_steps():
    model = nn.Sequential(nn.Linear(6, 4))
    ta.attach(model, weight=lsq_spec(4), input=lsq_spec(4))
    model(torch.randn(3, 6))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    saved = ta.quantization_state(model)
    saved["tensors"] = {"0.input_quantizer.running_range": torch.tensor([-1.0, 1.0])}
    with pytest.raises(ValueError, match="cannot be loaded into '0.input_quantizer'"):
        ta.restore_quantization(model, saved)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_options_a_learned_step_cannot_take_are_refused_by_the_callback():
    with pytest.raises(ValueError, match="'lsq' family does not keep .its input steps are constants"):
        QuantizationAwareTraining(4, input=lsq_spec(4), calibrate_batches=2)
    with pytest.raises(ValueError, match="range='static'.*give `calibrate_batches`"):
        QuantizationAwareTraining(4, input=ta.QuantSpec(range="static"))
    model = nn.Sequential(nn.Linear(4, 4))
    ta.attach(model, input=lsq_spec(4))
    with pytest.raises(ValueError, match=r"none of the model's 1 input quantizers takes a static range \(lsq per_tensor"):
        ta.calibrate(model, [torch.randn(2, 4)])


def test_an_uninitialised_step_cannot_be_exported_or_traced_and_says_why(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    ta.attach(model, weight=lsq_spec(8), input=lsq_spec(8))
    x = torch.randn(3, 4)
    model(x)
    ta.set_bitwidth(model, 4)  # the default anneal starts the step again from the next tensor
    model.eval()
    with pytest.raises(Exception, match="has not seen a tensor yet"):
        ta.export_onnx(model, x, tmp_path / "m.onnx")
    with pytest.raises(RuntimeError, match="has not seen a tensor yet"):
        torch.jit.trace(model, x)
    model(x)  # eager: the step starts from this tensor
    ta.export_onnx(model, x, tmp_path / "m.onnx")


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_the_auto_grid_works_under_torch_func_and_export(granularity):
    from torch.func import functional_call, grad, vmap

    layer = nn.Linear(8, 3)
    ta.attach(nn.Sequential(layer), weight=lsq_spec(4), input=lsq_spec(4, grid="auto", granularity=granularity))
    x = torch.randn(5, 2, 8)
    layer(x)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, sample):
        return functional_call(layer, p, (sample.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)  # no value read back under vmap
    for index in range(5):  # each sample's gradient, taken alone in eager mode
        weight = params["weight"].clone().requires_grad_()
        functional_call(layer, {**params, "weight": weight}, (x[index:index + 1],)).square().sum().backward()
        assert torch.allclose(per_sample["weight"][index], weight.grad, atol=1e-5)
    with torch.no_grad():
        eager = layer(x)
    exported = torch.export.export(nn.Sequential(layer).eval(), (x,))
    assert torch.allclose(exported.module()(x), eager, atol=1e-6)
