"""A ``tripwire`` loss term, to interrupt a run at an exact step whatever the machine's speed.

    python tests/tripwire.py --config X [run_training.py args]     # registers the term, then is run_training.py
    plugins: [tests/tripwire.py]                                   # the same term in any config, for any launcher

The term adds exactly zero to the loss (and to every gradient). On its CODEQ_TRIP_AT-th call (counted from 1 in this
process) it acts on CODEQ_TRIP:

- ``USR1`` / ``TERM``: sends this process that signal (the step then completes, as with Slurm's signal);
- ``hold``: prints ``tripwire: holding step N`` on stderr and holds the step until the run has seen a stop signal
  (the test sends it), then lets the step finish: the checkpoint is written after exactly that step;
- ``hang``: prints the same line, writes the file CODEQ_TRIP_MARKER when set, and sleeps, so that a test can SIGKILL
  the run, or press Ctrl-C twice, at a known point in the middle of a step;
- ``fill``: fills the file system that holds the file CODEQ_TRIP_MARKER with that file, leaving CODEQ_TRIP_LEAVE
  bytes (default 0) free: the disk runs full in the middle of the run.
"""
import os
import signal
import sys
import time
from pathlib import Path

from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
HOLD_LIMIT_S = 600  # a held step that never sees its signal fails the test instead of hanging it

calls = 0


def stop_seen() -> bool:
    """Whether the run's stop handler (``codeq.app.train.StopRequest``, installed for SIGTERM) has taken a signal."""
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(getattr(handler, "__self__", None), "signal_name", None) is not None


def fill(ballast: Path, leave: int) -> None:
    """Write ``ballast`` until its file system has ``leave`` bytes free (or none)."""
    status = os.statvfs(ballast.parent)
    size = max(status.f_bavail * status.f_frsize - leave, 0)
    try:
        with ballast.open("wb") as file:
            for start in range(0, size, 1 << 16):
                file.write(b"\0" * min(1 << 16, size - start))
    except OSError:  # full a little early (file system overhead): that is what was asked for
        pass


def tripwire(model: nn.Module) -> Tensor:
    global calls
    calls += 1
    if calls == int(os.environ.get("CODEQ_TRIP_AT", 0)):
        action = os.environ["CODEQ_TRIP"]
        if action in ("hold", "hang"):
            print(f"tripwire: holding step {calls}", file=sys.stderr, flush=True)
        if action == "hold":
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not stop_seen():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tripwire: no stop signal within {HOLD_LIMIT_S} s")
                time.sleep(0.01)
        elif action == "fill":
            fill(Path(os.environ["CODEQ_TRIP_MARKER"]), int(os.environ.get("CODEQ_TRIP_LEAVE", 0)))
        elif action == "hang":
            if os.environ.get("CODEQ_TRIP_MARKER"):
                Path(os.environ["CODEQ_TRIP_MARKER"]).write_text(str(calls))
            time.sleep(HOLD_LIMIT_S)
        else:
            os.kill(os.getpid(), getattr(signal, f"SIG{action}"))
    # Zero, but through a parameter: a constant term would be warned about as regularising nothing.
    return 0.0 * next(model.parameters()).flatten()[0]


def register() -> None:
    from codeq.regularizers import LOSS_REGISTRY

    LOSS_REGISTRY.setdefault("tripwire", tripwire)


register()

if __name__ == "__main__":
    from codeq.app import cli

    sys.exit(cli.main(["train", *sys.argv[1:]]))
