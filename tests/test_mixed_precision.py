"""Per-layer precision under a budget (issue 23): the exact solver against brute force, the
budget arithmetic against hand-computed sizes and bit-operations, and sensitivity that
leaves the model as it was and predicts the measured loss increase on a trained model."""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta
from torchapprox.sensitivity import Sensitivity


def brute_force(sens, budget, choices, cost):
    from torchapprox.assignment import layer_costs

    costs = layer_costs(sens.params, sens.macs, choices, cost)
    layers = list(sens.values)
    best = None
    for picked in itertools.product(choices, repeat=len(layers)):
        total = sum(costs[layer][b] for layer, b in zip(layers, picked))
        if total > budget * (1 + 1e-12):
            continue
        value = sum(sens.values[layer][b] for layer, b in zip(layers, picked))
        if best is None or value < best[0] - 1e-12:
            best = (value, total)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_the_solver_equals_brute_force(seed):
    rng = random.Random(seed)
    choices = (2, 3, 4, 8)
    layers = [f"l{i}" for i in range(rng.randint(1, 6))]
    values = {}
    for layer in layers:  # decreasing in bits, as sensitivities are, with noise (even negative)
        base = rng.uniform(0.01, 5)
        values[layer] = {b: base / 4 ** b * rng.uniform(0.5, 1.5) - rng.uniform(0, 1e-4) for b in choices}
    sens = Sensitivity(values, {layer: rng.randint(10, 5000) for layer in layers},
                       {layer: rng.randint(100, 10 ** 6) for layer in layers}, "test", 0)
    for cost in ("weights", "bytes", "bit_operations"):
        from torchapprox.assignment import layer_costs

        costs = layer_costs(sens.params, sens.macs, choices, cost)
        low = sum(min(c.values()) for c in costs.values())
        high = sum(max(c.values()) for c in costs.values())
        for fraction in (0.0, 0.1, 0.35, 0.6, 1.0):
            budget = low + fraction * (high - low)
            assignment = ta.assign_bitwidths(sens, budget, choices, cost)
            expected_value, _ = brute_force(sens, budget, choices, cost)
            assert assignment.sensitivity == pytest.approx(expected_value, abs=1e-12)
            assert assignment.cost <= budget * (1 + 1e-12)
            assert sum(costs[layer][b] for layer, b in assignment.bits.items()) == pytest.approx(assignment.cost)


def small_sensitivity():
    # params: 1000 and 3000; MACs per sample: 5000 and 2000
    return Sensitivity({"a": {2: 1.0, 4: 0.1, 8: 0.0}, "b": {2: 0.5, 4: 0.05, 8: 0.0}},
                       {"a": 1000, "b": 3000}, {"a": 5000, "b": 2000}, "test", 0)


def test_budgets_by_hand():
    sens = small_sensitivity()
    # average bits: (1000 * 8 + 3000 * 2) / 4000 = 3.5 fits 3.5; (1000*2 + 3000*4)/4000 = 3.5 too:
    # the first predicts 0.5, the second 1.05
    assignment = ta.assign_bitwidths(sens, 3.5, (2, 4, 8), "weights")
    assert assignment.bits == {"a": 8, "b": 2} and assignment.cost == pytest.approx(3.5)
    assert assignment.rules == {"a": {"bits": 8}, "b": {"bits": 2}}
    # bytes: a at 4 bits = 500 B, b at 4 bits = 1500 B: 2000 B; a at 8 and b at 2: 1000 + 750 = 1750 B
    assignment = ta.assign_bitwidths(sens, 1750, (2, 4, 8), "bytes")
    assert assignment.bits == {"a": 8, "b": 2} and assignment.cost == pytest.approx(1750)
    # bit-operations: 5000 * 4 * 4 + 2000 * 4 * 4 = 112000; a at 8, b at 2: 320000 + 8000
    assignment = ta.assign_bitwidths(sens, 112000, (2, 4, 8), "bit_operations")
    assert assignment.bits == {"a": 4, "b": 4} and assignment.cost == 112000
    assert "bit_operations: 112000 of a budget of 112000" in assignment.table()


