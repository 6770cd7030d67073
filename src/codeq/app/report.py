"""``codeq report``: compression reports (``report.json``, ``report.md``, ``layers.png``) for a run or any checkpoint.

    codeq report runs/NAME[/last.pt] [--out DIR]    # report of a checkpoint (no training)
    codeq report --compare runs/A runs/B ... [--csv FILE] [--latex FILE] [--plot FILE] [--plot-epochs FILE]

``--compare`` pools runs that differ only in their seed into one row of the paper's table (mean ± sample standard
deviation over their last epochs, n shown) and prints it as Markdown; ``--csv`` and ``--latex`` (booktabs) write it,
``--plot`` draws accuracy against Rel. BOPs with the Pareto front and ``--plot-epochs`` the sparsity and dead zones
over the epochs (the paper's Fig. 4), each as PNG or PDF by the file's suffix (both without one). How runs are
grouped: codeq.app.results. The metrics are defined in docs/compression.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from codeq.app.checkpoint import LAST_CHECKPOINT, checkpoint_path, load_checkpoint, load_model_state
from codeq.app.config import validate_config
from codeq.app.experiment import build_model
from codeq.app.plugins import import_plugins
from codeq.app.results import (
    SUMMARY_COLUMNS,
    WRITERS,
    RunResult,
    figure_paths,
    group_runs,
    markdown,
    markdown_table,
    method_name,
    percent,
)
from codeq.app.tracking import read_metrics
from codeq.compression import FP32_BITS, BopsSettings, CompressionMonitor, monitor_report
from codeq.data.base import declared_classes
from codeq.errors import ArgumentError, CheckpointError, ConfigError, report_error
from codeq.io import atomic_write

log = logging.getLogger(__name__)
# The outputs of --compare besides the printed table: option, its attribute in the parsed arguments, what it writes.
COMPARE_OUTPUTS = (("--csv", "csv", "the table as CSV"), ("--latex", "latex", "the table as a LaTeX booktabs tabular"),
                   ("--plot", "plot", "accuracy against Rel. BOPs with the Pareto front (.png or .pdf; no suffix: "
                                      "both)"),
                   ("--plot-epochs", "plot_epochs", "mean layer sparsity, dead-zone width and |θ_dz| over the "
                                                    "epochs per run, the paper's Fig. 4 (.png or .pdf; no suffix: "
                                                    "both)"))


def weights_label(rows: list[dict]) -> str:
    bits = sorted({row["bits"] for row in rows if row["quantized"]})
    if not bits:
        return "32-bit"
    if len(bits) == 1:
        return f"{bits[0]:g}-bit"
    mean = sum(row["bits"] for row in rows if row["quantized"]) / sum(row["quantized"] for row in rows)
    return f"mixed {bits[0]:g}-{bits[-1]:g}-bit (mean {mean:.2f})"


def accuracy_from_metrics(metrics_path: Path, epoch: int | None = None) -> dict[str, Any]:
    """Validation accuracy at ``epoch`` (default: the last logged) and the best one up to it."""
    by_epoch = {record["epoch"]: record for record in read_metrics(metrics_path)}
    if not by_epoch:
        return {}
    epoch = max(by_epoch) if epoch is None else epoch
    if epoch not in by_epoch:
        return {}
    return {"epoch": epoch, "val_acc": by_epoch[epoch]["val_acc"],
            "best_val_acc": max(r["val_acc"] for e, r in by_epoch.items() if e <= epoch)}


def build_report(monitor: CompressionMonitor, config: dict[str, Any], accuracy: dict[str, Any]) -> dict[str, Any]:
    """Everything report.json holds: the run (model, data set, method), its accuracy, and ``compression_report``'s
    figures (with the sizes under ``size``)."""
    compression = monitor_report(monitor, BopsSettings.of(config))
    size = {"fp32_bytes": compression.pop("fp32_bytes"), "compressed_bytes": compression.pop("size_bytes"),
            "ratio": compression.pop("size_ratio")}
    layers = compression.pop("layers")
    return {
        "model": config["model"], "dataset": config.get("dataset"), "img_size": config.get("img_size"),
        "method": method_name(config), "quantizer": (config.get("quantizer") or {}).get("name"),
        "weights": weights_label(layers), **accuracy, **compression, "size": size, "layers": layers,
    }


def summary_row(report: dict[str, Any]) -> list[str]:
    pruning = f"{percent(report['sparsity'], 1)} %" if report["quantizer"] else "–"
    return [report["method"], report["weights"], pruning, percent(report.get("val_acc")), percent(report["rel_bops"])]


def summary_table(report: dict[str, Any]) -> str:
    """The paper-style table of one run, plus the numbers behind it."""
    size = report["size"]
    best = report.get("best_val_acc")
    return "\n".join([
        markdown_table(SUMMARY_COLUMNS, [summary_row(report)]),
        "",
        f"- Acc is the reported model's validation accuracy; best of the run up to it: {percent(best)} % (best.pt)",
        f"- Structured Rel. BOPs (whole null channels only): {percent(report['rel_bops_structured'])} %",
        f"- BOPs count {bops_bits(report)}; Rel. BOPs is relative to 32-bit weights and 32-bit activations",
        f"- Size: {size['fp32_bytes']:,} B FP32 -> {size['compressed_bytes']:,} B compressed ({size['ratio']:.2f}x)",
    ])


def bops_bits(report: dict[str, Any]) -> str:
    """The report's BOPs settings in words (reports written before the settings existed counted 32 and 32)."""
    return (f"{report.get('activation_bits', 32)}-bit activations and {report.get('fp_weight_bits', 32)}-bit "
            "weights in layers left in FP32")


