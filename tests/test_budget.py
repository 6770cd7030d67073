"""codeq.budget: the controller's update against fake plants (a synthetic, monotone response of the compression to
the pressure, so these tests are fast and deterministic), its bounds, its state_dict round trip, its measurements
(the report's numbers) and its refusals."""
import math

import pytest
import torch
from torch import nn

import codeq
from codeq.budget import (
    MAX_SHRINK,
    BudgetController,
    BudgetError,
    cubic_ramp,
    within_tolerance,
)
from codeq.regularizers import LossTerm, dz_l2


def small_model(learnable_bit: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    return codeq.prepare(model, "deadzone", {"fixed_bit_val": 4, "learnable_bit": learnable_bit})


def adamw(model: nn.Module, lr: float = 1e-3, dz_decay: float = 1.0, bit_decay: float | None = None):
    bit = {"lr": lr, "weight_decay": bit_decay} if bit_decay is not None else None
    return torch.optim.AdamW(codeq.param_groups(model, base={"lr": lr}, dz={"lr": lr, "weight_decay": dz_decay},
                                                bit=bit))


class LaggingPlant:
    """The compression moves a share ``rate`` of the way to its equilibrium each step; the equilibrium sparsity
    p / (p + scale) rises with the pressure p (a dz weight decay or lambda), capped at ``ceiling``."""

    def __init__(self, read, scale: float = 1.0, rate: float = 0.05, ceiling: float = 1.0, start: float = 0.0):
        self.read, self.scale, self.rate, self.ceiling, self.sparsity = read, scale, rate, ceiling, start

    def step(self) -> float:
        pressure = self.read()
        equilibrium = min(pressure / (pressure + self.scale), self.ceiling)
        self.sparsity += self.rate * (equilibrium - self.sparsity)
        return self.sparsity


def drive(budget: BudgetController, plant: LaggingPlant, steps: int) -> list[float]:
    """``steps`` optimizer steps of the fake plant, each followed by ``budget.step(value)``; the dz pressures."""
    pressures = []
    for _ in range(steps):
        value = plant.step()
        budget.step(value if budget.metric == "sparsity" else 0.125 * (1 - value))
        pressures.append(budget.pressure_values())
    return pressures


def dz_decay(optimizer) -> float:
    return next(group for group in optimizer.param_groups if group["name"] == "dz")["weight_decay"]


def test_cubic_ramp_is_zhu_and_gupta_schedule():
    assert cubic_ramp(0.0, 0.9, 0.0, 0.5) == 0.0
    assert cubic_ramp(0.0, 0.9, 0.25, 0.5) == pytest.approx(0.9 + (0.0 - 0.9) * 0.5 ** 3)
    assert cubic_ramp(0.0, 0.9, 0.5, 0.5) == 0.9 and cubic_ramp(0.0, 0.9, 0.8, 0.5) == 0.9
    assert cubic_ramp(1.0, 0.02, 0.1, 0.0) == 0.02  # no ramp: the budget from the start


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])  # the equilibrium 0.9 needs a pressure of 9 x scale
def test_the_controller_brings_a_lagging_plant_to_the_target(scale):
    model = small_model()
    optimizer = adamw(model, lr=1e-4, dz_decay=1.0)
    budget = BudgetController(model, 400, optimizer, sparsity=0.9)
    plant = LaggingPlant(lambda: dz_decay(optimizer), scale=scale)

    drive(budget, plant, 400)

    assert within_tolerance("sparsity", plant.sparsity, 0.9) and abs(plant.sparsity - 0.9) < 0.005
    assert dz_decay(optimizer) == pytest.approx(9 * scale, rel=0.1)
    assert budget.saturated_since is None and budget.verdict(plant.sparsity) is None
    assert budget.target == 0.9 and budget.achieved == pytest.approx(plant.sparsity, abs=0.01)


