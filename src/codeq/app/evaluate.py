"""``codeq evaluate``: validation loss and accuracy of a trained model, with its compression summary; nothing is
written.

    codeq evaluate PATH [--dataset NAME] [--data-dir DIR] [--device D] [--batch-size N] [--workers N]
                        [--bn-batches N]

PATH is a checkpoint of this tool (last.pt or best.pt, also copied elsewhere), a run directory (its last.pt) or a
packed export (``codeq export``). The validation split is the run's data set, read from the run's data_dir,
unless --dataset / --data-dir point elsewhere; batches are evaluated as the run validated them (its batch size,
amp and channels-last, and the BatchNorm statistics its checkpoints hold), so a run's own data reproduces its logged
val_acc. A checkpoint whose statistics are training's running averages (a run without re-estimation, or one stopped
mid-epoch) gets them re-estimated first; the line after the accuracy says which statistics were used. Exit codes
as for run_training.py: 0 done, 1 the data cannot be read, 2 bad arguments or an unusable PATH.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from codeq.app.checkpoint import checkpoint_path
from codeq.app.config import TrainConfig, validate_config
from codeq.app.experiment import resolve_device
from codeq.app.export import at_least, model_from_payload
from codeq.app.report import (
    SUMMARY_COLUMNS,
    build_report,
    checkpoint_classes,
    example_input,
    markdown_table,
    method_name,
    model_from_checkpoint,
    summary_row,
    summary_table,
    weights_label,
)
from codeq.app.trainer import load_data, statistics_for
from codeq.bn import has_batch_norm
from codeq.compression import CompressionMonitor, LayerStats, as_rows, count_macs, layer_stats, summary
from codeq.data.loaders import build_loaders
from codeq.errors import CheckpointError, ConfigError, ExportError, RunFailure, report_error
from codeq.export.packed import load_export
from codeq.training.loop import validate
from codeq.training.step_settings import StepSettings


class Evaluated(NamedTuple):
    """What PATH holds: the model, its run's config, its number of classes, how to summarise its compression given
    the accuracy measured (``val_acc``), and the checkpoint it came from (None for an export)."""

    model: nn.Module
    config: dict[str, Any]
    num_classes: int
    summarise: Callable[[float], str]
    checkpoint: dict[str, Any] | None = None


class Result(NamedTuple):
    """An evaluation: ``loss`` and ``acc`` over ``images`` validation images of the data ``config`` names, and which
    BatchNorm statistics it used (None: the model has none)."""

    loss: float
    acc: float
    images: int
    config: TrainConfig
    evaluated: Evaluated
    statistics: str | None = None


def from_checkpoint(path: Path) -> Evaluated:
    """A checkpoint's model (quantizers attached); its summary is the report's table."""
    model, config, checkpoint = model_from_checkpoint(path)
    monitor = CompressionMonitor(model, example_input(config))
    known = {"epoch": checkpoint.get("epoch"), "best_val_acc": checkpoint.get("best_val_acc")}

    def summarise(val_acc: float) -> str:
        return summary_table(build_report(monitor, config, {**known, "val_acc": val_acc}))

    return Evaluated(model, config, checkpoint_classes(checkpoint, config["dataset"]), summarise, checkpoint)


def from_export(path: Path) -> Evaluated:
    """An export's plain model; its summary reads bit-widths and non-zeros from the export."""
    payload = load_export(path)
    model, config = model_from_payload(payload), payload["config"]
    stats = export_stats(model, payload["quantized"], count_macs(model, example_input(config)))
    totals = summary(stats)

    def summarise(val_acc: float) -> str:
        report = {"method": method_name(config), "weights": weights_label(as_rows(stats)),
                  "sparsity": totals.get("sparsity", 0.0), "quantizer": (config.get("quantizer") or {}).get("name"),
                  "val_acc": val_acc, "rel_bops": totals.get("rel_bops")}
        return (f"{markdown_table(SUMMARY_COLUMNS, [summary_row(report)])}\n\n"
                f"- Size: {path.stat().st_size:,} B export file")

    return Evaluated(model, config, payload["num_classes"], summarise)


def export_stats(model: nn.Module, quantized: dict[str, dict[str, Any]], macs: dict[str, int]) -> list[LayerStats]:
    """Per layer of the decoded plain model: what ``layer_stats`` measures, with the bit-width each quantized layer
    was exported with (its zeros are in the decoded weights already)."""
    stats = {entry.name: entry for entry in layer_stats(model, macs)}
    for name, module in model.named_modules():
        layer = quantized.get(f"{name}.weight" if name else "weight")
        if layer is None:
            continue
        measured = stats.get(name) or LayerStats(name, type(module).__name__, True, 0.0, None, None,
                                                 module.weight.numel(), layer["nonzero"])
        stats[name] = dataclasses.replace(measured, quantized=True, bits=float(layer["bits"]),
                                          step=layer.get("step"), nonzero=layer["nonzero"])
    return [stats[name] for name, _ in model.named_modules() if name in stats]