@pytest.mark.parametrize("call, error, message", [
    (lambda s: ta.assign_bitwidths(s, 1.9), ValueError,
     r"budget 1.9 \(weights\) is infeasible: the smallest feasible budget with choices \[2, 3, 4, 8\] is 2"),
    (lambda s: ta.assign_bitwidths(s, 3, choices=(2, 3)), ValueError, r"layer 'a' has no sensitivity at \[3\] bits"),
    (lambda s: ta.assign_bitwidths(s, 3, choices=(1, 2)), ValueError, r"`choices` must hold ints in 2..32, got 1"),
    (lambda s: ta.assign_bitwidths(s, 0), ValueError, "`budget` must be a positive number, got 0"),
    (lambda s: ta.assign_bitwidths(s, 3, cost="flops"), ValueError, "`cost` must be one of 'weights', 'bytes'"),
    (lambda s: ta.assign_bitwidths({"a": {2: 1.0}}, 3), TypeError, "`sensitivity` must be what ta.sensitivity"),
])
def test_bad_arguments_are_named(call, error, message):
    sens = small_sensitivity()
    sens.values["a"][3] = sens.values["b"][3] = 0.2
    if "no sensitivity" in message:
        del sens.values["a"][3]
    with pytest.raises(error, match=message):
        call(sens)


def test_bit_operations_need_counted_macs():
    sens = small_sensitivity()
    sens.macs["b"] = None
    with pytest.raises(ValueError, match="multiply-accumulates of layer 'b' were not counted"):
        ta.assign_bitwidths(sens, 10 ** 9, (2, 4, 8), "bit_operations")


# --------------------------------------------------------------------------- sensitivity
def digits_model_and_batches(train_steps=150):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(train_steps):
        index = torch.randint(0, 1500, (64,))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batches = [(x[1500 + 64 * i:1500 + 64 * (i + 1)], y[1500 + 64 * i:1500 + 64 * (i + 1)]) for i in range(4)]
    return model, batches


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("method", ["hessian", "direct"])
def test_sensitivity_leaves_the_model_and_the_random_state_as_they_were(method):
    model, batches = digits_model_and_batches(train_steps=5)
    ta.attach(model, 8, weight={"quantizer": "lsq"}, input={"grid": "auto", "range": "running"})
    model.train()
    model(batches[0][0])  # running ranges and learned steps hold state
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bits = [q.bitwidth for q in model.modules() if isinstance(q, ta.ApproxQuantizer)]
    rng = torch.get_rng_state()
    result = ta.sensitivity(model, batches, loss_fn, (2, 4), method=method)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [q.bitwidth for q in model.modules() if isinstance(q, ta.ApproxQuantizer)] == bits
    assert set(result.values) == {"0", "2", "5", "7"} and all(set(v) == {2, 4} for v in result.values.values())
    # the counts by hand: parameters of each weight, MACs per sample (8x8 outputs, 3x3 taps)
    assert result.params == {"0": 72, "2": 1152, "5": 32768, "7": 320}
    assert result.macs == {"0": 64 * 8 * 9, "2": 64 * 16 * 8 * 9, "5": 1024 * 32, "7": 320}
    assert result.passes == (4 * (1 + 4 * 2) if method == "direct" else 4 * (2 + 4))


def test_direct_sensitivity_is_the_measured_loss_increase():
    model, batches = digits_model_and_batches(train_steps=40)
    ta.attach(model, 8)
    result = ta.sensitivity(model, batches, loss_fn, (3,), method="direct")
    with torch.no_grad():
        reference = sum(float(loss_fn(model.eval(), b)) for b in batches) / 4
        model[2].weight_quantizer.bitwidth = model[2].input_quantizer.bitwidth = 3
        lowered = sum(float(loss_fn(model, b)) for b in batches) / 4
    assert result.values["2"][3] == pytest.approx(lowered - reference, rel=1e-6, abs=1e-9)