def test_the_target_in_force_follows_the_ramp_and_the_pressure_rises_while_behind_it():
    model = small_model()
    optimizer = adamw(model, lr=1e-4, dz_decay=1.0)
    budget = BudgetController(model, 200, optimizer, sparsity=0.8, ramp=0.5, interval=10, proportional_gain=1.0,
                              integral_gain=30.0)
    plant = LaggingPlant(lambda: dz_decay(optimizer), rate=0.002)  # far too slow to follow

    pressures = [p["dz.weight_decay"] for p in drive(budget, plant, 60)]

    assert budget.interval == 10 and budget.steps == 60 and budget.last_update == 60
    assert budget.target == pytest.approx(cubic_ramp(budget.start, 0.8, 60 / 200, 0.5))
    changes = pressures[9::10]  # the pressure only changes at updates, and only upwards while behind
    assert all(later >= earlier for earlier, later in zip(changes, changes[1:])) and changes[-1] > changes[0]
    assert pressures[:9] == [1.0] * 9 and set(pressures[9:]) == set(changes)


def test_rel_bops_falls_as_the_pressure_rises():
    model = small_model()
    optimizer = adamw(model, lr=1e-4, dz_decay=2.0)
    budget = BudgetController(model, 400, optimizer, rel_bops=0.025, example_input=torch.zeros(3, 8, 8))
    plant = LaggingPlant(lambda: dz_decay(optimizer), scale=0.5)

    drive(budget, plant, 400)

    assert within_tolerance("rel_bops", 0.125 * (1 - plant.sparsity), 0.025)
    assert dz_decay(optimizer) == pytest.approx(0.5 * 4, rel=0.1)  # rel_bops 0.025 is sparsity 0.8


def test_a_budget_the_plant_cannot_reach_saturates_the_pressure_and_says_so():
    model = small_model()
    optimizer = adamw(model, lr=1e-3, dz_decay=1.0)
    budget = BudgetController(model, 300, optimizer, sparsity=0.9)
    plant = LaggingPlant(lambda: dz_decay(optimizer), ceiling=0.6)

    drive(budget, plant, 300)

    # AdamW's decoupled decay shrinks a logit by lr x weight_decay a step: held at MAX_SHRINK (before max_factor)
    assert dz_decay(optimizer) == pytest.approx(MAX_SHRINK / 1e-3)
    assert budget.saturated_since is not None and budget.saturated_since < 100
    verdict = budget.verdict(plant.sparsity)
    assert verdict.startswith("target sparsity 0.9000 missed: the model ends at 0.6000 (allowed 0.8900..0.9100); "
                              "the pressure was at its ceiling (dz.weight_decay 50, x50 the start) from step ")
    assert verdict.endswith("train longer, give the pressed logits a higher lr or lower the target")


def test_a_budget_the_plant_overshoots_without_pressure_takes_the_pressure_to_its_floor():
    model = small_model()
    optimizer = adamw(model, lr=1e-3, dz_decay=1.0)
    budget = BudgetController(model, 300, optimizer, sparsity=0.5, max_factor=100.0)
    plant = LaggingPlant(lambda: dz_decay(optimizer) + 3.0)  # 0.75 sparse at no pressure

    drive(budget, plant, 300)

    assert dz_decay(optimizer) == pytest.approx(0.01)
    verdict = budget.verdict(plant.sparsity)
    assert verdict.startswith(f"target sparsity 0.5000 missed: the model ends at {plant.sparsity:.4f} (allowed "
                              f"0.4900..0.5100); the pressure was at its floor (dz.weight_decay 0.01, x0.01 the start) "
                              f"from step ")
    assert verdict.endswith(" on: the dead zones widen without it; give the pressed logits a lower lr or raise the "
                            "target")


def test_sgd_and_a_loss_term_pressure_are_bounded_by_their_step():
    model = small_model()
    optimizer = torch.optim.SGD(codeq.param_groups(model, base={"lr": 0.01, "momentum": 0.9}), lr=0.01)
    terms = [LossTerm(dz_l2, 0.5, {})]
    budget = BudgetController(model, 100, optimizer, terms, sparsity=0.9, max_factor=1e6)
    plant = LaggingPlant(lambda: terms[0].weight, ceiling=0.5)

    drive(budget, plant, 100)

    # SGD with momentum 0.9: the term's gradient 2 lambda theta shrinks theta by 2 lr lambda / (1 - 0.9) a step
    assert terms[0].weight == pytest.approx(MAX_SHRINK * 0.1 / (2 * 0.01))
    assert isinstance(terms[0], LossTerm) and terms[0].fn is dz_l2
    assert list(budget.pressure_values()) == ["dz_l2.lambda"]


