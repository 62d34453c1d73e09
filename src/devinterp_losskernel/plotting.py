"""Plots of the loss kernel and its analyses (the paper's figures).

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot, so no global
figure registry, no backend needed, nothing is shown), returns it, and saves it as a PNG when
``path`` is given. In Jupyter a returned Figure displays as the cell's value. matplotlib is
the ``[plot]`` extra: ``pip install 'devinterp-losskernel[plot]'``.

    >>> fig = plot_correlation_matrix(kernel, labels=kernel.labels, path="R.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .analysis.memorization import _auc, _roc, _scores_and_mask
from .analysis.separation import PC1Separation, group_covariances
from .extras import missing_extra, pandas_for
from .validation import (
    KERNEL_USES,
    as_array,
    as_labels,
    as_two_groups,
    check_finite,
    check_index,
    checked_kernel,
)

try:
    from matplotlib.figure import Figure
except ImportError as error:  # the [plot] extra
    raise missing_extra(error, "plot", "devinterp_losskernel.plotting") from error

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


def _format_value(value: float) -> str:
    return f"{value:.3g}"


def _fenced_range(groups: Sequence[np.ndarray], whisker: float) -> Tuple[float, float]:
    """The smallest range holding every group's values within its quartiles ± ``whisker``
    interquartile ranges (all of a group's values when its IQR is 0)."""
    lo, hi = np.inf, -np.inf
    for v in groups:
        q1, q3 = np.quantile(v, [0.25, 0.75])
        iqr = q3 - q1
        g_lo, g_hi = (v.min(), v.max()) if iqr == 0 else \
            (max(v.min(), q1 - whisker * iqr), min(v.max(), q3 + whisker * iqr))
        lo, hi = min(lo, float(g_lo)), max(hi, float(g_hi))
    return lo, hi


def _group_histograms(
    ax,
    groups: Sequence[Tuple[str, np.ndarray]],
    *,
    bins: int,
    log: Optional[bool] = None,
    colours: Sequence[Any] = _GROUP_COLOURS,
    linestyles: Optional[Sequence[str]] = None,
    fill: bool = True,
    annotate_medians: Optional[bool] = None,
    whisker: float = 3.0,
    unit: str = "",
    xlabel: str = "",
) -> dict:
    """Histograms of several groups on one axis, each visible whatever its size or outliers.

    * Normalised per group: bar heights are the *fraction of that group* in each bin (so a
      group of 5 is as tall as a group of 5,000), on equal-width bins (equal in log x when
      ``log``), so heights of different bins compare like with like (no ``density=True``:
      a narrow log bin's density makes one lone value the tallest bar).
    * The x-range spans every group's values up to Tukey-style fences (quartiles ± ``whisker``
      interquartile ranges, per group and in log x when ``log``), so a lone far outlier
      cannot squash the rest; values beyond are counted in the end bins, and how many is
      stated under the x-axis.
    * Larger groups are drawn first, smaller ones on top; each group's median is a dashed
      line (annotated with its value for ≤ 3 groups); the legend gives n and the median.

    Args:
        groups: [(name, values [m_g])]; non-finite values are left out (counted in the legend).
        log: log-spaced bins and a log x-axis; default: when every value is > 0 and the
            fenced range spans more than a factor 100.
        xlabel: the x-axis label; "(log scale)" and the count of values beyond the range
            shown are added to it.

    Returns:
        {"edges": [bins + 1], "log": bool, "clipped": int, "handles": {name: step patch}}.
    """
    finite = [(name, np.asarray(v, dtype=np.float64)[np.isfinite(v)], int(np.size(v)))
              for name, v in groups]
    present = [g for g in finite if g[1].size]
    if not present:
        ax.text(0.5, 0.5, "no finite values to show", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        return {"edges": None, "log": False, "clipped": 0, "handles": {}}
    if log is None:
        log = all(v.min() > 0 for _, v, _ in present)
        if log:
            log_lo, log_hi = _fenced_range([np.log10(v) for _, v, _ in present], whisker)
            log = log_hi - log_lo > 2  # more than a factor 100
    if log:
        positive = [np.log10(v[v > 0]) for _, v, _ in present if np.any(v > 0)]
        lo, hi = (10.0 ** x for x in _fenced_range(positive, whisker)) if positive else (1.0, 10.0)
        if hi <= lo:
            lo, hi = lo / 2, lo * 2
    else:
        lo, hi = _fenced_range([v for _, v, _ in present], whisker)
        if hi <= lo:
            spread = abs(lo) * 0.05 or 0.5
            lo, hi = lo - spread, hi + spread
    edges = np.geomspace(lo, hi, bins + 1) if log else np.linspace(lo, hi, bins + 1)
    styles = list(linestyles) if linestyles is not None else ["-"] * len(finite)
    if annotate_medians is None:
        annotate_medians = len(present) <= 3
    # draw the biggest group first so that smaller groups lie on top
    order = sorted(range(len(finite)), key=lambda i: -finite[i][1].size)
    clipped, handles, medians = 0, {}, []
    for rank, i in enumerate(order):
        name, values, total = finite[i]
        if not values.size:
            continue
        colour = colours[i % len(colours)]
        outside = (values < lo) | (values > hi)
        clipped += int(outside.sum())
        shown = np.clip(values, lo, hi)
        weights = np.full(values.size, 1.0 / values.size)
        median = float(np.median(values))
        dropped = total - values.size
        label = f"{name} (n={total}{unit}, median {_format_value(median)}" + \
            (f", {dropped} non-finite left out)" if dropped else ")")
        z = 2 + rank
        if fill:
            ax.hist(shown, bins=edges, weights=weights, histtype="stepfilled", alpha=0.3,
                    color=colour, zorder=z)
        _, _, patches = ax.hist(shown, bins=edges, weights=weights, histtype="step",
                                linewidth=1.5, linestyle=styles[i % len(styles)], color=colour,
                                zorder=z + 0.5, label=label)
        handles[name] = patches[0]
        ax.axvline(median, color=colour, linestyle="--", linewidth=1.0, zorder=z + 0.6)
        medians.append((rank, median, colour))
    if log:
        ax.set_xscale("log")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the median labels
    if annotate_medians:
        scale = np.log10 if log else (lambda x: x)
        for rank, median, colour in medians:
            right = (scale(median) - scale(lo)) / (scale(hi) - scale(lo)) > 0.7  # keep inside
            ax.annotate(f"median {_format_value(median)}", xy=(median, 1.0),
                        xycoords=("data", "axes fraction"), xytext=(-3 if right else 3, -10 - 11 * rank),
                        textcoords="offset points", fontsize=7, color=colour,
                        ha="right" if right else "left")
    label = xlabel + (" (log scale)" if log and "log" not in xlabel else "")
    if clipped:
        label += f"\n{clipped} value{'s' if clipped > 1 else ''} beyond the range shown, counted in the end bins"
    ax.set_xlabel(label)
    return {"edges": edges, "log": bool(log), "clipped": clipped, "handles": handles}


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
    checked = checked_kernel(kernel)
    n = checked.n
    if labels is None and checked.labels is not None:
        labels = checked.labels
    label_arr = None if labels is None else as_labels(labels, n)
    if order is None:
        order = np.argsort(label_arr, kind="stable") if label_arr is not None else np.arange(n)
    order = check_index(order, n, "order")
    if order.ndim != 1 or order.size == 0:
        raise ValueError(f"order must be a non-empty 1-D sequence of sample indices, got shape {order.shape}")
    if np.unique(order).size != order.size:
        raise ValueError(f"order must name each sample at most once (a permutation or a subset), got "
                         f"{order.size - np.unique(order).size} repeated indices")
    shown = checked.matrix(_check_use(use))[np.ix_(order, order)]
    limit = 1.0 if use == "correlation" else float(np.abs(shown).max()) or 1.0

    fig = Figure(figsize=(6.4, 5.4))
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="R(x, x')" if use == "correlation" else "K(x, x')")
    if label_arr is not None:
        _mark_label_blocks(ax, label_arr[order], max_group_ticks)
    else:
        ax.set_xlabel("sample (in the given order)")
    draws = f", N = {checked.source.num_draws} draws" if checked.source is not None else ""
    shown_of = f"{len(order)} samples" if len(order) == n else f"{len(order)} of {n} samples"
    symbol = "R" if use == "correlation" else "K"
    ax.set_title(title or f"Loss kernel {use} {symbol}(x, x') ({shown_of}{draws})", fontsize=10)
    return _finish(fig, path)


def _check_use(use: Any) -> str:
    if use not in KERNEL_USES:
        raise ValueError(f"use must be one of {KERNEL_USES}, got {use!r}")
    return use


def _mark_label_blocks(ax, ordered_labels: np.ndarray, max_ticks: int) -> None:
    """Outline runs of equal labels along the axes and name them at their centres."""
    change = np.flatnonzero(ordered_labels[1:] != ordered_labels[:-1]) + 1
    starts = np.r_[0, change]
    ends = np.r_[change, len(ordered_labels)]
    if len(starts) > max_ticks:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"samples sorted by label ({len(starts)} label blocks, too many to name)")
        return
    ax.set_xlabel("samples, by label")
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

    One step histogram per pair (within A, within B, …, each cross pair; within: solid,
    cross: dashed), as the fraction of that pair's values in each log-spaced bin, so a
    small pair is as visible as a large one. The x-range covers each pair's central 99.5 %
    (values beyond are counted in the end bins and the count is stated); medians are dashed
    lines; the legend gives, per pair, the share of positive values, n (number of pairs
    x ≠ x') and the median of |K|. Exact zeros cannot be shown on a log axis and are left
    out (counted in the legend).

    Args:
        kernel: a square :class:`LossKernel` or matrix [n, n].
        groups: [n] group labels (e.g. task).
        use: ``"covariance"`` (K̂, default) or ``"correlation"`` (R̂).
    """
    checked = checked_kernel(kernel)
    n = checked.n
    group_arr = as_labels(groups, n, "groups")
    result = group_covariances(checked, group_arr, use=use)
    symbol = "K" if use == "covariance" else "R"
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    series, styles = [], []
    for pair, values in result.values.items():
        mags = np.abs(values)
        nonzero = mags > 0
        kind = "within" if pair[0] == pair[1] else "cross"
        name = f"{pair[0]}" if kind == "within" else f"{pair[0]} vs {pair[1]}"
        zeros = int((~nonzero).sum())
        share = float((values > 0).mean()) if values.size else float("nan")
        series.append((f"{name}, {kind}, {share:.0%} > 0" + (f", {zeros} zeros left out" if zeros else ""),
                       mags[nonzero]))
        styles.append("-" if kind == "within" else "--")
    if not any(v.size for _, v in series):
        ax.text(0.5, 0.5, "no non-zero off-diagonal values", ha="center", transform=ax.transAxes)
        ax.set_xlabel(f"|{symbol}(x, x')|, x ≠ x'")
    else:
        _group_histograms(ax, series, bins=bins, log=True, linestyles=styles, fill=False,
                          annotate_medians=False, unit=" pairs",
                          xlabel=f"|{symbol}(x, x')|, x ≠ x'")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  title="group pair (dashed vertical: median)", title_fontsize=7)
    ax.set_ylabel("fraction of the pair's values per bin")
    ax.set_title(title or f"Off-diagonal |{symbol}| by group pair (n = {n} samples, "
                          f"{len(np.unique(group_arr))} groups)", fontsize=10)
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
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0 or arr.dtype.kind not in "iuf":
            raise ValueError(f"curve must be a non-empty list of (num_draws, cka) pairs, got shape {arr.shape}")
        arr = arr.astype(np.float64)
        check_finite(arr, "curve" if label is None else f"curve[{label!r}]")
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
    score_name: str = "K(x, x)",
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """ROC curve and score histograms for a memorization detector (paper, Fig. 7).

    Left: the ROC curve of ``scores`` for finding the positives, with its AUC. Right: one
    histogram per group, each normalised to its own size (fraction of the group per bin),
    on bins spanning each group's central 99.5 % (log-spaced when the scores are positive
    and span > 100×); outliers are counted in the end bins (and the count stated), the
    smaller group is drawn on top, each group's median is marked and written, and the
    legend gives n and the median per group. So both groups stay visible whatever their
    sizes and a lone extreme score.

    Args:
        scores: [n] e.g. :func:`~devinterp_losskernel.analysis.memorization_scores`
            (K̂(x, x)).
        is_positive: bool [n], True for the samples to detect (e.g. mislabelled).
        positive_label, negative_label: the groups' names in the legend.
        score_name: what ``scores`` are, for the axis label (default ``"K(x, x)"``).
    """
    s, mask = _scores_and_mask(scores, is_positive)
    fpr, tpr, _ = _roc(s, mask)
    auc = _auc(s, mask)
    fig = Figure(figsize=(10, 4.0))
    roc_ax, hist_ax = fig.subplots(1, 2)
    roc_ax.plot(fpr, tpr, color="tab:red", label=f"AUC = {auc:.3f}")
    roc_ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=0.8, label="chance")
    roc_ax.set_xlabel(f"false positive rate ({negative_label} flagged)")
    roc_ax.set_ylabel(f"true positive rate ({positive_label} found)")
    roc_ax.set_aspect("equal")
    roc_ax.legend(loc="lower right")
    roc_ax.set_title(f"ROC of {score_name}", fontsize=10)
    _group_histograms(hist_ax, [(negative_label, s[~mask]), (positive_label, s[mask])],
                     bins=bins, colours=("tab:blue", "tab:red"), xlabel=f"score {score_name}")
    hist_ax.set_ylabel("fraction of the group per bin")
    hist_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    hist_ax.set_title(f"{score_name} by group", fontsize=10)
    fig.suptitle(title or f"Memorization detection by {score_name}: {int(mask.sum())} {positive_label} "
                          f"among n = {mask.size}")
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

    Each group's histogram is normalised to its size (fraction of the group per bin), the
    smaller group on top, medians marked; the legend gives n per group.

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
    _group_histograms(ax, [(str(names[0]), result.projection[~mask]), (str(names[1]), result.projection[mask])],
                      bins=bins, log=False, colours=("tab:blue", "tab:orange"),
                      xlabel=f"projection on PC1 of the {result.use} rows "
                             f"({result.explained_variance_ratio:.1%} of variance)")
    ax.set_ylabel("fraction of the group per bin")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    ax.set_title(title or f"PC1 separation of {names[0]} / {names[1]} (n = {n}), ROC-AUC = {result.auc:.3f}",
                 fontsize=10)
    return _finish(fig, path)


def _as_display_images(images: Any, layout: Optional[str] = None) -> np.ndarray:
    """Images by the package's one image rule (:func:`~devinterp_losskernel.validation.as_images`:
    [n, H, W], [n, H, W, C] or [n, C, H, W] with C ∈ {1, 3, 4}, an ambiguous shape refused unless
    ``layout`` says, finite pixels) → [n, H, W] (grey) or [n, H, W, 3] (an alpha channel is
    dropped), each image min–max scaled to [0, 1] for display."""
    from .validation import as_images

    arr = as_images(images, None, "images", layout).astype(np.float64)
    arr = arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]
    axes = tuple(range(1, arr.ndim))
    lo = arr.min(axis=axes, keepdims=True)
    span = arr.max(axis=axes, keepdims=True) - lo
    return (arr - lo) / np.where(span > 0, span, 1.0)


def plot_top_k_grid(
    images: Any,
    query_indices: Any,
    neighbour_indices: Any,
    values: Any = None,
    *,
    labels: Any = None,
    image_layout: Optional[str] = None,
    cell_size: float = 1.4,
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """A grid: one row per query, the query image followed by its neighbours (paper, Fig. 4).

    Args:
        images: the probe images, [n, H, W] (grey), [n, C, H, W] or [n, H, W, C] with C = 1,
            3 or 4 (alpha dropped), finite; each is min–max scaled for display. The layout
            rule is explore's: a shape where both axis 1 and the last axis could hold the
            channels is refused unless ``image_layout`` says ``"NCHW"`` or ``"NHWC"``.
        query_indices: [q] sample indices of the queries.
        neighbour_indices: [q, k] their neighbours, e.g. from
            :func:`~devinterp_losskernel.analysis.top_correlated`.
        values: optional [q, k] kernel values shown above each neighbour (e.g. R).
        labels: optional [n] labels shown under each image.
        title: the figure's title; a line under it says how to read the grid.
    """
    pictures = _as_display_images(images, image_layout)
    n = pictures.shape[0]
    queries = np.atleast_1d(check_index(query_indices, n, "query_indices", allow_empty=False))
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
    explain = (f"each row: a query (red frame), then its {k} neighbours"
               + ("; above each: its kernel value" if values is not None else "")
               + ("; below: label" if label_arr is not None else ""))
    fig.suptitle(f"{title}\n{explain}" if title else explain, fontsize=10 if title else 9)
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
    arr = arr[:, :2].astype(np.float64)
    if np.isinf(arr).any():
        raise ValueError(f"{name} must not hold ±Inf coordinates, got {int(np.isinf(arr).any(axis=1).sum())} samples")
    return arr


def _not_shown(coords: np.ndarray) -> str:
    """What a map leaves out: samples with NaN coordinates (the graph left them without edges);
    said on the figure and in a warning, never dropped silently."""
    missing = np.flatnonzero(np.isnan(coords).any(axis=1))
    if not missing.size:
        return ""
    import warnings

    warnings.warn(f"{missing.size} of {coords.shape[0]} samples have NaN coordinates (e.g. {missing[:5].tolist()}: "
                  "UMAP left them without edges) and are not drawn", RuntimeWarning, stacklevel=3)
    return f"; {missing.size} samples with NaN coordinates not drawn"


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
    if legend:  # beside the map, not over its points
        ax.legend(fontsize=7, markerscale=1.0, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False, title="colour", title_fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")


def _embedding_description(embedding: Any, n: int) -> str:
    """What an embedding shows, in one line: the Embedding's own ``description`` ("UMAP of
    1 − R, same-label edges removed (10 labels; k=15, n=2000)"), or, for bare coordinates,
    that their making is not recorded."""
    description = getattr(embedding, "description", None)
    if isinstance(description, str):
        return description
    excluded = getattr(embedding, "excluded_same_label", None)
    if excluded is not None:
        return f"d = 1 − R, {'same-label edges removed' if excluded else 'all kNN edges kept'} (n={n})"
    return f"2-D coordinates of n={n} samples (how they were computed is not recorded)"


def _colouring(labels: Any, hierarchy: Any, legend: list) -> str:
    if labels is None:
        return "uncoloured"
    if hierarchy is not None:
        return "coloured by position in the hierarchy (similar hues: nearby categories)"
    return "coloured by label" + ("" if legend else " (too many labels for a legend)")


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

    The figure says what was embedded: under the title, the embedding's description, e.g.
    "UMAP of 1 − R, same-label edges removed (10 labels; k=15, n=2000)" — with same-label
    edges removed (``umap_embedding``'s default) a label never forms its own cluster, so
    colouring by that label shows mixed blobs by design.

    Args:
        embedding: an :class:`~devinterp_losskernel.analysis.embedding.Embedding` (from
            ``umap_embedding``) or coordinates [n, 2].
        labels: [n] labels used only for colour (a legend beside the map for ≤ 20 labels),
            or, with ``hierarchy``, colour by the label's position in the hierarchy's leaf
            order (similar hues for nearby categories, the paper's colouring).
        hierarchy: a :class:`~devinterp_losskernel.hierarchy.Hierarchy`.
        cmap: colormap for hierarchy positions / many labels (cyclic, default ``"hsv"``).
        title: the figure's title (the description line stays under it).
    """
    coords = _embedding_coords(embedding)
    n = coords.shape[0]
    colours, legend = _point_colours(n, labels, hierarchy, cmap)
    fig = Figure(figsize=(6.0, 6.0))
    ax = fig.add_subplot()
    _scatter(ax, coords, colours, legend, point_size)
    ax.set_title(_embedding_description(embedding, n) + _not_shown(coords), fontsize=9, color="0.2")
    fig.suptitle(title or f"Loss-kernel map, {_colouring(labels, hierarchy, legend)}", fontsize=11)
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
    title: Optional[str] = None,
    path: PathLike = None,
) -> Figure:
    """One panel per checkpoint of aligned UMAPs (paper, Fig. 8), coloured as
    :func:`plot_embedding`; ``titles`` e.g. the training steps (one per panel). The figure's
    title says what was embedded (e.g. "AlignedUMAP of 1 − R, same-label edges removed
    (10 labels; k=15, n=2000)", from the first Embedding) and how points are coloured; the
    colour legend stands beside the first row."""
    if isinstance(embeddings, np.ndarray) or not isinstance(embeddings, Sequence) or not embeddings:
        raise ValueError("embeddings must be a non-empty list of Embeddings or [n, 2] arrays")
    coords = [_embedding_coords(e, f"embeddings[{i}]") for i, e in enumerate(embeddings)]
    if len({c.shape[0] for c in coords}) != 1:
        raise ValueError(f"embeddings must all have the same n, got {[c.shape[0] for c in coords]}")
    if titles is not None and len(titles) != len(coords):
        raise ValueError(f"titles must have one entry per embedding ({len(coords)}), got {len(titles)}")
    n = coords[0].shape[0]
    colours, legend = _point_colours(n, labels, hierarchy, cmap)
    columns = max(1, min(int(columns), len(coords)))
    rows = -(-len(coords) // columns)
    fig = Figure(figsize=(3.6 * columns, 3.6 * rows + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i >= len(coords):
            ax.set_axis_off()
            continue
        _scatter(ax, coords[i], colours, [], point_size)
        ax.set_title(str(titles[i]) if titles is not None else f"checkpoint {i}", fontsize=9)
    if legend:
        for name, colour in legend:
            axes[columns - 1].scatter([], [], s=20, color=colour, label=name)
        axes[columns - 1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                                 title="colour", title_fontsize=7)
    descriptions = list(dict.fromkeys(_embedding_description(e, n) + _not_shown(c) for e, c in zip(embeddings, coords)))
    what = descriptions[0] if len(descriptions) == 1 else "; ".join(descriptions)
    fig.suptitle(f"{title}\n{what}" if title else f"{what}\n{_colouring(labels, hierarchy, legend)}",
                 fontsize=10)
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
    checked = checked_kernel(kernel)
    n = checked.n
    if labels is None and checked.labels is not None:
        labels = checked.labels
    label_arr = as_labels(labels, n)
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 2):
        raise ValueError(f"max_samples must be an int ≥ 2 or None, got {max_samples!r}")
    matrix = checked.matrix(_check_use(use))
    order = hierarchy.sample_order(label_arr)
    if max_samples is not None:
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
    bar = fig.colorbar(tree, ax=right, label="tree distance (edges)", shrink=0.8)
    from matplotlib.ticker import MaxNLocator

    bar.locator = MaxNLocator(integer=True)  # distances are whole numbers of edges
    bar.update_ticks()
    right.set_title("hierarchy distance between labels")
    strip = hierarchy.position_colors(label_arr[order])[None, :, :]
    shown_of = f"{len(order)} samples" if len(order) == n else f"{len(order)} of {n} samples (evenly spaced)"
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{shown_of} in hierarchy leaf order\n(colour strip: position in the hierarchy)",
                      fontsize=9)
    for ax in (left, right):  # a colour strip of hierarchy positions along the top
        inset = ax.inset_axes([0.0, 1.01, 1.0, 0.03])
        inset.imshow(strip, aspect="auto", interpolation="nearest")
        inset.set_axis_off()
    fig.suptitle(title or f"Loss kernel {'R' if use == 'correlation' else 'K'}(x, x') beside the tree "
                          f"distance of the labels ({len(np.unique(label_arr))} labels)")
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
    from matplotlib import colormaps

    pd = pandas_for("plot_lift_curves")
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
    from matplotlib.ticker import MaxNLocator

    ax.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax.annotate("chance (lift 1)", xy=(1.0, 1.0), xycoords=("axes fraction", "data"), xytext=(-3, 3),
                textcoords="offset points", ha="right", va="bottom", fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are whole numbers of edges
    ax.set_xlabel("depth d′ of the shared ancestor (edges from the root)")
    ax.set_ylabel("lift = hit rate / base rate")
    k = lift.attrs.get("k")
    total = "" if counts is None else f", {int(np.sum(counts))} queries"
    ax.set_title(title or ("Taxonomic lift of the" + (f" top-{k}" if k else "") +
                           f" other-label neighbours{total}"), fontsize=10)
    ax.legend(fontsize=7, ncol=2, title="query depth d (queries)", title_fontsize=7, frameon=False)
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
    per_group = getattr(result, "per_group", None)
    queries = None if per_group is None or "num_queries" not in per_group else per_group["num_queries"]
    ticks = [str(v) if queries is None or v not in queries.index else f"{v}\n(n={int(queries[v])})"
             for v in transition.index]
    ax.set_xticks(positions, ticks, fontsize=7 if g > 8 else 8, rotation=90 if g > 12 else 0)
    ax.set_xlim(-0.6, g - 0.4)
    ax.set_ylim(0, 1)
    from matplotlib.patches import Patch

    if g <= 30:  # which colour is which neighbour group
        ax.legend(handles=[Patch(color=palette[b], label=str(v)) for b, v in enumerate(transition.columns)],
                  fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  title="neighbour group", title_fontsize=7)
    ax.set_xlabel("query group (queries)")
    ax.set_ylabel("fraction of the top-k neighbours in each group")
    same = "other-label neighbours" if getattr(result, "excluded_same_label", False) else "neighbours"
    ax.set_title(title or f"Groups of the top-{result.k} {same} (mean lift {result.mean_lift:.2f})",
                 fontsize=10)
    return _finish(fig, path)
