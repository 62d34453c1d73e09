"""UMAP embeddings on d = 1 − R with same-label kNN edges removed (Appendix B, D.5).

umap-learn compiles numba code at first use: about 6 s for UMAP and 20 s more for
AlignedUMAP on 2 cores, so each is fitted once per module (small n, few epochs).
"""

import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator
from devinterp_losskernel.analysis.embedding import (
    Embedding,
    aligned_umap_embeddings,
    kernel_knn_graph,
    umap_embedding,
)
from devinterp_losskernel.analysis.neighbours import top_correlated

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_NEIGHBORS = 6


def make_kernel(seed, label_strength=1.5, n_labels=6, per=8):
    """Losses with a strong shared factor per *label* (the spurious same-label coupling of
    Appendix B) plus a weaker one per pair of labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_labels), per)
    draws = 200
    losses = (label_strength * rng.standard_normal((draws, n_labels))[:, labels]
              + rng.standard_normal((draws, n_labels // 2))[:, labels // 2]
              + rng.standard_normal((draws, labels.size)))
    acc = KernelAccumulator(labels.size)
    acc.update(torch.as_tensor(losses))
    return acc.compute(labels=torch.as_tensor(labels))


@pytest.fixture(scope="module")
def kernel():
    return make_kernel(0)


@pytest.fixture(scope="module")
def fitted(kernel):
    return umap_embedding(kernel, n_neighbors=N_NEIGHBORS, random_state=0, n_epochs=60)


@pytest.fixture(scope="module")
def aligned(kernel):
    later = make_kernel(1)
    return [kernel, later], aligned_umap_embeddings([kernel, later], n_neighbors=N_NEIGHBORS,
                                                    random_state=0, n_epochs=30)


def edges(graph):
    coo = graph.tocoo()
    keep = coo.data > 0
    return coo.row[keep], coo.col[keep]


def test_knn_graph_excludes_same_label(kernel):
    labels = kernel.labels.numpy()
    indices, distances = kernel_knn_graph(kernel, N_NEIGHBORS)
    n = labels.size
    assert indices.shape == distances.shape == (n, N_NEIGHBORS)
    np.testing.assert_array_equal(indices[:, 0], np.arange(n))       # UMAP: self first
    assert np.all(distances[:, 0] == 0)
    assert not np.any(labels[indices[:, 1:]] == labels[:, None])
    R = kernel.correlation.numpy()
    np.testing.assert_allclose(distances, 1 - np.take_along_axis(R, indices, 1), atol=1e-6)
    assert np.all(np.diff(distances[:, 1:], axis=1) >= 0)           # nearest first
    expected, _ = top_correlated(kernel, k=N_NEIGHBORS - 1, exclude_same_label=True)
    np.testing.assert_array_equal(indices[:, 1:], expected)
    # without the exclusion the spurious same-label neighbours win
    plain, _ = kernel_knn_graph(kernel, N_NEIGHBORS, exclude_same_label_edges=False)
    assert np.mean(labels[plain[:, 1:]] == labels[:, None]) > 0.9


def test_umap_embedding_graph_has_no_same_label_edges(kernel, fitted):
    labels = kernel.labels.numpy()
    assert isinstance(fitted, Embedding) and fitted.excluded_same_label
    assert fitted.embedding.shape == (labels.size, 2) and np.all(np.isfinite(fitted.embedding))
    rows, cols = edges(fitted.graph)
    assert rows.size > 0 and not np.any(labels[rows] == labels[cols])
    # UMAP's fuzzy graph only holds our kNN edges (in either direction)
    ours = {(i, j) for i in range(labels.size) for j in fitted.knn_indices[i, 1:]}
    assert all((i, j) in ours or (j, i) in ours for i, j in zip(rows, cols))
    assert fitted.params["n_neighbors"] == N_NEIGHBORS and fitted.params["min_dist"] == 0.1


def test_umap_embedding_is_reproducible_with_a_seed(kernel, fitted):
    again = umap_embedding(kernel.covariance, labels=kernel.labels, n_neighbors=N_NEIGHBORS,
                           random_state=0, n_epochs=60)
    np.testing.assert_allclose(again.embedding, fitted.embedding, atol=1e-4)
    np.testing.assert_array_equal(again.knn_indices, fitted.knn_indices)


def test_aligned_embeddings(aligned):
    kernels, results = aligned
    labels = kernels[0].labels.numpy()
    assert len(results) == 2
    for kernel, result in zip(kernels, results):
        assert result.embedding.shape == (labels.size, 2)
        assert np.all(np.isfinite(result.embedding))
        indices, _ = kernel_knn_graph(kernel, N_NEIGHBORS)
        np.testing.assert_array_equal(result.knn_indices, indices)
        rows, cols = edges(result.graph)
        assert rows.size > 0 and not np.any(labels[rows] == labels[cols])
        ours = {(i, j) for i in range(labels.size) for j in indices[i, 1:]}
        assert all((i, j) in ours or (j, i) in ours for i, j in zip(rows, cols))
        assert result.params["alignment_regularisation"] == 1e-2


def test_embedding_errors(kernel):
    labels = kernel.labels.numpy()
    R = kernel.covariance.numpy()
    with pytest.raises(ValueError, match="labels"):
        kernel_knn_graph(R, N_NEIGHBORS)                       # a matrix carries no labels
    with pytest.raises(ValueError, match="labels"):
        kernel_knn_graph(R, N_NEIGHBORS, labels=labels[:-1])
    with pytest.raises(ValueError, match="n_neighbors"):
        kernel_knn_graph(kernel, 42)                           # 40 different-label candidates
    with pytest.raises(ValueError, match="n_neighbors"):
        kernel_knn_graph(kernel, 1)
    with pytest.raises(ValueError, match="n_components"):
        umap_embedding(kernel, n_components=0)
    with pytest.raises(ValueError, match="umap_kwargs"):
        umap_embedding(kernel, umap_kwargs={"metric": "euclidean"})
    with pytest.raises(ValueError, match="kernels"):
        aligned_umap_embeddings([kernel])
    with pytest.raises(ValueError, match="kernels"):
        aligned_umap_embeddings([kernel, make_kernel(2, per=7)])
    with pytest.raises(ValueError, match="kernels"):
        aligned_umap_embeddings(kernel)


def test_embedding_plots(kernel, fitted, aligned, tmp_path):
    from matplotlib.figure import Figure

    from devinterp_losskernel import plotting
    from devinterp_losskernel.hierarchy import Hierarchy

    labels = kernel.labels.numpy()
    tree = Hierarchy.from_parents({i: f"pair{i // 2}" for i in range(6)} | {f"pair{p}": "root" for p in range(3)})
    fig = plotting.plot_embedding(fitted, labels, path=tmp_path / "by_label.png")
    assert isinstance(fig, Figure) and (tmp_path / "by_label.png").read_bytes().startswith(PNG_MAGIC)
    plotting.plot_embedding(fitted.embedding, labels, hierarchy=tree, path=tmp_path / "by_tree.png")
    assert (tmp_path / "by_tree.png").read_bytes().startswith(PNG_MAGIC)
    plotting.plot_aligned_embeddings(aligned[1], labels, hierarchy=tree, titles=["step 0", "step 1"],
                                     path=tmp_path / "aligned.png")
    assert (tmp_path / "aligned.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="embedding"):
        plotting.plot_embedding(np.zeros(5))
    with pytest.raises(ValueError, match="titles"):
        plotting.plot_aligned_embeddings(aligned[1], titles=["one"])


def test_umap_keeps_torch_thread_count():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = np.random.default_rng(0)
        x = g.normal(size=(40, 60))
        umap_embedding(np.cov(x), exclude_same_label_edges=False, n_neighbors=5, random_state=0, n_epochs=20)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_embedding_records_and_plots_state_the_edge_rule(kernel, fitted):
    from devinterp_losskernel import plotting

    assert fitted.description == f"UMAP of 1 − R, same-label edges removed (6 labels; k={N_NEIGHBORS}, n=48)"
    fig = plotting.plot_embedding(fitted, kernel.labels.numpy(), title="my title")
    assert "same-label edges removed" in fig.axes[0].get_title() and fig._suptitle.get_text() == "my title"
    assert len(fig.axes[0].get_legend().get_texts()) == 6
    kept = Embedding(fitted.embedding, fitted.knn_indices, fitted.knn_distances, fitted.graph, False, fitted.params)
    assert "all kNN edges kept" in plotting.plot_embedding(kept).axes[0].get_title()
    assert "not recorded" in plotting.plot_embedding(fitted.embedding).axes[0].get_title()
