"""Lift: do a sample's kernel neighbours share its taxonomy node or attribute more than chance?

Taxonomic lift (paper, Appendix D.2). For each query i with label y(i) at depth d(i) in the
hierarchy, take its top-k neighbours NN_k(i) under the correlation kernel R (k = 30 in the
paper) among the samples with a *different* label (identical-label pairs are excluded, so
same-label co-variation — Appendix B — cannot produce trivial lift). For an ancestor depth
d' ≤ d, a pair (i, j) "shares a node at depth d'" when y(i) and y(j) have a common ancestor
a at depth d' (a ⪯ y(i) ∧ a ⪯ y(j)), i.e. depth(lca(y(i), y(j))) ≥ d'. Then

    Lift(d, d') = Pr[share at d' | j ∈ NN_k(i), d(i) = d] / Pr[share at d' | base]

The numerator averages, over the queries at depth d, the fraction of their k neighbours
that share. The base rate (``base_rate="query_depth"``, default) averages, over the *same*
queries, the fraction of all different-label samples that share: the chance level of the
same neighbour draw with the kernel replaced by a random choice. This keeps the paper's
conditioning on query depth ("to avoid confounding from the uneven leaf-depth
distribution") on both sides, so Lift = 1 exactly means "no better than chance" and a
random kernel gives Lift ≈ 1 in every cell. ``base_rate="all"`` instead divides by the
base rate over all queries, as the formula in D.2 is literally written (no d(i) = d in
the denominator).

Ties: the samples tied at a query's k-th place share the places left (each counts m / t
for m places among t tied samples), so no position in the probe decides a lift; farthest-
point sampling breaks ties between equally far colours by the colours themselves.

Attribute lift (Appendix D.3, D.6: colour lift, per-node lift) does the same for any
grouping: the fraction of a query's neighbours in its group over the fraction of all
different-label samples in its group. Colour groups come from :func:`color_groups`:
farthest-point sampling on the images' mean RGB colours.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple

import numpy as np

from ..extras import pandas_for as _pandas
from ..hierarchy import Hierarchy
from ..validation import (
    KERNEL_USES,
    CheckedKernel,
    as_array,
    as_labels,
    check_finite,
    check_k,
    checked_kernel,
    kernel_labels,
)
from .neighbours import _neighbour_weights

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "AttributeLift",
    "attribute_lift",
    "color_groups",
    "correlation_by_tree_distance",
    "farthest_point_sampling",
    "mean_colors",
    "taxonomic_lift",
]

_BASE_RATES = ("query_depth", "all")


def _check_hierarchy(hierarchy: Any) -> Hierarchy:
    if not isinstance(hierarchy, Hierarchy):
        raise ValueError(
            f"hierarchy must be a devinterp_losskernel.hierarchy.Hierarchy (e.g. from "
            f"Hierarchy.from_parents or wordnet_imagenet()), got {type(hierarchy).__name__}"
        )
    return hierarchy


def _check_use(use: Any) -> str:
    if use not in KERNEL_USES:
        raise ValueError(f"use must be one of {KERNEL_USES}, got {use!r}")
    return use


def _check_k(k: Any, n: int, label_arr: Optional[np.ndarray]) -> int:
    """k ≤ the candidates of every query (n − 1, or n − the largest label's count)."""
    available = n - 1 if label_arr is None else n - int(np.unique(label_arr, return_counts=True)[1].max())
    return check_k(k, n, available=available)


def _neighbours(checked: CheckedKernel, label_arr: Optional[np.ndarray], k: int, use: str, lowest: bool):
    """Every query's top-k neighbours (different-label only when labels are given) as weights
    (COO [n, n], rows summing to k): samples tied at the k-th place share the places left, so
    no position in the probe decides a lift."""
    return _neighbour_weights(checked.matrix(use), k, lowest=lowest, labels=label_arr).tocoo()


def taxonomic_lift(
    kernel: Any,
    labels: Any,
    hierarchy: Hierarchy,
    k: int = 30,
    *,
    use: str = "correlation",
    base_rate: str = "query_depth",
) -> pd.DataFrame:
    """Taxonomic lift Lift(d, d′) of the paper's Appendix D.2 (see the module docstring).

    Args:
        kernel: a square :class:`~devinterp_losskernel.LossKernel` or matrix [n, n] (a
            matrix is taken as K̂; neighbours are ranked by R̂ unless ``use="covariance"``).
        labels: [n] labels (class indices or node names of ``hierarchy``); None → the
            kernel's own labels.
        hierarchy: the label tree; every label must resolve to a node
            (:meth:`Hierarchy.node_of`).
        k: neighbours per query (paper: 30), 1 ≤ k ≤ n − (largest label count).
        use: rank neighbours by ``"correlation"`` R̂ (paper) or ``"covariance"`` K̂.
        base_rate: ``"query_depth"`` (default; base rate over the queries at depth d) or
            ``"all"`` (over all queries, the formula's literal denominator).

    Returns:
        DataFrame of Lift(d, d′): index ``query_depth`` d (depths that have queries),
        columns ``ancestor_depth`` d′ = 0 … max d; NaN where d′ > d or the base rate is 0
        (e.g. d′ = d for leaf classes: no different-label sample shares a leaf).
        Lift(d, 0) = 1 (everything shares the root). ``df.attrs`` holds
        ``"hit_rate"`` and ``"base_rate"`` (DataFrames, numerator and denominator),
        ``"num_queries"`` (Series, queries per depth) and ``"k"``.

    Raises:
        ValueError: labels of the wrong length, a label missing from the hierarchy,
            k too large, a bad ``use``/``base_rate``.
    """
    pd = _pandas("taxonomic_lift")
    if base_rate not in _BASE_RATES:
        raise ValueError(f"base_rate must be one of {_BASE_RATES}, got {base_rate!r}")
    hierarchy = _check_hierarchy(hierarchy)
    checked = checked_kernel(kernel)
    n = checked.n
    label_arr = kernel_labels(checked, labels, n)
    uniques, inverse, node_idx = hierarchy._label_nodes(label_arr, "labels")
    k = _check_k(k, n, label_arr)
    weights = _neighbours(checked, label_arr, k, _check_use(use), lowest=False)

    lca = hierarchy._lca_depths(node_idx)                     # [u, u] depth of lca
    label_depth = hierarchy._depth[node_idx]                  # [u]
    counts = np.bincount(inverse, minlength=len(uniques))     # samples per label
    max_d = int(label_depth[inverse].max())
    levels = np.arange(max_d + 1)

    # numerator per query: fraction of its k neighbours whose label shares a depth-d' node
    pair_lca = lca[inverse[weights.row], inverse[weights.col]]  # [nnz], one per (query, neighbour)
    hit = np.stack([np.bincount(weights.row, weights=weights.data * (pair_lca >= d), minlength=n)
                    for d in levels], axis=1) / k             # [n, D+1]
    # base rate per label: fraction of different-label samples sharing a depth-d' node
    shares = lca[:, :, None] >= levels                        # [u, u, D+1]
    shares[np.arange(len(uniques)), np.arange(len(uniques))] = False
    candidates = n - counts                                   # > 0: check_k passed
    base_label = np.einsum("abd,b->ad", shares, counts) / candidates[:, None]
    base = base_label[inverse]                                # [n, D+1]

    query_depth = label_depth[inverse]
    depths = np.unique(query_depth)
    hit_rate = np.full((len(depths), max_d + 1), np.nan)
    base_rows = np.full((len(depths), max_d + 1), np.nan)
    for row, d in enumerate(depths):
        mask = query_depth == d
        hit_rate[row, : d + 1] = hit[mask, : d + 1].mean(axis=0)
        if base_rate == "query_depth":
            base_rows[row, : d + 1] = base[mask, : d + 1].mean(axis=0)
    if base_rate == "all":
        # Pr over all different-label pairs; a query shallower than d' shares nothing there
        overall = base.mean(axis=0)
        for row, d in enumerate(depths):
            base_rows[row, : d + 1] = overall[: d + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(base_rows > 0, hit_rate / base_rows, np.nan)

    index = pd.Index(depths.astype(int), name="query_depth")
    columns = pd.Index(levels.astype(int), name="ancestor_depth")
    result = pd.DataFrame(lift, index=index, columns=columns)
    result.attrs = {
        "hit_rate": pd.DataFrame(hit_rate, index=index, columns=columns),
        "base_rate": pd.DataFrame(base_rows, index=index, columns=columns),
        "num_queries": pd.Series([int((query_depth == d).sum()) for d in depths], index=index,
                                 name="num_queries"),
        "k": k,
    }
    return result


def correlation_by_tree_distance(kernel: Any, labels: Any, hierarchy: Hierarchy, *,
                                 use: str = "correlation") -> pd.DataFrame:
    """Mean R̂ (or K̂) over pairs of samples at each tree distance of their labels (the
    paper's Fig. 6C), different-label pairs only.

    Returns:
        DataFrame indexed by ``tree_distance`` with columns ``mean``, ``std`` and
        ``num_pairs`` (unordered pairs i < j).
    """
    pd = _pandas("correlation_by_tree_distance")
    hierarchy = _check_hierarchy(hierarchy)
    checked = checked_kernel(kernel)
    n = checked.n
    label_arr = kernel_labels(checked, labels, n)
    matrix = checked.matrix(_check_use(use))
    distance = hierarchy.distance_matrix(label_arr)
    upper = np.triu(np.ones((n, n), dtype=bool), 1) & (distance > 0)
    dist_values, values = distance[upper], matrix[upper]
    rows = []
    for d in np.unique(dist_values):
        chosen = values[dist_values == d]
        rows.append((int(d), float(chosen.mean()), float(chosen.std()), int(chosen.size)))
    frame = pd.DataFrame(rows, columns=["tree_distance", "mean", "std", "num_pairs"])
    return frame.set_index("tree_distance")


# ---------------------------------------------------------------------------------------------
# Attribute (colour, node) lift
# ---------------------------------------------------------------------------------------------
@dataclass
class AttributeLift:
    """Lift of "neighbour in the query's group" (paper, Appendix D.3, D.6).

    Attributes:
        mean_lift: the average per-group lift (the paper's "average per-colour lift";
            groups whose base rate is 0 are left out).
        pooled_lift: mean hit rate / mean base rate over all queries.
        per_group: DataFrame indexed by group: ``num_queries``, ``hit_rate`` (fraction of a
            query's k neighbours in its group, averaged), ``base_rate`` (fraction of its
            candidates in its group, averaged) and ``lift`` = hit_rate / base_rate.
        transition: DataFrame [g, g], row a, column b: the fraction of the neighbours of
            group-a queries that are in group b (rows sum to 1; the paper's Fig. 9).
        k: neighbours per query. excluded_same_label: whether same-label pairs were
            excluded (True whenever labels were known).
    """

    mean_lift: float
    pooled_lift: float
    per_group: pd.DataFrame
    transition: pd.DataFrame
    k: int
    excluded_same_label: bool


def attribute_lift(
    kernel: Any,
    groups: Any,
    k: int = 30,
    *,
    labels: Any = None,
    use: str = "correlation",
    lowest: bool = False,
) -> AttributeLift:
    """Lift of same-group among each sample's top-k kernel neighbours vs the base rate.

    Neighbours and base rate use the same candidates: with labels (given, or the kernel's
    own), every sample with a different label (identical-label pairs excluded, as for the
    taxonomic lift); without labels, every other sample.

    Args:
        kernel: a square LossKernel or matrix [n, n] (a matrix is taken as K̂).
        groups: [n] group of each sample: colour groups (:func:`color_groups`), hierarchy
            nodes (:meth:`Hierarchy.ancestors_at_depth`), any hashable values.
        k: neighbours per query (paper: 30).
        labels: [n] labels for the same-label exclusion; default ``kernel.labels``.
        use: rank by ``"correlation"`` (R̂, default) or ``"covariance"``.
        lowest: use the k *least* correlated samples instead (Fig. 9, bottom row).

    Returns:
        :class:`AttributeLift`.
    """
    pd = _pandas("attribute_lift")
    if not isinstance(lowest, (bool, np.bool_)):
        raise ValueError(f"lowest must be True or False, got {lowest!r}")
    checked = checked_kernel(kernel)
    n = checked.n
    group_arr = as_labels(groups, n, "groups")
    if labels is None and checked.labels is not None:
        labels = checked.labels
    label_arr = None if labels is None else as_labels(labels, n, "labels")
    k = _check_k(k, n, label_arr)
    weights = _neighbours(checked, label_arr, k, _check_use(use), lowest)
    group_values, group_idx = np.unique(group_arr, return_inverse=True)
    group_idx = group_idx.reshape(-1)
    num_groups = len(group_values)

    same = group_idx[weights.row] == group_idx[weights.col]
    hit = np.bincount(weights.row, weights=weights.data * same, minlength=n) / k   # [n]
    # candidates of query i in group g: samples of g minus those sharing i's label (or i)
    if label_arr is not None:
        label_values, label_idx = np.unique(label_arr, return_inverse=True)
        label_idx = label_idx.reshape(-1)
        joint = np.zeros((len(label_values), num_groups), dtype=np.int64)
        np.add.at(joint, (label_idx, group_idx), 1)
        label_counts = joint.sum(axis=1)
        same_group = np.bincount(group_idx, minlength=num_groups)[group_idx] - joint[label_idx, group_idx]
        candidates = n - label_counts[label_idx]
    else:
        same_group = np.bincount(group_idx, minlength=num_groups)[group_idx] - 1
        candidates = np.full(n, n - 1)
    base = same_group / candidates                                         # [n]

    transition = np.zeros((num_groups, num_groups))
    np.add.at(transition, (group_idx[weights.row], group_idx[weights.col]), weights.data)
    transition /= transition.sum(axis=1, keepdims=True)

    sizes = np.bincount(group_idx, minlength=num_groups)
    hit_g = np.bincount(group_idx, weights=hit, minlength=num_groups) / sizes
    base_g = np.bincount(group_idx, weights=base, minlength=num_groups) / sizes
    with np.errstate(divide="ignore", invalid="ignore"):
        lift_g = np.where(base_g > 0, hit_g / base_g, np.nan)
    index = pd.Index([v.item() if isinstance(v, np.generic) else v for v in group_values], name="group")
    if np.any(base_g == 0):
        warnings.warn(f"attribute_lift: groups {index[base_g == 0].tolist()[:10]} have no candidate neighbour "
                      "in their own group (base rate 0: e.g. a group of one sample, or one whose samples all "
                      "share a label), so their lift is NaN (in per_group) and mean_lift leaves them out",
                      RuntimeWarning, stacklevel=2)
    per_group = pd.DataFrame({"num_queries": sizes, "hit_rate": hit_g, "base_rate": base_g,
                              "lift": lift_g}, index=index)
    mean_base = float(base.mean())
    return AttributeLift(
        mean_lift=float(np.nanmean(lift_g)) if np.any(np.isfinite(lift_g)) else float("nan"),
        pooled_lift=float(hit.mean() / mean_base) if mean_base > 0 else float("nan"),
        per_group=per_group,
        transition=pd.DataFrame(transition, index=index,
                                columns=pd.Index(index, name="neighbour_group")),
        k=k,
        excluded_same_label=label_arr is not None,
    )


# ---------------------------------------------------------------------------------------------
# Colour groups (Appendix D.6)
# ---------------------------------------------------------------------------------------------
def mean_colors(images: Any, *, channels_last: Optional[bool] = None,
                chunk: int = 256) -> np.ndarray:
    """μ_i = (R̄_i, Ḡ_i, B̄_i): each image's mean colour over its P pixels, float64 [n, C].

    Args:
        images: [n, H, W, C] or [n, C, H, W] with C ∈ {1, 3, 4} (a 4th alpha channel is
            dropped), or [n, H, W] grey images (C = 1); numpy or torch, any numeric dtype.
        channels_last: where the channel axis is; None → inferred from the shape
            (ValueError when both axis 1 and the last axis could be it).
        chunk: images averaged at a time (bounds the float64 working memory).
    """
    is_torch = type(images).__module__.startswith("torch")
    shape = tuple(images.shape) if hasattr(images, "shape") else np.shape(images)
    if not is_torch:
        images = np.asarray(images)
        if images.dtype.kind not in "biuf":
            raise ValueError(f"images must be numeric, got dtype {images.dtype}")
    if len(shape) == 3:
        images = images[:, None] if not is_torch else images.unsqueeze(1)
        shape = (shape[0], 1) + shape[1:]
        channels_last = False
    elif len(shape) != 4:
        raise ValueError(f"images must be [n, H, W], [n, H, W, C] or [n, C, H, W], got shape {shape}")
    if shape[0] == 0:
        raise ValueError("images must not be empty")
    if channels_last is None:
        last, first = shape[-1] in (1, 3, 4), shape[1] in (1, 3, 4)
        if last == first:
            raise ValueError(
                f"images: cannot tell the channel axis of shape {shape}; pass channels_last=True "
                f"([n, H, W, C]) or channels_last=False ([n, C, H, W])"
            )
        channels_last = last
    channels = shape[-1] if channels_last else shape[1]
    if channels not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels, got {channels} (shape {shape})")
    pixel_axes = (1, 2) if channels_last else (2, 3)
    out = np.empty((shape[0], channels), dtype=np.float64)
    for start in range(0, shape[0], chunk):
        block = images[start:start + chunk]
        if is_torch:
            block = block.detach().cpu().double().numpy()
        out[start:start + chunk] = np.asarray(block, dtype=np.float64).mean(axis=pixel_axes)
    if not np.all(np.isfinite(out)):
        raise ValueError("images must be finite, got NaN/Inf pixels")
    return out[:, :3] if channels == 4 else out


def farthest_point_sampling(points: Any, k: int, *, start: Optional[int] = None) -> np.ndarray:
    """k centres spread over ``points`` [n, c] by farthest-point sampling: each new centre is
    the point farthest (Euclidean) from the centres chosen so far. Returns their indices [k].

    Args:
        start: the first centre; default the point farthest from the points' mean (so the
            result is deterministic).
    """
    pts = as_array(points, "points")
    if pts.ndim != 2 or pts.shape[0] == 0 or pts.dtype.kind not in "biuf":
        raise ValueError(f"points must be a numeric [n, c] array, got shape {pts.shape}")
    pts = pts.astype(np.float64)
    check_finite(pts, "points")
    n = pts.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    if start is None:
        start = _farthest(((pts - pts.mean(axis=0)) ** 2).sum(axis=1), pts)
    elif isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start < n:
        raise ValueError(f"start must be an index in [0, n={n}), got {start!r}")
    centres = [int(start)]
    nearest = ((pts - pts[start]) ** 2).sum(axis=1)
    for _ in range(int(k) - 1):
        nxt = _farthest(nearest, pts)
        centres.append(nxt)
        nearest = np.minimum(nearest, ((pts - pts[nxt]) ** 2).sum(axis=1))
    return np.asarray(centres, dtype=np.int64)


def _farthest(distances: np.ndarray, pts: np.ndarray) -> int:
    """The index of the largest distance; among tied points the lexicographically smallest
    point, so the choice (and the groups built on it) does not depend on where the points sit
    in the probe (identical points are interchangeable)."""
    best = np.flatnonzero(distances == distances.max())
    if len(best) == 1:
        return int(best[0])
    return int(best[np.lexsort(pts[best].T[::-1])[0]])


def color_groups(images: Any, k: int, *, channels_last: Optional[bool] = None,
                 start: Optional[int] = None,
                 return_centers: bool = False) -> "np.ndarray | Tuple[np.ndarray, np.ndarray]":
    """Colour groups of the paper's Appendix D.6: farthest-point sampling picks k centres among
    the images' mean RGB colours μ_i (spread over the uneven colour distribution); each image
    joins its nearest centre.

    Args:
        images: see :func:`mean_colors` ([n, H, W, C], [n, C, H, W] or [n, H, W]).
        k: number of groups, 1 ≤ k ≤ n.
        start: the first FPS centre (default: the colour farthest from the mean colour).
        return_centers: also return the centres' mean colours [k, C].

    Returns:
        group id per image, int64 [n] in 0 … k − 1 (in order of selection); with
        ``return_centers``, ``(groups, centers)``.
    """
    colours = mean_colors(images, channels_last=channels_last)
    centres = farthest_point_sampling(colours, k, start=start)
    centre_colours = colours[centres]
    distance = ((colours[:, None, :] - centre_colours[None, :, :]) ** 2).sum(axis=2)
    groups = np.argmin(distance, axis=1).astype(np.int64)
    return (groups, centre_colours) if return_centers else groups
