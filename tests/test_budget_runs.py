"""The config's ``target``: runs that reach their budget, log it every epoch, resume it exactly, agree on it under
DDP, refuse what they cannot compute before training, and end with one line when the budget is missed or reached only
by collapsing accuracy."""
import json
import re

import pytest
import torch
from test_distributed import torchrun
from test_resume import launch

import codeq
from codeq.app import cli
from codeq.app.targets import check_outcome
from codeq.budget import BudgetController
from codeq.compression import layer_stats, summary
from codeq.errors import EXIT_FAILURE, EXIT_PREEMPTED, RunFailure
from conftest import ROOT, write_config

EPOCHS = 8
RUN = f"mlp_deadzone4b_e{EPOCHS}_lr0.003_sparsity0.9"


def targeted_config(tmp_path, **overrides):
    """An MLP on digits at 8 px with 4-bit CoDeQ and a sparsity target: 23 steps an epoch, seconds a run."""
    config = {
        "model": "mlp", "dataset": "digits", "epochs": EPOCHS, "batch_size": 64, "img_size": 8, "device": "cpu",
        "wandb_project": None, "workers": 0, "log_interval": 5, "save_dir": str(tmp_path / "runs"),
        "quantizer": {"name": "deadzone", "kwargs": {"fixed_bit_val": 4, "learnable_bit": False}},
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.003, "weight_decay": 0.0005},
                                                        "dz": {"lr": 0.003, "weight_decay": 6.0}}},
        "lr_scheduler": "cosine", "target": {"sparsity": 0.9},
    }
    config.update(overrides)
    return config


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reached(tmp_path_factory):
    """One targeted run, never interrupted: (run directory, stderr)."""
    tmp_path = tmp_path_factory.mktemp("reached")
    config = targeted_config(tmp_path, loss_terms=[{"name": "tripwire", "lambda": 1.0}])
    code, out, err = launch(write_config(tmp_path, config))
    assert code == 0, err
    return tmp_path / "runs" / RUN, out, err


