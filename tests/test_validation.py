"""The one validation boundary (validation.py): one labels rule used by every caller with the
same words, kernels checked once (finite, variances ≥ 0) and then trusted, messages that name
the argument the user passed, refusals before any work, and no global random generator touched."""

import random
import warnings

import numpy as np
import pytest
import torch

import devinterp_losskernel.validation as validation
from devinterp_losskernel import KernelAccumulator, LossKernel, LossKernelCallback
from devinterp_losskernel.analysis import (
    attribute_lift,
    cka,
    group_covariances,
    kernel_knn_graph,
    label_issue_scores,
    mean_self_covariance,
    memorization_scores,
    pc1_separation,
    singular_fluctuation,
    taxonomic_lift,
    top_correlated,
    umap_embedding,
)
from devinterp_losskernel.hierarchy import Hierarchy
from devinterp_losskernel.kernel import as_labels as kernel_as_labels
from devinterp_losskernel.plotting import (
    plot_correlation_matrix,
    plot_covariance_histograms,
    plot_memorization,
    plot_top_k_grid,
)
from devinterp_losskernel.validation import CheckedKernel, as_labels, checked_kernel

N = 12


def make_kernel(n=N, seed=0, **fields):
    rng = np.random.default_rng(seed)
    losses = rng.standard_normal((30, 3)) @ rng.standard_normal((3, n)) + rng.standard_normal((30, n)) + 4.0
    acc = KernelAccumulator(n)
    acc.update(torch.as_tensor(losses))
    fields.setdefault("labels", torch.as_tensor(np.arange(n) % 3))
    kernel = acc.compute(**fields)
    kernel.init_loss = kernel.mean - 0.1
    kernel.metadata = {"sampler": {"nbeta": 10.0}, "settings": {"num_train": 100}}
    return kernel


# ---------------------------------------------------------------------------------------------
# the labels rule
# ---------------------------------------------------------------------------------------------
ACCEPTED = [
    ("int64 numpy", np.array([0, 1, 2, 1]), [0, 1, 2, 1], np.int64),
    ("int8 tensor", torch.tensor([0, 1, 2, 1], dtype=torch.int8), [0, 1, 2, 1], np.int64),
    ("uint8 numpy", np.array([0, 1, 2, 1], dtype=np.uint8), [0, 1, 2, 1], np.int64),
    ("whole floats", [0.0, 1.0, 2.0, 1.0], [0, 1, 2, 1], np.int64),
    ("float16 tensor", torch.tensor([0, 1, 2, 1], dtype=torch.float16), [0, 1, 2, 1], np.int64),
    ("python ints and whole floats", [0, 1.0, 2, 1], [0, 1, 2, 1], np.int64),
    ("tuple", (0, 1, 2, 1), [0, 1, 2, 1], np.int64),
    ("range", range(4), [0, 1, 2, 3], np.int64),
    ("bools", [True, False, True, True], [True, False, True, True], np.bool_),
    ("strings", ["cat", "dog", "cat", "eel"], ["cat", "dog", "cat", "eel"], np.str_),
    ("object strings", np.array(["a", "b", "a", "b"], dtype=object), ["a", "b", "a", "b"], np.str_),
]


