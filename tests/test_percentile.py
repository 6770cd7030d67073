"""robust_absmax is exactly torch.quantile(|w|, q, 'linear'), by every path, on random and adversarial tensors."""
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codeq.quantizers import _percentile_kernels as kernels
from codeq.quantizers import percentile
from codeq.quantizers.percentile import (
    PADDING_LIMIT,
    order_statistics_by_topk,
    padded_topk_absmaxes,
    quantile_ranks,
    robust_absmax,
    robust_absmaxes,
    similar_sizes,
)


def quantile(weight: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    return torch.quantile(weight.detach().abs().flatten(), q, interpolation="linear")


def kthvalue_reference(weight: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """torch.quantile's formula by kthvalue: q rounded to the dtype, rank in double, weight rounded
    back to the dtype, lerp of the two order statistics (checked against torch.quantile below)."""
    magnitudes = weight.detach().abs().flatten()
    n = magnitudes.numel()
    rank = float(torch.tensor(q, dtype=magnitudes.dtype)) * (n - 1)
    lower, upper = math.floor(rank), min(math.ceil(rank), n - 1)
    low = magnitudes.kthvalue(lower + 1).values
    high = magnitudes.kthvalue(upper + 1).values
    return torch.lerp(low, high, float(torch.tensor(rank - lower, dtype=magnitudes.dtype)))


def assert_identical(result: torch.Tensor, expected: torch.Tensor) -> None:
    assert result.shape == () and result.dtype == expected.dtype
    if math.isnan(expected):
        assert math.isnan(result)
    else:
        assert result.item() == expected.item(), (result.item(), expected.item())


def sampled_rounds(weight: torch.Tensor, q: float = 0.99) -> int:
    """How many sampled rounds narrowed the set before the CPU kernel's final selection (0: none did)."""
    values = weight.detach().flatten()
    lower, upper, weight_frac = quantile_ranks(values.numel(), q, values.dtype)
    return kernels.percentile_by_selection(values.numpy(), lower, upper, weight_frac, True)[1]


@pytest.fixture
def small_sets(monkeypatch):
    """Send small tensors down the sampled path, with small samples and several narrowing rounds."""
    monkeypatch.setattr(kernels, "DIRECT_SELECTION_SIZE", 64)
    monkeypatch.setattr(kernels, "SAMPLE_SIZE", 256)


def random_tensor(rng: random.Random, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    kind = rng.choice(["normal", "uniform", "cauchy", "ints", "sparse", "scaled"])
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    if kind == "normal":
        return torch.randn(n, generator=generator, dtype=dtype)
    if kind == "uniform":
        return torch.rand(n, generator=generator, dtype=dtype) * 2 - 1
    if kind == "cauchy":
        return torch.empty(n, dtype=dtype).cauchy_(generator=generator)
    if kind == "ints":  # heavy ties
        return torch.randint(-3, 4, (n,), generator=generator).to(dtype)
    if kind == "sparse":  # mostly exact zeros
        return torch.randn(n, generator=generator, dtype=dtype) * (torch.rand(n, generator=generator) < 0.02)
    return torch.randn(n, generator=generator, dtype=dtype) * 10.0 ** rng.uniform(-6, 6)


def test_rank_formula_is_torch_quantiles():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.choice([rng.randrange(1, 300), rng.randrange(300, 60_000)])
        q = rng.choice([0.99, 0.5, 0.9, 0.999, 0.0, 1.0, rng.random()])
        w = random_tensor(rng, n)
        assert_identical(kthvalue_reference(w, q), quantile(w, q))


DIRECT = kernels.DIRECT_SELECTION_SIZE
BLOCK = kernels.BLOCK


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, DIRECT - 1, DIRECT, DIRECT + 1, 2 * BLOCK - 1, 8 * BLOCK + 1, 4097,
                               36_864, 65_536, 65_537, 100_003, 1_048_576 + 5, 2_359_296])
@pytest.mark.parametrize("q", [0.99, 0.5, 0.0, 1.0])
def test_default_paths_match_torch_quantile(n, q):
    torch.manual_seed(n)
    w = torch.randn(n)
    assert_identical(robust_absmax(w, q), quantile(w, q))
    if n > DIRECT and q in (0.99, 1.0):  # these go down the sampled path (small samples cannot bound a median)
        assert sampled_rounds(w, q) >= 1


def test_sampled_path_matches_torch_quantile_on_random_tensors(small_sets):
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randrange(1, 60_000)
        q = rng.choice([0.99, 0.99, 0.9, 0.5, 0.999, 1.0, 0.0])
        w = random_tensor(rng, n)
        assert_identical(robust_absmax(w, q), quantile(w, q))


def test_float64_matches_torch_quantile(small_sets):
    rng = random.Random(4)
    for _ in range(60):
        n = rng.randrange(1, 40_000)
        q = rng.choice([0.99, 0.5, 1.0, 0.0, rng.random()])
        w = random_tensor(rng, n, torch.float64)
        assert_identical(robust_absmax(w, q), quantile(w, q))
    big = torch.randn(200_003, dtype=torch.float64)
    assert_identical(robust_absmax(big), quantile(big))
    assert sampled_rounds(big) >= 1


def test_topk_path_matches_torch_quantile():
    """The method CUDA, MPS and torch.compile use, run on CPU."""
    rng = random.Random(2)
    for _ in range(150):
        n = rng.randrange(1, 20_000)
        q = rng.choice([0.99, 0.5, 1.0, 0.0, rng.random()])
        w = random_tensor(rng, n)
        lower, upper, frac = quantile_ranks(n, q, torch.float32)
        low, high = order_statistics_by_topk(w, lower, upper)
        assert_identical(torch.lerp(low, high, frac), quantile(w, q))


def test_padded_topk_matches_torch_quantile():
    """The batched method GPUs use (one topk over a padded matrix, one tensor a row), run on CPU."""
    rng = random.Random(5)
    for _ in range(100):
        q = rng.choice([0.99, 0.5, 1.0, 0.0, rng.random()])
        dtype = rng.choice([torch.float32, torch.float64])
        tensors = [random_tensor(rng, rng.randrange(1, 5_000), dtype) for _ in range(rng.randrange(2, 7))]
        for result, tensor in zip(padded_topk_absmaxes(tensors, q), tensors, strict=True):
            assert_identical(result, quantile(tensor, q))


def test_padded_topk_rows_keep_their_own_nan_infinities_and_dtype():
    rows = [ADVERSARIAL["infinities"], torch.tensor([1.0, math.nan, 3.0]), ADVERSARIAL["signed zeros"][:7],
            ADVERSARIAL["denormals and zeros"], torch.tensor([-2.0])]
    for result, row in zip(padded_topk_absmaxes(rows, 0.99), rows, strict=True):
        assert_identical(result, quantile(row))
    halves = [torch.randn(300).to(torch.bfloat16), torch.randn(1000).to(torch.bfloat16)]
    for result, half in zip(padded_topk_absmaxes(halves, 0.99), halves, strict=True):
        assert result.dtype == torch.bfloat16 and result == quantile(half.float()).to(torch.bfloat16)


def test_similar_sizes_pads_a_group_to_at_most_twice_its_elements():
    rng = random.Random(6)
    resnet20 = [432] + [2304] * 6 + [4608] + [9216] * 5 + [18432] + [36864] * 5 + [640] + [9216, 36864]
    for sizes in [resnet20, [7], [5, 5, 5], [10**6, 1, 1, 1]] + [[rng.randrange(1, 10**5) for _ in range(30)]
                                                                  for _ in range(20)]:
        groups = similar_sizes(range(len(sizes)), sizes)
        assert sorted(item for group in groups for item in group) == list(range(len(sizes)))
        for group in groups:
            group_sizes = [sizes[item] for item in group]
            assert group_sizes == sorted(group_sizes, reverse=True)
            assert len(group) * group_sizes[0] <= PADDING_LIMIT * sum(group_sizes)
    assert len(similar_sizes(range(len(resnet20)), resnet20)) == 2


def test_robust_absmaxes_groups_by_dtype_and_size_with_the_same_results(monkeypatch):
    """Off the CPU robust_absmaxes groups tensors by device, dtype and size; here CPU tensors are sent that way."""
    monkeypatch.setattr(percentile, "selects_alone", lambda weight: False)
    torch.manual_seed(7)
    tensors = [torch.randn(n, dtype=dtype) for n, dtype in [(36_864, torch.float32), (432, torch.float64),
                                                            (9_216, torch.float32), (5, torch.float32),
                                                            (36_864, torch.float64), (3, torch.float16)]]
    tensors.append(torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last))
    results = robust_absmaxes(tensors)
    assert len(results) == len(tensors)
    for result, tensor in zip(results, tensors, strict=True):
        assert result.dtype == tensor.dtype
        assert torch.equal(result, robust_absmax(tensor)), tensor.shape
    with pytest.raises(ValueError, match="empty"):
        robust_absmaxes([torch.randn(4), torch.zeros(0)])


