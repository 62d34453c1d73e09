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

__all__ += [
    "plot_aligned_embeddings",
    "plot_attribute_transition",
    "plot_embedding",
    "plot_hierarchy_sorted_matrix",
    "plot_lift_curves",
]


def _embedding_coords(embedding: Any, name: str = "embedding") -> np.ndarray:
    """An :class:`~devinterp_losskernel.analysis.embedding.Embedding` or an [n, 2+] array → [n, 2]."""
    coords = getattr(embedding, "embedding", embedding)
    arr = as_array(coords, name)
    if arr.ndim != 2 or arr.shape[1] < 2 or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be an Embedding or a numeric [n, 2] array, got shape {arr.shape}")
    return arr[:, :2].astype(np.float64)


def _point_colours(n: int, labels: Any, hierarchy: Any, cmap: str):
    """(RGBA [n, 4] or None, legend entries [(name, colour)]) for a scatter of n samples."""
    from matplotlib import colormaps

    if labels is None:
        if hierarchy is not None:
            raise ValueError("labels must be given to colour by hierarchy position")
        return None, []
    label_arr = as_labels(labels, n)
    if hierarchy is not None:
        from .hierarchy import Hierarchy

        if not isinstance(hierarchy, Hierarchy):
            raise ValueError(f"hierarchy must be a Hierarchy, got {type(hierarchy).__name__}")
        return hierarchy.position_colors(label_arr, cmap=cmap), []
    values, inverse = np.unique(label_arr, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(values) <= len(_GROUP_COLOURS):
        palette = [colormaps["tab10"](i) for i in range(len(values))]
    else:
        palette = colormaps[cmap](np.arange(len(values)) / len(values))
    colours = np.asarray([palette[i] for i in inverse])
    legend = [(str(v), palette[i]) for i, v in enumerate(values)] if len(values) <= 20 else []
    return colours, legend


def _scatter(ax, coords: np.ndarray, colours, legend, point_size: float) -> None:
    ax.scatter(coords[:, 0], coords[:, 1], s=point_size, c=colours if colours is not None else "tab:blue",
               linewidths=0, alpha=0.85)
    for name, colour in legend:
        ax.scatter([], [], s=20, color=colour, label=name)
    if legend:
        ax.legend(fontsize=6, markerscale=1.0, loc="best", frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")


def plot_embedding(
    embedding: Any,
    labels: Any = None,
    *,
    hierarchy: Any = None,
    cmap: str = "hsv",
    point_size: float = 6.0,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """Scatter of a 2-D embedding of the kernel (paper, Fig. 1A / Fig. 8).

    Args:
        embedding: an :class:`~devinterp_losskernel.analysis.embedding.Embedding` (from
            ``umap_embedding``) or coordinates [n, 2].
        labels: [n] labels; colour by label (a legend for ≤ 20 labels), or, with
            ``hierarchy``, by the label's position in the hierarchy's leaf order (similar
            hues for nearby categories, the paper's colouring).
        hierarchy: a :class:`~devinterp_losskernel.hierarchy.Hierarchy`.
        cmap: colormap for hierarchy positions / many labels (cyclic, default ``"hsv"``).
    """
    coords = _embedding_coords(embedding)
    colours, legend = _point_colours(coords.shape[0], labels, hierarchy, cmap)
    fig = Figure(figsize=(6.0, 6.0))
    ax = fig.add_subplot()
    _scatter(ax, coords, colours, legend, point_size)
    excluded = getattr(embedding, "excluded_same_label", None)
    note = "" if excluded is None else (" (same-label edges removed)" if excluded else "")
    ax.set_title(title or f"UMAP of d = 1 − R{note}")
    return _finish(fig, path)


def plot_aligned_embeddings(
    embeddings: Sequence[Any],
    labels: Any = None,
    *,
    hierarchy: Any = None,
    titles: Optional[Sequence[str]] = None,
    cmap: str = "hsv",
    point_size: float = 4.0,
    columns: int = 3,
    path: PathLike = None,
) -> Figure:
    """One panel per checkpoint of aligned UMAPs (paper, Fig. 8), coloured as
    :func:`plot_embedding`; ``titles`` e.g. the training steps."""
    if isinstance(embeddings, np.ndarray) or not isinstance(embeddings, Sequence) or not embeddings:
        raise ValueError("embeddings must be a non-empty list of Embeddings or [n, 2] arrays")
    coords = [_embedding_coords(e, f"embeddings[{i}]") for i, e in enumerate(embeddings)]
    if len({c.shape[0] for c in coords}) != 1:
        raise ValueError(f"embeddings must all have the same n, got {[c.shape[0] for c in coords]}")
    if titles is not None and len(titles) != len(coords):
        raise ValueError(f"titles must have one entry per embedding ({len(coords)}), got {len(titles)}")
    colours, legend = _point_colours(coords[0].shape[0], labels, hierarchy, cmap)
    columns = max(1, min(int(columns), len(coords)))
    rows = -(-len(coords) // columns)
    fig = Figure(figsize=(3.6 * columns, 3.6 * rows))
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i >= len(coords):
            ax.set_axis_off()
            continue
        _scatter(ax, coords[i], colours, legend if i == 0 else [], point_size)
        ax.set_title(str(titles[i]) if titles is not None else f"checkpoint {i}", fontsize=9)
    return _finish(fig, path)


def plot_hierarchy_sorted_matrix(
    kernel: Any,
    labels: Any,
    hierarchy: Any,
    *,
    use: str = "correlation",
    max_samples: Optional[int] = 2000,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """The kernel sorted by the hierarchy's leaf order beside the tree-distance matrix of the
    labels in the same order (paper, Fig. 1B).

    Args:
        kernel: a square LossKernel or matrix [n, n] (a matrix is taken as K̂).
        labels: [n] labels (None → ``kernel.labels``), all nodes/classes of ``hierarchy``.
        hierarchy: a :class:`~devinterp_losskernel.hierarchy.Hierarchy`.
        use: ``"correlation"`` (R̂ on [−1, 1]) or ``"covariance"``.
        max_samples: show at most this many samples, evenly spaced along the sorted order
            (None: all n; a 10,000² image is slow to draw and no sharper on screen).
    """
    from .hierarchy import Hierarchy

    if not isinstance(hierarchy, Hierarchy):
        raise ValueError(f"hierarchy must be a Hierarchy, got {type(hierarchy).__name__}")
    matrix = kernel_matrix(kernel, use)
    n = matrix.shape[0]
    if labels is None and isinstance(kernel, LossKernel) and kernel.labels is not None:
        labels = kernel.labels
    label_arr = as_labels(labels, n)
    order = hierarchy.sample_order(label_arr)
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
            raise ValueError(f"max_samples must be an int ≥ 2 or None, got {max_samples!r}")
        if n > max_samples:
            order = order[np.linspace(0, n - 1, max_samples).round().astype(np.int64)]
    shown = matrix[np.ix_(order, order)]
    distance = hierarchy.distance_matrix(label_arr[order])
    limit = 1.0 if use == "correlation" else float(np.abs(shown).max()) or 1.0

    fig = Figure(figsize=(12.0, 5.4))
    left, right = fig.subplots(1, 2)
    image = left.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    fig.colorbar(image, ax=left, label="R(x, x')" if use == "correlation" else "K(x, x')", shrink=0.8)
    left.set_title(f"loss kernel {use}, sorted by hierarchy")
    tree = right.imshow(distance, cmap="viridis_r", interpolation="nearest")
    fig.colorbar(tree, ax=right, label="tree distance (edges)", shrink=0.8)
    right.set_title("hierarchy distance between labels")
    strip = hierarchy.position_colors(label_arr[order])[None, :, :]
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{len(order)} samples in hierarchy order")
    for ax in (left, right):  # a colour strip of hierarchy positions along the top
        inset = ax.inset_axes([0.0, 1.01, 1.0, 0.03])
        inset.imshow(strip, aspect="auto", interpolation="nearest")
        inset.set_axis_off()
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_lift_curves(
    lift: Any,
    *,
    min_queries: int = 1,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """Taxonomic lift Lift(d, d′) against ancestor depth d′, one line per query depth d (the
    paper's Fig. 5), from :func:`~devinterp_losskernel.analysis.taxonomic_lift`.

    Args:
        lift: the DataFrame ``taxonomic_lift`` returns (rows d, columns d′).
        min_queries: skip query depths with fewer queries (uses ``lift.attrs["num_queries"]``).
    """
    import pandas as pd
    from matplotlib import colormaps

    if not isinstance(lift, pd.DataFrame) or lift.empty:
        raise ValueError("lift must be the non-empty DataFrame returned by taxonomic_lift")
    counts = lift.attrs.get("num_queries")
    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.add_subplot()
    colour = colormaps["viridis"]
    depths = list(lift.index)
    for i, d in enumerate(depths):
        if counts is not None and int(counts.get(d, 0)) < min_queries:
            continue
        row = lift.loc[d].dropna()
        if row.empty:
            continue
        label = f"d = {d}" + ("" if counts is None else f" ({int(counts[d])})")
        ax.plot(row.index.astype(float), row.values, marker="o", markersize=3,
                color=colour(i / max(1, len(depths) - 1)), label=label)
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax.set_xlabel("depth d′ of the shared ancestor (edges from the root)")
    ax.set_ylabel("lift")
    k = lift.attrs.get("k")
    ax.set_title(title or ("Taxonomic lift" + (f", top-{k} neighbours" if k else "")))
    ax.legend(fontsize=7, ncol=2, title="query depth (queries)", title_fontsize=7, frameon=False)
    return _finish(fig, path)


def plot_attribute_transition(
    result: Any,
    *,
    colors: Any = None,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """Stacked bars of neighbour-group probabilities per query group (the paper's Fig. 9),
    from :func:`~devinterp_losskernel.analysis.attribute_lift`.

    Args:
        result: an :class:`~devinterp_losskernel.analysis.lift.AttributeLift`.
        colors: optional [g, 3] colours of the groups (e.g. the ``centers`` of
            ``color_groups(..., return_centers=True)``, scaled to [0, 1]); default tab20.
    """
    from matplotlib import colormaps

    transition = getattr(result, "transition", None)
    if transition is None:
        raise ValueError("result must be an AttributeLift (from attribute_lift)")
    values = transition.to_numpy()
    g = values.shape[0]
    if colors is None:
        palette = [colormaps["tab20"](i % 20) for i in range(g)]
    else:
        palette = as_array(colors, "colors")
        if palette.ndim != 2 or palette.shape[0] != g or palette.shape[1] not in (3, 4):
            raise ValueError(f"colors must be [g={g}, 3 or 4], got shape {palette.shape}")
        if palette.max() > 1.0:
            palette = palette / 255.0
        palette = np.clip(palette, 0.0, 1.0)
    fig = Figure(figsize=(max(5.0, 0.45 * g + 2), 4.4))
    ax = fig.add_subplot()
    positions = np.arange(g)
    bottom = np.zeros(g)
    for b in range(g):
        ax.bar(positions, values[:, b], bottom=bottom, color=palette[b], edgecolor="white", linewidth=0.3)
        bottom += values[:, b]
    ax.bar(positions, np.zeros(g), tick_label=[str(v) for v in transition.index])
    ax.set_ylim(0, 1)
    ax.set_xlabel("query group")
    ax.set_ylabel("fraction of neighbours in each group")
    ax.set_title(title or f"Neighbour groups (lift {result.mean_lift:.2f}, k = {result.k})")
    return _finish(fig, path)
