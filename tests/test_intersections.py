"""Where two options meet: the ten silent failures of the 0.2 design, each as a kind."""

import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import torchapprox as ta
from callbacks import BatchNormReestimation, LearningRateRewarm, QuantizationAwareTraining
from callbacks.schedules import LinearBitwidth, StepBitwidth
from families import FixedClip  # noqa: F401 - registers "fixed_clip"
from lit_helpers import TinyClassifier, make_trainer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def seed():
    seed_everything(0, verbose=False)


# ------------------------------------------- 1. a bias never moves by more than half a step
def _tiny_weight_layer(kind):
    """The report's layer: 16-bit per-channel weights of 0.01-0.05, a bias of 0.2, inputs in
    [0, 1]: the accumulator step s_in * s_w is ~1e-11, the bias ~1e10 steps (> int32)."""
    if kind == "linear":
        layer = nn.Linear(1, 4)
        shape = (1,)
    else:
        layer = nn.Conv2d(1, 4, 1)
        shape = (1, 3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.05, -0.03, 0.02, 0.01]).reshape(layer.weight.shape))
        layer.bias.fill_(0.2)
    return nn.Sequential(layer), shape


def _constant_input_scale(model, how, shape):
    if how == "calibrated":
        ta.attach(model, 16, per_channel_weights=True, activation_grid="auto")
        ta.calibrate(model, [torch.rand(32, *shape)])
    elif how == "running":
        ta.attach(model, 16, per_channel_weights=True, activation_grid="auto", eval_range="running")
        model(torch.rand(32, *shape))  # training mode: the running range
    else:  # a family whose range is constant
        ta.attach(model, weight=ta.QuantSpec(bits=16, granularity="per_channel"),
                  input=ta.QuantSpec(bits=16, quantizer="fixed_clip", options={"clip": 1.0}))
    return model.eval()


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("how", ["calibrated", "running", "fixed_clip"])
def test_a_bias_that_int32_cannot_hold_at_the_accumulator_step_stays_float(kind, how, tmp_path):
    model, shape = _tiny_weight_layer(kind)
    model = _constant_input_scale(model, how, shape)
    zero = torch.zeros(1, *shape)
    with torch.no_grad():
        out = model(zero).reshape(-1)[:4] if kind == "linear" else model(zero)[0, :, 0, 0]
    assert torch.allclose(out, torch.full((4,), 0.2), atol=1e-7)  # not clipped to int32 (0.05 was seen)
    x = torch.rand(8, *shape)
    path = ta.export_onnx(model, x[:2], tmp_path / "bias.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert np.abs(actual - model(x).numpy()).max() <= 1e-6


def test_a_bias_that_fits_still_goes_on_the_accumulator_grid():
    model, shape = _tiny_weight_layer("linear")
    ta.attach(model, 4, per_channel_weights=True, activation_grid="auto")
    ta.calibrate(model, [torch.rand(32, 1)])
    layer = model[0]
    step = layer.input_quantizer.qparams(torch.zeros(1)).scale * layer.weight_quantizer.qparams(layer.weight).channels
    from torchapprox.layers import quantized_bias, quantized_weight_and_qparams

    bias = quantized_bias(layer.bias, quantized_weight_and_qparams(layer)[1], layer.input_quantizer.qparams(torch.zeros(1)))
    assert torch.equal(bias, torch.round(layer.bias.detach() / step) * step)
    assert (bias - layer.bias).abs().max() <= step.max() / 2


# -------------------------------------- 2. reduced-precision models export float32 scales
def _small_activation_model(dtype, layers=2):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)) if layers == 2 else nn.Sequential(nn.Linear(8, 3))
    ta.attach(model, 8)
    return model.to(dtype).eval()