def test_with_learnable_bits_rel_bops_presses_the_bit_group_too_sparsity_does_not():
    model = small_model(learnable_bit=True)
    optimizer = adamw(model, dz_decay=3.0, bit_decay=0.5)
    terms = [LossTerm(dz_l2, 0.1, {}), LossTerm(dz_l2, 0.2, {})]
    example = torch.zeros(3, 8, 8)
    both = BudgetController(model, 10, optimizer, terms, rel_bops=0.05, example_input=example)
    assert both.pressure_values() == {"dz.weight_decay": 3.0, "dz_l2.0.lambda": 0.1, "dz_l2.1.lambda": 0.2,
                                      "bit.weight_decay": 0.5}
    both.log_factor = math.log(2.0)
    both.apply()
    assert dz_decay(optimizer) == 6.0 and terms[1].weight == 0.4 and optimizer.param_groups[-1]["weight_decay"] == 1.0
    assert list(BudgetController(model, 10, adamw(model, bit_decay=0.5), sparsity=0.5).pressure_values()) == \
        ["dz.weight_decay"]


def test_state_dict_round_trip_continues_exactly():
    def fresh():
        model = small_model()
        optimizer = adamw(model, lr=1e-4, dz_decay=1.0)
        terms = [LossTerm(dz_l2, 0.01, {})]
        return BudgetController(model, 300, optimizer, terms, sparsity=0.85, interval=3), optimizer, terms

    reference, optimizer, terms = fresh()
    plant = LaggingPlant(lambda: dz_decay(optimizer) + 100 * terms[0].weight)
    whole = drive(reference, plant, 300)

    first, optimizer, terms = fresh()
    plant = LaggingPlant(lambda: dz_decay(optimizer) + 100 * terms[0].weight)
    head = drive(first, plant, 140)
    state = first.state_dict()
    second, optimizer, terms = fresh()  # the config's pressures: load_state_dict sets the saved ones again
    second.load_state_dict(state)
    assert dz_decay(optimizer) == head[-1]["dz.weight_decay"] and terms[0].weight == head[-1]["dz_l2.lambda"]
    tail = drive(second, plant, 160)

    assert head + tail == whole
    assert second.state_dict() == reference.state_dict()
    assert all(isinstance(value, (int, float, str, dict, type(None))) for value in state.values())


def test_pressures_follow_an_optimizer_whose_state_is_loaded_after_the_controller_is_built():
    model = small_model()
    optimizer = adamw(model, dz_decay=1.0)
    saved = adamw(model, dz_decay=4.0).state_dict()
    budget = BudgetController(model, 10, optimizer, sparsity=0.5)
    optimizer.load_state_dict(saved)  # new group dicts, as a resumed run's optimizer gets them
    budget.log_factor = math.log(3.0)
    budget.apply()
    assert dz_decay(optimizer) == pytest.approx(3.0) and budget.pressure_values()["dz.weight_decay"] == \
        dz_decay(optimizer)


def test_a_state_of_another_target_is_refused():
    model = small_model()
    state = BudgetController(model, 10, adamw(model), sparsity=0.5).state_dict()
    with pytest.raises(BudgetError, match="saved budget state is for sparsity 0.5"):
        BudgetController(model, 10, adamw(model), sparsity=0.6).load_state_dict(state)


def test_sync_decides_on_the_value_it_returns():
    model = small_model()
    optimizer = adamw(model)
    budget = BudgetController(model, 10, optimizer, sparsity=0.5, interval=1, ramp=0.0, sync=lambda value: 0.9)
    budget.step(0.1)  # this process measured 0.1, but the run's value (rank 0's) is 0.9: too sparse, lower
    assert budget.achieved == 0.9 and dz_decay(optimizer) < 1.0