def layer_table(report: dict[str, Any]) -> str:
    header = ["Layer", "Type", "Bits", "Dead zone d", "Step s", "Sparsity (%)", "Non-zeros", "MACs",
              "Rel. BOPs (%)", "Struct. (%)"]
    rows = []
    for row in report["layers"]:
        scale = row["dense_bops"] or None
        rows.append([
            row["name"], row["kind"] + ("" if row["quantized"] else " (FP32)"), f"{row['bits']:g}",
            "–" if row["deadzone"] is None else f"{row['deadzone']:.4g}",
            "–" if row["step"] is None else f"{row['step']:.4g}",
            percent(row["sparsity"], 1), f"{row['nonzero']:,}/{row['numel']:,}", f"{row['macs']:,}",
            percent(row["bops"] / scale) if scale else "–",
            percent(row["structured_bops"] / scale) if scale and row["structured_bops"] is not None else "–",
        ])
    return markdown_table(header, rows)


def render_markdown(report: dict[str, Any]) -> str:
    epoch = f", epoch {report['epoch']}" if report.get("epoch") is not None else ""
    return (f"# Compression report: {report['model']} on {report['dataset']}{epoch}\n\n"
            f"{summary_table(report)}\n\n"
            f"Dense MACs per sample: {report['macs']:,}; BOPs: {report['bops']:.4g} of {report['dense_bops']:.4g} "
            f"dense 32x32 (definitions: docs/compression.md)\n\n"
            f"## Per layer\n\n{layer_table(report)}\n")


def layer_label(row: dict[str, Any]) -> str:
    """A layer's name on the plot; the bare indices of ``nn.Sequential`` layers get their kind (``3 (linear)``)."""
    return f"{row['name']} ({row['kind']})" if re.fullmatch(r"[\d.]*", row["name"]) else row["name"]


