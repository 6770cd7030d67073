"""Faults during a run end with one clear line and a documented exit code, never a traceback and
never a damaged checkpoint: non-finite loss, unusable checkpoints, missing data."""
import os
import re
import shutil

import pytest
import torch
from test_data import write_cifar

from codeq.app import cli
from codeq.errors import EXIT_FAILURE
from codeq.regularizers import LOSS_REGISTRY
from conftest import quick_config, write_config

RUN_NAME = "mlp_deadzone4b_e1_lr0.003"
STEPS_PER_EPOCH = 12  # digits: 1,437 training images in batches of 128


def last_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    config_path = write_config(tmp_path, quick_config(tmp_path, model="mlp"))
    assert cli.main(["train", "--config", str(config_path)]) == 0
    return tmp_path / "runs" / RUN_NAME


@pytest.fixture
def finished_run(tmp_path, capsys, trained_once):
    """A copy of a finished 1-epoch MLP run: its config file and run directory."""
    shutil.copytree(trained_once, tmp_path / "runs" / RUN_NAME)
    capsys.readouterr()
    return write_config(tmp_path, quick_config(tmp_path, model="mlp")), tmp_path / "runs" / RUN_NAME


def test_non_finite_loss_names_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    calls = []

    def explode(model):
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) == STEPS_PER_EPOCH + 3 else 0.0)

    monkeypatch.setitem(LOSS_REGISTRY, "explode", explode)
    config = quick_config(tmp_path, model="mlp", epochs=2, log_interval=5,
                          loss_terms=[{"name": "explode", "lambda": 1.0}])
    code = cli.main(["train", "--config", str(write_config(tmp_path, config))])

    run_dir = tmp_path / "runs" / "mlp_deadzone4b_e2_lr0.003"
    assert code == EXIT_FAILURE == 1
    assert last_error_line(capsys) == (
        f"error: non-finite loss (nan) at epoch 2, step 3; the last good checkpoint {run_dir / 'last.pt'} "
        f"(epoch 1) is untouched; lower the learning rates or the loss-term lambdas")
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["epoch_step"] == 0
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
    assert sorted(path.name for path in run_dir.glob("*.pt*")) == ["best.pt", "last.pt"]  # no temporary left
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_or_truncated_checkpoint_is_one_line(finished_run, capsys, damage):
    config_path, run_dir = finished_run
    last = run_dir / "last.pt"
    content = last.read_bytes()
    last.write_bytes({"garbage": b"not a checkpoint at all", "truncated": content[: len(content) // 2],
                      "empty": b""}[damage])

    assert cli.main(["train", "--config", str(config_path), "--resume", "auto"]) == 1

    line = last_error_line(capsys)
    assert line.startswith(f"error: checkpoint {last} is corrupt or truncated (")
    assert line.endswith("); resume from another checkpoint or start a new run")


def test_a_foreign_file_is_not_taken_for_a_checkpoint(finished_run, capsys):
    config_path, run_dir = finished_run
    torch.save({"weights": torch.zeros(3)}, run_dir / "last.pt")
    assert cli.main(["train", "--config", str(config_path), "--resume", "auto"]) == 1
    line = last_error_line(capsys)
    assert line.startswith(f"error: {run_dir / 'last.pt'} is not a CoDeQ-train checkpoint (no format, model,")


def test_checkpoint_of_another_model_is_refused(finished_run, tmp_path, capsys):
    config_path, run_dir = finished_run
    # another run's checkpoint: its config differs, and says so
    other = write_config(tmp_path, quick_config(tmp_path, model="resnet20"), name="other.yaml")
    assert cli.main(["train", "--config", str(other), "--resume", str(run_dir / "last.pt")]) == 2
    assert last_error_line(capsys).startswith(f"config error: {other}: model: differs from the config of checkpoint")
    # weights that do not fit the model the config builds (one more epoch, so the run has work to do)
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    checkpoint["model"]["0.weight"] = torch.zeros(3)
    torch.save(checkpoint, run_dir / "last.pt")
    assert cli.main(["train", "--config", str(config_path), "--resume", str(run_dir / "last.pt"),
                              "--set", "epochs=2"]) == 1
    assert last_error_line(capsys).startswith(f"error: checkpoint {run_dir / 'last.pt'} holds a different model "
                                              f"(unexpected: 0.weight)")


def test_missing_resume_file_is_a_command_line_error(finished_run, tmp_path, capsys):
    config_path, _ = finished_run
    absent = tmp_path / "nowhere.pt"
    assert cli.main(["train", "--config", str(config_path), "--resume", str(absent)]) == 2
    assert last_error_line(capsys) == (f"config error: {config_path}: --resume: {absent} does not exist; "
                                       f"pass a checkpoint, a run directory or `auto`")


def test_missing_data_is_one_line_and_creates_no_run_directory(tmp_path, capsys):
    write_cifar(tmp_path / "data")
    os.remove(tmp_path / "data" / "cifar-10-batches-py" / "test_batch")
    config = quick_config(tmp_path, model="mlp", dataset="cifar10", data_dir=str(tmp_path / "data"))

    assert cli.main(["train", "--config", str(write_config(tmp_path, config))]) == 1

    line = last_error_line(capsys)
    assert line.startswith(f"error: cannot load data set 'cifar10' from '{tmp_path / 'data'}': CIFAR-10 under ")
    assert "lacks test_batch" in line and line.endswith("; point data_dir at the data set")
    assert not (tmp_path / "runs").exists()


def test_docs_list_the_exit_codes_and_run_time_keys():
    from codeq.app.config import runtime_keys
    from conftest import ROOT

    text = (ROOT / "docs" / "robustness.md").read_text()
    from codeq import errors

    codes = {name: getattr(errors, name) for name in dir(errors) if name.startswith("EXIT_")}
    assert sorted(codes.values()) == [0, 1, 2, 3, 130]
    for name, code in codes.items():
        assert f"`{name}`" in text and f"\n| {code} |" in text
    [listed] = re.findall(r"run-time keys\s*\(([^)]*)\)", text)
    assert re.findall(r"`(\w+)`", listed) == runtime_keys()
