"""The quantizers' robust range: the 99th percentile of |w| with linear interpolation, exact and fast.

``robust_absmax`` returns exactly what ``torch.quantile(|w|, q, interpolation='linear')`` returns:
the same ranks, computed with the same floating-point arithmetic, and the same ``lerp``. Unlike
``torch.quantile`` it sorts nothing (a full sort is what made the percentile dominate QAT steps)
and has no size limit (torch releases before 2.x refused more than 2^24 elements).

Two exact selection methods find the two order statistics the interpolation needs:

* ``order_statistics_by_topk``: ``topk`` of the largest ``n - lower`` magnitudes, then the two
  smallest of those. Pure torch and free of host synchronisation, so CUDA/MPS tensors and
  ``torch.compile`` tracing use it; it is also the CPU method's fallback.
* ``order_statistics_by_threshold`` (CPU, numpy): Floyd-Rivest selection. A strided sample
  gives bounds ``low <= wanted magnitudes <= high`` that hold with overwhelming probability; one
  pass keeps the band ``[low, high]`` (~1 % of the set) and counts what lies above it, the counts
  check the bounds, and the band is narrowed the same way until it is small enough to partition.
  Above 2^17 elements |w| is never materialised: in cache-sized chunks viewed as ``[8, chunk/8]``,
  column maxima and minima pick the few columns that can hold a magnitude ``>= low`` and only
  those are gathered. When the first check fails (an unlucky or adversarial sample) the topk
  method runs instead, so the result never depends on the sample.
"""
from __future__ import annotations

import functools
import math
import struct

import numpy as np
import torch
from torch import Tensor

# Sets up to this size are partitioned directly (numpy's introselect, ~5 ns per element).
DIRECT_SELECTION_SIZE = 1 << 11
# Below this size |w| is materialised and narrowed directly; above, the column method avoids that.
COLUMN_METHOD_MIN_SIZE = 1 << 17
# Samples hold about 1/32 of a set, at most this many elements.
SAMPLE_SIZE = 1 << 13
# Bounds sit this many binomial standard deviations beyond the rank a sample element is expected at.
SAMPLE_MARGIN_SIGMAS = 5.0
COLUMNS = 8
CHUNK_SIZE = 1 << 20


def robust_absmax(weight: Tensor, q: float = 0.99) -> Tensor:
    """q-quantile of |weight|, bit-identical to ``torch.quantile(weight.abs().flatten(), q)``.

    Works for any size; NaN anywhere gives NaN, as in torch.quantile. The result is a 0-dim tensor on
    ``weight``'s device, in its dtype, and carries no gradient.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    values = flat_view(weight.detach())  # detached: nothing below records a graph (cheaper than no_grad)
    if values.numel() == 0:
        raise ValueError("robust_absmax of an empty tensor")
    result_dtype = values.dtype
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()  # torch.quantile's own dtypes; half precision is computed in float32
    lower, upper, weight_frac = quantile_ranks(values.numel(), q, values.dtype)
    pair = order_statistics_by_threshold(values, lower, upper) if uses_threshold_method(values) else None
    low, high = pair or order_statistics_by_topk(values, lower, upper)
    result = torch.lerp(low, high, weight_frac)
    return result if result.dtype == result_dtype else result.to(result_dtype)


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
    rank = to_dtype(q, dtype) * (n - 1)
    lower = min(math.floor(rank), n - 1)
    upper = min(math.ceil(rank), n - 1)
    return lower, upper, to_dtype(rank - lower, dtype)


def to_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to float32 (to nearest, ties to even) when ``dtype`` is float32; float64 keeps it."""
    return struct.unpack("f", struct.pack("f", value))[0] if dtype == torch.float32 else value


def uses_threshold_method(values: Tensor) -> bool:
    return values.device.type == "cpu" and not torch.compiler.is_compiling()


def order_statistics_by_topk(values: Tensor, lower: int, upper: int) -> tuple[Tensor, Tensor]:
    """The ascending-rank ``lower`` and ``upper`` order statistics of |values| (NaN if any is NaN)."""
    magnitudes = values.abs()
    # topk orders NaN above every number, so a NaN anywhere lands among the largest.
    largest = magnitudes.topk(values.numel() - lower, sorted=False).values
    pair = largest.topk(min(2, largest.numel()), largest=False, sorted=True).values
    pair = torch.where(largest.isnan().any(), torch.nan, pair)
    return pair[0], pair[upper - lower]


