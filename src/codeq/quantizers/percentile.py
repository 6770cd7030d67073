"""The quantizers' robust range: the 99th percentile of |w| with linear interpolation, exactly as torch.quantile.

``robust_absmax(w, q)`` returns what ``torch.quantile(w.abs().flatten(), q, interpolation='linear')`` returns, bit
for bit: the same ranks (``quantile_ranks``: q rounded to the input's dtype, ``q * (n - 1)`` in double precision,
its floor and ceiling), the order statistics of |w| at those ranks, and torch's ``lerp`` between them. Unlike
torch.quantile it sorts nothing (a full sort is what made the percentile dominate QAT steps) and has no size limit
(torch releases before 2.x refused more than 2^24 elements).

The reference method is pure torch, ``order_statistics_by_topk``: a sorted ``topk`` of the largest ``n - lower``
magnitudes, whose last two are the pair. It needs no host synchronisation, so CUDA/MPS tensors and ``torch.compile``
tracing use it, and ``robust_absmaxes`` selects many tensors at once with it off the CPU: one ``topk`` over a matrix
holding the |w| of several layers, one row each, padded with -1 (``padded_topk_absmaxes``).

Eager CPU tensors take a private fast path instead, ``codeq.quantizers._percentile_kernels``: compiled numba
selection on the bit patterns of |w|, which the tests hold to the same bits as torch.quantile. It exists because a
CPU ``topk`` is slow where it matters, on the large layers: on 2 threads of a quiet machine (medians of 15 calls) it
took 95x a ``w.max()`` at 0.27 M elements, 130x at 1 M and 330x at 2.4 M, the kernels 2.3x, 2.0x and 3.3x
(``bench/absmax.py`` times both, the reference in its "topk" column; docs/benchmarks.md has the kernels' figures).
The fast path, and numba with it (the extra ``fast-cpu``; without it CPU tensors take the reference), is imported on
the first CPU call (``cpu_kernels``): numba's import and start-up (~0.55 s) would cost ``--dry-run``, configuration
errors and GPU runs for nothing.
"""
from __future__ import annotations

import functools
import math
import struct
from collections import defaultdict
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

# robust_absmaxes selects tensors of similar sizes together: rows are padded to the group's largest, and padding
# may at most double the elements of a group.
PADDING_LIMIT = 2


def robust_absmax(weight: Tensor, q: float = 0.99) -> Tensor:
    """q-quantile of |weight|, bit-identical to ``torch.quantile(weight.abs().flatten(), q)``.

    ``weight`` is a non-empty float tensor of any shape, size, layout and device (half precision is computed in
    float32, as torch.quantile needs it, and rounded back); ``q`` lies in [0, 1], else ValueError, as for an empty
    ``weight``. NaN anywhere gives NaN, as in torch.quantile. The result is a 0-dim tensor on ``weight``'s device,
    in its dtype, and carries no gradient.
    """
    values = selection_values(weight, q)
    kernels = cpu_kernels() if values.is_cpu and not torch.compiler.is_compiling() else None
    if kernels is not None:
        lower, upper, weight_frac = cached_quantile_ranks(values.numel(), q, values.dtype)
        fused = kernels.torch_lerp_is_fused(values.dtype)
        floats, _ = kernels.percentile_by_selection(flat_array(values), lower, upper, weight_frac, bool(fused))
        # 0-dim numpy views make 0-dim tensors faster than indexing or unbinding a tensor does.
        if fused is None:  # the kernel's lerp matched neither rounding of torch's here: call torch's
            result = torch.lerp(torch.from_numpy(floats[0, ...]), torch.from_numpy(floats[1, ...]), weight_frac)
        else:
            result = torch.from_numpy(floats[2, ...])
    else:  # detached: nothing records a graph (cheaper than no_grad)
        lower, upper, weight_frac = quantile_ranks(values.numel(), q, values.dtype)
        result = torch.lerp(*order_statistics_by_topk(flat_view(values.detach()), lower, upper), weight_frac)
    return result if result.dtype == weight.dtype else result.to(weight.dtype)


