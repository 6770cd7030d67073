"""Does a compression target cost accuracy? (issue 23, docs/budget.md)

On digits with ResNet-20 (configs/quickstart.yaml), at a fixed 4 bits and with learnable bit-widths: a sweep of the
fixed dead-zone pressure (the ``dz`` group's weight decay) against runs that target a sparsity, all with the same
epochs and seed, plus more seeds of the targeted 4-bit runs for the spread of what they reach. Writes the table into
docs/budget.md (between its ``target-quality`` markers), the figure (accuracy against sparsity: the sweep's curve,
the targeted runs on it) and a JSON of every run.

    python bench/target_quality.py                  # the figures of docs/budget.md: ~25 min on 2 idle CPU cores
    python bench/target_quality.py --epochs 1 --img-size 8 --sweep 4,8 --targets 0.5 --seeds 0,1 \\
        --save-dir /tmp/tq --doc /tmp/tq/budget.md --figure /tmp/tq/quality.png    # a check of the script itself

Runs are resumed with ``--resume auto``: a finished one is read, not trained again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
MARKERS = ("<!-- target-quality:start -->\n", "<!-- target-quality:end -->")
VARIANTS = {
    "4-bit": [],
    "learnable bits": ["quantizer.kwargs.learnable_bit=true",
                       "optimizer.param_groups.bit={lr: 0.003, weight_decay: 2.0}"],
}


@dataclass
class Run:
    variant: str
    kind: str  # "sweep" or "target"
    knob: float  # the dz weight decay of a sweep run, the sparsity of a targeted one
    seed: int
    sparsity: float | None = None
    val_acc: float | None = None
    rel_bops: float | None = None
    exit_code: int | None = None

    @property
    def name(self) -> str:
        variant = self.variant.replace(" ", "_").replace("-", "")
        knob = f"dzwd{self.knob:g}" if self.kind == "sweep" else f"sparsity{self.knob:g}"
        return f"{variant}_{knob}_seed{self.seed}"


def train(run: Run, args: argparse.Namespace, threads: int) -> Run:
    """Train (or resume) ``run`` and read its last epoch."""
    settings = [f"save_dir={args.save_dir}", f"run_name={run.name}", f"epochs={args.epochs}",
                f"img_size={args.img_size}", f"seed={run.seed}", *VARIANTS[run.variant]]
    settings.append(f"optimizer.param_groups.dz.weight_decay={run.knob}" if run.kind == "sweep"
                    else f"target.sparsity={run.knob}")
    command = [sys.executable, "-m", "codeq", "train", "--config", str(CONFIG), "--resume", "auto"]
    command += [part for setting in settings for part in ("--set", setting)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    run.exit_code = done.returncode
    metrics = Path(args.save_dir) / run.name / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"{run.name} wrote no metrics (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    last = json.loads(metrics.read_text().splitlines()[-1])
    run.sparsity, run.val_acc, run.rel_bops = last["sparsity"], last["val_acc"], last["rel_bops"]
    print(f"{run.name}: sparsity {run.sparsity:.4f}, val_acc {run.val_acc:.4f} (exit {run.exit_code})", flush=True)
    return run


def best_sweep_accuracy(runs: list[Run], variant: str, sparsity: float) -> Run | None:
    """The most accurate sweep run of ``variant`` that is at least ``sparsity`` sparse."""
    candidates = [run for run in runs if run.variant == variant and run.kind == "sweep" and run.sparsity >= sparsity]
    return max(candidates, key=lambda run: run.val_acc, default=None)


def comparison_rows(runs: list[Run], seed: int) -> list[str]:
    rows = ["| bits | target | reached | val_acc | best sweep run at least as sparse | not below it |",
            "|---|---|---|---|---|---|"]
    for run in runs:
        if run.kind != "target" or run.seed != seed:
            continue
        best = best_sweep_accuracy(runs, run.variant, run.sparsity)
        against = (f"{best.val_acc:.2%} (dz decay {best.knob:g}: {best.sparsity:.4f})" if best
                   else "none reaches it")
        verdict = "n/a" if best is None else "yes" if run.val_acc >= best.val_acc else "**no**"
        rows.append(f"| {run.variant} | {run.knob:g} | {run.sparsity:.4f} | {run.val_acc:.2%} | {against} | "
                    f"{verdict} |")
    return rows


def spread_rows(runs: list[Run]) -> list[str]:
    rows = ["| bits | target | seeds | reached: mean ± sd (min..max) | within ±0.01 | val_acc: mean ± sd |",
            "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        if run.kind == "target":
            groups.setdefault((run.variant, run.knob), []).append(run)
    for (variant, target), members in groups.items():
        reached = [run.sparsity for run in members]
        accuracy = [run.val_acc for run in members]
        sd = statistics.stdev(reached) if len(reached) > 1 else 0.0
        acc_sd = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        within = sum(abs(value - target) <= 0.01 for value in reached)
        rows.append(f"| {variant} | {target:g} | {len(members)} | {statistics.mean(reached):.4f} ± {sd:.4f} "
                    f"({min(reached):.4f}..{max(reached):.4f}) | {within}/{len(members)} | "
                    f"{statistics.mean(accuracy):.2%} ± {acc_sd:.2%} |")
    return rows


def sweep_rows(runs: list[Run]) -> list[str]:
    rows = ["| bits | dz weight decay | sparsity | Rel. BOPs | val_acc |", "|---|---|---|---|---|"]
    rows += [f"| {run.variant} | {run.knob:g} | {run.sparsity:.4f} | {run.rel_bops:.2%} | {run.val_acc:.2%} |"
             for run in runs if run.kind == "sweep"]
    return rows


def figure(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(run.variant for run in runs))
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4), squeeze=False)
    for axis, variant in zip(axes[0], variants):
        sweep = sorted((run for run in runs if run.variant == variant and run.kind == "sweep"),
                       key=lambda run: run.sparsity)
        axis.plot([run.sparsity for run in sweep], [100 * run.val_acc for run in sweep], "o-", color="grey",
                  label="sweep of the dz weight decay")
        for run in sweep:
            axis.annotate(f"{run.knob:g}", (run.sparsity, 100 * run.val_acc), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=7, color="grey")
        targeted = [run for run in runs if run.variant == variant and run.kind == "target"]
        axis.scatter([run.sparsity for run in targeted], [100 * run.val_acc for run in targeted], marker="*", s=90,
                     color="tab:red", zorder=3, label="targeted runs (each seed)")
        for target in sorted({run.knob for run in targeted}):
            axis.axvline(target, color="tab:red", alpha=0.25, linewidth=1)
        axis.set_title(f"ResNet-20 on digits, {variant}")
        axis.set_xlabel("sparsity of the final model")
        axis.set_ylabel("final val_acc (%)")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_doc(doc: Path, runs: list[Run], args: argparse.Namespace) -> None:
    seed = args.seeds[0]
    command = " ".join(["python bench/target_quality.py", *sys.argv[1:]])
    lines = [f"Measured with `{command}`: "
             f"{args.epochs} epochs at {args.img_size} px, seed {seed} for the sweep and the comparison; the "
             f"targeted runs start from the config's dz weight decay (6.0). Accuracy is the final epoch's "
             f"val_acc.", "", f"![accuracy against sparsity]({os.path.relpath(args.figure, doc.parent)})", "",
             *comparison_rows(runs, seed), "", *spread_rows(runs), "", *sweep_rows(runs)]
    text = doc.read_text() if doc.is_file() else "".join(MARKERS) + "\n"
    head, found, rest = text.partition(MARKERS[0])
    _, found_end, tail = rest.partition(MARKERS[1])
    if not (found and found_end):
        raise SystemExit(f"{doc} lacks the markers {MARKERS[0].strip()} ... {MARKERS[1]}")
    doc.write_text(head + MARKERS[0] + "\n".join(lines) + "\n" + MARKERS[1] + tail)


def numbers(text: str, kind=float) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--sweep", type=numbers, default=numbers("2,4,6,8,10,13"),
                        help="dz weight decays of the sweep (at least 5 for the docs)")
    parser.add_argument("--targets", type=numbers, default=numbers("0.8,0.9,0.95"))
    parser.add_argument("--seeds", type=lambda text: numbers(text, int), default=[0, 1, 2],
                        help="the first is the sweep's; the 4-bit targets run with each")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=list(VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}; the learnable one with the first seed only")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--save-dir", default="runs/target_quality")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "budget.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "budget_quality.png")
    parser.add_argument("--json", type=Path, help="default: SAVE_DIR/results.json")
    args = parser.parse_args()
    unknown = [variant for variant in args.variants if variant not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")

    runs = []
    for variant in args.variants:
        runs += [Run(variant, "sweep", decay, args.seeds[0]) for decay in args.sweep]
        seeds = args.seeds if variant == "4-bit" else args.seeds[:1]
        runs += [Run(variant, "target", target, seed) for target in args.targets for seed in seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda run: train(run, args, threads), runs))

    json_path = args.json or Path(args.save_dir) / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps([{**asdict(run), "name": run.name} for run in runs], indent=1))
    figure(runs, args.figure)
    write_doc(args.doc, runs, args)
    print("\n".join(comparison_rows(runs, args.seeds[0]) + [""] + spread_rows(runs)))


if __name__ == "__main__":
    main()
