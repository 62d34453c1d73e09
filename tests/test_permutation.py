"""Permuting the probe permutes every per-sample output of every analysis (and leaves the
aggregates alone): no result may depend on where a sample sits in the probe.

The kernels here have the ties that used to be broken by position: zero-variance samples
(R = 0 with every sample, so every neighbour is tied), equal variances, and colours equally
far from the mean. Tied neighbours must be shared (lift, label-issue scores) or, where a list
of k has to pick, reported (top_correlated's TiedNeighboursWarning).
"""

import warnings

import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator, LossKernel
from devinterp_losskernel.analysis import (
    attribute_lift,
    cka,
    color_groups,
    detection_auc,
    group_covariances,
    kernel_knn_graph,
    label_issue_scores,
    mean_self_covariance,
    memorization_scores,
    pc1_separation,
    roc_curve,
    singular_fluctuation,
    taxonomic_lift,
    top_correlated,
)
from devinterp_losskernel.analysis.memorization import posterior_predictive_scores
from devinterp_losskernel.analysis.neighbours import TiedNeighboursWarning
from devinterp_losskernel.hierarchy import Hierarchy

N = 36
PARENTS = {"A": "root", "B": "root", **{f"l{i}": "A" if i < 3 else "B" for i in range(6)}}


def make_kernel(seed=0, zero_variance=(5, 17), tied_variance=True):
    """A LossKernel of N samples with labels 0…5, mean, init_loss; two samples whose loss never
    moves (variance 0) and, optionally, a block of samples with exactly equal variances."""
    rng = np.random.default_rng(seed)
    draws = 40
    losses = rng.standard_normal((draws, 3)) @ rng.standard_normal((3, N)) + rng.standard_normal((draws, N))
    if tied_variance:  # samples 20…23: the same draws shuffled → identical variances, different R
        base = losses[:, 20].copy()
        for j in range(21, 24):
            losses[:, j] = base[rng.permutation(draws)]
    losses += 5.0
    for j in zero_variance:
        losses[:, j] = 2.0
    acc = KernelAccumulator(N)
    acc.update(torch.as_tensor(losses))
    kernel = acc.compute(labels=torch.as_tensor(np.arange(N) % 6))
    kernel.init_loss = torch.as_tensor(losses.mean(0) - rng.uniform(0, 1, N))
    kernel.metadata = {"sampler": {"nbeta": 10.0}, "settings": {"num_train": 100}}
    return kernel


def permuted(kernel: LossKernel, perm: np.ndarray) -> LossKernel:
    """The same kernel over the probe in the order perm (new sample i = old sample perm[i])."""
    p = torch.as_tensor(perm)
    return LossKernel(covariance=kernel.covariance[p][:, p], mean=kernel.mean[p], variance=kernel.variance[p],
                      num_draws=kernel.num_draws, init_loss=kernel.init_loss[p], labels=kernel.labels[p],
                      metadata=kernel.metadata)


@pytest.fixture(params=[0, 1, 2])
def pair(request):
    kernel = make_kernel()
    perm = np.random.default_rng(100 + request.param).permutation(N)
    return kernel, permuted(kernel, perm), perm


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_memorization_scores_permute(pair):
    kernel, other, perm = pair
    for normalize in (False, True, "cv"):
        np.testing.assert_allclose(memorization_scores(other, normalize), memorization_scores(kernel, normalize)[perm])


def test_every_label_issue_score_permutes_even_with_zero_variance_samples(pair):
    kernel, other, perm = pair
    probs = np.random.default_rng(3).dirichlet(np.ones(6), N)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = label_issue_scores(kernel, k=4, posterior_probs=probs)
        scores_p = label_issue_scores(other, k=4, posterior_probs=probs[perm])
    assert set(scores) == set(scores_p) and "neighbour label agreement" in scores
    for name in scores:
        np.testing.assert_allclose(scores_p[name], scores[name][perm], rtol=1e-12, atol=1e-12, err_msg=name)
    # the two zero-variance samples are reported, by both calls
    assert sum("zero variance" in str(w.message) for w in caught) == 2
    predictive = posterior_predictive_scores(probs, kernel.labels)
    predictive_p = posterior_predictive_scores(probs[perm], other.labels)
    for name in predictive:
        np.testing.assert_allclose(predictive_p[name], predictive[name][perm], err_msg=name)


