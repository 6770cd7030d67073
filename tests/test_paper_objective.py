"""The paper's objective (arXiv 2512.12981, Eqs. 16 and 19) as YAML loss terms, and how it relates to weight decay on
the dz / bit optimizer groups."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codeq
from codeq.app import cli
from conftest import quick_config, write_config


def test_the_papers_objective_is_a_yaml_line_and_its_parts_reach_the_metrics(tmp_path):
    mixed_precision = {"fixed_bit_val": 4, "max_bits": 8, "learnable_bit": True, "learnable_deadzone": True}
    config = quick_config(tmp_path, quantizer={"name": "deadzone", "kwargs": mixed_precision,
                                               "exclude_layers": ["type:BatchNorm2d"]},
                          optimizer={"type": "adamw", "param_groups": {"base": {"lr": 0.003},
                                                                       "dz": {"lr": 0.001}, "bit": {"lr": 0.001}}},
                          loss_terms=[{"name": "dz_l2", "lambda": 0.01}, {"name": "bit_l2", "lambda": 0.01}])
    assert cli.main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    [run_dir] = (tmp_path / "runs").iterdir()
    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # 20 quantized layers, each logit starting at 3 and moving at most lr = 1e-3 a step (12 steps): λ Σ θ² ≈ 1.8.
    for part in ("loss_dz_l2", "loss_bit_l2"):
        assert 0.01 * 20 * (3 - 0.012) ** 2 <= record[part] <= 0.01 * 20 * 9
    assert record["loss"] == pytest.approx(record["task_loss"] + record["loss_dz_l2"] + record["loss_bit_l2"])
    assert record["mean_logit_dz"] < 3.0 and 2 <= record["mean_bits"] <= 8


def one_step(model, optimizer, loss_fn):
    torch.manual_seed(1)
    inputs, targets = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with codeq.quantized_step(model):
        loss = F.cross_entropy(model(inputs), targets) + loss_fn(model)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return torch.stack([p.detach() for name, p in model.named_parameters() if name.endswith("logit_dz")])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_an_l2_term_is_dz_weight_decay_two_lambda_with_sgd_but_not_with_adamw(optimizer):
    torch.manual_seed(0)
    model = codeq.prepare(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
                          kwargs={"init_deadzone_logit": 2.0, "learnable_bit": False})
    twin = copy.deepcopy(model)
    strength, options = 0.05, {"lr": 0.1, "momentum": 0.9} if optimizer == "sgd" else {"lr": 0.1}
    make = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    as_loss = make(codeq.param_groups(model, base=options, dz={**options, "weight_decay": 0.0}))
    as_decay = make(codeq.param_groups(twin, base=options, dz={**options, "weight_decay": 2 * strength}))
    for _ in range(3):
        with_term = one_step(model, as_loss, lambda m: strength * codeq.dz_l2(m))
        with_decay = one_step(twin, as_decay, lambda m: 0.0)
    if optimizer == "sgd":
        assert torch.allclose(with_term, with_decay, rtol=1e-6)
    else:  # decoupled decay moves the logit by lr * wd * θ = 0.02 θ a step; Adam normalises the L2 gradient to ~lr
        assert (with_term - with_decay).abs().max() > 0.05