def test_the_hessian_method_finds_the_most_sensitive_layer_on_a_trained_model():
    model, batches = digits_model_and_batches()
    ta.attach(model, 8, input={"grid": "auto"})
    predicted = ta.sensitivity(model, batches, loss_fn, (2, 3, 4), method="hessian", samples=8)
    measured = ta.sensitivity(model, batches, loss_fn, (2, 3, 4), method="direct")
    assert all(v >= 0 for by_bits in predicted.values.values() for v in by_bits.values())
    assert all(predicted.values[layer][2] > predicted.values[layer][3] > predicted.values[layer][4]
               for layer in predicted.values)
    at_two = {layer: predicted.values[layer][2] for layer in predicted.values}
    assert max(at_two, key=at_two.get) == max(measured.values, key=lambda layer: measured.values[layer][2]) == "7"
    assert -1.0 <= ta.rank_correlation(predicted, measured) <= 1.0


def test_rank_correlation_by_hand():
    a = Sensitivity({"x": {2: 3.0, 4: 1.0}, "y": {2: 2.0, 4: 0.0}}, {}, {}, "a", 0)
    b = Sensitivity({"x": {2: 30.0, 4: 10.0}, "y": {2: 20.0, 4: 5.0}}, {}, {}, "b", 0)
    assert ta.rank_correlation(a, b) == pytest.approx(1.0)
    c = Sensitivity({"x": {2: 0.0, 4: 1.0}, "y": {2: 2.0, 4: 3.0}}, {}, {}, "c", 0)
    assert ta.rank_correlation(a, c) == pytest.approx(-0.8)  # ranks 3,1,2,0 against 0,1,2,3: 1 - 6*18/(4*15)


# ------------------------------------------------------------------------------ callback
def _callbacks(method="hessian", budget=3.0, **kwargs):
    from callbacks import ConstantBitwidth, MixedPrecision, QuantizationAwareTraining

    return [QuantizationAwareTraining(schedule=ConstantBitwidth(8), verbose=False, **kwargs),
            MixedPrecision(budget, method=method, at_epoch=1, batches=2, choices=(2, 4, 8), verbose=False)]


def _bits(module):
    return {name: {q.bitwidth for q in layer.modules() if isinstance(q, ta.ApproxQuantizer)}
            for name, layer in ta.quantized_layers(module).items()}


@pytest.mark.parametrize("method", ["hessian", "direct", "uniform"])
def test_the_callback_assigns_at_its_epoch_logs_and_trains_the_assignment(tmp_path, method):
    from lightning.pytorch import Callback
    from lit_helpers import TinyClassifier, make_trainer, read_scalars

    seen = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.current_epoch] = _bits(pl_module)

    model = TinyClassifier()
    callbacks = _callbacks(method, budget=5.0)  # net.0: 8 x 16 = 128 weights, net.2: 16 x 3 = 48
    make_trainer(tmp_path, [*callbacks, Probe()], max_epochs=3).fit(model)
    assignment = callbacks[1].assignment
    assert seen[0] == {"net.0": {8}, "net.2": {8}}
    assert seen[1] == seen[2] == {layer: {bits} for layer, bits in assignment.bits.items()}
    average = (128 * assignment.bits["net.0"] + 48 * assignment.bits["net.2"]) / 176
    assert average == pytest.approx(assignment.cost) and average <= 5.0
    if method == "uniform":
        assert assignment.bits == {"net.0": 4, "net.2": 4}
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    assert [v for _, v in scalars["quant/net.0/bits"]] == [assignment.bits["net.0"]]
    summary = ta.precision_summary(model, torch.randn(5, 8))
    assert summary["average_bits"] == pytest.approx(average)
    assert summary["size_bytes"] == pytest.approx((128 * assignment.bits["net.0"] + 48 * assignment.bits["net.2"]) / 8)
    assert summary["bit_operations"] == 128 * assignment.bits["net.0"] ** 2 + 48 * assignment.bits["net.2"] ** 2


