"""UMAP embeddings of the loss kernel on d(x, x') = 1 − R(x, x'), same-label edges removed.

The paper embeds the correlation kernel with UMAP (Section 4, Fig. 1A) and, across training
checkpoints, with the same UMAP hyperparameters (Appendix D.5, Fig. 8). Because losses of
same-label inputs co-vary for reasons unrelated to the function (noise in the unembedding;
Appendix B), the k-nearest-neighbour graph UMAP builds is deconfounded by **deleting edges
between inputs with the same label during the neighbour search**: each sample's neighbours
are its n_neighbors − 1 closest samples (in 1 − R) *with a different label*.

We build that graph ourselves and hand it to umap-learn, so nothing in umap-learn's own
neighbour search can put a same-label edge back:

* :func:`umap_embedding` passes it as ``UMAP(metric="precomputed",
  precomputed_knn=(knn_indices, knn_distances))``, with the dense distance matrix 1 − R as
  the data (umap-learn uses the data only to lay out disconnected components of the graph,
  by average linkage of these distances).
* :func:`aligned_umap_embeddings` uses ``AlignedUMAP``, which has no ``precomputed_knn``.
  Each checkpoint gets a dense precomputed distance matrix that *encodes* the same graph:
  entries on our kNN graph hold 1 − R; every other entry holds 1 − R + 3. As 1 − R ≤ 2, each
  row's n_neighbors smallest entries are exactly our neighbours (no tie can swap in a
  non-neighbour), so umap-learn's nearest-neighbour step returns our graph, while the
  offset entries still rank the other samples by 1 − R for the layout of disconnected
  components. Relations between checkpoints are the identity on the shared probe samples.

UMAP counts a point as its own first neighbour; so do we: ``knn_indices[:, 0]`` is the
sample itself at distance 0, and columns 1 … n_neighbors − 1 its different-label neighbours.

umap-learn compiles its numba kernels at first use (≈ 5 s for UMAP, ≈ 20 s more for
AlignedUMAP on a 2-core machine); later calls in the same process are fast.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..kernel import LossKernel
from ..validation import CheckedKernel, as_labels, checked_kernel, kernel_labels, py_scalar
from .neighbours import _top_correlated, _warn_ties

__all__ = ["Embedding", "aligned_umap_embeddings", "kernel_knn_graph", "umap_embedding"]

# offset added to the distances of non-edges in the graph-encoding matrix (1 − R ∈ [0, 2])
_NON_EDGE_OFFSET = 3.0
_UMAP_NOISE = (
    "using precomputed metric",
    "n_jobs value",
    "precomputed_knn\\[2\\]",
    "n_neighbors is larger than the dataset size",
)


@dataclass
class Embedding:
    """A UMAP embedding of a loss kernel and the neighbour graph it was built from.

    Attributes:
        embedding: [n, n_components] float32 coordinates (NaN for a sample the graph left
            without edges).
        knn_indices: [n, n_neighbors] int64; column 0 is the sample itself, then its
            nearest samples in d = 1 − R (different-label only when
            ``excluded_same_label``), nearest first.
        knn_distances: [n, n_neighbors] float32 distances 1 − R of those neighbours.
        graph: UMAP's symmetrised fuzzy neighbour graph (scipy sparse [n, n]); its edges are
            a subset of the kNN edges in either direction.
        excluded_same_label: whether same-label edges were removed from the kNN graph
            (the paper's deconfounding, Appendix B). When True, samples of one label are
            never each other's neighbours, so a label is *not* a cluster of the map.
        params: the UMAP hyperparameters used (``n_neighbors`` = k, counting the point).
        metric: the distance embedded, ``"1 − R"`` (d(x, x') = 1 − R̂(x, x')).
        method: ``"UMAP"`` or ``"AlignedUMAP"`` (one checkpoint of an aligned series).
        num_labels: number of distinct labels whose same-label edges were removed (None
            when no edges were removed).

    ``description`` says all of this in one line, e.g. "UMAP of 1 − R, same-label edges
    removed (10 labels; k=15, n=2000)"; :func:`~devinterp_losskernel.plotting.plot_embedding`
    puts it on the figure.
    """

    embedding: np.ndarray
    knn_indices: np.ndarray
    knn_distances: np.ndarray
    graph: Any
    excluded_same_label: bool
    params: dict = field(default_factory=dict)
    metric: str = "1 − R"
    method: str = "UMAP"
    num_labels: Optional[int] = None

    @property
    def num_samples(self) -> int:
        """n, the embedded samples."""
        return int(self.embedding.shape[0])

    @property
    def n_neighbors(self) -> int:
        """k, UMAP's n_neighbors (the point itself and its k − 1 nearest neighbours)."""
        return int(self.params.get("n_neighbors", self.knn_indices.shape[1]))

    @property
    def edges(self) -> str:
        """``"same-label edges removed"`` or ``"all kNN edges kept"``."""
        return "same-label edges removed" if self.excluded_same_label else "all kNN edges kept"

    @property
    def description(self) -> str:
        """One line for a figure: method, metric, edge rule, k and n."""
        labels = f"{self.num_labels} labels; " if self.excluded_same_label and self.num_labels else ""
        return (f"{self.method} of {self.metric}, {self.edges} "
                f"({labels}k={self.n_neighbors}, n={self.num_samples})")

    def __repr__(self) -> str:
        return f"Embedding({self.description}, coordinates {list(self.embedding.shape)})"


@contextlib.contextmanager
def _umap_context(random_state: Optional[int]):
    """Silence umap-learn's known warnings, keep torch's thread count (numba's OpenMP layer
    resets the thread count torch shares, 1 → all cores, which made a following
    single-threaded SGLD run many times slower on a busy machine), and leave the global
    random generators as they were: umap-learn draws from numpy's global generator when
    ``random_state`` is None, so for that call it is seeded from the OS and then restored —
    the user's generator is neither read nor advanced."""
    import torch

    from ..rng import global_rng_untouched

    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings(), global_rng_untouched():
            for message in _UMAP_NOISE:
                warnings.filterwarnings("ignore", message=message)
            if random_state is None:
                np.random.seed(np.random.default_rng().integers(0, 2**32, dtype=np.uint64))
            yield
    finally:
        torch.set_num_threads(threads)


def _distance(checked: CheckedKernel) -> np.ndarray:
    """d = 1 − R̂, float32 [n, n] (half the memory of R̂), exactly 0 on the diagonal."""
    correlation = checked.matrix("correlation")
    distance = np.empty(correlation.shape, dtype=np.float32)
    np.subtract(1.0, correlation, out=distance, casting="same_kind")
    del correlation
    np.fill_diagonal(distance, 0.0)
    return np.clip(distance, 0.0, 2.0, out=distance)


def _check_n_neighbors(n_neighbors: Any, n: int, label_arr: Optional[np.ndarray]) -> int:
    """UMAP's n_neighbors: an int ≥ 2 that leaves every sample n_neighbors − 1 candidates.
    With one distinct label and same-label edges excluded there are none: that is said about
    the labels, not about n_neighbors."""
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, numbers.Integral) or n_neighbors < 2:
        raise ValueError(f"n_neighbors must be an int ≥ 2 (UMAP counts the point itself), got {n_neighbors!r}")
    available = _available(label_arr, n)
    if label_arr is not None and available == 0:
        raise ValueError(
            f"labels: all {n} samples have the same label ({py_scalar(label_arr[0])!r}), so removing same-label edges "
            "(exclude_same_label_edges=True, the default) removes every kNN edge and UMAP has no graph; pass "
            "exclude_same_label_edges=False for a plain kNN graph on 1 − R, or labels with at least two values"
        )
    if n_neighbors - 1 > available:
        why = ""
        if label_arr is not None:
            values, counts = np.unique(label_arr, return_counts=True)
            largest = py_scalar(values[np.argmax(counts)])
            why = (f" (labels: the largest label, {largest!r}, holds {counts.max()} of the "
                   f"{n} samples, so its samples have only {available} different-label candidates)")
        raise ValueError(
            f"n_neighbors must be at most {available + 1} here: UMAP counts the point itself, and "
            f"each of the n={n} samples has {available} candidate neighbours (different-label "
            f"samples when same-label edges are excluded){why}; got n_neighbors={n_neighbors}"
        )
    return int(n_neighbors)


