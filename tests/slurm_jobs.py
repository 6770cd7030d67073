"""Batch jobs on a running Slurm cluster (CI: the two-node, 2-CPU-per-node cluster of .ci/slurm_up.sh), shared
by the tests that submit the real scripts in slurm/.

Where no cluster can run the jobs, those tests skip and say why; where CI brought one up
(``CODEQ_SLURM_REQUIRED=1``, set by .ci/run after .ci/slurm_up.sh succeeded) they fail instead, so a
cluster that came up but cannot run them is never taken for a missing one.
"""
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, quick_config, write_config

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT_S = 600
READY_STATES = re.compile(r"^(idle|mixed|allocated|completing)", re.MULTILINE)


def slurm_problem() -> str | None:
    """Why no Slurm job can run here, or None."""
    if shutil.which("sbatch") is None:
        return "sbatch not found (install and start Slurm with `sudo bash .ci/slurm_up.sh`)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"Slurm does not answer ({error})"
    if "UP" not in ping.stdout:
        return f"slurmctld is not up ({(ping.stdout + ping.stderr).strip()}); run `sudo bash .ci/slurm_up.sh`"
    if not READY_STATES.search(nodes.stdout):
        return f"no Slurm node can run jobs (states: {nodes.stdout.split() or 'none'})"
    return None


# Each task prints its hostname and whether the allocation's first node, the rendezvous host, resolves there.
NODE_PROBE = ('first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); '
              'if getent hosts "$first" >/dev/null; then echo "$(hostname) resolves $first"; '
              'else echo "$(hostname) cannot-resolve $first"; fi')


def two_node_problem() -> str | None:
    """Why no two-node job can meet at a rendezvous on its first node here, or None (probes with a 2-node srun)."""
    if (problem := slurm_problem()) is not None:
        return problem
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30).stdout
    ready = sorted({line.split()[0] for line in states.splitlines() if READY_STATES.search(line.split()[1])})
    if len(ready) < 2:
        return (f"the cluster has {len(ready)} node(s) that can run jobs ({', '.join(ready) or 'none'}), these tests "
                f"need 2 (`sudo bash .ci/slurm_up.sh` starts n1 and n2)")
    try:
        probe = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--immediate=60", "--time=1",
                                "sh", "-c", NODE_PROBE], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "a two-node srun did not finish within 120 s"
    lines = probe.stdout.splitlines()
    if probe.returncode != 0 or len(lines) != 2:
        return f"a two-node srun failed (exit code {probe.returncode}): {(probe.stdout + probe.stderr).strip()}"
    hosts = {line.split()[0] for line in lines}
    if len(hosts) < 2:
        return (f"both nodes run under the hostname {hosts.pop()}: each slurmd needs a UTS namespace with its node's "
                f"name, as .ci/slurm_up.sh starts them, or torchrun cannot tell which node hosts the rendezvous")
    if unresolved := [line for line in lines if "cannot-resolve" in line]:
        return f"the rendezvous host does not resolve on every node ({'; '.join(unresolved)})"
    return None


def cluster_fixture(problem: str | None) -> object:
    """A module's autouse fixture: skip (or fail, see ``require``) its tests when ``problem`` is not None, and cancel
    every job they submitted when they are done. Use as ``cluster = cluster_fixture(slurm_problem())``."""

    @pytest.fixture(scope="module", autouse=True)
    def cluster() -> Iterator[None]:
        require(problem)
        yield
        Job.cancel_all()

    return cluster


def require(problem: str | None) -> None:
    """Skips the calling test, or its module when called from a module-scoped fixture, when ``problem`` is not
    None; fails it instead where CI brought the cluster up."""
    if problem is None:
        return
    if os.environ.get("CODEQ_SLURM_REQUIRED") == "1":
        pytest.fail(f"CODEQ_SLURM_REQUIRED=1, but {problem}", pytrace=False)
    pytest.skip(f"needs Slurm: {problem}")


class Job:
    """A batch job: its id, its output file and its state in ``scontrol show job``."""

    submitted: list["Job"] = []

    def __init__(self, job_id: str, output: Path) -> None:
        self.id, self.output = job_id, output
        Job.submitted.append(self)

    @classmethod
    def submit(cls, work: Path, script: str, *args: str, sbatch: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> "Job":
        output = work / f"{Path(script).stem}-%j.out"
        command = ["sbatch", "--parsable", f"--output={output}", *sbatch, str(ROOT / script), *args]
        result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=60,
                                env={**os.environ, **(env or {})})
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip().split(";")[0]
        return cls(job_id, Path(str(output).replace("%j", job_id)))

    def fields(self) -> dict[str, str]:
        text = subprocess.run(["scontrol", "show", "job", self.id], capture_output=True, text=True).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def log(self) -> str:
        return self.output.read_text() if self.output.exists() else ""

    def wait_for_log(self, pattern: str) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not re.search(pattern, self.log()):
            assert self.fields().get("JobState") not in TERMINAL_STATES, f"job ended before {pattern!r}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {pattern!r} in job {self.id}'s output:\n{self.log()}"
            time.sleep(0.2)

    def wait(self) -> dict[str, str]:
        """The job's final fields (a requeued job waits out its credential's expiry, ~6 s here, before it
        restarts; starting it sooner makes Slurm kill it)."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (fields := self.fields()).get("JobState") not in TERMINAL_STATES:
            assert time.monotonic() < deadline, f"job {self.id} still {fields.get('JobState')}:\n{self.log()}"
            time.sleep(0.5)
        return fields

    @classmethod
    def cancel_all(cls) -> None:
        for job in cls.submitted:
            subprocess.run(["scancel", job.id], capture_output=True)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def completed(job: Job) -> str:
    fields = job.wait()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), job.log()
    return job.log()


# 2 epochs of 45 steps (resnet20, img 16): long enough to be interrupted mid-epoch.
def preemptible_config(work: Path, name: str, **overrides: object) -> Path:
    config = quick_config(work, epochs=2, batch_size=32, log_interval=1, save_dir=str(work / name), **overrides)
    return write_config(work, config, f"{name}.yaml")
