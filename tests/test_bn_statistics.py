"""BatchNorm statistics that match the weights evaluated: a run re-estimates them before each validation (config
``bn_recalibration_batches``), its checkpoints hold them, and ``codeq evaluate`` / ``codeq export`` re-estimate the
stale ones of a checkpoint that lacks them. Re-estimation changes no weight, no training batch and no resume."""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_data import PER_BATCH, write_cifar

from codeq.app import cli
from codeq.app.config import config_differences
from conftest import ROOT, quick_config, write_config

TRIPWIRE = ROOT / "tests" / "tripwire.py"
DIGITS_RUN = "resnet20_deadzone4b_e1_lr0.003"


def digits_config(tmp_path, batches: int):
    """One epoch at 16 px with a dead-zone decay that prunes ~80 % of the weights in it: training's running
    statistics lag far behind the final weights."""
    config = quick_config(tmp_path, batch_size=64, save_dir=str(tmp_path / f"bn{batches}"),
                          bn_recalibration_batches=batches)
    config["optimizer"]["param_groups"]["dz"]["weight_decay"] = 24.0
    return write_config(tmp_path, config, name=f"bn{batches}.yaml")


def lines_of(capsys) -> list[str]:
    return capsys.readouterr().out.strip().splitlines()


def test_stale_statistics_score_near_chance_and_near_the_training_accuracy_once_re_estimated(tmp_path, capsys):
    assert cli.main(["train", "--config", str(digits_config(tmp_path, 0))]) == 0
    run_dir = tmp_path / "bn0" / DIGITS_RUN
    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["val_acc"] <= 0.25  # chance is 0.1
    assert torch.load(run_dir / "last.pt", weights_only=True)["bn_recalibrated"] == 0
    capsys.readouterr()

    assert cli.main(["evaluate", str(run_dir)]) == 0  # the run chose no re-estimation: its statistics, said so
    out = lines_of(capsys)
    assert out[0].startswith(f"validation: loss {record['val_loss']:.4f}, accuracy {record['val_acc']:.2%}")
    assert out[1] == "BatchNorm statistics: training's running averages, as stored (--bn-batches N re-estimates them)"
    assert "- BatchNorm statistics: training's running averages, not re-estimated" in "\n".join(out)

    assert cli.main(["evaluate", str(run_dir), "--bn-batches", "5"]) == 0
    out = lines_of(capsys)
    accuracy = float(out[0].split("accuracy ")[1].split("%")[0]) / 100
    assert accuracy >= record["train_acc"] - 0.1 and accuracy >= 3 * record["val_acc"]
    assert out[1] == ("BatchNorm statistics: re-estimated now on 5 training batches of digits (the checkpoint held "
                      "training's running averages)")


def test_a_run_validates_and_checkpoints_with_re_estimated_statistics(tmp_path, capsys, caplog):
    stale_config, config = digits_config(tmp_path, 0), digits_config(tmp_path, 5)
    assert cli.main(["train", "--config", str(stale_config)]) == 0
    assert cli.main(["train", "--config", str(config)]) == 0
    stale_dir, run_dir = tmp_path / "bn0" / DIGITS_RUN, tmp_path / "bn5" / DIGITS_RUN
    [stale] = [json.loads(line) for line in (stale_dir / "metrics.jsonl").read_text().splitlines()]
    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["val_acc"] >= record["train_acc"] - 0.1 and record["val_acc"] >= 3 * stale["val_acc"]
    assert {key: value for key, value in record.items() if not key.startswith("val_")} == \
        {key: value for key, value in stale.items() if not key.startswith("val_")}  # the same training
    [cost] = [message for message in (record.getMessage() for record in caplog.records)
              if "BatchNorm statistics re-estimated on 5 batches" in message]
    assert cost.startswith("epoch 1/1 ") and "% of the epoch)" in cost

    last, best = (torch.load(run_dir / name, weights_only=True) for name in ("last.pt", "best.pt"))
    stale_last = torch.load(stale_dir / "last.pt", weights_only=True)
    assert last["bn_recalibrated"] == best["bn_recalibrated"] == 5
    for key, value in last["model"].items():
        statistic = key.endswith(("running_mean", "running_var", "num_batches_tracked"))
        assert torch.equal(best["model"][key], value)
        assert torch.equal(stale_last["model"][key], value) != statistic, key  # only the statistics differ
    capsys.readouterr()

    assert cli.main(["evaluate", str(run_dir / "best.pt")]) == 0  # the checkpoint's own statistics: the run's val_acc
    out = lines_of(capsys)
    assert out[0].startswith(f"validation: loss {record['val_loss']:.4f}, accuracy {record['val_acc']:.2%}")
    assert out[1] == "BatchNorm statistics: re-estimated on 5 training batches when the checkpoint was written"
    assert ("- BatchNorm statistics re-estimated with the quantized weights on 5 training batches before each "
            "validation") in "\n".join(out)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["bn_recalibration_batches"] == 5 and report["val_acc"] == record["val_acc"]

    assert cli.main(["export", str(run_dir), str(tmp_path / "fresh.codeq")]) == 0
    assert lines_of(capsys)[0] == ("BatchNorm statistics: re-estimated on 5 training batches when the checkpoint was "
                                   "written")
    assert cli.main(["export", str(stale_dir), str(tmp_path / "stale.codeq")]) == 0  # the run's choice: stored
    assert lines_of(capsys)[0].startswith("BatchNorm statistics: training's running averages, as stored")
    assert cli.main(["export", str(stale_dir), str(tmp_path / "fixed.codeq"), "--bn-batches", "5"]) == 0
    assert lines_of(capsys)[0].startswith("BatchNorm statistics: re-estimated now on 5 training batches of digits")
    assert cli.main(["evaluate", str(tmp_path / "fixed.codeq")]) == 0
    out = lines_of(capsys)
    assert out[1] == "BatchNorm statistics: as exported"
    assert float(out[0].split("accuracy ")[1].split("%")[0]) / 100 >= 3 * stale["val_acc"]


