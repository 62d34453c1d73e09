"""Input validation: the one boundary where public entries check what they are given.

Every analysis takes numpy or torch input (or a :class:`~devinterp_losskernel.LossKernel`)
and works on numpy float64. These helpers convert, check, and raise ``ValueError`` with a
message that names the offending argument and says what was expected, e.g.::

    ValueError: labels must have one entry per probe sample: length 100, got 99

Kernels are checked once, by :func:`checked_kernel`; the :class:`CheckedKernel` it returns is
taken by every analysis and plot without a second check or conversion (the trusted path).
Labels follow one rule, :func:`as_labels`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .correlation import correlation_from_covariance

__all__ = [
    "KERNEL_USES",
    "as_array",
    "as_labels",
    "as_mask",
    "as_matrix",
    "as_two_groups",
    "as_vector",
    "atomic_write",
    "check_index",
    "check_k",
    "check_output_path",
    "check_selection",
    "check_kernel",
    "kernel_labels",
    "kernel_matrix",
    "kernel_variance",
    "num_samples_of",
    "py_scalar",
]

KERNEL_USES = ("covariance", "correlation")


def _is_loss_kernel(x: Any) -> bool:
    """A LossKernel, told by its class marker: kernel.py imports this module, not the other way."""
    return bool(getattr(type(x), "_LOSS_KERNEL", False))


def _is_kernel(x: Any) -> bool:
    return _is_loss_kernel(x) or isinstance(x, CheckedKernel)


def as_array(x: Any, name: str) -> np.ndarray:
    """Any array-like (numpy, torch on any device and dtype, dense or sparse, list) → a numpy array.

    Floating and boolean dtypes become float64/bool; other dtypes are kept as numpy gives them.
    """
    if _is_kernel(x):
        raise ValueError(f"{name} must be an array here, got a {type(x).__name__}")
    if isinstance(x, torch.Tensor):
        return _tensor_array(x, name)
    if not isinstance(x, np.ndarray) and callable(getattr(x, "toarray", None)):  # scipy.sparse
        x = x.toarray()
    try:
        arr = np.asarray(x)
    except Exception as error:  # ragged lists and the like
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}: {error}") from None
    if arr.dtype.kind == "f" and arr.dtype != np.float64:
        arr = arr.astype(np.float64)
    return arr


def _tensor_array(x: torch.Tensor, name: str) -> np.ndarray:
    """A tensor on any device, dense or sparse, any dtype → numpy (floats as float64)."""
    t = x.detach()
    if t.device.type == "meta":
        raise ValueError(f"{name} is a tensor on the meta device (a shape without values); "
                         "pass a tensor that holds its values")
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().resolve_conj().resolve_neg()
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.double()
    return t.numpy()


def _as_float(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    check_finite(arr, name)
    return arr


def check_finite(arr: np.ndarray, name: str) -> None:
    """ValueError naming ``name``, how many entries are NaN/±Inf and where the first ones are."""
    bad = ~np.isfinite(arr)
    if bad.any():
        where = [tuple(int(i) for i in p) if arr.ndim > 1 else int(p[0]) for p in np.argwhere(bad)[:3]]
        raise ValueError(f"{name} must be finite, got {int(bad.sum())} NaN/Inf entries (first at {where}); "
                         "non-finite values are never read as 0 or ranked")


def as_matrix(x: Any, name: str = "kernel", *, square: bool = True) -> np.ndarray:
    """A 2-D finite float64 numpy array; [n, n] unless ``square=False``."""
    arr = as_array(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {arr.shape}")
    if square and arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be a square [n, n] matrix, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return _as_float(arr, name)


def as_vector(x: Any, name: str, n: Optional[int] = None) -> np.ndarray:
    """A 1-D finite float64 numpy array, of length ``n`` if given."""
    arr = as_array(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must have one entry per probe sample: length {n}, got {arr.shape[0]}")
    return _as_float(arr, name)


# ---------------------------------------------------------------------------------------------
# LABELS: the package's one labels rule (kernel.as_labels, the callback, explore, the analyses
# and the plots all go through as_labels below).
# ---------------------------------------------------------------------------------------------

_INT64_MAX = np.iinfo(np.int64).max
_EXACT_FLOAT_INT = 2.0 ** 53


def as_labels(labels: Any, n: Optional[int], name: str = "labels", *, integer: bool = False) -> np.ndarray:
    """Per-sample labels → a 1-D numpy array of length n. The one labels rule of the package:

    * a 1-D sequence (numpy, torch on any device, list, tuple, pandas), one label per probe
      sample: length ``n`` exactly;
    * integers of any width → int64; whole-number floats (``3.0``) → int64;
    * bools → bool (int64 0/1 with ``integer=True``);
    * strings → str, where the caller supports named labels (``integer=False``: the analyses
      and plots); ``integer=True`` (a LossKernel's labels, the callback, explore) refuses them:
      map class names to integers first;
    * refused, naming ``name``: None, a scalar or a single string, 2-D arrays, NaN/±Inf or None
      entries (a missing label is not a label), non-whole floats, complex or other dtypes, and
      a mix of kinds (ints and strings in one list).

    Args:
        labels: the labels.
        n: the number of probe samples (None: any length).
        name: the argument's name, for messages.
        integer: require integer class labels (returns int64).

    Returns:
        [n] int64, bool or str array.
    """
    if labels is None:
        length = "" if n is None else f", length n={n}"
        raise ValueError(f"{name} must be given (one label per probe sample{length}), got None")
    arr = _label_array(labels, name)
    if arr.ndim != 1:
        hint = " (for one-hot or probability rows, pass .argmax(1))" if arr.ndim == 2 else ""
        raise ValueError(f"{name} must be one-dimensional [n] (one label per probe sample), "
                         f"got shape {arr.shape}{hint}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must have one entry per probe sample: length {n}, got {arr.shape[0]}")
    values = _label_values(arr, name)
    if integer:
        if values.dtype.kind == "U":
            raise ValueError(f"{name} must be integer class labels here, got strings such as "
                             f"{values[:3].tolist()}; map class names to integers first (and keep the "
                             "names yourself, e.g. explore(label_names=...))")
        values = values.astype(np.int64, copy=False)
    return values


def _label_array(labels: Any, name: str) -> np.ndarray:
    """The raw numpy array of ``labels`` (not yet checked); a list holding strings is kept as
    objects so that a mix of strings and numbers is seen (numpy would make "1" of 1)."""
    if _is_kernel(labels):
        raise TypeError(f"{name} must be labels (one per probe sample), got a {type(labels).__name__}")
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of labels (one per probe sample), got the single "
                         f"string {labels[:40]!r}")
    if isinstance(labels, (set, frozenset, dict)) or (hasattr(labels, "__next__") and not hasattr(labels, "__len__")):
        raise TypeError(f"{name} must be an ordered sequence (list, array or tensor), got {type(labels).__name__}")
    if isinstance(labels, torch.Tensor):
        return _tensor_array(labels, name)
    try:
        arr = np.asarray(labels)
    except Exception as error:  # ragged lists
        raise ValueError(f"{name} must be a flat sequence of labels, got {type(labels).__name__}: {error}") from None
    if arr.dtype.kind in "US" and not isinstance(labels, np.ndarray):
        objects = np.empty(len(labels), dtype=object) if arr.ndim == 1 else None
        if objects is not None:
            objects[:] = list(labels)
            return objects
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a sequence of labels (one per probe sample), got {type(labels).__name__} "
                         f"{labels!r:.40}")
    return arr


def _label_values(arr: np.ndarray, name: str) -> np.ndarray:
    """A 1-D array of labels → int64, bool or str, or a ValueError naming ``name``."""
    kind = arr.dtype.kind
    if kind == "b":
        return arr.astype(bool, copy=False)
    if kind in "iu":
        if kind == "u" and arr.size and arr.max() > _INT64_MAX:
            raise ValueError(f"{name} must fit in int64, got {arr.max()}")
        return arr.astype(np.int64, copy=False)
    if kind == "f":
        return _whole_labels(arr, name)
    if kind in "US":
        return arr.astype(str)
    if kind == "O":
        return _object_labels(arr, name)
    raise ValueError(f"{name} must hold ints, bools or strings (one label per probe sample), got dtype {arr.dtype}")


def _whole_labels(arr: np.ndarray, name: str) -> np.ndarray:
    """Float labels → int64: finite whole numbers only."""
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} must not contain NaN or ±Inf (a missing label is not a label), got "
                         f"{int(bad.sum())} at positions {np.flatnonzero(bad)[:5].tolist()}")
    fractional = arr != np.floor(arr)
    if fractional.any():
        raise ValueError(f"{name} must be whole numbers (class labels), got values such as "
                         f"{arr[fractional][:3].tolist()}")
    if arr.size and np.abs(arr).max() >= _EXACT_FLOAT_INT:
        raise ValueError(f"{name} must be whole numbers below 2**53 when given as floats, got {np.abs(arr).max()}")
    return arr.astype(np.int64)


def _label_kind(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


def _object_labels(arr: np.ndarray, name: str) -> np.ndarray:
    """Labels held as Python objects (lists with strings, pandas object columns): one kind only."""
    items = arr.tolist()
    missing = [i for i, v in enumerate(items)
               if v is None or (_label_kind(v) == "float" and not np.isfinite(float(v)))]
    if missing:
        raise ValueError(f"{name} must not contain missing values (None/NaN: a missing label is not a label), "
                         f"got {len(missing)} at positions {missing[:5]}")
    kinds = sorted({_label_kind(v) for v in items})
    if kinds == ["str"]:
        return np.asarray(items, dtype=str)
    if kinds == ["bool"]:
        return np.asarray(items, dtype=bool)
    if set(kinds) <= {"int", "float"}:
        try:
            numeric = np.asarray(items, dtype=np.float64 if "float" in kinds else np.int64)
        except OverflowError:
            raise ValueError(f"{name} must fit in int64") from None
        return _label_values(numeric, name)
    raise ValueError(f"{name} must hold labels of one kind (all ints, all bools or all strings), "
                     f"got a mix of {kinds}")


def as_mask(mask: Any, n: int, name: str) -> np.ndarray:
    """A boolean [n] mask (bool, or 0/1 numbers)."""
    arr = as_array(mask, name)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a boolean vector of length n={n}, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "iuf" and np.all((arr == 0) | (arr == 1)):
        return arr.astype(bool)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} must be boolean (or 0/1), got {int(np.isnan(arr).sum())} NaN entries")
    raise ValueError(f"{name} must be boolean (or 0/1), got dtype {arr.dtype}")


def as_two_groups(groups: Any, n: int, name: str = "groups") -> Tuple[np.ndarray, tuple]:
    """Labels with exactly two distinct values → (mask [n] True for the second group, (first, second)).

    The groups are ordered as ``np.unique`` sorts them (False < True, 0 < 1, "a" < "b").
    """
    arr = as_labels(groups, n, name)
    values = np.unique(arr)
    if len(values) != 2:
        shown = values[:10].tolist()
        raise ValueError(
            f"{name} must have exactly two distinct values (two groups), got {len(values)}: {shown}"
        )
    return arr == values[1], (py_scalar(values[0]), py_scalar(values[1]))


def py_scalar(value):
    """numpy scalars → Python scalars, so they print and hash like the user's labels."""
    return value.item() if isinstance(value, np.generic) else value


def check_k(k: Any, n: int, name: str = "k", *, available: Optional[int] = None) -> int:
    """k must be a positive int below n (a sample is never its own neighbour).

    ``available`` (default n − 1) is the number of candidates each query has.
    """
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    limit = n - 1 if available is None else available
    if k > limit:
        raise ValueError(
            f"{name} must be < n={n} and at most the {limit} candidates per query, got {name}={k}"
        )
    return int(k)


def check_index(index: Any, n: int, name: str = "index", *, allow_empty: bool = True) -> np.ndarray:
    """A sample index or a sequence of them → int64 array; each must be in [0, n)."""
    arr = as_array(index, name)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.astype(np.int64)  # [] is an empty selection, whatever dtype numpy gave it
    if arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise ValueError(f"{name} must be an int or a 1-D sequence of ints, got {index!r:.80}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} must select at least one sample, got an empty selection")
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name} must be in [0, n={n}), got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def check_kernel(kernel: Any, name: str = "kernel", *, square: bool = True) -> Any:
    """A LossKernel usable by an analysis: ≥ 2 draws and (if ``square``) not rectangular."""
    if kernel.num_draws < 2:
        raise ValueError(
            f"{name} must be estimated from at least 2 draws (unbiased covariance, 1/(N-1)), "
            f"got num_draws={kernel.num_draws}"
        )
    if square and kernel.is_diagonal:
        raise ValueError(
            f"{name} must hold covariances, got a diagonal-mode kernel (only the {kernel.num_samples} "
            "variances: mode='diagonal'); sample with mode='full', or mode='combined' with rows= and "
            "use kernel.subset()"
        )
    if square and kernel.is_rectangular:
        raise ValueError(
            f"{name} must be a square n×n kernel, got a rectangular {tuple(kernel.covariance.shape)} kernel "
            "(estimated with rows=; for mode='combined' use kernel.subset())"
        )
    return kernel