def order_statistics_by_threshold(values: Tensor, lower: int, upper: int) -> tuple[Tensor, Tensor] | None:
    """Same result as ``order_statistics_by_topk`` for CPU tensors; None when the sampled bounds fail their check."""
    n = values.numel()
    needed, spread = n - lower, upper - lower  # the needed-th and (needed - spread)-th largest magnitudes
    array = values.numpy()
    if n <= COLUMN_METHOD_MIN_SIZE:
        magnitudes = np.abs(array)
        if math.isnan(magnitudes.max()):
            return nan_pair(values.dtype)
        return pair_of(select_largest(magnitudes, needed, spread))
    bounds = sampled_bounds(np.abs(array[:: sample_stride(n)]), n, needed, spread)
    if bounds is None:
        return None
    low_bound, high_bound = bounds
    above, bands = 0, []
    # Chunks keep each piece in cache between the column reductions and the gather that follow.
    for start in range(0, n, CHUNK_SIZE):
        chunk = values[start: start + CHUNK_SIZE]
        width = chunk.numel() // COLUMNS
        columns = chunk[: width * COLUMNS].view(COLUMNS, width)
        column_max, column_min = columns.amax(0).numpy(), columns.amin(0).numpy()
        tail = chunk[width * COLUMNS:].numpy()
        if math.isnan(column_max.max(initial=-math.inf)) or np.isnan(tail).any():
            return nan_pair(values.dtype)
        # Only columns holding a magnitude >= low_bound can hold one of the needed largest.
        hits = torch.from_numpy(np.flatnonzero((column_max >= low_bound) | (column_min <= -low_bound)))
        gathered = columns.index_select(1, hits).numpy().ravel()
        magnitudes = np.abs(np.concatenate([gathered, tail]) if tail.size else gathered)
        chunk_above, chunk_band = split_at_bounds(magnitudes, low_bound, high_bound)
        above += chunk_above
        bands.append(chunk_band)
    band = np.concatenate(bands)
    if not brackets(above, band.size, needed, spread):
        return None
    return pair_of(select_largest(band, needed - above, spread))


def split_at_bounds(magnitudes: np.ndarray, low_bound: float, high_bound: float) -> tuple[int, np.ndarray]:
    """(how many lie above high_bound, those in [low_bound, high_bound]); one pass over the full set."""
    candidates = take_where(magnitudes, magnitudes >= low_bound)
    band = take_where(candidates, candidates <= high_bound)
    return candidates.size - band.size, band


def take_where(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values[mask]``; indices and a take are ~3x faster than numpy's boolean indexing here."""
    return values.take(np.flatnonzero(mask))


def brackets(above: int, band_size: int, needed: int, spread: int) -> bool:
    """Whether the needed-th and (needed - spread)-th largest both lie in the band."""
    return above <= needed - spread - 1 and above + band_size >= needed


def select_largest(magnitudes: np.ndarray, needed: int, spread: int) -> np.ndarray:
    """The needed-th and (needed - spread)-th largest of ``magnitudes``, as an ascending pair.

    Floyd-Rivest style: bounds from a sample of the set bracket both ranks, what lies above the
    bracket is only counted, and the bracket's contents, checked to hold both ranks, become the set.
    """
    while magnitudes.size > DIRECT_SELECTION_SIZE:
        bounds = sampled_bounds(magnitudes[:: sample_stride(magnitudes.size)], magnitudes.size, needed, spread)
        if bounds is None:
            break
        above, band = split_at_bounds(magnitudes, *bounds)
        # An unlucky sample, or ties that keep the band from shrinking: select from the set as it stands.
        if not brackets(above, band.size, needed, spread) or band.size > magnitudes.size // 2:
            break
        magnitudes, needed = band, needed - above
    return partition_pair(magnitudes, magnitudes.size - needed, spread)


def partition_pair(magnitudes: np.ndarray, index: int, spread: int) -> np.ndarray:
    """The ascending-rank ``index`` and ``index + spread`` elements (NaN-free input)."""
    return np.partition(magnitudes, (index, index + spread))[[index, index + spread]]


def pair_of(selected: np.ndarray) -> tuple[Tensor, Tensor]:
    low, high = torch.from_numpy(selected).unbind()
    return low, high


def nan_pair(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    nan = torch.tensor(math.nan, dtype=dtype)
    return nan, nan


def sampled_bounds(sample: np.ndarray, size: int, needed: int, spread: int) -> tuple[float, float] | None:
    """Magnitudes bracketing the needed-th and (needed - spread)-th largest of a set of ``size``, from a
    sample of its magnitudes: correct with probability ~1 - 1e-6 per bound, checked by the caller."""
    expected = needed * sample.size / size
    margin = SAMPLE_MARGIN_SIGMAS * math.sqrt(expected * (1 - expected / sample.size) + 1) + 1
    low_rank = max(1, math.ceil(expected + margin))  # ranks from the top of the sample
    high_rank = min(sample.size, math.floor(expected - spread - margin))
    if low_rank > sample.size:
        return None
    positions = [sample.size - low_rank] + ([sample.size - high_rank] if high_rank >= 1 else [])
    chosen = np.partition(sample, positions)[positions]
    if np.isnan(chosen).any():
        return None
    return float(chosen[0]), float(chosen[1]) if len(chosen) > 1 else math.inf


@functools.lru_cache(maxsize=4096)
def sample_stride(n: int) -> int:
    """About n / min(SAMPLE_SIZE, n / 32), coprime with 2, 3, 5 and 7 so that the sample does not lock
    onto a kernel position or channel pattern of the weight layout."""
    stride = max(1, n // min(SAMPLE_SIZE, max(n // 32, 1)))
    while math.gcd(stride, 210) != 1:
        stride += 1
    return stride
