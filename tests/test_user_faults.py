"""Config values that were silently wrong and messages a user reads: each fault with its right value."""
import json
import logging
import math
import subprocess
import sys

import pytest

from codeq.app import cli
from codeq.app.report import layer_label
from codeq.app.trainer import warn_if_collapsed
from conftest import ROOT, quick_config, write_config


def main(capsys, *argv):
    code = cli.main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def one_error(capsys, *argv) -> str:
    code, _, lines = main(capsys, *argv)
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("key,edit", [("dz", lambda text: text.replace("    dz: {", "    dz: {lr: 1.0}\n    dz: {")),
                                      ("epochs", lambda text: text + "epochs: 3\n")])
def test_a_key_given_twice_is_named_with_both_lines(tmp_path, capsys, key, edit):
    path = tmp_path / "twice.yaml"
    path.write_text(edit((ROOT / "configs" / "quickstart.yaml").read_text()))
    line = one_error(capsys, "--config", str(path))
    numbers = [number for number, text in enumerate(path.read_text().splitlines(), 1)
               if text.strip().startswith(f"{key}:")]
    assert f"{key}: given twice, on lines {numbers[0]} and {numbers[1]}; keep one of them" in line


def test_a_duplicated_grid_key_in_a_sweep_is_an_error(tmp_path, capsys):

    config = write_config(tmp_path, quick_config(tmp_path))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"configs: [{config}]\ngrid:\n  seed: [1]\n  seed: [2]\n")
    assert cli.main(["sweep", str(sweep_file)]) == 2
    assert "seed: given twice, on lines 3 and 4" in capsys.readouterr().err


@pytest.mark.parametrize("key,value,where", [("epochs", True, "epochs"), ("batch_size", True, "batch_size"),
                                             ("seed", False, "seed")])
def test_yaml_booleans_are_not_numbers(tmp_path, capsys, key, value, where):
    path = write_config(tmp_path, quick_config(tmp_path, **{key: value}))
    line = one_error(capsys, "--config", str(path))
    assert f"{where}: got the boolean {value} where int is expected" in line and "yes/no/on/off" in line


def test_a_boolean_learning_rate_from_set_is_refused(tmp_path, capsys):
    path = write_config(tmp_path, quick_config(tmp_path))
    line = one_error(capsys, "--config", str(path), "--set", "optimizer.param_groups.base.lr=on")
    assert "optimizer.param_groups.base.lr: got the boolean True" in line


@pytest.mark.parametrize("kwarg", ["init_deadzone_logit", "init_bit_logit"])
def test_a_learnable_logit_starting_at_zero_is_refused(tmp_path, capsys, kwarg):
    config = quick_config(tmp_path)
    config["quantizer"]["kwargs"].update({kwarg: 0.0, "learnable_bit": True})
    line = one_error(capsys, "--config", str(write_config(tmp_path, config)))
    assert f"quantizer.kwargs.{kwarg}: {kwarg} 0.0 cannot learn: the gradient of tanh|logit| is exactly 0" in line


def test_sgd_with_a_dead_zone_decay_that_collapses_in_the_first_epoch_is_warned(tmp_path, capsys, caplog):
    config = quick_config(tmp_path, optimizer={"type": "sgd", "param_groups": {
        "base": {"lr": 0.1, "momentum": 0.9}, "dz": {"lr": 0.1, "weight_decay": 3.0}}})
    path = write_config(tmp_path, config)
    with caplog.at_level(logging.WARNING):
        code, out, _ = main(capsys, "--config", str(path), "--dry-run")
    assert code == 0
    steps = math.ceil(math.log(0.01) / math.log(1 - 0.3))
    assert f"shrinks logit_dz by 30.0% a step, to 1 % of its start after {steps} steps" in out
    # The shipped configs' AdamW settings do not warn.
    caplog.clear()
    assert main(capsys, "--config", str(ROOT / "configs" / "quickstart.yaml"), "--dry-run",
                "--set", f"save_dir={tmp_path}")[0] == 0
    assert "logit_dz" not in caplog.text


def test_a_collapsed_run_is_warned(caplog):
    with caplog.at_level(logging.WARNING):
        warn_if_collapsed({"epoch": 2, "sparsity": 0.995, "val_acc": 0.1}, 10)
        warn_if_collapsed({"epoch": 3, "sparsity": 0.995, "val_acc": 0.6}, 10)
    assert caplog.text.count("dead zones have collapsed") == 1 and "epoch 2: 99.50 %" in caplog.text


def test_config_that_is_a_directory_or_a_device(tmp_path, capsys):
    assert one_error(capsys, "--config", str(tmp_path)).startswith(f"config error: {tmp_path}: is a directory; ")
    assert one_error(capsys, "--config", "/dev/null").startswith("config error: /dev/null: is not a regular file; ")


