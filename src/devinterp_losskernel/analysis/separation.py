"""Task separation (paper, Section 3, Fig. 3B and 3D).

For a model trained on two tasks (modular addition and division), the loss kernel couples
samples of the same task and leaves samples of different tasks nearly uncorrelated:

- :func:`pc1_separation`: each sample's row of R̂ (or K̂) is its *loss-response vector*, how
  its loss co-moves with every probe sample. The first principal component of these vectors
  alone separates the tasks (paper: ROC-AUC 0.931).
- :func:`group_covariances`: within-task covariances are heavy-tailed and skewed, cross-task
  ones narrow and near-normal (Fig. 3D); this collects them per group pair, with summaries.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Tuple

import numpy as np

from ..extras import pandas_for as _pandas
from ..validation import KERNEL_USES, as_labels, as_two_groups, checked_kernel, py_scalar
from .memorization import _auc

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["GroupCovariances", "PC1Separation", "group_covariances", "pc1_separation"]

_DENSE_SVD_MAX_N = 500  # above this, an iterative solver finds the one component needed


@dataclass(frozen=True)
class PC1Separation:
    """Result of :func:`pc1_separation`.

    Attributes:
        projection: [n] each sample's coordinate on the first principal component, oriented
            so that the second group (``groups[1]``) has the larger values.
        component: [n] the unit-norm first principal direction (same orientation).
        auc: ROC-AUC of ``projection`` for telling ``groups[1]`` from ``groups[0]``; since the
            orientation is chosen, this is max(AUC, 1 − AUC) of either sign, in [0.5, 1].
        explained_variance_ratio: share of the total variance of the centred loss-response
            vectors along the component.
        groups: (first, second) group values, in sorted order.
        mask: bool [n], True for samples of the second group.
        use: ``"correlation"`` or ``"covariance"``, the rows that were projected.
    """

    projection: np.ndarray
    component: np.ndarray
    auc: float
    explained_variance_ratio: float
    groups: Tuple[Any, Any]
    mask: np.ndarray
    use: str


def _first_component(centred: np.ndarray) -> Tuple[np.ndarray, float]:
    """Top right-singular vector [n] and top singular value of a centred [n, n] matrix; warns
    when the top two singular values are equal (PC1 is then not unique: any direction in their
    plane would do, and the one returned depends on the probe order)."""
    if min(centred.shape) <= _DENSE_SVD_MAX_N:
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
    else:
        from scipy.sparse.linalg import svds

        v0 = np.random.default_rng(0).standard_normal(min(centred.shape))  # deterministic start, own generator
        _, s, vt = svds(centred, k=2, v0=v0, solver="arpack")
        order = np.argsort(-s)
        s, vt = s[order], vt[order]
    if len(s) > 1 and s[1] >= s[0] * (1 - 1e-9):
        warnings.warn(f"pc1_separation: the first principal component is not unique (the top two singular "
                      f"values are equal, {s[0]:.6g}); the projection returned is one of many and depends on "
                      "the probe order", RuntimeWarning, stacklevel=3)
    return vt[0], float(s[0])


def _orient(projection: np.ndarray, component: np.ndarray, mask: np.ndarray,
            auc: float) -> Tuple[np.ndarray, np.ndarray, float]:
    """The sign of PC1 (no position decides it): the second group's side (AUC ≥ 0.5); at
    AUC = 0.5 the side of the second group's larger mean, then of the positive third moment."""
    flip = auc < 0.5
    if auc == 0.5:
        gap = projection[mask].mean() - projection[~mask].mean()
        flip = gap < 0 if gap != 0 else float(np.sum(projection ** 3)) < 0
    if flip:
        return -projection, -component, 1.0 - auc
    return projection, component, auc


