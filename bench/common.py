"""What both benchmarks share: their clocks, the machine's load and the JSON results file."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# wall: elapsed time; cpu: CPU time of this process (all its threads), which a busy shared machine inflates less.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(run: Callable[[], object], clock: str, synchronize: Callable[[], None] | None = None) -> float:
    """Seconds ``run`` takes by ``clock`` (a key of CLOCKS); ``synchronize`` (waiting for a GPU's queued work)
    runs before the clock starts and before it stops."""
    now = CLOCKS[clock]
    if synchronize is not None:
        synchronize()
    start = now()
    run()
    if synchronize is not None:
        synchronize()
    return now() - start


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path