@pytest.mark.parametrize("what, labels, expected, dtype", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_the_labels_rule_accepts(what, labels, expected, dtype):
    got = as_labels(labels, 4)
    assert got.dtype.type is dtype and got.tolist() == expected
    if dtype is not np.str_:  # integer callers: the same values as int64
        np.testing.assert_array_equal(as_labels(labels, 4, integer=True), np.asarray(expected, dtype=np.int64))
        assert kernel_as_labels(labels, 4).dtype == torch.int64


REFUSED = [
    ("wrong length", [0, 1, 2], "must have one entry per probe sample: length 4, got 3"),
    ("NaN", [0.0, np.nan, 1.0, 1.0], "must not contain NaN"),
    ("NaN tensor", torch.tensor([0.0, 1.0, float("nan"), 1.0]), "must not contain NaN"),
    ("None entry", [0, None, 1, 1], "must not contain missing values"),
    ("inf", [0.0, np.inf, 1.0, 1.0], "must not contain NaN or ±Inf"),
    ("non-whole floats", [0.5, 1.0, 2.0, 1.0], "must be whole numbers"),
    ("mixed ints and strings", [0, "a", 1, "b"], "one kind"),
    ("2-D", np.zeros((4, 1)), "one-dimensional"),
    ("a scalar", 3, "must be a sequence of labels"),
    ("a string", "abcd", "single string"),
    ("complex", np.array([1j, 0, 0, 0]), "ints, bools or strings"),
]


def _callers(labels):
    """Every public entry that takes per-sample labels or groups: (name of the argument, call)."""
    kernel = make_kernel(n=4, labels=None)
    matrix = kernel.covariance.numpy()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    return [
        ("labels", lambda: as_labels(labels, 4)),
        ("labels", lambda: top_correlated(matrix, k=1, labels=labels, exclude_same_label=True)),
        ("labels", lambda: kernel_knn_graph(matrix, 2, labels=labels)),
        ("labels", lambda: umap_embedding(matrix, labels=labels, n_neighbors=2)),
        ("labels", lambda: attribute_lift(matrix, [0, 0, 1, 1], k=1, labels=labels)),
        ("labels", lambda: label_issue_scores(kernel, labels, k=1, which=["neighbour label agreement"])),
        ("labels", lambda: plot_correlation_matrix(matrix, labels=labels)),
        ("groups", lambda: pc1_separation(matrix, labels)),
        ("groups", lambda: group_covariances(matrix, labels)),
        ("groups", lambda: mean_self_covariance(matrix, labels)),
        ("groups", lambda: attribute_lift(matrix, labels, k=1)),
        ("groups", lambda: plot_covariance_histograms(matrix, labels)),
        ("labels", lambda: kernel_as_labels(labels, 4)),
        ("labels", lambda: LossKernel(covariance=kernel.covariance, mean=kernel.mean, variance=kernel.variance,
                                      num_draws=30, labels=labels)),
        ("labels", lambda: LossKernelCallback((x, y), labels=labels)),
    ]


@pytest.mark.parametrize("what, labels, words", REFUSED, ids=[r[0] for r in REFUSED])
def test_every_caller_refuses_bad_labels_with_the_same_words(what, labels, words):
    expected = None
    for name, call in _callers(labels):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{name} must") and words in message, (name, message)
        message = message.replace(name, "labels", 1)
        expected = expected or message
        assert message == expected, (name, message, expected)


def test_strings_are_labels_for_the_analyses_but_not_for_a_kernel():
    """Named labels work where an analysis only compares labels; a LossKernel, the callback and
    explore keep integer class labels and say so."""
    matrix = make_kernel(n=6).covariance.numpy()
    names = ["cat", "dog", "eel"] * 2
    idx, _ = top_correlated(matrix, k=2, labels=names, exclude_same_label=True)
    assert not (np.asarray(names)[idx] == np.asarray(names)[:, None]).any()
    assert set(mean_self_covariance(matrix, names)) == {"cat", "dog", "eel"}
    with pytest.raises(ValueError, match="labels must be integer class labels here, got strings"):
        kernel_as_labels(names, 6)


# ---------------------------------------------------------------------------------------------
# non-finite kernels: refused by every analysis, never read as R = 0
# ---------------------------------------------------------------------------------------------
def _analyses(kernel):
    """Every analysis and plot that reads a kernel, called on ``kernel``."""
    groups = np.arange(kernel.num_samples) % 2
    tree = Hierarchy.from_parents({"A": "root", "B": "root", "x": "A", "y": "A", "z": "B"}, classes=["x", "y", "z"])
    return {
        "top_correlated": lambda: top_correlated(kernel, k=2),
        "kernel_knn_graph": lambda: kernel_knn_graph(kernel, 3),
        "umap_embedding": lambda: umap_embedding(kernel, n_neighbors=3),
        "memorization_scores": lambda: memorization_scores(kernel),
        "label_issue_scores": lambda: label_issue_scores(kernel, k=2),
        "pc1_separation": lambda: pc1_separation(kernel, groups),
        "group_covariances": lambda: group_covariances(kernel, groups),
        "mean_self_covariance": lambda: mean_self_covariance(kernel, groups),
        "cka": lambda: cka(make_kernel(n=kernel.num_samples), kernel),
        "attribute_lift": lambda: attribute_lift(kernel, groups, k=2),
        "taxonomic_lift": lambda: taxonomic_lift(kernel, None, tree, k=2),
        "singular_fluctuation": lambda: singular_fluctuation(kernel),
        "plot_correlation_matrix": lambda: plot_correlation_matrix(kernel),
        "plot_covariance_histograms": lambda: plot_covariance_histograms(kernel, groups),
    }


def _broken(how):
    kernel = make_kernel()
    if how == "NaN variance":
        kernel.variance[3] = float("nan")
    elif how == "Inf variance":
        kernel.variance[3] = float("inf")
    elif how == "negative variance":
        kernel.variance[3] = -0.5
    elif how == "NaN covariance":
        kernel.covariance[2, 7] = kernel.covariance[7, 2] = float("nan")
    return kernel


@pytest.mark.parametrize("how, words", [
    ("NaN variance", "kernel.variance must be finite, got 1 NaN/Inf entries (first at [3])"),
    ("Inf variance", "kernel.variance must be finite"),
    ("negative variance", "kernel.variance must be ≥ 0 (variances K(x, x)), got 1 negative, e.g. -0.5 at sample 3"),
    ("NaN covariance", "kernel.covariance must be finite, got 2 NaN/Inf entries (first at [(2, 7), (7, 2)])"),
])
def test_every_analysis_refuses_a_non_finite_kernel_by_name(how, words):
    kernel = _broken(how)
    for name, call in _analyses(kernel).items():
        if how == "NaN covariance" and name in ("memorization_scores", "singular_fluctuation", "mean_self_covariance"):
            continue  # these read only the variances, which are fine
        with pytest.raises(ValueError) as info:
            call()
        expected = words.replace("kernel.", "L.") if name == "cka" else words  # cka(K, L): L is broken
        assert expected in str(info.value), (name, str(info.value))


def test_a_matrix_with_a_negative_diagonal_is_not_normalised():
    matrix = make_kernel().covariance.numpy().copy()
    matrix[4, 4] = -1.0
    with pytest.raises(ValueError, match="the diagonal of kernel must be ≥ 0"):
        top_correlated(matrix, k=2)
    top_correlated(matrix, k=2, use="covariance")  # ranking K itself needs no variances


# ---------------------------------------------------------------------------------------------
# messages name the argument the user passed
# ---------------------------------------------------------------------------------------------
def test_pc1_separation_with_a_nan_group_names_groups():
    groups = np.tile([1.0, np.nan], N // 2)  # two "distinct" values: 1 and NaN
    with pytest.raises(ValueError, match="groups must not contain NaN") as info:
        pc1_separation(make_kernel(), groups)
    assert "is_positive" not in str(info.value)


def test_label_issue_scores_names_posterior_probs():
    kernel = make_kernel()
    with pytest.raises(ValueError, match=r"posterior_probs must be a float \[n=12, C\]"):
        label_issue_scores(kernel, posterior_probs=np.full((N, 1), 1.0))
    with pytest.raises(ValueError, match="posterior_probs must hold finite probabilities"):
        label_issue_scores(kernel, posterior_probs=np.full((N, 3), np.nan))


@pytest.mark.parametrize("call", [kernel_knn_graph, umap_embedding])
def test_one_distinct_label_is_blamed_on_the_labels_not_on_n_neighbors(call):
    kernel = make_kernel(labels=torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError) as info:
        call(kernel, n_neighbors=3)
    message = str(info.value)
    assert message.startswith("labels: all 12 samples have the same label (0)")
    assert "removes every kNN edge" in message and "exclude_same_label_edges=False" in message


def test_too_few_different_label_candidates_names_the_largest_label():
    labels = np.array([0] * 9 + [1, 2, 3])
    with pytest.raises(ValueError, match=r"n_neighbors must be at most 4 here.*the largest label, 0, holds 9"):
        kernel_knn_graph(make_kernel(), 5, labels=labels)


def test_empty_selections_are_refused():
    kernel = make_kernel()
    with pytest.raises(ValueError, match="index must select at least one sample, got an empty selection"):
        top_correlated(kernel, [], k=2)
    images = np.zeros((N, 4, 4))
    with pytest.raises(ValueError, match="query_indices must select at least one sample"):
        plot_top_k_grid(images, [], np.zeros((0, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="order must name each sample at most once"):
        plot_correlation_matrix(kernel, order=[0, 1, 1])


def test_tensors_on_the_meta_device_are_refused_by_name():
    with pytest.raises(ValueError, match="kernel is a tensor on the meta device"):
        top_correlated(torch.empty(N, N, device="meta"), k=2)


def test_torch_numpy_sparse_and_float32_kernels_give_the_same_neighbours():
    matrix = make_kernel().covariance.numpy()
    want = top_correlated(matrix, k=3)[0]
    for other in (torch.tensor(matrix), torch.tensor(matrix).to_sparse(), matrix.tolist(),
                  torch.tensor(matrix, dtype=torch.float32).double()):
        np.testing.assert_array_equal(top_correlated(other, k=3)[0], want)


def test_a_path_given_as_the_kernel_is_refused():
    with pytest.raises(TypeError, match="LossKernel.load"):
        memorization_scores("kernel.pt")


# ---------------------------------------------------------------------------------------------
# the trusted path: a kernel is checked and converted once
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def conversions(monkeypatch):
    """Counts n × n matrices converted to float64 numpy (from torch or from a user's array) and
    covariances normalised to correlations."""
    counts = {"matrix": 0, "normalised": 0}
    tensor_array, as_float, normalise = validation._tensor_array, validation._as_float, \
        validation.correlation_from_covariance

    def count_tensor(x, name):
        out = tensor_array(x, name)
        counts["matrix"] += out.ndim == 2
        return out

    def count_float(arr, name):
        counts["matrix"] += arr.ndim == 2
        return as_float(arr, name)

    def count_normalise(*args, **kwargs):
        counts["normalised"] += 1
        return normalise(*args, **kwargs)

    monkeypatch.setattr(validation, "_tensor_array", count_tensor)
    monkeypatch.setattr(validation, "_as_float", count_float)
    monkeypatch.setattr(validation, "correlation_from_covariance", count_normalise)
    return counts


def test_a_checked_kernel_is_never_checked_or_converted_again(conversions):
    """What explore does: one matrix, several neighbour lists and the kNN graph of the map."""
    matrix = make_kernel().covariance.numpy()
    checked = checked_kernel(matrix)
    assert isinstance(checked, CheckedKernel) and checked_kernel(checked) is checked
    top_correlated(checked, k=3)
    top_correlated(checked, k=3, lowest=True)
    top_correlated(checked, k=3, labels=np.arange(N) % 3, exclude_same_label=True)
    kernel_knn_graph(checked, 4, labels=np.arange(N) % 3)
    attribute_lift(checked, np.arange(N) % 2, k=2)
    assert conversions == {"matrix": 1, "normalised": 1}
    with pytest.raises(ValueError, match="read-only"):
        checked.matrix("correlation")[0, 0] = 5.0  # shared: nobody may write into it


@pytest.mark.parametrize("call", [
    lambda k: kernel_knn_graph(k, 3),
    lambda k: attribute_lift(k, np.arange(N) % 2, k=2),
    lambda k: plot_covariance_histograms(k, np.arange(N) % 2),
    lambda k: pc1_separation(k, np.arange(N) % 2),
    lambda k: label_issue_scores(k, k=2),
], ids=["kernel_knn_graph", "attribute_lift", "plot_covariance_histograms", "pc1_separation",
        "label_issue_scores"])
def test_one_call_converts_the_kernel_once(conversions, call):
    call(make_kernel())
    assert conversions["matrix"] == 1


# ---------------------------------------------------------------------------------------------
# refusals come before work; nothing draws from the global generators
# ---------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_before_the_matrix_is_converted(conversions):
    kernel = make_kernel()
    for call in (lambda: top_correlated(kernel, k=N), lambda: top_correlated(kernel, labels=[0] * 3,
                                                                             exclude_same_label=True),
                 lambda: kernel_knn_graph(kernel, 1), lambda: umap_embedding(kernel, n_components=0),
                 lambda: pc1_separation(kernel, [0] * N), lambda: attribute_lift(kernel, [0] * 5),
                 lambda: plot_correlation_matrix(kernel, order=[N]), lambda: label_issue_scores(kernel, k=0)):
        with pytest.raises(ValueError):
            call()
    assert conversions["matrix"] == 0


def _global_states():
    return (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate())


def _every_analysis_leaves_the_generators_alone():
    """Run in a fresh interpreter: the first UMAP call also imports umap-learn, whose import
    draws from Python's global generator in some environments."""
    kernel = make_kernel(n=40, labels=torch.as_tensor(np.arange(40) % 3))
    np.random.seed(123)
    torch.manual_seed(123)
    random.seed(123)
    before = _global_states()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        umap_embedding(kernel, n_neighbors=5, n_epochs=20)  # random_state=None: umap-learn's default
        umap_embedding(kernel, n_neighbors=5, n_epochs=20, random_state=0)
        for call in _analyses(kernel).values():
            call()
        plot_memorization(memorization_scores(kernel), np.arange(40) % 2 == 0)
    after = _global_states()
    changed = [name for name, a, b in zip(("torch", "numpy", "python"), before, after)
               if not (torch.equal(a, b) if name == "torch" else np.array_equal(a, b) if name == "numpy" else a == b)]
    print("changed:", changed)


def test_no_analysis_draws_from_the_global_generators():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, {!r}); import test_validation as t; "
            "t._every_analysis_leaves_the_generators_alone()").format(str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "changed: []" in out.stdout, out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_kernel_on_the_gpu_gives_the_cpu_results():
    """Covariance and variances on the GPU (labels on the CPU): checked where they live, the
    same neighbours, scores and refusals as on the CPU."""
    kernel = make_kernel()
    gpu = LossKernel(covariance=kernel.covariance.cuda(), mean=kernel.mean.cuda(), variance=kernel.variance.cuda(),
                     num_draws=kernel.num_draws, init_loss=kernel.init_loss.cuda(), labels=kernel.labels)
    np.testing.assert_array_equal(top_correlated(gpu, k=3)[0], top_correlated(kernel, k=3)[0])
    for name, score in label_issue_scores(gpu, k=3).items():
        np.testing.assert_allclose(score, label_issue_scores(kernel, k=3)[name], err_msg=name)
    gpu.covariance[1, 2] = float("nan")
    with pytest.raises(ValueError,
                       match=r"kernel.covariance must be finite, got 1 NaN/Inf entries \(first at \[\(1, 2\)\]\)"):
        top_correlated(gpu, k=3)
