"""Plots of the loss kernel and its analyses (the paper's figures).

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot, so no global
figure registry, no backend needed, nothing is shown), returns it, and saves it as a PNG when
``path`` is given. In Jupyter a returned Figure displays as the cell's value.

    >>> fig = plot_correlation_matrix(kernel, labels=kernel.labels, path="R.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.figure import Figure

from .analysis._validate import (
    as_array,
    as_labels,
    as_two_groups,
    check_index,
    kernel_matrix,
)
from .analysis.memorization import detection_auc, roc_curve
from .analysis.separation import PC1Separation, group_covariances
from .kernel import LossKernel

__all__ = [
    "plot_cka_convergence",
    "plot_correlation_matrix",
    "plot_covariance_histograms",
    "plot_memorization",
    "plot_pc1_separation",
    "plot_top_k_grid",
]

PathLike = Union[str, Path, None]
_GROUP_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                  "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


def _finish(fig: Figure, path: PathLike, dpi: int = 120) -> Figure:
    """Save ``fig`` as PNG at ``path`` (creating folders) if a path is given; return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight", format="png")
    return fig


# ---------------------------------------------------------------------------------------------
# The kernel itself
# ---------------------------------------------------------------------------------------------
def plot_correlation_matrix(
    kernel: Any,
    order: Any = None,
    labels: Any = None,
    *,
    use: str = "correlation",
    title: Optional[str] = None,
    max_group_ticks: int = 30,
    path: PathLike = None,
) -> Figure:
    """Heat map of R̂ (or K̂), rows and columns in ``order``.

    Args:
        kernel: a square :class:`LossKernel` or matrix [n, n] (a matrix is taken as K̂).
        order: sample indices to show, in this order ([m], m ≤ n: a permutation, or a subset
            of a large kernel). Default: sorted by ``labels`` (stable) if given, else 0..n−1.
        labels: [n] labels; default ``kernel.labels``. Contiguous label blocks in the shown
            order are outlined and named (up to ``max_group_ticks`` blocks).
        use: ``"correlation"`` (R̂ on a fixed [−1, 1] scale, default) or ``"covariance"``.
    """
    matrix = kernel_matrix(kernel, use)
    n = matrix.shape[0]
    if labels is None and isinstance(kernel, LossKernel) and kernel.labels is not None:
        labels = kernel.labels
    label_arr = None if labels is None else as_labels(labels, n)
    if order is None:
        order = np.argsort(label_arr, kind="stable") if label_arr is not None else np.arange(n)
    order = check_index(order, n, "order")
    if order.ndim != 1 or order.size == 0:
        raise ValueError(f"order must be a non-empty 1-D sequence of sample indices, got shape {order.shape}")
    shown = matrix[np.ix_(order, order)]
    limit = 1.0 if use == "correlation" else float(np.abs(shown).max()) or 1.0

    fig = Figure(figsize=(6.4, 5.4))
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="R(x, x')" if use == "correlation" else "K(x, x')")
    if label_arr is not None:
        _mark_label_blocks(ax, label_arr[order], max_group_ticks)
    ax.set_title(title or f"Loss kernel {use} ({len(order)} samples)")
    return _finish(fig, path)


def _mark_label_blocks(ax, ordered_labels: np.ndarray, max_ticks: int) -> None:
    """Outline runs of equal labels along the axes and name them at their centres."""
    change = np.flatnonzero(ordered_labels[1:] != ordered_labels[:-1]) + 1
    starts = np.r_[0, change]
    ends = np.r_[change, len(ordered_labels)]
    if len(starts) > max_ticks:
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for boundary in change:
        ax.axhline(boundary - 0.5, color="k", linewidth=0.6)
        ax.axvline(boundary - 0.5, color="k", linewidth=0.6)
    centres = (starts + ends - 1) / 2.0
    names = [str(ordered_labels[s]) for s in starts]
    ax.set_xticks(centres, names, rotation=90, fontsize=7)
    ax.set_yticks(centres, names, fontsize=7)