def plot_layers(report: dict[str, Any], path: Path) -> None:
    """Per layer: sparsity as a bar upward, bit-width as a bar downward (the paper's layer-wise figure). FP32 layers
    are drawn too, grey, at 32 bits, and the bit-width axis always spans 0-32, so that a 4-bit layer looks as far
    from an FP32 one as it is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    positions = range(len(rows))
    figure, sparsity_axis = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 5.5))
    sparsity_axis.bar(positions, [100 * row["sparsity"] for row in rows], color="tab:blue", label="sparsity (%)")
    sparsity_axis.set_ylim(-105, 105)
    sparsity_axis.set_yticks([0, 25, 50, 75, 100])
    sparsity_axis.set_ylabel("sparsity (%)", color="tab:blue")
    bits_axis = sparsity_axis.twinx()
    bits_axis.bar(positions, [-row["bits"] for row in rows], label="bit-width",
                  color=["tab:orange" if row["quantized"] else "tab:gray" for row in rows])
    bits_axis.set_ylim(-1.05 * FP32_BITS, 1.05 * FP32_BITS)
    bit_ticks = sorted({0, FP32_BITS, *(int(row["bits"]) for row in rows)})
    bits_axis.set_yticks([-b for b in bit_ticks], [str(b) for b in bit_ticks])
    bits_axis.set_ylabel("bit-width (grey: FP32)", color="tab:orange")
    for index, row in enumerate(rows):
        sparsity_axis.annotate(f"{100 * row['sparsity']:.0f}", (index, 100 * row["sparsity"]), ha="center",
                               va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        bits_axis.annotate(f"{row['bits']:g}", (index, -row["bits"]), ha="center", va="top", fontsize=7,
                           xytext=(0, -1), textcoords="offset points")
    sparsity_axis.axhline(0, color="black", linewidth=0.8)
    sparsity_axis.set_xticks(list(positions), [layer_label(row) for row in rows], rotation=90, fontsize=7)
    sparsity_axis.set_xlim(-0.6, len(rows) - 0.4)
    sparsity_axis.set_title(f"{report['method']} {report['model']}: {report['weights']}, sparsity "
                            f"{percent(report['sparsity'], 1)} %, Rel. BOPs {percent(report['rel_bops'])} %",
                            fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120))
    plt.close(figure)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "report.json", json.dumps(report, indent=2) + "\n")  # --compare reads it: whole or none
    atomic_write(out_dir / "report.md", render_markdown(report))
    plot_layers(report, out_dir / "layers.png")


def write_run_report(run_dir: Path, monitor: CompressionMonitor, config: dict[str, Any], tracker: Any = None) -> dict:
    """End of a run: report of the final model into ``run_dir``, the plot to W&B, the table to the terminal."""
    report = build_report(monitor, config, accuracy_from_metrics(run_dir / "metrics.jsonl"))
    write_report(report, run_dir)
    wandb_run = getattr(tracker, "wandb_run", None)
    if wandb_run is not None:
        try:
            import wandb

            wandb_run.log({"layers": wandb.Image(str(run_dir / "layers.png"))})
            wandb_run.summary.update({"rel_bops": report["rel_bops"],
                                      "rel_bops_structured": report["rel_bops_structured"],
                                      "size_ratio": report["size"]["ratio"]})
        except Exception as error:  # noqa: BLE001 - W&B problems must never end a training run
            log.warning("W&B: could not log the layer plot (%s)", error)
    print(summary_table(report))
    return report


def model_from_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The model of a training checkpoint (quantizers attached), its config dict and the checkpoint. The config's
    plugins are imported first.

    Raises:
        CheckpointError: not a readable checkpoint of this tool, or one of another model.
        ConfigError: its config no longer validates (a plugin missing, say).
    """
    checkpoint = load_checkpoint(path)
    config = validate_config(checkpoint["config"])
    model, _ = build_model(config, checkpoint_classes(checkpoint, config.dataset), initialize=False)
    load_model_state(model, checkpoint["model"], path)
    return model, checkpoint["config"], checkpoint


def checkpoint_classes(checkpoint: dict[str, Any], dataset: str) -> int:
    """The number of classes the checkpoint's model was built for."""
    return checkpoint.get("num_classes") or declared_classes(dataset)


def example_input(config: dict[str, Any]) -> Tensor:
    """One input of the data set's shape; MACs and null channels do not depend on its values."""
    return torch.zeros(3, config["img_size"], config["img_size"])


def checkpoint_report(path: Path) -> dict[str, Any]:
    file = checkpoint_path(path)
    model, config, checkpoint = model_from_checkpoint(file)
    accuracy = accuracy_from_metrics(file.parent / "metrics.jsonl", checkpoint.get("epoch"))
    if not accuracy and "best_val_acc" in checkpoint:
        accuracy = {"epoch": checkpoint.get("epoch"), "best_val_acc": checkpoint["best_val_acc"]}
    return build_report(CompressionMonitor(model, example_input(config)), config, accuracy)


def run_report(run_dir: Path) -> dict[str, Any]:
    """A run's report.json when it has one, otherwise the report of its last.pt."""
    saved = run_dir / "report.json"
    return json.loads(saved.read_text()) if saved.is_file() else checkpoint_report(run_dir)


