"""``codeq report``: compression reports (``report.json``, ``report.md``, ``layers.png``) for a run or any checkpoint.

    codeq report runs/NAME[/last.pt] [--out DIR]    # report of a checkpoint (no training)
    codeq report --compare runs/A runs/B ...        # runs side by side

The metrics are defined in docs/compression.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codeq.app.checkpoint import LAST_CHECKPOINT, checkpoint_path, load_checkpoint, load_model_state
from codeq.app.config import saved_value, validate_config
from codeq.app.experiment import build_model
from codeq.bn import has_batch_norm
from codeq.compression import FP32_BITS, BopsSettings, CompressionMonitor, monitor_report
from codeq.data.base import declared_classes
from codeq.errors import ArgumentError, CheckpointError, ConfigError, cannot_write, report_error
from codeq.io import atomic_write

log = logging.getLogger(__name__)

METHOD_NAMES = {"deadzone": "CoDeQ", "uniform": "Uniform QAT"}
REPORT_FILES = ("report.json", "report.md", "layers.png")
SUMMARY_COLUMNS = ("Method", "Weights", "Pruning", "Acc (%)", "Rel. BOPs (%)")


def method_name(config: dict[str, Any]) -> str:
    quantizer = config.get("quantizer")
    if not quantizer:
        return "FP32 baseline"
    return METHOD_NAMES.get(quantizer["name"], quantizer["name"])


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
    if not metrics_path.is_file():
        return {}
    by_epoch = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[record["epoch"]] = record  # a resumed run re-logs epochs: the latest record wins
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
    # The statistics behind the run's val_acc: re-estimated on this many batches before each validation (0: not).
    statistics = saved_value(config, "bn_recalibration_batches") if has_batch_norm(monitor.model) else None
    return {
        "model": config["model"], "dataset": config.get("dataset"), "img_size": config.get("img_size"),
        "method": method_name(config), "quantizer": (config.get("quantizer") or {}).get("name"),
        "weights": weights_label(layers), **accuracy, "bn_recalibration_batches": statistics, **compression,
        "size": size, "layers": layers,
    }


def percent(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def summary_row(report: dict[str, Any]) -> list[str]:
    pruning = f"{percent(report['sparsity'], 1)} %" if report["quantizer"] else "–"
    return [report["method"], report["weights"], pruning, percent(report.get("val_acc")), percent(report["rel_bops"])]


def markdown_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


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
        *statistics_line(report.get("bn_recalibration_batches")),
    ])


def statistics_line(batches: int | None) -> list[str]:
    """Which BatchNorm statistics the run's accuracy was measured with (nothing for a model without BatchNorm)."""
    if batches is None:
        return []
    if batches:
        return [f"- BatchNorm statistics re-estimated with the quantized weights on {batches} training batches before "
                f"each validation (Acc and the checkpoints use them)"]
    return ["- BatchNorm statistics: training's running averages, not re-estimated: Acc can be far below what the "
            "weights score (`codeq evaluate` re-estimates them)"]


def bops_bits(report: dict[str, Any]) -> str:
    """The report's BOPs settings in words (reports written before the settings existed counted 32 and 32)."""
    return (f"{report.get('activation_bits', 32)}-bit activations and {report.get('fp_weight_bits', 32)}-bit "
            "weights in layers left in FP32")


def compare_table(reports: dict[str, dict[str, Any]]) -> str:
    header = ["Run", *SUMMARY_COLUMNS, "Struct. BOPs (%)", "Size ratio", "BOPs A / FP W bits"]
    rows = [[name, *summary_row(report), percent(report["rel_bops_structured"]), f"{report['size']['ratio']:.2f}x",
             f"{report.get('activation_bits', 32)} / {report.get('fp_weight_bits', 32)}"]
            for name, report in reports.items()]
    return markdown_table(header, rows)


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
    try:
        atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120))
    finally:
        plt.close(figure)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """``REPORT_FILES`` into ``out_dir``, each written whole or not at all. Raises OSError when one cannot be."""
    atomic_write(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", type=Path, help="checkpoint (.pt) or run directory (uses its last.pt)")
    parser.add_argument("--out", type=Path, help="also write report.json, report.md and layers.png into this folder")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="RUN_DIR", help="print these runs side by side")


def run(args: argparse.Namespace) -> int:
    try:
        if (args.path is None) == (args.compare is None):
            raise ArgumentError("pass either a checkpoint PATH or --compare RUN_DIR...")
        if args.compare:
            for run_dir in args.compare:
                check_run_directory(run_dir)
            print(compare_table({str(run_dir): run_report(run_dir) for run_dir in args.compare}))
            return 0
        report = checkpoint_report(args.path)
    except (ArgumentError, CheckpointError, ConfigError) as error:
        return report_error(error, "report")
    if args.out:
        try:
            write_report(report, args.out)
        except OSError as error:
            return report_error(cannot_write(error, args.out, "each report file is whole or absent; free space or "
                                             "pass another --out"), "report")
    print(render_markdown(report))
    return 0