def test_a_checkpoint_of_a_run_before_re_estimation_existed_resumes_only_without_it(tmp_path):
    saved = {"model": "resnet20", "epochs": 1}  # a config saved before the key existed: those runs did not re-estimate
    assert config_differences({"model": "resnet20", "epochs": 1, "bn_recalibration_batches": 0}, saved) == []
    assert config_differences({"model": "resnet20", "epochs": 1, "bn_recalibration_batches": 5}, saved) == \
        ["bn_recalibration_batches"]


BATCH, STEPS = 4, -(-5 * PER_BATCH // 4)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root)
    return root


def cifar_run(tmp_path, cifar, batches: int, *args, trip: str = "", at: int = 0):
    """ResNet-20 on a miniature CIFAR-10, whose random crops and flips draw from torch's global generator: a
    re-estimation that drew from it would shift every later training batch."""
    tmp_path.mkdir(exist_ok=True)
    config = quick_config(tmp_path, dataset="cifar10", data_dir=str(cifar), epochs=2, batch_size=BATCH,
                          save_dir=str(tmp_path / "runs"), bn_recalibration_batches=batches, plugins=[str(TRIPWIRE)],
                          loss_terms=[{"name": "tripwire"}])
    path = write_config(tmp_path, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CODEQ_TRIP": trip, "CODEQ_TRIP_AT": str(at)}
    result = subprocess.run([sys.executable, "run_training.py", "--config", str(path), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stderr, tmp_path / "runs" / "resnet20_deadzone4b_e2_lr0.003"


def test_re_estimation_changes_no_weight_and_a_resumed_run_matches_an_uninterrupted_one(tmp_path, cifar):
    code, err, plain = cifar_run(tmp_path / "off", cifar, 0)
    assert code == 0, err
    code, err, reference = cifar_run(tmp_path / "on", cifar, 2)
    assert code == 0, err
    code, err, resumed = cifar_run(tmp_path / "resumed", cifar, 2, trip="USR1", at=STEPS + 3)
    assert code == 3 and "SIGUSR1: checkpoint written at epoch 2 step 3" in err, err
    assert torch.load(resumed / "last.pt", weights_only=True)["bn_recalibrated"] == 0  # mid-epoch: stale
    code, err, resumed = cifar_run(tmp_path / "resumed", cifar, 2, "--resume", "auto")
    assert code == 0, err

    states = [torch.load(run / "last.pt", weights_only=True)["model"] for run in (plain, reference, resumed)]
    for key in states[0]:
        statistic = key.endswith(("running_mean", "running_var", "num_batches_tracked"))
        assert torch.equal(states[0][key], states[1][key]) != statistic, key
        assert torch.equal(states[1][key], states[2][key]), key
    assert (reference / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()


def test_the_cost_benchmark_times_each_phase_of_an_epoch(tmp_path):
    result = subprocess.run([sys.executable, "bench/bn_recalibration.py", "--epochs", "2", "--threads", "1", "--set",
                             "img_size=8", "--set", "batch_size=256", "--json", str(tmp_path / "cost.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = json.loads((tmp_path / "cost.json").read_text())["epochs"]
    assert [row["epoch"] for row in epochs] == [1, 2] and all(row["batches"] == 5 for row in epochs)
    assert all(0 < row["share"] < 1 and row["recalibrate_s"] > 0 for row in epochs)
    assert result.stdout.splitlines()[-1].startswith("median share of an epoch: ")