# ---------------------------------------------------------------------------------------------
# KERNELS: checked once, then trusted. checked_kernel() is the boundary; a CheckedKernel is
# accepted by every analysis and plot in place of the kernel, and nothing checks or converts
# its matrices again (explore, the lift and the UMAP pass one to their neighbour searches).
# ---------------------------------------------------------------------------------------------


def _read_only(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view


def _variances(values: np.ndarray, name: str) -> np.ndarray:
    """Variances K(x, x) must be ≥ 0: a negative one has no square root, and R would read it as 0."""
    negative = values < 0
    if negative.any():
        first = int(np.flatnonzero(negative)[0])
        raise ValueError(f"{name} must be ≥ 0 (variances K(x, x)), got {int(negative.sum())} negative, "
                         f"e.g. {values[first]:.3g} at sample {first}")
    return values


class CheckedKernel:
    """A kernel that has been through the boundary once (built by :func:`checked_kernel`).

    Every analysis and plot takes it where it takes a kernel and uses its float64 numpy
    matrices as they are: no second check or conversion of the n × n matrix. Matrices are
    computed on first use, cached and read-only.

    Attributes:
        n: the number of probe samples.
        variance: K̂(x, x), float64 [n], finite and ≥ 0 (checked on first use for a bare matrix,
            whose diagonal may be anything when only ``use="covariance"`` is asked for).
        labels: the LossKernel's own labels as int64 [n], or None.
        source: the LossKernel it came from, or None for a matrix.
        name: the argument's name, for messages.
    """

    def __init__(self, n: int, *, name: str, source: Any = None,
                 covariance: Optional[np.ndarray] = None, variance: Optional[np.ndarray] = None,
                 labels: Optional[np.ndarray] = None, unseen: Optional[np.ndarray] = None):
        self.n, self.name, self.source, self.labels = n, name, source, labels
        self.unseen = unseen  # bool [n]: a minibatch-mode kernel's samples without a variance (NaN); else None
        self._given = covariance  # a bare matrix, checked; only read from
        self._matrices = {} if covariance is None else {"covariance": _read_only(covariance)}
        self._variance = None if variance is None else _read_only(variance)

    @property
    def num_samples(self) -> int:
        return self.n

    @property
    def variance(self) -> np.ndarray:
        if self._variance is None:
            diagonal = np.diagonal(self._matrices["covariance"]).copy()
            self._variance = _read_only(_variances(diagonal, f"the diagonal of {self.name}"))
        return self._variance

    def matrix(self, use: str = "covariance") -> np.ndarray:
        """K̂ (``"covariance"``) or R̂ (``"correlation"``), float64 [n, n], read-only."""
        if use not in KERNEL_USES:
            raise ValueError(f"use must be one of {KERNEL_USES}, got {use!r}")
        if use not in self._matrices:
            self._matrices[use] = _read_only(self._compute(use))
        return self._matrices[use]

    def release(self) -> None:
        """Drop the matrices computed on first use (memory); they are recomputed when asked for."""
        self._matrices = {} if self._given is None else {"covariance": _read_only(self._given)}

    def _compute(self, use: str) -> np.ndarray:
        if self.source is not None:
            check_kernel(self.source, self.name)  # a diagonal-mode or rectangular kernel has no [n, n]
            tensor = self.source.covariance if use == "covariance" else self.source.correlation
            return _tensor_array(tensor, self.name)
        cov = torch.from_numpy(np.ascontiguousarray(self._given))
        return correlation_from_covariance(cov, torch.from_numpy(self.variance.copy())).numpy()

    def __repr__(self) -> str:
        what = "LossKernel" if self.source is not None else "matrix"
        return f"CheckedKernel(n={self.n}, from a {what})"


def checked_kernel(kernel: Any, name: str = "kernel", *, square: bool = True) -> CheckedKernel:
    """The boundary for kernels: a :class:`LossKernel` or an [n, n] matrix (numpy, torch on any
    device and dtype, lists) → a :class:`CheckedKernel`; one is returned as it is.

    Checks: a square kernel (not diagonal-mode or rectangular, unless ``square=False``, where
    only the variances are used), ≥ 2 draws, finite covariances and variances, variances ≥ 0.
    """
    if isinstance(kernel, CheckedKernel):
        return kernel
    if _is_loss_kernel(kernel):
        check_kernel(kernel, name, square=square)
        n = kernel.num_samples
        variance, unseen = _kernel_variances(kernel, name, n)
        if kernel.covariance is not None:
            _check_finite_tensor(kernel.covariance, f"{name}.covariance")
        labels = None if kernel.labels is None else as_labels(kernel.labels, n, f"{name}.labels", integer=True)
        return CheckedKernel(n, name=name, source=kernel, variance=variance, labels=labels, unseen=unseen)
    if isinstance(kernel, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be a LossKernel or an [n, n] matrix, got the path {str(kernel)!r}; "
                        "read a saved kernel with LossKernel.load(path)")
    matrix = as_matrix(kernel, name)
    return CheckedKernel(matrix.shape[0], name=name, covariance=matrix)


def _visits(kernel: Any, n: int, name: str) -> Optional[np.ndarray]:
    """A minibatch-mode kernel's visits [n] (int ≥ 0), or None for a kernel whose every sample was
    evaluated at every draw."""
    visits = getattr(kernel, "visits", None)
    if visits is None:
        return None
    arr = as_array(visits, f"{name}.visits")
    if arr.shape != (n,) or arr.dtype.kind not in "iu" or (arr.size and arr.min() < 0):
        raise ValueError(f"{name}.visits must be counts (int >= 0) of shape ({n},), got shape {arr.shape}, "
                         f"dtype {arr.dtype}")
    return arr


def _kernel_variances(kernel: Any, name: str, n: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """THE RULE for samples without a variance, applied here and read by every analysis.

    A minibatch-mode kernel (``kernel.visits`` given: issue 19) has a variance only for the
    samples its minibatches held at least twice; the others are NaN, and only they may be.
    Returned: the variances (float64 [n], NaN exactly there) and the bool mask of those samples
    (None when there are none). What the analyses make of them:
    :func:`~devinterp_losskernel.analysis.singular_fluctuation` sums the seen samples and
    extrapolates to all n (V̂ = n · their mean, as for a probe that holds part of the training set,
    ``method="extrapolated"``; their number in ``unseen``); ``memorization_scores`` and the
    variance-based ``label_issue_scores`` are NaN there; ``detection_auc`` and ``roc_curve``
    leave NaN scores out with a warning naming how many; ``mean_self_covariance`` averages the
    seen ones. Everywhere else a NaN variance is refused."""
    visits = _visits(kernel, n, name)
    if visits is None or not (visits < 2).any():
        return _variances(as_vector(kernel.variance, f"{name}.variance", n), f"{name}.variance"), None
    unseen = visits < 2
    raw = as_array(kernel.variance, f"{name}.variance")
    if raw.shape != (n,):
        raise ValueError(f"{name}.variance must have shape ({n},), got {raw.shape}")
    seen = _variances(_as_float(raw[~unseen], f"{name}.variance of the samples seen twice or more"),
                      f"{name}.variance")
    values = np.full(n, np.nan)
    values[~unseen] = seen
    return values, unseen


def kernel_mean(kernel: Any, name: str = "kernel") -> np.ndarray:
    """μ̂(x) [n], float64: finite, except NaN at a minibatch-mode kernel's never-seen samples
    (visits 0; see :func:`_kernel_variances`)."""
    n = kernel.num_samples
    visits = _visits(kernel, n, name)
    if visits is None or not (visits == 0).any():
        return as_vector(kernel.mean, f"{name}.mean", n)
    raw = as_array(kernel.mean, f"{name}.mean")
    values = np.full(n, np.nan)
    values[visits > 0] = _as_float(raw[visits > 0], f"{name}.mean of the samples seen")
    return values


def _check_finite_tensor(tensor: torch.Tensor, name: str) -> None:
    """Finite entries, checked where the tensor lives (no copy to the CPU)."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        check_finite(_tensor_array(tensor, name), name)


def num_samples_of(kernel: Any, name: str = "kernel") -> int:
    """n for a LossKernel, a CheckedKernel or a square matrix."""
    if _is_kernel(kernel):
        return kernel.num_samples
    return as_matrix(kernel, name).shape[0]


def kernel_matrix(kernel: Any, use: str = "covariance", name: str = "kernel") -> np.ndarray:
    """K̂ or R̂ as a float64 numpy [n, n] array (read-only; copy it to write into it).

    Args:
        kernel: a :class:`LossKernel`, a :class:`CheckedKernel`, or a square matrix
            (numpy/torch) taken to be a covariance K̂. Asking a matrix for
            ``use="correlation"`` normalises it, R = K/√(K(x,x)K(x',x')) with R = 0 where a
            variance is 0; a matrix that already is a correlation comes back unchanged.
        use: ``"covariance"`` (K̂) or ``"correlation"`` (R̂).
    """
    if use not in KERNEL_USES:
        raise ValueError(f"use must be one of {KERNEL_USES}, got {use!r}")
    return checked_kernel(kernel, name).matrix(use)


def kernel_variance(kernel: Any, name: str = "kernel") -> np.ndarray:
    """Per-sample variances K̂(x, x), [n], finite and ≥ 0: ``kernel.variance`` or the diagonal
    of a matrix (read-only); NaN at a minibatch-mode kernel's samples seen fewer than twice (the
    one rule: :func:`_kernel_variances`)."""
    return checked_kernel(kernel, name, square=False).variance


def kernel_labels(kernel: Any, labels: Any, n: int, name: str = "labels", *, integer: bool = False) -> np.ndarray:
    """``labels`` if given, else the kernel's own labels; ValueError if neither exists."""
    if labels is None and _is_kernel(kernel) and kernel.labels is not None:
        labels = kernel.labels
    if labels is None:
        raise ValueError(
            f"{name} must be given (length n={n}) when the kernel carries no labels"
        )
    return as_labels(labels, n, name, integer=integer)


__all__ += ["CheckedKernel", "check_finite", "checked_kernel", "kernel_mean"]


# ---------------------------------------------------------------------------------------------
# PATHS: where outputs go. An output never replaces one of its inputs, is the kind asked for
# (a file or a folder), and is written atomically (a temp file in the same folder, then
# os.replace), so a failed write leaves neither a half-written output nor a temp file.
# ---------------------------------------------------------------------------------------------

OUTPUT_KINDS = ("file", "folder")


def _same_path(a: Path, b: Path) -> bool:
    """True if a and b name the same file or folder (samefile when both exist, else resolved)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_path(
    path: Any,
    name: str = "path",
    *,
    inputs: Iterable[Any] = (),
    expect: str = "file",
    suffix: Union[None, str, Sequence[str]] = None,
    make_parents: bool = False,
) -> Path:
    """Check a path the caller is about to write; return it as a :class:`~pathlib.Path`.

    Refuses, with a ``ValueError`` naming ``name`` and what was expected:

    * an output that is one of ``inputs`` (same file by ``os.path.samefile``, or the same resolved
      path), so writing it cannot destroy what is being read;
    * an existing folder where a file is expected (``expect="file"``) and an existing file where
      a folder is expected (``expect="folder"``);
    * a parent that is a regular file, or (unless ``make_parents``) a parent that does not exist;
    * a name not ending in ``suffix`` (a string such as ``".pt"``, or several allowed ones).

    ``TypeError`` if ``path`` is not a str or ``os.PathLike``. ``None`` entries of ``inputs``
    are ignored. With ``make_parents=True`` the missing parents are created.
    """
    if expect not in OUTPUT_KINDS:
        raise ValueError(f"expect must be one of {OUTPUT_KINDS}, got {expect!r}")
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike) to a {expect}, got {type(path).__name__}")
    if str(path) == "":
        raise ValueError(f"{name} must be a path to a {expect}, got an empty string")
    out = Path(path).expanduser()

    if suffix is not None:
        allowed = (suffix,) if isinstance(suffix, str) else tuple(suffix)
        if not out.name.lower().endswith(tuple(s.lower() for s in allowed)):
            shown = allowed[0] if len(allowed) == 1 else " or ".join(allowed)
            raise ValueError(f"{name} must be a {expect} name ending in {shown}, got {str(path)!r}")

    for source in inputs:
        if source is None:
            continue
        if isinstance(source, (str, os.PathLike)) and str(source) and _same_path(out, Path(source).expanduser()):
            raise ValueError(
                f"{name} must not be one of the inputs (writing it would destroy what is being read), "
                f"got {str(path)!r}, which is the input {str(source)!r}"
            )

    if out.is_dir() and expect == "file":
        raise ValueError(f"{name} must be a file path, got {str(path)!r}, which is an existing folder")
    if out.exists() and not out.is_dir() and expect == "folder":
        raise ValueError(f"{name} must be a folder path, got {str(path)!r}, which is an existing file")

    parent = out.parent
    # The nearest existing ancestor must be a folder; a regular file there would otherwise give
    # "[Errno 17] File exists" or "[Errno 20] Not a directory" from deep inside the writer.
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise ValueError(
            f"{name} must be inside a folder, got {str(path)!r}, but {str(ancestor)!r} is a regular file"
        )
    if not parent.exists():
        if not make_parents:
            raise ValueError(
                f"{name} must be inside an existing folder, got {str(path)!r}, but the folder "
                f"{str(parent)!r} does not exist (create it first)"
            )
        parent.mkdir(parents=True, exist_ok=True)
    return out


def _default_file_mode() -> int:
    """0o666 less the process umask: the permissions open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: Any, mode: Optional[str] = "wb", *, folder: bool = False, **open_kwargs):
    """Write ``path`` all at once: to a temp file in the same folder, then ``os.replace``.

    ``with atomic_write(p) as f: f.write(...)`` yields the open temp file (``mode`` "wb" or
    "w"; ``open_kwargs`` such as ``encoding`` go to ``open``). With ``mode=None`` it yields the
    temp file's :class:`~pathlib.Path` instead, for writers that take a path
    (``torch.save``, ``to_netcdf``); the temp name ends in the target's suffix. With
    ``folder=True`` it yields a temp folder that replaces the folder ``path`` (an existing one is
    removed only after the new one is complete).

    On any exception the temp file or folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    parent = path.parent
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
        try:
            yield tmp
            if path.exists() and path.is_dir():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
                os.replace(path, old / path.name)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old / path.name, path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=parent)
    tmp = Path(tmp_name)
    try:
        if mode is None:
            os.close(fd)
            yield tmp
        else:
            if "w" not in mode:
                raise ValueError(f"mode must be a write mode such as 'wb' or 'w', got {mode!r}")
            with os.fdopen(fd, mode, **open_kwargs) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# IMAGES and INDEX ARRAYS (explorer & CLI): the one image-layout rule, and sample indices
# checked for dtype, sign and range before anyone packs them into a narrow integer type.
# ---------------------------------------------------------------------------------------------

IMAGE_LAYOUTS = ("NHWC", "NCHW")
IMAGE_CHANNELS = (1, 3, 4)


def _image_array(images: Any, name: str) -> np.ndarray:
    """numpy or torch images → a numpy array without a float64 copy (half floats → float32)."""
    if _is_loss_kernel(images):
        raise TypeError(f"{name} must be an image array, got a LossKernel")
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        return t.numpy()
    if isinstance(images, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be an image array (numpy, torch or nested lists), got a path or "
                        f"string {str(images)[:80]!r}; load the file first")
    try:
        return np.asarray(images)
    except Exception as error:  # ragged lists of images and the like
        raise ValueError(f"{name} must be an array of equally sized images, got {type(images).__name__}: "
                         f"{error}") from None


def _channels_last(shape: tuple, name: str, layout: Optional[str]) -> bool:
    """Where a 4-D image array keeps its channels: True for [n, H, W, C], False for [n, C, H, W]."""
    if layout is not None:
        return layout == "NHWC"
    first, last = shape[1] in IMAGE_CHANNELS, shape[-1] in IMAGE_CHANNELS
    if first and last:
        raise ValueError(
            f"{name} of shape {shape} is ambiguous: axis 1 ({shape[1]}) and the last axis ({shape[-1]}) "
            f"could both be the channels (1, 3 or 4); state the layout: 'NCHW' ([n, C, H, W]) or "
            f"'NHWC' ([n, H, W, C])"
        )
    if not (first or last):
        raise ValueError(f"{name} must have 1, 3 or 4 channels on axis 1 ([n, C, H, W]) or on the last axis "
                         f"([n, H, W, C]), got shape {shape}")
    return last


def _check_finite_pixels(arr: np.ndarray, name: str, chunk: int = 1 << 24) -> None:
    """Refuse NaN/±Inf pixels, a block of images at a time (bounded working memory)."""
    if arr.dtype.kind != "f":
        return
    per_image = max(1, int(np.prod(arr.shape[1:])))
    step = max(1, chunk // per_image)
    for start in range(0, arr.shape[0], step):
        block = arr[start:start + step]
        bad = ~np.isfinite(block)
        if bad.any():
            image = start + int(np.argwhere(bad)[0][0])
            raise ValueError(f"{name} must have finite pixels, got NaN/Inf in image {image} "
                             f"({int(bad.sum())} such pixels in images {start}…{start + len(block) - 1})")


def as_images(images: Any, n: Optional[int], name: str = "images", layout: Optional[str] = None) -> np.ndarray:
    """Images, one per probe sample → a numpy array [n, H, W, C], channels last, C ∈ {1, 3, 4}.

    The package's one image-layout rule:

    * ``[n, H, W]``: grey images (C = 1);
    * ``[n, H, W, C]`` or ``[n, C, H, W]`` with C ∈ {1, 3, 4}: the layout is read from the shape
      only when exactly one of axis 1 and the last axis can hold the channels. When both can
      (``[n, 3, 4, 4]``, ``[n, 4, 4, 3]``, ``[n, 3, 8, 1]``) the shape is ambiguous and refused
      unless ``layout`` states it: ``"NCHW"`` or ``"NHWC"``;
    * numeric values (bool, integer or float) and finite pixels (no NaN / ±Inf).

    Args:
        images: numpy, torch (any device) or nested lists.
        n: the number of probe samples (None: any number ≥ 1).
        name: the argument's name, for messages.
        layout: None (read it from the shape), ``"NHWC"`` or ``"NCHW"``.

    Returns:
        a numpy array [n, H, W, C] in the input's dtype (a view where possible; torch half
        floats become float32).
    """
    if layout is not None and layout not in IMAGE_LAYOUTS:
        raise ValueError(f"the layout of {name} must be None (read from the shape), 'NHWC' or 'NCHW', "
                         f"got {layout!r}")
    arr = _image_array(images, name)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold numbers (pixel values), got dtype {arr.dtype}")
    shape = tuple(arr.shape)
    if arr.ndim == 3 and layout is None:
        arr = arr[..., None]
    elif arr.ndim == 4:
        if not _channels_last(shape, name, layout):
            arr = np.moveaxis(arr, 1, -1)
    elif arr.ndim == 3:
        raise ValueError(f"{name} has shape {shape}: [n, H, W] grey images take no layout, but "
                         f"layout={layout!r} was given (a 4-D array [n, H, W, C] or [n, C, H, W] needs one)")
    else:
        raise ValueError(f"{name} must be [n, H, W], [n, H, W, C] or [n, C, H, W], got shape {shape}")
    if arr.shape[-1] not in IMAGE_CHANNELS:
        raise ValueError(f"{name} must have 1, 3 or 4 channels, got {arr.shape[-1]} "
                         f"(shape {shape}, layout {layout or 'read from the shape'})")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must hold one image per probe sample (n={n}), got {arr.shape[0]} "
                         f"(shape {shape})")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"{name} must not be empty, got shape {shape}")
    _check_finite_pixels(arr, name)
    return arr


def as_index_array(values: Any, n: int, name: str) -> np.ndarray:
    """Sample indices (any shape) → int64; each must be an integer with 0 ≤ i < n.

    ValueError naming ``name``, the first offending value and the allowed range otherwise
    (floats, even whole ones, and booleans are refused: an index array has an integer dtype).
    """
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative int (the number of samples), got {n!r}")
    if isinstance(values, torch.Tensor):
        arr = values.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(values)
        except Exception as error:
            raise ValueError(f"{name} must be an array of integer sample indices, got {type(values).__name__}: "
                             f"{error}") from None
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer sample indices (an integer dtype), got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= n)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must hold sample indices in [0, {n}) (0 ≤ i < n={n}), got {arr[where].item()} at "
            f"position {where if len(where) != 1 else where[0]} ({int(bad.sum())} out of range)"
        )
    return arr.astype(np.int64, copy=False)


__all__ += ["IMAGE_LAYOUTS", "as_images", "as_index_array"]


# ---------------------------------------------------------------------------------------------
# SELECTIONS: which chains / draws / rows of something to use. Each index counts once, so a
# duplicate (counted twice), a negative or out-of-range index, or a non-integer is refused.
# ---------------------------------------------------------------------------------------------


def check_selection(values: Any, size: int, name: str, *, what: str = "index",
                    allow_slice: bool = False) -> list:
    """``values`` (a sequence of ints, a 1-D int array or tensor, a range, or — with
    ``allow_slice`` — a slice) as a list of distinct ints in [0, size), in the given order.

    Refused with a ``ValueError``/``TypeError`` naming ``name``: a lone int or other non-sequence,
    bools, floats (even whole ones), strings, negative or out-of-range entries, duplicates and
    an empty selection.
    """
    if allow_slice and isinstance(values, slice):
        picked = list(range(size))[values]
        if not picked:
            raise ValueError(f"{name} must select at least one {what} of {size}, got {values!r}, which selects none")
        return picked
    kinds = "a sequence of int indices" + (" or a slice" if allow_slice else "")
    if isinstance(values, (str, bytes, dict, set, frozenset)) or isinstance(values, numbers.Number) \
            or (isinstance(values, (np.ndarray, torch.Tensor)) and values.ndim != 1):
        raise TypeError(f"{name} must be {kinds} ({what}s in [0, {size})), e.g. [0, 2], got {values!r}")
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{name} must be {kinds} ({what}s in [0, {size})), got {type(values).__name__}") from None
    out = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() == 0:
            item = item.item()
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Integral):
            raise TypeError(f"{name} must hold int {what} indices, got {item!r} ({type(item).__name__}) in {values!r}")
        out.append(int(item))
    if not out:
        raise ValueError(f"{name} must select at least one {what}, got an empty selection")
    bad = [i for i in out if i < 0 or i >= size]
    if bad:
        raise ValueError(f"{name} must be {what} indices in [0, {size}) (there are {size}), got {bad}"
                         + (" (negative indices are not counted from the end)" if min(bad) < 0 else ""))
    seen, repeated = set(), []
    for i in out:
        if i in seen and i not in repeated:
            repeated.append(i)
        seen.add(i)
    if repeated:
        raise ValueError(f"{name} must name each {what} once, got {repeated} more than once in {out} "
                         "(it would be counted twice)")
    return out


def check_weight_restrictions(weight_restrictions: Any, model: torch.nn.Module,
                              name: str = "weight_restrictions") -> dict:
    """devinterp 2's ``weight_restrictions`` ({name: param masks or None}) checked against
    ``model`` before any sampling, returned with ``None`` expanded to every parameter.

    Each value is None (the whole model) or a dict {parameter name: None (all of it) or a
    bool mask of the parameter's shape}, as devinterp's ``create_param_masks`` returns. Needs a
    ``"full"`` key and at least one other (susceptibilities are reported for the others).
    """
    from collections.abc import Mapping

    if not isinstance(weight_restrictions, Mapping) or not weight_restrictions:
        raise TypeError(f"{name} must be a non-empty dict {{restriction name: param masks or None}}, got "
                        f"{type(weight_restrictions).__name__}")
    if "full" not in weight_restrictions:
        raise ValueError(f"{name} must include a 'full' key (use None for the full model); got "
                         f"{list(weight_restrictions)}")
    if len(weight_restrictions) < 2:
        raise ValueError(f"{name} must name at least one restriction besides 'full' (e.g. devinterp's "
                         "create_param_masks(model, 'l0h1')): susceptibilities are reported for those, against 'full'")
    params = dict(model.named_parameters())
    out = {}
    for key, masks in weight_restrictions.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} must be keyed by names (non-empty str), got the key {key!r}")
        if masks is None:
            out[key] = {p: None for p in params}
            continue
        if not isinstance(masks, Mapping) or not masks:
            raise TypeError(f"{name}[{key!r}] must be None or a non-empty dict {{parameter name: mask or None}}, "
                            f"got {masks!r:.80}")
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise ValueError(f"{name}[{key!r}] names parameters the model does not have: {unknown[:10]}; its "
                             f"parameters are {sorted(params)[:10]}{' …' if len(params) > 10 else ''}")
        for param, mask in masks.items():
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                    or tuple(mask.shape) != tuple(params[param].shape):
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{name}[{key!r}][{param!r}] must be None or a bool mask of shape "
                                 f"{tuple(params[param].shape)}, got {got}")
        out[key] = dict(masks)
    return out


# ---------------------------------------------------------------------------------------------
# TRAIN-MODE NOISE: the minibatch mode (issue 19) reads the losses devinterp computes while the
# model is in train mode. One check, used by every minibatch entry point.
# ---------------------------------------------------------------------------------------------

# attributes under which modules keep a functional dropout probability (nn.MultiheadAttention's
# ``dropout``, HF attention modules' ``attention_dropout``, custom ``dropout_p`` for SDPA, …)
_FUNCTIONAL_DROPOUT = ("dropout", "dropout_p", "attention_dropout", "attn_dropout", "attn_pdrop")


def train_mode_noise(model: torch.nn.Module) -> list:
    """What makes a sample's train-mode loss noisy or depend on its batch-mates, one line each:
    dropout modules with p > 0 (``nn.Dropout*``, ``AlphaDropout``), modules that apply dropout
    functionally with a probability > 0 in an attribute (``nn.MultiheadAttention(dropout=)``,
    and so ``nn.Transformer*`` layers; HF attention's ``attention_dropout``; an HF
    ``config.attention_dropout``), and BatchNorm (in train mode it normalises with the batch's
    statistics, whether or not it tracks running ones). Dropout called on a literal inside a
    forward (``F.dropout(x, 0.1)``) cannot be seen."""
    found = []
    for name, module in model.named_modules():
        where = name or "model"
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            if module.p > 0:
                found.append(f"{where} ({type(module).__name__}, p={module.p})")
            continue
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            found.append(f"{where} ({type(module).__name__}: batch statistics in train mode)")
            continue
        for attribute in _FUNCTIONAL_DROPOUT:
            p = getattr(module, attribute, None)
            if isinstance(p, numbers.Real) and not isinstance(p, bool) and p > 0:
                found.append(f"{where} ({type(module).__name__}, {attribute}={p})")
                break
    p = getattr(getattr(model, "config", None), "attention_dropout", None)
    if isinstance(p, numbers.Real) and not isinstance(p, bool) and p > 0 and not any("attention_dropout" in f
                                                                                     for f in found):
        found.append(f"config.attention_dropout={p}")
    return found


def check_train_mode_noise(model: torch.nn.Module, allow: Any = False, *, where: str,
                           name: str = "allow_train_mode_noise") -> list:
    """The minibatch mode's check: ``model``'s train-mode noise (:func:`train_mode_noise`), refused
    with the reason unless ``allow`` (the opt-in argument called ``name``) is True; returns what
    was found (an empty list for a clean model), for the result to record."""
    if not isinstance(allow, bool):
        raise TypeError(f"{name} must be True or False, got {allow!r}")
    found = train_mode_noise(model)
    if found and not allow:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise ValueError(
            f"{where}: the minibatch losses are not draws of ℓ(x; w) for this model. devinterp evaluates the SGLD "
            f"minibatches in train mode, where {', '.join(found[:3])}{more} make a sample's loss noisy or depend on "
            "its batch-mates, which inflates the per-sample variances and ν. Set the dropout probabilities to 0 "
            "(and replace BatchNorm, or fold it), use a probe mode (mode='diagonal': eval-mode probe passes), or "
            f"pass {name}=True to record them anyway (the result says so)")
    return found


def check_loss_scale(loss_scale: Any, name: str = "loss_scale") -> float:
    """ν's loss scale: a positive finite number (1 for a negative log-likelihood; 2σ² for an MSE
    loss with Gaussian noise of variance σ²)."""
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, numbers.Real) or not math.isfinite(loss_scale) \
            or loss_scale <= 0:
        raise ValueError(f"{name} must be a positive finite number (1 for a negative log-likelihood; 2σ² for an MSE "
                         f"loss with Gaussian noise of variance σ²), got {loss_scale!r}")
    return float(loss_scale)


__all__ += ["check_loss_scale", "check_train_mode_noise", "train_mode_noise"]


def check_positive_grid(values: Any, name: str) -> list:
    """A sweep's grid: a non-empty sequence of distinct positive finite numbers (e.g.
    ``calibrate(lrs=[1e-4, 3e-4])``), returned as a list of floats in the order given."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of positive numbers, e.g. [1e-4, 3e-4], got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} must hold at least one value, got an empty sequence")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must hold positive finite numbers, got {value!r} in {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value, got {values!r}")
    return [float(v) for v in values]


__all__ += ["check_positive_grid"]


def check_health_thresholds(thresholds: Any, defaults: dict) -> dict:
    """The health report's thresholds: ``defaults`` with ``thresholds`` (names among the
    defaults', each a finite number ≥ 0) put over them; an unknown name is refused, listing
    the known ones."""
    unknown = sorted(set(thresholds) - set(defaults))
    if unknown:
        raise ValueError(f"unknown health-report thresholds {unknown}; known: {sorted(defaults)} "
                         "(and chance_loss=, nbeta=)")
    out = dict(defaults)
    for name, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        out[name] = float(value)
    return out


__all__ += ["check_health_thresholds"]


# -- devinterp 2's compute_bif options (devinterp2_bif.py, samples.py) ----------------------------------------
BIF_CORRELATION_METHODS = ("token", "sequence")
BIF_CHAIN_REDUCTIONS = ("stack", "mean")


def check_bif_options(correlation_method: Any, reduce_chain_dimension_method: Any, average_tokenwise_bif: Any,
                      compute_covariance: Any, batch_size: Any = 32, batch_size_name: str = "bif_batch_size") -> None:
    """devinterp's ``bif()`` / ``compute_bif`` options, refused by name when not one of its
    values (devinterp itself fails late, after sampling, or not at all for a truthy string)."""
    if correlation_method not in BIF_CORRELATION_METHODS:
        raise ValueError(f"correlation_method must be one of {BIF_CORRELATION_METHODS}, got {correlation_method!r}")
    if reduce_chain_dimension_method not in BIF_CHAIN_REDUCTIONS:
        raise ValueError(f"reduce_chain_dimension_method must be one of {BIF_CHAIN_REDUCTIONS}, got "
                         f"{reduce_chain_dimension_method!r}")
    for value, name in ((average_tokenwise_bif, "average_tokenwise_bif"), (compute_covariance, "compute_covariance")):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"{batch_size_name} must be a positive int, got {batch_size!r}")


