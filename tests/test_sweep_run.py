"""`codeq sweep FILE --run`: every task on this machine, one after another; finished tasks skipped, an interrupted one
resumed, a failing one reported in a line while the sweep goes on, Ctrl-C stopping the task as `codeq train` stops."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from codeq.app import cli
from conftest import ROOT, quick_config, write_config

pytestmark = pytest.mark.usefixtures("registries_as_shipped")

# A loss term adding zero (or NaN, to fail a run), which holds the step of its SWEEP_HOLD_AT-th call until the file
# SWEEP_HOLD_GO exists, after writing SWEEP_HOLD_MARKER: a test signals the sweep at a known step, not a moment.
PARTS = '''
import os
import time
from pathlib import Path

import torch

from codeq import LOSS_REGISTRY

calls = 0


@LOSS_REGISTRY.register()
def probe(model, nan: bool = False):
    global calls
    calls += 1
    if str(calls) == os.environ.get("SWEEP_HOLD_AT"):
        Path(os.environ["SWEEP_HOLD_MARKER"]).write_text("held")
        while not Path(os.environ["SWEEP_HOLD_GO"]).exists():
            time.sleep(0.02)
    return torch.tensor(float("nan") if nan else 0.0)
'''


def write_sweep(tmp_path, grid, **config_overrides):
    (tmp_path / "sweep_parts.py").write_text(PARTS)
    config = quick_config(tmp_path, plugins=[str(tmp_path / "sweep_parts.py")], log_interval=1,
                          loss_terms=[{"name": "probe", "lambda": 1.0}], **config_overrides)
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump({"configs": [str(write_config(tmp_path, config))], "grid": grid}))
    return path


def run_dirs(tmp_path):
    return sorted(path for path in (tmp_path / "runs").iterdir() if path.is_dir())


def test_seeds_in_a_grid_train_one_after_another_and_a_second_run_skips_them(tmp_path, capfd):
    sweep = write_sweep(tmp_path, {"seed": [1, 2]})
    assert cli.main(["sweep", str(sweep), "--run"]) == 0
    out = capfd.readouterr().out
    first, second = run_dirs(tmp_path)
    assert first.name == "seeds_00_resnet20_deadzone4b_e1_lr0.003_seed=1" and second.name.endswith("_seed=2")
    assert [yaml.safe_load((path / "config.yaml").read_text())["seed"] for path in (first, second)] == [1, 2]
    assert all((path / "report.json").is_file() for path in (first, second))
    assert f"sweep: task 0/2 ({first})\n" in out and out.strip().endswith("sweep: 2 tasks: 2 trained, "
                                                                             "0 skipped (finished before)")
    written = [(path / "last.pt").stat().st_mtime_ns for path in (first, second)]
    assert cli.main(["sweep", str(sweep), "--run"]) == 0
    out = capfd.readouterr().out
    assert out.splitlines() == [f"sweep: task 0/2 ({first}) has finished: skipped",
                                f"sweep: task 1/2 ({second}) has finished: skipped",
                                "sweep: 2 tasks: 0 trained, 2 skipped (finished before)"]
    assert [(path / "last.pt").stat().st_mtime_ns for path in (first, second)] == written


def test_a_failing_task_is_one_line_the_sweep_goes_on_and_exits_1(tmp_path, capfd):
    sweep = write_sweep(tmp_path, {"loss_terms.0.kwargs.nan": [True, False]})
    assert cli.main(["sweep", str(sweep), "--run"]) == 1
    captured = capfd.readouterr()
    failing, working = (tmp_path / "runs" / name for name in ("seeds_00_resnet20_deadzone4b_e1_lr0.003_nan=True",
                                                              "seeds_01_resnet20_deadzone4b_e1_lr0.003_nan=False"))
    [line] = [line for line in captured.err.splitlines() if line.startswith("sweep")]
    assert line == f"sweep error: task 0/2 ({failing}) failed with exit code 1; going on with the next task"
    assert "non-finite" in captured.err and (working / "report.json").is_file()
    assert captured.out.strip().endswith("sweep: 2 tasks: 1 trained, 0 skipped (finished before), 1 failed (task 0)")
    assert cli.main(["sweep", str(sweep), "--run", "--fail-fast"]) == 1
    captured = capfd.readouterr()
    assert f"sweep error: task 0/2 ({failing}) failed with exit code 1; stopping (--fail-fast)" in captured.err
    assert "task 1/2" not in captured.out


def test_run_options_need_run(tmp_path, capsys):
    sweep = write_sweep(tmp_path, {"seed": [1]})
    assert cli.main(["sweep", str(sweep), "--fail-fast"]) == 2
    assert capsys.readouterr().err == "sweep error: --device and --fail-fast go with --run\n"


def wait_for(path, process, deadline=300):
    end = time.monotonic() + deadline
    while not path.exists():
        assert process.poll() is None and time.monotonic() < end, process.communicate()
        time.sleep(0.05)


def test_ctrl_c_checkpoints_the_task_in_progress_ends_the_sweep_and_a_rerun_resumes_it(tmp_path, capfd, monkeypatch):
    sweep = write_sweep(tmp_path, {"seed": [1, 2]})
    marker, go = tmp_path / "held", tmp_path / "go"
    environment = {**os.environ, "SWEEP_HOLD_AT": "3", "SWEEP_HOLD_MARKER": str(marker), "SWEEP_HOLD_GO": str(go)}
    # In a process group of its own, as a terminal's foreground job is: Ctrl-C reaches the sweep, not its task.
    process = subprocess.Popen([sys.executable, "-m", "codeq", "sweep", str(sweep), "--run"], cwd=ROOT,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for(marker, process)  # task 0 holds its third step
    os.killpg(process.pid, signal.SIGINT)
    go.touch()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    first = tmp_path / "runs" / "seeds_00_resnet20_deadzone4b_e1_lr0.003_seed=1"
    assert "interrupted: checkpoint written at epoch 1 step 3; resume with --resume auto" in err
    assert err.strip().splitlines()[-1] == f"sweep: stopped by SIGINT; run `codeq sweep {sweep} --run` again to resume"
    assert "Traceback" not in err and "task 1/2" not in out
    assert run_dirs(tmp_path) == [first]
    assert torch.load(first / "last.pt", weights_only=True)["epoch_step"] == 3
    monkeypatch.delenv("SWEEP_HOLD_AT", raising=False)
    assert cli.main(["sweep", str(sweep), "--run"]) == 0
    captured = capfd.readouterr()
    assert f"resuming {first / 'last.pt'} at epoch 1, step 3 of it" in captured.err
    assert captured.out.strip().endswith("sweep: 2 tasks: 2 trained, 0 skipped (finished before)")
    assert [json.loads(line)["epoch"] for line in (first / "metrics.jsonl").read_text().splitlines()] == [1]
