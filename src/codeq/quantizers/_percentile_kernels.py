"""The CPU fast path of ``codeq.quantizers.percentile``: numba kernels that find the two order statistics of |w| a
quantile interpolates between, and interpolate them as torch.lerp does. Private: ``codeq.quantizers.percentile``
imports it on its first CPU call, because importing numba (~0.15 s) and starting it (~0.4 s) would cost ``--dry-run``,
configuration errors and GPU runs for nothing. Needs the extra ``fast-cpu`` (numba).

The kernels work on integer keys: a float's bit pattern with the sign bit masked off, read as an integer, orders
exactly as |x| does (NaNs get the keys above that of +inf), and integer compares vectorise where float ones would
not. Up to ``DIRECT_SELECTION_SIZE`` elements the keys are copied and quickselected. Larger sets are first narrowed,
Floyd-Rivest style: a strided sample gives keys ``low <= wanted keys <= high`` that hold with overwhelming
probability; one pass compares the keys with ``low`` in blocks of ``BLOCK`` (vectorised compares whose 64-bit masks
name the few keys to look at), counts those above ``high`` and keeps the band ``[low, high]`` (1-2 % of the set);
the counts check the bounds, and the band is narrowed the same way until it is small enough to select in. When a
check fails (an unlucky or adversarial sample, ties that fill the band) the kernel selects among the elements it
has, so the result never depends on the sample, only the time.

The kernel interpolates with its copy of torch's lerp formula, which spares the ~3 us of three tensor operations;
whether torch rounds its multiply-add once (an FMA) or twice depends on how it was built for the CPU, so
``torch_lerp_is_fused`` asks torch.lerp on probe inputs first, and where neither rounding fits, the caller
interpolates with torch.lerp itself.

Every kernel is a numba dispatcher from the moment this module is imported (``compiled``); each compiles on its
first call with new argument types, and kernels call one another through this module's globals, which numba reads
when it compiles the caller. ``cache=True`` keeps the machine code in ``__pycache__`` (or numba's per-user cache
directory), so later processes load it in ~10 ms per dtype instead of compiling it for ~5 s.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numba
import numpy as np
import torch
from numba.cpython.unsafe.numbers import trailing_zeros as lowest_set_bit
from numba.extending import intrinsic

# Sets up to this size are quickselected directly (~3 ns per element); larger ones are narrowed by samples first.
DIRECT_SELECTION_SIZE = 1 << 10
# Samples hold about 1/32 of a set, at most this many elements.
SAMPLE_SIZE = 1 << 12
# Bounds sit this many binomial standard deviations beyond the rank a sample element is expected at.
SAMPLE_MARGIN_SIGMAS = 5.0
# Quickselect takes its pivot from a sorted sample of this many keys in ranges of 16 times as many.
PIVOT_SAMPLE = 16
# The bracketing pass compares keys in blocks of this many, one bit each in 64-bit masks.
BLOCK = 256
# lerp inputs on which rounding its multiply-add once (an FMA) and twice give different results, in both of its
# branches (weight < 0.5 and >= 0.5) and in float32 and float64 (a test checks this): torch.lerp's results on
# them tell which rounding this machine's torch build does.
LERP_PROBES = ((1.0, 7.1, 0.3), (1.0, 5.9, 0.3), (1.0, 7.1, 0.6), (1.0, 5.9, 0.7))
# Per float dtype: the mask that clears the sign bit of its bit pattern (as a signed integer of the same
# width) and the key of +inf; keys above it are NaNs.
KEY_MASKS = {
    np.dtype(np.float32): (np.int32(0x7FFF_FFFF), np.int32(0x7F80_0000)),
    np.dtype(np.float64): (np.int64(0x7FFF_FFFF_FFFF_FFFF), np.int64(0x7FF0_0000_0000_0000)),
}


def percentile_by_selection(values: np.ndarray, lower: int, upper: int, weight: float,
                            fused: bool) -> tuple[np.ndarray, int]:
    """The pair of order statistics of |values| a quantile interpolates between, and their interpolation.

    ``values`` is a contiguous 1-D float32 or float64 array (any other dtype raises KeyError); ``lower <= upper``
    are ascending ranks below ``values.size`` and ``weight`` the interpolation weight, as
    ``codeq.quantizers.percentile.quantile_ranks`` gives them. Returns ``(floats, rounds)``: ``floats`` is
    ``[low, high, lerp(low, high, weight)]`` in the values' dtype, every one NaN if any element is NaN, the lerp
    being torch.lerp's with its multiply-add rounded once (``fused``) or twice; ``rounds`` counts the sampled
    rounds that narrowed the set before the final selection (0: it selected among all elements; the tests watch).
    ``values`` is read, never written.
    """
    sign_mask, inf_key = KEY_MASKS[values.dtype]
    # The tunables are arguments, not globals, because numba freezes globals into the compiled code.
    return select_order_statistics(values, sign_mask, inf_key, lower, upper, weight, fused, DIRECT_SELECTION_SIZE,
                                   SAMPLE_SIZE, SAMPLE_MARGIN_SIGMAS)


@functools.cache
def torch_lerp_is_fused(dtype: torch.dtype) -> bool | None:
    """Whether torch's CPU lerp on ``dtype`` (float32 or float64) rounds its multiply-add once (an FMA, as builds
    for AVX2, AVX-512 or ARM do) or twice, judged by its results on LERP_PROBES; None if they fit neither, and the
    caller interpolates with torch.lerp."""
    scalar = torch.empty(0, dtype=dtype).numpy().dtype.type

    def fits(fused: bool) -> bool:
        return all(torch.lerp(torch.tensor(low, dtype=dtype), torch.tensor(high, dtype=dtype), weight).item()
                   == lerp(scalar(low), scalar(high), scalar(weight), fused) for low, high, weight in LERP_PROBES)

    verdicts = [fused for fused in (True, False) if fits(fused)]
    return verdicts[0] if len(verdicts) == 1 else None


def compiled(function: Callable) -> Callable:
    """``function`` as a ``numba.njit(cache=True, nogil=True)`` dispatcher, which compiles it on its first call."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba found no writable cache directory: compile in every process instead
        return numba.njit(nogil=True)(function)