ADVERSARIAL = {
    "all zeros": torch.zeros(100_000),
    "all equal": torch.full((100_000,), -0.25),
    "signed zeros": torch.tensor([0.0, -0.0]).repeat(50_000),
    "one element": torch.tensor([-3.0]),
    "two values": torch.tensor([1.0, -2.0]),
    "sorted": torch.linspace(-1, 1, 200_001),
    "reverse sorted": torch.linspace(5, 0, 200_001),
    "organ pipe": torch.cat([torch.arange(50_000.0), torch.arange(50_000.0).flip(0)]),
    "two levels": torch.cat([torch.ones(99_000), torch.full((1_000,), 7.0)]),
    "ties at the percentile": torch.cat([torch.rand(98_500), torch.full((1_000,), 2.0), torch.rand(500) + 3]),
    "infinities": torch.cat([torch.randn(99_990), torch.full((10,), math.inf), torch.full((10,), -math.inf)]),
    "many infinities": torch.cat([torch.randn(98_000), torch.full((2_000,), -math.inf)]),
    "denormals": torch.full((100_000,), 1e-40) * torch.randn(100_000).sign(),
    "denormals and zeros": torch.cat([torch.full((50_000,), 1e-45), torch.zeros(40_000),
                                      -torch.full((10_000,), 3e-39)]),
    "extremes": torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).tiny, 0.0]).repeat(30_001),
}


