"""Taxonomic lift (Appendix D.2), attribute/colour lift (D.3, D.6) and their plots."""

import numpy as np
import pandas as pd
import pytest
import torch

from devinterp_losskernel import KernelAccumulator
from devinterp_losskernel.analysis.lift import (
    AttributeLift,
    attribute_lift,
    color_groups,
    correlation_by_tree_distance,
    farthest_point_sampling,
    mean_colors,
    taxonomic_lift,
)
from devinterp_losskernel.hierarchy import Hierarchy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# root ─ A ─ a1 ─ l0, l1        depth: root 0, A/B 1, a1…b2 2, leaves 3
#      │   └ a2 ─ l2, l3
#      └ B ─ b1 ─ l4, l5
#          └ b2 ─ l6, l7
PARENTS = {"A": "root", "B": "root", "a1": "A", "a2": "A", "b1": "B", "b2": "B",
           **{f"l{i}": p for i, p in enumerate(["a1", "a1", "a2", "a2", "b1", "b1", "b2", "b2"])}}


@pytest.fixture
def tree():
    return Hierarchy.from_parents(PARENTS, classes=[f"l{i}" for i in range(8)])


def distance_kernel(tree, labels):
    """R = 1 − (tree distance)/10 between labels (1 on the diagonal): a block kernel whose
    closest different-label samples are exactly the sibling class."""
    R = 1.0 - tree.distance_matrix(labels) / 10.0
    np.fill_diagonal(R, 1.0)
    return R


def test_block_kernel_closed_form(tree):
    per = 5
    labels = np.repeat(np.arange(8), per)
    R = distance_kernel(tree, labels)
    lift = taxonomic_lift(R, labels, tree, k=per)
    # the 5 neighbours of every query are its sibling class: they share depth 0, 1, 2
    # nodes; of the 35 different-label samples, 15 share the depth-1 node, 5 the depth-2 one
    assert list(lift.index) == [3] and list(lift.columns) == [0, 1, 2, 3]
    assert lift.index.name == "query_depth" and lift.columns.name == "ancestor_depth"
    np.testing.assert_allclose(lift.loc[3, [0, 1, 2]], [1.0, 35 / 15, 35 / 5])
    assert np.isnan(lift.loc[3, 3])  # no different-label sample shares a leaf
    np.testing.assert_allclose(lift.attrs["hit_rate"].loc[3, [0, 1, 2, 3]], [1, 1, 1, 0])
    np.testing.assert_allclose(lift.attrs["base_rate"].loc[3, [0, 1, 2, 3]], [1, 15 / 35, 5 / 35, 0])
    assert lift.attrs["num_queries"].loc[3] == 40 and lift.attrs["k"] == per


