"""CKA: closed-form properties, agreement with the textbook H K H formula, convergence."""

import numpy as np
import pandas as pd
import pytest
import torch

from devinterp_losskernel import KernelAccumulator, LossKernel
from devinterp_losskernel.analysis import cka, cka_convergence, compare_kernels


def psd(n, rank, rng):
    A = rng.standard_normal((n, rank))
    return A @ A.T


def textbook_cka(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    Kc, Lc = H @ K @ H, H @ L @ H
    return np.sum(Kc * Lc) / (np.linalg.norm(Kc) * np.linalg.norm(Lc))


def test_identity_scaling_and_shift_invariance(rng):
    K, L = psd(30, 5, rng), psd(30, 5, rng)
    assert cka(K, K) == pytest.approx(1.0, abs=1e-12)
    assert cka(K, 7.5 * K) == pytest.approx(1.0, abs=1e-12)
    assert cka(K, L) == pytest.approx(cka(3.0 * K, 0.01 * L), abs=1e-12)
    assert cka(K, L) == pytest.approx(cka(K + 4.0, L - 2.0), abs=1e-12)  # centring removes constants
    assert cka(K, L) == pytest.approx(cka(L, K), abs=1e-15)
    assert cka(K, L) < 0.9


def test_matches_textbook_formula_and_lies_in_unit_interval(rng):
    for _ in range(20):
        n = int(rng.integers(3, 40))
        K, L = psd(n, int(rng.integers(1, 6)), rng), psd(n, int(rng.integers(1, 6)), rng)
        value = cka(torch.tensor(K), L)
        assert value == pytest.approx(textbook_cka(K, L), abs=1e-12)
        assert 0.0 <= value <= 1.0 + 1e-12
    # not PSD: CKA can be negative, and is then −CKA(K, −L)
    K = psd(10, 3, rng)
    assert cka(K, -K) == pytest.approx(-1.0)


def kernel_from(losses):
    acc = KernelAccumulator(losses.shape[1])
    acc.update(torch.as_tensor(losses))
    return acc.compute()


def test_loss_kernels_and_their_matrices_agree(rng):
    losses = rng.standard_normal((50, 20)) @ rng.standard_normal((20, 20))
    k1, k2 = kernel_from(losses[:25]), kernel_from(losses[25:])
    assert cka(k1, k2) == pytest.approx(cka(k1.covariance.numpy(), k2.covariance), abs=1e-12)
    assert cka(k1, k2, use="correlation") == pytest.approx(
        textbook_cka(k1.correlation.numpy(), k2.correlation.numpy()), abs=1e-12)
    # a covariance matrix asked for use="correlation" is normalised first
    assert cka(k1.covariance, k2.covariance, use="correlation") == pytest.approx(
        cka(k1, k2, use="correlation"), abs=1e-12)


def test_convergence_curve_approaches_one(rng):
    mixing = rng.standard_normal((8, 30))
    losses = rng.standard_normal((2000, 8)) @ mixing + 0.3 * rng.standard_normal((2000, 30))
    acc = KernelAccumulator(30, block_size=16)
    snapshots = []
    for start in range(0, 2000, 250):
        acc.update(torch.as_tensor(losses[start:start + 250]))
        snapshots.append(acc.compute())
    final = snapshots[-1]
    curve = cka_convergence(snapshots[::-1], final)  # any order in, sorted out
    draws, values = zip(*curve)
    assert list(draws) == list(range(250, 2001, 250))
    assert values[-1] == pytest.approx(1.0)
    assert values[0] < values[-1] and min(values) > 0.8
    # pairs of (num_draws, matrix) work too
    pairs = [(s.num_draws, s.covariance.numpy()) for s in snapshots]
    np.testing.assert_allclose(np.array(cka_convergence(pairs, final.covariance)), np.array(curve), rtol=1e-12)


def test_compare_kernels_table(rng):
    K = psd(15, 4, rng)
    kernels = {100: K, 1000: K + 0.1 * psd(15, 2, rng), 10000: psd(15, 4, rng)}
    table = compare_kernels(kernels)
    assert isinstance(table, pd.DataFrame)
    assert list(table.index) == list(table.columns) == [100, 1000, 10000]
    np.testing.assert_allclose(np.diag(table.values), 1.0)
    np.testing.assert_allclose(table.values, table.values.T)
    assert table.loc[100, 1000] == pytest.approx(cka(kernels[100], kernels[1000]))
    assert table.loc[100, 1000] > table.loc[100, 10000]


def test_bad_inputs_name_the_argument(rng):
    K = psd(5, 2, rng)
    with pytest.raises(ValueError, match="L must have the same shape"):
        cka(K, psd(6, 2, rng))
    with pytest.raises(ValueError, match="K is constant after centring"):
        cka(np.ones((5, 5)), K)
    with pytest.raises(ValueError, match="L must be a square"):
        cka(K, np.ones((5, 4)))
    with pytest.raises(ValueError, match="K must be finite"):
        cka(K * np.nan, K)
    with pytest.raises(ValueError, match="snapshots must be a non-empty list"):
        cka_convergence([], K)
    with pytest.raises(ValueError, match=r"snapshots\[0\] must start with a positive int num_draws"):
        cka_convergence([(0, K)], K)
    with pytest.raises(ValueError, match=r"snapshots\[1\] must be a LossKernel or a \(num_draws, matrix\) pair"):
        cka_convergence([(3, K), K], K)
    with pytest.raises(ValueError, match="kernels must be a non-empty dict"):
        compare_kernels([K, K])
    one_draw = LossKernel(covariance=torch.eye(5), mean=torch.zeros(5), variance=torch.ones(5), num_draws=1)
    with pytest.raises(ValueError, match="final must be estimated from at least 2 draws"):
        cka_convergence([(3, K)], one_draw)
    with pytest.raises(ValueError, match="K must be estimated from at least 2 draws"):
        cka(one_draw, K)