def check_batch_index_range(value: Any, total: int, name: str) -> np.ndarray:
    """devinterp's ``batch_index_range_1`` / ``_2``: ``"all"`` or a sequence of batch indices in
    [0, total) (the observables' sequences concatenated; repeats allowed, as devinterp's
    ``.sel(batch=…)``), as an int64 array."""
    if isinstance(value, str):
        if value != "all":
            raise ValueError(f"{name} must be 'all' or a sequence of batch indices, got the str {value!r}")
        return np.arange(total, dtype=np.int64)
    if isinstance(value, (numbers.Number, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be 'all' or a sequence of batch indices, got {value!r}")
    out = []
    for v in (value.tolist() if hasattr(value, "tolist") else list(value)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must hold int batch indices, got {v!r}")
        if not 0 <= v < total:
            raise ValueError(f"{name} must hold batch indices in [0, {total}) (the observables' sequences, "
                             f"concatenated in loss_keys order), got {v}")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name} must select at least one sequence, got an empty sequence")
    return np.asarray(out, dtype=np.int64)


__all__ += ["check_bif_options", "check_batch_index_range"]


# -- estimate_loss_kernel(train_variance=) (estimate.py) -------------------------------------------
def check_train_variance(train_variance: Any, mode: str, *, evaluate: Any = None, checkpoint_dir: Any = None,
                         loader: Any = None) -> bool:
    """``estimate_loss_kernel``'s ``train_variance``: True or False; True only for a probe mode
    (``mode="minibatch"`` is the training set's minibatch variances alone), without ``evaluate``
    (the recorded per-sample losses must be the ones whose mean SGLD differentiates: ``loss_fn``'s),
    without ``checkpoint_dir`` (the O(N) moments are not checkpointed), and with a loader that
    batches a map-style dataset (each sample is recorded under its index)."""
    if not isinstance(train_variance, (bool, np.bool_)):
        raise TypeError(f"train_variance must be True or False, got {train_variance!r}")
    if not train_variance:
        return False
    if mode == "minibatch":
        raise ValueError("train_variance=True is for the probe modes (full, diagonal, combined): mode='minibatch' "
                         "already returns the training set's minibatch variances alone; leave train_variance out")
    if evaluate is not None:
        raise ValueError("train_variance=True does not take evaluate: the SGLD loss must be the mean of loss_fn's "
                         "per-sample losses, which are the ones recorded (pass loss_fn, or train_variance=False)")
    if checkpoint_dir is not None:
        raise ValueError("train_variance=True does not take checkpoint_dir: the training set's per-sample moments "
                         "(O(N)) are not checkpointed; pass one of them")
    if loader is not None:
        dataset = getattr(loader, "dataset", None)
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__") \
                or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"train_variance=True needs loader.dataset to be a map-style dataset (len() and [i]): "
                            f"each sample is recorded under its index; got {type(dataset).__name__}")
        if len(dataset) < 2:
            raise ValueError(f"train_variance=True needs loader.dataset to hold at least 2 samples, got {len(dataset)}")
        if getattr(loader, "batch_sampler", None) is None:
            raise ValueError("train_variance=True needs a loader that batches (batch_size= or batch_sampler=); "
                             "this one has batch_size=None and yields one item at a time")
    return True


__all__ += ["check_train_variance"]


# -- explore(decode=, vocabulary=) for a token-level kernel (explore.py) ---------------------------
def check_token_rows(token_positions: Any, input_ids: Any, n: int,
                     name: str = "kernel") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """A token-level kernel's rows: ``token_positions`` [n, 2] int64 (batch index, target position)
    and ``input_ids`` [sequences, T + 1] int64 (or None); each batch index a row of ``input_ids``,
    each position a column of it (0 … T), every id an int ≥ 0."""
    positions = as_array(token_positions, f"{name}.token_positions")
    if positions.shape != (n, 2) or positions.dtype.kind not in "iu":
        raise ValueError(f"{name}.token_positions must be integers of shape ({n}, 2) (batch index, target position), "
                         f"got shape {positions.shape}, dtype {positions.dtype}")
    positions = positions.astype(np.int64)
    if positions.size and positions.min() < 0:
        raise ValueError(f"{name}.token_positions must be ≥ 0, got {int(positions.min())}")
    if input_ids is None:
        return positions, None
    ids = as_array(input_ids, f"{name}.input_ids")
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name}.input_ids must be integer token ids [sequences, T + 1], got shape {ids.shape}, "
                         f"dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.min() < 0:
        raise ValueError(f"{name}.input_ids must be token ids ≥ 0, got {int(ids.min())}")
    if positions.size and (positions[:, 0].max() >= ids.shape[0] or positions[:, 1].max() >= ids.shape[1]):
        raise ValueError(f"{name}.token_positions must index {name}.input_ids {ids.shape}: batch indices in "
                         f"[0, {ids.shape[0]}), positions in [0, {ids.shape[1]}); got up to "
                         f"({int(positions[:, 0].max())}, {int(positions[:, 1].max())})")
    return positions, ids


