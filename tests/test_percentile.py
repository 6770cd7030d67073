"""robust_absmax is exactly torch.quantile(|w|, q, 'linear'), by every path, on random and adversarial tensors."""
import math
import random

import pytest
import torch

from src import percentile
from src.percentile import order_statistics_by_topk, quantile_ranks, robust_absmax


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


@pytest.fixture
def small_chunks(monkeypatch):
    """Send mid-sized tensors down the sampled path in several chunks, with tails."""
    monkeypatch.setattr(percentile, "COLUMN_METHOD_MIN_SIZE", 512)
    monkeypatch.setattr(percentile, "CHUNK_SIZE", 8 * 1000)
    monkeypatch.setattr(percentile, "SAMPLE_SIZE", 1024)


def random_tensor(rng: random.Random, n: int) -> torch.Tensor:
    kind = rng.choice(["normal", "uniform", "cauchy", "ints", "sparse", "scaled"])
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    if kind == "normal":
        return torch.randn(n, generator=generator)
    if kind == "uniform":
        return torch.rand(n, generator=generator) * 2 - 1
    if kind == "cauchy":
        return torch.empty(n).cauchy_(generator=generator)
    if kind == "ints":  # heavy ties
        return torch.randint(-3, 4, (n,), generator=generator).float()
    if kind == "sparse":  # mostly exact zeros
        return torch.randn(n, generator=generator) * (torch.rand(n, generator=generator) < 0.02)
    return torch.randn(n, generator=generator) * 10.0 ** rng.uniform(-6, 6)


def test_rank_formula_is_torch_quantiles():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.choice([rng.randrange(1, 300), rng.randrange(300, 60_000)])
        q = rng.choice([0.99, 0.5, 0.9, 0.999, 0.0, 1.0, rng.random()])
        w = random_tensor(rng, n)
        assert_identical(kthvalue_reference(w, q), quantile(w, q))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 101, 1000, 4097, 65_536, 65_537, 100_003, 1_048_576 + 5, 2_359_296])
def test_default_paths_match_torch_quantile(n):
    torch.manual_seed(n)
    w = torch.randn(n)
    assert_identical(robust_absmax(w), quantile(w))


def test_sampled_path_matches_torch_quantile_on_random_tensors(small_chunks):
    rng = random.Random(1)
    for _ in range(250):
        n = rng.randrange(1, 60_000)
        q = rng.choice([0.99, 0.99, 0.9, 0.5, 0.999, 1.0, 0.0])
        w = random_tensor(rng, n)
        assert_identical(robust_absmax(w, q), quantile(w, q))


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


@pytest.mark.parametrize("name,weight", [
    ("all zeros", torch.zeros(100_000)),
    ("all equal", torch.full((100_000,), -0.25)),
    ("one element", torch.tensor([-3.0])),
    ("two values", torch.tensor([1.0, -2.0])),
    ("sorted", torch.linspace(-1, 1, 200_001)),
    ("reverse sorted", torch.linspace(5, 0, 200_001)),
    ("two levels", torch.cat([torch.ones(99_000), torch.full((1_000,), 7.0)])),
    ("infinities", torch.cat([torch.randn(99_990), torch.full((10,), math.inf), torch.full((10,), -math.inf)])),
    ("many infinities", torch.cat([torch.randn(98_000), torch.full((2_000,), -math.inf)])),
    ("denormals", torch.full((100_000,), 1e-40) * torch.randn(100_000).sign()),
])
def test_adversarial_tensors(name, weight, small_chunks):
    assert_identical(robust_absmax(weight), quantile(weight))


def test_nan_anywhere_gives_nan(small_chunks):
    for n, position in [(10, 3), (50_000, 17), (50_000, 49_999), (50_001, 50_000)]:
        w = torch.randn(n)
        w[position] = math.nan
        assert math.isnan(robust_absmax(w)) and math.isnan(quantile(w))
        lower, upper, _ = quantile_ranks(n, 0.99, torch.float32)
        assert math.isnan(order_statistics_by_topk(w, lower, upper)[0])


def test_sample_aligned_outliers_force_the_exact_fallback(small_chunks, monkeypatch):
    """Large values exactly at the sampled positions fool the sample; the count check catches it."""
    n = 50_000
    w = torch.rand(n)
    w[:: percentile.sample_stride(n)] += 100.0
    fallbacks = []
    monkeypatch.setattr(percentile, "order_statistics_by_topk",
                        lambda *args: fallbacks.append(args) or order_statistics_by_topk(*args))
    assert_identical(robust_absmax(w), quantile(w))
    assert fallbacks, "the sampled bounds should have failed their check here"


def test_failed_bounds_never_change_the_result(small_chunks, monkeypatch):
    monkeypatch.setattr(percentile, "SAMPLE_MARGIN_SIGMAS", -20.0)  # bounds on the wrong side of the rank
    rng = random.Random(3)
    for _ in range(40):
        w = random_tensor(rng, rng.randrange(1_000, 40_000))
        assert_identical(robust_absmax(w), quantile(w))


def test_layouts_and_dtypes():
    torch.manual_seed(0)
    conv = torch.randn(64, 32, 3, 3)
    assert_identical(robust_absmax(conv.to(memory_format=torch.channels_last)), quantile(conv))
    matrix = torch.randn(300, 400)
    assert_identical(robust_absmax(matrix.t()), quantile(matrix))
    assert_identical(robust_absmax(matrix[:, ::3]), quantile(matrix[:, ::3]))
    big = torch.randn(200_000, dtype=torch.float64)
    assert_identical(robust_absmax(big), quantile(big))
    half = torch.randn(5_000).to(torch.bfloat16)
    result = robust_absmax(half)
    assert result.dtype == torch.bfloat16 and result == quantile(half.float()).to(torch.bfloat16)


def test_result_carries_no_gradient():
    w = torch.randn(1000, requires_grad=True)
    assert not robust_absmax(w * 2).requires_grad


def test_rejects_empty_and_bad_q():
    with pytest.raises(ValueError, match="empty"):
        robust_absmax(torch.zeros(0))
    with pytest.raises(ValueError, match="q must be"):
        robust_absmax(torch.zeros(3), q=1.5)


def test_beyond_2_to_the_24_elements():
    """Where old torch.quantile refused; 2.x sorts 3.4e7 elements in seconds, so it is compared once."""
    n = 2**24 + 4097
    torch.manual_seed(24)
    w = torch.randn(n)
    expected = kthvalue_reference(w)
    assert_identical(robust_absmax(w), expected)
    assert_identical(expected, quantile(w))