def plot_covariance_histograms(
    kernel: Any,
    groups: Any,
    *,
    use: str = "covariance",
    bins: int = 60,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """Histograms of |K(x, x')| on a log axis for each group pair (paper, Fig. 3D).

    One step histogram per pair (within A, within B, …, each cross pair), as the fraction
    of the pair's values in each log-spaced bin; the legend gives the share of positive
    values. Exact zeros cannot be shown on a log axis and are left out (counted in the legend).

    Args:
        kernel: a square :class:`LossKernel` or matrix [n, n].
        groups: [n] group labels (e.g. task).
        use: ``"covariance"`` (default) or ``"correlation"``.
    """
    result = group_covariances(kernel, groups, use=use)
    magnitudes = {pair: np.abs(v) for pair, v in result.values.items()}
    positive = np.concatenate([m[m > 0] for m in magnitudes.values()])
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    if positive.size == 0:
        ax.text(0.5, 0.5, "no non-zero off-diagonal values", ha="center", transform=ax.transAxes)
        return _finish(fig, path)
    lo, hi = positive.min(), positive.max()
    edges = np.geomspace(lo, hi * (1 + 1e-9) if hi > lo else lo * 10, bins + 1)
    for i, (pair, values) in enumerate(result.values.items()):
        mags = magnitudes[pair]
        nonzero = mags > 0
        if not nonzero.any():
            continue
        kind = "within" if pair[0] == pair[1] else "cross"
        name = f"{pair[0]}" if kind == "within" else f"{pair[0]} vs {pair[1]}"
        share = float((values > 0).mean())
        zeros = int((~nonzero).sum())
        label = f"{name} ({kind}, {share:.0%} > 0" + (f", {zeros} zeros)" if zeros else ")")
        # fractions per (geometric) bin, not densities: on a log axis a density would shrink
        # the wide bins on the right and hide the heavy tail
        ax.hist(mags[nonzero], bins=edges, weights=np.full(int(nonzero.sum()), 1.0 / mags.size),
                histtype="step", linewidth=1.4,
                linestyle="-" if kind == "within" else "--",
                color=_GROUP_COLOURS[i % len(_GROUP_COLOURS)], label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"|{'K' if use == 'covariance' else 'R'}(x, x')|")
    ax.set_ylabel("fraction of pairs")
    ax.legend(fontsize=8)
    ax.set_title(title or f"Off-diagonal {use} by group pair")
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# Analyses
# ---------------------------------------------------------------------------------------------
def plot_cka_convergence(
    curve: Union[Sequence[Tuple[int, float]], Mapping[Any, Sequence[Tuple[int, float]]]],
    *,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """CKA with the final kernel against the number of draws (paper, Fig. 6A).

    Args:
        curve: [(num_draws, cka)] from :func:`~devinterp_losskernel.analysis.cka_convergence`,
            or {label: curve} for several runs (e.g. one per γ), drawn as separate lines.
    """
    curves = dict(curve) if isinstance(curve, Mapping) else {None: curve}
    if not curves:
        raise ValueError("curve must hold at least one (num_draws, cka) point")
    fig = Figure(figsize=(5.6, 4.0))
    ax = fig.add_subplot()
    for label, points in curves.items():
        arr = as_array(list(points), "curve")
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
            raise ValueError(f"curve must be a non-empty list of (num_draws, cka) pairs, got shape {arr.shape}")
        arr = arr.astype(np.float64)
        ax.plot(arr[:, 0], arr[:, 1], marker="o", markersize=3,
                label=None if label is None else str(label))
    ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_xlabel("draws (all chains)")
    ax.set_ylabel("CKA with final kernel")
    if any(label is not None for label in curves):
        ax.legend(fontsize=8)
    ax.set_title(title or "Kernel convergence")
    return _finish(fig, path)


def plot_memorization(
    scores: Any,
    is_positive: Any,
    *,
    positive_label: str = "mislabelled",
    negative_label: str = "normal",
    bins: int = 40,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """ROC curve and score histograms for a memorization detector (paper, Fig. 7).

    Args:
        scores: [n] e.g. :func:`~devinterp_losskernel.analysis.memorization_scores`.
        is_positive: bool [n], True for the samples to detect (e.g. mislabelled).
    """
    fpr, tpr, _ = roc_curve(scores, is_positive)
    auc = detection_auc(scores, is_positive)
    s = as_array(scores, "scores").astype(np.float64)
    mask = as_array(is_positive, "is_positive").astype(bool)
    finite = np.isfinite(s)
    fig = Figure(figsize=(10, 4.0))
    roc_ax, hist_ax = fig.subplots(1, 2)
    roc_ax.plot(fpr, tpr, color="tab:red", label=f"AUC = {auc:.3f}")
    roc_ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=0.8)
    roc_ax.set_xlabel("false positive rate")
    roc_ax.set_ylabel("true positive rate")
    roc_ax.set_aspect("equal")
    roc_ax.legend(loc="lower right")
    roc_ax.set_title("ROC")
    shown = s[finite]
    log = shown.size > 0 and shown.min() > 0 and shown.max() / shown.min() > 100
    edges = np.geomspace(shown.min(), shown.max(), bins + 1) if log else \
        np.histogram_bin_edges(shown, bins=bins)
    for label, select, colour in ((negative_label, ~mask, "tab:blue"), (positive_label, mask, "tab:red")):
        values = s[select & finite]
        if values.size:
            hist_ax.hist(values, bins=edges, density=True, alpha=0.55, color=colour,
                         label=f"{label} (n={int(select.sum())})")
    if log:
        hist_ax.set_xscale("log")
    hist_ax.set_xlabel("score (K(x, x))")
    hist_ax.set_ylabel("density")
    hist_ax.legend()
    hist_ax.set_title("Scores")
    fig.suptitle(title or "Memorization detection")
    return _finish(fig, path)


def plot_pc1_separation(
    result: PC1Separation,
    groups: Any = None,
    *,
    bins: int = 50,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """Histogram of the first-principal-component projection by group (paper, Fig. 3B).

    Args:
        result: from :func:`~devinterp_losskernel.analysis.pc1_separation`.
        groups: [n] the two-valued labels the result was computed with; default: the
            result's own (``result.mask`` and ``result.groups``).
    """
    if not isinstance(result, PC1Separation):
        raise ValueError(f"result must be a PC1Separation (from pc1_separation), got {type(result).__name__}")
    n = result.projection.shape[0]
    mask, names = (result.mask, result.groups) if groups is None else as_two_groups(groups, n)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(result.projection, bins=bins)
    for name, select, colour in ((names[0], ~mask, "tab:blue"), (names[1], mask, "tab:orange")):
        ax.hist(result.projection[select], bins=edges, alpha=0.6, color=colour,
                label=f"{name} (n={int(select.sum())})")
    ax.set_xlabel(f"projection on PC1 of {result.use} rows "
                  f"({result.explained_variance_ratio:.1%} of variance)")
    ax.set_ylabel("samples")
    ax.legend()
    ax.set_title(title or f"PC1 separation, ROC-AUC = {result.auc:.3f}")
    return _finish(fig, path)


def _as_display_images(images: Any) -> np.ndarray:
    """[n, H, W], [n, C, H, W] or [n, H, W, C] (C ∈ {1, 3}) → [n, H, W] or [n, H, W, 3],
    each image min–max scaled to [0, 1] for display."""
    arr = as_array(images, "images")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"images must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim == 4:
        if arr.shape[1] in (1, 3):
            arr = np.moveaxis(arr, 1, -1)
        elif arr.shape[-1] not in (1, 3):
            raise ValueError(f"images must be [n, H, W], [n, C, H, W] or [n, H, W, C] with C in (1, 3), "
                             f"got shape {arr.shape}")
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != 3:
        raise ValueError(f"images must be [n, H, W], [n, C, H, W] or [n, H, W, C], got shape {arr.shape}")
    axes = tuple(range(1, arr.ndim))
    lo = np.nanmin(arr, axis=axes, keepdims=True)
    span = np.nanmax(arr, axis=axes, keepdims=True) - lo
    return (arr - lo) / np.where(span > 0, span, 1.0)


def plot_top_k_grid(
    images: Any,
    query_indices: Any,
    neighbour_indices: Any,
    values: Any = None,
    *,
    labels: Any = None,
    cell_size: float = 1.4,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """A grid: one row per query, the query image followed by its neighbours (paper, Fig. 4).

    Args:
        images: the probe images, [n, H, W] (grey), [n, C, H, W] or [n, H, W, C] with C = 1
            or 3; each is min–max scaled for display.
        query_indices: [q] sample indices of the queries.
        neighbour_indices: [q, k] their neighbours, e.g. from
            :func:`~devinterp_losskernel.analysis.top_correlated`.
        values: optional [q, k] kernel values shown above each neighbour (e.g. R).
        labels: optional [n] labels shown under each image.
    """
    pictures = _as_display_images(images)
    n = pictures.shape[0]
    queries = np.atleast_1d(check_index(query_indices, n, "query_indices"))
    neighbours = check_index(neighbour_indices, n, "neighbour_indices") if np.ndim(neighbour_indices) == 1 \
        else as_array(neighbour_indices, "neighbour_indices")
    neighbours = np.atleast_2d(neighbours)
    if neighbours.shape[0] != queries.shape[0] or neighbours.dtype.kind not in "iu":
        raise ValueError(f"neighbour_indices must be an int array [q={queries.shape[0]}, k], "
                         f"got shape {neighbours.shape}, dtype {neighbours.dtype}")
    check_index(neighbours.ravel(), n, "neighbour_indices")
    if values is not None:
        values = np.atleast_2d(as_array(values, "values"))
        if values.shape != neighbours.shape:
            raise ValueError(f"values must have the shape of neighbour_indices {neighbours.shape}, "
                             f"got {values.shape}")
    label_arr = None if labels is None else as_labels(labels, n)
    q, k = neighbours.shape
    fig = Figure(figsize=(cell_size * (k + 1), cell_size * q + 0.4))
    axes = np.asarray(fig.subplots(q, k + 1, squeeze=False))
    for row in range(q):
        cells = [(queries[row], "query")] + [
            (neighbours[row, j], "" if values is None else f"{float(values[row, j]):.2f}") for j in range(k)
        ]
        for col, (index, heading) in enumerate(cells):
            ax = axes[row, col]
            ax.imshow(pictures[index], cmap="gray" if pictures.ndim == 3 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:red")
                    spine.set_linewidth(2)
            ax.set_title(heading, fontsize=7, pad=2)
            if label_arr is not None:
                ax.set_xlabel(str(label_arr[index]), fontsize=6, labelpad=1)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# Hierarchy, lift and embedding plots (issue 3, second part): hierarchy-sorted matrix,
# colour/WordNet lift, UMAP embeddings. Added by the hierarchy/UMAP work; keep them below.
# ---------------------------------------------------------------------------------------------
