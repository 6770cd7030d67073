"""Slurm ends jobs with SIGTERM to every process of the job (scancel without --signal, the time limit), loader
workers included: training still checkpoints mid-epoch and the checkpoint resumes. Runs on the test cluster of
.ci/slurm_up.sh, like tests/test_slurm.py."""
import re
import subprocess

import torch
from slurm_jobs import Job, cluster_fixture, slurm_problem

from codeq.app import cli
from conftest import quick_config, write_config

SLURM_PROBLEM = slurm_problem()

cluster = cluster_fixture(SLURM_PROBLEM)

# 45 steps an epoch, each a few tens of ms on an idle 2-core node: 500 epochs outlast a 1-minute time limit.
EPOCHS = 500
RUN = f"resnet20_deadzone4b_e{EPOCHS}_lr0.003"


def long_config(tmp_path):
    """Far more epochs of 45 steps, with two loader workers, than the tests let run."""
    config = quick_config(tmp_path, epochs=EPOCHS, batch_size=32, log_interval=1, workers=2,
                          save_dir=str(tmp_path / "runs"))
    return write_config(tmp_path, config)


def assert_resumable_mid_epoch(tmp_path, job: Job) -> None:
    log = job.log()
    # The batch script passes the TERM it gets on as USR1, so training may see either first.
    assert re.search(r"SIG(TERM|USR1): checkpoint written at epoch \d+ step \d+", log), log
    assert "DataLoader worker" not in log and "Traceback" not in log, log
    checkpoint = torch.load(tmp_path / "runs" / RUN / "last.pt", weights_only=True)
    assert checkpoint["epoch_step"] > 0 or checkpoint["epoch"] > 0
    config = long_config(tmp_path)
    assert cli.main(["train", "--config", str(config), "--resume", "auto", "--dry-run"]) == 0


def test_scancel_without_signal_with_loader_workers_leaves_a_loadable_checkpoint(tmp_path):
    job = Job.submit(tmp_path, "slurm/single_slurm.sh", str(long_config(tmp_path)), sbatch=("--cpus-per-task=2",))
    job.wait_for_log(r"epoch 1 train step 5/45")
    assert subprocess.run(["scancel", job.id]).returncode == 0
    assert job.wait()["JobState"] == "CANCELLED"
    assert_resumable_mid_epoch(tmp_path, job)


def test_a_job_that_hits_its_time_limit_with_loader_workers_checkpoints(tmp_path):
    # SIGURG (ignored by default) replaces the script's early USR1, so the time limit's own SIGTERM is what ends it.
    job = Job.submit(tmp_path, "slurm/single_slurm.sh", str(long_config(tmp_path)),
                     sbatch=("--cpus-per-task=2", "--time=1", "--signal=B:URG@1", "--no-requeue"))
    assert job.wait()["JobState"] == "TIMEOUT", job.log()
    assert_resumable_mid_epoch(tmp_path, job)