def selection_values(weight: Tensor, q: float) -> Tensor:
    """``weight`` in a dtype torch.quantile computes in (float32 for half precision), after checking the arguments."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if weight.numel() == 0:
        raise ValueError("robust_absmax of an empty tensor")
    return weight if weight.dtype in (torch.float32, torch.float64) else weight.detach().float()


def robust_absmaxes(weights: Sequence[Tensor], q: float = 0.99) -> list[Tensor]:
    """``[robust_absmax(weight, q) for weight in weights]``, bit for bit, in fewer kernels off the CPU.

    Tensors on one GPU (or other non-CPU device) with one dtype are selected together, in one ``topk``
    per group of similar sizes (``padded_topk_absmaxes``): on an H200, ResNet-20's 22 percentiles took
    134 us of GPU time that way against 940 us one ``topk`` each, and a copy per tensor plus a handful
    of kernels replace five kernels and a ``topk`` per tensor. On the CPU, and while torch.compile
    traces, each tensor is selected by itself (the CPU kernels take microseconds a call, less than a
    ``topk`` over a padded matrix would).
    """
    results: list[Tensor | None] = [None] * len(weights)
    together: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for index, weight in enumerate(weights):
        if selects_alone(weight):
            results[index] = robust_absmax(weight, q)
        else:
            together[weight.device, weight.dtype].append(index)
    for indices in together.values():
        for group in similar_sizes(indices, [weights[index].numel() for index in indices]):
            for index, result in zip(group, padded_topk_absmaxes([weights[index] for index in group], q)):
                results[index] = result
    return results


def selects_alone(weight: Tensor) -> bool:
    """Whether ``robust_absmaxes`` selects ``weight`` by itself rather than with others of its device and dtype."""
    return weight.is_cpu or torch.compiler.is_compiling()


def similar_sizes(items: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """``items`` grouped by their ``sizes``, largest first, so that padding every member of a group to its largest
    at most doubles the group's elements (PADDING_LIMIT)."""
    groups: list[list[int]] = []
    widths: list[int] = []
    totals: list[int] = []
    for size, item in sorted(zip(sizes, items), key=lambda pair: -pair[0]):
        if groups and (len(groups[-1]) + 1) * widths[-1] <= PADDING_LIMIT * (totals[-1] + size):
            groups[-1].append(item)
            totals[-1] += size
        else:
            groups.append([item])
            widths.append(size)
            totals.append(size)
    return groups


def padded_topk_absmaxes(weights: Sequence[Tensor], q: float) -> list[Tensor]:
    """robust_absmax of each of ``weights`` (one device, one dtype), by one sorted ``topk`` over a matrix whose rows
    hold their |w|, padded with -1 to the longest. The padding lies below every magnitude, so a row's topk starts
    with its tensor's own largest magnitudes in their order; a NaN, which topk orders above every number, comes
    first."""
    if len(weights) == 1:
        return [robust_absmax(weights[0], q)]
    values = [flat_view(selection_values(weight, q).detach()) for weight in weights]
    sizes = tuple(value.numel() for value in values)
    magnitudes = values[0].new_full((len(values), max(sizes)), -1.0)
    for row, value in enumerate(values):
        torch.abs(value, out=magnitudes[row, :value.numel()])
    kept, pair_columns, fractions = padded_ranks(sizes, q, magnitudes.dtype, magnitudes.device)
    largest = magnitudes.topk(kept, dim=1).values
    first = largest[:, :1]
    pairs = torch.where(first.isnan(), first, largest.gather(1, pair_columns))
    results = torch.lerp(pairs[:, 0], pairs[:, 1], fractions)
    return list(results.to(weights[0].dtype).unbind())


