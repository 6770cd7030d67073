"""``codeq export``: a run's checkpoint as a deployable file, by the output's suffix.

    codeq export CHECKPOINT OUT.codeq [--bn-batches N]                   # bit-packed codes (codeq.export.packed)
    codeq export CHECKPOINT OUT.onnx [--slim] [--check] [--bn-batches N] # standard ONNX (codeq.export.onnx)

CHECKPOINT is a ``last.pt``/``best.pt`` or a run directory (its ``last.pt``). Its BatchNorm statistics are exported
as its run re-estimated them for its weights; a checkpoint that holds training's running averages instead (a run
without re-estimation, one stopped mid-epoch) gets them re-estimated on the run's training data first, and the first
line printed says which. Exit 0 when written, 2 for a bad
argument, checkpoint or model (nothing is written then).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codeq.app.checkpoint import checkpoint_path
from codeq.app.config import validate_config
from codeq.app.plugins import import_plugins
from codeq.app.report import checkpoint_classes, example_input, model_from_checkpoint
from codeq.app.trainer import load_data, statistics_for
from codeq.compression import model_size
from codeq.data import load_dataset
from codeq.data.loaders import build_loaders
from codeq.errors import (
    ArgumentError,
    CheckpointError,
    ConfigError,
    ExportError,
    RunFailure,
    cannot_write,
    report_error,
)
from codeq.export.packed import decode_state, export_model, load_export
from codeq.models import create_model
from codeq.training.step_settings import StepSettings

FORMATS = (".codeq", ".onnx")


def model_from_export(path: Path) -> nn.Module:
    """The plain (quantizer-free) model holding the exported weights; it computes what the fake-quantized one did."""
    return model_from_payload(load_export(path))


def model_from_payload(payload: dict[str, Any]) -> nn.Module:
    """``model_from_export`` of an export already read (``load_export``); the run's plugins are imported first."""
    config = payload["config"]
    import_plugins(config.get("plugins"))
    model = create_model(config["model"], num_classes=payload["num_classes"], img_size=config["img_size"])
    model.load_state_dict(decode_state(payload))
    return model.eval()


def size_lines(model: nn.Module, out: Path, checkpoint: Path) -> list[str]:
    size = model_size(model)
    written = out.stat().st_size
    return [
        f"wrote {out}: {written:,} B ({size.compressed_bytes:,} B compressed weights, "
        f"{written - size.compressed_bytes:,} B of names, config and container)",
        f"FP32 model {size.fp32_bytes:,} B: {size.fp32_bytes / written:.2f}x larger than the export; "
        f"checkpoint {checkpoint} {checkpoint.stat().st_size:,} B (with optimizer state)",
    ]


def validation_batches(config: dict) -> Iterable[tuple[Tensor, Tensor]]:
    """The run's validation set as (inputs, labels) batches, in order. Raises ExportError when the data is missing."""
    from torch.utils.data import DataLoader

    try:
        dataset = load_dataset(config["dataset"], config["data_dir"], config["img_size"]).val
    except (OSError, ValueError) as error:
        raise ExportError(f"--check needs the run's validation data: {error}") from None
    return DataLoader(dataset, batch_size=256, shuffle=False, num_workers=0)


def export_checkpoint_onnx(model: nn.Module, config: dict, out: Path, slim: bool, check: bool) -> list[str]:
    """``export_onnx`` for a run's model and config (``--check``: also on its validation set); the lines to print."""
    from codeq.export.onnx import export_onnx  # onnx and onnxruntime load only for ONNX (extra `onnx`)

    validation = validation_batches(config) if check else None
    return export_onnx(model, example_input(config), out, slim=slim, validation=validation).lines()


def exported_statistics(model: nn.Module, config: dict[str, Any], checkpoint: dict[str, Any],
                        batches: int | None) -> str | None:
    """``statistics_for`` on the CPU: the checkpoint's BatchNorm statistics when its run re-estimated them, else
    re-estimated on the run's training data; the line that says which (None without BatchNorm).

    Raises:
        ExportError: they need re-estimating and the training data cannot be read.
    """
    train_config = validate_config(config)

    def train_loader() -> Iterable:
        try:
            data = load_data(train_config)
        except RunFailure as error:
            raise ExportError(f"the checkpoint's BatchNorm statistics are training's running averages and the "
                              f"training data to re-estimate them cannot be read ({error}); make it readable, or "
                              f"pass --bn-batches 0 to export the stored statistics") from None
        return build_loaders(data, train_config.batch_size, 0, torch.Generator().manual_seed(train_config.seed))[0]

    return statistics_for(model, checkpoint, train_config, batches, train_loader, StepSettings("cpu"))


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="last.pt or best.pt of a run (or the run directory)")
    parser.add_argument("out", type=Path, help="file to write; its suffix picks the format: .codeq or .onnx")
    parser.add_argument("--slim", action="store_true", help=".onnx: remove the null channels that can go exactly")
    parser.add_argument("--check", action="store_true",
                        help=".onnx: also compare onnxruntime with PyTorch on the run's validation set")
    parser.add_argument("--bn-batches", type=at_least(0), metavar="N",
                        help="re-estimate BatchNorm statistics on N training batches before exporting (0: export the "
                             "stored ones; default: the checkpoint's own when its run re-estimated them, else the "
                             "run's bn_recalibration_batches)")


def check_format(args: argparse.Namespace) -> None:
    """Raises ArgumentError when the output suffix and the options do not go together."""
    suffix = args.out.suffix.lower()
    if suffix not in FORMATS:
        raise ArgumentError(f"{args.out}: unknown format {suffix or '(no suffix)'!r}; name the file .codeq or .onnx")
    if suffix != ".onnx" and (args.slim or args.check):
        raise ArgumentError("--slim and --check apply to ONNX exports; name the output file .onnx")


def run(args: argparse.Namespace) -> int:
    try:
        check_format(args)
        checkpoint = checkpoint_path(args.checkpoint)
        model, config, state = model_from_checkpoint(checkpoint)
        statistics = exported_statistics(model, config, state, args.bn_batches)
        if args.out.suffix.lower() == ".onnx":
            lines = export_checkpoint_onnx(model, config, args.out, slim=args.slim, check=args.check)
        else:
            export_model(model, config, checkpoint_classes(state, config["dataset"]), args.out)
            lines = size_lines(model, args.out, checkpoint)
        lines = [statistics, *lines] if statistics else lines
    except (ArgumentError, ConfigError, CheckpointError, ExportError) as error:
        return report_error(error, "export")
    except OSError as error:
        return report_error(cannot_write(error, args.out, "nothing was written; free space or write elsewhere"),
                            "export")
    print("\n".join(lines))
    return 0
