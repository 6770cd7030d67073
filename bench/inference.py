"""Measured inference: file size and onnxruntime CPU latency of FP32 ONNX, CoDeQ ONNX and slimmed CoDeQ ONNX.

    python bench/inference.py RUN [RUN ...] [--threads N] [--repeats 30] [--batches 1,64] [--out-dir DIR]
                              [--json PATH]

For each run (a run directory or a checkpoint) three files are written to --out-dir: the FP32 model (its latent
weights, no quantization), the CoDeQ export (``codeq export CKPT OUT.onnx``) and the slimmed CoDeQ export
(``--slim``). Each runs in onnxruntime CPU sessions with --threads intra-op threads and onnxruntime's default graph
optimisations; the CoDeQ files twice: as onnxruntime loads them by default (weights decoded at every run) and with
their weights decoded once at load (``session.disable_quant_qdq``, ``codeq.export.onnx.session``). Per batch size,
every repeat times one run of each session, in a new seeded random order, on the same random batch; the table
shows the median of the repeats and its ratio to FP32's. The last line printed is the slimmed CoDeQ (decoded at
load) / FP32 latency at the largest batch, for each run.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
from pathlib import Path

import onnxruntime as ort
import torch

from codeq.app.checkpoint import checkpoint_path
from codeq.app.report import example_input, model_from_checkpoint
from codeq.compression import count_macs
from codeq.export.grids import plain_model
from codeq.export.onnx import export_onnx, run_session, serialized, session, to_onnx
from codeq.io import atomic_write
from common import cpu_name, load_average, timed, write_results

FILES = ("FP32", "CoDeQ", "CoDeQ slim")
# What is timed: (label, file, weights decoded at load).
VARIANTS = (("FP32", "FP32", False), ("CoDeQ", "CoDeQ", False), ("CoDeQ, decoded at load", "CoDeQ", True),
            ("CoDeQ slim", "CoDeQ slim", False), ("CoDeQ slim, decoded at load", "CoDeQ slim", True))
SLIM_AT_LOAD = VARIANTS[-1][0]
WARMUP_RUNS = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (their last.pt) or checkpoints")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench/onnx"), help="where the ONNX files go")
    parser.add_argument("--json", default="runs/bench/inference.json", help="results file")
    return parser.parse_args()


def write_files(run: Path, out_dir: Path) -> dict[str, dict]:
    """The three ONNX files of one run, and per file its size, parameters and MACs per sample."""
    checkpoint = checkpoint_path(run)
    model, config, _ = model_from_checkpoint(checkpoint)
    model.eval()
    example = example_input(config)
    name = checkpoint.parent.name
    fp32_model = plain_model(model, quantized=False)
    graph = to_onnx(fp32_model, example)
    paths = {file: out_dir / f"{name}_{file.lower().replace(' ', '_')}.onnx" for file in FILES}
    atomic_write(paths["FP32"], serialized(graph))
    dense = {"parameters": sum(p.numel() for p in fp32_model.parameters()),
             "macs": sum(count_macs(fp32_model, example).values())}
    export_onnx(model, example, paths["CoDeQ"], graph=graph)
    slim = export_onnx(model, example, paths["CoDeQ slim"], slim=True, graph=graph).slim
    slim_counts = {"parameters": slim.parameters[1], "macs": slim.macs[1], "null_channels": slim.null_channels,
                   "removed": slim.removed, "kept": slim.kept}
    files = {file: {"path": str(path), "bytes": path.stat().st_size, "input_shape": list(example.shape),
                    **(slim_counts if file == "CoDeQ slim" else dense)} for file, path in paths.items()}
    return {label: {**files[file], "decode_at_load": at_load} for label, file, at_load in VARIANTS}


def time_variants(variants: dict[str, dict], batch: int, repeats: int, threads: int,
                  seed: int) -> dict[str, list[float]]:
    """Seconds per run of each session on one random batch, ``repeats`` times each, interleaved in random orders."""
    shape = variants["FP32"]["input_shape"]
    inputs = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))
    runners = {label: session(Path(entry["path"]).read_bytes(), threads, entry["decode_at_load"])
               for label, entry in variants.items()}
    for runner in runners.values():
        for _ in range(WARMUP_RUNS):
            run_session(runner, inputs)
    order = random.Random(seed)
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(repeats):
        labels = list(variants)
        order.shuffle(labels)
        for label in labels:
            seconds[label].append(timed(lambda: run_session(runners[label], inputs), "wall"))
    return seconds


def table(results: dict[str, dict], batches: list[int]) -> str:
    header = ["run", "ONNX file, session", "size (B)", "vs FP32", "params", "MACs/sample"]
    for batch in batches:
        header += [f"batch {batch} (ms)", "vs FP32"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for run, variants in results.items():
        base = variants["FP32"]
        for label, entry in variants.items():
            cells = [run, label, f"{entry['bytes']:,}", f"{entry['bytes'] / base['bytes']:.3f}",
                     f"{entry['parameters']:,}", f"{entry['macs']:,}"]
            for batch in batches:
                median = entry["median_s"][str(batch)]
                cells += [f"{1e3 * median:.3f}", f"{median / base['median_s'][str(batch)]:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    batches = [int(value) for value in args.batches.split(",")]
    results: dict[str, dict] = {}
    for index, run in enumerate(args.runs):
        variants = write_files(run, args.out_dir)
        for batch in batches:
            seconds = time_variants(variants, batch, args.repeats, args.threads, seed=index * 1000 + batch)
            for label, values in seconds.items():
                variants[label].setdefault("seconds", {})[str(batch)] = values
                variants[label].setdefault("median_s", {})[str(batch)] = statistics.median(values)
        results[checkpoint_path(run).parent.name] = variants
    machine = (f"{cpu_name()}, {os.cpu_count()} cores ({platform.machine()}), onnxruntime {ort.__version__} "
               f"CPUExecutionProvider, {args.threads} intra-op threads, median of {args.repeats} repeats")
    print(machine)
    print(table(results, batches))
    write_results(args.json, {"machine": machine, "threads": args.threads, "repeats": args.repeats,
                              "batches": batches, "load_average": load_average(), "runs": results})
    largest = str(max(batches))
    print("slimmed CoDeQ (decoded at load) / FP32 latency at batch " + largest + ": " + ", ".join(
        f"{variants[SLIM_AT_LOAD]['median_s'][largest] / variants['FP32']['median_s'][largest]:.3f} ({run})"
        for run, variants in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