def check_run_directory(path: Path) -> None:
    """Raises CheckpointError unless ``path`` is a run directory (it holds report.json or last.pt); a save_dir, whose
    subfolders are run directories, is named as such with the runs it holds."""
    if (path / "report.json").is_file() or (path / LAST_CHECKPOINT).is_file():
        return
    runs = sorted(child.name for child in path.glob("*") if (child / LAST_CHECKPOINT).is_file()) if path.is_dir() \
        else []
    if runs:
        shown = " ".join(str(path / name) for name in runs[:3]) + (" ..." if len(runs) > 3 else "")
        raise CheckpointError(f"{path} is a save_dir holding {len(runs)} runs, not a run directory; pass the runs "
                              f"themselves: --compare {shown}")
    raise CheckpointError(f"{path} is not a run directory (no report.json or last.pt); pass folders under save_dir")


def run_result(run_dir: Path) -> RunResult:
    """A run directory's config and epoch records for ``--compare``; its plugins are imported.

    Raises:
        CheckpointError: no finished epoch in its metrics.jsonl, or no config.yaml and no readable last.pt.
        ConfigError: a plugin of its config cannot be imported.
    """
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise CheckpointError(f"{run_dir} has no finished epoch in metrics.jsonl: nothing to compare yet")
    saved = run_dir / "config.yaml"
    config = yaml.safe_load(saved.read_text()) if saved.is_file() else load_checkpoint(run_dir / LAST_CHECKPOINT)[
        "config"]
    import_plugins(config.get("plugins"))
    rel_bops = records[-1].get("rel_bops")
    if rel_bops is None:  # an FP32 run logs no compression per epoch; its report counts its BOPs
        rel_bops = run_report(run_dir)["rel_bops"]
    return RunResult(run_dir, config, records, rel_bops)


def compare(run_dirs: list[Path], outputs: dict[str, Path]) -> str:
    """The ``--compare`` table of ``run_dirs`` (Markdown), with ``outputs`` (``WRITERS`` key -> file) written; a
    line names each file written and each run that has not run all its epochs."""
    for key, option in (("plot", "--plot"), ("plot_epochs", "--plot-epochs")):
        if key in outputs:
            figure_paths(outputs[key], option)  # a bad suffix is refused before anything is written
    for run_dir in run_dirs:
        check_run_directory(run_dir)
    results = [run_result(run_dir) for run_dir in run_dirs]
    groups = group_runs(results)
    lines = [markdown(groups), ""]
    lines += [f"note: {result.run_dir} stopped at epoch {result.final['epoch']} of {result.config['epochs']}; its "
              f"last logged epoch is used" for result in results if not result.finished]
    for key, path in outputs.items():
        lines += [f"wrote {written}" for written in WRITERS[key](groups, path)]
    return "\n".join(lines).rstrip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", type=Path, help="checkpoint (.pt) or run directory (uses its last.pt)")
    parser.add_argument("--out", type=Path, help="also write report.json, report.md and layers.png into this folder")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="RUN_DIR",
                        help="the paper's table of these runs, runs that differ only in their seed pooled into one "
                             "row (mean ± std)")
    for option, _, meaning in COMPARE_OUTPUTS:
        parser.add_argument(option, type=Path, metavar="FILE", help=f"with --compare: {meaning}")


def run(args: argparse.Namespace) -> int:
    try:
        if (args.path is None) == (args.compare is None):
            raise ArgumentError("pass either a checkpoint PATH or --compare RUN_DIR...")
        outputs = {key: getattr(args, key) for _, key, _ in COMPARE_OUTPUTS if getattr(args, key) is not None}
        if args.compare:
            print(compare(args.compare, outputs))
            return 0
        if outputs:
            raise ArgumentError(f"{', '.join(option for option, key, _ in COMPARE_OUTPUTS if key in outputs)} "
                                f"go with --compare")
        report = checkpoint_report(args.path)
    except (ArgumentError, CheckpointError, ConfigError, OSError) as error:
        return report_error(error, "report")
    if args.out:
        write_report(report, args.out)
    print(render_markdown(report))
    return 0