@functools.lru_cache(maxsize=256)
def padded_ranks(sizes: tuple[int, ...], q: float, dtype: torch.dtype,
                 device: torch.device) -> tuple[int, Tensor, Tensor]:
    """For ``padded_topk_absmaxes``: how many magnitudes each row's topk keeps, the columns of each row's lower and
    upper order statistic in it, and the interpolation weights, on ``device``. A model's layers ask the same every
    step: cached, the index tensors are copied to the device once."""
    ranks = [quantile_ranks(size, q, dtype) for size in sizes]
    # Ascending rank r of n magnitudes sits in column n - 1 - r of the descending topk.
    columns = [[size - 1 - lower, size - 1 - upper] for size, (lower, upper, _) in zip(sizes, ranks)]
    kept = max(size - lower for size, (lower, _, _) in zip(sizes, ranks))
    fractions = [fraction for _, _, fraction in ranks]
    return kept, torch.tensor(columns, device=device), torch.tensor(fractions, dtype=dtype, device=device)


def flat_view(tensor: Tensor) -> Tensor:
    """All elements as a 1-D tensor, without a copy for contiguous and channels-last tensors (order is irrelevant)."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).reshape(-1)
    return tensor.reshape(-1)


def quantile_ranks(n: int, q: float, dtype: torch.dtype) -> tuple[int, int, float]:
    """(lower rank, upper rank, interpolation weight), computed the way torch.quantile computes them.

    torch.quantile rounds q to the input's dtype, forms ``rank = q * (n - 1)`` in double precision,
    takes its floor and ceiling as the two ranks and interpolates with ``rank - lower`` rounded back
    to the input's dtype (checked bit for bit against torch.quantile by the tests). Plain Python, so
    torch.compile folds it into constants.
    """
    rank = to_dtype(q, dtype) * (n - 1)  # at most n - 1 for q in [0, 1], and so are both ranks
    lower = math.floor(rank)
    return lower, math.ceil(rank), to_dtype(rank - lower, dtype)


# A layer's ranks stay the same from step to step; on CPU looking them up saves ~0.7 us of the ~7 us a call on
# 1,000 elements takes. (Traced code calls quantile_ranks itself: torch.compile folds it into constants.)
cached_quantile_ranks = functools.lru_cache(maxsize=4096)(quantile_ranks)


def to_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to float32 (to nearest, ties to even) when ``dtype`` is float32; float64 keeps it."""
    # struct's functions rather than a compiled struct.Struct, whose methods torch.compile cannot trace.
    return struct.unpack("f", struct.pack("f", value))[0] if dtype == torch.float32 else value


def order_statistics_by_topk(values: Tensor, lower: int, upper: int) -> tuple[Tensor, Tensor]:
    """The ascending-rank ``lower`` and ``upper`` order statistics of |values| (NaN if any is NaN), on any device."""
    # One sorted topk (descending): on an H200 a second, 2-element topk for the pair cost more GPU time
    # than sorting the ~1 % kept. topk orders NaN above every number, so a NaN anywhere comes first.
    largest = values.abs().topk(values.numel() - lower).values
    low, high = largest[-1], largest[-1 - (upper - lower)]
    nan = largest[0].isnan()
    return torch.where(nan, largest[0], low), torch.where(nan, largest[0], high)


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """``codeq.quantizers._percentile_kernels``, imported (with numba) on the first call, or None where numba is not
    installed (extra ``fast-cpu``): the ``topk`` reference then serves CPU tensors too. Cached: a later call costs
    ~50 ns where an import statement costs ~0.3 us of the ~6 us a percentile of 1,000 elements takes."""
    try:
        import codeq.quantizers._percentile_kernels as kernels
    except ModuleNotFoundError as error:
        if error.name not in ("numba", "llvmlite"):
            raise
        return None
    return kernels


def flat_array(tensor: Tensor) -> np.ndarray:
    """The elements of a dense CPU tensor as a 1-D numpy view in memory order (contiguous, channels-last or
    transposed alike; a copy for other layouts), so that tensors with equal strides give views whose elements
    pair up. numpy(force=True) detaches, faster than a detach() call."""
    return tensor.numpy(force=True).ravel(order="K")
