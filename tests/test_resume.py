"""Checkpoints and resume: an interrupted run (SIGKILL, SIGUSR1, SIGTERM) continues to exactly the
numbers of an uninterrupted one; a run directory with a checkpoint is never overwritten; a resume
with a different config is refused.

The runs train an MLP on a miniature CIFAR-10 in the real file format: its random crops and flips
draw from torch's global generator, so an exact match needs every generator state restored.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from test_data import PER_BATCH, write_cifar

from codeq.app import cli
from codeq.app.checkpoint import REQUIRED_KEYS, restore_rng, rng_state
from codeq.app.tracking import rewind_metrics
from codeq.errors import EXIT_PREEMPTED
from conftest import ROOT, quick_config, write_config

BATCH = 4
STEPS_PER_EPOCH = -(-5 * PER_BATCH // BATCH)
EPOCHS = 3
RUN_NAME = f"mlp_deadzone4b_e{EPOCHS}_lr0.003"
TRIPWIRE = ROOT / "tests" / "tripwire.py"


def interruptible_config(tmp_path, data_dir, **overrides):
    config = quick_config(tmp_path, model="mlp", dataset="cifar10", data_dir=str(data_dir), epochs=EPOCHS,
                          batch_size=BATCH, log_interval=2, loss_terms=[{"name": "tripwire", "lambda": 1.0}])
    config.update(overrides)
    return write_config(tmp_path, config)


def launch(config_path, *args, trip=None, at=0, marker=None, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CODEQ_TRIP_AT": str(at), "CODEQ_TRIP": trip or "",
           "CODEQ_TRIP_MARKER": str(marker or "")}
    command = [sys.executable, str(TRIPWIRE), "--config", str(config_path), *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def metrics_text(run_dir):
    return (run_dir / "metrics.jsonl").read_text()


def final_weights(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root)
    return root


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """The reference: the same run, never interrupted."""
    tmp_path = tmp_path_factory.mktemp("reference")
    code, _, err = launch(interruptible_config(tmp_path, data_dir))
    assert code == 0, err
    run_dir = tmp_path / "runs" / RUN_NAME
    assert len(metrics_text(run_dir).splitlines()) == EPOCHS
    return run_dir


def assert_same_run(run_dir, reference):
    assert metrics_text(run_dir) == metrics_text(reference)
    mine, theirs = final_weights(run_dir), final_weights(reference)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[key], theirs[key]) for key in mine)


def test_sigkill_mid_epoch_then_resume_reaches_the_same_metrics(tmp_path, data_dir, uninterrupted):
    config_path = interruptible_config(tmp_path, data_dir)
    marker = tmp_path / "hanging"
    process = launch(config_path, trip="hang", at=STEPS_PER_EPOCH + 3, marker=marker, wait=False)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # in epoch 2, step 4: its first 3 steps are lost
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    run_dir = tmp_path / "runs" / RUN_NAME
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1

    code, _, err = launch(config_path, "--resume", "auto")

    assert code == 0, err
    assert "resuming" in err and "epoch 1/3" not in err  # continued, did not start over
    assert_same_run(run_dir, uninterrupted)


def test_sigusr1_checkpoints_mid_epoch_exits_3_and_resumes_exactly(tmp_path, data_dir, uninterrupted):
    config_path = interruptible_config(tmp_path, data_dir)
    code, _, err = launch(config_path, trip="USR1", at=STEPS_PER_EPOCH + 3)

    assert code == EXIT_PREEMPTED == 3
    assert "SIGUSR1: checkpoint written at epoch 2 step 3" in err
    run_dir = tmp_path / "runs" / RUN_NAME
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["epoch_step"], checkpoint["step"]) == (1, 3, STEPS_PER_EPOCH + 3)
    assert checkpoint["epoch_sums"]["count"] == 3 * BATCH
    assert len(metrics_text(run_dir).splitlines()) == 1

    code, _, err = launch(config_path, "--resume", "auto")

    assert code == 0, err
    assert "resuming" in err and "at epoch 2, step 3" in err
    assert_same_run(run_dir, uninterrupted)


def test_sigterm_also_ends_in_a_checkpoint(tmp_path, data_dir):
    config_path = interruptible_config(tmp_path, data_dir, epochs=1)
    code, _, err = launch(config_path, trip="TERM", at=2)
    assert code == 3, err
    checkpoint = torch.load(tmp_path / "runs" / "mlp_deadzone4b_e1_lr0.003" / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["epoch_step"]) == (0, 2)


def test_checkpoint_holds_plain_data_for_weights_only_loading(uninterrupted):
    checkpoint = torch.load(uninterrupted / "last.pt", weights_only=True)
    keys = {"step", "epoch_sums", "best_val_acc", "run_name", "grad_scaler", "wandb_id"}
    assert set(REQUIRED_KEYS) | keys <= checkpoint.keys()
    assert checkpoint["grad_scaler"] is None  # amp off: no fp16 loss scale to keep
    assert checkpoint["epoch"] == EPOCHS and checkpoint["epoch_step"] == 0
    assert checkpoint["step"] == EPOCHS * STEPS_PER_EPOCH
    assert checkpoint["config"] == yaml.safe_load((uninterrupted / "config.yaml").read_text())
    assert checkpoint["run_name"] == RUN_NAME and checkpoint["wandb_id"] is None
    assert set(checkpoint["rng"]) == {"python", "numpy", "torch", "cuda", "loader"}
    assert any("logit_dz" in key for key in checkpoint["model"])
    assert any(key.endswith("parametrizations.weight.original") for key in checkpoint["model"])
    best = json.loads(metrics_text(uninterrupted).splitlines()[-1])
    assert checkpoint["best_val_acc"] >= best["val_acc"]


def test_rng_states_round_trip():
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3), np.random.normal()  # numpy caches a gaussian
    saved = rng_state(generator)

    def draws():
        return random.random(), np.random.normal(), torch.rand(2).tolist(), torch.rand(1, generator=generator).item()

    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9), generator.manual_seed(9)
    restore_rng(saved, generator)
    assert draws() == expected


def test_rewind_metrics_drops_epochs_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": epoch, "loss": epoch / 10}) + "\n" for epoch in (1, 2, 3)))
    rewind_metrics(path, 2)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]
    rewind_metrics(path, 0)
    assert path.read_text() == ""


def test_a_run_directory_with_a_checkpoint_is_never_overwritten(tmp_path, capsys):
    config_path = write_config(tmp_path, quick_config(tmp_path, model="mlp"))
    assert cli.main(["train", "--config", str(config_path)]) == 0
    run_dir = tmp_path / "runs" / "mlp_deadzone4b_e1_lr0.003"
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    capsys.readouterr()

    assert cli.main(["train", "--config", str(config_path)]) == 2

    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"config error: {config_path}: save_dir: {run_dir} already holds a checkpoint")
    assert "--resume auto" in line and "new save_dir" in line
    assert {name: (run_dir / name).read_bytes() for name in before} == before

    # a finished run resumed with run-time keys changed has nothing left to do
    assert cli.main(["train", "--config", str(config_path), "--resume", "auto", "--set", "workers=1",
                              "--set", "log_interval=7"]) == 0
    assert {name: (run_dir / name).read_bytes() for name in before} == before

    # other keys may not change under a resume: all differing keys are listed
    assert cli.main(["train", "--config", str(config_path), "--resume", "auto", "--set", "seed=1",
                              "--set", "optimizer.param_groups.dz.lr=0.1"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"config error: {config_path}: optimizer.param_groups.dz.lr, seed: differs from the "
                           f"config of checkpoint {run_dir / 'last.pt'}")

    # more epochs is a run-time change: --resume PATH continues in the checkpoint's directory
    assert cli.main(["train", "--config", str(config_path), "--resume", str(run_dir / "last.pt"),
                              "--set", "epochs=2"]) == 0
    assert [json.loads(line)["epoch"] for line in metrics_text(run_dir).splitlines()] == [1, 2]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2
