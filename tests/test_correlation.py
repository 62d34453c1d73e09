"""R from K (correlation.py): diag 1, R = 0 where a variance is 0, numpy's corrcoef elsewhere,
rectangular and combined shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devinterp_losskernel.correlation import correlation_from_covariance


def trace(seed=0, draws=40, n=6):
    losses = np.random.default_rng(seed).normal(size=(draws, n)) @ np.random.default_rng(seed + 1).normal(size=(n, n))
    losses[:, 2] = 3.0  # a sample whose loss never moves: variance 0
    return losses


def test_matches_numpy_corrcoef_with_zero_variance_rows_and_columns_set_to_zero():
    losses = trace()
    K = torch.from_numpy(np.cov(losses, rowvar=False))
    R = correlation_from_covariance(K, torch.diagonal(K))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.corrcoef(losses, rowvar=False)
    expected[2, :] = expected[:, 2] = 0.0
    np.fill_diagonal(expected, 1.0)
    expected[2, 2] = 0.0
    np.testing.assert_allclose(R.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_the_diagonal_is_exactly_one_where_the_variance_is_positive():
    K = torch.from_numpy(np.cov(trace(3), rowvar=False))
    R = correlation_from_covariance(K, torch.diagonal(K))
    assert torch.diagonal(R).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert float(R.abs().max()) <= 1.0
    torch.testing.assert_close(R, R.T, rtol=0, atol=1e-15)


def test_zero_everywhere_for_a_sample_that_never_varies():
    K = torch.tensor([[4.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    R = correlation_from_covariance(K, torch.diagonal(K))
    assert R[1].tolist() == [0.0, 0.0, 0.0] and R[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert R[0, 2] == pytest.approx(1.0)


def test_rounding_past_one_is_clamped():
    K = torch.tensor([[1.0, 1.0 + 1e-15], [1.0 + 1e-15, 1.0]], dtype=torch.float64)
    assert float(correlation_from_covariance(K, torch.diagonal(K)).max()) == 1.0


def test_rectangular_rows_and_combined_columns_are_the_full_matrix_slices():
    K = torch.from_numpy(np.cov(trace(5), rowvar=False))
    full = correlation_from_covariance(K, torch.diagonal(K))
    rows = torch.tensor([4, 0, 2])
    rect = correlation_from_covariance(K[rows], torch.diagonal(K), rows=rows)
    torch.testing.assert_close(rect, full[rows], rtol=0, atol=1e-15)
    assert rect[0, 4] == 1.0 and rect[1, 0] == 1.0 and rect[2, 2] == 0.0
    combined = correlation_from_covariance(K[rows][:, rows], torch.diagonal(K), rows=rows, columns=rows)
    torch.testing.assert_close(combined, full[rows][:, rows], rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_the_dtype_and_leaves_its_inputs_alone(dtype):
    K = torch.from_numpy(np.cov(trace(7), rowvar=False)).to(dtype)
    before = K.clone()
    R = correlation_from_covariance(K, torch.diagonal(K).clone())
    assert R.dtype == dtype and torch.equal(K, before)
