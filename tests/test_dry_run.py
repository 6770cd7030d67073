"""--dry-run builds everything and says what it built, touching neither data nor disk; notices and
warnings for parameters that would silently not train and exclusions that match nothing."""
import logging

import pytest

from codeq.app import cli
from codeq.data.base import DATASET_REGISTRY
from conftest import ROOT, quick_config, write_config

GROUP_LASSO = {"name": "group_lasso", "lambda": 0.5, "kwargs": {"lambda_linear": 1e-4, "lambda_conv": 2e-4}}


def dry_run(tmp_path, capsys, caplog, *extra, **overrides):
    path = write_config(tmp_path, quick_config(tmp_path, **overrides))
    with caplog.at_level(logging.INFO):
        code = cli.main(["train", "--config", str(path), "--dry-run", *extra])
    return code, capsys.readouterr().out


def test_dry_run_summarises_and_touches_nothing(tmp_path, capsys, caplog, monkeypatch):
    def no_data(data_dir, img_size):
        raise AssertionError("--dry-run loaded data")

    no_data.num_classes = 10
    monkeypatch.setitem(DATASET_REGISTRY, "digits", no_data)
    code, out = dry_run(tmp_path, capsys, caplog, loss_terms=[GROUP_LASSO])

    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "dry run: the config is valid; no data was loaded and nothing was written"
    assert "run name:   resnet20_deadzone4b_e1_lr0.003" in lines
    assert f"run dir:    {tmp_path / 'runs' / 'resnet20_deadzone4b_e1_lr0.003'} (new)" in lines
    assert "device:     cpu" in lines
    assert any(line.startswith("quantized:  20 layers: conv1, layer1.0.conv1,") and line.endswith(", fc")
               for line in lines)
    assert any(line.startswith("FP32:       19 layers: bn1, layer1.0.bn1") for line in lines)
    [base] = [line for line in lines if line.strip().startswith("base ")]
    [dz] = [line for line in lines if line.strip().startswith("dz ")]
    groups = quick_config(tmp_path)["optimizer"]["param_groups"]
    assert f"lr={groups['base']['lr']} weight_decay={groups['base']['weight_decay']}" in base
    assert dz.split()[1:5] == ["20", "tensors", "20", "values"] and f"weight_decay={groups['dz']['weight_decay']}" in dz
    assert "loss terms: 0.5 * group_lasso(lambda_linear=0.0001, lambda_conv=0.0002)" in lines
    assert "scheduler:  cosine over 1 epochs" in lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_dry_run_refuses_what_a_real_start_refuses_in_a_directory_with_a_checkpoint(tmp_path, capsys, caplog):
    run_dir = tmp_path / "runs" / "mlp_baseline_e1_lr0.003"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"")
    path = write_config(tmp_path, quick_config(tmp_path, model="mlp", quantizer=None))
    assert cli.main(["train", "--config", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"save_dir: {run_dir} already holds a checkpoint (last.pt); pass --resume auto" in captured.err


def test_logit_parameters_without_a_group_join_base_with_a_notice(tmp_path, capsys, caplog):
    config = quick_config(tmp_path, model="mlp")
    config["quantizer"]["kwargs"].update(learnable_bit=True)
    del config["optimizer"]["param_groups"]["dz"]
    assert "bit" not in config["optimizer"]["param_groups"]
    path = write_config(tmp_path, config)
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", "--config", str(path), "--dry-run"]) == 0
    assert "no optimizer group 'dz' configured: its 3 parameters join 'base'" in caplog.text
    assert "no optimizer group 'bit' configured: its 3 parameters join 'base'" in caplog.text
    [base] = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("base ")]
    assert base.split()[1] == "12"  # 3 weights + 3 biases + 3 logit_dz + 3 logit_bit


@pytest.mark.parametrize("change,warning", [
    ({"quantizer": {"name": "deadzone", "kwargs": {"learnable_deadzone": True}, "exclude_layers": ["bn", "head"]}},
     "exclude_layers entry 'head' matches no module of mlp"),
    ({"quantizer": None}, "optimizer group 'dz' is configured but the model has no logit_dz parameters that train"),
    ({"quantizer": {"name": "deadzone", "kwargs": {"learnable_deadzone": False}}},
     "optimizer group 'dz' is configured but the model has no logit_dz parameters that train"),
    ({"optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.003}, "dz": {"lr": 0.0}}}},
     "optimizer group 'dz' has lr 0: its parameters will not learn"),
])
def test_settings_that_would_silently_do_nothing_are_warned_about(tmp_path, capsys, caplog, change, warning):
    code, _ = dry_run(tmp_path, capsys, caplog, model="mlp", **change)
    assert code == 0
    assert warning in [record.getMessage()[:len(warning)] for record in caplog.records
                       if record.levelno == logging.WARNING]


@pytest.mark.parametrize("name", ["quickstart", "baseline_resnet20", "deadzone_resnet20", "deadzone_vit"])
def test_the_shipped_configs_start_without_warnings(tmp_path, caplog, capsys, name):
    with caplog.at_level(logging.WARNING):
        code = cli.main(["train", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--device", "cpu", "--dry-run",
                                  "--set", f"save_dir={tmp_path}"])
    assert code == 0
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