def _knn(checked: CheckedKernel, distance: np.ndarray, n_neighbors: int,
         label_arr: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Self + the n_neighbors − 1 most correlated (different-label) samples of every row —
    the neighbours of :func:`~devinterp_losskernel.analysis.top_correlated`, ties to the
    smaller index (and a TiedNeighboursWarning when a tie decided) — and their distances 1 − R̂."""
    n = distance.shape[0]
    queries = np.arange(n)
    indices = np.empty((n, n_neighbors), dtype=np.int64)
    indices[:, 0] = queries
    indices[:, 1:], _, tied = _top_correlated(checked.matrix("correlation"), queries, n_neighbors - 1,
                                              labels=label_arr)
    if tied.any():
        _warn_ties(checked, queries[tied], n, n_neighbors - 1, "correlation")
    distances = np.take_along_axis(distance, indices, axis=1)
    distances[:, 0] = 0.0
    return indices, distances


def _labels_for(kernel: CheckedKernel, labels: Any, n: int, exclude: bool) -> Optional[np.ndarray]:
    if not isinstance(exclude, (bool, np.bool_)):
        raise ValueError(f"exclude_same_label_edges must be True or False, got {exclude!r}")
    if not exclude:
        return None if labels is None else as_labels(labels, n)
    return kernel_labels(kernel, labels, n)


def _num_labels(label_arr: Optional[np.ndarray]) -> Optional[int]:
    return None if label_arr is None else int(np.unique(label_arr).size)


def _available(label_arr: Optional[np.ndarray], n: int) -> int:
    """Candidates per query: n − 1, or n − (largest label count) without same-label ones."""
    if label_arr is None:
        return n - 1
    _, counts = np.unique(label_arr, return_counts=True)
    return n - int(counts.max())


def kernel_knn_graph(kernel: Any, n_neighbors: int = 15, *, labels: Any = None,
                     exclude_same_label_edges: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """The neighbour graph our UMAPs use: (knn_indices, knn_distances), both [n, n_neighbors].

    Column 0 is the sample itself (distance 0); columns 1 … n_neighbors − 1 are its nearest
    samples in d = 1 − R̂ — with a different label when ``exclude_same_label_edges``
    (paper, Appendix B) — nearest first, ties to the smaller index.

    Args:
        kernel: a square LossKernel or matrix [n, n] (a matrix is taken as K̂ and normalised).
        n_neighbors: UMAP's n_neighbors (including the point itself); n_neighbors − 1 must
            not exceed the candidates per sample (n − largest label count).
        labels: [n] labels; default ``kernel.labels`` (needed to exclude same-label edges).
    """
    checked = checked_kernel(kernel)
    n = checked.n
    label_arr = _labels_for(checked, labels, n, exclude_same_label_edges)
    use_labels = label_arr if exclude_same_label_edges else None
    n_neighbors = _check_n_neighbors(n_neighbors, n, use_labels)
    return _knn(checked, _distance(checked), n_neighbors, use_labels)


def _umap_params(n_components, n_neighbors, min_dist, random_state, n_epochs, extra) -> dict:
    if isinstance(n_components, bool) or not isinstance(n_components, numbers.Integral) or n_components < 1:
        raise ValueError(f"n_components must be a positive int, got {n_components!r}")
    if not isinstance(min_dist, numbers.Real) or min_dist < 0:
        raise ValueError(f"min_dist must be a non-negative number, got {min_dist!r}")
    if n_epochs is not None and (isinstance(n_epochs, bool) or not isinstance(n_epochs, numbers.Integral)
                                 or n_epochs < 1):
        raise ValueError(f"n_epochs must be a positive int or None, got {n_epochs!r}")
    params = dict(n_components=int(n_components), n_neighbors=int(n_neighbors),
                  min_dist=float(min_dist), random_state=random_state, n_epochs=n_epochs)
    clash = set(extra) & (set(params) | {"metric", "precomputed_knn"})
    if clash:
        raise ValueError(f"umap_kwargs must not repeat {sorted(clash)} (set by this function)")
    params.update(extra)
    return params


def umap_embedding(
    kernel: Any,
    *,
    labels: Any = None,
    exclude_same_label_edges: bool = True,
    n_components: int = 2,
    n_neighbors: int = 15,
    random_state: Optional[int] = None,
    min_dist: float = 0.1,
    n_epochs: Optional[int] = None,
    umap_kwargs: Optional[dict] = None,
) -> Embedding:
    """UMAP of the loss kernel on d = 1 − R̂ with same-label kNN edges removed (Fig. 1A).

    **By default same-label edges are removed** (the paper's deconfounding, Appendix B):
    every sample's neighbours are its k − 1 most correlated samples *with a different
    label*, so samples of one label are never linked and a label does **not** form its own
    cluster; the map shows which *other-label* samples the kernel relates (e.g. ten digit
    classes can merge into a few blobs of similar classes). ``labels`` here decide the
    graph, not the colours: to see whether labels cluster, pass
    ``exclude_same_label_edges=False`` (and colour with ``plot_embedding(emb, labels)``).
    The returned :class:`Embedding` records the choice (``excluded_same_label``,
    ``description``), and ``plot_embedding`` writes it on the figure.

    Args:
        kernel: a square LossKernel or matrix [n, n] (a matrix is taken as K̂ and normalised
            to R̂).
        labels: [n] labels y; default ``kernel.labels``. Required when
            ``exclude_same_label_edges``; unused otherwise.
        exclude_same_label_edges: delete same-label edges from the kNN graph (Appendix B;
            default True, as in the paper). False: a plain kNN graph on 1 − R̂.
        n_components, n_neighbors, min_dist, n_epochs: UMAP's hyperparameters
            (n_neighbors counts the point itself).
        random_state: seed for a reproducible layout (umap-learn then runs single-threaded).
        umap_kwargs: further ``umap.UMAP`` arguments (not metric / precomputed_knn).

    Returns:
        :class:`Embedding`: coordinates [n, n_components], the kNN graph handed to UMAP
        ([n, k] indices and distances), UMAP's fuzzy graph, and what was embedded (metric
        1 − R, same-label edges removed or not, k, n).
    """
    checked = checked_kernel(kernel)
    n = checked.n
    label_arr = _labels_for(checked, labels, n, exclude_same_label_edges)
    use_labels = label_arr if exclude_same_label_edges else None
    n_neighbors = _check_n_neighbors(n_neighbors, n, use_labels)
    params = _umap_params(n_components, n_neighbors, min_dist, random_state, n_epochs, umap_kwargs or {})
    distance = _distance(checked)
    indices, distances = _knn(checked, distance, n_neighbors, use_labels)
    if checked is not kernel:
        checked.release()  # only the float32 distances are needed from here on

    with _umap_context(random_state):
        import umap  # inside: importing umap-learn's stack can draw from Python's global generator

        # copies: umap-learn writes into the kNN arrays it is given
        reducer = umap.UMAP(metric="precomputed",
                            precomputed_knn=(indices.copy(), distances.copy()), **params)
        coords = reducer.fit_transform(distance)
    return Embedding(embedding=np.asarray(coords, dtype=np.float32), knn_indices=indices,
                     knn_distances=distances, graph=reducer.graph_.tocsr(),
                     excluded_same_label=bool(exclude_same_label_edges), params=params,
                     method="UMAP", num_labels=_num_labels(use_labels))


def _graph_encoding_matrix(distance: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """1 − R on the kNN edges (and the diagonal), 1 − R + 3 elsewhere, float32 [n, n];
    overwrites ``distance``."""
    rows = np.repeat(np.arange(distance.shape[0]), indices.shape[1])
    on_graph = distance[rows, indices.ravel()]
    encoded = distance
    encoded += np.float32(_NON_EDGE_OFFSET)
    encoded[rows, indices.ravel()] = on_graph
    np.fill_diagonal(encoded, 0.0)
    return encoded


def aligned_umap_embeddings(
    kernels: Sequence[Any],
    *,
    labels: Any = None,
    exclude_same_label_edges: bool = True,
    n_components: int = 2,
    n_neighbors: int = 15,
    random_state: Optional[int] = None,
    min_dist: float = 0.1,
    n_epochs: Optional[int] = None,
    alignment_regularisation: float = 1e-2,
    alignment_window_size: int = 3,
    umap_kwargs: Optional[dict] = None,
) -> List[Embedding]:
    """Aligned UMAPs of kernels at successive training checkpoints (Appendix D.5, Fig. 8).

    The same probe samples, in the same order, in every kernel; umap-learn's ``AlignedUMAP``
    with the identity relation between consecutive checkpoints and the same hyperparameters
    throughout, each on d = 1 − R̂ with same-label edges removed by default (see
    :func:`umap_embedding` for what that does to the map, and the module docstring for how
    our graphs reach AlignedUMAP).

    Args:
        kernels: ≥ 2 square LossKernels or matrices, each [n, n], in training order.
        labels: [n] labels shared by all checkpoints; default the first kernel's labels.
        exclude_same_label_edges: delete same-label kNN edges (default True, Appendix B).
        alignment_regularisation, alignment_window_size: AlignedUMAP's alignment settings.
        Others: as :func:`umap_embedding`.

    Returns:
        one :class:`Embedding` per checkpoint, in the given order (memory: one float32
        [n, n] matrix per checkpoint while fitting).
    """
    if isinstance(kernels, (LossKernel, np.ndarray)) or not isinstance(kernels, Sequence):
        raise ValueError("kernels must be a list of ≥ 2 kernels (one per checkpoint)")
    if len(kernels) < 2:
        raise ValueError(f"kernels must hold at least 2 checkpoints, got {len(kernels)}")
    checked = [checked_kernel(k, f"kernels[{i}]") for i, k in enumerate(kernels)]
    sizes = [c.n for c in checked]
    if len(set(sizes)) != 1:
        raise ValueError(f"kernels must all be over the same n probe samples, got sizes {sizes}")
    n = sizes[0]
    label_arr = _labels_for(checked[0], labels, n, exclude_same_label_edges)
    use_labels = label_arr if exclude_same_label_edges else None
    n_neighbors = _check_n_neighbors(n_neighbors, n, use_labels)
    params = _umap_params(n_components, n_neighbors, min_dist, random_state, n_epochs, umap_kwargs or {})
    if not isinstance(alignment_window_size, numbers.Integral) or alignment_window_size < 1:
        raise ValueError(f"alignment_window_size must be a positive int, got {alignment_window_size!r}")
    params.update(alignment_regularisation=float(alignment_regularisation),
                  alignment_window_size=int(alignment_window_size))

    graphs, matrices = [], []
    for kernel, given in zip(checked, kernels):
        distance = _distance(kernel)
        indices, distances = _knn(kernel, distance, n_neighbors, use_labels)
        if kernel is not given:
            kernel.release()  # one float32 matrix per checkpoint while fitting, as before
        graphs.append((indices, distances))
        matrices.append(_graph_encoding_matrix(distance, indices))
        del distance

    relations = [{j: j for j in range(n)} for _ in range(len(kernels) - 1)]
    with _umap_context(random_state):
        import umap  # inside: importing umap-learn's stack can draw from Python's global generator

        aligned = umap.AlignedUMAP(metric="precomputed", **params)
        aligned.fit(matrices, relations=relations)
    return [
        Embedding(embedding=np.asarray(coords, dtype=np.float32), knn_indices=indices,
                  knn_distances=distances, graph=mapper.graph_.tocsr(),
                  excluded_same_label=bool(exclude_same_label_edges), params=dict(params),
                  method="AlignedUMAP", num_labels=_num_labels(use_labels))
        for coords, mapper, (indices, distances) in zip(aligned.embeddings_, aligned.mappers_, graphs)
    ]
