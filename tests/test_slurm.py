"""The real batch scripts in slurm/, submitted with sbatch to a running Slurm cluster (CI: the two-node,
2-CPU-per-node cluster of .ci/slurm_up.sh; the jobs here take one node, either), on the digits data set and
the CPU. Two-node jobs: tests/test_slurm_multinode.py.

Preemption is what Slurm does before a time limit with ``--signal=B:USR1@120``: ``scancel
--signal=USR1 --batch`` sends the same signal to the batch shell, mid-run; the job must checkpoint,
requeue itself, resume and end with exactly the metrics of an uninterrupted run.
"""
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from slurm_jobs import Job, cluster_fixture, completed, metrics, preemptible_config, slurm_problem

from conftest import ROOT, quick_config, write_config

SLURM_PROBLEM = slurm_problem()

cluster = cluster_fixture(SLURM_PROBLEM)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def single_reference(work):
    """An uninterrupted single-process job (1 CPU), running beside the preempted one (the other CPU)."""
    config = preemptible_config(work, "single")
    return Job.submit(work, "slurm/single_slurm.sh", str(config), sbatch=("--cpus-per-task=1",))


def test_single_job_preempted_by_usr1_requeues_and_ends_like_an_uninterrupted_one(work, single_reference):
    config = preemptible_config(work, "preempted")
    job = Job.submit(work, "slurm/single_slurm.sh", str(config), sbatch=("--cpus-per-task=1",))
    job.wait_for_log(r"epoch 1 train step 3/45")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
    log = completed(job)
    assert job.fields()["Restarts"] == "1"
    assert "USR1: checkpoint, then requeue" in log and f"requeueing job {job.id}" in log
    assert re.search(r"resuming .*last\.pt at epoch 1, step (\d+)", log), log
    step = int(re.search(r"at epoch 1, step (\d+)", log).group(1))
    assert 3 <= step < 45, "the checkpoint was not written mid-epoch"
    completed(single_reference)
    name = "resnet20_deadzone4b_e2_lr0.003"
    assert metrics(work / "preempted" / name) == metrics(work / "single" / name)


def test_single_job_trains_and_writes_its_run(work, single_reference):
    log = completed(single_reference)
    run_dir = work / "single" / "resnet20_deadzone4b_e2_lr0.003"
    assert [record["epoch"] for record in metrics(run_dir)] == [1, 2]
    assert {"last.pt", "best.pt", "config.yaml"} <= {path.name for path in run_dir.iterdir()}
    assert f"job {single_reference.id} restart 0" in log and "single process on cpu" in log
    assert "training exited with code 0" in log


def test_sweep_array_runs_one_task_per_combination(work):
    config = write_config(work, quick_config(work, model="mlp", save_dir=str(work / "sweep")), "sweep_base.yaml")
    sweep = work / "decay.yaml"
    sweep.write_text(yaml.safe_dump({"configs": [str(config)],
                                     "grid": {"optimizer.param_groups.dz.weight_decay": [0.5, 8.0]}}))
    submit = subprocess.run(["bash", str(ROOT / "slurm" / "sweep.sh"), str(sweep), "--cpus-per-task=1",
                             f"--output={work}/sweep-%A_%a.out"], cwd=work, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr
    assert "submitting 2 tasks" in submit.stdout
    array_id = re.search(r"Submitted batch job (\d+)", submit.stdout).group(1)
    for task in [Job(f"{array_id}_{index}", work / f"sweep-{array_id}_{index}.out") for index in (0, 1)]:
        assert f"sweep {sweep} task" in completed(task)
    runs = sorted((work / "sweep").iterdir())
    assert [run.name for run in runs] == ["decay_00_mlp_deadzone4b_e1_lr0.003_weight_decay=0.5",
                                          "decay_01_mlp_deadzone4b_e1_lr0.003_weight_decay=8.0"]
    for run, decay in zip(runs, (0.5, 8.0)):
        groups = yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["param_groups"]
        assert groups["dz"]["weight_decay"] == decay
        assert len(metrics(run)) == 1


DDP_ENV = {"CODEQ_NPROC_PER_NODE": "2"}
DDP_RUN = "resnet20_deadzone4b_e2_lr0.003_gb64"  # batch_size 32 per process x 2 processes


@pytest.fixture(scope="module")
def ddp_reference(work):
    config = preemptible_config(work, "ddp")
    return Job.submit(work, "slurm/ddp_slurm.sh", str(config), sbatch=("--cpus-per-task=2",), env=DDP_ENV)


def test_ddp_job_runs_two_gloo_processes_and_rank_0_alone_writes(work, ddp_reference):
    log = completed(ddp_reference)
    assert "DDP: 1 node(s) x 2 process(es) on cpu" in log
    assert "distributed: 2 processes (gloo), 2 per node" in log
    assert log.count("global batch 64 (2 processes x batch_size 32)") == 1
    assert [path.name for path in (work / "ddp").iterdir()] == [DDP_RUN]
    assert [record["epoch"] for record in metrics(work / "ddp" / DDP_RUN)] == [1, 2]


def test_ddp_job_preempted_by_usr1_requeues_and_ends_like_an_uninterrupted_one(work, ddp_reference):
    completed(ddp_reference)  # both need the 2 CPUs: one after the other
    config = preemptible_config(work, "ddp_preempted")
    job = Job.submit(work, "slurm/ddp_slurm.sh", str(config), sbatch=("--cpus-per-task=2",), env=DDP_ENV)
    job.wait_for_log(r"epoch 1 train step 3/23")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
    log = completed(job)
    assert job.fields()["Restarts"] == "1"
    assert f"requeueing job {job.id}" in log
    # processes agree on stopping every 10 steps (or at the epoch's end), so the checkpoint is at one of those
    assert re.search(r"resuming .*last\.pt at epoch (1, step (10|20)|2, step 0) of it", log), log
    assert metrics(work / "ddp_preempted" / DDP_RUN) == metrics(work / "ddp" / DDP_RUN)