def token_strings(ids: np.ndarray, decode: Any = None, vocabulary: Any = None) -> list:
    """The display string of every id in ``ids`` (a 1-D array of distinct ints ≥ 0), in that order:
    ``decode(id)`` (a callable returning a str, e.g. ``tokenizer.decode``), ``vocabulary[id]`` (a
    sequence of str indexed by id, or a mapping {id: str}), else ``str(id)``. Not both."""
    if decode is not None and vocabulary is not None:
        raise ValueError("give decode= or vocabulary=, not both")
    values = [int(i) for i in np.asarray(ids).tolist()]
    if decode is not None:
        if not callable(decode):
            raise TypeError(f"decode must be a callable id -> str (e.g. tokenizer.decode), got {type(decode).__name__}")
        out = []
        for i in values:
            s = decode(i)
            if isinstance(s, (list, tuple)) and len(s) == 1:  # tokenizers' batch form
                s = s[0]
            if not isinstance(s, str):
                raise TypeError(f"decode({i}) must return a str, got {type(s).__name__}")
            out.append(s)
        return out
    if vocabulary is None:
        return [str(i) for i in values]
    if isinstance(vocabulary, (str, bytes)):
        raise TypeError("vocabulary must be a sequence of str indexed by token id or a mapping {id: str}, "
                        "got a single string")
    from collections.abc import Mapping as _Mapping

    if isinstance(vocabulary, _Mapping):
        missing = [i for i in values if i not in vocabulary]
        strings = None if missing else [vocabulary[i] for i in values]
    else:
        if not hasattr(vocabulary, "__len__") or not hasattr(vocabulary, "__getitem__"):
            raise TypeError(f"vocabulary must be a sequence of str indexed by token id or a mapping {{id: str}}, "
                            f"got {type(vocabulary).__name__}")
        missing = [i for i in values if i >= len(vocabulary)]
        strings = None if missing else [vocabulary[i] for i in values]
    if missing:
        raise ValueError(f"vocabulary has no entry for token ids {missing[:10]}"
                         f"{' …' if len(missing) > 10 else ''} ({len(missing)} of the {len(values)} ids in input_ids)")
    bad = [(i, s) for i, s in zip(values, strings) if not isinstance(s, str)]
    if bad:
        raise TypeError(f"vocabulary entries must be str, got {type(bad[0][1]).__name__} for token id {bad[0][0]}")
    return [str(s) for s in strings]


