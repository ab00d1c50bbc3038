"""The ApproximateProducts callback with the real Trainer: exact QAT first, approximate
products from a scheduled epoch, error telemetry in TensorBoard, and the assignment in the
checkpoint (issue 22)."""

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import TinyClassifier, make_trainer, read_scalars

import torchapprox as ta
from callbacks import ApproximateProducts, ConstantBitwidth, QuantizationAwareTraining, restore_quantized
from torchapprox.multipliers import Multiplier, drum, exact


class MultiplierProbe(Callback):
    """The multiplier of each layer, seen from inside the training and validation loops."""

    def __init__(self):
        self.train, self.val = {}, {}

    @staticmethod
    def _names(module):
        return {layer: m.name for layer, m in ta.assigned_multipliers(module).items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train[trainer.current_epoch] = self._names(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val[trainer.current_epoch] = self._names(pl_module)


def qat(unsigned=False):
    return QuantizationAwareTraining(schedule=ConstantBitwidth(8), verbose=False,
                                     input=ta.QuantSpec(grid="unsigned") if unsigned else None)


def test_layers_switch_at_the_scheduled_epoch_and_log_the_error_they_add(tmp_path):
    probe = MultiplierProbe()
    make_trainer(tmp_path, [qat(), ApproximateProducts(drum(3), start_epoch=2, verbose=False), probe],
                 max_epochs=3).fit(TinyClassifier())
    both = {"net.0": "drum(3)", "net.2": "drum(3)"}
    assert probe.train == {0: {}, 1: {}, 2: both}
    assert probe.val == {0: {}, 1: {}, 2: both}
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    steps_per_epoch = 4
    for layer in ("net.0", "net.2"):
        logged = scalars[f"approx/{layer}/error_std"]
        assert [step for step, _ in logged] == list(range(2 * steps_per_epoch, 3 * steps_per_epoch))
        assert all(0.01 < value < 1.0 for _, value in logged)  # drum(3): a few % to tens of % of the output


def test_the_exact_multiplier_logs_no_error_and_trains_as_plain_qat(tmp_path):
    seed_everything(0, verbose=False)
    plain = TinyClassifier()
    make_trainer(tmp_path / "plain", [qat()], max_epochs=2).fit(plain)
    seed_everything(0, verbose=False)
    approximate = TinyClassifier()
    make_trainer(tmp_path / "exact", [qat(), ApproximateProducts(exact(), verbose=False)], max_epochs=2).fit(approximate)
    for (name, a), b in zip(plain.state_dict().items(), approximate.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    scalars = read_scalars(tmp_path / "exact" / "tb" / "version_0")
    assert all(value == 0.0 for _, value in scalars["approx/net.0/error_std"])


def test_a_resumed_run_keeps_the_assignment_and_a_checkpoint_restores_it(tmp_path):
    # a table made for unsigned inputs only: the inputs go on the unsigned grid (net.2's comes from a ReLU)
    table = drum(4, input_signed=False).table.clone()
    table[3, 128 + 5] += 7  # a table no generator makes: it travels in the checkpoint
    custom = Multiplier(table, input_signed=False, name="custom")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path / "first", [qat(unsigned=True), ApproximateProducts(custom, start_epoch=1, pattern="net.2",
                                                                 verbose=False), checkpoint], max_epochs=2
                 ).fit(TinyClassifier())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["callbacks"]["ApproximateProducts"]["layers"] == ["net.2"]

    probe = MultiplierProbe()
    resumed = TinyClassifier()
    # the resumed run is given another multiplier: the checkpoint's assignment wins, as it was trained
    make_trainer(tmp_path / "second", [qat(unsigned=True), ApproximateProducts(drum(2), start_epoch=1, verbose=False), probe],
                 max_epochs=3).fit(resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert probe.train == {2: {"net.2": "custom"}}
    assert torch.equal(ta.assigned_multipliers(resumed)["net.2"].table, table)

    restored = restore_quantized(TinyClassifier(), tmp_path / "ckpt" / "last.ckpt")
    assert torch.equal(ta.assigned_multipliers(restored)["net.2"].table, table) and list(ta.assigned_multipliers(restored)) == ["net.2"]


def test_a_switch_the_operands_cannot_take_stops_the_run_naming_the_layer(tmp_path):
    callback = QuantizationAwareTraining(schedule=ConstantBitwidth(12), verbose=False)
    with pytest.raises(ValueError, match=r"layer 'net.0' \(multiplier 'drum\(4\)'\): the weight is quantized to 12"):
        make_trainer(tmp_path, [callback, ApproximateProducts(drum(4), verbose=False)], max_epochs=1
                     ).fit(TinyClassifier())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(multiplier="drum4"), TypeError, "`multiplier` must be a torchapprox.multipliers.Multiplier, got str"),
    (dict(multiplier=exact(), start_epoch=-1), ValueError, "`start_epoch` must be an int >= 0, got -1"),
    (dict(multiplier=exact(), gradient="slope"), ValueError, "`gradient` must be one of 'ste', 'table', got 'slope'"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        ApproximateProducts(**kwargs)


def test_start_epoch_at_the_end_tests_the_multiplier_dropped_into_the_exactly_trained_model(tmp_path):
    probe = MultiplierProbe()
    seen = {}

    class TestProbe(Callback):
        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.update({layer: m.name for layer, m in ta.assigned_multipliers(pl_module).items()})

    trainer = make_trainer(tmp_path, [qat(), ApproximateProducts(drum(2), start_epoch=2, verbose=False), probe,
                                      TestProbe()], max_epochs=2)
    model = TinyClassifier()
    trainer.fit(model)
    assert probe.train == {0: {}, 1: {}} and probe.val == {0: {}, 1: {}}
    trainer.validate(model, verbose=False)  # an evaluation after fitting switches
    assert ta.assigned_multipliers(model)
    trainer.test(model, verbose=False)
    assert seen == {"net.0": "drum(2)", "net.2": "drum(2)"}


def test_a_start_epoch_after_the_run_s_end_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"`start_epoch` 3 is after the run's end \(max_epochs=2\)"):
        make_trainer(tmp_path, [qat(), ApproximateProducts(drum(4), start_epoch=3, verbose=False)], max_epochs=2
                     ).fit(TinyClassifier())


def test_resuming_with_another_multiplier_keeps_the_checkpoint_s_and_says_so(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path / "first", [qat(), ApproximateProducts(drum(4), verbose=False), checkpoint], max_epochs=1
                 ).fit(TinyClassifier())
    resumed = TinyClassifier()
    with pytest.warns(UserWarning, match=r"the checkpoint's layers multiply with drum\(4\), which this run keeps"):
        make_trainer(tmp_path / "second", [qat(), ApproximateProducts(exact(), verbose=False)], max_epochs=2
                     ).fit(resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert {m.name for m in ta.assigned_multipliers(resumed).values()} == {"drum(4)"}
