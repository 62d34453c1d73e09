"""memorization: self-covariance scores, our ROC-AUC (vs scikit-learn), group means."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from devinterp_losskernel import KernelAccumulator, LossKernel
from devinterp_losskernel.analysis import (
    detection_auc,
    mean_self_covariance,
    memorization_scores,
    roc_curve,
)


def kernel_from_draws(draws, **fields):
    acc = KernelAccumulator(draws.shape[1])
    acc.update(torch.as_tensor(draws))
    return acc.compute(**fields)


def memorizing_kernel(n=200, n_pos=40, draws=400, seed=0):
    """Losses over draws: 'memorized' samples fluctuate with std 2, the rest with std 1."""
    rng = np.random.default_rng(seed)
    is_pos = np.zeros(n, dtype=bool)
    is_pos[rng.choice(n, n_pos, replace=False)] = True
    std = np.where(is_pos, 2.0, 1.0)
    losses = 3.0 + rng.standard_normal((draws, n)) * std
    return kernel_from_draws(losses), is_pos


def test_auc_closed_form():
    # positives score 2 and 4, negatives 1 and 3: pairs (2>1), (4>1), (4>3) win, (2<3) loses
    assert detection_auc([1.0, 2.0, 3.0, 4.0], [False, True, False, True]) == 0.75
    # a tie between a positive and a negative counts one half
    assert detection_auc([1.0, 1.0], [True, False]) == 0.5
    assert detection_auc([0.0, 1.0, 2.0], [False, True, True]) == 1.0
    assert detection_auc([0.0, 1.0, 2.0], [True, False, False]) == 0.0


@pytest.mark.parametrize("levels", [None, 5, 2])  # continuous scores, heavy ties, two values
def test_auc_matches_sklearn(rng, levels):
    for _ in range(20):
        n = int(rng.integers(5, 300))
        y = rng.random(n) < rng.uniform(0.1, 0.9)
        y[0], y[1] = True, False
        s = rng.standard_normal(n) + y * rng.uniform(0, 2)
        if levels is not None:
            s = np.round(s * levels / 4)
        assert detection_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert detection_auc(torch.tensor(s), torch.tensor(y)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_curve_matches_sklearn_and_its_area_is_the_auc(rng):
    s = np.round(rng.standard_normal(150), 1)
    y = rng.random(150) < 0.3
    fpr, tpr, thresholds = roc_curve(s, y)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds[1:]) < 0)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    assert trapezoid(tpr, fpr) == pytest.approx(detection_auc(s, y), abs=1e-12)


def test_scores_are_the_self_covariance_and_detect_memorization():
    kernel, is_pos = memorizing_kernel()
    scores = memorization_scores(kernel)
    np.testing.assert_allclose(scores, np.diag(kernel.covariance.numpy()), rtol=1e-12)
    # variances 4 vs 1, estimated from 400 draws: the two populations barely overlap
    assert detection_auc(scores, is_pos) > 0.99
    means = mean_self_covariance(kernel, is_pos)
    assert list(means) == [False, True]
    assert means[False] == pytest.approx(1.0, rel=0.05)
    assert means[True] == pytest.approx(4.0, rel=0.05)


def test_normalized_scores():
    kernel, is_pos = memorizing_kernel()
    raw = memorization_scores(kernel)
    median = memorization_scores(kernel, normalize=True)
    np.testing.assert_allclose(median, raw / np.median(raw))
    np.testing.assert_allclose(memorization_scores(kernel, normalize="median"), median)
    assert np.median(median) == pytest.approx(1.0)
    assert detection_auc(median, is_pos) == detection_auc(raw, is_pos)  # monotone: ranks kept
    cv = memorization_scores(kernel, normalize="cv")
    np.testing.assert_allclose(cv, raw / kernel.mean.numpy() ** 2)
    # a loss scaled by 10 has 100× the variance but the same normalized scores
    scaled = LossKernel(covariance=kernel.covariance * 100, mean=kernel.mean * 10,
                        variance=kernel.variance * 100, num_draws=kernel.num_draws)
    np.testing.assert_allclose(memorization_scores(scaled, normalize=True), median)
    np.testing.assert_allclose(memorization_scores(scaled, normalize="cv"), cv)


def test_scores_of_a_plain_matrix_and_group_means_from_kernel_labels():
    cov = np.diag([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_array_equal(memorization_scores(torch.tensor(cov)), [1, 2, 3, 6])
    k = LossKernel(covariance=torch.tensor(cov), mean=torch.ones(4), variance=torch.tensor([1.0, 2, 3, 6]),
                   num_draws=10, labels=torch.tensor([0, 0, 1, 1]))
    assert mean_self_covariance(k) == {0: 1.5, 1: 4.5}
    assert mean_self_covariance(cov, ["a", "b", "a", "b"]) == {"a": 2.0, "b": 4.0}


def test_bad_inputs_name_the_argument():
    kernel, is_pos = memorizing_kernel(n=20, n_pos=5, draws=10)
    with pytest.raises(ValueError, match="is_positive"):
        detection_auc(np.arange(5.0), [True, False])
    with pytest.raises(ValueError, match="is_positive must mark at least one positive and one negative"):
        detection_auc(np.arange(3.0), [True, True, True])
    with pytest.raises(ValueError, match="is_positive must be boolean"):
        detection_auc(np.arange(3.0), [0, 2, 1])
    with pytest.warns(RuntimeWarning, match="1 of 2 samples have no score"), \
            pytest.raises(ValueError, match="after leaving out the 1 samples without a score"):
        detection_auc([np.nan, 1.0], [True, False])  # a NaN score is left out, here leaving one class
    with pytest.raises(ValueError, match="groups must have one entry per probe sample: length 20"):
        mean_self_covariance(kernel, is_pos[:-1])
    with pytest.raises(ValueError, match="groups must be given"):
        mean_self_covariance(kernel)
    with pytest.raises(ValueError, match="normalize must be"):
        memorization_scores(kernel, normalize="max")
    with pytest.raises(ValueError, match="kernel must be a LossKernel for normalize='cv'"):
        memorization_scores(np.eye(3), normalize="cv")
    with pytest.raises(ValueError, match="kernel must be a square"):
        memorization_scores(np.ones((2, 3)))
    one_draw = LossKernel(covariance=torch.zeros(3, 3), mean=torch.zeros(3), variance=torch.zeros(3), num_draws=1)
    with pytest.raises(ValueError, match="kernel must be estimated from at least 2 draws.*num_draws=1"):
        memorization_scores(one_draw)
    with pytest.raises(ValueError, match="positive median variance"):
        memorization_scores(np.zeros((3, 3)), normalize=True)


def test_label_issue_scores_against_a_hand_computation():
    import torch

    from devinterp_losskernel import KernelAccumulator
    from devinterp_losskernel.analysis import label_issue_scores

    rng = np.random.default_rng(3)
    n, draws = 30, 400
    labels = np.repeat(np.arange(3), 10)
    flipped = np.zeros(n, bool)
    flipped[[2, 15, 27]] = True
    # losses: class-shared factors, the flipped samples higher and noisier around w*
    factors = rng.normal(size=(draws, 3))
    traces = 0.1 + 0.05 * factors[:, labels] + 0.01 * rng.normal(size=(draws, n))
    traces[:, flipped] += 1.0 + 0.3 * rng.normal(size=(draws, flipped.sum()))
    acc = KernelAccumulator(n)
    acc.update(torch.from_numpy(traces))
    init = np.full(n, 0.1)
    kernel = acc.compute(init_loss=torch.from_numpy(init), labels=torch.from_numpy(labels))
    scores = label_issue_scores(kernel, k=5)
    np.testing.assert_allclose(scores["posterior mean loss"], traces.mean(0), rtol=1e-12)
    np.testing.assert_allclose(scores["mean shift"], traces.mean(0) - init, rtol=1e-12)
    np.testing.assert_allclose(scores["variance"], traces.var(0, ddof=1), rtol=1e-10)
    corr = np.corrcoef(traces, rowvar=False)
    np.fill_diagonal(corr, -np.inf)
    var = traces.var(0, ddof=1)
    clean = 1 - (np.argsort(np.argsort(var)) + 1) / n
    expected = []
    for i in range(n):
        nb = np.argsort(-corr[i])[:5]
        w = clean[nb] + 1e-12
        expected.append(1 - (w * (labels[nb] == labels[i])).sum() / w.sum())
    np.testing.assert_allclose(scores["neighbour label agreement"], expected, rtol=1e-9)
    for name in ("posterior mean loss", "variance"):
        assert detection_auc(scores[name], flipped) == 1.0, name
    with pytest.raises(ValueError, match="which must name scores"):
        label_issue_scores(kernel, which=["magic"])


def _reference_predictive_scores(probs, labels):
    """A float64 loop over samples: the three posterior-predictive scores by their definition."""
    probs = np.asarray(probs, dtype=np.float64)
    n, classes = probs.shape
    threshold = {c: np.mean([probs[i, c] for i in range(n) if labels[i] == c]) for c in set(labels.tolist())}
    confidence, margin, normalised = [], [], []
    for i in range(n):
        given = probs[i, labels[i]]
        confidence.append(1.0 - given)
        margin.append(max(probs[i, c] for c in range(classes) if c != labels[i]) - given)
        normalised.append(-given / threshold[labels[i]])
    return {"posterior self-confidence": confidence, "posterior margin": margin,
            "normalised posterior self-confidence": normalised}


def test_posterior_predictive_scores_match_a_float64_loop_and_find_label_errors():
    from devinterp_losskernel.analysis.memorization import posterior_predictive_scores

    rng = np.random.default_rng(5)
    n, classes = 300, 4
    true = rng.integers(0, classes, n)
    flipped = rng.random(n) < 0.15
    given = np.where(flipped, (true + rng.integers(1, classes, n)) % classes, true)
    # a posterior that mostly predicts the true class: the given label of a flipped sample is unlikely
    logits = 2.0 * np.eye(classes)[true] + rng.normal(size=(n, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = posterior_predictive_scores(probs.astype(np.float32), torch.from_numpy(given))
    expected = _reference_predictive_scores(probs.astype(np.float32), given)
    assert list(scores) == list(expected)
    for name in expected:
        assert scores[name].dtype == np.float64
        np.testing.assert_allclose(scores[name], expected[name], rtol=1e-12, atol=1e-12)
        assert detection_auc(scores[name], flipped) > 0.9, name
    # a posterior that has memorized every given label (p̄(y|x) = 0.9 for all) cannot tell: chance
    memorized = np.full((n, classes), 0.1 / (classes - 1))
    memorized[np.arange(n), given] = 0.9
    for name, values in posterior_predictive_scores(memorized, given).items():
        assert detection_auc(np.round(values, 9), flipped) == 0.5, name  # equal up to rounding
    # scored against the true labels, nothing is flagged better than chance by the true class
    assert detection_auc(posterior_predictive_scores(probs, true)["posterior self-confidence"], flipped) < 0.6


def test_posterior_predictive_scores_refuse_bad_input():
    from devinterp_losskernel.analysis.memorization import posterior_predictive_scores

    probs = np.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="rows sum to 1"):
        posterior_predictive_scores(np.full((4, 2), 0.7), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="labels must be integers in"):
        posterior_predictive_scores(probs, [0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"float \[n, C\]"):
        posterior_predictive_scores(np.ones(4), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="which must name"):
        posterior_predictive_scores(probs, [0, 1, 0, 1], which=["magic"])


def test_label_issue_scores_with_posterior_probs():
    from devinterp_losskernel.analysis import label_issue_scores
    from devinterp_losskernel.analysis.memorization import LABEL_ISSUE_SCORES, PREDICTIVE_LABEL_ISSUE_SCORES

    rng = np.random.default_rng(1)
    n = 40
    labels = np.repeat(np.arange(4), 10)
    kernel = kernel_from_draws(rng.normal(size=(50, n)), init_loss=torch.zeros(n), labels=torch.from_numpy(labels))
    probs = rng.dirichlet(np.ones(4), n)
    assert list(label_issue_scores(kernel)) == list(LABEL_ISSUE_SCORES)  # unchanged without probs
    scores = label_issue_scores(kernel, posterior_probs=probs, k=5)
    assert list(scores) == list(LABEL_ISSUE_SCORES + PREDICTIVE_LABEL_ISSUE_SCORES)
    expected = _reference_predictive_scores(probs, labels)
    for name in PREDICTIVE_LABEL_ISSUE_SCORES:
        np.testing.assert_allclose(scores[name], expected[name], rtol=1e-12)
    only = label_issue_scores(kernel, which=["posterior margin"], posterior_probs=probs)
    assert list(only) == ["posterior margin"]
    with pytest.raises(ValueError, match="need posterior_probs"):
        label_issue_scores(kernel, which=["posterior self-confidence"])
    with pytest.raises(ValueError, match=r"posterior_probs must be a float \[n=40, C\]"):
        label_issue_scores(kernel, posterior_probs=probs[:10])


def test_label_issue_scores_default_to_what_the_kernel_supports():
    from devinterp_losskernel import LossKernel
    from devinterp_losskernel.analysis import label_issue_scores

    torch.manual_seed(0)
    losses = torch.rand(50, 8, dtype=torch.float64)
    diagonal = LossKernel(covariance=None, mean=losses.mean(0), variance=losses.var(0), num_draws=50,
                          init_loss=losses.mean(0) - 0.1)
    assert set(label_issue_scores(diagonal)) == {"posterior mean loss", "mean shift", "variance"}
    no_init = LossKernel(covariance=torch.cov(losses.T), mean=losses.mean(0), variance=losses.var(0), num_draws=50)
    assert set(label_issue_scores(no_init)) == {"posterior mean loss", "variance"}
    assert "neighbour label agreement" in label_issue_scores(no_init, labels=[0, 1] * 4, k=3)
    with pytest.raises(ValueError, match="needs a square kernel"):
        label_issue_scores(diagonal, labels=[0, 1] * 4, which=["neighbour label agreement"])
