"""slurm/ddp_slurm.sh on two nodes: one torchrun per node, a c10d rendezvous on the allocation's first node,
rank 0 on one node writing for both, and preemption reaching both nodes (CI: nodes n1 and n2 of
.ci/slurm_up.sh, two slurmd on one machine, each in a namespace with its node's hostname).

Two nodes x 1 process do the arithmetic of one node x 2 processes: the same ranks take the same shards of
the same global batch and gloo sums the same two gradients, so the runs must end with equal metrics.
"""
import re
import subprocess
from pathlib import Path

import pytest
import torch
from slurm_jobs import Job, cluster_fixture, completed, metrics, preemptible_config, two_node_problem

from codeq.app.checkpoint import load_checkpoint, load_model_state
from codeq.app.config import load_config
from codeq.app.experiment import build_model

SLURM_PROBLEM = two_node_problem()
# 1 CPU a node: OMP_NUM_THREADS=1 in every process, as in the one-node run with 2 CPUs for 2 processes.
TWO_NODES = ("--nodes=2", "--cpus-per-task=1")
TWO_NODES_ENV = {"CODEQ_NPROC_PER_NODE": "1"}
RUN = "resnet20_deadzone4b_e2_lr0.003_gb64"  # batch_size 32 per process x 2 processes
# Processes agree on stopping every 10 steps (or at the epoch's end), so a checkpoint is at one of those;
# as the warning names them (epoch counted from 1) and as the checkpoint holds them (epochs finished).
STOP_POINTS = r"epoch (1 step (10|20)|2 step 0)"
CHECKPOINT_STOP_POINTS = {(0, 10), (0, 20), (1, 0)}

cluster = cluster_fixture(SLURM_PROBLEM)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slurm_multinode")


@pytest.fixture(scope="module")
def one_node_reference(work: Path) -> Job:
    """2 processes on one node, 2 CPUs: the job the two-node one must equal."""
    config = preemptible_config(work, "one_node")
    return Job.submit(work, "slurm/ddp_slurm.sh", str(config), sbatch=("--cpus-per-task=2",),
                      env={"CODEQ_NPROC_PER_NODE": "2"})


@pytest.fixture(scope="module")
def two_node_reference(work: Path) -> Job:
    """An uninterrupted two-node job."""
    config = preemptible_config(work, "two_nodes")
    return Job.submit(work, "slurm/ddp_slurm.sh", str(config), sbatch=TWO_NODES, env=TWO_NODES_ENV)


def two_node_job(work: Path, name: str) -> Job:
    """A two-node job, once its training has taken 3 steps."""
    job = Job.submit(work, "slurm/ddp_slurm.sh", str(preemptible_config(work, name)), sbatch=TWO_NODES,
                     env=TWO_NODES_ENV)
    job.wait_for_log(r"epoch 1 train step 3/23")
    return job


def test_two_node_job_ends_with_the_metrics_of_one_node_with_as_many_processes(work, one_node_reference,
                                                                                two_node_reference):
    log = completed(two_node_reference)
    assert two_node_reference.fields()["NodeList"] == "n[1-2]"
    assert re.search(r"DDP: 2 node\(s\) x 1 process\(es\) on cpu, rendezvous n1:\d+", log), log
    assert log.count("distributed: 2 processes (gloo), 1 per node") == 1
    assert log.count("global batch 64 (2 processes x batch_size 32)") == 1  # rank 0 alone logs
    assert log.count("run directory:") == 1
    assert [path.name for path in (work / "two_nodes").iterdir()] == [RUN]
    run_dir = work / "two_nodes" / RUN
    assert {"last.pt", "best.pt", "config.yaml", "report.json"} <= {path.name for path in run_dir.iterdir()}
    two_nodes = metrics(run_dir)
    assert [record["epoch"] for record in two_nodes] == [1, 2]
    assert two_nodes[-1]["val_acc"] > 0.8

    assert "DDP: 1 node(s) x 2 process(es) on cpu" in completed(one_node_reference)
    assert two_nodes == metrics(work / "one_node" / RUN)


def test_two_node_job_preempted_by_usr1_checkpoints_once_requeues_and_ends_like_an_uninterrupted_one(
        work, two_node_reference):
    job = two_node_job(work, "two_nodes_preempted")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
    log = completed(job)
    assert job.fields()["Restarts"] == "1"
    assert log.count("DDP: 2 node(s) x 1 process(es)") == 2  # the first start and the requeued one
    assert "USR1: checkpoint, then requeue" in log and f"requeueing job {job.id}" in log
    # the batch shell's TERM reaches the workers of both nodes through their torchrun; they stop at one step,
    # rank 0 writes the checkpoint and alone logs it (the others log errors only)
    assert len(re.findall(r"SIGTERM: checkpoint written at " + STOP_POINTS, log)) == 1, log
    assert log.count("checkpoint written at") == 1, log
    assert re.search(r"resuming .*last\.pt at " + STOP_POINTS.replace(" step", ", step") + " of it", log), log
    completed(two_node_reference)
    assert metrics(work / "two_nodes_preempted" / RUN) == metrics(work / "two_nodes" / RUN)


def test_two_node_job_cancelled_with_sigterm_leaves_a_loadable_checkpoint(work):
    job = two_node_job(work, "two_nodes_cancelled")
    subprocess.run(["scancel", job.id], check=True)
    fields = job.wait()
    log = job.log()
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", log
    assert "TERM: checkpoint, then stop" in log and "requeueing" not in log
    assert len(re.findall(r"SIGTERM: checkpoint written at " + STOP_POINTS, log)) == 1, log
    assert log.count("checkpoint written at") == 1, log

    run_dir = work / "two_nodes_cancelled" / RUN
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert (checkpoint["epoch"], checkpoint["epoch_step"]) in CHECKPOINT_STOP_POINTS
    assert checkpoint["run_name"] == RUN
    logged_epochs = metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []  # the file starts with an epoch
    assert len(logged_epochs) == checkpoint["epoch"]
    config = load_config(work / "two_nodes_cancelled.yaml")
    model, _ = build_model(config, 10)
    load_model_state(model, checkpoint["model"], run_dir / "last.pt")
    assert all(torch.isfinite(value).all() for value in model.state_dict().values() if value.is_floating_point())
