"""What QAT costs over FP32: training step and validation batch, measured side by side.

    python bench/step_overhead.py [--device cpu|cuda] [--models resnet20,resnet18,vit] [--threads N]
                                  [--bits learnable,fixed] [--reference] [--repeats 30] [--train-steps 1]
                                  [--val-batches 10] [--control] [--amp bf16] [--channels-last]
                                  [--compile [--compile-mode MODE]] [--clock wall|cpu] [--json PATH]

For each model an FP32 network and copies with CoDeQ dead-zone quantizers (4 bits with a learnable
dead zone; the bit-width learnable from 4 bits and/or fixed at 4: ``--bits``; norm layers FP32) run
the project's own ``train`` and ``validate`` on the same random batches held on the device, each
with its optimizer as a run builds it (AdamW over ``codeq.param_groups``, fused where torch can).
Each repeat times every variant once (``--train-steps`` training steps, then a validation pass of
``--val-batches`` batches, which computes the quantized weights once), in a new seeded random order,
so slow drifts and whatever the previous variant left in caches hit all of them alike. Each repeat
gives a paired ratio QAT/FP32; the table shows the median ratio with a bootstrap 95 % confidence
interval. Many short repeats beat few long ones here: single steps on a shared machine scatter by
+-10 %. ``--control`` adds a second, identical FP32 network, whose ratio to the first shows what the
noise alone makes of two equal costs. BatchNorm re-estimation (``codeq.recalibrate_bn``, 5 batches,
a step of its own before each validation of a run) is timed beside them and shown in FP32 training
steps. ``--reference`` adds each QAT variant once more with the quantizer's plain ``forward`` layer by
layer instead of its fast path (``quantize_together``): what the fast path gains, measured side by side.
The last line printed is the worst median ratio of the variants that runs use (the plain ones left out).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from codeq.attach import quantized_layers, weights_quantized_once
from codeq.bn import recalibrate_bn
from codeq.optim import fused_option, group_of, param_groups
from codeq.training.loop import train, validate
from codeq.training.memory import keep_freed_memory
from codeq.training.step_settings import StepSettings
from common import (
    CLOCKS,
    MODELS,
    QAT_SETTINGS,
    BenchModel,
    load_average,
    model_names,
    synchronizer,
    timed,
    write_results,
)

# BatchNorm re-estimation takes this many training batches, as runs do by default.
RECALIBRATION_BATCHES = 5


def bit_settings(text: str) -> list[str]:
    """``--bits``: comma-separated keys of QAT_SETTINGS (an argparse type)."""
    names = text.split(",")
    unknown = [name for name in names if name not in QAT_SETTINGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown --bits {unknown[0]!r}: choose from {', '.join(QAT_SETTINGS)}")
    return names


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", type=model_names, default="resnet20,resnet18",
                        help=f"comma-separated from {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--bits", type=bit_settings, default="learnable,fixed",
                        help=f"QAT variants, comma-separated from {', '.join(QAT_SETTINGS)}")
    parser.add_argument("--reference", action="store_true",
                        help="also time each QAT variant with the quantizer's plain forward (no fast path)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=1, help="training steps per variant and repeat")
    parser.add_argument("--val-batches", type=int, default=10, help="batches per validation pass")
    parser.add_argument("--control", action="store_true", help="time an identical FP32 copy too (the noise floor)")
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype (config key amp)")
    parser.add_argument("--channels-last", action="store_true", help="config key channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (config key use_compile)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. reduce-overhead (CUDA graphs) or max-autotune")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: process CPU time, steadier when other jobs share the cores")
    parser.add_argument("--json", default="runs/bench/step_overhead.json", help="where the results are written")
    return parser.parse_args()


class Variant:
    """One model (FP32 or QAT) with its optimizer, ready to train and validate on fixed batches."""

    def __init__(self, model: nn.Module, settings: StepSettings, compile_model: bool, mode: str | None) -> None:
        self.model = settings.prepare_model(model)
        self.forward_model = torch.compile(model, mode=mode) if compile_model else model
        # As a run builds it (build_optimizer): base, dz and bit groups, fused where torch has the kernel; a group
        # is asked for only where the model trains its logits (param_groups warns about an unused one).
        trained = {group_of(name) for name, parameter in model.named_parameters() if parameter.requires_grad}
        dz = {"lr": 1e-4, "weight_decay": 5.0} if "dz" in trained else None
        bit = {"lr": 1e-4} if "bit" in trained else None
        groups = param_groups(model, base={"lr": 1e-4}, dz=dz, bit=bit)
        self.optimizer = torch.optim.AdamW(groups, **fused_option(torch.optim.AdamW, model))
        self.settings = settings
        self.criterion = nn.CrossEntropyLoss()

    def train(self, batches: list) -> None:
        train(batches, self.forward_model, self.criterion, self.optimizer, 1, self.settings.device,
              log_interval=10**9, step_settings=self.settings)

    def validate(self, batches: list) -> None:
        validate(batches, self.forward_model, self.criterion, self.settings.device, log_interval=10**9,
                 step_settings=self.settings)


def random_batches(count: int, spec: BenchModel, device: torch.device) -> list:
    generator = torch.Generator().manual_seed(count)
    return [(torch.randn(spec.batch_size, 3, spec.img_size, spec.img_size, generator=generator).to(device),
             torch.randint(0, 10, (spec.batch_size,), generator=generator).to(device)) for _ in range(count)]


class QuantizerPass:
    """Every quantizer of a model on its own, all at once as an eager ``train`` and ``validate`` run
    them (``weights_quantized_once``): forward and backward as in a training step (with a fixed
    random upstream gradient), or forward only as once per validation pass. Timing it next to the
    steps gives the quantizers' own share, which machine noise blurs less than a ratio."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [module for _, module, _ in quantized_layers(model)]
        generator = torch.Generator().manual_seed(1)
        self.upstream = [torch.randn(module.weight.shape, generator=generator).to(module.weight.device)
                         for module in self.modules]
        self.model = model

    def train(self) -> None:
        # The model's gradients may still be the compiled step's (CUDA-graph outputs, under reduce-overhead).
        self.model.zero_grad(set_to_none=True)
        with weights_quantized_once(self.model):  # as train quantizes them: all at once
            weights = [module.weight for module in self.modules]
        torch.autograd.backward(weights, self.upstream)
        self.model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def validate(self) -> None:
        with weights_quantized_once(self.model):
            pass


