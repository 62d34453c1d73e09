"""R from K: the loss correlation R(x, x') = K(x, x') / √(K(x, x) K(x', x')), 0 where a variance is 0."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["correlation_from_covariance"]


def correlation_from_covariance(
    covariance: torch.Tensor, variance: torch.Tensor, rows: Optional[torch.Tensor] = None,
    columns: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """R(x, x') = K(x, x') / √(K(x, x) K(x', x')), with R = 0 wherever a variance is 0.

    Args:
        covariance: K, [n, n] (or [q, n] with ``rows`` naming the q row samples).
        variance: K(x, x) for all n samples, [n].
        rows: optional [q] indices of the row samples of a rectangular K.
        columns: optional [m] indices of its column samples (all n when None).
    Returns:
        R with K's shape; entries are clamped to [-1, 1] (rounding can overshoot by an ulp),
        and R(x, x) = 1 exactly wherever Var[ℓ(x)] > 0.

    >>> K = torch.tensor([[4.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    >>> correlation_from_covariance(K, torch.diagonal(K)).tolist()    # sample 2 never varies: R = 0
    [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]
    >>> correlation_from_covariance(K[[1]], torch.diagonal(K), rows=torch.tensor([1])).tolist()
    [[0.5, 1.0, 0.0]]
    """
    std = variance.clamp(min=0).sqrt()
    inv_std = torch.where(std > 0, 1.0 / std.clamp(min=torch.finfo(std.dtype).tiny), 0.0)
    row_inv = inv_std if rows is None else inv_std[rows]
    col_inv = inv_std if columns is None else inv_std[columns]
    # one q×n allocation: K · diag(1/σ_row) · diag(1/σ_col), in place after the first product
    corr = covariance * row_inv[:, None]
    corr.mul_(col_inv[None, :]).clamp_(-1.0, 1.0)
    # R(x, x) = 1 exactly where a sample is both a row and a column
    row_ids = torch.arange(len(variance), device=corr.device) if rows is None else rows.to(corr.device)
    col_ids = torch.arange(len(variance), device=corr.device) if columns is None else columns.to(corr.device)
    position = torch.full((len(variance),), -1, dtype=torch.long, device=corr.device)
    position[col_ids] = torch.arange(len(col_ids), device=corr.device)
    at = position[row_ids]
    keep = at >= 0
    corr[torch.arange(len(row_ids), device=corr.device)[keep], at[keep]] = (row_inv[keep] > 0).to(corr.dtype)
    return corr
