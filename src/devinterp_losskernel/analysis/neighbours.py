"""Nearest neighbours in the loss kernel: the inputs whose losses move with a query's.

The paper's Fig. 4/5 show, for query images, the k probe samples with the highest
correlation R(x, x'); with ``exclude_same_label=True`` same-label samples are skipped, the
deconfounding of Appendix B (noise in the unembedding makes same-label losses co-vary).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ..validation import check_index, check_k, kernel_labels, kernel_matrix

__all__ = ["top_correlated"]

_ROWS_PER_CHUNK = 1024  # bounds the [chunk, n] working arrays for large n


def top_correlated(
    kernel: Any,
    index: Any = None,
    k: int = 5,
    *,
    labels: Any = None,
    exclude_same_label: bool = False,
    lowest: bool = False,
    use: str = "correlation",
) -> Tuple[np.ndarray, np.ndarray]:
    """The k samples most (or least) correlated with each query; never the query itself.

    Args:
        kernel: a square :class:`LossKernel` or matrix [n, n] (a matrix is taken as K̂ and
            normalised to R̂ when ``use="correlation"``).
        index: one query index → results [k]; a sequence of q indices → [q, k];
            None → every sample is a query, [n, k].
        k: neighbours per query, 1 ≤ k < n (and at most the candidates left after
            ``exclude_same_label``).
        labels: [n] labels, for ``exclude_same_label``; default ``kernel.labels``.
        exclude_same_label: skip candidates with the query's label (paper, Appendix B).
        lowest: return the k *lowest* values (most anti-correlated) instead.
        use: rank by ``"correlation"`` R̂ (default) or ``"covariance"`` K̂.

    Returns:
        (indices, values): int64 and float64 arrays, sorted from the most to the least
        extreme; ties go to the smaller index.
    """
    matrix = kernel_matrix(kernel, use)
    n = matrix.shape[0]
    if not isinstance(exclude_same_label, (bool, np.bool_)):
        raise ValueError(f"exclude_same_label must be True or False, got {exclude_same_label!r}")
    label_arr = kernel_labels(kernel, labels, n) if exclude_same_label else None
    single = index is not None and np.ndim(index) == 0
    queries = np.arange(n) if index is None else np.atleast_1d(check_index(index, n))
    available = n - 1
    if label_arr is not None and queries.size:
        label_values, counts = np.unique(label_arr, return_counts=True)
        queried = np.isin(label_values, label_arr[queries])
        available = n - int(counts[queried].max())
    k = check_k(k, n, available=available)
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    values = np.empty((queries.shape[0], k), dtype=np.float64)
    for start in range(0, queries.shape[0], _ROWS_PER_CHUNK):
        rows = queries[start : start + _ROWS_PER_CHUNK]
        idx = _top_k_rows(matrix[rows], rows, k, lowest, label_arr)
        indices[start : start + len(rows)] = idx
        values[start : start + len(rows)] = np.take_along_axis(matrix[rows], idx, axis=1)
    if single:
        return indices[0], values[0]
    return indices, values


def _top_k_rows(block: np.ndarray, rows: np.ndarray, k: int, lowest: bool,
                labels: Optional[np.ndarray]) -> np.ndarray:
    """Column indices of the k largest (smallest if ``lowest``) entries of each row,
    skipping the query's own column and (optionally) its label's columns."""
    key = block.copy() if lowest else -block  # ascending order of key = the order we want
    excluded = np.zeros(key.shape, dtype=bool)
    excluded[np.arange(len(rows)), rows] = True
    if labels is not None:
        excluded |= labels[rows][:, None] == labels[None, :]
    key[excluded] = np.inf
    # argpartition is O(n) per row; rows where the k-th value is tied with the (k+1)-th
    # are redone with a stable full sort so that ties always go to the smaller index.
    part = np.argpartition(key, k - 1, axis=1)[:, :k]
    part_key = np.take_along_axis(key, part, axis=1)
    order = np.lexsort((part, part_key), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    kth = np.take_along_axis(key, idx[:, -1:], axis=1)
    ties = (key == kth).sum(axis=1) > (np.take_along_axis(key, idx, axis=1) == kth).sum(axis=1)
    for r in np.flatnonzero(ties):
        idx[r] = np.argsort(key[r], kind="stable")[:k]
    return idx
