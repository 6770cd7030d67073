"""Where a run's results go: ``metrics.jsonl`` in the run directory and, when enabled, W&B."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from codeq.errors import first_line
from codeq.training.distributed import is_main_process

log = logging.getLogger(__name__)


def wandb_mode(project: str | None) -> str:
    """'disabled', or the mode W&B should run in: offline when no login is available."""
    if project is None or os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if not logged_in:
        log.warning("W&B: no login found, logging offline to the run directory (`wandb sync` uploads it later)")
        return "offline"
    return "online"


class RunTracker:
    """Appends one JSON object per epoch to ``metrics.jsonl`` and mirrors it to W&B.

    W&B never stops a run: any failure to start it is reported once and the run goes on. Off the
    main process of a distributed run it does nothing: one process speaks for the run.
    """

    def __init__(self, run_dir: Path, run_name: str, project: str | None, config: dict[str, Any],
                 resume_id: str | None = None) -> None:
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.active = is_main_process()
        mode = wandb_mode(project) if self.active else "disabled"
        if mode == "disabled":
            return
        try:
            import wandb

            # W&B's own messages (a few dozen `wandb:` lines) go to its debug log in the run directory, not the
            # terminal: the one line above (offline) or nothing (online) is what the user reads.
            settings = wandb.Settings(silent=True, quiet=True, show_info=False, show_warnings=False, console="off")
            self.wandb_run = wandb.init(
                project=project, name=run_name, config=config, dir=str(run_dir), mode=mode, settings=settings,
                id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous",
            )
        except Exception as error:  # noqa: BLE001 - W&B problems must never end a training run
            log.warning("W&B could not start (%s); continuing without it",
                        first_line(error))

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, record: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Write ``record`` to metrics.jsonl and ``record | extra`` to W&B (extra: per-layer detail, images)."""
        if not self.active:
            return
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({**record, **(extra or {})}, step=record.get("epoch"))

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.wandb_run is not None:
            if summary:
                self.wandb_run.summary.update(summary)
            self.wandb_run.finish()


def read_metrics(metrics_path: Path) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl`` in epoch order, one per epoch (a resumed run may log an epoch again:
    the later record wins); empty when the file does not exist."""
    if not metrics_path.is_file():
        return []
    by_epoch = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[record["epoch"]] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def rewind_metrics(metrics_path: Path, epoch: int) -> None:
    """Keep only the records of epochs 1..``epoch``: a resumed run writes the later ones again."""
    if not metrics_path.is_file():
        return
    kept = [line for line in metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", epoch + 1) <= epoch]
    metrics_path.write_text("".join(line + "\n" for line in kept))