def pc1_separation(kernel: Any, groups: Any, *, use: str = "correlation") -> PC1Separation:
    """Separate two groups (e.g. tasks) along the first principal component of the kernel's rows.

    Row i of R̂ (or K̂), r_i ∈ ℝⁿ, is sample x_i's loss-response vector. With the rows centred
    (r_i − r̄) and v₁ their first principal direction, the projection p_i = (r_i − r̄)·v₁ is
    scored by ROC-AUC against the two groups.

    Args:
        kernel: a square :class:`LossKernel` or matrix [n, n] (a matrix is taken as K̂).
        groups: [n] labels with exactly two distinct values (bool, ints, strings).
        use: ``"correlation"`` (R̂, default: every sample's row on the same scale) or
            ``"covariance"`` (K̂).

    Returns:
        A :class:`PC1Separation` with the projection [n], direction [n], AUC and explained
        variance ratio.
    """
    checked = checked_kernel(kernel)
    n = checked.n
    mask, names = as_two_groups(groups, n)
    if use not in KERNEL_USES:
        raise ValueError(f"use must be one of {KERNEL_USES}, got {use!r}")
    if n < 3:
        raise ValueError(f"kernel must have at least 3 samples for a principal component, got n={n}")
    matrix = checked.matrix(use)
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    total = float(np.square(centred).sum())
    if not total > 0:
        raise ValueError("kernel rows are all identical: the centred loss-response vectors have no variance")
    component, top = _first_component(centred)
    projection = centred @ component
    projection, component, auc = _orient(projection, component, mask, _auc(projection, mask))
    return PC1Separation(
        projection=projection, component=component, auc=float(auc),
        explained_variance_ratio=top**2 / total, groups=names, mask=mask, use=use,
    )


@dataclass(frozen=True)
class GroupCovariances:
    """Off-diagonal kernel values by group pair (result of :func:`group_covariances`).

    Attributes:
        values: {(a, b): float64 array} for every pair a ≤ b of groups: within a group (a, a)
            the entries K(x_i, x_j), i < j, both in a; across groups all K(x_i, x_j), i in a,
            j in b.
        summary: one row per pair: ``group_a``, ``group_b``, ``kind`` ("within"/"cross"),
            ``count``, ``mean``, ``std``, ``median``, ``mean_abs``, ``q05``, ``q95``,
            ``skewness``, ``excess_kurtosis`` (0 for a normal distribution).
        use: ``"covariance"`` or ``"correlation"``.
    """

    values: Dict[Tuple[Any, Any], np.ndarray]
    summary: pd.DataFrame
    use: str


def _moments_summary(x: np.ndarray) -> Dict[str, float]:
    if x.size == 0:
        return dict(count=0, mean=np.nan, std=np.nan, median=np.nan, mean_abs=np.nan,
                    q05=np.nan, q95=np.nan, skewness=np.nan, excess_kurtosis=np.nan)
    mean = float(x.mean())
    d = x - mean
    m2 = float(np.mean(d**2))
    std = float(np.sqrt(m2))
    skew = float(np.mean(d**3)) / m2**1.5 if m2 > 0 else np.nan
    kurt = float(np.mean(d**4)) / m2**2 - 3.0 if m2 > 0 else np.nan
    q05, median, q95 = np.quantile(x, [0.05, 0.5, 0.95])
    return dict(count=int(x.size), mean=mean, std=std, median=float(median),
                mean_abs=float(np.abs(x).mean()), q05=float(q05), q95=float(q95),
                skewness=skew, excess_kurtosis=kurt)


def group_covariances(kernel: Any, groups: Any, *, use: str = "covariance") -> GroupCovariances:
    """Collect within-group and cross-group off-diagonal kernel values (paper, Fig. 3D).

    Args:
        kernel: a square :class:`LossKernel` or matrix [n, n] (a matrix is taken as K̂).
        groups: [n] group labels (any number of groups; each pair is reported).
        use: ``"covariance"`` (K̂, default, as in the paper) or ``"correlation"`` (R̂).

    Returns:
        A :class:`GroupCovariances` with the values per pair (for histograms, see
        :func:`~devinterp_losskernel.plotting.plot_covariance_histograms`) and a summary table.
    """
    pd = _pandas("group_covariances")
    checked = checked_kernel(kernel)
    n = checked.n
    labels = as_labels(groups, n, "groups")
    matrix = checked.matrix(use)
    names = np.unique(labels)
    members = {g: np.flatnonzero(labels == g) for g in names}
    values, rows = {}, []
    for i, a in enumerate(names):
        for b in names[i:]:
            block = matrix[np.ix_(members[a], members[b])]
            if a == b:
                vals = block[np.triu_indices(block.shape[0], k=1)]
            else:
                vals = block.ravel()
            key = (py_scalar(a), py_scalar(b))
            values[key] = vals
            rows.append(dict(group_a=key[0], group_b=key[1], kind="within" if a == b else "cross",
                             **_moments_summary(vals)))
    return GroupCovariances(values=values, summary=pd.DataFrame(rows), use=use)