def _quantization_types(path):
    """The element types of every QuantizeLinear's input and scale in the graph."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return {(types.get(n.input[0]), types.get(n.input[1])) for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("layers, tolerance", [(1, 4e-3), (2, 2e-2)])
@pytest.mark.parametrize("bits, magnitude", [(8, 3e-3), (16, 0.5)])  # steps below float16's normal range
def test_float16_models_export_the_trained_numbers(bits, magnitude, layers, tolerance, tmp_path):
    """One layer: float16 rounding of the layer's own sum. Two: ORT's float16 Gemm rounds
    otherwise than torch's, which moves a value of the second layer's input by a level
    (0.2-0.6% of the output); with the scale computed in float16 it was 2-103%."""
    model = _small_activation_model(torch.float16, layers)
    ta.set_bitwidth(model, bits)
    x = (torch.rand(16, 8) * magnitude).half()
    path = ta.export_onnx(model, x[:2], tmp_path / "half.onnx")
    assert _quantization_types(path) == {(onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT)}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).float().numpy()
    assert np.abs(actual.astype(np.float32) - expected).max() <= tolerance * np.abs(expected).max()


def test_bfloat16_models_quantize_in_float32_in_the_graph(tmp_path):
    model = _small_activation_model(torch.bfloat16)
    x = (torch.rand(16, 8) * 3e-3).bfloat16()
    path = ta.export_onnx(model, x[:2], tmp_path / "bf16.onnx")
    assert _quantization_types(path) == {(onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT)}
    # ONNX Runtime has no bfloat16 Gemm on the CPU: the ONNX reference runtime runs it.
    from onnx.reference import ReferenceEvaluator

    ml_dtypes = pytest.importorskip("ml_dtypes")
    graph = onnx.load(str(path))
    (actual,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name:
                                                     x.float().numpy().astype(ml_dtypes.bfloat16)})
    with torch.no_grad():
        expected = model(x).float().numpy()
    assert np.abs(actual.astype(np.float32) - expected).max() <= 2e-2 * np.abs(expected).max()


# ----------------------------- 3. re-estimation leaves frozen normalisation layers alone
class NormClassifier(TinyClassifier):
    """A trained BatchNorm, and a BatchNorm and an InstanceNorm the module freezes."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.frozen_bn = nn.BatchNorm1d(8)
        self.frozen_in = nn.InstanceNorm1d(8, track_running_stats=True)
        with torch.no_grad():
            for norm in (self.frozen_bn, self.frozen_in):
                norm.running_mean.fill_(0.5)
                norm.running_var.fill_(2.0)

    def forward(self, x):
        x = self.frozen_bn(x) + self.frozen_in(x.unsqueeze(-1).expand(-1, -1, 2)).mean(-1)
        return self.net(x)

    def on_train_epoch_start(self):
        self.frozen_bn.eval()  # the usual fine-tuning freeze
        self.frozen_in.eval()


@pytest.mark.parametrize("companion", ["keyword", "callback"])
def test_reestimation_after_a_drop_skips_normalisation_layers_that_are_not_training(companion, tmp_path):
    model = NormClassifier()
    extra = [BatchNormReestimation()] if companion == "callback" else []
    qat = QuantizationAwareTraining({0: 8, 1: 4}, bn_reestimate=companion == "keyword", verbose=False)
    make_trainer(tmp_path, [qat, *extra], max_epochs=2).fit(model)
    for norm in (model.frozen_bn, model.frozen_in):
        assert torch.equal(norm.running_mean, torch.full((8,), 0.5))
        assert torch.equal(norm.running_var, torch.full((8,), 2.0))
    trained = model.net[1]
    assert int(trained.num_batches_tracked) == 4  # reset at the drop, 4 batches averaged since
    assert trained.momentum == 0.1  # its own momentum again after the epoch


