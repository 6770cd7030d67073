"""run_training.py with a ``tripwire`` loss term, to interrupt a run at an exact step.

    python tests/tripwire.py --config X [run_training.py args]

The term adds exactly zero to the loss (and to every gradient). On its CODEQ_TRIP_AT-th call (counted from 1 in this
process) it acts on CODEQ_TRIP: ``USR1`` / ``TERM`` sends this process that signal (the step then
completes, as with Slurm's signal); ``hang`` writes the file CODEQ_TRIP_MARKER and sleeps, so a
test can SIGKILL the run at a known point in the middle of an epoch.
"""
import os
import signal
import sys
import time
from pathlib import Path

from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]

calls = 0


def tripwire(model: nn.Module) -> Tensor:
    global calls
    calls += 1
    if calls == int(os.environ.get("CODEQ_TRIP_AT", 0)):
        action = os.environ["CODEQ_TRIP"]
        if action == "hang":
            Path(os.environ["CODEQ_TRIP_MARKER"]).write_text(str(calls))
            time.sleep(600)
        else:
            os.kill(os.getpid(), getattr(signal, f"SIG{action}"))
    # Zero, but through a parameter: a constant term would be warned about as regularising nothing.
    return 0.0 * next(model.parameters()).flatten()[0]


def register() -> None:
    from codeq.regularizers import LOSS_REGISTRY

    LOSS_REGISTRY["tripwire"] = tripwire


if __name__ == "__main__":
    from codeq.app import cli

    register()
    sys.exit(cli.main(["train", *sys.argv[1:]]))