__all__ += ["check_token_rows", "token_strings"]


# -- devinterp 2's sample() twins (llc, bif, susceptibilities): datasets and arguments -------------
def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise (TypeError if not isinstance(value, numbers.Number) or isinstance(value, bool) else ValueError)(
            f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_devinterp2_dataset(dataset, name: str = "dataset", *, tokens: bool = False) -> None:
    """Refuse, before any sampling, a dataset that devinterp 2's sampler cannot batch: its
    items must be mappings with an ``"input_ids"`` tensor (integer token ids [T] when
    ``tokens``, as devinterp's ``llc()`` and its LM loss need)."""
    try:
        size = len(dataset)
        item = dataset[0] if size else None
    except TypeError as error:
        raise TypeError(f"{name} must be a map-style dataset (len() and [i]) of {{'input_ids': …}} items, got "
                        f"{type(dataset).__name__}") from error
    if item is None:
        raise ValueError(f"{name} is empty")
    if not isinstance(item, Mapping) or "input_ids" not in item:
        got = f"a mapping with keys {sorted(item)}" if isinstance(item, Mapping) else \
            f"a {type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        fix = ("devinterp's llc() computes a language-model loss on token ids; for a classifier (images, "
               "(input, target) pairs) use estimate_loss_kernel(model, loader, probe, …), which runs devinterp 2's "
               "sampler for any data, or sample_single_chain(as_devinterp2_dataset(dataset), "
               "devinterp2_evaluate(), …)") if tokens else \
            "wrap it: as_devinterp2_dataset(dataset) turns (input, target) items into {'input_ids', 'labels'}"
        raise TypeError(f"{name}[0] is {got}, but devinterp 2's sampler reads item['input_ids']; {fix}")
    ids = torch.as_tensor(item["input_ids"])
    if tokens and (ids.is_floating_point() or ids.dim() != 1):
        raise TypeError(f"{name}[0]['input_ids'] is {ids.dtype} {tuple(ids.shape)}, not integer token ids [seq_len]: "
                        "devinterp's llc() computes a language-model loss; for images or other classifier inputs use "
                        "estimate_loss_kernel, or sample_single_chain with devinterp2_evaluate()")


