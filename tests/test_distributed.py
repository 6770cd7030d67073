"""DDP under torchrun with the gloo backend: 2 CPU processes on this machine, under one torchrun or under two
torchrun agents that meet as two nodes would; no Slurm needed."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from codeq.app.config import load_config
from codeq.app.experiment import build_model
from codeq.data.base import load_dataset
from codeq.data.loaders import build_loaders
from codeq.training import distributed
from codeq.training.loop import validate
from conftest import ROOT, quick_config, write_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
# The 2-process run sees the same global batches as the 1-process run (rank r takes every other sample of
# the same permutation) and averages the same gradients, but float sums run in another order and the
# last, padded batch of each epoch differs by one sample; on the MLP below the final validation accuracy
# agrees to within this (0.01 is 3.6 of the 360 validation images; measured: equal).
SAME_GLOBAL_BATCH_TOLERANCE = 0.01


def torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(TORCHRUN + args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_without_torchrun_the_world_is_one_process():
    assert not distributed.launched_by_torchrun()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    model = nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model
    values = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(values) is values and values.tolist() == [1.0, 2.0]
    cpu = torch.device("cpu")
    assert distributed.any_process(True, cpu) and not distributed.any_process(False, cpu)


@pytest.mark.parametrize("finished, calls", [(True, ["barrier", "destroy"]), (False, ["destroy"])])
def test_teardown_waits_for_every_process_only_after_a_finished_run(tmp_path, monkeypatch, finished, calls):
    seen = []

    def recorded(label, original):
        def call():
            seen.append(label)
            return original()
        return call

    monkeypatch.setattr(dist, "barrier", recorded("barrier", dist.barrier))
    monkeypatch.setattr(dist, "destroy_process_group", recorded("destroy", dist.destroy_process_group))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    distributed.teardown(finished)
    assert seen == calls and not distributed.is_distributed()


def test_replicas_stay_identical_and_sharded_validation_equals_one_process(tmp_path):
    quantizer = {"name": "deadzone", "kwargs": {"learnable_bit": True, "learnable_deadzone": True},
                 "exclude_layers": ["bn"]}
    loss_terms = [{"name": "group_lasso", "lambda": 1e-4, "kwargs": {"lambda_linear": 1.0, "lambda_conv": 1.0}}]
    config_path = write_config(tmp_path, quick_config(tmp_path, batch_size=48, quantizer=quantizer,
                                                      loss_terms=loss_terms))
    torchrun([str(ROOT / "tests" / "distributed_probe.py"), str(config_path), str(tmp_path)], tmp_path)

    states = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:  # weights, logit_dz / logit_bit, BatchNorm statistics (re-estimated on different batches)
        assert torch.equal(states[0][key], states[1][key]), key
    config = load_config(config_path)
    fresh, _ = build_model(config, 10)
    for key, value in fresh.state_dict().items():
        if "logit_dz" in key or "logit_bit" in key:
            assert not torch.equal(value, states[0][key]), f"{key} did not learn"
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["recalibrated"] == reports[1]["recalibrated"] == 2
    assert reports[0]["train"] == reports[1]["train"]
    assert reports[0]["loss_terms"] == reports[1]["loss_terms"] and reports[0]["loss_terms"][0] > 0
    assert reports[0]["compression"] == reports[1]["compression"]

    fresh.load_state_dict(states[0])
    data = load_dataset(config.dataset, config.data_dir, config.img_size)
    _, val_loader = build_loaders(data, config.batch_size, 0, torch.Generator().manual_seed(0))
    assert reports[0]["val_batches"] + reports[1]["val_batches"] == len(val_loader)
    torch.set_num_threads(1)  # as in the workers
    single = validate(val_loader, fresh, nn.CrossEntropyLoss(), torch.device("cpu"))
    assert reports[0]["val"] == reports[1]["val"] == single


def test_two_processes_reach_the_accuracy_of_one_process_with_the_same_global_batch(tmp_path):
    config = write_config(tmp_path, quick_config(tmp_path, model="mlp", epochs=3))
    one = subprocess.run([sys.executable, "run_training.py", "--config", str(config), "--set", "batch_size=128"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(["run_training.py", "--config", str(config), "--set", "batch_size=64"], tmp_path)

    runs = tmp_path / "runs"
    single_dir, ddp_dir = runs / "mlp_deadzone4b_e3_lr0.003", runs / "mlp_deadzone4b_e3_lr0.003_gb128"
    assert sorted(path.name for path in runs.iterdir()) == [single_dir.name, ddp_dir.name]
    assert two.stderr.count("global batch 128 (2 processes x batch_size 64)") == 1  # rank 0 alone logs
    assert two.stdout.count("run directory:") == 1
    single = [json.loads(line) for line in (single_dir / "metrics.jsonl").read_text().splitlines()]
    ddp = [json.loads(line) for line in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in ddp] == [1, 2, 3]  # one line per epoch: only rank 0 writes
    assert abs(ddp[-1]["val_acc"] - single[-1]["val_acc"]) <= SAME_GLOBAL_BATCH_TOLERANCE
    assert ddp[-1]["val_acc"] > 0.9
    assert {path.name for path in ddp_dir.iterdir()} >= {"last.pt", "best.pt", "config.yaml", "metrics.jsonl"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_torchrun_agents_meet_as_two_nodes_and_train_like_one_node_with_two_processes(tmp_path):
    """What slurm/ddp_slurm.sh starts on each node, without Slurm: two torchrun agents, one process each, meeting
    at a c10d rendezvous on 127.0.0.1, do the arithmetic of one agent with two processes."""
    config = write_config(tmp_path, quick_config(tmp_path, model="mlp", epochs=3, batch_size=64))
    torchrun(["run_training.py", "--config", str(config), "--set", f"save_dir={tmp_path / 'one_node'}"], tmp_path)
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-nodes", "run_training.py", "--config",
            str(config), "--set", f"save_dir={tmp_path / 'two_nodes'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(node, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (stdout, stderr) in zip(agents, outputs):
        assert agent.returncode == 0, stdout[-2000:] + stderr[-4000:]

    logs = "".join(stdout + stderr for stdout, stderr in outputs)
    assert logs.count("distributed: 2 processes (gloo), 1 per node") == 1  # rank 0, on one of the agents
    assert logs.count("run directory:") == 1
    run = "mlp_deadzone4b_e3_lr0.003_gb128"
    assert [path.name for path in (tmp_path / "two_nodes").iterdir()] == [run]
    two_nodes = [json.loads(line) for line in (tmp_path / "two_nodes" / run / "metrics.jsonl").read_text().splitlines()]
    one_node = [json.loads(line) for line in (tmp_path / "one_node" / run / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in two_nodes] == [1, 2, 3] and two_nodes[-1]["val_acc"] > 0.9
    assert two_nodes == one_node