@pytest.mark.parametrize("learnable_bit", [False, True])
def test_measurements_are_the_reports_numbers(learnable_bit):
    model = small_model(learnable_bit)
    with torch.no_grad():  # some dead zones wide, some bit-widths narrow
        for index, (name, parameter) in enumerate(model.named_parameters()):
            if "logit" in name:
                parameter.fill_(0.3 + 0.4 * index)
    example = torch.zeros(3, 8, 8)
    report = codeq.compression_report(model, example, activation_bits=8)
    for metric in ("sparsity", "rel_bops", "size_bytes"):
        budget = BudgetController(model, 10, adamw(model, bit_decay=1.0), example_input=example, activation_bits=8,
                                  **{metric: report[metric] * (1.1 if metric == "sparsity" else 0.9)})
        assert budget.measure() == pytest.approx(report[metric], rel=1e-12), metric
    assert 0 < report["sparsity"] < 1


def test_the_reach_is_measured_at_the_logits_limits():
    model = small_model(learnable_bit=True)
    example = torch.zeros(3, 8, 8)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    budget = BudgetController(model, 10, adamw(model, bit_decay=1.0), rel_bops=0.02, example_input=example)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "logit" in name:
                parameter.zero_()
    assert budget.limit == pytest.approx(codeq.compression_report(model, example)["rel_bops"])
    assert budget.least == pytest.approx(8 / 32)  # no dead zone, 8 bits: a quarter of the dense BOPs


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "a budget is exactly one of sparsity, rel_bops, size_bytes, got none"),
    ({"sparsity": 0.5, "rel_bops": 0.1}, "got sparsity, rel_bops"),
    ({"sparsity": 1.0}, "sparsity 1.0 is not a fraction between 0 and 1"),
    ({"rel_bops": 0.02}, "a rel_bops target needs the MACs of each layer; pass example_input"),
    ({"sparsity": 0.999}, r"sparsity 0.9990 is beyond reach: with every dead zone at its widest the model has "
                          r"sparsity 0.98\d\d"),
    ({"rel_bops": 0.5, "example_input": torch.zeros(3, 8, 8)}, "rel_bops 0.5000 is less compression than the model "
                                                               "has with no dead zone: 0.1250"),
])
def test_targets_that_cannot_be_controlled_are_refused(kwargs, message):
    model = small_model()
    with pytest.raises(BudgetError, match=message):
        BudgetController(model, 10, adamw(model), **kwargs)


def test_a_model_without_quantizers_or_dead_zone_pressure_is_refused():
    plain = nn.Linear(4, 4)
    with pytest.raises(BudgetError, match="the model has no quantized layer"):
        BudgetController(plain, 10, torch.optim.AdamW(plain.parameters()), sparsity=0.5)
    model = small_model()
    with pytest.raises(BudgetError, match="there is no dead-zone pressure to adjust"):
        BudgetController(model, 10, adamw(model, dz_decay=0.0), [LossTerm(dz_l2, 0.0, {})], sparsity=0.5)
    uniform = codeq.prepare(nn.Sequential(nn.Linear(4, 4)), "uniform")
    with pytest.raises(BudgetError, match="no quantizer has a learnable dead zone"):
        BudgetController(uniform, 10, torch.optim.AdamW(uniform.parameters()), sparsity=0.5)


def test_rel_bops_of_a_model_whose_macs_cannot_be_counted_is_refused():
    class Embedder(nn.Module):  # quantized, but no Conv2d or Linear: no MACs
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(10, 4)

        def forward(self, x):
            return self.table(x.long().clamp(0, 9))

    model = codeq.prepare(Embedder(), "deadzone", {"fixed_bit_val": 4, "learnable_bit": False})
    optimizer = adamw(model)
    with pytest.raises(BudgetError, match="no Conv2d or Linear layer whose MACs can be counted"):
        BudgetController(model, 10, optimizer, rel_bops=0.05, example_input=torch.zeros(3))
    with pytest.raises(BudgetError, match=r"MACs cannot be counted on an input of shape \(2, 2\)"):
        BudgetController(small_model(), 10, adamw(small_model()), rel_bops=0.05, example_input=torch.zeros(2, 2))

