"""Learning-rate schedules with warm-up, per epoch as a run logs them, and exclude_layers' `re:` entries, through a
config and through attach_weight_quantizers."""
import json
import math
import re

import pytest
import torch

from codeq.app import cli
from codeq.app.config import load_config
from codeq.app.experiment import optimizer_for, scheduler_for
from codeq.attach import attach_weight_quantizers
from codeq.models import create_model
from codeq.quantizers import DeadZoneLDZCompander
from conftest import quick_config, write_config


def test_a_run_logs_warm_up_then_step_learning_rates_per_epoch(tmp_path):
    config = quick_config(tmp_path, model="mlp", img_size=8, epochs=6, batch_size=720, lr_scheduler={
        "type": "step", "step_size": 2, "gamma": 0.5, "warmup_epochs": 2, "warmup_start_factor": 0.1})
    config["optimizer"]["param_groups"]["base"]["lr"] = 0.01
    assert cli.main(["train", "--config", str(write_config(tmp_path, config))]) == 0
    [run_dir] = (tmp_path / "runs").iterdir()
    rates = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Warm-up from 0.1 x lr over 2 epochs, then lr halved every 2 epochs of the remaining 4.
    assert rates == pytest.approx([0.001, 0.0055, 0.01, 0.01, 0.005, 0.005])


@pytest.mark.parametrize("schedule,overrides,expected", [
    ("multistep", ["lr_scheduler.milestones=[1, 3]", "lr_scheduler.gamma=0.1", "lr_scheduler.warmup_epochs=1"],
     [0.1, 1.0, 0.1, 0.1, 0.01]),
    ("cosine", ["lr_scheduler.eta_min=0.2", "lr_scheduler.warmup_epochs=1", "lr_scheduler.warmup_start_factor=0.5"],
     [0.5, 1.0, 0.2 + 0.8 * 0.5 * (1 + 2 ** -0.5), 0.6, 0.2 + 0.8 * 0.5 * (1 - 2 ** -0.5)]),
    ("constant", ["lr_scheduler.warmup_epochs=2"], [0.1, 0.55, 1.0, 1.0, 1.0]),
    ("cosine", [], [(1 + math.cos(math.pi * epoch / 5)) / 2 for epoch in range(5)]),  # T_max = epochs, the seed's
])
def test_each_schedule_gives_its_learning_rate_per_epoch(tmp_path, schedule, overrides, expected):
    data = quick_config(tmp_path, model="mlp", img_size=8, epochs=5, lr_scheduler=schedule)
    data["optimizer"]["param_groups"]["base"]["lr"] = 1.0
    config = load_config(write_config(tmp_path, data), [f"{override}" for override in overrides])
    optimizer = optimizer_for(create_model("mlp", 10, 8), config)
    scheduler = scheduler_for(optimizer, config)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx(expected)


FIRST_AND_LAST = ["re:^(conv1|fc)$", "bn"]


def test_re_entries_match_the_whole_name_and_others_stay_substrings():
    model = create_model("resnet18", 10, 32)
    owners = [name for name, module in model.named_modules() if isinstance(module._parameters.get("weight"),
                                                                          torch.nn.Parameter)]
    attached = attach_weight_quantizers(model, FIRST_AND_LAST, DeadZoneLDZCompander, {})
    assert attached == [name for name in owners if name not in ("conv1", "fc") and "bn" not in name]
    assert "layer1.0.conv1" in attached and "layer2.0.downsample.1" in attached  # torchvision names that BN so
    substring = attach_weight_quantizers(create_model("resnet18", 10, 32), ["conv1"], DeadZoneLDZCompander, {})
    assert not any(name.endswith("conv1") for name in substring)
    whole = attach_weight_quantizers(create_model("resnet18", 10, 32), ["re:conv1"], DeadZoneLDZCompander, {})
    assert "conv1" not in whole and "layer1.0.conv1" in whole
    with pytest.raises(re.error):
        attach_weight_quantizers(create_model("mlp", 10, 8), ["re:(fc"], DeadZoneLDZCompander, {})


def test_re_exclusion_through_a_config(tmp_path, capsys):
    config = quick_config(tmp_path, model="resnet18", img_size=32)
    config["quantizer"]["exclude_layers"] = FIRST_AND_LAST
    assert cli.main(["train", "--config", str(write_config(tmp_path, config)), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    [quantized] = [line for line in lines if line.startswith("quantized:")]
    [fp32] = [line for line in lines if line.startswith("FP32:")]
    assert quantized.startswith("quantized:  22 layers: layer1.0.conv1, layer1.0.conv2, layer1.1.conv1,")
    assert fp32.startswith("FP32:       19 layers: conv1, bn1, layer1.0.bn1,") and fp32.endswith(", fc")
    config["quantizer"]["exclude_layers"] = ["re:(conv1"]
    assert cli.main(["train", "--config", str(write_config(tmp_path, config)), "--dry-run"]) == 2
    assert "quantizer.exclude_layers: invalid regular expression (missing ), unterminated subpattern" in \
        capsys.readouterr().err
