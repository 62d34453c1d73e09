import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator, KernelMemoryError
from devinterp_losskernel.accumulator import estimate_kernel_memory


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
    # co-moment n², mean and diagonal 2n, block buffer and workspace 2·B·n, float64 shift n
    assert estimate_kernel_memory(10_000) == 8 * (10_000**2 + 2 * 10_000 + 2 * 256 * 10_000) + 8 * 10_000
    assert estimate_kernel_memory(10_000, dtype=torch.float32) == pytest.approx(4 * 10_000**2, rel=0.06)
    assert estimate_kernel_memory(10_000, block_size=1) == pytest.approx(8 * 10_000**2, rel=0.001)
    expected = 8 * (100 * 10_000 + 2 * 10_000 + 2 * 256 * 10_000) + 8 * 10_000
    assert estimate_kernel_memory(10_000, num_rows=100) == expected


# -- one declared state with an identity: nothing mixed, lost or double-counted ---------------
from devinterp_losskernel.provenance import IdentityMismatchError  # noqa: E402


def filled(n=5, draws=20, seed=0, **kwargs):
    acc = KernelAccumulator(n, **kwargs)
    acc.update(torch.from_numpy(np.random.default_rng(seed).normal(size=(draws, n))))
    return acc


def test_merge_with_itself_is_refused():
    acc = filled()
    with pytest.raises(ValueError, match="merged with itself"):
        acc.merge(acc)


def test_merging_the_same_accumulator_twice_is_refused():
    a, b = filled(seed=0), filled(seed=1)
    a.merge(b)
    with pytest.raises(ValueError, match="already in this accumulator"):
        a.merge(b)
    with pytest.raises(ValueError, match="already in this accumulator"):
        filled(seed=2).merge(a).merge(b)  # b's draws came in through a
    c = a.clone()
    with pytest.raises(ValueError, match="already in this accumulator"):
        a.merge(c)  # a clone holds the same draws
    assert a.count == 40


def test_an_empty_accumulator_merged_first_can_still_be_filled_and_merged():
    a, b = filled(), KernelAccumulator(5)
    a.merge(b)
    b.update(torch.ones(3, 5) + torch.arange(3.0)[:, None])
    a.merge(b)
    assert a.count == 23


@pytest.mark.parametrize("other, field", [
    (dict(n=6), "num_samples"), (dict(rows=[0, 2]), "rows"), (dict(dtype=torch.float32), "dtype"),
    (dict(probe="f" * 32), "probe"), (dict(sampler={"lr": 1e-3, "nbeta": 2.0}), "sampler"),
])
def test_merge_of_another_identity_names_the_field_and_both_values(other, field):
    mine = filled(probe="a" * 32, sampler={"lr": 1e-4, "nbeta": 2.0})
    n = other.pop("n", 5)
    theirs = filled(n, seed=1, **{"probe": "a" * 32, "sampler": {"lr": 1e-4, "nbeta": 2.0}, **other})
    with pytest.raises(IdentityMismatchError, match=rf"{field}: this = .*other = ") as caught:
        mine.merge(theirs)
    named = str(getattr(theirs.identity, field) if field != "sampler" else 0.001)
    assert named in str(caught.value) or field == "dtype"
    assert mine.count == 20, "a refused merge changes nothing"


def test_unknown_identity_fields_are_taken_from_the_other_side():
    mine, theirs = filled(), filled(seed=1, probe="b" * 32, sampler={"lr": 0.1})
    mine.merge(theirs)
    assert mine.identity.probe == "b" * 32 and dict(mine.identity.sampler) == {"lr": 0.1}


def test_state_dict_is_a_copy_not_a_view(rng):
    acc = filled()
    state = acc.state_dict()
    frozen = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    acc.update(torch.from_numpy(rng.normal(size=(30, 5)) * 10))
    acc.flush()
    for key, value in frozen.items():
        assert torch.equal(state[key], value), f"state_dict()['{key}'] changed with later draws"


def test_load_state_dict_checks_rows_and_every_identity_field():
    saved = filled(rows=[0, 3]).state_dict()
    with pytest.raises(IdentityMismatchError, match=r"rows: state = \(0, 3\)\s+accumulator = \(1, 3\)"):
        KernelAccumulator(5, rows=[1, 3]).load_state_dict(saved)
    with pytest.raises(IdentityMismatchError, match="rows"):
        KernelAccumulator(5).load_state_dict(saved)
    with pytest.raises(IdentityMismatchError, match="probe"):
        KernelAccumulator(5, probe="x" * 32).load_state_dict(filled(probe="y" * 32).state_dict())
    restored = KernelAccumulator(5, rows=[0, 3])
    restored.load_state_dict(saved)
    assert restored.identity.run_id == saved["identity"]["run_id"] and restored.count == 20