def test_a_resumed_run_keeps_the_assignment_and_equals_the_uninterrupted_run(tmp_path):
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lit_helpers import TinyClassifier, make_trainer

    lsq = dict(weight=ta.QuantSpec(quantizer="lsq"))
    seed_everything(0, verbose=False)
    whole = TinyClassifier()
    make_trainer(tmp_path / "whole", _callbacks(budget=4.0, **lsq), max_epochs=4).fit(whole)
    seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _callbacks(budget=4.0, **lsq)
    make_trainer(tmp_path / "first", [*first, checkpoint], max_epochs=2).fit(TinyClassifier())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["callbacks"]["MixedPrecision"]["assignment"]["bits"] == first[1].assignment.bits
    seed_everything(0, verbose=False)
    resumed = TinyClassifier()
    second = _callbacks(budget=4.0, **lsq)
    make_trainer(tmp_path / "second", second, max_epochs=4).fit(resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second[1].assignment.bits == first[1].assignment.bits
    assert _bits(resumed) == {layer: {bits} for layer, bits in first[1].assignment.bits.items()}
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_callback_s_arguments_are_checked():
    from callbacks import MixedPrecision

    for kwargs, message in [(dict(budget=0), "`budget` must be a positive number, got 0"),
                            (dict(budget=3, cost="flops"), "`cost` must be one of"),
                            (dict(budget=3, method="fisher"), "`method` must be one of 'hessian', 'direct', 'uniform'"),
                            (dict(budget=3, at_epoch=-1), "`at_epoch` must be an int >= 0, got -1"),
                            (dict(budget=3, choices=(1, 2)), "`choices` must hold ints in 2..32")]:
        with pytest.raises(ValueError, match=message):
            MixedPrecision(**kwargs)


@pytest.mark.parametrize("method", ["hessian", "direct"])
def test_a_tied_weight_is_one_entry_counted_once_and_its_layers_share_the_bits(method):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 6)
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.relu(self.mix(self.embed(ids))))

    torch.manual_seed(0)
    model = Tied()
    ta.attach(model, 8)
    batches = [(torch.randint(0, 20, (4, 5)), torch.randint(0, 20, (4, 5)))]

    def lm_loss(m, batch):
        logits = m(batch[0])
        return F.cross_entropy(logits.reshape(-1, 20), batch[1].reshape(-1))

    result = ta.sensitivity(model, batches, lm_loss, (2, 8), method=method)
    assert result.groups == {"embed": ["embed", "head"]} and set(result.values) == {"embed", "mix"}
    assert result.params == {"embed": 120, "mix": 36}
    assert result.macs == {"embed": 5 * 20 * 6, "mix": 5 * 36}  # the head's MACs; the lookup has none
    assignment = ta.assign_bitwidths(result, (120 * 2 + 36 * 8) / 156, (2, 8))
    assert set(assignment.rules) == {"embed", "head", "mix"} and assignment.rules["embed"] == assignment.rules["head"]
    assert assignment.bits["embed"] == 2  # the tied weight at 8 bits would cost 6.6 average bits
    for layer, bits in {"embed": 2, "head": 2, "mix": 8}.items():
        model.get_submodule(layer).weight_quantizer.bitwidth = bits
    summary = ta.precision_summary(model, batches[0][0])
    assert summary["average_bits"] == pytest.approx((120 * 2 + 36 * 8) / 156)
    assert summary["size_bytes"] == pytest.approx((120 * 2 + 36 * 8) / 8)


# ------------------------------------------------------ the neighbours a break-it pass found
class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x + 0.01 * torch.randn_like(x))  # draws from the global generator


