"""QuantizationAwareTraining with the real Trainer, TensorBoard event files read back."""

import math

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchapprox as ta
from callbacks import QuantizationAwareTraining
from callbacks.schedules import CosineBitwidth, LinearBitwidth, StepBitwidth
from lit_helpers import BitwidthProbe, TinyClassifier, make_trainer, read_scalars
from models import TwoInputNet

EPOCHS = 4  # 64 samples / batch 16 = 4 steps per epoch


@pytest.fixture(autouse=True)
def seed():
    seed_everything(0, verbose=False)


def fit(tmp_path, schedule, model=None, max_epochs=EPOCHS, qat_kwargs=None, extra_callbacks=(), **trainer_kwargs):
    model = model or TinyClassifier()
    probe = BitwidthProbe()
    qat = QuantizationAwareTraining(schedule, **(qat_kwargs or {}))
    trainer = make_trainer(tmp_path, [qat, probe, *extra_callbacks], max_epochs=max_epochs, **trainer_kwargs)
    trainer.fit(model)
    return trainer, model, probe


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (4, [4, 4, 4, 4]),
        ({0: 16, 2: 8, 3: 4}, [16, 16, 8, 4]),
        ([16, 12], [16, 12, 12, 12]),
        (StepBitwidth({0: 8, 1: 3}), [8, 3, 3, 3]),
        (LinearBitwidth(16, 4, 0, 3), [16, 12, 8, 4]),
        (CosineBitwidth(16, 4, 0, 3), [16, 13, 7, 4]),
        (lambda epoch: 10 - 2 * epoch, [10, 8, 6, 4]),
    ],
)
def test_bitwidth_per_epoch_follows_the_schedule(tmp_path, schedule, expected):
    _, model, probe = fit(tmp_path, schedule)
    assert [probe.train[e] for e in range(EPOCHS)] == [{b} for b in expected]
    assert [probe.val[e] for e in range(EPOCHS)] == [{b} for b in expected]  # validation too
    assert model.net[0].weight_quantizer.bitwidth == expected[-1]


def test_every_quant_tag_reaches_tensorboard_with_finite_values(tmp_path):
    _, _, probe = fit(tmp_path, {0: 8, 1: 6, 2: 4}, max_epochs=3, qat_kwargs={"log_every_n_steps": 4})
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    quant_tags = {tag for tag in scalars if tag.startswith("quant/")}
    expected = {"quant/bitwidth"} | {
        f"quant/{layer}/{kind}/{stat}"
        for layer in ("net.0", "net.2")
        for kind in ("weight", "input")
        for stat in ("scale_factor", "mse", "sqnr_db")
    }
    assert quant_tags == expected | {"quant/transition"}
    assert scalars["quant/transition"] == [(4, 6.0), (8, 4.0)]  # each drop, at its step
    for tag in expected:
        assert [step for step, _ in scalars[tag]] == [0, 4, 8], tag
        assert all(math.isfinite(value) for _, value in scalars[tag]), tag
    assert [value for _, value in scalars["quant/bitwidth"]] == [8.0, 6.0, 4.0]
    assert probe.recording_steps == [0, 4, 8]  # statistics computed on logging steps only
    for layer in ("net.0", "net.2"):
        sqnr = [value for _, value in scalars[f"quant/{layer}/weight/sqnr_db"]]
        # about 6 dB per bit: 8 -> 6 -> 4 bits loses about 12 dB at each change
        assert 9 < sqnr[0] - sqnr[1] < 15 and 9 < sqnr[1] - sqnr[2] < 15, sqnr
    assert {"train/loss", "val/loss", "val/acc"} <= set(scalars)


def test_logged_scale_factor_matches_the_weight_it_was_taken_from(tmp_path):
    class WeightAtStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                self.max_abs = pl_module.net[2].weight.detach().abs().max().item()

    spy = WeightAtStep()
    fit(tmp_path, 4, max_epochs=1, extra_callbacks=[spy])
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    step, value = scalars["quant/net.2/weight/scale_factor"][0]
    assert step == 0 and value == pytest.approx(7 / spy.max_abs, rel=1e-6)


def test_trainer_interval_is_the_default_and_the_callback_interval_wins(tmp_path):
    _, _, probe = fit(tmp_path / "a", 8, max_epochs=2, log_every_n_steps=3)
    assert probe.recording_steps == [0, 3, 6]
    _, _, probe = fit(tmp_path / "b", 8, max_epochs=2, log_every_n_steps=1, qat_kwargs={"log_every_n_steps": 5})
    assert probe.recording_steps == [0, 5]
    scalars = read_scalars(tmp_path / "b" / "tb" / "version_0")
    assert [step for step, _ in scalars["quant/net.0/input/mse"]] == [0, 5]