def check_lm_sampling_arguments(model, observables, observable, param_masks, device, batch_size,
                                batches_per_draw) -> None:
    """The arguments of devinterp 2's sample() twins (llc, bif) of the wrong type or naming what
    is not there, refused by name before any forward pass (devinterp would fail later with a
    bare StopIteration, KeyError or a multiplication of a sequence by a float)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a language model), got {type(model).__name__}")
    positive_int(batch_size, "batch_size")
    positive_int(batches_per_draw, "batches_per_draw")
    if not isinstance(observables, Mapping) or not observables:
        raise ValueError("observables must be a non-empty dict {name: dataset or (dataset, batches_per_draw)}: "
                         f"the kernel's probe is one of them; got {type(observables).__name__}")
    for key, spec in observables.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"observables must be keyed by names (non-empty str), got the key {key!r}")
        if isinstance(spec, tuple):
            if len(spec) != 2:
                raise ValueError(f"observables[{key!r}] must be a dataset or a (dataset, batches_per_draw) pair, "
                                 f"got a tuple of length {len(spec)}")
            positive_int(spec[1], f"observables[{key!r}][1] (batches_per_draw)")
        elif isinstance(spec, Mapping):
            raise TypeError(f"observables[{key!r}] must be a dataset of {{'input_ids': …}} items (or a "
                            "(dataset, batches_per_draw) pair), got a mapping; for a tensor `ids` of token ids use "
                            "[{'input_ids': row} for row in ids]")
    if observable is not None and not isinstance(observable, str):
        raise TypeError(f"observable must be the name (a str) of one of the observables {sorted(observables)}, "
                        f"got {observable!r}")
    if param_masks is not None:
        if not isinstance(param_masks, Mapping):
            raise TypeError(f"param_masks must be a dict {{parameter name: mask or None}}, got "
                            f"{type(param_masks).__name__}")
        names = {n for n, _ in model.named_parameters()}
        unknown = sorted(set(param_masks) - names)
        if unknown:
            raise ValueError(f"param_masks names parameters the model does not have: {unknown[:10]}; its "
                             f"parameters are {sorted(names)[:10]}{' …' if len(names) > 10 else ''}")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None


def _item_length(dataset, index: int, name: str) -> int:
    ids = dataset[index]["input_ids"] if isinstance(dataset[index], Mapping) else None
    if ids is None:
        raise TypeError(f"{name}[{index}] is not a mapping with 'input_ids'")
    return len(ids)


def check_lm_sampling_sizes(dataset, obs_dataset, name: str, batch_size: int, per_draw: int, callback_kwargs) -> None:
    """The sizes devinterp would trip over: a training batch larger than the dataset (its
    drop_last loader yields nothing: a bare StopIteration), an observable smaller than the
    batch_size × batches_per_draw sequences devinterp's Observable takes (an AssertionError),
    sequences of another length than the training data's (a shape error mid-run), and
    ``callback_kwargs['rows']`` outside the probe or repeated."""
    if len(dataset) < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than dataset ({len(dataset)} items): devinterp's loader "
                         "drops the last incomplete batch, so not one batch would be drawn; pass batch_size ≤ "
                         f"{len(dataset)}")
    wanted = batch_size * per_draw
    if len(obs_dataset) < wanted:
        raise ValueError(f"observables[{name!r}] has {len(obs_dataset)} sequences, but devinterp's Observable takes "
                         f"batch_size × batches_per_draw = {batch_size} × {per_draw} = {wanted} of them; pass "
                         f"(dataset, batches_per_draw) with batches_per_draw ≤ {len(obs_dataset) // batch_size}, a "
                         "smaller batch_size, or a larger observable")
    length = _item_length(dataset, 0, "dataset")
    for label, data in (("dataset", dataset), (f"observables[{name!r}]", obs_dataset)):
        for i in range(min(len(data), 256)):  # the first items: cheap, and where a mixed dataset shows
            if _item_length(data, i, label) != length:
                raise ValueError(f"{label}[{i}]['input_ids'] has length {_item_length(data, i, label)}, but "
                                 f"dataset[0]'s has {length}: devinterp batches sequences of one length (the "
                                 "training data's context length + 1)")
    rows = (callback_kwargs or {}).get("rows")
    if rows is not None:
        check_selection(rows, wanted, "callback_kwargs['rows']", what="probe sequence")


__all__ += ["positive_int", "check_devinterp2_dataset", "check_lm_sampling_arguments", "check_lm_sampling_sizes"]
