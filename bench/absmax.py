"""The quantizers' robust absmax (exact 99th percentile of |w|) against a plain max, per call and per model.

    python bench/absmax.py [--device cpu|cuda] [--sizes 1e3,1e4,...] [--models resnet20,resnet18]
                           [--threads N] [--repeats 15] [--clock wall|cpu] [--reference-up-to 3e6] [--json PATH]

For each size a random normal tensor is reduced by ``robust_absmax`` and, interleaved with it,
by the two plain ranges it replaces: ``w.max()`` (one reduction) and ``w.abs().max()`` (the
absmax a uniform quantizer uses). Medians per call and the ratios to both are printed; the
previous implementation (two full ``kthvalue`` selections) is timed too up to
``--reference-up-to`` elements, in a loop of its own: its sort-sized traffic evicts the caches,
so between the compared calls it would time whichever one follows it on cold memory. On the CPU
the torch method that ``robust_absmax`` runs on GPUs (one sorted ``topk`` of the largest 1 %) is
timed the same way: the numba kernels replace it there, and the "topk" column says what they save.
Each repeat runs the compared methods in a new (seeded) random order, so each follows each other
equally often.

For each of ``--models`` the same is timed over the latent weights of all its quantized layers,
as a training step needs them: ``robust_absmaxes`` (all at once, as ``train`` selects them), one
``robust_absmax`` per layer, and one ``max`` per layer. On a GPU the first is one ``topk`` per
group of similar sizes instead of one per layer.

The last line is the worst ratio to ``max``.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
from collections.abc import Callable

import torch

from codeq.quantizers.percentile import order_statistics_by_topk, quantile_ranks, robust_absmax, robust_absmaxes
from common import (
    CLOCKS,
    MODELS,
    latent_weights,
    load_average,
    model_names,
    synchronizer,
    timed,
    write_results,
)

DEFAULT_SIZES = "1e3,1e4,36864,1e5,1e6,2359296,16777216,3.4e7"


def kthvalue_percentile(weight: torch.Tensor) -> torch.Tensor:
    """The previous implementation: two kthvalue selections over all of |w|."""
    magnitudes = weight.abs().flatten()
    lower, upper, frac = quantile_ranks(magnitudes.numel(), 0.99, magnitudes.dtype)
    return torch.lerp(magnitudes.kthvalue(lower + 1).values, magnitudes.kthvalue(upper + 1).values, frac)


def topk_percentile(weight: torch.Tensor) -> torch.Tensor:
    """robust_absmax by its torch method (one sorted topk), whatever the device: on the CPU, what the kernels save."""
    values = weight.flatten()
    lower, upper, frac = quantile_ranks(values.numel(), 0.99, values.dtype)
    return torch.lerp(*order_statistics_by_topk(values, lower, upper), frac)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated element counts")
    parser.add_argument("--models", type=model_names, default="resnet20,resnet18",
                        help=f"comma-separated from {', '.join(MODELS)}, or none")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved calls per method (more for small sizes)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--reference-up-to", type=float, default=3e6, help="largest size the kthvalue version runs on")
    parser.add_argument("--json", default="runs/bench/absmax.json")
    return parser.parse_args()


def interleaved_medians(methods: dict[str, Callable[[], object]], repeats: int, seed: int, clock: str,
                        sync: Callable[[], None] | None) -> dict[str, float]:
    """Median seconds per call of each method, timed ``repeats`` times each in a new seeded random order per repeat
    (after one untimed call each)."""
    times = {name: [] for name in methods}
    for method in methods.values():
        method()
    order, shuffle = list(methods.items()), random.Random(seed).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name, method in order:
            times[name].append(timed(method, clock, sync))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = synchronizer(device)
    results = {}
    for size in (int(float(text)) for text in args.sizes.split(",")):
        weight = torch.randn(size, generator=torch.Generator().manual_seed(size)).to(device)
        methods = {"robust_absmax": lambda: robust_absmax(weight), "max": lambda: weight.max(),
                   "abs_max": lambda: weight.abs().max()}
        repeats = args.repeats * max(1, int(20 / math.log10(size)) if size < 1e5 else 1)
        medians = interleaved_medians(methods, repeats, size, args.clock, sync)
        if size <= args.reference_up_to:
            references = {"kthvalue": lambda: kthvalue_percentile(weight)}
            if device.type == "cpu":  # elsewhere robust_absmax is the topk method
                references["topk"] = lambda: topk_percentile(weight)
            for name, method in references.items():
                # Each on its own: between the compared calls its sort-sized traffic would evict their data and code.
                medians[name] = interleaved_medians({name: method}, args.repeats, size, args.clock, sync)[name]
        results[size] = {"median_s": medians, "vs_max": medians["robust_absmax"] / medians["max"],
                         "vs_abs_max": medians["robust_absmax"] / medians["abs_max"], "repeats": repeats}
    models = {}
    for name in args.models:
        spec = MODELS[name]
        weights = [weight.detach() for weight in latent_weights(spec.quantize(spec.build().to(device)))]
        methods = {"together": lambda: robust_absmaxes(weights),
                   "per_layer": lambda: [robust_absmax(w) for w in weights], "max": lambda: [w.max() for w in weights]}
        medians = interleaved_medians(methods, args.repeats * 4, len(weights), args.clock, sync)
        models[name] = {"layers": len(weights), "elements": sum(w.numel() for w in weights), "median_s": medians,
                        "vs_max": medians["together"] / medians["max"]}
    load = load_average()
    path = write_results(args.json, {"args": vars(args), "load_after": load, "torch": torch.__version__,
                                     "device": str(device), "results": results, "models": models})

    print(f"device {device} | {args.threads} threads | {args.clock} clock | torch {torch.__version__}"
          + (f" | load average {load[0]:.1f}" if load else ""))
    print(f"{'elements':>11} {'robust ms':>10} {'max ms':>8} {'|w|.max ms':>10} {'kthvalue ms':>11} {'topk ms':>9} "
          f"{'/max':>6} {'/|w|.max':>8}")
    for size, result in results.items():
        medians = result["median_s"]
        references = " ".join(f"{medians[name] * 1e3:>{width}.3f}" if name in medians else f"{'-':>{width}}"
                              for name, width in (("kthvalue", 11), ("topk", 9)))
        print(f"{size:>11,} {medians['robust_absmax'] * 1e3:>10.3f} {medians['max'] * 1e3:>8.3f} "
              f"{medians['abs_max'] * 1e3:>10.3f} {references} {result['vs_max']:>6.1f} {result['vs_abs_max']:>8.1f}")
    if models:
        print(f"{'model':>11} {'layers':>6} {'together ms':>11} {'per layer ms':>12} {'max ms':>8} {'/max':>6}")
    for name, result in models.items():
        medians = result["median_s"]
        print(f"{name:>11} {result['layers']:>6} {medians['together'] * 1e3:>11.3f} "
              f"{medians['per_layer'] * 1e3:>12.3f} {medians['max'] * 1e3:>8.3f} {result['vs_max']:>6.1f}")
    ratios = [(result["vs_max"], f"{size:,} elements") for size, result in results.items()]
    ratios += [(result["vs_max"], f"{name}'s {result['layers']} layers") for name, result in models.items()]
    worst = max(ratios)
    print(f"results: {path}")
    print(f"worst robust_absmax / max ratio: {worst[0]:.1f} ({worst[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
