"""Extending a finished run with more epochs, and --dry-run refusing what a real start refuses."""
import json

import pytest

from codeq.app import cli
from conftest import quick_config, write_config

RUN2 = "mlp_deadzone4b_e2_lr0.003"


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def finished_run(tmp_path):
    config = write_config(tmp_path, quick_config(tmp_path, model="mlp", epochs=2))
    assert cli.main(["train", "--config", str(config)]) == 0
    return config, tmp_path / "runs" / RUN2


@pytest.mark.parametrize("resume", ["last.pt", "run dir", "auto"])
def test_extended_epochs_follow_the_longer_schedule(tmp_path, finished_run, resume):
    config, run_dir = finished_run
    target = {"last.pt": str(run_dir / "last.pt"), "run dir": str(run_dir), "auto": "auto"}[resume]
    assert cli.main(["train", "--config", str(config), "--resume", target, "--set", "epochs=4"]) == 0
    extended = records(run_dir)
    assert [record["epoch"] for record in extended] == [1, 2, 3, 4]
    fresh = write_config(tmp_path, quick_config(tmp_path, model="mlp", epochs=4, save_dir=str(tmp_path / "fresh")))
    assert cli.main(["train", "--config", str(fresh)]) == 0
    reference = records(tmp_path / "fresh" / "mlp_deadzone4b_e4_lr0.003")
    assert [record["lr"] for record in extended[2:]] == pytest.approx([record["lr"] for record in reference[2:]])
    assert extended[2]["lr"] == pytest.approx(0.003 * 0.5) and extended[3]["lr"] > 0


def test_dry_run_refuses_a_set_the_checkpoint_differs_in(finished_run, capsys):
    config, _ = finished_run
    assert cli.main(["train", "--config", str(config), "--resume", "auto", "--dry-run", "--set", "seed=7"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "seed: differs from the config of checkpoint" in captured.err


def test_dry_run_names_the_directory_an_extended_resume_continues(finished_run, capsys):
    config, run_dir = finished_run
    capsys.readouterr()
    assert cli.main(["train", "--config", str(config), "--resume", str(run_dir / "last.pt"), "--dry-run",
                              "--set", "epochs=6"]) == 0
    out = capsys.readouterr().out
    assert f"run dir:    {run_dir} (resumes {run_dir / 'last.pt'} at epoch 3)" in out
    assert "6 epochs of batch" in out