def test_clone_and_to_are_independent_and_merged_is_pure(rng):
    a, b, c = filled(seed=0), filled(seed=1), filled(seed=2)
    before = [x.state_dict() for x in (a, b, c)]
    everything = KernelAccumulator.merged([a, b, c])
    for acc, state in zip((a, b, c), before):
        assert torch.equal(acc.state_dict()["m2"], state["m2"]) and acc.count == 20
    traces = np.concatenate([np.random.default_rng(s).normal(size=(20, 5)) for s in range(3)])
    np.testing.assert_allclose(everything.compute().covariance.numpy(), reference_cov(traces), rtol=1e-12)
    twin = a.clone()
    twin.update(torch.zeros(1, 5))
    assert a.count == 20 and twin.count == 21
    assert a.to("cpu") is a and a.to("cpu", copy=True) is not a


def test_float32_state_keeps_its_digits_when_the_mean_dwarfs_the_spread(rng):
    # losses with mean 1e4 and variance 1e-6: in a float32 state centred on its own running
    # mean, R came out 0.02-0.05 off; stored relative to the first draw it is float32-exact
    n, draws = 30, 3000
    mixing = rng.normal(size=(n, n)) / np.sqrt(n)
    traces = 1e4 + rng.normal(size=n) + 1e-3 * (rng.normal(size=(draws, n)) @ mixing)
    expected = np.corrcoef(traces - 1e4, rowvar=False)
    acc = KernelAccumulator(n, dtype=torch.float32, block_size=64)
    feed_random_blocks(acc, traces, rng)
    half = KernelAccumulator(n, dtype=torch.float32)
    half.update(torch.from_numpy(traces[:7] + 0.5))  # a second accumulator with another shift
    k = acc.compute()
    assert np.abs(k.correlation.numpy() - expected).max() < 1e-4
    np.testing.assert_allclose(k.mean.double().numpy(), traces.mean(0), rtol=1e-7)
    merged = KernelAccumulator.merged([acc, half]).compute()
    both = np.concatenate([traces, traces[:7] + 0.5])
    assert np.abs(merged.correlation.numpy() - np.corrcoef(both - 1e4, rowvar=False)).max() < 1e-4


def test_interleaved_operations_always_match_numpy_cov():
    """A seeded random property test: update, flush, merge, clone, state_dict/load_state_dict
    and to() in random orders, on random shapes, dtypes and offsets; the result always equals
    np.cov of exactly the draws meant to be in, and every refused double count is refused."""
    rng = np.random.default_rng(2026)
    for trial in range(60):
        n = int(rng.integers(1, 9))
        rows = (None if rng.random() < 0.6
                else sorted(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False).tolist()))
        dtype = torch.float64 if rng.random() < 0.7 else torch.float32
        offset = float(rng.choice([0.0, 1e4, -3.0]))
        make = lambda: KernelAccumulator(n, rows=rows, dtype=dtype, block_size=int(rng.integers(1, 9)))  # noqa: E731
        pool = [(make(), [])]  # (accumulator, the draws it should hold)
        for _ in range(int(rng.integers(5, 30))):
            op = rng.choice(["update", "update", "flush", "new", "merge", "merge_self", "clone_merge", "reload", "to"])
            i = int(rng.integers(len(pool)))
            acc, draws = pool[i]
            if op == "update":
                block = offset + rng.normal(size=(int(rng.integers(1, 12)), n)) * rng.choice([1e-3, 1.0])
                acc.update(torch.from_numpy(block))
                draws.extend(block)
            elif op == "flush":
                acc.flush()
            elif op == "new":
                pool.append((make(), []))
            elif op == "merge" and len(pool) > 1:
                j = int(rng.choice([k for k in range(len(pool)) if k != i]))
                other, other_draws = pool[j]
                acc.merge(other)
                draws.extend(other_draws)
                pool.pop(j)  # merged accumulators are consumed: merging them again is refused
                if other_draws:
                    with pytest.raises(ValueError, match="already in"):
                        acc.merge(other)
            elif op == "merge_self":
                with pytest.raises(ValueError, match="itself"):
                    acc.merge(acc)
            elif op == "clone_merge" and draws:
                with pytest.raises(ValueError, match="already in"):
                    acc.merge(acc.clone())
            elif op == "reload":
                fresh = KernelAccumulator(n, rows=rows, dtype=dtype, block_size=int(rng.integers(1, 9)))
                fresh.load_state_dict(acc.state_dict())
                pool[i] = (fresh, draws)
            elif op == "to":
                pool[i] = (acc.to("cpu", copy=True), draws)
        for acc, draws in pool:
            assert acc.count == len(draws)
            if len(draws) < 2:
                continue
            k = acc.compute()
            expected = np.cov(np.asarray(draws) - offset, rowvar=False, ddof=1).reshape(n, n)
            expected = expected if rows is None else expected[rows]
            scale = max(np.abs(expected).max(), 1e-300)
            tol = 1e-9 if dtype == torch.float64 else 2e-5
            assert np.abs(k.covariance.double().numpy() - expected).max() / scale < tol, (trial, op)
            np.testing.assert_allclose(k.mean.double().numpy(), np.mean(draws, axis=0),
                                       rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                       atol=1e-6 if dtype == torch.float32 else 1e-12)


