"""top_correlated against brute-force argsort, ties, label exclusion, bad inputs."""

import warnings

import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator, LossKernel
from devinterp_losskernel.analysis import neighbours, top_correlated


def random_kernel(n=40, draws=30, seed=0, labels=None):
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((draws, 5))
    losses = factors @ rng.standard_normal((5, n)) + rng.standard_normal((draws, n))
    acc = KernelAccumulator(n)
    acc.update(torch.as_tensor(losses))
    return acc.compute(labels=labels)


def brute_force(matrix, k, lowest=False, labels=None):
    n = matrix.shape[0]
    idx, vals = [], []
    for q in range(n):
        candidates = [j for j in range(n) if j != q and (labels is None or labels[j] != labels[q])]
        row = matrix[q, candidates]
        # stable sort: ties go to the smaller index
        order = np.argsort(row if lowest else -row, kind="stable")[:k]
        idx.append(np.asarray(candidates)[order])
        vals.append(row[order])
    return np.array(idx), np.array(vals)


@pytest.mark.parametrize("lowest", [False, True])
def test_matches_brute_force(lowest):
    kernel = random_kernel()
    R = kernel.correlation.numpy()
    idx, vals = top_correlated(kernel, k=6, lowest=lowest)
    want_idx, want_vals = brute_force(R, 6, lowest)
    assert idx.shape == (40, 6) and vals.shape == (40, 6) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(vals, want_vals)
    assert not (idx == np.arange(40)[:, None]).any(), "a query is never its own neighbour"
    assert np.all(np.diff(vals, axis=1) >= 0 if lowest else np.diff(vals, axis=1) <= 0)


def test_one_query_and_a_list_of_queries():
    kernel = random_kernel()
    all_idx, all_vals = top_correlated(kernel, k=3)
    idx, vals = top_correlated(kernel, 7, 3)
    assert idx.shape == (3,) and vals.shape == (3,)
    np.testing.assert_array_equal(idx, all_idx[7])
    idx, vals = top_correlated(kernel, [7, 2, 7], k=3)
    np.testing.assert_array_equal(idx, all_idx[[7, 2, 7]])
    np.testing.assert_array_equal(vals, all_vals[[7, 2, 7]])
    idx, _ = top_correlated(kernel, np.int64(7), k=3)  # a numpy scalar is one query too
    assert idx.shape == (3,)


def test_covariance_ranking_and_plain_matrices():
    kernel = random_kernel()
    K = kernel.covariance.numpy()
    idx, vals = top_correlated(kernel, k=4, use="covariance")
    np.testing.assert_array_equal(idx, brute_force(K, 4)[0])
    # a plain matrix is taken as a covariance and normalised for use="correlation"
    np.testing.assert_array_equal(top_correlated(torch.tensor(K), k=4)[0], top_correlated(kernel, k=4)[0])
    # the query is excluded even where its own entry is not the largest of its row
    idx, _ = top_correlated(K * 0 + np.eye(40) * -5 + 1, k=39, use="covariance")
    assert not (idx == np.arange(40)[:, None]).any()


def test_ties_go_to_the_smaller_index_and_are_reported():
    R = np.eye(6)
    R[0, 1:] = R[1:, 0] = [0.5, 0.9, 0.5, 0.5, 0.9]
    with pytest.warns(neighbours.TiedNeighboursWarning, match=r"1 of 1 queries \(e.g. \[0\]\).*probe order"):
        idx, vals = top_correlated(R, 0, k=3)
    np.testing.assert_array_equal(idx, [2, 5, 1])
    np.testing.assert_array_equal(vals, [0.9, 0.9, 0.5])
    with pytest.warns(neighbours.TiedNeighboursWarning):
        idx, _ = top_correlated(R, 0, k=4, lowest=True)
    np.testing.assert_array_equal(idx, [1, 3, 4, 2])
    # all rows, a tie straddling the k-th place, against the stable brute force
    rng = np.random.default_rng(1)
    A = np.round(rng.uniform(-1, 1, (30, 30)), 1)
    M = (A + A.T) / 2
    for lowest in (False, True):
        with pytest.warns(neighbours.TiedNeighboursWarning):
            got = top_correlated(M, k=5, lowest=lowest, use="covariance")[0]
        np.testing.assert_array_equal(got, brute_force(M, 5, lowest)[0])


def test_ties_inside_the_list_are_not_reported():
    """Ties that do not reach beyond the k listed decide nothing: no warning."""
    R = np.eye(5)
    R[0, 1:] = R[1:, 0] = [0.9, 0.9, 0.1, 0.2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx, _ = top_correlated(R, 0, k=2)
    np.testing.assert_array_equal(idx, [1, 2])


def test_zero_variance_queries_are_named_in_the_warning():
    kernel = random_kernel(n=12)
    cov = kernel.covariance.numpy().copy()
    cov[4, :] = cov[:, 4] = 0.0  # sample 4's loss never moved: R = 0 with every sample
    with pytest.warns(neighbours.TiedNeighboursWarning, match=r"zero variance \(e.g. sample \[4\]\)"):
        top_correlated(cov, k=3)


def test_exclude_same_label(monkeypatch):
    labels = np.arange(40) % 4
    kernel = random_kernel(labels=labels)
    R = kernel.correlation.numpy()
    want_idx, want_vals = brute_force(R, 5, labels=labels)
    idx, vals = top_correlated(kernel, k=5, exclude_same_label=True)  # labels from the kernel
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(vals, want_vals)
    assert not (labels[idx] == labels[:, None]).any()
    idx2, _ = top_correlated(R, k=5, labels=torch.tensor(labels), exclude_same_label=True)
    np.testing.assert_array_equal(idx2, want_idx)
    # the same answer when the rows are processed in small chunks
    monkeypatch.setattr(neighbours, "_ROWS_PER_CHUNK", 7)
    np.testing.assert_array_equal(top_correlated(kernel, k=5, exclude_same_label=True)[0], want_idx)


def test_bad_inputs_name_the_argument():
    kernel = random_kernel(n=10)
    with pytest.raises(ValueError, match="k must be < n=10"):
        top_correlated(kernel, k=10)
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_correlated(kernel, k=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_correlated(kernel, k=2.0)
    with pytest.raises(ValueError, match="index must be in \\[0, n=10\\)"):
        top_correlated(kernel, 10)
    with pytest.raises(ValueError, match="labels must have one entry per probe sample: length 10, got 9"):
        top_correlated(kernel, labels=np.zeros(9), exclude_same_label=True)
    with pytest.raises(ValueError, match="labels must be given"):
        top_correlated(kernel, exclude_same_label=True)
    # 5 samples share query 0's label: only 5 candidates remain
    with pytest.raises(ValueError, match="k must be .* at most the 5 candidates"):
        top_correlated(kernel, 0, k=6, labels=np.arange(10) % 2, exclude_same_label=True)
    with pytest.raises(ValueError, match="use must be one of"):
        top_correlated(kernel, use="distance")
    with pytest.raises(ValueError, match="kernel must be a square"):
        top_correlated(np.ones((3, 4)))
    one_draw = LossKernel(covariance=torch.zeros(3, 3), mean=torch.zeros(3), variance=torch.zeros(3), num_draws=1)
    with pytest.raises(ValueError, match="kernel must be estimated from at least 2 draws"):
        top_correlated(one_draw, k=1)
    rect = LossKernel(covariance=torch.zeros(2, 3), mean=torch.zeros(3), variance=torch.ones(3),
                      num_draws=5, rows=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="kernel must be a square n×n kernel, got a rectangular"):
        top_correlated(rect, k=1)