# ----------------------------------------------- 4. a resumed run equals the uninterrupted one
class _BNTiny(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _qat_and_companions(standalone):
    options = dict(eval_range="running", verbose=False)
    if standalone:
        return [QuantizationAwareTraining({0: 8, 1: 4}, **options), LearningRateRewarm(6), BatchNormReestimation()]
    return [QuantizationAwareTraining({0: 8, 1: 4}, lr_rewarm_steps=6, bn_reestimate=True, **options)]


@pytest.mark.parametrize("standalone", [False, True])
def test_a_run_resumed_mid_rewarm_equals_the_uninterrupted_run(standalone, tmp_path):
    """4 steps an epoch; the drop at step 4 starts a 6-step ramp that crosses the end of
    epoch 1, where the interrupted run stops."""
    seed_everything(0, verbose=False)
    whole = _BNTiny()
    make_trainer(tmp_path / "whole", _qat_and_companions(standalone), max_epochs=3).fit(whole)

    seed_everything(0, verbose=False)
    first = _BNTiny()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path / "first", [*_qat_and_companions(standalone), checkpoint], max_epochs=2).fit(first)
    seed_everything(0, verbose=False)
    resumed = _BNTiny()
    make_trainer(tmp_path / "second", _qat_and_companions(standalone), max_epochs=3).fit(
        resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(torch.equal(ta.quantizer_state(whole)[k], v) for k, v in ta.quantizer_state(resumed).items())


# ---------------------------------------- 5. one scale per output channel, whatever the groups
def _per_output_channel_max(weight, groups, transposed):
    """max|w| of each output channel, written out: a ConvTranspose weight is [in, out/groups,
    ...] and output channel g * (out/groups) + j is column j of group g's rows."""
    if not transposed:
        return weight.reshape(weight.shape[0], -1).abs().amax(1)
    blocks = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
    return blocks.abs().amax(dim=(1, 3)).reshape(-1)


@pytest.mark.parametrize("make", [
    lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
    lambda: nn.ConvTranspose3d(4, 6, 2, groups=2), lambda: nn.ConvTranspose2d(6, 9, 3, groups=3),
    lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: nn.Conv1d(6, 6, 3, groups=6),
])
def test_grouped_layers_get_one_scale_per_output_channel(make, tmp_path):
    layer = make()
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    with torch.no_grad():  # groups of very different magnitudes: shared scales would zero some channels
        for group, block in enumerate(layer.weight.chunk(layer.groups, dim=0)):
            block.mul_(100.0 ** group)
    model = nn.Sequential(layer)
    ta.attach(model, 4, per_channel_weights=True)
    qp = layer.weight_quantizer.qparams(layer.weight)
    expected = _per_output_channel_max(layer.weight.detach(), layer.groups, transposed) / 7
    assert qp.channels.shape == (layer.out_channels,) and torch.allclose(qp.channels, expected)
    fake = layer.weight_quantizer(layer.weight).detach()
    assert (_per_output_channel_max(fake, layer.groups, transposed) > 0).all()  # no channel rounds to zeros
    x = torch.randn(2, layer.in_channels, *([5] * (layer.weight.dim() - 2)))
    model.eval()
    path = ta.export_onnx(model, x, tmp_path / "grouped.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected_out = model(x).numpy()
    assert np.abs(actual - expected_out).max() <= 1e-5 * np.abs(expected_out).max()


# ---------------------------------------------- 6. state a quantizer cannot use is an error
def test_state_the_target_quantizers_cannot_use_is_an_error_naming_the_quantizer():
    source = nn.Sequential(nn.Linear(4, 4))
    ta.attach(source, 8, eval_range="running")
    source(torch.randn(3, 4))
    running = ta.quantizer_state(source)
    target = nn.Sequential(nn.Linear(4, 4))
    ta.attach(target, 8)  # eval_range="batch": a running range would be ignored
    with pytest.raises(ValueError, match=r"'0\.input_quantizer.running_range' cannot be loaded into "
                                         r"'0\.input_quantizer': a running range is used only by a quantizer "
                                         r"with range='running'"):
        ta.load_quantizer_state(target, running)
    per_token = nn.Sequential(nn.Linear(4, 4))
    ta.attach(per_token, 8, per_token_inputs=True)
    with pytest.raises(ValueError, match="a static .calibrated. range is one per tensor"):
        ta.load_quantizer_state(per_token, {"0.input_quantizer.static_range": torch.tensor([-1.0, 1.0])})
    with pytest.raises(KeyError, match="has no quantizer in the model"):
        ta.load_quantizer_state(target, {"3.input_quantizer.static_range": torch.tensor([-1.0, 1.0])})
    assert ta.quantizer_state(target) == {} and ta.quantizer_state(per_token) == {}


def test_a_checkpoint_resumed_with_other_options_is_an_error(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [QuantizationAwareTraining(4, eval_range="running", verbose=False), checkpoint],
                 max_epochs=1).fit(TinyClassifier())
    trainer = make_trainer(tmp_path / "again", [QuantizationAwareTraining(4, verbose=False)])
    with pytest.raises(ValueError, match=r"checkpoint quantized net\.0\.input with range='running', this run "
                                         r"with range='dynamic'"):
        trainer.test(TinyClassifier(), ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)


# ------------------------------------ 7. the last validation uses the scales that get exported
class ScaleProbe(Callback):
    def __init__(self):
        self.static_at_validation = {}

    def on_validation_start(self, trainer, pl_module):
        quantizers = [q for q in pl_module.modules() if isinstance(q, ta.MinMaxQuant) and q.role == "input"]
        self.static_at_validation[trainer.current_epoch] = all(q.static_range is not None for q in quantizers)


def test_calibration_happens_before_the_last_validation(tmp_path):
    probe = ScaleProbe()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = TinyClassifier()
    trainer = make_trainer(tmp_path, [QuantizationAwareTraining(4, calibrate_batches=2, verbose=False), probe,
                                      checkpoint], max_epochs=2)
    trainer.fit(model)
    assert probe.static_at_validation == {0: False, 1: True}
    logged = float(trainer.callback_metrics["val/acc"])
    from callbacks import restore_quantized

    restored = restore_quantized(TinyClassifier(), tmp_path / "ckpt" / "last.ckpt")
    again = make_trainer(tmp_path / "v", []).validate(restored, verbose=False)[0]["val/acc"]
    assert again == pytest.approx(logged, abs=1e-7)  # the checkpoint's static scales gave the logged number
    assert set(ta.quantizer_state(restored)) == {"net.0.input_quantizer.static_range",
                                                 "net.2.input_quantizer.static_range"}


def test_max_steps_calibrates_at_the_last_step_too(tmp_path):
    probe = ScaleProbe()
    trainer = make_trainer(tmp_path, [QuantizationAwareTraining(4, calibrate_batches=1, verbose=False), probe],
                           max_epochs=5, max_steps=8)  # ends with epoch 1, not the 5 epochs
    trainer.fit(TinyClassifier())
    assert probe.static_at_validation == {0: False, 1: True}


# --------------------------------------------------- 8. milestones that collide are an error
def test_milestones_that_round_to_the_same_epoch_are_an_error():
    with pytest.raises(ValueError, match=r"milestones 0% and 1% both fall on epoch 0 of a 30-epoch run"):
        StepBitwidth.from_percent({0: 16, 1: 8, 67: 4}, 30)
    with pytest.raises(ValueError, match=r"milestones 33% and 34% both fall on epoch 1 of a 3-epoch run"):
        StepBitwidth.from_percent({0: 16, 33: 8, 34: 4}, 3)
    assert StepBitwidth.from_percent({0: 16, 33: 8, 67: 4}, 30).milestones == {0: 16, 10: 8, 20: 4}


# ------------------------------------------- 10. torch.compile through an anneal compiles once a bitwidth
class CompiledTiny(TinyClassifier):
    def forward(self, x):
        if not hasattr(self, "_compiled"):
            # the "eager" backend: dynamo's guards and recompile limit, without code generation
            self.__dict__["_compiled"] = torch.compile(self.net, backend="eager")
        return self._compiled(x)


def test_an_anneal_through_many_bitwidths_stays_compiled(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    import torch._dynamo.config as dynamo_config

    limit = dynamo_config.recompile_limit
    dynamo_config.recompile_limit = 8  # torch's default
    try:
        qat = QuantizationAwareTraining(LinearBitwidth(16, 2, 0, 14), interval="step", verbose=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path, [qat], max_epochs=4).fit(CompiledTiny())
        assert not [w for w in caught if "recompile" in str(w.message).lower()]
        assert dynamo_config.recompile_limit >= 2 * 15 + 8
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] <= 2 * 15 + 2  # once per bitwidth and mode
    finally:
        dynamo_config.recompile_limit = limit
        torch._dynamo.reset()
