"""Every plot returns a Figure, saves a non-empty PNG, and leaves pyplot's registry empty."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from devinterp_losskernel import (
    KernelAccumulator,  # noqa: E402
    plotting,  # noqa: E402
)
from devinterp_losskernel.analysis import (  # noqa: E402
    cka_convergence,
    memorization_scores,
    pc1_separation,
    top_correlated,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def kernel():
    rng = np.random.default_rng(0)
    n, draws = 40, 120
    task = np.arange(n) % 2
    factors = rng.standard_normal((draws, 2))
    losses = factors[:, task] * rng.uniform(0.5, 1.5, n) + 0.5 * rng.standard_normal((draws, n))
    acc = KernelAccumulator(n)
    acc.update(torch.as_tensor(losses))
    return acc.compute(labels=torch.as_tensor(task))


def check_png(fig, path):
    assert isinstance(fig, Figure)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert plt.get_fignums() == [], "plots must not register figures with pyplot"


def test_correlation_matrix(kernel, tmp_path):
    path = tmp_path / "sub" / "R.png"  # folders are created
    fig = plotting.plot_correlation_matrix(kernel, path=path)  # ordered by kernel.labels
    check_png(fig, path)
    image = fig.axes[0].images[0].get_array()
    labels = kernel.labels.numpy()
    order = np.argsort(labels, kind="stable")
    np.testing.assert_allclose(image, kernel.correlation.numpy()[np.ix_(order, order)])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1"]
    # an explicit order (a subset) and the covariance
    fig = plotting.plot_correlation_matrix(kernel.covariance, order=[3, 1, 2], use="covariance",
                                           path=tmp_path / "K.png")
    order = np.ix_([3, 1, 2], [3, 1, 2])
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), kernel.covariance.numpy()[order])
    with pytest.raises(ValueError, match="order must be in \\[0, n=40\\)"):
        plotting.plot_correlation_matrix(kernel, order=[0, 40])
    with pytest.raises(ValueError, match="labels must have one entry per probe sample: length 40"):
        plotting.plot_correlation_matrix(kernel, labels=[0, 1])


def test_covariance_histograms(kernel, tmp_path):
    path = tmp_path / "hist.png"
    fig = plotting.plot_covariance_histograms(kernel, kernel.labels, path=path)
    check_png(fig, path)
    assert len(fig.axes[0].patches) == 3  # within 0, cross, within 1
    assert fig.axes[0].get_xscale() == "log"


def test_cka_convergence(kernel, tmp_path):
    curve = cka_convergence([(10, kernel.covariance * 1.1), (20, kernel.covariance)], kernel)
    path = tmp_path / "cka.png"
    check_png(plotting.plot_cka_convergence(curve, path=path), path)
    fig = plotting.plot_cka_convergence({"γ=100": curve, "γ=1000": curve}, path=path)
    assert len(fig.axes[0].get_lines()) == 3  # two curves and the line at 1
    with pytest.raises(ValueError, match="curve must be a non-empty list of \\(num_draws, cka\\) pairs"):
        plotting.plot_cka_convergence([1, 2, 3])


def test_memorization(kernel, tmp_path):
    scores = memorization_scores(kernel)
    is_pos = np.arange(40) < 8
    path = tmp_path / "mem.png"
    fig = plotting.plot_memorization(scores, is_pos, path=path)
    check_png(fig, path)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="is_positive"):
        plotting.plot_memorization(scores, is_pos[:5])


def test_pc1_separation(kernel, tmp_path):
    result = pc1_separation(kernel, kernel.labels)
    path = tmp_path / "pc1.png"
    check_png(plotting.plot_pc1_separation(result, kernel.labels, path=path), path)
    check_png(plotting.plot_pc1_separation(result, path=path), path)
    with pytest.raises(ValueError, match="result must be a PC1Separation"):
        plotting.plot_pc1_separation({"auc": 1.0})


@pytest.mark.parametrize("shape", [(40, 8, 8), (40, 3, 8, 8), (40, 1, 8, 8), (40, 8, 8, 3)])
def test_top_k_grid(kernel, tmp_path, shape):
    images = np.random.default_rng(0).random(shape)
    queries = np.array([0, 5, 9])
    idx, vals = top_correlated(kernel, queries, k=4)
    path = tmp_path / "grid.png"
    fig = plotting.plot_top_k_grid(torch.tensor(images), queries, idx, vals, labels=kernel.labels, path=path)
    check_png(fig, path)
    assert len(fig.axes) == 3 * 5
    assert fig.axes[1].get_title() == f"{vals[0, 0]:.2f}"


def test_top_k_grid_bad_inputs(kernel):
    images = np.zeros((40, 8, 8))
    with pytest.raises(ValueError, match="images must have 1, 3 or 4 channels"):
        plotting.plot_top_k_grid(np.zeros((40, 5, 8, 8)), [0], [[1, 2]])
    # the explorer's image rule: an ambiguous layout is refused unless stated, NaN pixels refused
    with pytest.raises(ValueError, match="ambiguous"):
        plotting.plot_top_k_grid(np.zeros((40, 3, 8, 3)), [0], [[1, 2]])
    plotting.plot_top_k_grid(np.zeros((40, 3, 8, 3)), [0], [[1, 2]], image_layout="NHWC")
    nan_pixel = np.zeros((40, 8, 8))
    nan_pixel[2, 1, 1] = np.nan
    with pytest.raises(ValueError, match="images must have finite pixels, got NaN/Inf in image 2"):
        plotting.plot_top_k_grid(nan_pixel, [0], [[1, 2]])
    with pytest.raises(ValueError, match="neighbour_indices must be an int array \\[q=2, k\\]"):
        plotting.plot_top_k_grid(images, [0, 1], [[1, 2]])
    with pytest.raises(ValueError, match="neighbour_indices must be in \\[0, n=40\\)"):
        plotting.plot_top_k_grid(images, [0], [[1, 40]])
    with pytest.raises(ValueError, match="values must have the shape of neighbour_indices"):
        plotting.plot_top_k_grid(images, [0], [[1, 2]], values=[[0.5]])


def test_memorization_histogram_keeps_both_groups_visible():
    """One clean sample at 1e-6 must not hide the relabelled group (it did with density=True
    on log bins); each group's tallest bar is a visible share of the y-axis, inside the x-range."""
    rng = np.random.default_rng(0)
    clean = rng.lognormal(np.log(0.12), 0.4, 900)
    clean[0] = 1e-6
    bad = rng.lognormal(np.log(1.04), 0.5, 100)
    scores = np.r_[clean, bad]
    is_pos = np.r_[np.zeros(900, bool), np.ones(100, bool)]
    fig = plotting.plot_memorization(scores, is_pos, positive_label="relabelled", negative_label="clean")
    ax = fig.axes[1]
    top = ax.get_ylim()[1]
    lo, hi = ax.get_xlim()
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("clean (n=900") for t in texts) and any(t.startswith("relabelled (n=100") for t in texts)
    steps = [p for p in ax.patches if str(p.get_label()).startswith(("clean", "relabelled"))]
    assert len(steps) == 2
    for patch in steps:
        if True:
            xy = patch.get_xy()
            assert xy[:, 1].max() > 0.2 * top, patch.get_label()
            assert xy[xy[:, 1] > 0, 0].max() > lo and xy[xy[:, 1] > 0, 0].min() < hi
    assert "beyond the range shown" in ax.get_xlabel()
    assert "100 relabelled among n = 1000" in fig._suptitle.get_text()