@pytest.mark.parametrize("name", ADVERSARIAL)
@pytest.mark.parametrize("q", [0.99, 0.5, 1.0])
def test_adversarial_tensors(name, q):
    weight = ADVERSARIAL[name]
    assert_identical(robust_absmax(weight, q), quantile(weight, q))
    assert_identical(robust_absmax(weight.double(), q), quantile(weight.double(), q))


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_tensors_on_the_sampled_path(name, small_sets):
    weight = ADVERSARIAL[name]
    assert_identical(robust_absmax(weight), quantile(weight))
    shuffled = weight[torch.randperm(weight.numel(), generator=torch.Generator().manual_seed(0))]
    assert_identical(robust_absmax(shuffled), quantile(shuffled))


def test_ties_that_fill_the_band_fall_back_to_direct_selection():
    """Equal magnitudes make the band as large as the set: the kernel selects among all keys instead."""
    weight = ADVERSARIAL["all equal"]
    assert sampled_rounds(weight) == 0
    assert_identical(robust_absmax(weight), quantile(weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_anywhere_gives_nan(dtype, small_sets):
    n = 50_000
    stride = kernels.sample_stride(n, kernels.SAMPLE_SIZE)
    # In the sample, between sampled positions, in the last partial block; a NaN with its sign bit set.
    for size, position, nan in [(10, 3, math.nan), (n, 0, math.nan), (n, stride, math.nan), (n, 17, math.nan),
                                (n, n - 1, math.nan), (n + 7, n + 5, math.nan), (n, 123, -math.nan)]:
        w = torch.randn(size, dtype=dtype)
        w[position] = nan
        assert math.isnan(robust_absmax(w)) and math.isnan(quantile(w))
        assert math.isnan(robust_absmax(w, 0.0)) and math.isnan(robust_absmax(w, 1.0))
        lower, upper, _ = quantile_ranks(size, 0.99, dtype)
        assert math.isnan(order_statistics_by_topk(w, lower, upper)[0])


def test_nan_is_seen_however_the_bounds_fall(monkeypatch):
    """Bounds from a NaN-free sample, from a sample holding the NaN, and none at all (a failed check)."""
    for margin in [5.0, 0.0, -20.0]:
        monkeypatch.setattr(kernels, "SAMPLE_MARGIN_SIGMAS", margin)
        for position in [0, 1, 99_999]:
            w = torch.randn(100_000)
            w[position] = math.nan
            assert math.isnan(robust_absmax(w))


def test_sample_aligned_outliers_force_the_exact_fallback():
    """Large values exactly at the sampled positions fool the sample; the count check catches it."""
    n = 50_000
    w = torch.rand(n)
    assert sampled_rounds(w) >= 1
    w[:: kernels.sample_stride(n, kernels.SAMPLE_SIZE)] += 100.0
    assert sampled_rounds(w) == 0, "the sampled bounds should have failed their check here"
    assert_identical(robust_absmax(w), quantile(w))


def test_bracket_check_boundaries():
    """The band must hold the needed-th largest and the (needed - spread)-th: no more than needed - spread - 1 keys
    above it, at least needed at or above its bottom (random tensors rarely land on these edges)."""
    for needed, spread in [(10, 0), (10, 1), (1, 0)]:
        top = needed - spread - 1  # the most keys that may lie above the band
        assert kernels.brackets(top, spread + 1, needed, spread)
        assert not kernels.brackets(top + 1, spread + 1, needed, spread)
        assert not kernels.brackets(top, spread, needed, spread)


def test_failed_bounds_never_change_the_result(small_sets, monkeypatch):
    monkeypatch.setattr(kernels, "SAMPLE_MARGIN_SIGMAS", 0.0)  # bounds one rank from the expected: often wrong
    rng = random.Random(3)
    fallbacks = 0
    for _ in range(60):
        w = random_tensor(rng, rng.randrange(1_000, 40_000))
        assert_identical(robust_absmax(w), quantile(w))
        fallbacks += sampled_rounds(w) == 0
    assert fallbacks >= 10, "the checks should have rejected many of these bounds"


def test_quickselect_on_patterns_that_defeat_pivot_rules():
    """The final selection at every rank against numpy, on orders where a simple pivot choice degrades (sizes
    with sampled pivots and with medians of 3)."""
    n = 16 * kernels.PIVOT_SAMPLE * 3 + 1
    patterns = {"sorted": np.arange(n), "reverse": np.arange(n)[::-1], "equal": np.zeros(n),
                "organ pipe": np.concatenate([np.arange(n // 2), np.arange(n - n // 2)[::-1]]),
                "sawtooth": np.arange(n) % 7, "two values": np.arange(n) % 2,
                "random ties": np.random.default_rng(0).integers(0, 5, n)}
    for name, pattern in patterns.items():
        keys = pattern.astype(np.int32)
        expected = np.sort(keys)
        for rank in range(n):
            assert kernels.select_in_place(keys.copy(), rank, 0, n - 1) == expected[rank], (name, rank)


def test_heapsort_the_quickselect_falls_back_to():
    rng = np.random.default_rng(1)
    for size in [1, 2, 3, 10, 255, 1000]:
        for keys in [rng.integers(-5, 5, size), rng.integers(-2**31, 2**31 - 1, size), np.zeros(size, np.int64)]:
            keys = keys.astype(np.int32)
            low, high = size // 4, size - 1 - size // 5
            sorted_range = keys.copy()
            kernels.heapsort(sorted_range, low, high)
            expected = keys.copy()
            expected[low:high + 1].sort()
            assert np.array_equal(sorted_range, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probes_tell_a_fused_lerp_from_an_unfused_one(dtype):
    """In each branch of lerp (weight below 0.5 and not) some probe's result depends on the rounding."""
    scalar = torch.empty(0, dtype=dtype).numpy().dtype.type
    for branch in (lambda weight: weight < 0.5, lambda weight: weight >= 0.5):
        assert any(kernels.lerp(scalar(low), scalar(high), scalar(weight), True)
                   != kernels.lerp(scalar(low), scalar(high), scalar(weight), False)
                   for low, high, weight in kernels.LERP_PROBES if branch(weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_lerp_is_torch_lerp(dtype):
    """The lerp the CPU kernel computes is torch.lerp's, bit for bit, on random and edge-case inputs."""
    fused = kernels.torch_lerp_is_fused(dtype)
    assert fused is not None, "torch.lerp here rounds neither like an FMA nor like a multiply and an add"
    scalar = torch.empty(0, dtype=dtype).numpy().dtype.type
    rng = np.random.default_rng(5)
    low = np.abs(rng.standard_normal(4000)) * 10.0 ** rng.integers(-30, 30, 4000)
    high = low * (1 + rng.random(4000) * 10.0 ** rng.integers(-8, 3, 4000))
    weights = rng.random(4000)
    finfo = torch.finfo(dtype)
    edge_pairs = [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (finfo.tiny / 4, finfo.tiny), (1.0, math.inf),
                  (math.inf, math.inf), (finfo.max / 2, finfo.max), (1.0, 1.5)]
    edge_weights = [0.0, 0.5, np.nextafter(scalar(0.5), scalar(0)), 0.25, 0.75, 1e-30, 0.999999, 0.3]
    low[:len(edge_pairs)], high[:len(edge_pairs)] = zip(*edge_pairs)
    weights[:len(edge_weights)] = edge_weights
    weights[len(edge_weights)::8] = 0.5  # the branch boundary, where high - low is often inexact
    for lo, hi, weight in zip(low.astype(scalar), high.astype(scalar), weights.astype(scalar)):
        expected = torch.lerp(torch.tensor(lo), torch.tensor(hi), float(weight))  # robust_absmax's call
        result = kernels.lerp(lo, hi, weight, fused)
        assert result == expected.item() or (math.isnan(result) and math.isnan(expected)), (lo, hi, weight)


def test_torch_lerp_fallback_gives_the_same_results(monkeypatch):
    """Where the kernel's lerp matches neither rounding, robust_absmax interpolates with torch.lerp itself."""
    monkeypatch.setattr(kernels, "torch_lerp_is_fused", lambda dtype: None)
    rng = random.Random(6)
    for _ in range(30):
        n = rng.randrange(1, 20_000)
        w = random_tensor(rng, n, rng.choice([torch.float32, torch.float64]))
        assert_identical(robust_absmax(w), quantile(w))
    assert math.isnan(robust_absmax(torch.tensor([1.0, math.nan])))


def test_layouts_and_dtypes():
    torch.manual_seed(0)
    conv = torch.randn(64, 32, 3, 3)
    assert_identical(robust_absmax(conv.to(memory_format=torch.channels_last)), quantile(conv))
    matrix = torch.randn(300, 400)
    assert_identical(robust_absmax(matrix.t()), quantile(matrix))
    assert_identical(robust_absmax(matrix[:, ::3]), quantile(matrix[:, ::3]))
    big = torch.randn(200_000, dtype=torch.float64)
    assert_identical(robust_absmax(big), quantile(big))
    for dtype in (torch.float16, torch.bfloat16):
        half = torch.randn(5_000).to(dtype)
        result = robust_absmax(half)
        assert result.dtype == dtype and result == quantile(half.float()).to(dtype)
        half_conv = conv.to(dtype).to(memory_format=torch.channels_last)
        assert robust_absmax(half_conv) == quantile(half_conv.float()).to(dtype)


def test_result_carries_no_gradient():
    w = torch.randn(1000, requires_grad=True)
    assert not robust_absmax(w * 2).requires_grad
    assert not robust_absmax(torch.nn.Parameter(torch.randn(5000))).requires_grad


def test_rejects_empty_and_bad_q():
    with pytest.raises(ValueError, match="empty"):
        robust_absmax(torch.zeros(0))
    with pytest.raises(ValueError, match="q must be"):
        robust_absmax(torch.zeros(3), q=1.5)


def test_compiles_without_graph_breaks():
    """Under torch.compile the topk path is traced whole: ranks fold to constants, numba stays out."""
    explanation = torch._dynamo.explain(lambda w: robust_absmax(w) * 2)(torch.randn(1000))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_numba_is_imported_on_first_use_only():
    """Importing the module (as --dry-run, config errors and GPU runs do) must not pay numba's import time."""
    code = ("import sys, torch; from codeq.quantizers import percentile; "
            "assert 'numba' not in sys.modules and 'codeq.quantizers._percentile_kernels' not in sys.modules; "
            "percentile.robust_absmax(torch.randn(10)); assert 'numba' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_beyond_2_to_the_24_elements():
    """Where old torch.quantile refused; 2.x sorts 3.4e7 elements in seconds, so it is compared once."""
    n = 2**24 + 4097
    torch.manual_seed(24)
    w = torch.randn(n)
    expected = kthvalue_reference(w)
    assert_identical(robust_absmax(w), expected)
    assert_identical(expected, quantile(w))
