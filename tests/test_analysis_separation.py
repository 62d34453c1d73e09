"""pc1_separation and group_covariances on kernels whose structure is known."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from devinterp_losskernel import KernelAccumulator, LossKernel
from devinterp_losskernel.analysis import group_covariances, pc1_separation, separation


def kernel_from_draws(losses, **fields):
    acc = KernelAccumulator(losses.shape[1])
    acc.update(torch.as_tensor(losses))
    return acc.compute(**fields)


def two_task_kernel(n=120, draws=300, seed=0):
    """Each task's losses share latent factors the other task's do not (paper, Section 3):
    a block-structured kernel, task given by `task` (0/1, interleaved)."""
    rng = np.random.default_rng(seed)
    task = rng.permutation(np.arange(n) % 2)
    factors = rng.standard_normal((draws, 2, 3))  # 3 latent directions per task
    loadings = rng.uniform(0.5, 1.5, (n, 3))
    signal = np.einsum("tkf,nf->tnk", factors, loadings)[:, np.arange(n), task]
    return kernel_from_draws(signal + 0.5 * rng.standard_normal((draws, n))), task


def test_block_kernel_separates_tasks():
    kernel, task = two_task_kernel()
    result = pc1_separation(kernel, task)
    assert result.auc > 0.99
    assert result.groups == (0, 1)
    np.testing.assert_array_equal(result.mask, task == 1)
    # oriented so that the second group projects higher
    assert result.projection[task == 1].mean() > result.projection[task == 0].mean()
    assert result.explained_variance_ratio > 0.3
    # string labels, torch labels and the covariance rows give the same separation
    names = np.where(task == 1, "division", "addition")
    assert pc1_separation(kernel, names).groups == ("addition", "division")
    assert pc1_separation(kernel, torch.tensor(task)).auc == result.auc
    assert pc1_separation(kernel, task, use="covariance").auc > 0.99


def test_random_kernel_gives_chance_auc():
    rng = np.random.default_rng(3)
    kernel = kernel_from_draws(rng.standard_normal((300, 200)))  # independent losses
    result = pc1_separation(kernel, rng.permutation(np.arange(200) % 2))
    # AUC of an unrelated axis: 0.5 ± 0.04 (sd); max(AUC, 1 − AUC) is the reported value
    assert 0.5 <= result.auc < 0.65


def test_projection_is_sklearn_pca():
    kernel, task = two_task_kernel(n=60)
    R = kernel.correlation.numpy()
    result = pc1_separation(kernel, task)
    pca = PCA(n_components=1).fit(R)
    reference = pca.transform(R)[:, 0]
    sign = np.sign(reference @ result.projection)
    np.testing.assert_allclose(result.projection, sign * reference, atol=1e-8)
    assert result.explained_variance_ratio == pytest.approx(pca.explained_variance_ratio_[0])
    assert np.linalg.norm(result.component) == pytest.approx(1.0)


def test_iterative_solver_matches_dense(monkeypatch):
    kernel, task = two_task_kernel(n=80)
    dense = pc1_separation(kernel, task)
    monkeypatch.setattr(separation, "_DENSE_SVD_MAX_N", 10)
    iterative = pc1_separation(kernel, task)
    np.testing.assert_allclose(iterative.projection, dense.projection, atol=1e-8)
    assert iterative.auc == dense.auc


def test_group_covariances_against_brute_force():
    kernel, task = two_task_kernel(n=50)
    K = kernel.covariance.numpy()
    result = group_covariances(kernel, task)
    assert set(result.values) == {(0, 0), (0, 1), (1, 1)}
    a, b = np.flatnonzero(task == 0), np.flatnonzero(task == 1)
    within_a = sorted(K[i, j] for i in a for j in a if i < j)
    cross = sorted(K[i, j] for i in a for j in b)
    np.testing.assert_allclose(np.sort(result.values[(0, 0)]), within_a)
    np.testing.assert_allclose(np.sort(result.values[(0, 1)]), cross)
    summary = result.summary.set_index(["group_a", "group_b"])
    assert summary.loc[(0, 0), "count"] == len(a) * (len(a) - 1) // 2
    assert summary.loc[(0, 1), "count"] == len(a) * len(b)
    assert summary.loc[(0, 1), "kind"] == "cross" and summary.loc[(1, 1), "kind"] == "within"
    assert summary.loc[(0, 0), "mean"] == pytest.approx(np.mean(within_a))
    # the shared factors make within-task covariances large, cross-task ones near zero
    assert summary.loc[(0, 0), "mean"] > 5 * abs(summary.loc[(0, 1), "mean"])
    assert summary.loc[(1, 1), "mean_abs"] > 3 * summary.loc[(0, 1), "mean_abs"]


def test_group_covariance_moments_closed_form():
    # 3 groups, values chosen by hand: group 'x' = {0, 1}, 'y' = {2}, 'z' = {3}
    K = np.array([[9.0, 1.0, 2.0, 3.0],
                  [1.0, 9.0, 4.0, 5.0],
                  [2.0, 4.0, 9.0, 6.0],
                  [3.0, 5.0, 6.0, 9.0]])
    result = group_covariances(K, ["x", "x", "y", "z"], use="covariance")
    np.testing.assert_array_equal(result.values[("x", "x")], [1.0])
    np.testing.assert_array_equal(np.sort(result.values[("x", "y")]), [2.0, 4.0])
    assert result.values[("y", "y")].size == 0
    row = result.summary.set_index(["group_a", "group_b"]).loc[("x", "z")]
    assert row["mean"] == 4.0 and row["std"] == 1.0 and row["skewness"] == 0.0
    assert row["excess_kurtosis"] == pytest.approx(-2.0)  # two points: kurtosis 1
    corr = group_covariances(K, ["x", "x", "y", "z"], use="correlation")
    np.testing.assert_allclose(corr.values[("x", "x")], [1.0 / 9.0])


def test_bad_inputs_name_the_argument():
    kernel, task = two_task_kernel(n=20, draws=10)
    with pytest.raises(ValueError, match="groups must have exactly two distinct values"):
        pc1_separation(kernel, np.arange(20) % 3)
    with pytest.raises(ValueError, match="groups must have one entry per probe sample: length 20"):
        pc1_separation(kernel, task[:-1])
    with pytest.raises(ValueError, match="groups must have one entry per probe sample: length 20"):
        group_covariances(kernel, task[:5])
    with pytest.raises(ValueError, match="use must be one of"):
        pc1_separation(kernel, task, use="cov")
    with pytest.raises(ValueError, match="no variance"):
        pc1_separation(np.ones((4, 4)), [0, 0, 1, 1], use="covariance")
    one_draw = LossKernel(covariance=torch.zeros(4, 4), mean=torch.zeros(4), variance=torch.zeros(4), num_draws=1)
    with pytest.raises(ValueError, match="at least 2 draws"):
        group_covariances(one_draw, [0, 0, 1, 1])
