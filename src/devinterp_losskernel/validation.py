"""Input validation: the one boundary where public entries check what they are given.

Every analysis takes numpy or torch input (or a :class:`~devinterp_losskernel.LossKernel`)
and works on numpy float64. These helpers convert, check, and raise ``ValueError`` with a
message that names the offending argument and says what was expected, e.g.::

    ValueError: labels must have length n=100 (one per probe sample), got 99
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

import numpy as np
import torch

from .kernel import LossKernel, correlation_from_covariance

__all__ = [
    "KERNEL_USES",
    "as_array",
    "as_labels",
    "as_mask",
    "as_matrix",
    "as_two_groups",
    "as_vector",
    "check_index",
    "check_k",
    "check_kernel",
    "kernel_labels",
    "kernel_matrix",
    "kernel_variance",
    "num_samples_of",
    "py_scalar",
]

KERNEL_USES = ("covariance", "correlation")


def as_array(x: Any, name: str) -> np.ndarray:
    """Any array-like (numpy, torch on any device and dtype, list) → a numpy array.

    Floating and boolean dtypes become float64/bool; other dtypes are kept as numpy gives them.
    """
    if isinstance(x, LossKernel):
        raise ValueError(f"{name} must be an array here, got a LossKernel")
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.double()
        return t.numpy()
    try:
        arr = np.asarray(x)
    except Exception as error:  # ragged lists and the like
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}: {error}") from None
    if arr.dtype.kind == "f" and arr.dtype != np.float64:
        arr = arr.astype(np.float64)
    return arr


def _as_float(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(arr)).sum())} NaN/Inf entries")
    return arr


def as_matrix(x: Any, name: str = "kernel", *, square: bool = True) -> np.ndarray:
    """A 2-D finite float64 numpy array; [n, n] unless ``square=False``."""
    arr = _as_float(as_array(x, name), name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {arr.shape}")
    if square and arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name} must be a square [n, n] matrix, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return arr


def as_vector(x: Any, name: str, n: Optional[int] = None) -> np.ndarray:
    """A 1-D finite float64 numpy array, of length ``n`` if given."""
    arr = _as_float(as_array(x, name), name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must have length n={n} (one per probe sample), got {arr.shape[0]}")
    return arr


def as_labels(labels: Any, n: int, name: str = "labels") -> np.ndarray:
    """Per-sample labels (ints, strings, … from numpy, torch or a list) → a 1-D array of length n."""
    if labels is None:
        raise ValueError(f"{name} must be given (one label per probe sample, length n={n}), got None")
    arr = as_array(labels, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per probe sample), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} must have length n={n} (one per probe sample), got {arr.shape[0]}")
    return arr


def as_mask(mask: Any, n: int, name: str) -> np.ndarray:
    """A boolean [n] mask (bool, or 0/1 numbers)."""
    arr = as_array(mask, name)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a boolean vector of length n={n}, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "iuf" and np.all((arr == 0) | (arr == 1)):
        return arr.astype(bool)
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


def check_index(index: Any, n: int, name: str = "index") -> np.ndarray:
    """A sample index or a sequence of them → int64 array; each must be in [0, n)."""
    arr = as_array(index, name)
    if arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise ValueError(f"{name} must be an int or a 1-D sequence of ints, got {index!r}")
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name} must be in [0, n={n}), got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def check_kernel(kernel: LossKernel, name: str = "kernel", *, square: bool = True) -> LossKernel:
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


def num_samples_of(kernel: Any, name: str = "kernel") -> int:
    """n for a LossKernel or a square matrix."""
    if isinstance(kernel, LossKernel):
        return kernel.num_samples
    return as_matrix(kernel, name).shape[0]


def kernel_matrix(kernel: Any, use: str = "covariance", name: str = "kernel") -> np.ndarray:
    """K̂ or R̂ as a float64 numpy [n, n] array.

    Args:
        kernel: a :class:`LossKernel`, or a square matrix (numpy/torch) taken to be a
            covariance K̂. Asking a matrix for ``use="correlation"`` normalises it,
            R = K/√(K(x,x)K(x',x')) with R = 0 where a variance is 0; a matrix that already is
            a correlation comes back unchanged.
        use: ``"covariance"`` (K̂) or ``"correlation"`` (R̂).
    """
    if use not in KERNEL_USES:
        raise ValueError(f"use must be one of {KERNEL_USES}, got {use!r}")
    if isinstance(kernel, LossKernel):
        check_kernel(kernel, name)
        matrix = kernel.covariance if use == "covariance" else kernel.correlation
        return as_matrix(matrix, name)
    matrix = as_matrix(kernel, name)
    if use == "correlation":
        cov = torch.from_numpy(matrix)
        matrix = correlation_from_covariance(cov, torch.diagonal(cov).clone()).numpy()
    return matrix


def kernel_variance(kernel: Any, name: str = "kernel") -> np.ndarray:
    """Per-sample variances K̂(x, x), [n]: ``kernel.variance`` or the diagonal of a matrix."""
    if isinstance(kernel, LossKernel):
        check_kernel(kernel, name, square=False)
        return as_vector(kernel.variance, f"{name}.variance")
    return np.diagonal(as_matrix(kernel, name)).copy()


def kernel_labels(kernel: Any, labels: Any, n: int, name: str = "labels") -> np.ndarray:
    """``labels`` if given, else the LossKernel's own labels; ValueError if neither exists."""
    if labels is None and isinstance(kernel, LossKernel) and kernel.labels is not None:
        labels = kernel.labels
    if labels is None:
        raise ValueError(
            f"{name} must be given (length n={n}) when the kernel carries no labels"
        )
    return as_labels(labels, n, name)