@pytest.mark.parametrize("call", ["hessian", "direct", "multipliers", "summary"])
def test_a_forward_that_draws_random_numbers_leaves_the_global_state_as_it_was(call):
    from torchapprox.multipliers import exact, truncated

    model = Noisy()
    ta.attach(model, 8)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    state = torch.get_rng_state()
    if call == "summary":
        ta.precision_summary(model, batches[0][0])
    elif call == "multipliers":
        ta.multiplier_sensitivity(model, batches, loss_fn, [exact(), truncated(6)])
    else:
        ta.sensitivity(model, batches, loss_fn, (2, 8), method=call)
    assert torch.equal(torch.get_rng_state(), state)


def test_macs_are_per_sample_for_every_batch_structure():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    ta.attach(model, 8)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    shapes = [((x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1])),
              ({"x": x, "y": y}, lambda m, b: F.cross_entropy(m(b["x"]), b["y"])),
              ({"inputs": {"x": x}, "y": y}, lambda m, b: F.cross_entropy(m(b["inputs"]["x"]), b["y"]))]
    for batch, fn in shapes:
        assert ta.sensitivity(model, [batch], fn, (2,), method="direct").macs == {"0": 20, "2": 15}


@pytest.mark.parametrize("kind", ["pruned", "parametrized"])
def test_pruned_and_parametrized_weights_have_their_curvature(kind):
    from torch.nn.utils import parametrize, prune

    class Scale(nn.Module):
        def forward(self, w):
            return w * 1.0

    model, batches = digits_model_and_batches(train_steps=40)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    if kind == "pruned":
        prune.l1_unstructured(model[5], "weight", amount=0.3)
    else:
        parametrize.register_parametrization(model[5], "weight", Scale())
    ta.attach(model, 8)
    result = ta.sensitivity(model, batches, loss_fn, (2, 4), method="hessian", samples=4)
    reference, _ = digits_model_and_batches(train_steps=0)
    reference.load_state_dict(plain)
    ta.attach(reference, 8)
    expected = ta.sensitivity(reference, batches, loss_fn, (2, 4), method="hessian", samples=4)
    assert result.values["5"][2] > 0
    if kind == "parametrized":  # the identity parametrization: the same numbers
        assert result.values["5"][2] == pytest.approx(expected.values["5"][2], rel=1e-4)


def test_attention_called_with_keywords_and_cross_attention_count_their_macs():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x, memory):
            return self.head(self.mha(query=x, key=memory, value=memory)[0])

    model = Cross()
    ta.attach(model, 8)
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 50, 8)
    summary = ta.precision_summary(model, (x, memory))
    mha = (5 + 50 + 50) * 8 * 8  # the query, key and value projections, per sample
    out_proj, head = 5 * 8 * 8, 5 * 8 * 3  # attention's output projection is a Linear of its own
    assert summary["bit_operations"] == (mha + out_proj + head) * 64


def test_more_arguments_that_are_refused():
    sens = Sensitivity({"a": {2: 1.0}}, {"a": 0}, {"a": 10}, "test", 0)
    with pytest.raises(ValueError, match="no layer has one .* use cost='bit_operations'"):
        ta.assign_bitwidths(sens, 3, (2,))
    from torchapprox.multiplier_assignment import MultiplierSensitivity
    from torchapprox.multipliers import exact

    multipliers = MultiplierSensitivity({"a": {"exact": 0.0}}, {"a": 10}, {"exact": exact()}, 0)
    with pytest.raises(ValueError, match="`budget` must be a positive number, got nan"):
        ta.assign_multipliers(multipliers, float("nan"))


def test_a_run_that_ends_before_the_assignment_epoch_is_refused(tmp_path):
    from lit_helpers import TinyClassifier, make_trainer

    from callbacks import ConstantBitwidth, MixedPrecision, QuantizationAwareTraining

    with pytest.raises(ValueError, match=r"`at_epoch` 2 is not before the run's end \(max_epochs=2\)"):
        make_trainer(tmp_path, [QuantizationAwareTraining(schedule=ConstantBitwidth(8), verbose=False),
                                MixedPrecision(3, at_epoch=2, verbose=False)], max_epochs=2).fit(TinyClassifier())