def test_save_dir_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    path = write_config(tmp_path, quick_config(tmp_path, model="mlp", save_dir=str(blocker / "runs")))
    line = one_error(capsys, "--config", str(path))
    assert f"save_dir: cannot create {blocker}/runs/mlp_deadzone4b_e1_lr0.003: {blocker} is a file" in line


def test_spaces_around_set_and_a_quantizer_written_as_its_name(tmp_path, capsys):
    path = write_config(tmp_path, quick_config(tmp_path, quantizer="deadzone"))
    code, out, _ = main(capsys, "--config", str(path), "--dry-run", "--set", "epochs = 3")
    assert code == 0
    assert "quantizer:  deadzone {}" in out and "3 epochs of batch" in out


def test_the_readmes_set_examples_work_on_the_config_they_are_shown_with(capsys):
    readme = (ROOT / "README.md").read_text()
    assert "`--set loss_terms.0.lambda=0.5` on `configs/deadzone_vit.yaml`" in readme
    code, out, _ = main(capsys, "--config", str(ROOT / "configs" / "deadzone_vit.yaml"), "--device", "cpu",
                        "--dry-run", "--set", "loss_terms.0.lambda=0.5",
                        "--set", "optimizer.param_groups.dz.weight_decay=2.5", "--set", "save_dir=/nonexistent/x")
    assert code == 0 and "loss terms: 0.5 * group_lasso(" in out


def test_compare_given_a_save_dir_names_its_runs(tmp_path, capsys):

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "last.pt").write_bytes(b"")
    assert cli.main(["report", "--compare", str(tmp_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"report error: {tmp_path} is a save_dir holding 2 runs, not a run directory; pass the runs "
                    f"themselves: --compare {tmp_path / 'a'} {tmp_path / 'b'}")


def test_run_name_templates_over_config_keys(tmp_path, capsys):
    template = "{model}_dzwd{optimizer.param_groups.dz.weight_decay}"
    path = write_config(tmp_path, quick_config(tmp_path, run_name=template))
    code, out, _ = main(capsys, "--config", str(path), "--dry-run")
    assert code == 0 and "run name:   resnet20_dzwd6.0" in out
    path = write_config(tmp_path, quick_config(tmp_path, run_name="{model}_{optimizer.typ}"))
    line = one_error(capsys, "--config", str(path))
    assert "run_name: {optimizer.typ} names no config key; did you mean {optimizer.type}?" in line


def test_wandb_offline_prints_one_line(tmp_path):
    config = write_config(tmp_path, quick_config(tmp_path, model="mlp", wandb_project="codeq-test"))
    env = {key: value for key, value in __import__("os").environ.items() if not key.startswith("WANDB")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    result = subprocess.run([sys.executable, "run_training.py", "--config", str(config)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert [line for line in output.splitlines() if "wandb:" in line.lower()] == []
    assert output.count("W&B") == 1 and "logging offline" in output
    assert list((tmp_path / "runs" / "mlp_deadzone4b_e1_lr0.003" / "wandb").glob("offline-run-*"))


def test_layers_of_sequential_models_are_labelled_by_kind():
    assert layer_label({"name": "3", "kind": "linear"}) == "3 (linear)"
    assert layer_label({"name": "layer1.0.conv1", "kind": "conv"}) == "layer1.0.conv1"


def test_the_layer_plot_draws_fp32_layers_on_a_0_to_32_bit_axis(tmp_path, monkeypatch):
    import matplotlib.figure

    from codeq.app.report import plot_layers

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *a, **k: figures.append(figure))
    layers = [{"name": "0", "kind": "conv", "quantized": False, "bits": 32.0, "sparsity": 0.0},
              {"name": "3", "kind": "linear", "quantized": True, "bits": 4.0, "sparsity": 0.5}]
    report = {"layers": layers, "method": "CoDeQ", "model": "mlp", "weights": "4-bit", "sparsity": 0.25,
              "rel_bops": 0.5}
    plot_layers(report, tmp_path / "layers.png")
    _, bits_axis = figures[0].axes
    assert bits_axis.get_ylim() == pytest.approx((-33.6, 33.6))
    assert [bar.get_height() for bar in bits_axis.patches] == [-32.0, -4.0]
    assert [label.get_text() for label in figures[0].axes[0].get_xticklabels()] == ["0 (conv)", "3 (linear)"]


def test_metrics_name_each_loss_term(tmp_path):
    term = {"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": 1e-3, "lambda_conv": 1e-3}}
    path = write_config(tmp_path, quick_config(tmp_path, model="mlp", loss_terms=[term]))
    assert cli.main(["train", "--config", str(path)]) == 0
    [record] = [json.loads(line) for line in
                (tmp_path / "runs" / "mlp_deadzone4b_e1_lr0.003" / "metrics.jsonl").read_text().splitlines()]
    assert record["loss"] == pytest.approx(record["task_loss"] + record["loss_group_lasso"], rel=1e-6)
    assert record["loss_group_lasso"] > 0.01
