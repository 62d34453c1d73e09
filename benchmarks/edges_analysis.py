"""Fault cases for the analyses and the plots (``analysis:`` / ``plot:``), for fault_cases.py.

``benchmarks/fault_cases.py`` imports this file and calls :func:`register` with itself (the
harness); ``fault_cases.py -k analysis`` and ``-k plot:`` run these cases. Each case stands
for a class of failure:

* non-finite values in a kernel, its variances or scores: refused by name, never read as
  R = 0 or ranked (NaN/Inf variance, NaN covariance entry, negative variance, NaN scores,
  NaN coordinates and CKA values in plots);
* order-dependent results: every per-sample output permutes with the probe, and ties are
  shared (lift, label-issue scores) or reported (neighbour lists);
* messages that name the argument the user passed (a NaN group, the posterior
  probabilities, one distinct label, a dominant label);
* the edges: single-member groups, empty selections, k larger than the candidates, labels of
  the wrong length or of mixed kinds, non-square kernels, meta/sparse/float32 tensors, torch
  vs numpy input, global random generators.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch

G_ANALYSIS = "analyses & plots"
N = 24


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def losses(n: int = N, draws: int = 40, seed: int = 0) -> np.ndarray:
    """[draws, n] losses with a shared low-rank part (so samples correlate) plus noise."""
    rng = np.random.default_rng(seed)
    return 4.0 + rng.standard_normal((draws, 3)) @ rng.standard_normal((3, n)) + rng.standard_normal((draws, n))


def kernel_of(loss: np.ndarray, labels=None):
    """A LossKernel of float64 losses [draws, n], labels 0…3 by default, init_loss set."""
    from devinterp_losskernel import KernelAccumulator

    n = loss.shape[1]
    acc = KernelAccumulator(n)
    acc.update(torch.as_tensor(loss))
    kernel = acc.compute(labels=torch.as_tensor(np.arange(n) % 4 if labels is None else labels))
    kernel.init_loss = kernel.mean - 0.25
    kernel.metadata = {"sampler": {"nbeta": 10.0}, "settings": {"num_train": 100}}
    return kernel


def small_kernel(n: int = N, seed: int = 0, labels=None):
    return kernel_of(losses(n, seed=seed), labels)


def tied_kernel(seed: int = 0):
    """Samples 3 and 11 never change loss (variance 0: R = 0 with all); 14…16 share a variance."""
    loss = losses(seed=seed)
    rng = np.random.default_rng(seed + 1)
    for j in (15, 16):
        loss[:, j] = loss[rng.permutation(loss.shape[0]), 14]
    loss[:, [3, 11]] = 2.0
    return kernel_of(loss)


def permuted(kernel, perm: np.ndarray):
    """The same kernel over the probe in the order perm (new sample i is old sample perm[i])."""
    from devinterp_losskernel import LossKernel

    p = torch.as_tensor(perm)
    return LossKernel(covariance=kernel.covariance[p][:, p], mean=kernel.mean[p], variance=kernel.variance[p],
                      num_draws=kernel.num_draws, init_loss=kernel.init_loss[p], labels=kernel.labels[p],
                      metadata=kernel.metadata)


def perms(count: int = 4, n: int = N):
    return [np.random.default_rng(50 + s).permutation(n) for s in range(count)]


def caught(fn, *args, **kwargs):
    """(result, [warning messages]) of fn(*args, **kwargs)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in seen]


def with_nan_variance(kernel, index: int = 3):
    kernel.variance[index] = float("nan")
    return kernel


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------