def median_with_interval(values: list[float], seed: int, resamples: int = 2000) -> tuple[float, float, float]:
    """(median, low, high): the median and its bootstrap 95 % confidence interval."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), medians[int(0.025 * resamples)], medians[int(0.975 * resamples)]


def qat_variants(args: argparse.Namespace) -> dict[str, tuple[str, bool]]:
    """The QAT variants timed: key -> (bit-width setting, plain forward instead of the fast path)."""
    variants = {f"qat_{bits}": (bits, False) for bits in args.bits}
    if args.reference:
        variants |= {f"qat_{bits}_plain": (bits, True) for bits in args.bits}
    return variants


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    spec = MODELS[name]
    torch.manual_seed(0)
    fp32_model = spec.build().to(device)
    models = {"fp32": fp32_model}
    if args.control:
        models["fp32_copy"] = copy.deepcopy(fp32_model)
    qat = list(qat_variants(args))
    for key, (bits, reference) in qat_variants(args).items():
        models[key] = spec.quantize(copy.deepcopy(fp32_model), bits, reference)
    settings = StepSettings(device, args.amp, args.channels_last)
    variants = {key: Variant(model, settings, args.compile, args.compile_mode) for key, model in models.items()}
    train_batches = random_batches(args.train_steps, spec, device)
    val_batches = random_batches(args.val_batches, spec, device)
    for variant in variants.values():  # kernels, allocator and compilation warm up
        variant.train(train_batches[:1])
        variant.validate(val_batches[:2])
    quantizers = {key: QuantizerPass(models[key]) for key in qat}
    recalibration_batches = random_batches(RECALIBRATION_BATCHES, spec, device)
    phases = {"train": (lambda key: variants[key].train(train_batches), args.train_steps),
              "val": (lambda key: variants[key].validate(val_batches), args.val_batches)}
    times = {phase: {key: [] for key in variants} for phase in phases}
    alone = {phase: {key: [] for key in qat} for phase in phases}
    recalibration = {key: [] for key in qat}
    order = list(variants)
    rng = random.Random(0)
    sync = synchronizer(device)
    for _ in range(args.repeats):
        rng.shuffle(order)
        for phase, (run, units) in phases.items():
            for key in order:
                times[phase][key].append(timed(lambda: run(key), args.clock, sync) / units)
        for key in qat:
            alone["train"][key].append(timed(quantizers[key].train, args.clock, sync))
            alone["val"][key].append(timed(quantizers[key].validate, args.clock, sync) / args.val_batches)
            recalibration[key].append(timed(lambda: recalibrate_bn(models[key], recalibration_batches,  # noqa: B023
                                                                   RECALIBRATION_BATCHES), args.clock, sync))
    quantized_weights = sum(p.numel() for n, p in models[qat[0]].named_parameters() if n.endswith("original"))
    result = {"batch_size": spec.batch_size, "img_size": spec.img_size, "quantized_weights": quantized_weights,
              "recalibration_batches": RECALIBRATION_BATCHES}
    for phase, by_variant in times.items():
        fp32 = by_variant["fp32"]
        entry = result[phase] = {f"{key}_s": values for key, values in by_variant.items()}
        entry |= {f"{key}_median_s": statistics.median(values) for key, values in by_variant.items()}
        for key in [key for key in by_variant if key != "fp32"]:
            ratios = [other / base for other, base in zip(by_variant[key], fp32)]
            entry[f"{key}_ratios"] = ratios
            entry[f"{key}_ratio"], entry[f"{key}_ratio_low"], entry[f"{key}_ratio_high"] = \
                median_with_interval(ratios, seed=len(ratios))
        for key in qat:
            entry[f"{key}_quantizer_share"] = statistics.median(q / f for q, f in zip(alone[phase][key], fp32))
    for key in qat:
        result[f"{key}_recalibration_s"] = recalibration[key]
        result[f"{key}_recalibration_median_s"] = statistics.median(recalibration[key])
        result[f"{key}_recalibration_train_steps"] = statistics.median(
            r / f for r, f in zip(recalibration[key], times["train"]["fp32"]))
    return result


def machine(device: torch.device, threads: int) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {"machine": machine(device, args.threads), "args": vars(args), "load_before": load_average(),
              "keeps_freed_memory": keep_freed_memory(),  # as run_training does
              "models": {}}
    for name in args.models:
        report["models"][name] = measure(name, args, device)
    report["load_after"] = load_average()
    path = write_results(args.json, report)

    load = (f" | load average {report['load_before'][0]:.1f} -> {report['load_after'][0]:.1f}"
            if report["load_before"] else "")
    print(f"{report['machine']['cpu']} | {args.threads} threads | device {device} | torch {torch.__version__} | "
          f"amp {args.amp} | channels_last {args.channels_last} | compile {args.compile} "
          f"{args.compile_mode or ''}| {args.clock} clock{load}")
    control = " | FP32 copy/FP32 (noise)" if args.control else ""
    print(f"{'model':<9} {'batch':>5} {'phase':<5} {'QAT bits':<16} {'FP32 ms':>9} {'QAT ms':>9} {'QAT/FP32':>8} "
          f"{'95% CI':>13} {'quantizers alone':>16}{control}")
    worst = (0.0, "")
    for name, result in report["models"].items():
        for phase in ("train", "val"):
            entry = result[phase]
            for key, (bits, plain) in qat_variants(args).items():
                label = f"{bits}{', plain' if plain else ''}"
                line = (f"{name:<9} {result['batch_size']:>5} {phase:<5} {label:<16} "
                        f"{entry['fp32_median_s'] * 1e3:>9.1f} "
                        f"{entry[f'{key}_median_s'] * 1e3:>9.1f} {entry[f'{key}_ratio']:>8.3f} "
                        f"{entry[f'{key}_ratio_low']:>6.3f}-{entry[f'{key}_ratio_high']:.3f} "
                        f"{entry[f'{key}_quantizer_share']:>15.1%}")
                if args.control:
                    line += (f" | {entry['fp32_copy_ratio']:.3f} "
                             f"({entry['fp32_copy_ratio_low']:.3f}-{entry['fp32_copy_ratio_high']:.3f})")
                print(line)
                if not plain:  # the worst of what runs: the plain forward is only the yardstick
                    worst = max(worst, (entry[f"{key}_ratio"], f"{name} {phase} {bits} bits"))
        for bits in args.bits:
            key = f"qat_{bits}"
            print(f"{name:<9} BatchNorm re-estimation ({bits} bits, {result['recalibration_batches']} batches): "
                  f"{result[f'{key}_recalibration_median_s'] * 1e3:.1f} ms = "
                  f"{result[f'{key}_recalibration_train_steps']:.2f} FP32 training steps")
    print(f"results: {path}")
    print(f"worst QAT/FP32 ratio: {worst[0]:.3f} ({worst[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
