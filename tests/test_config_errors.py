"""Every bad input ends before data or disk are touched: exit code 2 and one stderr line
``config error: <file>: <key.path>: <what is wrong>; <how to fix>``."""
import subprocess
import sys

import pytest
import torch

from codeq.app import cli
from codeq.app.config import config_to_dict, load_config
from conftest import ROOT, quick_config, write_config


def setting(path, value):
    """Patch: set the dotted ``path`` of the config (list indices as numbers) to ``value``."""
    def patch(config):
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[leaf] = value
    return patch


def removing(path):
    def patch(config):
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        del node[leaf]
    return patch


def both(*patches):
    def patch(config):
        for each in patches:
            each(config)
    return patch


GROUP_LASSO = {"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": 1e-4, "lambda_conv": 1e-4}}

# id: (patch of the quick config or raw file text or None for no file, extra arguments,
#      the key path the line names ("" for file-level problems), fragments the line must contain)
CASES = {
    "target with two budgets": (setting("target", {"sparsity": 0.9, "rel_bops": 0.1}), [], "target",
                                ["gives sparsity and rel_bops", "exactly one of sparsity, rel_bops, size_bytes"]),
    "target out of range": (setting("target", {"sparsity": 1.2}), [], "target.sparsity", ["less than 1"]),
    "target without quantizer": (both(setting("quantizer", None), setting("target", {"sparsity": 0.5})), [],
                                 "target.sparsity", ["the model has no quantized layer"]),
    "target without pressure": (both(setting("optimizer.param_groups.dz.weight_decay", 0.0),
                                     setting("target", {"rel_bops": 0.05})), [], "target.rel_bops",
                                ["no dead-zone pressure to adjust", "starting weight_decay"]),
    "target beyond reach": (setting("target", {"sparsity": 0.995}), [], "target.sparsity",
                            ["beyond reach", "every dead zone at its widest"]),
    "missing file": (None, [], "", ["file not found"]),
    "empty file": ("", [], "", ["the file is empty"]),
    "only comments": ("# nothing here\n", [], "", ["the file is empty"]),
    "yaml syntax": ("model: resnet20\nepochs: [1\nbatch_size: 4\n", [], "", ["YAML syntax error at line 3, column"]),
    "top level list": ("- model\n- epochs\n", [], "", ["top level is a list, not a mapping"]),
    "top level scalar": ("resnet20\n", [], "", ["top level is a str, not a mapping"]),
    "unknown top key": (setting("epoch", 3), [], "epoch", ["unknown key", "did you mean 'epochs'"]),
    "unknown nested key": (setting("quantizer.kwarg", {}), [], "quantizer.kwarg", ["did you mean 'kwargs'"]),
    "unknown group option": (setting("optimizer.param_groups.dz.weight_decy", 1.0), [],
                             "optimizer.param_groups.dz.weight_decy", ["did you mean 'weight_decay'"]),
    "unknown param group": (setting("optimizer.param_groups.biases", {"lr": 0.1}), [],
                            "optimizer.param_groups.biases", ["unknown key", "base, dz, bit"]),
    "base group missing": (removing("optimizer.param_groups.base"), [], "optimizer.param_groups.base",
                           ["required key missing"]),
    "model missing": (removing("model"), [], "model", ["required key missing"]),
    "epochs not a number": (setting("epochs", "ten"), [], "epochs", ["valid integer", "'ten'"]),
    "epochs fractional": (setting("epochs", 2.5), [], "epochs", ["valid integer"]),
    "epochs zero": (setting("epochs", 0), [], "epochs", ["greater than or equal to 1"]),
    "batch_size zero": (setting("batch_size", 0), [], "batch_size", ["greater than or equal to 1"]),
    "batch_size negative": (setting("batch_size", -8), [], "batch_size", ["greater than or equal to 1"]),
    "negative lr": (setting("optimizer.param_groups.base.lr", -0.1), [], "optimizer.param_groups.base.lr",
                    ["greater than or equal to 0"]),
    "negative weight decay": (setting("optimizer.param_groups.dz.weight_decay", -1), [],
                              "optimizer.param_groups.dz.weight_decay", ["greater than or equal to 0"]),
    "negative workers": (setting("workers", -1), [], "workers", ["greater than or equal to 0"]),
    "bits above 8": (setting("quantizer.kwargs.fixed_bit_val", 9), [], "quantizer.kwargs.fixed_bit_val",
                     ["fixed_bit_val must be in 2..max_bits=8, got 9"]),
    "bits below 2": (setting("quantizer.kwargs.fixed_bit_val", 1), [], "quantizer.kwargs.fixed_bit_val",
                     ["got 1"]),
    "max_bits above 8": (setting("quantizer.kwargs.max_bits", 9), [], "quantizer.kwargs.max_bits",
                         ["max_bits must be in 2..8, got 9"]),
    "fixed bits above max_bits": (both(setting("quantizer.kwargs.fixed_bit_val", 6),
                                       setting("quantizer.kwargs.max_bits", 4)), [],
                                  "quantizer.kwargs.fixed_bit_val", ["max_bits=4, got 6"]),
    "uniform bitwidth": (setting("quantizer", {"name": "uniform", "kwargs": {"bitwidth": 12}}), [],
                         "quantizer.kwargs.bitwidth", ["bitwidth must be in 2..8, got 12"]),
    "bits not a number": (setting("quantizer.kwargs.fixed_bit_val", "four"), [], "quantizer.kwargs.fixed_bit_val",
                          ["valid integer", "fixed_bit_val: int"]),
    "learnable flag not a bool": (setting("quantizer.kwargs.learnable_bit", "maybe"), [],
                                  "quantizer.kwargs.learnable_bit", ["valid boolean"]),
    "unknown quantizer": (setting("quantizer.name", "ternary"), [], "quantizer.name",
                          ["unknown quantizer 'ternary'", "uniform, deadzone"]),
    "unknown quantizer kwarg": (setting("quantizer.kwargs.bits", 4), [], "quantizer.kwargs.bits",
                                ["unknown argument", "DeadZoneLDZCompander takes"]),
    "unknown loss": (setting("loss_terms", [{"name": "l1"}]), [], "loss_terms.0.name",
                     ["unknown loss term 'l1'", "group_lasso"]),
    "unknown loss kwarg": (setting("loss_terms", [{**GROUP_LASSO, "kwargs": {**GROUP_LASSO["kwargs"], "lamda": 2}}]),
                           [], "loss_terms.0.kwargs.lamda", ["unknown argument", "group_lasso takes"]),
    "missing loss kwarg": (setting("loss_terms", [{**GROUP_LASSO, "kwargs": {"lambda_linear": 1e-4}}]), [],
                           "loss_terms.0.kwargs.lambda_conv", ["required argument missing"]),
    "loss kwarg not a number": (setting("loss_terms", [{**GROUP_LASSO, "kwargs": {"lambda_linear": "x",
                                                                                  "lambda_conv": 0}}]), [],
                                "loss_terms.0.kwargs.lambda_linear", ["valid number"]),
    "lambda not a number": (setting("loss_terms", [{**GROUP_LASSO, "lambda": "big"}]), [], "loss_terms.0.lambda",
                            ["valid number"]),
    "unknown model": (setting("model", "resnet19"), [], "model",
                      ["unknown model 'resnet19'", "resnet20", "vit", "torchvision.<name>, timm.<name>"]),
    "unknown dataset": (setting("dataset", "imagenet21k"), [], "dataset",
                        ["unknown data set 'imagenet21k'", "did you mean 'imagenet'?", "cifar10, cifar100, digits"]),
    "unknown optimizer": (setting("optimizer.type", "lamb"), [], "optimizer.type",
                          ["unknown optimizer 'lamb'", "adamw, adam, sgd"]),
    "unknown scheduler": (setting("lr_scheduler", "exponential"), [], "lr_scheduler.type",
                          ["unknown lr scheduler 'exponential'", "cosine, step, multistep, constant"]),
    "scheduler argument of another schedule": (setting("lr_scheduler", {"type": "cosine", "gamma": 0.1}), [],
                                               "lr_scheduler.gamma", ["unknown argument", "eta_min"]),
    "option the optimizer lacks": (setting("optimizer.param_groups.base.momentum", 0.9), [],
                                   "optimizer.param_groups.base.momentum", ["adamw has no option 'momentum'"]),
    "unknown device in file": (setting("device", "tpu"), [], "device", ["unknown device 'tpu'", "cuda:N"]),
    "unknown device flag": (None, ["--device", "gpu"], "device", ["unknown device 'gpu'"]),
    "vit img_size": (both(setting("model", "vit"), setting("img_size", 20)), [], "img_size",
                     ["divisible by 16, got 20"]),
    "resnet img_size": (setting("img_size", 4), [], "img_size", ["needs img_size >= 8, got 4"]),
    "exclude_layers a string": (setting("quantizer.exclude_layers", "bn"), [], "quantizer.exclude_layers",
                                ["valid list"]),
    "exclude_layers numbers": (setting("quantizer.exclude_layers", [1, 2]), [], "quantizer.exclude_layers.0",
                               ["valid string"]),
    "quantizer not a mapping": (setting("quantizer", 5), [], "quantizer", ["valid dictionary"]),
    "--set unknown path": (None, ["--set", "optimizer.param_groups.dz.weight_decy=2.5"],
                           "optimizer.param_groups.dz.weight_decy", ["did you mean 'weight_decay'"]),
    "--set unknown top key": (None, ["--set", "epoch=3"], "epoch", ["did you mean 'epochs'"]),
    "--set without =": (None, ["--set", "epochs"], "--set", ["malformed override 'epochs'", "key.path=value"]),
    "--set malformed value": (None, ["--set", "epochs=[1"], "epochs", ["--set value '[1' is not valid YAML"]),
    "--set wrong type": (None, ["--set", "epochs=many"], "epochs", ["valid integer", "'many'"]),
    "--set below a scalar": (None, ["--set", "epochs.max=3"], "epochs.max", ["epochs is not a mapping"]),
    "--set list index": (None, ["--set", "loss_terms.3.lambda=1"], "loss_terms.3.lambda", ["no list element 3"]),
}
if not torch.cuda.is_available():
    CASES["cuda without a GPU"] = (None, ["--device", "cuda"], "device", ["CUDA is not available"])