def test_neighbour_sets_permute_and_ties_are_reported(pair):
    kernel, other, perm = pair
    for lowest in (False, True):
        for exclude in (False, True):
            with pytest.warns(TiedNeighboursWarning, match="zero variance"):
                idx, vals = top_correlated(kernel, k=4, lowest=lowest, exclude_same_label=exclude)
            with pytest.warns(TiedNeighboursWarning, match="zero variance"):
                idx_p, vals_p = top_correlated(other, k=4, lowest=lowest, exclude_same_label=exclude)
            zero = np.flatnonzero(kernel.variance.numpy() == 0)
            for i in range(N):  # new sample i is old sample perm[i]
                old = perm[i]
                np.testing.assert_allclose(np.sort(vals_p[i]), np.sort(vals[old]))
                if old in zero:
                    continue  # every candidate is tied at R = 0: which k are listed is arbitrary (and reported)
                assert set(perm[idx_p[i]]) == set(idx[old]), (lowest, exclude, i)


def test_knn_graph_permutes(pair):
    kernel, other, perm = pair
    idx, dist = quiet(kernel_knn_graph, kernel, 5)
    idx_p, dist_p = quiet(kernel_knn_graph, other, 5)
    zero = set(np.flatnonzero(kernel.variance.numpy() == 0))
    for i in range(N):
        np.testing.assert_allclose(np.sort(dist_p[i]), np.sort(dist[perm[i]]), rtol=1e-6)
        if perm[i] not in zero:
            assert set(perm[idx_p[i]]) == set(idx[perm[i]])


def test_pc1_projection_permutes_and_aggregates_do_not_change(pair):
    kernel, other, perm = pair
    groups = kernel.labels.numpy() < 3
    result = pc1_separation(kernel, groups)
    result_p = pc1_separation(other, groups[perm])
    np.testing.assert_allclose(result_p.projection, result.projection[perm], atol=1e-10)
    np.testing.assert_allclose(result_p.component, result.component[perm], atol=1e-10)
    assert result_p.auc == pytest.approx(result.auc) and result_p.groups == result.groups
    table, table_p = group_covariances(kernel, kernel.labels).summary, group_covariances(other, other.labels).summary
    np.testing.assert_allclose(table_p[["count", "mean", "std", "median"]], table[["count", "mean", "std", "median"]])
    means, means_p = mean_self_covariance(kernel), mean_self_covariance(other)
    assert means_p.keys() == means.keys()
    np.testing.assert_allclose(list(means_p.values()), list(means.values()))
    scores = memorization_scores(kernel)
    assert detection_auc(scores[perm], groups[perm]) == pytest.approx(detection_auc(scores, groups))
    for a, b in zip(roc_curve(scores[perm], groups[perm]), roc_curve(scores, groups)):
        np.testing.assert_allclose(a, b)
    assert cka(other, permuted(make_kernel(seed=1), perm)) == pytest.approx(cka(kernel, make_kernel(seed=1)))
    assert singular_fluctuation(other).nu == pytest.approx(singular_fluctuation(kernel).nu)


def test_lifts_do_not_depend_on_the_probe_order_even_with_ties(pair):
    kernel, other, perm = pair
    groups = np.arange(N) % 4
    for lowest in (False, True):
        lift = quiet(attribute_lift, kernel, groups, k=5, lowest=lowest)
        lift_p = quiet(attribute_lift, other, groups[perm], k=5, lowest=lowest)
        np.testing.assert_allclose(lift_p.per_group.to_numpy(), lift.per_group.to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(lift_p.transition.to_numpy(), lift.transition.to_numpy(), rtol=1e-12)
    tree = Hierarchy.from_parents(PARENTS, classes=[f"l{i}" for i in range(6)])
    taxonomic = taxonomic_lift(kernel, None, tree, k=5)
    taxonomic_p = taxonomic_lift(other, None, tree, k=5)
    np.testing.assert_allclose(taxonomic_p.to_numpy(), taxonomic.to_numpy(), rtol=1e-12)


def test_colour_groups_do_not_depend_on_the_probe_order():
    """Colours equally far from the mean colour (exact in binary): farthest-point sampling must
    not pick among them by position."""
    colours = np.array([[0.75, 0.5, 0.5], [0.5, 0.75, 0.5], [0.25, 0.5, 0.5], [0.5, 0.25, 0.5],
                        [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    images = np.repeat(np.repeat(colours[:, None, None, :], 2, axis=1), 2, axis=2)  # [6, 2, 2, 3]
    groups = color_groups(images, 2)
    for seed in range(6):
        perm = np.random.default_rng(seed).permutation(len(colours))
        groups_p = color_groups(images[perm], 2)
        # the same partition of the samples (group ids follow the selection order, also fixed)
        np.testing.assert_array_equal(groups_p, groups[perm])
