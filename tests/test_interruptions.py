"""What clusters and people do to a running run: SIGTERM to every process of the job with loader workers, Ctrl-C
once and twice, two runs racing for one run directory, a stale lock, and the permissions of what a run writes."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from codeq.app import cli
from codeq.app.trainer import lock_run_directory
from codeq.errors import ConfigError
from conftest import ROOT, quick_config, write_config

RUN = "resnet20_deadzone4b_e1_lr0.003"


def long_config(tmp_path, **overrides):
    """One epoch of 90 steps (digits, batch 16) with a progress line every step: time to be interrupted."""
    return write_config(tmp_path, quick_config(tmp_path, batch_size=16, log_interval=1, **overrides))


def start(config, *extra):
    """run_training.py in a process group of its own, as a Slurm job step or a terminal's foreground job is."""
    return subprocess.Popen([sys.executable, "run_training.py", "--config", str(config), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(process, step: int) -> list[str]:
    """The stderr lines up to the progress line of ``step`` of epoch 1."""
    lines, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
        if f"epoch 1 train step {step}/" in line:
            return lines
    raise AssertionError("".join(lines))


def finish(process) -> tuple[int, str]:
    _, rest = process.communicate(timeout=180)
    return process.returncode, rest


def test_sigterm_to_every_process_of_a_run_with_loader_workers_checkpoints_and_exits_3(tmp_path):
    process = start(long_config(tmp_path, workers=2))
    wait_for_step(process, 5)
    os.killpg(process.pid, signal.SIGTERM)  # what scancel and the time limit do: the workers get it too
    code, stderr = finish(process)
    assert code == 3, stderr
    assert "DataLoader worker" not in stderr and "Traceback" not in stderr
    assert "SIGTERM: checkpoint written at epoch 1 step" in stderr
    checkpoint = torch.load(tmp_path / "runs" / RUN / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and 5 <= checkpoint["epoch_step"] < 90


def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130_then_resumes(tmp_path):
    config = long_config(tmp_path, workers=2)
    process = start(config)
    wait_for_step(process, 5)
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground process group
    code, stderr = finish(process)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    checkpoint = torch.load(tmp_path / "runs" / RUN / "last.pt", weights_only=True)
    assert line == (f"interrupted: checkpoint written at epoch 1 step {checkpoint['epoch_step']}; "
                    f"resume with --resume auto")
    assert checkpoint["epoch_step"] >= 5
    assert cli.main(["train", "--config", str(config), "--resume", "auto"]) == 0
    assert json.loads((tmp_path / "runs" / RUN / "metrics.jsonl").read_text())["epoch"] == 1


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    # Steps of ~0.3 s (32 px, batch 128): the second Ctrl-C, sent once the first is acknowledged, lands mid-step.
    process = start(write_config(tmp_path, quick_config(tmp_path, img_size=32, batch_size=128, log_interval=1)))
    wait_for_step(process, 2)
    os.killpg(process.pid, signal.SIGINT)
    lines = []
    while not (line := process.stderr.readline()).startswith("interrupt: finishing the step"):
        assert line, "".join(lines)
        lines.append(line)
    os.killpg(process.pid, signal.SIGINT)
    code, stderr = finish(process)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("aborted by a second Ctrl-C"), stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "runs" / RUN / "last.pt").exists()


def test_stop_request_takes_one_ctrl_c_and_aborts_on_the_second():
    from codeq.app.train import StopRequest

    stop = StopRequest(torch.device("cpu"))
    stop.handle(signal.SIGINT, None)
    assert stop.signal_name == "SIGINT" and stop(1)
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT, None)
    after_term = StopRequest(torch.device("cpu"))
    after_term.handle(signal.SIGTERM, None)
    after_term.handle(signal.SIGINT, None)  # a Ctrl-C after a TERM is still the first Ctrl-C
    assert after_term.signal_name == "SIGINT"


def test_two_runs_racing_for_one_run_directory_one_wins_the_other_exits_2(tmp_path):
    config = write_config(tmp_path, quick_config(tmp_path, epochs=2))
    first, second = start(config), start(config)
    (code_a, err_a), (code_b, err_b) = finish(first), finish(second)
    assert sorted([code_a, code_b]) == [0, 2], err_a + err_b
    loser = err_a if code_a == 2 else err_b
    [line] = loser.strip().splitlines()[-1:]
    assert "is in use by a running run (pid" in line or "already holds a checkpoint" in line, loser
    records = [json.loads(line) for line in (tmp_path / "runs" / RUN.replace("e1", "e2") / "metrics.jsonl")
               .read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2]


def test_the_run_directory_lock_is_exclusive_and_released_by_the_kernel(tmp_path):
    held = lock_run_directory(tmp_path)
    with pytest.raises(ConfigError, match=f"in use by a running run \\(pid {os.getpid()}\\)"):
        lock_run_directory(tmp_path)
    os.close(held)
    os.close(lock_run_directory(tmp_path))
    # A lock file left by a process that died (killed -9, say) holds no lock: the next run proceeds.
    dead = subprocess.run([sys.executable, "-c", "import os, sys, fcntl; d = os.open(sys.argv[1], os.O_RDWR); "
                           "fcntl.flock(d, fcntl.LOCK_EX); os._exit(0)", str(tmp_path / ".lock")])
    assert dead.returncode == 0
    os.close(lock_run_directory(tmp_path))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_and_exports_follow_the_umask(tmp_path, umask, mode):
    config = write_config(tmp_path, quick_config(tmp_path, model="mlp"))
    previous = os.umask(umask)
    try:
        assert cli.main(["train", "--config", str(config)]) == 0

        run_dir = tmp_path / "runs" / "mlp_deadzone4b_e1_lr0.003"
        assert cli.main(["export", str(run_dir / "last.pt"), str(tmp_path / "model.codeq")]) == 0
    finally:
        os.umask(previous)
    for path in (run_dir / "last.pt", run_dir / "best.pt", run_dir / "config.yaml", tmp_path / "model.codeq"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_process_with_live_loader_workers_exits():
    """Workers ignore SIGTERM, which multiprocessing's exit handler sends before it waits for them: without
    ``kill_loader_workers`` a process whose persistent workers were still alive hung at exit for ever."""
    script = ("import torch\nfrom codeq.data import load_dataset\nfrom codeq.data.loaders import build_loaders\n"
              "train, _ = build_loaders(load_dataset('digits', 'data', 8), 64, 2, torch.Generator().manual_seed(0))\n"
              "next(iter(train))\nprint('done', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr
