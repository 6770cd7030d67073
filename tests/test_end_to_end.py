"""Whole runs on the shipped digits data: baseline, dead-zone and uniform, plus the contract configs."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from codeq.app import cli
from conftest import ROOT, quick_config, write_config

QUANTIZERS = {
    "baseline": None,
    "deadzone": {"name": "deadzone", "kwargs": {"fixed_bit_val": 4, "learnable_bit": True}, "exclude_layers": ["bn"]},
    "uniform": {"name": "uniform", "kwargs": {"bitwidth": 8}, "exclude_layers": ["bn"]},
}
RUN_NAMES = {"baseline": "resnet20_baseline_e1_lr0.003", "deadzone": "resnet20_deadzone8b_e1_lr0.003",
             "uniform": "resnet20_uniform8b_e1_lr0.003"}


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_one_epoch_run_writes_metrics_config_and_checkpoints(tmp_path, capsys, kind):
    config_path = write_config(tmp_path, quick_config(tmp_path, quantizer=QUANTIZERS[kind]))
    assert cli.main(["train", "--config", str(config_path), "--device", "cpu"]) == 0
    run_dir = tmp_path / "runs" / RUN_NAMES[kind]
    [record] = read_metrics(run_dir)
    assert record["epoch"] == 1
    assert 0.0 <= record["val_acc"] <= 1.0 and 0.0 <= record["train_acc"] <= 1.0
    assert record["val_acc"] > 0.2  # well above chance (0.1) after one epoch
    assert record["loss"] > 0 and record["lr"] == pytest.approx(0.003)
    if kind == "baseline":
        assert "sparsity" not in record and "mean_bits" not in record
    else:
        assert 0.0 <= record["sparsity"] <= 1.0
        assert 2 <= record["mean_bits"] <= 8
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    expected = None if kind == "baseline" else {**QUANTIZERS[kind], "kwargs": QUANTIZERS[kind]["kwargs"]}
    assert resolved["quantizer"] == expected
    assert resolved["device"] == "cpu" and resolved["seed"] == 42
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert (kind == "baseline") != any("parametrizations.weight.original" in key for key in checkpoint["model"])
    assert (kind == "deadzone") == any("logit_dz" in key for key in checkpoint["model"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(run_dir) in last_line and f"{record['val_acc']:.2%}" in last_line


@pytest.mark.parametrize("name,extra", [
    ("baseline_resnet20", []),
    ("deadzone_resnet20", []),
    ("deadzone_vit", ["--set", "img_size=32", "--set", "batch_size=256"]),
])
def test_contract_configs_run_on_digits(tmp_path, name, extra):
    """The shipped experiment files run as they are once pointed at the offline digits data."""
    result = subprocess.run(
        [sys.executable, "run_training.py", "--config", f"configs/{name}.yaml", "--device", "cpu",
         "--set", "dataset=digits", "--set", "epochs=1", "--set", "workers=0",
         "--set", f"save_dir={tmp_path}", "--set", "wandb_project=null", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("run directory: ")
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(read_metrics(run_dir)) == 1
