"""Nearest neighbours in the loss kernel: the inputs whose losses move with a query's.

The paper's Fig. 4/5 show, for query images, the k probe samples with the highest
correlation R(x, x'); with ``exclude_same_label=True`` same-label samples are skipped, the
deconfounding of Appendix B (noise in the unembedding makes same-label losses co-vary).

Ties. A list of k neighbours must pick among samples tied at the k-th value, and any pick
depends on where the samples sit in the probe. :func:`top_correlated` gives ties to the
smaller index and warns (:class:`TiedNeighboursWarning`) whenever that decided a list — most
often a zero-variance sample, whose R is 0 with every sample. The analyses built on
neighbours (lift, label-issue scores) use :func:`_neighbour_weights` instead, which shares
the remaining places equally among the tied samples, so no position decides anything.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import numpy as np

from ..validation import CheckedKernel, check_index, check_k, checked_kernel, kernel_labels

__all__ = ["TiedNeighboursWarning", "top_correlated"]

_ROWS_PER_CHUNK = 1024  # bounds the [chunk, n] working arrays for large n


class TiedNeighboursWarning(UserWarning):
    """A query's k-th neighbour is tied with samples left off its list: which of the tied
    samples are listed depends on the probe order (ties go to the smaller index)."""


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
        kernel: a square :class:`LossKernel`, a :class:`~devinterp_losskernel.validation.CheckedKernel`
            or a matrix [n, n] (a matrix is taken as K̂ and normalised to R̂ when
            ``use="correlation"``).
        index: one query index → results [k]; a non-empty sequence of q indices → [q, k];
            None → every sample is a query, [n, k].
        k: neighbours per query, 1 ≤ k < n (and at most the candidates left after
            ``exclude_same_label``).
        labels: [n] labels, for ``exclude_same_label``; default ``kernel.labels``.
        exclude_same_label: skip candidates with the query's label (paper, Appendix B).
        lowest: return the k *lowest* values (most anti-correlated) instead.
        use: rank by ``"correlation"`` R̂ (default) or ``"covariance"`` K̂.

    Returns:
        (indices, values): int64 and float64 arrays, sorted from the most to the least
        extreme; ties go to the smaller index, with a :class:`TiedNeighboursWarning` naming
        the queries whose list a tie decided (e.g. zero-variance samples, R = 0 with all).

    Example (sample 1 moves with sample 0, sample 2 against it, sample 3 not at all):

    >>> import torch
    >>> from devinterp_losskernel import loss_kernel
    >>> kernel = loss_kernel(torch.tensor([[1.0, 2.0, 6.0, 5.0], [2.0, 4.0, 4.0, 5.0], [3.0, 6.0, 2.0, 5.0]]))
    >>> top_correlated(kernel, index=0, k=2)
    (array([1, 3]), array([1., 0.]))
    >>> top_correlated(kernel, index=0, k=1, lowest=True)
    (array([2]), array([-1.]))
    """
    for flag, value in (("exclude_same_label", exclude_same_label), ("lowest", lowest)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    checked = checked_kernel(kernel)
    n = checked.n
    label_arr = kernel_labels(checked, labels, n) if exclude_same_label else None
    single = index is not None and np.ndim(index) == 0
    queries = np.arange(n) if index is None else np.atleast_1d(check_index(index, n, allow_empty=False))
    k = check_k(k, n, available=_available(label_arr, queries, n))
    matrix = checked.matrix(use)
    indices, values, tied = _top_correlated(matrix, queries, k, lowest=lowest, labels=label_arr)
    if tied.any():
        _warn_ties(checked, queries[tied], len(queries), k, use)
    if single:
        return indices[0], values[0]
    return indices, values


def _available(labels: Optional[np.ndarray], queries: np.ndarray, n: int) -> int:
    """Candidates of the worst-off query: n − 1, or n − its label's count without same-label ones."""
    if labels is None:
        return n - 1
    label_values, counts = np.unique(labels, return_counts=True)
    queried = np.isin(label_values, labels[queries])
    return n - int(counts[queried].max())


def _warn_ties(checked: CheckedKernel, tied_queries: np.ndarray, num_queries: int, k: int, use: str) -> None:
    zero = tied_queries[checked.variance[tied_queries] == 0] if use == "correlation" else tied_queries[:0]
    why = (f"; {len(zero)} of them have zero variance (e.g. sample {zero[:5].tolist()}), so R is 0 with every "
           "sample and their neighbours mean nothing" if len(zero) else "")
    warnings.warn(
        f"top_correlated: for {len(tied_queries)} of {num_queries} queries (e.g. {tied_queries[:5].tolist()}) "
        f"the k-th neighbour (k={k}) is tied with samples left off the list; ties go to the smaller index, so "
        f"which tied samples are listed depends on the probe order{why}",
        TiedNeighboursWarning, stacklevel=3)


def _top_correlated(matrix: np.ndarray, queries: np.ndarray, k: int, *, lowest: bool = False,
                    labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trusted core of :func:`top_correlated` (inputs already checked).

    Args:
        matrix: finite float64 [n, n]. queries: int64 [q]. k: 1 ≤ k ≤ candidates.
        labels: [n] or None (None: every other sample is a candidate).

    Returns:
        indices int64 [q, k], values float64 [q, k], tied bool [q] (the k-th value also
        occurs among the candidates left off).
    """
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    values = np.empty((queries.shape[0], k), dtype=np.float64)
    tied = np.zeros(queries.shape[0], dtype=bool)
    for start in range(0, queries.shape[0], _ROWS_PER_CHUNK):
        rows = queries[start : start + _ROWS_PER_CHUNK]
        key = _keys(matrix[rows], rows, lowest, labels)
        idx, tie = _top_k_rows(key, k)
        indices[start : start + len(rows)] = idx
        values[start : start + len(rows)] = np.take_along_axis(matrix[rows], idx, axis=1)
        tied[start : start + len(rows)] = tie
    return indices, values, tied


def _keys(block: np.ndarray, rows: np.ndarray, lowest: bool, labels: Optional[np.ndarray]) -> np.ndarray:
    """Sort keys [q, n]: ascending key = the order wanted; +inf for the query itself and (with
    labels) its label's samples."""
    key = block.copy() if lowest else -block
    key[np.arange(len(rows)), rows] = np.inf
    if labels is not None:
        key[labels[rows][:, None] == labels[None, :]] = np.inf
    return key


def _top_k_rows(key: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Column indices [q, k] of the k smallest keys of each row, ties to the smaller index, and
    whether a tie at the k-th key reaches beyond the k listed, bool [q]."""
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
    return idx, ties


def _neighbour_weights(matrix: np.ndarray, k: int, *, lowest: bool = False,
                       labels: Optional[np.ndarray] = None):
    """Every sample's top-k neighbours as weights, with ties shared (trusted inputs).

    W[i, j] = 1 for the candidates j strictly inside query i's top k; when m more places are
    left for the t candidates tied at the k-th value, each of them gets m / t. Rows sum to k,
    and W permutes with the probe (no position breaks a tie).

    Args:
        matrix: finite float64 [n, n]. k: 1 ≤ k ≤ the candidates of every query.
        labels: [n] or None; with labels, same-label candidates are excluded.

    Returns:
        scipy.sparse CSR matrix [n, n] of float64.
    """
    from scipy.sparse import csr_matrix

    n = matrix.shape[0]
    parts_r, parts_c, parts_w = [], [], []
    for start in range(0, n, _ROWS_PER_CHUNK):
        rows = np.arange(start, min(n, start + _ROWS_PER_CHUNK))
        key = _keys(matrix[rows], rows, lowest, labels)
        kth = np.partition(key, k - 1, axis=1)[:, k - 1 : k]
        strict, tied = key < kth, key == kth
        share = (k - strict.sum(axis=1)) / tied.sum(axis=1)
        r, c = np.nonzero(strict | tied)
        parts_r.append(rows[r])
        parts_c.append(c)
        parts_w.append(np.where(strict[r, c], 1.0, share[r]))
    return csr_matrix((np.concatenate(parts_w), (np.concatenate(parts_r), np.concatenate(parts_c))),
                      shape=(n, n))
