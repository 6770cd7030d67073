"""Sweep files expand into one validated run_training.py argument list per array task."""
import pytest
import yaml

from codeq.app import cli
from codeq.app.config import ConfigError, load_config
from codeq.app.sweep import expand
from conftest import quick_config, write_config


def write_sweep(tmp_path, **content):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def test_grid_times_configs_gives_one_task_per_combination_with_distinct_run_names(tmp_path):
    first = write_config(tmp_path, quick_config(tmp_path), "a.yaml")
    second = write_config(tmp_path, quick_config(tmp_path, model="mlp"), "b.yaml")
    sweep = write_sweep(tmp_path, configs=[str(first), str(second)], name="wd",
                        grid={"optimizer.param_groups.dz.weight_decay": [1.0, 3.0],
                              "optimizer.param_groups.base.betas": [[0.9, 0.99]]},
                        set=["epochs=2"])
    tasks = expand(sweep)
    assert len(tasks) == 4
    assert [task.config for task in tasks] == [str(first)] * 2 + [str(second)] * 2
    configs = [load_config(task.config, task.overrides) for task in tasks]
    assert [c.optimizer.param_groups.dz.weight_decay for c in configs] == [1.0, 3.0, 1.0, 3.0]
    assert all(c.optimizer.param_groups.base.betas == (0.9, 0.99) and c.epochs == 2 for c in configs)
    names = [c.run_name for c in configs]
    assert len(set(names)) == 4
    assert names[1] == "wd_01_resnet20_deadzone4b_e2_lr0.003_weight_decay=3.0_betas=0.9-0.99"
    assert names[2].startswith("wd_02_mlp_")


def test_task_arguments_round_trip_through_the_cli(tmp_path, capsys):
    config = write_config(tmp_path, quick_config(tmp_path))
    sweep = write_sweep(tmp_path, configs=[str(config)], grid={"quantizer.kwargs.fixed_bit_val": [2, 3, 4]})
    assert cli.main(["sweep", str(sweep)]) == 0
    assert capsys.readouterr().out == "3\n"
    assert cli.main(["sweep", str(sweep), "--task", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["--config", str(config)]
    assert lines[2:] == ["--set", "quantizer.kwargs.fixed_bit_val=4", "--set",
                         "run_name=sweep_02_resnet20_deadzone4b_e1_lr0.003_fixed_bit_val=4"]
    assert cli.main(["sweep", str(sweep), "--task", "3"]) == 2
    assert "task 3 does not exist; it has tasks 0..2" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ({"configs": []}, "configs: no config listed"),
    ({"configs": "missing.yaml"}, "missing.yaml: file not found"),
    ({"configs": [1]}, "configs: must be a list of strings"),
    ({"configs": ["CONFIG"], "gird": {}}, "gird: unknown sweep key; did you mean 'grid'?"),
    ({"configs": ["CONFIG"], "grid": {"epochs": []}}, "grid.epochs: must be a non-empty list"),
    ({"configs": ["CONFIG"], "grid": [1]}, "grid: must be a mapping"),
    ({"configs": ["CONFIG"], "grid": {"epochs": [1, 0]}}, "epochs: input should be greater than or equal to 1"),
    ({"configs": ["CONFIG"], "grid": {"optimizer.nope": [1]}}, "optimizer.nope: unknown key"),
    ({"configs": ["CONFIG"], "name": "a/b"}, "name: 'a/b' cannot be part of a directory name"),
])
def test_bad_sweep_files_fail_before_submission_with_one_line(tmp_path, capsys, content, message):
    config = str(write_config(tmp_path, quick_config(tmp_path)))
    content = yaml.safe_load(yaml.safe_dump(content, sort_keys=False).replace("CONFIG", config))
    sweep = write_sweep(tmp_path, **content)
    with pytest.raises(ConfigError) as error:
        expand(sweep)
    assert message in error.value.line()
    assert cli.main(["sweep", str(sweep)]) == 2
    output = capsys.readouterr()
    assert output.out == "" and len(output.err.strip().splitlines()) == 1 and message in output.err