def test_histograms_at_their_own_interval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tmp_path, 8, max_epochs=1, qat_kwargs={"log_histograms_every_n_steps": 2})
    accumulator = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    accumulator.Reload()
    assert "quant/net.0/weight/error" in accumulator.Tags()["histograms"]
    assert [e.step for e in accumulator.Histograms("quant/net.0/weight/values")] == [0, 2]


def test_resume_mid_anneal_continues_at_the_scheduled_bitwidth(tmp_path):
    schedule = LinearBitwidth(16, 4, 0, 3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, schedule, max_epochs=2, extra_callbacks=[checkpoint])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # plain types only
    saved = state["callbacks"]["QuantizationAwareTraining"]
    assert (saved["epoch"], saved["bitwidth"], saved["quantization"]["tensors"]) == (1, 12, {})
    # The options it needs to rebuild the model travel with it (the specs at their current bits).
    assert saved["quantization"]["layers"]["net.0"]["input"]["spec"] == ta.QuantSpec(bits=12, grid="auto").to_dict()

    probe = BitwidthProbe()
    trainer = make_trainer(tmp_path, [QuantizationAwareTraining(schedule), probe], max_epochs=EPOCHS,
                           num_sanity_val_steps=1, version=1)
    trainer.fit(TinyClassifier(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert probe.train == {2: {8}, 3: {4}}


def test_checkpoint_loads_strictly_into_the_plain_model(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _, model, _ = fit(tmp_path, 4, max_epochs=2, extra_callbacks=[checkpoint])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert list(state["state_dict"]) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    plain = TinyClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", strict=True)
    assert not any(isinstance(m, ta.ApproxQuantizer) for m in plain.modules())
    assert torch.equal(plain.net[0].weight, model.net[0].weight)  # the float masters


def test_test_after_fit_with_best_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", mode="min")
    trainer, model, probe = fit(tmp_path, LinearBitwidth(16, 4, 0, 3), extra_callbacks=[checkpoint])
    best_epoch = torch.load(checkpoint.best_model_path, weights_only=True)["epoch"]
    results = trainer.test(model, ckpt_path="best", verbose=False)
    assert 0.0 <= results[0]["test/acc"] <= 1.0
    assert probe.test == {LinearBitwidth(16, 4, 0, 3)(best_epoch)}
    assert sum(isinstance(m, ta.ApproxQuantizer) for m in model.modules()) == 4


def test_fit_twice_on_the_same_model_does_not_stack(tmp_path):
    _, model, _ = fit(tmp_path / "first", 6, max_epochs=1)
    _, model, probe = fit(tmp_path / "second", 4, model=model, max_epochs=2)
    assert probe.train == {0: {4}, 1: {4}}
    assert sum(isinstance(m, ta.ApproxQuantizer) for m in model.modules()) == 4


def test_model_pruning_in_the_same_run(tmp_path):
    pruning = ModelPruning("l1_unstructured", amount=0.5, make_pruning_permanent=True, verbose=0)
    _, model, probe = fit(tmp_path, 4, max_epochs=2, extra_callbacks=[pruning])
    weight = model.net[0].weight
    assert isinstance(weight, nn.Parameter) and (weight == 0).float().mean() >= 0.5
    assert probe.train == {0: {4}, 1: {4}}
    x = torch.randn(5, 8)
    expected = nn.functional.linear(ta.MinMaxQuant(4)(x), ta.MinMaxQuant(4)(weight), model.net[0].bias)
    assert torch.equal(model.net[0](x), expected)  # pruned, then quantized


class TinyTransformer(LightningTransformer):
    """Lightning's demo Transformer (MultiheadAttention inside) on random tokens."""

    def __init__(self):
        super().__init__(vocab_size=50)

    def prepare_data(self):
        pass

    def train_dataloader(self):
        inputs, targets = torch.randint(0, 50, (2, 8, 12))  # 8 sequences of 12 tokens
        return DataLoader(TensorDataset(inputs, targets), batch_size=2)


def test_lightning_demo_transformer(tmp_path):
    qat = QuantizationAwareTraining(6, log_every_n_steps=2)
    model = TinyTransformer()
    trainer = make_trainer(tmp_path, [qat], max_epochs=1, limit_train_batches=4)
    trainer.fit(model)
    assert "model.transformer.encoder.layers.0.self_attn" in qat.quantized_layers
    assert "model.transformer.decoder.layers.0.multihead_attn.out_proj" in qat.quantized_layers
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    tag = "quant/model.transformer.encoder.layers.0.self_attn/input/sqnr_db"
    assert [step for step, _ in scalars[tag]] == [0, 2]


class TwoInputModule(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.model = TwoInputNet()

    def forward(self, image, side):
        return self.model(image, side, temperature=2.0)

    def _loss(self, batch):
        image, side, y = batch
        logits = self(image, side)
        return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 1, 8, 8), torch.randn(16, 3), torch.randint(0, 2, (16,))), batch_size=8)

    val_dataloader = train_dataloader


def test_model_with_several_and_keyword_inputs(tmp_path):
    _, model, probe = fit(tmp_path, 5, model=TwoInputModule(), max_epochs=1, qat_kwargs={"exclude": ["net.*"]})
    assert probe.train == {0: {5}}
    assert hasattr(model.model.head, "weight_quantizer") and not hasattr(model.net[0], "weight_quantizer")


def test_model_without_quantizable_layers_stops_with_a_clear_error(tmp_path):
    class NoLayers(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Identity())
            self.scale = nn.Parameter(torch.ones(8, 3))

        def forward(self, x):
            return self.net(x) @ self.scale

    with pytest.raises(ValueError, match="NoLayers has no layer to quantize"):
        fit(tmp_path, 8, model=NoLayers(), max_epochs=1)
    with pytest.raises(ValueError, match=r"no layer to quantize \(exclude=\['net\.\*'\]\)"):
        fit(tmp_path, 8, max_epochs=1, qat_kwargs={"exclude": ["net.*"]})


def test_divergence_stops_training_naming_layer_and_step(tmp_path):
    class Explode(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net[2].weight[0, 0] = float("inf")

    with pytest.raises(RuntimeError, match=r"quant/net\.2/weight/\w+ is (inf|nan) at step 2 \(layer 'net\.2'\).*diverged"):
        fit(tmp_path, 8, max_epochs=2, extra_callbacks=[Explode()])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"schedule": 1}, ValueError, r"`bits` must be an int in 2\.\.32, got 1"),
        ({"schedule": "8"}, TypeError, r"`schedule` must be"),
        ({"schedule": {1: 8}}, ValueError, "epoch 0"),
        ({"quantize_weights": "no"}, TypeError, r"`quantize_weights` must be True or False"),
        ({"quantize_weights": False, "quantize_activations": False}, ValueError, "nothing would be quantized"),
        ({"exclude": 3}, TypeError, r"`exclude` must be a pattern"),
        ({"log_every_n_steps": 0}, ValueError, r"`log_every_n_steps` must be None or an int >= 1.*got 0"),
        ({"log_histograms_every_n_steps": 2.5}, ValueError, r"`log_histograms_every_n_steps`"),
        ({"verbose": None}, TypeError, r"`verbose` must be True or False"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, error, message):
    with pytest.raises(error, match=message):
        QuantizationAwareTraining(**kwargs)