def register(h) -> None:  # noqa: C901  (one block of small cases)
    case, ok, wrong = h.case, h.ok, h.wrong

    # -- 1. non-finite values: refused by name, never read as 0 or ranked -----------------------
    @case("analysis: NaN variance top_correlated", "kernel.variance", "finite", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import top_correlated

        idx, vals = top_correlated(with_nan_variance(small_kernel()), k=3)
        return wrong(f"neighbours of sample 3 with R = {vals[3].tolist()} (NaN variance read as R = 0)")

    @case("analysis: NaN variance attribute_lift", "kernel.variance", "finite", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import attribute_lift

        lift = attribute_lift(with_nan_variance(small_kernel(), 7), np.arange(N) % 3, k=3)
        return wrong(f"mean lift {lift.mean_lift:.3f} from a kernel with a NaN variance")

    @case("analysis: Inf covariance entry in label_issue_scores", "kernel.covariance", "finite", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import label_issue_scores

        kernel = small_kernel()
        kernel.covariance[2, 9] = kernel.covariance[9, 2] = float("inf")
        scores = label_issue_scores(kernel, k=3)
        return wrong(f"scores {sorted(scores)} from a kernel with an infinite covariance")

    @case("analysis: negative variance memorization_scores", "variance", "≥ 0", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import memorization_scores

        kernel = small_kernel()
        kernel.variance[5] = -0.3
        scores = memorization_scores(kernel)
        return wrong(f"score {scores[5]:.3g} for a negative variance")

    @case("analysis: NaN variance umap kNN graph (kernel_knn_graph)", "kernel.variance", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import kernel_knn_graph

        idx, _ = kernel_knn_graph(with_nan_variance(small_kernel()), 4)
        return wrong(f"kNN row of the NaN sample: {idx[3].tolist()}")

    @case("analysis: detection_auc of scores with NaN", "scores", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import detection_auc

        auc = detection_auc([0.1, np.nan, 0.7, 0.3], [False, True, True, False])
        return wrong(f"AUC {auc}")

    @case("plot: plot_cka_convergence with a NaN CKA", "curve", "finite", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.plotting import plot_cka_convergence

        plot_cka_convergence([(10, 0.5), (20, float("nan")), (40, 0.9)])
        return wrong("a NaN point silently left a gap in the curve")

    @case("plot: plot_embedding with NaN coordinates", "NaN coordinates", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.plotting import plot_embedding

        coords = np.random.default_rng(0).normal(size=(N, 2))
        coords[[2, 9]] = np.nan
        fig, said = caught(plot_embedding, coords)
        title = fig.axes[0].get_title()
        if "2 samples with NaN coordinates not drawn" in title and any("NaN coordinates" in s for s in said):
            return ok("the 2 undrawn samples are named in a warning and on the figure")
        return wrong(f"title {title!r}, warnings {said}")

    # -- 2. order-dependent results ----------------------------------------------------------
    @case("analysis: neighbour label agreement of zero-variance samples, probe permuted", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import label_issue_scores

        kernel = tied_kernel()
        base, _ = caught(label_issue_scores, kernel, k=4)
        for perm in perms():
            other, _ = caught(label_issue_scores, permuted(kernel, perm), k=4)
            for name in base:
                gap = np.abs(other[name] - base[name][perm]).max()
                if gap > 1e-12:
                    return wrong(f"{name!r} changed by {gap:.3g} when the probe was permuted")
        return ok(f"all {len(base)} scores permute with the probe (4 permutations; zero-variance samples reported)")

    @case("analysis: attribute_lift with tied neighbours, probe permuted", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import attribute_lift

        kernel, groups = tied_kernel(), np.arange(N) % 3
        base, _ = caught(attribute_lift, kernel, groups, k=4)
        for perm in perms():
            other, _ = caught(attribute_lift, permuted(kernel, perm), groups[perm], k=4)
            gap = np.abs(other.per_group.to_numpy() - base.per_group.to_numpy()).max()
            if gap > 1e-12:
                return wrong(f"per-group lift changed by {gap:.3g} when the probe was permuted")
        return ok("per-group lift and transition unchanged by 4 permutations (ties shared)")

    @case("analysis: taxonomic_lift with tied neighbours, probe permuted", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import taxonomic_lift
        from devinterp_losskernel.hierarchy import Hierarchy

        tree = Hierarchy.from_parents({"A": "root", "B": "root", "a": "A", "b": "A", "c": "B", "d": "B"},
                                      classes=["a", "b", "c", "d"])
        kernel = tied_kernel()
        base = taxonomic_lift(kernel, None, tree, k=5)
        for perm in perms():
            other = taxonomic_lift(permuted(kernel, perm), None, tree, k=5)
            if not np.allclose(other.to_numpy(), base.to_numpy(), rtol=1e-12, equal_nan=True):
                return wrong("Lift(d, d') changed when the probe was permuted")
        return ok("Lift(d, d') unchanged by 4 permutations")

    @case("analysis: colour groups of equally distant colours, images permuted", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import color_groups

        colours = np.array([[0.75, 0.5, 0.5], [0.5, 0.75, 0.5], [0.25, 0.5, 0.5], [0.5, 0.25, 0.5], [0.5, 0.5, 0.5]])
        images = np.broadcast_to(colours[:, None, None, :], (5, 2, 2, 3)).copy()  # [n, H, W, C]
        base = color_groups(images, 2)
        for perm in perms(6, 5):
            if not np.array_equal(color_groups(images[perm], 2), base[perm]):
                return wrong("a different partition into colour groups when the images were permuted")
        return ok("the same colour groups for 6 permutations (ties broken by colour, not position)")

    @case("analysis: top_correlated of a zero-variance query, probe permuted", "tied", "zero variance",
          group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import top_correlated

        kernel = tied_kernel()
        (idx, _), said = caught(top_correlated, kernel, k=3)
        reported = any("zero variance" in s and "probe order" in s for s in said)
        for perm in perms():
            (idx_p, _), _ = caught(top_correlated, permuted(kernel, perm), k=3)
            for i, old in enumerate(perm):
                if old not in (3, 11) and set(perm[idx_p[i]]) != set(idx[old]):
                    return wrong(f"the neighbours of sample {old} changed when the probe was permuted")
        if not reported:
            return wrong("the arbitrary neighbour lists of zero-variance samples 3 and 11 were not reported")
        return ok("neighbour sets permute; the zero-variance queries' lists (all tied at R = 0) are reported")

    @case("analysis: pc1_separation projection, probe permuted", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import pc1_separation

        kernel, groups = small_kernel(), np.arange(N) % 2
        base = pc1_separation(kernel, groups)
        for perm in perms():
            other = pc1_separation(permuted(kernel, perm), groups[perm])
            if not np.allclose(other.projection, base.projection[perm], atol=1e-10):
                return wrong("the PC1 projection did not permute with the probe")
        return ok(f"projection permutes, AUC {base.auc:.3f} unchanged")

    # -- 3. messages name the argument the user passed --------------------------------------
    @case("analysis: pc1_separation with a NaN group", "groups must not contain NaN", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import pc1_separation

        result = pc1_separation(small_kernel(), np.tile([1.0, np.nan], N // 2))
        return wrong(f"AUC {result.auc} with NaN as a group")

    @case("analysis: label_issue_scores with posterior_probs of the wrong shape", "posterior_probs",
          group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import label_issue_scores

        label_issue_scores(small_kernel(), posterior_probs=np.full((N - 1, 4), 0.25))
        return wrong("accepted")

    @case("analysis: umap_embedding with one distinct label", "labels: all", "same label", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import umap_embedding

        umap_embedding(small_kernel(labels=np.zeros(N, dtype=np.int64)), n_neighbors=5, random_state=0)
        return wrong("an embedding without a single kNN edge")

    @case("analysis: kernel_knn_graph where one label holds most samples", "largest label", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import kernel_knn_graph

        kernel_knn_graph(small_kernel(), 5, labels=np.r_[np.zeros(N - 3), 1, 2, 3])
        return wrong("accepted")

    # -- 4. the edges ------------------------------------------------------------------------
    @case("analysis: attribute_lift with a group of one sample", "base rate 0", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import attribute_lift

        groups = np.arange(N) % 3
        groups[5] = 7  # a group of one
        lift, said = caught(attribute_lift, small_kernel(), groups, k=3)
        if np.isnan(lift.per_group.loc[7, "lift"]) and any("[7]" in s and "mean_lift" in s for s in said):
            return ok("group 7's lift is NaN, left out of mean_lift, and the warning names it")
        return wrong(f"group 7: {lift.per_group.loc[7].to_dict()}, warnings {said}")

    @case("analysis: pc1_separation with a group of one sample", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import detection_auc, pc1_separation

        groups = np.zeros(N, dtype=int)
        groups[4] = 1
        result = pc1_separation(small_kernel(), groups)
        if result.auc == detection_auc(result.projection, groups == 1) and result.mask.sum() == 1:
            return ok(f"AUC {result.auc:.3f} for one sample against {N - 1}")
        return wrong("inconsistent result")

    @case("analysis: top_correlated with an empty list of queries", "index must select", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import top_correlated

        idx, _ = top_correlated(small_kernel(), [], k=3)
        return wrong(f"returned an array of shape {idx.shape}")

    @case("analysis: top_correlated k above the different-label candidates", "k must", "candidates",
          group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import top_correlated

        top_correlated(small_kernel(), k=N - 5, exclude_same_label=True)
        return wrong("accepted")

    @case("analysis: label_issue_scores with k = n", "k must", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import label_issue_scores

        label_issue_scores(small_kernel(), k=N)
        return wrong("accepted")

    @case("analysis: labels one too short for attribute_lift", "labels must have",
          group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import attribute_lift

        attribute_lift(small_kernel().covariance.numpy(), np.arange(N) % 2, k=3, labels=np.arange(N - 1))
        return wrong("accepted")

    @case("analysis: labels mixing ints and strings", "labels must hold labels of one kind", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import top_correlated

        labels = [0, "1"] * (N // 2)  # numpy alone would turn 0 into "0"
        top_correlated(small_kernel().covariance.numpy(), k=3, labels=labels, exclude_same_label=True)
        return wrong("accepted")

    @case("analysis: string labels and their integer codes give the same neighbours", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import top_correlated

        matrix = small_kernel().covariance.numpy()
        codes = np.arange(N) % 4
        names = np.array(["cat", "dog", "eel", "fox"])[codes]
        a = top_correlated(matrix, k=3, labels=codes, exclude_same_label=True)[0]
        b = top_correlated(matrix, k=3, labels=names.tolist(), exclude_same_label=True)[0]
        return ok("identical") if np.array_equal(a, b) else wrong("different neighbours")

    @case("analysis: memorization_scores of a [n, n+1] matrix", "square", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import memorization_scores

        memorization_scores(np.ones((N, N + 1)))
        return wrong("accepted")

    @case("analysis: a kernel on the meta device", "meta device", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import top_correlated

        top_correlated(torch.empty(N, N, device="meta"), k=3)
        return wrong("accepted")

    @case("analysis: torch float32, sparse and numpy kernels agree", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import memorization_scores, top_correlated

        matrix = small_kernel().covariance.numpy()
        want = top_correlated(matrix, k=3)[0]
        for other in (torch.tensor(matrix), torch.tensor(matrix).to_sparse()):
            if not np.array_equal(top_correlated(other, k=3)[0], want):
                return wrong(f"{other.layout} tensor: other neighbours")
        single = torch.tensor(matrix, dtype=torch.float32)
        if not np.allclose(memorization_scores(single), np.diag(matrix), rtol=1e-6):
            return wrong("float32 scores differ")
        return ok("numpy, dense and sparse torch give the same neighbours; float32 the same scores")

    @case("analysis: umap_embedding(random_state=None) and the global generators", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.analysis import umap_embedding

        np.random.seed(7)
        torch.manual_seed(7)
        random.seed(7)
        before = (np.random.get_state()[1].copy(), torch.get_rng_state().clone(), random.getstate())
        caught(umap_embedding, small_kernel(), n_neighbors=4, n_epochs=10)
        after = (np.random.get_state()[1].copy(), torch.get_rng_state().clone(), random.getstate())
        if not np.array_equal(before[0], after[0]):
            return wrong("numpy's global generator was advanced by umap-learn")
        if not torch.equal(before[1], after[1]) or before[2] != after[2]:
            return wrong("torch's or Python's global generator changed")
        return ok("numpy, torch and Python generators as they were")

    @case("plot: plot_correlation_matrix with a repeated index in order", "order must name each sample",
          group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.plotting import plot_correlation_matrix

        plot_correlation_matrix(small_kernel(), order=[0, 1, 2, 2])
        return wrong("drew sample 2 twice")

    @case("plot: plot_top_k_grid with no queries", "query_indices", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.plotting import plot_top_k_grid

        plot_top_k_grid(np.zeros((N, 4, 4)), [], np.zeros((0, 3), dtype=np.int64))
        return wrong("an empty figure")

    @case("plot: plot_memorization with a NaN in is_positive", "is_positive", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.plotting import plot_memorization

        mask = np.r_[np.zeros(N - 2), 1.0, np.nan]
        plot_memorization(np.arange(N, dtype=float), mask)
        return wrong("accepted")

    @case("plot: plot_top_k_grid with a NaN pixel", "images", "finite", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.plotting import plot_top_k_grid

        images = np.random.default_rng(0).random((N, 6, 6))
        images[4, 2, 2] = np.nan
        plot_top_k_grid(images, [4], [[1, 2]])
        return wrong("image 4 drawn with a blank pixel")

    @case("plot: plot_top_k_grid with images [n, 3, 8, 3] (channels first or last?)", "layout", group=G_ANALYSIS)
    def _(ctx):
        from devinterp_losskernel.plotting import plot_top_k_grid

        plot_top_k_grid(np.random.default_rng(0).random((N, 3, 8, 3)), [0], [[1, 2]])
        return wrong("drawn with a guessed channel axis")
