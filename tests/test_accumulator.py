import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator, KernelMemoryError, estimate_kernel_memory


def reference_cov(traces: np.ndarray) -> np.ndarray:
    """Two-pass float64 reference on stored traces [N, n]."""
    return np.cov(traces.astype(np.float64), rowvar=False, ddof=1)


def feed_random_blocks(acc, traces, rng):
    start = 0
    while start < len(traces):
        size = int(rng.integers(1, 40))
        acc.update(torch.from_numpy(traces[start : start + size]))
        start += size


def relative_error(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_matches_two_pass_reference(rng, block_size):
    traces = rng.normal(size=(301, 23)) @ rng.normal(size=(23, 23)) + rng.normal(size=23)
    acc = KernelAccumulator(23, block_size=block_size)
    feed_random_blocks(acc, traces, rng)
    k = acc.compute()
    assert k.num_draws == 301
    assert relative_error(k.covariance.numpy(), reference_cov(traces)) < 1e-13
    np.testing.assert_allclose(k.mean.numpy(), traces.mean(0), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(k.variance.numpy(), traces.var(0, ddof=1), rtol=1e-13)


def test_large_mean_tiny_variance_is_float64_grade(rng):
    # losses ~ 1e4 with variance ~ 1e-6: Σℓℓᵀ − Nμμᵀ would lose every digit.
    n, draws = 40, 2000
    mixing = rng.normal(size=(n, n)) / np.sqrt(n)
    traces = 1e4 + 1e-3 * (rng.normal(size=(draws, n)) @ mixing)
    expected = reference_cov(traces - 1e4)  # exact reference: shift is covariance-invariant
    accs = [KernelAccumulator(n, block_size=int(b)) for b in rng.integers(1, 100, size=4)]
    for acc, part in zip(accs, np.array_split(traces, [300, 310, 1500])):
        feed_random_blocks(acc, part, rng)
    merged = accs[0]
    for other in accs[1:]:
        merged.merge(other)
    k = merged.compute()
    assert k.num_draws == draws
    # input rounding alone is 1e4 * 2^-53 ≈ 1e-12 absolute on 1e-3-scale deviations
    assert relative_error(k.covariance.numpy(), expected) < 1e-8
    naive = (traces.T @ traces - draws * np.outer(traces.mean(0), traces.mean(0))) / (draws - 1)
    assert relative_error(naive, expected) > 1e-3, "the reference check must be able to fail"


def test_merge_is_order_independent(rng):
    traces = rng.normal(size=(200, 9)) * 3 + 5
    single = KernelAccumulator(9)
    single.update(torch.from_numpy(traces))
    parts = [KernelAccumulator(9, block_size=5) for _ in range(3)]
    for acc, part in zip(parts, np.array_split(traces, 3)):
        acc.update(torch.from_numpy(part))
    merged = parts[2].merge(parts[0]).merge(parts[1])
    np.testing.assert_allclose(merged.compute().covariance, single.compute().covariance, rtol=1e-12)


def test_merge_with_empty_accumulator(rng):
    traces = rng.normal(size=(10, 4))
    acc = KernelAccumulator(4)
    acc.update(torch.from_numpy(traces))
    empty = KernelAccumulator(4)
    empty.merge(acc)
    np.testing.assert_allclose(empty.compute().covariance, reference_cov(traces), rtol=1e-12)


def test_rectangular_rows(rng):
    traces = rng.normal(size=(150, 12)) @ rng.normal(size=(12, 12))
    rows = [3, 0, 11]
    acc = KernelAccumulator(12, rows=rows, block_size=16)
    feed_random_blocks(acc, traces, rng)
    k = acc.compute()
    full = reference_cov(traces)
    assert k.covariance.shape == (3, 12)
    np.testing.assert_allclose(k.covariance.numpy(), full[rows], rtol=1e-12)
    np.testing.assert_allclose(k.variance.numpy(), np.diag(full), rtol=1e-12)
    corr = full / np.sqrt(np.outer(np.diag(full), np.diag(full)))
    np.testing.assert_allclose(k.correlation.numpy(), corr[rows], rtol=1e-12, atol=1e-15)


def test_float32_storage(rng):
    traces = rng.normal(size=(500, 30))
    acc = KernelAccumulator(30, dtype=torch.float32)
    acc.update(torch.from_numpy(traces))
    k = acc.compute()
    assert k.covariance.dtype == torch.float32
    assert relative_error(k.covariance.double().numpy(), reference_cov(traces)) < 1e-5


def test_state_dict_round_trip(rng):
    traces = rng.normal(size=(50, 6))
    acc = KernelAccumulator(6, block_size=8)
    acc.update(torch.from_numpy(traces[:25]))
    restored = KernelAccumulator(6, block_size=8)
    restored.load_state_dict(acc.state_dict())
    restored.update(torch.from_numpy(traces[25:]))
    np.testing.assert_allclose(restored.compute().covariance, reference_cov(traces), rtol=1e-12)


def test_compute_does_not_stop_accumulation(rng):
    traces = rng.normal(size=(40, 5))
    acc = KernelAccumulator(5, block_size=64)
    acc.update(torch.from_numpy(traces[:20]))
    acc.compute()
    acc.update(torch.from_numpy(traces[20:]))
    np.testing.assert_allclose(acc.compute().covariance, reference_cov(traces), rtol=1e-12)


# -- bad input -------------------------------------------------------------------------------
def test_fewer_than_two_draws():
    acc = KernelAccumulator(3)
    acc.update(torch.ones(3))
    with pytest.raises(ValueError, match="at least 2 draws"):
        acc.compute()


def test_wrong_shape():
    acc = KernelAccumulator(3)
    with pytest.raises(ValueError, match=r"losses must have shape \[draws, num_samples\]"):
        acc.update(torch.ones(2, 4))


def test_non_finite_rejected():
    acc = KernelAccumulator(2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(torch.tensor([[1.0, float("nan")]]))
    assert acc.count == 0


@pytest.mark.parametrize("other_kwargs, match", [
    (dict(num_samples=4), "num_samples"),
    (dict(num_samples=3, dtype=torch.float32), "dtype"),
    (dict(num_samples=3, rows=[0]), "rows"),
])
def test_merge_mismatch(other_kwargs, match):
    acc = KernelAccumulator(3)
    other = KernelAccumulator(**other_kwargs)
    with pytest.raises(ValueError, match=match):
        acc.merge(other)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=3, dtype=torch.int64), "dtype"),
    (dict(num_samples=3, block_size=0), "block_size"),
    (dict(num_samples=3, rows=[5]), "rows"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelAccumulator(**kwargs)


def test_refuses_what_cannot_fit():
    with pytest.raises(KernelMemoryError, match="GiB"):
        KernelAccumulator(3_000_000)  # 72 TB of float64


def test_memory_estimate_scales_with_n_squared():
    # co-moment n², mean n, block buffer and workspace 2·B·n
    assert estimate_kernel_memory(10_000) == 8 * (10_000**2 + 10_000 + 2 * 256 * 10_000)
    assert estimate_kernel_memory(10_000, dtype=torch.float32) == pytest.approx(4 * 10_000**2, rel=0.06)
    assert estimate_kernel_memory(10_000, block_size=1) == pytest.approx(8 * 10_000**2, rel=0.001)
    assert estimate_kernel_memory(10_000, num_rows=100) == 8 * (100 * 10_000 + 10_000 + 2 * 256 * 10_000)