def test_callable_schedule_with_a_bad_later_epoch_fails_before_training(tmp_path):
    probe = BitwidthProbe()
    qat = QuantizationAwareTraining(lambda epoch: 8 if epoch < 2 else 1)
    trainer = make_trainer(tmp_path, [qat, probe], max_epochs=3)
    with pytest.raises(ValueError, match=r"`schedule\(2\)` must be an int in 2\.\.32, got 1"):
        trainer.fit(TinyClassifier())
    assert probe.train == {}


# --------------------------------------------------------------- low-bit training options
class StepProbe(Callback):
    """Bitwidth, learning rate and BatchNorm state seen inside each training step."""

    def __init__(self):
        self.bits, self.lrs, self.bn = {}, {}, {}

    def on_train_start(self, trainer, pl_module):
        # the rate the optimizer steps with: read inside its step (after the callback's hook)
        def record(optimizer, args, kwargs):
            self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]

        trainer.optimizers[0].register_step_pre_hook(record)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.bits[step] = BitwidthProbe._bits(pl_module)
        bn = next((m for m in pl_module.modules() if isinstance(m, nn.BatchNorm1d)), None)
        if bn is not None:
            self.bn[step] = (bn.momentum, int(bn.num_batches_tracked))


class BNClassifier(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def test_step_interval_follows_the_global_step(tmp_path):
    probe = StepProbe()
    _, _, epochs = fit(tmp_path, lambda step: 8 if step < 3 else (6 if step < 6 else 4), max_epochs=3,
                       qat_kwargs={"interval": "step"}, extra_callbacks=[probe])
    assert [probe.bits[s] for s in range(12)] == [{8}] * 3 + [{6}] * 3 + [{4}] * 6
    assert epochs.val == {0: {6}, 1: {4}, 2: {4}}  # validation at the current bitwidth


def test_bitwidth_drop_resets_batchnorm_and_rewarms_the_learning_rate(tmp_path):
    probe = StepProbe()
    fit(tmp_path, {0: 8, 1: 4}, model=BNClassifier(), max_epochs=3, extra_callbacks=[probe],
        qat_kwargs={"bn_reestimate": True, "lr_rewarm_steps": 3})
    # epoch 1 (steps 4-7) starts at 4 bits: statistics restart, averaged cumulatively
    assert [probe.bn[s] for s in range(4, 8)] == [(None, 0), (None, 1), (None, 2), (None, 3)]
    assert probe.bn[8] == (0.1, 4)  # the next epoch: the module's own momentum again
    lr = 0.05
    assert [probe.lrs[s] for s in range(3, 9)] == pytest.approx([lr, lr / 3, 2 * lr / 3, lr, lr, lr])
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    assert scalars["quant/transition"] == [(4, 4.0)]


class DecayingClassifier(TinyClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5)}