def test_sampled_block_kernel_lifts_at_the_shared_ancestor(tree):
    """Losses driven by a factor per depth-1 node (A, B): lift > 1 at d' = 1, and a LossKernel
    with its own labels works as input."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 12)
    top = (labels >= 4).astype(int)
    draws = 300
    losses = rng.standard_normal((draws, 2))[:, top] + rng.standard_normal((draws, labels.size))
    acc = KernelAccumulator(labels.size)
    acc.update(torch.as_tensor(losses))
    kernel = acc.compute(labels=torch.as_tensor(labels))
    lift = taxonomic_lift(kernel, None, tree, k=10)
    assert lift.loc[3, 0] == pytest.approx(1.0)
    assert lift.loc[3, 1] > 2.0                       # neighbours stay within A or B
    np.testing.assert_allclose(lift.loc[3, 1], 84 / 36, rtol=0.05)  # = 1 / base rate


def test_random_kernel_has_lift_about_one(tree):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(8), 60)
    noise = rng.standard_normal((40, labels.size))
    K = noise.T @ noise / 40                           # Wishart: no label structure
    lift = taxonomic_lift(torch.as_tensor(K), labels, tree, k=20)
    np.testing.assert_allclose(lift.loc[3, [0, 1, 2]], 1.0, atol=0.12)


def test_uneven_depths_condition_on_query_depth():
    """Leaves at depths 2 and 3; a random kernel is at chance in every row with the
    per-depth base rate, while the literal all-query base rate is not comparable per row."""
    tree = Hierarchy.from_parents({"A": "r", "B": "r", "x": "A", "y": "A", "z": "B",
                                   "B1": "B", "u": "B1", "v": "B1"},
                                  classes=["x", "y", "z", "u", "v"])
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(5), 80)
    noise = rng.standard_normal((40, labels.size))
    lift = taxonomic_lift(noise.T @ noise, labels, tree, k=20)
    assert list(lift.index) == [2, 3] and np.isnan(lift.loc[2, 3])
    np.testing.assert_allclose(lift.loc[2, [0, 1]], 1.0, atol=0.12)
    np.testing.assert_allclose(lift.loc[3, [0, 1, 2]], 1.0, atol=0.12)
    literal = taxonomic_lift(noise.T @ noise, labels, tree, k=20, base_rate="all")
    np.testing.assert_allclose(literal.attrs["hit_rate"], lift.attrs["hit_rate"])
    assert not np.allclose(literal.loc[2, 1], lift.loc[2, 1], atol=0.05)


def test_taxonomic_lift_errors(tree):
    labels = np.repeat(np.arange(8), 4)
    R = distance_kernel(tree, labels)
    with pytest.raises(ValueError, match="labels"):
        taxonomic_lift(R, labels[:-1], tree)
    with pytest.raises(ValueError, match="labels"):
        taxonomic_lift(R, None, tree)                  # a matrix carries no labels
    with pytest.raises(ValueError, match=r"labels.*99"):
        taxonomic_lift(R, np.r_[labels[:-1], 99], tree, k=3)
    with pytest.raises(ValueError, match="k"):
        taxonomic_lift(R, labels, tree, k=32)          # k ≥ n
    with pytest.raises(ValueError, match="k"):
        taxonomic_lift(R, labels, tree, k=29)          # > 28 different-label candidates
    with pytest.raises(ValueError, match="hierarchy"):
        taxonomic_lift(R, labels, PARENTS)
    with pytest.raises(ValueError, match="base_rate"):
        taxonomic_lift(R, labels, tree, base_rate="global")


def test_correlation_by_tree_distance(tree):
    labels = np.repeat(np.arange(8), 3)
    R = distance_kernel(tree, labels)
    table = correlation_by_tree_distance(R, labels, tree)
    assert list(table.index) == [2, 4, 6]
    np.testing.assert_allclose(table["mean"], [0.8, 0.6, 0.4])
    assert table["num_pairs"].tolist() == [4 * 9, 8 * 9, 16 * 9]


# ---------------------------------------------------------------------------------------------
# attribute lift
# ---------------------------------------------------------------------------------------------
def test_attribute_lift_known_answer(tree):
    per = 5
    labels = np.repeat(np.arange(8), per)
    R = distance_kernel(tree, labels)
    groups = tree.ancestors_at_depth(labels, 1)        # "A" / "B"
    result = attribute_lift(R, groups, k=per, labels=labels)
    assert isinstance(result, AttributeLift) and result.excluded_same_label
    np.testing.assert_allclose(result.per_group["hit_rate"], 1.0)
    np.testing.assert_allclose(result.per_group["base_rate"], 15 / 35)
    assert result.mean_lift == pytest.approx(35 / 15) and result.pooled_lift == pytest.approx(35 / 15)
    np.testing.assert_allclose(result.transition.to_numpy(), np.eye(2))
    assert list(result.per_group.index) == ["A", "B"]


def test_attribute_lift_random_and_without_labels():
    rng = np.random.default_rng(3)
    n = 400
    noise = rng.standard_normal((40, n))
    groups = rng.integers(0, 4, n)
    result = attribute_lift(noise.T @ noise, groups, k=20)
    assert not result.excluded_same_label
    assert result.mean_lift == pytest.approx(1.0, abs=0.1)
    np.testing.assert_allclose(result.transition.sum(axis=1), 1.0)
    lowest = attribute_lift(noise.T @ noise, groups, k=20, lowest=True)
    assert lowest.pooled_lift == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="groups"):
        attribute_lift(noise.T @ noise, groups[:-1], k=20)
    with pytest.raises(ValueError, match="k"):
        attribute_lift(noise.T @ noise, groups, k=n)


# ---------------------------------------------------------------------------------------------
# colour groups
# ---------------------------------------------------------------------------------------------
def colour_images(rng, per=10):
    palette = np.array([[230, 20, 20], [20, 200, 30], [30, 40, 220]], dtype=float)
    which = np.repeat(np.arange(3), per)
    images = palette[which][:, None, None, :] + rng.normal(0, 8, (3 * per, 6, 5, 3))
    return np.clip(images, 0, 255).astype(np.uint8), which


def test_color_groups_recover_colours():
    rng = np.random.default_rng(4)
    images, which = colour_images(rng)
    groups, centres = color_groups(images, 3, return_centers=True)
    assert groups.dtype == np.int64 and groups.shape == which.shape and centres.shape == (3, 3)
    # the same partition up to the group numbering
    assert len(set(zip(groups.tolist(), which.tolist()))) == 3
    # channels first, torch, and channels_last given explicitly agree
    first = np.moveaxis(images, -1, 1)
    np.testing.assert_array_equal(color_groups(torch.as_tensor(first), 3), groups)
    np.testing.assert_array_equal(color_groups(first, 3, channels_last=False), groups)
    np.testing.assert_allclose(mean_colors(images), images.reshape(30, -1, 3).mean(axis=1))


def test_farthest_point_sampling_known_order():
    points = np.array([[0.0], [1.0], [2.0], [10.0]])
    assert farthest_point_sampling(points, 3).tolist() == [3, 0, 2]   # mean 3.25 → 10 first
    assert farthest_point_sampling(points, 2, start=1).tolist() == [1, 3]
    with pytest.raises(ValueError, match="k"):
        farthest_point_sampling(points, 5)
    with pytest.raises(ValueError, match="start"):
        farthest_point_sampling(points, 2, start=4)


def test_color_groups_shapes_and_errors():
    rng = np.random.default_rng(5)
    grey = rng.uniform(size=(12, 4, 4))
    assert color_groups(grey, 2).shape == (12,)
    with pytest.raises(ValueError, match="channels_last"):
        color_groups(rng.uniform(size=(5, 3, 4, 3)), 2)     # axis 1 and the last both 3
    with pytest.raises(ValueError, match="images"):
        color_groups(rng.uniform(size=(5, 4)), 2)
    with pytest.raises(ValueError, match="k"):
        color_groups(grey, 13)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def test_lift_and_transition_plots(tree, tmp_path):
    from matplotlib.figure import Figure

    from devinterp_losskernel import plotting

    labels = np.repeat(np.arange(8), 5)
    R = distance_kernel(tree, labels)
    fig = plotting.plot_lift_curves(taxonomic_lift(R, labels, tree, k=5), path=tmp_path / "lift.png")
    assert isinstance(fig, Figure) and (tmp_path / "lift.png").read_bytes().startswith(PNG_MAGIC)
    result = attribute_lift(R, tree.ancestors_at_depth(labels, 2), k=5, labels=labels)
    fig = plotting.plot_attribute_transition(result, path=tmp_path / "transition.png")
    assert (tmp_path / "transition.png").read_bytes().startswith(PNG_MAGIC)
    fig = plotting.plot_hierarchy_sorted_matrix(R, labels, tree, path=tmp_path / "sorted.png",
                                                max_samples=20)
    assert (tmp_path / "sorted.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="lift"):
        plotting.plot_lift_curves(pd.DataFrame())
    with pytest.raises(ValueError, match="hierarchy"):
        plotting.plot_hierarchy_sorted_matrix(R, labels, PARENTS)