# -- modes: diagonal (O(n)) and combined (full kernel on some rows, variances of all) --------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diagonal_mode_equals_the_full_kernels_diagonal(rng, dtype):
    traces = 3.0 + rng.normal(size=(257, 40)) @ rng.normal(size=(40, 40)) * 1e-2
    full = KernelAccumulator(40, dtype=dtype, block_size=16)
    diag = KernelAccumulator(40, mode="diagonal", dtype=dtype, block_size=16)
    halves = [KernelAccumulator(40, mode="diagonal", dtype=dtype, block_size=5) for _ in range(2)]
    for acc in (full, diag):
        feed_random_blocks(acc, traces, rng)
    for acc, part in zip(halves, np.array_split(traces, 2)):
        acc.update(torch.from_numpy(part))
    kf, kd = full.compute(), diag.compute()
    assert kd.is_diagonal and kd.covariance is None and diag._moments.m2 is None
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(kd.variance.double().numpy(), traces.var(0, ddof=1), rtol=tol)
    np.testing.assert_allclose(kd.variance.numpy(), torch.diagonal(kf.covariance).numpy(), rtol=tol)
    merged = KernelAccumulator.merged(halves).compute()
    np.testing.assert_allclose(merged.variance.double().numpy(), traces.var(0, ddof=1), rtol=tol)
    with pytest.raises(ValueError, match="mode='diagonal'"):
        kd.correlation
    with pytest.raises(IdentityMismatchError, match="mode"):
        full.merge(halves[0])


def test_diagonal_mode_memory_is_linear_in_n():
    n = 60_000
    need = estimate_kernel_memory(n, mode="diagonal")
    assert need < 0.05 * estimate_kernel_memory(n) and need == 8 * 2 * n + 8 * n  # no [B, n] block
    acc = KernelAccumulator(n, mode="diagonal", block_size=4)
    held = sum(t.numel() * t.element_size() for t in (acc._moments.shift, acc._moments.mean, acc._moments.m2_diag))
    assert held == 3 * 8 * n  # mean, diagonal and shift: 3·8·n bytes
    assert tuple(acc._buffer.shape) == (0, n)  # nothing buffered: each draw folded as it comes


def test_combined_mode_keeps_the_subset_kernel_and_every_variance(rng, tmp_path):
    traces = rng.normal(size=(120, 15)) @ rng.normal(size=(15, 15)) + 50
    rows = [9, 2, 4, 11]
    acc = KernelAccumulator(15, mode="combined", rows=rows, block_size=7)
    feed_random_blocks(acc, traces, rng)
    k = acc.compute()
    full = reference_cov(traces)
    assert k.covariance.shape == (4, 4)
    np.testing.assert_allclose(k.covariance.numpy(), full[np.ix_(rows, rows)], rtol=1e-11)
    np.testing.assert_allclose(k.variance.numpy(), np.diag(full), rtol=1e-11)
    np.testing.assert_allclose(k.correlation.numpy(), np.corrcoef(traces, rowvar=False)[np.ix_(rows, rows)], rtol=1e-11)
    sub = k.subset()
    assert sub.num_samples == 4 and torch.equal(sub.covariance, k.covariance)
    np.testing.assert_allclose(acc.covariance_block([4, 11]).numpy(), full[np.ix_([4, 11], [4, 11])], rtol=1e-11)
    loaded = type(k).load(k.save(tmp_path / "k.pt"))
    assert torch.equal(loaded.columns, k.columns) and torch.equal(loaded.covariance, k.covariance)
    with pytest.raises(ValueError, match="needs rows="):
        KernelAccumulator(15, mode="combined")


def test_clones_of_an_empty_template_merge_and_grad_losses_are_detached():
    template = KernelAccumulator(4)
    a, b = template.clone(), template.clone()
    a.update(torch.randn(5, 4, dtype=torch.float64))
    b.update(torch.randn(6, 4, dtype=torch.float64))
    assert a.merge(b).count == 11  # distinct draws: not a double count
    with pytest.raises(ValueError, match="already in"):
        a.merge(b)
    losses = torch.randn(3, 4, requires_grad=True)
    acc = KernelAccumulator(4)
    acc.update(losses * 2)
    assert not acc.compute().covariance.requires_grad
    with pytest.raises(ValueError, match="at least one sample index"):
        KernelAccumulator(4, rows=[])


def test_a_state_of_a_newer_format_is_refused_naming_the_upgrade():
    acc = KernelAccumulator(3)
    acc.update(torch.rand(3, dtype=torch.float64))
    acc.update(torch.rand(3, dtype=torch.float64))
    state = acc.state_dict()
    state["format_version"] = 99
    with pytest.raises(ValueError, match="format version 99.*Upgrade"):
        KernelAccumulator(3).load_state_dict(state)