def test_lr_rewarm_composes_with_a_scheduler(tmp_path):
    """ExponentialLR halves the rate each epoch; a re-warm after a drop at epoch 1 scales the
    rate inside the optimizer steps only, so the scheduler's own values stay 1, .5, .25, .125."""
    probe = StepProbe()
    fit(tmp_path, {0: 8, 1: 4}, model=DecayingClassifier(), max_epochs=4, extra_callbacks=[probe],
        qat_kwargs={"lr_rewarm_steps": 2})
    epoch_starts = [probe.lrs[step] for step in (0, 4, 8, 12)]
    assert epoch_starts == pytest.approx([1.0, 0.5 / 2, 0.25, 0.125])  # step 4: the first re-warm step
    assert [probe.lrs[step] for step in (4, 5, 6)] == pytest.approx([0.25, 0.5, 0.5])


def test_overrides_and_activation_grid_through_the_callback(tmp_path):
    _, model, probe = fit(tmp_path, {0: 8, 1: 3}, max_epochs=2,
                          qat_kwargs={"bitwidth_overrides": {"net.2": 8}, "activation_grid": "auto"})
    assert probe.train == {0: {8}, 1: {3, 8}}
    assert model.net[2].weight_quantizer.bitwidth == 8 and model.net[0].weight_quantizer.bitwidth == 3
    assert model.net[2].input_quantizer.grid == "auto"


def test_recompute_inputs_reaches_the_input_quantizers(tmp_path):
    _, model, _ = fit(tmp_path, 8, max_epochs=1, qat_kwargs={"recompute_inputs": False})
    assert [model.net[i].input_quantizer.recompute_in_backward for i in (0, 2)] == [False, False]
    _, model, _ = fit(tmp_path / "default", 8, max_epochs=1)
    assert [model.net[i].input_quantizer.recompute_in_backward for i in (0, 2)] == [True, True]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"interval": "batch"}, ValueError, r"`interval` must be 'epoch' or 'step', got 'batch'"),
        ({"lr_rewarm_steps": -1}, ValueError, r"`lr_rewarm_steps` must be an int >= 0, got -1"),
        ({"bn_reestimate": "yes"}, TypeError, r"`bn_reestimate` must be True or False"),
        ({"recompute_inputs": 0}, TypeError, r"`recompute_inputs` must be True or False, got 0"),
        ({"activation_grid": "none"}, ValueError, r"`activation_grid` must be one of"),
        ({"bitwidth_overrides": {"net.0": 40}}, ValueError, r"`bitwidth_overrides\['net.0'\]` must be an int in 2\.\.32, got 40"),
    ],
)
def test_bad_low_bit_arguments_fail_in_the_constructor(kwargs, error, message):
    with pytest.raises(error, match=message):
        QuantizationAwareTraining(8, **kwargs)


def test_running_ranges_live_in_the_callback_state_and_survive_a_restart(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, model, _ = fit(tmp_path, 4, max_epochs=2, extra_callbacks=[checkpoint],
                            qat_kwargs={"eval_range": "running", "range_gradient": True})
    ranges = ta.quantizer_state(model)
    assert set(ranges) == {"net.0.input_quantizer.running_range", "net.2.input_quantizer.running_range"}
    tested = trainer.test(model, verbose=False)[0]["test/acc"]  # the same quantizers: ranges kept
    assert torch.equal(ta.quantizer_state(model)["net.0.input_quantizer.running_range"],
                       ranges["net.0.input_quantizer.running_range"])
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert list(state["state_dict"]) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    saved = next(v for k, v in state["callbacks"].items() if "QuantizationAwareTraining" in k)
    saved = saved["quantization"]["tensors"]
    assert all(torch.equal(saved[k], ranges[k]) for k in ranges)
    # a fresh process: new model, new callback, the checkpoint's ranges in evaluation
    fresh = TinyClassifier()
    qat = QuantizationAwareTraining(4, eval_range="running", range_gradient=True)
    again = make_trainer(tmp_path / "again", [qat]).test(fresh, ckpt_path=tmp_path / "ckpt" / "last.ckpt",
                                                          verbose=False)[0]["test/acc"]
    assert all(torch.equal(ta.quantizer_state(fresh)[k], ranges[k]) for k in ranges)
    assert again == tested
