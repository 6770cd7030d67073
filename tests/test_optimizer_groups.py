"""The 3-way optimizer, run names and scheduler built from a config."""
import copy
import logging

import pytest
import torch

from codeq.app.config import validate_config
from codeq.app.experiment import build_model, optimizer_for, run_name
from conftest import quick_config


def build(tmp_path, **overrides):
    config = validate_config(quick_config(tmp_path, **overrides))
    model, _ = build_model(config, 10)
    return config, model, optimizer_for(model, config)


def groups_by_name(optimizer):
    return {group["name"]: group for group in optimizer.param_groups}


def test_every_trainable_parameter_in_exactly_one_group_with_its_options(tmp_path):
    config, model, optimizer = build(
        tmp_path,
        quantizer={"name": "deadzone", "kwargs": {"learnable_bit": True}, "exclude_layers": ["bn"]},
        optimizer={"type": "adamw", "param_groups": {
            "base": {"lr": 0.01, "weight_decay": 5e-4},
            "dz": {"lr": 0.02, "weight_decay": 2.5},
            "bit": {"lr": 0.03, "weight_decay": 0.0}}},
    )
    assert isinstance(optimizer, torch.optim.AdamW)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(seen) == sorted(trainable)  # each exactly once
    groups = groups_by_name(optimizer)
    assert (groups["base"]["lr"], groups["base"]["weight_decay"]) == (0.01, 5e-4)
    assert (groups["dz"]["lr"], groups["dz"]["weight_decay"]) == (0.02, 2.5)
    assert (groups["bit"]["lr"], groups["bit"]["weight_decay"]) == (0.03, 0.0)
    assert all("logit_dz" in trainable[id(p)] for p in groups["dz"]["params"])
    assert all("logit_bit" in trainable[id(p)] for p in groups["bit"]["params"])
    assert len(groups["dz"]["params"]) == len(groups["bit"]["params"]) == 20
    assert not any("logit" in trainable[id(p)] for p in groups["base"]["params"])


def test_frozen_bit_logits_are_left_out_and_sgd_options_pass_through(tmp_path):
    _, model, optimizer = build(
        tmp_path,
        optimizer={"type": "sgd", "param_groups": {
            "base": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
            "dz": {"lr": 0.05, "momentum": 0.0}}},
    )
    groups = groups_by_name(optimizer)
    assert isinstance(optimizer, torch.optim.SGD)
    assert groups["base"]["momentum"] == 0.9 and groups["base"]["nesterov"] is True
    assert groups["dz"]["momentum"] == 0.0 and "bit" not in groups  # quickstart: learnable_bit false
    seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for n, p in model.named_parameters() if p.requires_grad} == seen
    assert not any(id(p) in seen for n, p in model.named_parameters() if "logit_bit" in n)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_is_fused_on_cpu_and_steps_like_the_per_parameter_loop(tmp_path, kind):
    base = {"lr": 0.05, "weight_decay": 1e-3} | ({"momentum": 0.9} if kind == "sgd" else {})
    _, model, optimizer = build(tmp_path, optimizer={"type": kind, "param_groups": {"base": base}})
    assert all(group["fused"] for group in optimizer.param_groups)
    initial = copy.deepcopy(model)
    looped_model = copy.deepcopy(model)
    looped_params = dict(looped_model.named_parameters())
    name_of = {id(p): name for name, p in model.named_parameters()}
    looped = type(optimizer)([{**{k: v for k, v in group.items() if k not in ("params", "fused")},
                               "params": [looped_params[name_of[id(p)]] for p in group["params"]]}
                              for group in optimizer.param_groups], foreach=False)
    # One step: after it the two differ by rounding, and a second step's quantized forward would amplify that
    # wherever a latent weight sits on a rounding boundary.
    inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for net, opt in ((model, optimizer), (looped_model, looped)):
        net(inputs).square().mean().backward()
        opt.step()
    before = dict(initial.named_parameters())
    for name, fused in model.named_parameters():
        torch.testing.assert_close(fused, looped_params[name], rtol=1e-6, atol=1e-7)
        assert torch.equal(fused, before[name]) != fused.requires_grad, name  # every trainable one moved


def test_missing_quantizer_groups_join_base_with_a_notice(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _, model, optimizer = build(tmp_path, optimizer={"type": "adam", "param_groups": {"base": {"lr": 0.01}}})
    groups = groups_by_name(optimizer)
    assert list(groups) == ["base"]
    n_dz = sum(1 for n, _ in model.named_parameters() if "logit_dz" in n)
    assert n_dz == 20
    assert len(groups["base"]["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    assert "no optimizer group 'dz' configured: its 20 parameters join 'base'" in caplog.text


def test_baseline_with_quantizer_groups_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _, model, optimizer = build(tmp_path, quantizer=None)
    assert [g["name"] for g in optimizer.param_groups] == ["base"]
    assert "optimizer group 'dz' is configured but the model has no logit_dz parameters" in caplog.text


@pytest.mark.parametrize("quantizer,expected", [
    (None, "resnet20_baseline_e1_lr0.003"),
    ({"name": "deadzone", "kwargs": {"fixed_bit_val": 3, "learnable_bit": False}}, "resnet20_deadzone3b_e1_lr0.003"),
    ({"name": "deadzone", "kwargs": {"learnable_bit": False}}, "resnet20_deadzone4b_e1_lr0.003"),
    # A learned bit-width is named by its ceiling: runs with max_bits 6 and 8 get different names.
    ({"name": "deadzone", "kwargs": {"fixed_bit_val": 3}}, "resnet20_deadzone8b_e1_lr0.003"),
    ({"name": "deadzone", "kwargs": {"max_bits": 6}}, "resnet20_deadzone6b_e1_lr0.003"),
    ({"name": "uniform", "kwargs": {"bitwidth": 6}}, "resnet20_uniform6b_e1_lr0.003"),
    ({"name": "uniform"}, "resnet20_uniform8b_e1_lr0.003"),
])
def test_run_name(tmp_path, quantizer, expected):
    config = validate_config(quick_config(tmp_path, quantizer=quantizer))
    assert run_name(config) == expected