def test_a_sparsity_target_is_met_by_the_final_model_and_logged_every_epoch(reached):
    run_dir, out, err = reached
    rows = records(run_dir)
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    assert abs(rows[-1]["sparsity"] - 0.9) <= 0.01
    report = json.loads((run_dir / "report.json").read_text())
    assert abs(report["sparsity"] - 0.9) <= 0.01 and report["sparsity"] == pytest.approx(rows[-1]["sparsity"])
    assert rows[-1]["val_acc"] > 0.8
    # the target in force ramps up over the first half of the steps, then holds; the pressure moves
    targets = [row["target/sparsity"] for row in rows]
    assert targets[0] < targets[1] < targets[2] < 0.9 and targets[EPOCHS // 2:] == [0.9] * (EPOCHS - EPOCHS // 2)
    pressures = [row["pressure/dz.weight_decay"] for row in rows]
    assert len(set(pressures)) == EPOCHS and max(pressures) > 6.0 > min(pressures)
    assert f"epoch {EPOCHS}/{EPOCHS} " in err and " target sparsity 0.9000 dz.weight_decay " in err
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["budget"]["steps"] == EPOCHS * 23 and checkpoint["budget"]["metric"] == "sparsity"
    assert checkpoint["optimizer"]["param_groups"][-1]["weight_decay"] == pytest.approx(pressures[-1])
    assert "run directory:" in out


def test_sigusr1_mid_epoch_then_resume_continues_the_controller_exactly(tmp_path, reached):
    run_dir = tmp_path / "runs" / RUN
    config_path = write_config(tmp_path, targeted_config(tmp_path, loss_terms=[{"name": "tripwire", "lambda": 1.0}]))
    code, _, err = launch(config_path, trip="USR1", at=2 * 23 + 7)  # during the ramp, between two updates
    assert code == EXIT_PREEMPTED, err
    assert torch.load(run_dir / "last.pt", weights_only=True)["budget"]["steps"] == 2 * 23 + 7

    code, _, err = launch(config_path, "--resume", "auto")

    assert code == 0, err
    assert (run_dir / "metrics.jsonl").read_text() == (reached[0] / "metrics.jsonl").read_text()
    mine, theirs = (torch.load(path / "last.pt", weights_only=True) for path in (run_dir, reached[0]))
    assert mine["budget"] == theirs["budget"]
    assert all(torch.equal(mine["model"][key], theirs["model"][key]) for key in theirs["model"])


def test_the_dry_run_shows_the_target(tmp_path, capsys):
    config_path = write_config(tmp_path, targeted_config(tmp_path, target={"rel_bops": 0.02}))
    assert cli.main(["train", "--config", str(config_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"run name:   mlp_deadzone4b_e{EPOCHS}_lr0.003_rel_bops0.02" in out
    assert re.search(r"\ntarget:     rel_bops 0.0200 \(final model within 0.0190..0.0210\), ramped from 0.12\d\d over "
                     r"the first 50% of the steps \(cubic\), then held\n  pressure: dz.weight_decay 6, scaled together "
                     r"within /1000..x1000; with every pressed logit at 0 the model has rel_bops 0.001\d\n", out)
    assert not (tmp_path / "runs").exists()


def test_a_budget_the_run_cannot_reach_ends_with_one_line_naming_the_run(tmp_path, capsys):
    # the dead-zone logits learn so slowly that no weight decay the controller may set widens them in time
    config = targeted_config(tmp_path, epochs=2)
    config["optimizer"]["param_groups"]["dz"]["lr"] = 1e-6
    config_path = write_config(tmp_path, config)

    assert cli.main(["train", "--config", str(config_path)]) == EXIT_FAILURE

    line = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = tmp_path / "runs" / "mlp_deadzone4b_e2_lr0.003_sparsity0.9"
    assert line.startswith("error: target sparsity 0.9000 missed: the model ends at 0.0")
    assert "(allowed 0.8900..0.9100); the pressure was at its ceiling (dz.weight_decay 6000, x1e+03 the start) " \
           "from step " in line
    assert re.search(r"the dead zones did not widen in time \(at their widest: sparsity 0.9[89]\d\d\); ", line)
    assert line.endswith(f"train longer, give the pressed logits a higher lr or lower the target; run directory "
                         f"{run_dir}, last checkpoint {run_dir / 'last.pt'} (epoch 2)")
    assert (run_dir / "report.json").is_file() and len(records(run_dir)) == 2


def test_a_budget_reached_only_at_chance_accuracy_is_a_failure(tmp_path):
    model = codeq.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)), "deadzone", {"fixed_bit_val": 4,
                                                                                    "init_deadzone_logit": 0.5})
    optimizer = torch.optim.AdamW(codeq.param_groups(model, base={}, dz={"weight_decay": 1.0}))
    budget = BudgetController(model, 10, optimizer, sparsity=summary(layer_stats(model))["sparsity"])
    check_outcome(budget, 0.9, 10, tmp_path, 3)  # met, accuracy fine
    with pytest.raises(RunFailure) as failure:
        check_outcome(budget, 0.11, 10, tmp_path, 3)
    assert str(failure.value) == (
        f"target sparsity {budget.final:.4f} was reached only by collapsing accuracy: the final val_acc 0.1100 is at "
        f"chance (0.1000 for 10 classes); run directory {tmp_path}, last checkpoint {tmp_path / 'last.pt'} "
        f"(epoch 3); lower the target or train longer")


@pytest.mark.usefixtures("registries_as_shipped")
def test_rel_bops_of_a_model_without_macs_is_a_config_error_before_training(tmp_path, capsys):
    plugin = tmp_path / "embedder.py"
    plugin.write_text(
        "import torch\nfrom torch import nn\nfrom codeq import MODEL_REGISTRY\n\n\n"
        "@MODEL_REGISTRY.register('embedder')\n"
        "def embedder(num_classes: int, img_size: int) -> nn.Module:\n"
        "    class Embedder(nn.Module):\n"
        "        def __init__(self):\n"
        "            super().__init__()\n"
        "            self.table = nn.Embedding(256, num_classes)\n\n"
        "        def forward(self, x):\n"
        "            return self.table((x.flatten(1)[:, 0].abs() * 10).long().clamp(0, 255))\n"
        "    return Embedder()\n")
    config_path = write_config(tmp_path, targeted_config(tmp_path, model="embedder", plugins=[str(plugin)],
                                                         target={"rel_bops": 0.05}))

    assert cli.main(["train", "--config", str(config_path)]) == 2

    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"config error: {config_path}: target.rel_bops: the model has no Conv2d or Linear layer whose "
                    f"MACs can be counted, so its Rel. BOPs are undefined; target sparsity or size_bytes instead")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("target", "quantizer", "groups", "loss_terms"), [
    ({"rel_bops": 0.03}, {"fixed_bit_val": 4, "learnable_bit": True, "max_bits": 6},
     {"bit": {"lr": 0.003, "weight_decay": 2.0}}, []),
    ({"size_bytes": 30_000}, {"fixed_bit_val": 4, "learnable_bit": False}, {}, []),
    # Adam moves a logit about lr a step whatever lambda is: the loss term needs a faster dz lr than decay does,
    # and twice the epochs for the dead zones to widen in time
    ({"sparsity": 0.9}, {"fixed_bit_val": 4, "learnable_bit": False}, {"dz": {"lr": 0.02, "weight_decay": 0.0}},
     [{"name": "dz_l2", "lambda": 0.05}]),
    ({"sparsity": 0.8}, {"fixed_bit_val": 4, "learnable_bit": False}, "sgd", [{"name": "dz_l2", "lambda": 0.005}]),
])
def test_rel_bops_size_and_loss_term_pressure_reach_their_targets(tmp_path, target, quantizer, groups, loss_terms):
    config = targeted_config(tmp_path, target=target, loss_terms=loss_terms, epochs=20 if groups != "sgd" and
                             loss_terms else 10, quantizer={"name": "deadzone", "kwargs": quantizer})
    if groups == "sgd":
        sgd = {"lr": 0.05, "momentum": 0.9}
        config["optimizer"] = {"type": "sgd", "param_groups": {"base": {**sgd, "weight_decay": 0.0005},
                                                               "dz": {**sgd, "weight_decay": 0.0}}}
    else:
        config["optimizer"]["param_groups"].update(groups)
    config_path = write_config(tmp_path, config)
    assert cli.main(["train", "--config", str(config_path)]) == 0
    [run_dir] = (tmp_path / "runs").iterdir()
    [(metric, value)] = target.items()
    report = json.loads((run_dir / "report.json").read_text())
    final = report["size"]["compressed_bytes"] if metric == "size_bytes" else report[metric]
    assert abs(final - value) <= (0.01 if metric == "sparsity" else 0.05 * value), final
    assert records(run_dir)[-1][f"target/{metric}"] == value


def test_ddp_processes_take_one_decision(tmp_path):
    """Two gloo processes under torchrun: each measures another value, both set rank 0's pressures."""
    torchrun([str(ROOT / "tests" / "distributed_budget_probe.py"), str(tmp_path)], tmp_path)
    zero, one = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert zero == one and zero[-1] > zero[0] > 1.0  # rank 0's value (behind the target): the pressure rises


def test_a_targeted_ddp_run_logs_once_and_finishes(tmp_path):
    config_path = write_config(tmp_path, targeted_config(tmp_path, epochs=10, target={"sparsity": 0.5}))
    result = torchrun(["run_training.py", "--config", str(config_path)], tmp_path)
    run_dir = tmp_path / "runs" / "mlp_deadzone4b_e10_lr0.003_sparsity0.5_gb128"
    rows = records(run_dir)
    assert [row["epoch"] for row in rows] == list(range(1, 11)) and abs(rows[-1]["sparsity"] - 0.5) <= 0.01
    assert result.stderr.count(" target sparsity ") == 10  # rank 0 alone logs
