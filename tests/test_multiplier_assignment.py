"""A multiplier per layer under a cost budget (issue 23 with issue 22's multipliers): the
measured sensitivity, the exact assignment against brute force, and the callback."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta
from torchapprox.multiplier_assignment import MultiplierSensitivity
from torchapprox.multipliers import broken_array, drum, exact, truncated

CANDIDATES = [exact(), truncated(6), broken_array(2, 8), broken_array(2, 10)]


def fake_sensitivity(seed):
    generator = torch.Generator().manual_seed(seed)
    layers = [f"l{i}" for i in range(int(torch.randint(1, 5, (1,), generator=generator)))]
    values = {layer: {m.name: float(torch.rand(1, generator=generator)) * (1 - m.cost) for m in CANDIDATES}
              for layer in layers}
    macs = {layer: int(torch.randint(100, 10000, (1,), generator=generator)) for layer in layers}
    return MultiplierSensitivity(values, macs, {m.name: m for m in CANDIDATES}, 0)


def enumerate_all(sens):
    layers = list(sens.values)
    total = sum(sens.macs.values())
    for picked in itertools.product(list(sens.multipliers), repeat=len(layers)):
        cost = sum(sens.macs[layer] * sens.multipliers[c].cost for layer, c in zip(layers, picked)) / total
        yield cost, sum(sens.values[layer][c] for layer, c in zip(layers, picked))


@pytest.mark.parametrize("seed", range(20))
def test_the_assignment_equals_brute_force(seed):
    sens = fake_sensitivity(seed)
    options = list(enumerate_all(sens))
    for budget in (0.25, 0.4, 0.6, 1.0):
        feasible = [loss for cost, loss in options if cost <= budget + 1e-12]
        if not feasible:
            with pytest.raises(ValueError, match="is infeasible: the cheapest assignment costs"):
                ta.assign_multipliers(sens, budget)
            continue
        assignment = ta.assign_multipliers(sens, budget)
        assert assignment.loss_increase == pytest.approx(min(feasible), abs=1e-12) and assignment.cost <= budget + 1e-12
    for limit in (0.05, 0.2, 1.0):
        within = [cost for cost, loss in options if loss <= limit]
        assignment = ta.assign_multipliers(sens, max_loss_increase=limit)
        assert assignment.cost == pytest.approx(min(within), abs=1e-12) and assignment.loss_increase <= limit


def test_arguments_are_checked():
    sens = fake_sensitivity(0)
    with pytest.raises(ValueError, match="give exactly one of `budget`"):
        ta.assign_multipliers(sens)
    with pytest.raises(ValueError, match="give exactly one of `budget`"):
        ta.assign_multipliers(sens, 0.5, max_loss_increase=0.1)
    with pytest.raises(ValueError, match="`budget` must be a positive number, got 0"):
        ta.assign_multipliers(sens, 0)
    with pytest.raises(ValueError, match="no assignment predicts a loss increase of at most -1"):
        ta.assign_multipliers(sens, max_loss_increase=-1)
    model = nn.Sequential(nn.Linear(4, 4))
    ta.attach(model)
    batch = [(torch.randn(2, 4), torch.randint(0, 4, (2,)))]
    with pytest.raises(ValueError, match=r"multipliers \['drum\(4\)'\] have no cost figure"):
        ta.multiplier_sensitivity(model, batch, lambda m, b: m(b[0]).sum(), [exact(), drum(4)])


def test_the_measured_sensitivity_is_each_layer_alone_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    ta.attach(model, 8, multiplier=None)
    ta.set_multiplier(model, truncated(4), pattern="2")  # a multiplier already there stays
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    state = {k: v.clone() for k, v in model.state_dict().items()}
    sens = ta.multiplier_sensitivity(model, batches, loss_fn, CANDIDATES)
    assert {k: m.name for k, m in ta.assigned_multipliers(model).items()} == {"2": "truncated(4)"}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sens.macs == {"0": 6 * 16, "2": 16 * 3} and sens.passes == 2 * (1 + 2 * 4)
    with torch.no_grad():
        model.eval()
        reference = sum(float(loss_fn(model, b)) for b in batches) / 2
        ta.set_multiplier(model, broken_array(2, 10), pattern="0")
        lowered = sum(float(loss_fn(model, b)) for b in batches) / 2
    assert sens.values["0"]["broken_array(2, 10)"] == pytest.approx(lowered - reference, abs=1e-9)
    assert sens.values["0"]["exact"] == 0.0


def test_the_callback_assigns_within_the_budget_and_keeps_it_on_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lit_helpers import TinyClassifier, make_trainer

    from callbacks import AssignMultipliers, ConstantBitwidth, QuantizationAwareTraining

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = TinyClassifier()
    callback = AssignMultipliers(CANDIDATES, budget=0.5, start_epoch=1, batches=2, verbose=False)
    make_trainer(tmp_path / "first", [QuantizationAwareTraining(schedule=ConstantBitwidth(8), verbose=False),
                                      callback, checkpoint], max_epochs=2).fit(model)
    assigned = ta.assigned_multipliers(model)
    assert set(assigned) == {"net.0", "net.2"} and set(callback.layers) == {"net.0", "net.2"}
    summary = ta.precision_summary(model, torch.randn(3, 8))
    assert summary["multiplier_cost"] <= 0.5 + 1e-9
    resumed = TinyClassifier()
    make_trainer(tmp_path / "second", [QuantizationAwareTraining(schedule=ConstantBitwidth(8), verbose=False),
                                       AssignMultipliers(CANDIDATES, budget=0.5, start_epoch=1, verbose=False)],
                 max_epochs=3).fit(resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert {k: m.name for k, m in ta.assigned_multipliers(resumed).items()} == \
        {k: m.name for k, m in assigned.items()}


def test_output_divergence_is_zero_for_the_reference_and_grows_with_the_multiplier_s_error():
    from callbacks.approximate import OutputDivergence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    ta.attach(model, 8)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    divergence = OutputDivergence(model, batches)
    assert float(divergence(model.eval(), batches[0])) == pytest.approx(0.0, abs=1e-6)
    values = []
    for multiplier in (truncated(6), broken_array(2, 10)):
        ta.set_multiplier(model, multiplier)
        values.append(float(divergence(model, batches[0])))
    assert 0 < values[0] < values[1]
    sens = ta.multiplier_sensitivity(model, batches, divergence, CANDIDATES)  # relative to the model as it is
    assert all(v is not None for by in sens.values.values() for v in by.values())
