"""A disk that runs full, a quota, a save_dir made read-only: the run ends with one line naming the file, the cause and
the checkpoint that survived (exit 1), leaves no temporary file, and --resume auto continues once there is room.

The full disk is real: an 8 MiB tmpfs mounted for the test (root only; elsewhere those tests skip and say why), filled
by the tripwire term in the middle of a run. Read-only folders and quotas are OSErrors injected where files are
renamed into place, for each file a run writes."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from codeq import io
from codeq.app import cli
from conftest import ROOT, quick_config, write_config

TRIPWIRE = ROOT / "tests" / "tripwire.py"
RUN = "mlp_deadzone4b_e3_lr0.003"
STEPS = -(-1437 // 128)  # digits: 1,437 training images in batches of 128


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs: room for a run's two checkpoints (1.4 MB each) and the temporary file of a third."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full disk (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def config_in(tmp_path, save_dir, tripwire: bool = False, **overrides):
    """An MLP on digits for 3 epochs; with ``tripwire`` the term that fills the disk (in a process of its own: the
    plugin registers it for the life of the process)."""
    trip = {"plugins": [str(TRIPWIRE)], "loss_terms": [{"name": "tripwire"}]} if tripwire else {}
    config = quick_config(tmp_path, **{"model": "mlp", "img_size": 8, "epochs": 3, "save_dir": str(save_dir),
                                       **trip, **overrides})
    config["quantizer"]["exclude_layers"] = []
    return write_config(tmp_path, config, name=f"{save_dir.name}.yaml")


def launch(config, *args, trip: str = "", at: int = 0, marker=None, leave: int = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CODEQ_TRIP": trip, "CODEQ_TRIP_AT": str(at),
           "CODEQ_TRIP_MARKER": str(marker or ""), "CODEQ_TRIP_LEAVE": str(leave)}
    result = subprocess.run([sys.executable, "run_training.py", "--config", str(config), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run on a disk with room."""
    tmp_path = tmp_path_factory.mktemp("reference")
    code, lines = launch(config_in(tmp_path, tmp_path / "runs", tripwire=True))
    assert code == 0, lines
    return tmp_path / "runs" / RUN


def temporary_files(folder):
    return sorted(path.name for path in folder.rglob("*.tmp"))


@pytest.mark.parametrize("leave,failed", [(64 << 10, "best.pt"), (0, "metrics.jsonl")])
def test_a_disk_that_runs_full_mid_run_ends_in_one_line_and_resumes(tmp_path, small_disk, reference, leave, failed):
    config = config_in(tmp_path, small_disk / "runs", tripwire=True)
    ballast = small_disk / "ballast"
    # The disk fills at the first step of epoch 2; with 64 KiB left the metrics fit and a checkpoint does not.
    code, lines = launch(config, trip="fill", at=STEPS + 1, marker=ballast, leave=leave)
    run_dir = small_disk / "runs" / RUN
    assert code == 1, lines
    assert lines[-1] == (f"error: cannot write {run_dir / failed}: No space left on device; {run_dir / 'last.pt'} "
                         f"from epoch 1 is intact; free space (or make {run_dir} writable), then rerun with "
                         f"--resume auto")
    assert not any("Traceback" in line for line in lines)
    assert temporary_files(small_disk) == []
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == ([1, 2] if failed != "metrics.jsonl" else [1])

    ballast.unlink()
    code, lines = launch(config, "--resume", "auto")
    assert code == 0, lines
    assert (run_dir / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    mine, theirs = [torch.load(path / "last.pt", weights_only=True)["model"] for path in (run_dir, reference)]
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def fail_on(monkeypatch, name: str, call: int, number: int) -> None:
    """The ``call``-th time a file called ``name`` is renamed into place, the rename fails with errno ``number``."""
    calls = {"count": 0}
    real = io.os.replace

    def replace(source, destination):
        if os.path.basename(destination) == name:
            calls["count"] += 1
            if calls["count"] == call:
                raise OSError(number, os.strerror(number), str(destination))
        return real(source, destination)

    monkeypatch.setattr(io.os, "replace", replace)


@pytest.mark.parametrize("name,call,number,kept", [
    ("config.yaml", 1, errno.EROFS, "no checkpoint had been written yet"),
    ("metrics.jsonl", 2, errno.EDQUOT, "last.pt from epoch 1 is intact"),
    ("last.pt", 2, errno.EROFS, "last.pt from epoch 1 is intact"),
    ("report.json", 1, errno.ENOSPC, "last.pt from epoch 3 is intact"),
    ("layers.png", 1, errno.EDQUOT, "last.pt from epoch 3 is intact"),
])
def test_each_file_a_run_writes_fails_in_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys, name, call,
                                                                      number, kept):
    config = config_in(tmp_path, tmp_path / "runs")
    run_dir = tmp_path / "runs" / RUN
    with monkeypatch.context() as patch:
        fail_on(patch, name, call, number)
        assert cli.main(["train", "--config", str(config)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    kept = kept if kept.startswith("no ") else f"{run_dir / kept}"
    assert lines[-1] == (f"error: cannot write {run_dir / name}: {os.strerror(number)}; {kept}; free space (or make "
                         f"{run_dir} writable), then rerun with --resume auto")
    assert temporary_files(tmp_path) == []

    assert cli.main(["train", "--config", str(config), "--resume", "auto"]) == 0
    assert all((run_dir / file).is_file() for file in ("config.yaml", "last.pt", "best.pt", "report.json",
                                                        "report.md", "layers.png"))
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_an_export_or_report_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    config = config_in(tmp_path, tmp_path / "runs", epochs=1)
    assert cli.main(["train", "--config", str(config)]) == 0
    run_dir = tmp_path / "runs" / "mlp_deadzone4b_e1_lr0.003"
    capsys.readouterr()
    fail_on(monkeypatch, "model.codeq", 1, errno.ENOSPC)
    assert cli.main(["export", str(run_dir), str(tmp_path / "model.codeq")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: cannot write {tmp_path / 'model.codeq'}: No space left on "
                                               f"device; nothing was written; free space or write elsewhere")
    fail_on(monkeypatch, "report.md", 1, errno.EROFS)
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write {tmp_path / 'out' / 'report.md'}: Read-only file system; each report file is whole "
        f"or absent; free space or pass another --out")
    assert temporary_files(tmp_path) == []