@intrinsic
def fused_multiply_add(typing_context, a, b, c):
    """a * b + c rounded once, as IEEE 754 defines it: LLVM's fma, one instruction where the CPU has one."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


# The kernels below are plain Python that numba compiles. Keys are the bit patterns of the magnitudes as signed
# integers, so every comparison is an exact integer one.

@compiled
def select_order_statistics(values: np.ndarray, sign_mask: np.signedinteger, inf_key: np.signedinteger, lower: int,
                            upper: int, weight: float, fused: bool, direct_size: int, sample_size: int,
                            margin_sigmas: float) -> tuple[np.ndarray, int]:
    """``percentile_by_selection`` with the dtype's key masks and the tunables as arguments."""
    keys = values.view(np.asarray(sign_mask).dtype)  # the raw bit patterns; masked as they are read
    needed, spread = keys.size - lower, upper - lower  # the needed-th and (needed - spread)-th largest
    rounds = 0
    while keys.size > direct_size:
        found, low_key, high_key, capacity = sampled_bounds(keys, sign_mask, needed, spread, sample_size,
                                                            margin_sigmas)
        if not found:
            break
        band = np.empty(capacity + BLOCK, keys.dtype)  # a block's worth of room beyond the capacity
        above, band_size, top = split_at_bounds(keys, sign_mask, low_key, high_key, band)
        # top is the largest key at or above low_key, so a NaN key is seen whatever the bounds are.
        if top > inf_key:
            return as_floats(top, top, keys, values, weight, fused), rounds
        # An overfull band (ties, a poor sample; it also keeps the band below half the set) or bounds that miss
        # the wanted ranks: select among these keys instead.
        if band_size > capacity or not brackets(above, band_size, needed, spread):
            break
        keys, needed, rounds = band[:band_size], needed - above, rounds + 1
    if rounds == 0:  # the keys are the caller's data: select in a masked copy, which also shows any NaN
        keys, top = masked_copy(keys, sign_mask)
        if top > inf_key:
            return as_floats(top, top, keys, values, weight, fused), rounds
    low_key, high_key = select_pair(keys, needed, spread)  # a band is ours, masked and NaN-free
    return as_floats(low_key, high_key, keys, values, weight, fused), rounds