def make_config_file(tmp_path, spec):
    path = tmp_path / "config.yaml"
    if spec is None or callable(spec):
        config = quick_config(tmp_path)
        if spec is not None:
            spec(config)
        write_config(tmp_path, config)
    else:
        path.write_text(spec)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case):
    spec, extra, key, fragments = CASES[case]
    path = tmp_path / "absent.yaml" if case == "missing file" else make_config_file(tmp_path, spec)

    code = cli.main(["train", "--config", str(path), *extra])

    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, captured.err
    [line] = lines
    prefix = f"config error: {path}: " + (f"{key}: " if key else "")
    assert line.startswith(prefix), line
    problem, _, fix = line[len(prefix):].partition("; ")
    assert problem and fix, line
    for fragment in fragments:
        assert fragment in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if case == "missing file" else ["config.yaml"])


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


def test_command_line_prints_no_traceback_and_creates_nothing(tmp_path):
    config = quick_config(tmp_path, epochs=0)
    path = write_config(tmp_path, config)
    result = subprocess.run([sys.executable, str(ROOT / "run_training.py"), "--config", str(path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"config error: {path}: epochs: input should be greater than or equal to 1 (got 0); "
        f"epochs is int: training epochs (also the cosine T_max)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_verbose_adds_the_traceback(tmp_path, capsys):
    path = write_config(tmp_path, quick_config(tmp_path, model="resnet19"))
    assert cli.main(["train", "--config", str(path), "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith(f"config error: {path}: model: unknown model 'resnet19'")


def test_set_overrides_reach_the_resolved_config(tmp_path, capsys):
    """The resolved config (what config.yaml, the checkpoint and W&B record) carries the overrides."""
    path = write_config(tmp_path, quick_config(tmp_path, model="mlp"))
    overrides = ["optimizer.param_groups.dz.weight_decay=2.5", "quantizer.kwargs.fixed_bit_val=3", "seed=7"]
    resolved = config_to_dict(load_config(path, overrides))
    assert resolved["optimizer"]["param_groups"]["dz"]["weight_decay"] == 2.5
    assert resolved["quantizer"]["kwargs"]["fixed_bit_val"] == 3 and resolved["seed"] == 7
    assert cli.main(["train", "--config", str(path), "--dry-run", *(f"--set={item}" for item in overrides)]) == 0
    assert "run name:   mlp_deadzone3b_e1_lr0.003" in capsys.readouterr().out
