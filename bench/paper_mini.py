"""The paper's protocol in miniature (``make paper-mini``): ResNet-20 on scikit-learn's digits at 16 px, FP32, 4-bit and
mixed-precision CoDeQ with the paper's objective (dz_l2 / bit_l2 loss terms), three seeds each, and a λ_dz sweep for
the trade-off figure; then the table and the figures, written into docs/paper-mini.md with the machine and the time.

    python bench/paper_mini.py [--fresh] [--epochs N] [--save-dir DIR] [--doc FILE]

It is the tool's own commands: ``codeq sweep SWEEP --run`` for each of SWEEPS, all at once with the CPUs' threads
shared out (one thread each on 2 cores, which also keeps a busy machine from stalling the runs' thread pools; a
finished run is skipped and an interrupted one resumes, so a second call only does what is missing), and
``codeq report --compare`` for the table (``--csv``) and the figures (``--plot``, ``--plot-epochs``; the layer-wise
figure is an MP run's ``layers.png``). The figures go to a folder named like the document, beside it
(docs/paper-mini/). ``--epochs`` overrides every run's epochs, to check the pipeline quickly; ``--fresh`` first
deletes the runs an earlier call of this script made there.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from codeq.app.sweep import SweepTask, expand, finished
from codeq.io import atomic_write
from common import cpu_name, load_average

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ("sweeps/paper_mini.yaml", "sweeps/paper_mini_lambda.yaml")
MARKER = ".paper_mini"  # in a save_dir this script made: --fresh deletes only such a folder


def derived_sweep(path: str, save_dir: Path, epochs: int | None) -> Path:
    """A copy of sweep ``path`` in ``save_dir`` whose tasks write there (and run ``epochs`` epochs, when given)."""
    sweep = yaml.safe_load((ROOT / path).read_text())
    sweep["configs"] = [str(ROOT / config) for config in sweep["configs"]]
    sweep["set"] = [*sweep.get("set", []), f"save_dir={save_dir}", *([f"epochs={epochs}"] if epochs else [])]
    copy = save_dir / "sweeps" / Path(path).name
    atomic_write(copy, yaml.safe_dump(sweep, sort_keys=False))
    return copy


def codeq(*arguments: str, capture: bool = False) -> str:
    """``codeq ARGUMENTS`` in a process of its own; exits with its code when it fails."""
    done = subprocess.run([sys.executable, "-m", "codeq", *arguments], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if done.returncode != 0:
        sys.exit(f"paper-mini: `codeq {' '.join(arguments)}` failed with exit code {done.returncode}")
    return done.stdout or ""


def run_sweeps(sweeps: list[Path], threads: int) -> dict[str, float]:
    """``codeq sweep SWEEP --run`` for every sweep at once, each run with ``threads`` threads; the seconds each took.
    Exits when one fails. A Ctrl-C reaches the sweeps too (one process group): each checkpoints its run in progress,
    and this waits for them."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.monotonic()
    processes = {sweep: subprocess.Popen([sys.executable, "-m", "codeq", "sweep", str(sweep), "--run"], cwd=ROOT,
                                         env=environment) for sweep in sweeps}
    seconds: dict[str, float] = {}
    try:
        while len(seconds) < len(processes):  # the clock only measures: each sweep's end decides nothing
            for sweep, process in processes.items():
                if sweep.stem not in seconds and process.poll() is not None:
                    seconds[sweep.stem] = time.monotonic() - began
            time.sleep(0.5)
    except KeyboardInterrupt:
        for process in processes.values():
            process.wait()
        sys.exit("paper-mini: interrupted; the runs in progress wrote checkpoints, `make paper-mini` goes on")
    failed = [f"{sweep.name} (exit code {process.returncode})" for sweep, process in processes.items()
              if process.returncode != 0]
    if failed:
        sys.exit(f"paper-mini: a sweep failed: {', '.join(failed)}; its lines above say which run and why")
    return seconds


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def protocol(tasks: dict[str, list[SweepTask]]) -> list[str]:
    """What ran, read from the tasks' own configs."""
    rows = []
    for sweep, sweep_tasks in tasks.items():
        for config_path in dict.fromkeys(task.config for task in sweep_tasks):
            mine = [task.validated for task in sweep_tasks if task.config == config_path]
            config = mine[0]
            terms = "; ".join(f"{term.name} λ " + ", ".join(f"{value:g}" for value in sorted(
                {other.loss_terms[index].weight for other in mine})) for index, term in enumerate(config.loss_terms))
            groups = config.optimizer.param_groups
            logits = f"{groups.dz.lr:g}" if groups.dz else "–"
            rows.append(f"| `{sweep}` | `{shown(Path(config_path))}` | {len(mine)} | "
                        f"{', '.join(str(s) for s in sorted({t.seed for t in mine}))} | {config.epochs} | "
                        f"{config.img_size} | {config.batch_size} | {groups.base.lr:g} | {logits} | {terms or '–'} |")
    header = ["| sweep | config | runs | seeds | epochs | px | batch | base lr | logit lr | loss terms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    return header + rows


def document(table: str, tasks: dict[str, list[SweepTask]], figures: dict[str, Path], doc: Path, timing: dict) -> str:
    relative = {name: os.path.relpath(path, doc.parent) for name, path in figures.items()}
    before, after = timing["load_before"], timing["load_after"]
    sweeps = ", ".join(f"{name}: {seconds / 60:.1f} min" for name, seconds in timing["sweeps"].items())
    return "\n".join([
        "# The paper's protocol in miniature",
        "",
        "Written by `make paper-mini` (`bench/paper_mini.py`); do not edit it by hand, run the target again. It runs",
        "the paper's ResNet-20 protocol (Table 2: an FP32 baseline, 4-bit and mixed-precision CoDeQ with the paper's",
        "objective, Eqs. 16 and 19, as `dz_l2` / `bit_l2` loss terms, three seeds each) and a λ_dz sweep, on",
        "scikit-learn's digits on a CPU in minutes instead of CIFAR-10 on a GPU in hours, to show what the tool",
        "produces before a GPU-day is spent. The numbers are the digits' own, not the paper's: 360 validation images",
        "make one image 0.28 % of accuracy. The real configs are `configs/paper/` (docs/paper.md).",
        "",
        "## What ran",
        "",
        *protocol(tasks),
        "",
        "Each sweep ran as `codeq sweep SWEEP --run` (its runs one after another), the sweeps at once; the table and",
        "the figures are `codeq report --compare` over all runs (`--csv`, `--plot`) and over the 4-bit ones",
        "(`--plot-epochs`).",
        "",
        "## Table",
        "",
        table.strip(),
        "",
        f"The same table as CSV: [{relative['csv']}]({relative['csv']}).",
        "",
        "## Figures",
        "",
        "Accuracy against Rel. BOPs, one point per row (error bars: the seeds' sample standard deviation), the",
        "Pareto front dashed:",
        "",
        f"![accuracy against Rel. BOPs]({relative['pareto']})",
        "",
        "The paper's Fig. 4 for the 4-bit runs at each λ_dz: mean layer sparsity, mean dead-zone width (as a share of",
        "the layer's robust range, d / 2R) and mean |θ_dz| over the epochs, one line per run:",
        "",
        f"![sparsity and dead zones over the epochs]({relative['epochs']})",
        "",
        "The paper's Fig. 3 for one mixed-precision run (seed 0): per layer, sparsity up and bit-width down:",
        "",
        f"![layer-wise bit-widths and sparsity]({relative['layers']})",
        "",
        "## Machine and time",
        "",
        f"- {timing['date']}, {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}",
        f"- the {len(tasks)} sweeps ran at once, each run with {timing['threads']} thread"
        f"{'s' if timing['threads'] > 1 else ''} (OMP_NUM_THREADS)",
        f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in before or [])}; after: "
        f"{', '.join(f'{x:.2f}' for x in after or [])}",
        f"- {timing['runs']} runs, of which {timing['skipped']} had finished before this call (not timed); wall time "
        f"{timing['wall'] / 60:.1f} min ({sweeps}, table and figures: {timing['report'] / 60:.1f} min)",
        f"- command: `{timing['command']}`",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete the runs an earlier call made in --save-dir")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: the configs'); for a quick check")
    parser.add_argument("--save-dir", type=Path, default=Path("runs/paper_mini"), help="where the runs go")
    parser.add_argument("--doc", type=Path, default=Path("docs/paper-mini.md"), help="the document to write")
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), metavar="SWEEP",
                        help="sweep files, relative to the repository (default: %(default)s)")
    args = parser.parse_args()
    save_dir, doc = (ROOT / args.save_dir).resolve(), (ROOT / args.doc).resolve()
    if args.fresh and save_dir.exists():
        if not (save_dir / MARKER).is_file():
            sys.exit(f"paper-mini: --fresh deletes only a folder this script made; {save_dir} has no {MARKER}")
        shutil.rmtree(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / MARKER).touch()
    figures_dir = doc.with_suffix("")
    figures = {"csv": figures_dir / "table.csv", "pareto": figures_dir / "pareto.png",
               "epochs": figures_dir / "epochs.png", "layers": figures_dir / "layers.png"}

    start, load_before = time.monotonic(), load_average()
    sweeps = {path: derived_sweep(path, save_dir, args.epochs) for path in args.sweeps}
    tasks = {path: expand(sweep) for path, sweep in sweeps.items()}
    skipped = sum(finished(task) for sweep_tasks in tasks.values() for task in sweep_tasks)
    threads = max(1, (os.cpu_count() or 1) // len(sweeps))
    sweep_seconds = run_sweeps(list(sweeps.values()), threads)

    began = time.monotonic()
    every = [task for sweep_tasks in tasks.values() for task in sweep_tasks]
    run_dirs = [shown(task.run_dir) for task in every]
    table = codeq("report", "--compare", *run_dirs, "--csv", str(figures["csv"]), "--plot", str(figures["pareto"]),
                  capture=True)
    four_bit = [shown(task.run_dir) for task in every
                if task.validated.quantizer and not task.validated.quantizer.kwargs.get("learnable_bit")]
    codeq("report", "--compare", *four_bit, "--plot-epochs", str(figures["epochs"]), capture=True)
    mixed = next(task for task in every if task.validated.quantizer and task.validated.quantizer.kwargs.get(
        "learnable_bit") and task.validated.seed == 0)
    atomic_write(figures["layers"], (mixed.run_dir / "layers.png").read_bytes())
    report_seconds = time.monotonic() - began

    table = table[:table.index("\nwrote ")] if "\nwrote " in table else table
    timing = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": load_before,
              "load_after": load_average(), "runs": len(every), "skipped": skipped, "threads": threads,
              "wall": time.monotonic() - start, "sweeps": sweep_seconds, "report": report_seconds,
              "command": " ".join(["python bench/paper_mini.py", *sys.argv[1:]])}
    atomic_write(doc, document(table, tasks, figures, doc, timing))
    print(f"paper-mini: wrote {shown(doc)} and {shown(figures_dir)}/ in {timing['wall'] / 60:.1f} min")


if __name__ == "__main__":
    main()