def test_figures_say_on_their_face_what_they_show(kernel):
    """Titles and legends carry n, the groups and the counts that the figure is about."""
    fig = plotting.plot_covariance_histograms(kernel, kernel.labels)
    ax = fig.axes[0]
    assert "n = 40 samples, 2 groups" in ax.get_title()
    legend = [t.get_text() for t in (ax.get_legend() or fig.legends[0]).get_texts()]
    # 20·20 cross pairs, C(20, 2) = 190 within pairs per group: the counts are the figure's own
    assert sorted(t.split(",")[0] for t in legend) == ["0", "0 vs 1", "1"]
    assert any("n=400 pairs" in t for t in legend) and sum("n=190 pairs" in t for t in legend) == 2
    fig = plotting.plot_pc1_separation(pc1_separation(kernel, kernel.labels), kernel.labels)
    ax = fig.axes[0]
    auc = pc1_separation(kernel, kernel.labels).auc
    assert "n = 40" in ax.get_title() and f"{auc:.3f}" in ax.get_title()
    assert sorted(t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()) == ["0", "1"]
    assert "% of variance" in ax.get_xlabel()
    title = plotting.plot_correlation_matrix(kernel).axes[0].get_title()
    assert "40 samples" in title and f"N = {kernel.num_draws} draws" in title
