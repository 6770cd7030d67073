"""slurm/single_slurm.sh outside Slurm: valid bash, runs from any directory, passes arguments through,
forwards USR1 to training (checkpoint, exit 3) and resumes on the next start."""
import os
import signal
import subprocess

from conftest import ROOT, quick_config, write_config

SCRIPT = ROOT / "slurm" / "single_slurm.sh"
TRIPWIRE = ROOT / "tests" / "tripwire.py"


def script_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "CODEQ_DEVICE": "cpu", **extra}


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_script_passes_arguments_through_from_another_directory(tmp_path):
    write_config(tmp_path, quick_config(tmp_path, model="mlp"), name="exp.yaml")
    result = subprocess.run(["bash", str(SCRIPT), "exp.yaml", "--set", "epochs=2", "--dry-run"], cwd=tmp_path,
                            env=script_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "device:     cpu" in result.stdout and "run name:   mlp_deadzone4b_e2_lr0.003" in result.stdout


def test_usage_without_a_config():
    result = subprocess.run(["bash", str(SCRIPT)], env=script_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_usr1_to_the_script_checkpoints_and_the_next_start_resumes(tmp_path):
    # The tripwire term holds step 3 of epoch 2 until training has the signal: however fast the machine, the
    # checkpoint is written after exactly that step.
    steps = -(-1437 // 128)  # digits: 1,437 training images in batches of 128
    config = quick_config(tmp_path, model="mlp", epochs=3, plugins=[str(TRIPWIRE)], loss_terms=[{"name": "tripwire"}])
    write_config(tmp_path, config, name="exp.yaml")
    run_dir = tmp_path / "runs" / "mlp_deadzone4b_e3_lr0.003"
    script = subprocess.Popen(["bash", str(SCRIPT), "exp.yaml"], cwd=tmp_path,
                              env=script_env(CODEQ_TRIP="hold", CODEQ_TRIP_AT=str(steps + 3)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while not (line := script.stdout.readline()).startswith(f"tripwire: holding step {steps + 3}"):
        assert line, "".join(lines)
        lines.append(line)
    script.send_signal(signal.SIGUSR1)
    output, _ = script.communicate(timeout=300)
    assert script.returncode == 3, output
    assert "USR1: checkpoint, then requeue" in output and "SIGUSR1: checkpoint written at epoch 2 step 3" in output
    assert "requeueing" not in output  # outside Slurm there is nothing to requeue

    result = subprocess.run(["bash", str(SCRIPT), "exp.yaml"], cwd=tmp_path, env=script_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr and "at epoch 2, step 3" in result.stderr
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