@compiled
def sampled_bounds(keys: np.ndarray, sign_mask: np.signedinteger, needed: int, spread: int, sample_size: int,
                   margin_sigmas: float) -> tuple[bool, int, int, int]:
    """(found, low_key, high_key, band capacity): keys bracketing the needed-th and (needed - spread)-th
    largest of ``keys``, from a strided sample; each bound holds with probability ~1 - 1e-6 at 5 sigmas,
    and the caller checks them. The capacity is twice the band size the sample predicts, less than half the set."""
    size = keys.size
    strided = keys[::sample_stride(size, sample_size)]
    sample = np.empty(strided.size, keys.dtype)
    for i in range(strided.size):
        sample[i] = strided[i] & sign_mask
    count = sample.size
    expected = needed * count / size
    margin = margin_sigmas * math.sqrt(expected * (1 - expected / count) + 1) + 1
    low_rank = max(1, math.ceil(expected + margin))  # ranks from the top of the sample
    high_rank = min(count, math.floor(expected - spread - margin))
    if low_rank > count or high_rank >= low_rank:  # the second only with a negative margin (the tests try one)
        return False, sign_mask, sign_mask, 0
    low_key = select_in_place(sample, count - low_rank, 0, count - 1)
    # Without a sample element safely above the wanted ranks there is no upper bound: every key is <= the mask.
    high_key = sign_mask
    if high_rank >= 1:
        high_key = select_in_place(sample, count - high_rank, count - low_rank + 1, count - 1)
    band_ranks = low_rank - max(high_rank, 0) + 1
    return True, low_key, high_key, min(size // 2, 2 * band_ranks * size // count)


@compiled
def sample_stride(size: int, sample_size: int) -> int:
    """About size / min(sample_size, size / 32), coprime with 2, 3, 5 and 7 so that the sample does not lock
    onto a kernel position or channel pattern of the weight layout."""
    stride = max(1, size // min(sample_size, max(size // 32, 1)))
    while math.gcd(stride, 210) != 1:
        stride += 1
    return stride


@compiled
def split_at_bounds(keys: np.ndarray, sign_mask: np.signedinteger, low_key: int, high_key: int,
                    band: np.ndarray) -> tuple[int, int, int]:
    """(how many keys lie above high_key, how many lie in [low_key, high_key], the largest key >= low_key); the
    band's keys are written to ``band``. One pass over the full set, which stops early once more than
    ``band.size - BLOCK`` keys are kept (the counts are then partial; the band size says so)."""
    above = 0
    band_size = 0
    top = keys.dtype.type(0)
    words = np.empty(BLOCK // 64, np.uint64)
    whole = keys.size - keys.size % BLOCK
    for start in range(0, whole, BLOCK):
        if band_size > band.size - BLOCK:
            return above, band_size, top
        # Vectorised compares first, one bit per key (fixed trip counts: a variable one halves the speed); about
        # one key in 50 is >= low_key. Four words at a time stream memory ~1.5x faster than one at a time.
        any_hits = np.uint64(0)
        for word in range(words.size):
            group = keys[start + 64 * word:start + 64 * word + 64]
            hits = np.uint64(0)
            for i in range(64):
                hits |= np.uint64((group[i] & sign_mask) >= low_key) << np.uint64(i)
            words[word] = hits
            any_hits |= hits
        if any_hits:
            for word in range(words.size):
                group = keys[start + 64 * word:start + 64 * word + 64]
                above, band_size, top = keep_hits(group, words[word], sign_mask, high_key, band, above, band_size, top)
    if whole < keys.size and band_size <= band.size - BLOCK:
        for first in range(whole, keys.size, 64):
            group = keys[first:first + 64]
            hits = np.uint64(0)
            for i in range(group.size):
                hits |= np.uint64((group[i] & sign_mask) >= low_key) << np.uint64(i)
            above, band_size, top = keep_hits(group, hits, sign_mask, high_key, band, above, band_size, top)
    return above, band_size, top


@compiled
def keep_hits(group: np.ndarray, hits: np.uint64, sign_mask: np.signedinteger, high_key: int, band: np.ndarray,
              above: int, band_size: int, top: int) -> tuple[int, int, int]:
    """Counts and keeps the keys of ``group`` whose bits are set in ``hits`` (all >= low_key)."""
    while hits:
        key = group[lowest_set_bit(hits)] & sign_mask
        hits &= hits - np.uint64(1)
        top = max(top, key)
        above += key > high_key
        band[band_size] = key  # kept only when in the band: the index moves on only then
        band_size += key <= high_key
    return above, band_size, top


@compiled
def brackets(above: int, band_size: int, needed: int, spread: int) -> bool:
    """Whether the needed-th and (needed - spread)-th largest both lie in the band."""
    return above <= needed - spread - 1 and above + band_size >= needed


@compiled
def masked_copy(keys: np.ndarray, sign_mask: np.signedinteger) -> tuple[np.ndarray, int]:
    """(the keys with their sign bits cleared, in a new array; the largest of them)."""
    copy = np.empty(keys.size, keys.dtype)
    top = keys.dtype.type(0)
    for i in range(keys.size):
        key = keys[i] & sign_mask
        copy[i] = key
        top = max(top, key)
    return copy, top


@compiled
def select_pair(keys: np.ndarray, needed: int, spread: int) -> tuple[int, int]:
    """The needed-th and (needed - spread)-th largest of the (masked, NaN-free) keys, ascending; reorders them."""
    index = keys.size - needed
    low_key = select_in_place(keys, index, 0, keys.size - 1)
    # spread is 0 or 1; the next rank up is the smallest key of the part above the selected one.
    return low_key, keys[index + 1:].min() if spread else low_key


@compiled
def select_in_place(keys: np.ndarray, rank: int, low: int, high: int) -> int:
    """The key of ascending rank ``rank`` among keys[low:high + 1], whose other ranks hold only keys outside
    that range of positions. Quickselect (Hoare's partition); a range that has not shrunk to one key after
    2 log2(n) + 8 partitions is heapsorted, which bounds the worst case by O(n log n)."""
    partitions_left = 2 * int(math.log2(high - low + 1)) + 8
    while low < high:
        if partitions_left == 0:
            heapsort(keys, low, high)
            break
        partitions_left -= 1
        pivot = pivot_near(keys, rank, low, high) if high - low >= 16 * PIVOT_SAMPLE else median_of_3(keys, low, high)
        i, j = low, high
        while i <= j:
            while keys[i] < pivot:
                i += 1
            while keys[j] > pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                i += 1
                j -= 1
        # Now keys[low:j + 1] <= pivot <= keys[i:high + 1], and the keys between equal the pivot.
        if rank <= j:
            high = j
        elif rank >= i:
            low = i
        else:
            break
    return keys[rank]


@compiled
def pivot_near(keys: np.ndarray, rank: int, low: int, high: int) -> int:
    """A pivot just on the near side of ``rank`` in keys[low:high + 1], so that the part holding the rank is small
    (the wanted ranks are mostly near the top): the matching order statistic of a sorted strided sample, one
    sample element further towards the middle."""
    step = (high - low + 1) // PIVOT_SAMPLE
    for j in range(1, PIVOT_SAMPLE):  # insertion sort of the sample, in place among its positions
        key, k = keys[low + j * step], j - 1
        while k >= 0 and keys[low + k * step] > key:
            keys[low + (k + 1) * step] = keys[low + k * step]
            k -= 1
        keys[low + (k + 1) * step] = key
    position = (rank - low) * PIVOT_SAMPLE // (high - low + 1)
    position += -1 if 2 * (rank - low) >= high - low else 1
    return keys[low + min(max(position, 0), PIVOT_SAMPLE - 1) * step]


@compiled
def median_of_3(keys: np.ndarray, low: int, high: int) -> int:
    """The median of the first, middle and last keys of keys[low:high + 1], which it leaves in order."""
    middle = (low + high) // 2
    if keys[middle] < keys[low]:
        keys[low], keys[middle] = keys[middle], keys[low]
    if keys[high] < keys[middle]:
        keys[high], keys[middle] = keys[middle], keys[high]
        if keys[middle] < keys[low]:
            keys[low], keys[middle] = keys[middle], keys[low]
    return keys[middle]


@compiled
def heapsort(keys: np.ndarray, low: int, high: int) -> None:
    """Sorts keys[low:high + 1] in place (small to compile, unlike numba's mergesort, and O(n log n) always)."""
    size = high - low + 1
    for root in range(size // 2 - 1, -1, -1):
        sift_down(keys, low, root, size)
    for end in range(size - 1, 0, -1):
        keys[low], keys[low + end] = keys[low + end], keys[low]
        sift_down(keys, low, 0, end)


@compiled
def sift_down(keys: np.ndarray, base: int, root: int, size: int) -> None:
    """Restores the max-heap order of keys[base:base + size] below ``root``."""
    while 2 * root + 1 < size:
        child = 2 * root + 1
        if child + 1 < size and keys[base + child] < keys[base + child + 1]:
            child += 1
        if keys[base + root] >= keys[base + child]:
            return
        keys[base + root], keys[base + child] = keys[base + child], keys[base + root]
        root = child


@compiled
def as_floats(low_key: int, high_key: int, keys: np.ndarray, values: np.ndarray, weight: float,
              fused: bool) -> np.ndarray:
    """[low, high, lerp(low, high, weight)] in the values' dtype, low and high being the keys' bits viewed as
    floats (numba widens integer arithmetic to 64 bits, so the keys' own width comes from the key array)."""
    floats = np.empty(3, values.dtype)
    bits = floats.view(keys.dtype)
    bits[0], bits[1] = low_key, high_key
    floats[2] = lerp(floats[0], floats[1], values.dtype.type(weight), fused)
    return floats


@compiled
def lerp(low: np.floating, high: np.floating, weight: np.floating, fused: bool) -> np.floating:
    """torch's CPU lerp (ATen/native/Lerp.h) in the inputs' precision, its multiply-add rounded once or twice."""
    one = np.asarray(low).dtype.type(1)  # a literal 1 would widen float32 arithmetic to float64
    difference = high - low
    if abs(weight) < 0.5:
        return fused_multiply_add(weight, difference, low) if fused else low + weight * difference
    # torch's scalar code writes high - difference * (1 - weight), its vector code fma(weight - 1, difference,
    # high): the same value, as 1 - weight is exact for weight >= 0.5
    return fused_multiply_add(weight - one, difference, high) if fused else high - difference * (one - weight)