def read(path: Path) -> Evaluated:
    """The model PATH holds: a checkpoint, a run directory or an export.

    Raises:
        CheckpointError: PATH is none of them.
        ConfigError: its config no longer validates.
    """
    path = checkpoint_path(path)
    try:
        return from_checkpoint(path)
    except CheckpointError as not_checkpoint:
        try:
            return from_export(path)
        except ExportError:
            raise CheckpointError(f"{path} is neither a checkpoint of this tool nor an export ({not_checkpoint})") \
                from None


def evaluation_config(config: dict[str, Any], dataset: str | None, data_dir: str | None) -> TrainConfig:
    """The run's config pointed at the data to evaluate on (checked as any config is)."""
    overrides = {key: value for key, value in (("dataset", dataset), ("data_dir", data_dir)) if value is not None}
    return validate_config({**config, **overrides})


def evaluate(path: Path, dataset: str | None = None, data_dir: str | None = None, device: str | None = None,
             batch_size: int | None = None, workers: int | None = None, bn_batches: int | None = None) -> Result:
    """Validation loss and accuracy of the model at ``path`` on its run's data set (or ``dataset`` from
    ``data_dir``).

    BatchNorm statistics (``statistics_for``): a checkpoint's when they were re-estimated for its weights, else
    re-estimated on ``bn_batches`` (default: the run's ``bn_recalibration_batches``) training batches of that data
    set; an export's as exported. ``bn_batches`` 0 keeps the stored ones; N re-estimates them in any case.

    Raises:
        CheckpointError, ExportError: ``path`` holds no usable model.
        ConfigError: a bad argument, or a data set whose number of classes differs from the model's.
        RunFailure: the data cannot be read.
    """
    evaluated = read(path)
    config = evaluation_config(evaluated.config, dataset, data_dir)
    target = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_data(config)
    if data.num_classes != evaluated.num_classes:
        raise ConfigError("--dataset", f"{config.dataset} from {config.data_dir} has {data.num_classes} classes, the "
                          f"model {evaluated.num_classes}", "evaluate on data of the classes the model was trained on")
    generator = torch.Generator().manual_seed(config.seed)
    train_loader, loader = build_loaders(data, batch_size or config.batch_size,
                                         config.workers if workers is None else workers, generator,
                                         pin_memory=target.type == "cuda")
    settings = StepSettings(target, config.amp, config.channels_last)
    model = settings.prepare_model(evaluated.model.to(target))
    if evaluated.checkpoint is None and not bn_batches:  # an export is evaluated as it was exported
        statistics = "BatchNorm statistics: as exported" if has_batch_norm(model) else None
    else:
        statistics = statistics_for(model, evaluated.checkpoint or {"epoch": 0}, config, bn_batches,
                                    lambda: train_loader, settings)
    metrics = validate(loader, model, nn.CrossEntropyLoss(), target, log_interval=config.log_interval,
                       step_settings=settings)
    return Result(metrics["loss"], metrics["acc"], len(loader.dataset), config, evaluated, statistics)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="checkpoint (.pt), run directory (its last.pt) or export")
    parser.add_argument("--dataset", help="evaluate on this data set instead of the run's")
    parser.add_argument("--data-dir", help="read the data set from here instead of the run's data_dir")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when there is one)")
    parser.add_argument("--batch-size", type=at_least(1), help="default: the run's batch_size")
    parser.add_argument("--workers", type=at_least(0), help="data-loader workers (default: the run's)")
    parser.add_argument("--bn-batches", type=at_least(0), metavar="N",
                        help="re-estimate BatchNorm statistics on N training batches first (0: use the stored ones; "
                             "default: a checkpoint's own when its run re-estimated them, else the run's "
                             "bn_recalibration_batches; an export's as exported)")


def run(args: argparse.Namespace) -> int:
    try:
        result = evaluate(args.path, args.dataset, args.data_dir, args.device, args.batch_size, args.workers,
                          args.bn_batches)
    except (ConfigError, CheckpointError, ExportError, RunFailure) as error:
        return report_error(error, "evaluate")
    print(f"validation: loss {result.loss:.4f}, accuracy {result.acc:.2%} ({result.images:,} images of "
          f"{result.config.dataset} from {result.config.data_dir})")
    if result.statistics:
        print(result.statistics)
    print(result.evaluated.summarise(result.acc))
    return 0
