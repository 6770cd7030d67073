"""What clusters and people do to a running run: SIGTERM to every process of the job with loader workers, Ctrl-C
once and twice, two runs racing for one run directory, a stale lock, and the permissions of what a run writes."""
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from codeq.app import cli
from codeq.app.trainer import lock_run_directory
from codeq.errors import ConfigError
from conftest import ROOT, quick_config, write_config

RUN = "resnet20_deadzone4b_e1_lr0.003"
TRIPWIRE = ROOT / "tests" / "tripwire.py"
HELD_STEP = 5


def long_config(tmp_path, **overrides):
    """One epoch of 90 steps (digits, batch 16) with the tripwire term (tests/tripwire.py), which holds a step."""
    return write_config(tmp_path, quick_config(tmp_path, batch_size=16, plugins=[str(TRIPWIRE)],
                                               loss_terms=[{"name": "tripwire"}], **overrides))


def start(config, trip: str | None = None, at: int = HELD_STEP):
    """run_training.py in a process group of its own, as a Slurm job step or a terminal's foreground job is; the
    tripwire ``trip`` (hold, hang) acts at step ``at``."""
    env = {**os.environ, "CODEQ_TRIP": trip or "", "CODEQ_TRIP_AT": str(at if trip else 0)}
    return subprocess.Popen([sys.executable, "run_training.py", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def read_until(process, text: str) -> list[str]:
    """The stderr lines up to the first that starts with ``text`` (the process writes it; no clock decides)."""
    lines = []
    while not (line := process.stderr.readline()).startswith(text):
        assert line, "".join(lines)
        lines.append(line)
    return lines


def finish(process) -> tuple[int, str]:
    _, rest = process.communicate(timeout=300)
    return process.returncode, rest


def test_sigterm_to_every_process_of_a_run_with_loader_workers_checkpoints_and_exits_3(tmp_path):
    process = start(long_config(tmp_path, workers=2), "hold")
    read_until(process, f"tripwire: holding step {HELD_STEP}")
    os.killpg(process.pid, signal.SIGTERM)  # what scancel and the time limit do: the workers get it too
    code, stderr = finish(process)
    assert code == 3, stderr
    assert "DataLoader worker" not in stderr and "Traceback" not in stderr
    assert f"SIGTERM: checkpoint written at epoch 1 step {HELD_STEP}" in stderr
    checkpoint = torch.load(tmp_path / "runs" / RUN / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["epoch_step"]) == (0, HELD_STEP)


@pytest.mark.usefixtures("registries_as_shipped")  # the resume below imports the tripwire plugin in this process
def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130_then_resumes(tmp_path):
    config = long_config(tmp_path, workers=2)
    process = start(config, "hold")
    read_until(process, f"tripwire: holding step {HELD_STEP}")
    os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground process group
    code, stderr = finish(process)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert line == f"interrupted: checkpoint written at epoch 1 step {HELD_STEP}; resume with --resume auto"
    checkpoint = torch.load(tmp_path / "runs" / RUN / "last.pt", weights_only=True)
    assert checkpoint["epoch_step"] == HELD_STEP
    assert cli.main(["train", "--config", str(config), "--resume", "auto"]) == 0
    assert json.loads((tmp_path / "runs" / RUN / "metrics.jsonl").read_text())["epoch"] == 1


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    # The tripwire hangs in step 2: both Ctrl-Cs land in the middle of it, however slow the machine.
    process = start(long_config(tmp_path), "hang", at=2)
    read_until(process, "tripwire: holding step 2")
    os.killpg(process.pid, signal.SIGINT)
    read_until(process, "interrupt: finishing the step")
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


def test_a_second_ctrl_c_while_the_first_one_prints_its_line_aborts(monkeypatch):
    """Python can run the second Ctrl-C's handler inside the first one's: once the first one's line is out (the
    moment a user, or a test, presses again), the first Ctrl-C must already be recorded."""
    from codeq.app.train import StopRequest

    stop = StopRequest(torch.device("cpu"))

    class SecondCtrlC:
        def write(self, text: str) -> None:
            stop.handle(signal.SIGINT, None)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", SecondCtrlC())
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT, None)


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
