"""Centred kernel alignment (CKA) between loss kernels (paper, Appendix D.3, Fig. 6).

    CKA(K, L) = ⟨K_c, L_c⟩_F / (‖K_c‖_F ‖L_c‖_F),     K_c = H K H,  H = I − 11ᵀ/n

CKA is invariant to scaling either kernel and to adding a constant, and lies in [0, 1] for
positive semi-definite kernels (a covariance K̂ or correlation R̂ is PSD). The paper uses it
to watch the kernel converge as draws accumulate (Fig. 6A, :func:`cka_convergence`) and to
compare kernels sampled at different localizations γ (Fig. 6B, :func:`compare_kernels`).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, List, Mapping, Sequence, Tuple

import numpy as np

from ..extras import pandas_for as _pandas
from ..kernel import LossKernel
from ..validation import kernel_matrix

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["cka", "cka_convergence", "compare_kernels"]


def _centred(kernel: Any, use: str, name: str) -> Tuple[np.ndarray, float]:
    """H K H and its Frobenius norm; ValueError if the norm is 0 (CKA undefined)."""
    m = kernel_matrix(kernel, use, name)
    c = m - m.mean(axis=0, keepdims=True) - m.mean(axis=1, keepdims=True) + m.mean()
    norm = float(np.linalg.norm(c))
    if not norm > 0:
        raise ValueError(f"{name} is constant after centring (H K H = 0), so its CKA is undefined")
    return c, norm


def _alignment(a: Tuple[np.ndarray, float], b: Tuple[np.ndarray, float], name: str) -> float:
    (ca, na), (cb, nb) = a, b
    if ca.shape != cb.shape:
        raise ValueError(f"{name} must have the same shape as the kernel it is compared with, "
                         f"{ca.shape}, got {cb.shape}")
    return float(np.vdot(ca, cb) / (na * nb))


def cka(K: Any, L: Any, *, use: str = "covariance") -> float:
    """CKA between two kernels on the same n samples.

    Args:
        K, L: :class:`LossKernel` or [n, n] matrices (numpy/torch), same n and sample order.
        use: for a LossKernel (or, normalising it, a matrix): ``"covariance"`` (K̂, default)
            or ``"correlation"`` (R̂).
    Returns:
        CKA ∈ [−1, 1]; in [0, 1] for PSD kernels; 1 iff K_c ∝ L_c with a positive factor.

    >>> import numpy as np
    >>> K = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    >>> round(cka(K, 3 * K + 1), 12)                  # blind to scale and to a constant
    1.0
    >>> round(cka(K, np.eye(3)), 3)
    0.894
    """
    return _alignment(_centred(K, use, "K"), _centred(L, use, "L"), "L")


def _snapshot(item: Any, i: int) -> Tuple[int, Any]:
    if isinstance(item, LossKernel):
        return item.num_draws, item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        draws, matrix = item
        if isinstance(draws, (bool, np.bool_)) or not isinstance(draws, numbers.Integral) or draws < 1:
            raise ValueError(f"snapshots[{i}] must start with a positive int num_draws, got {draws!r}")
        return int(draws), matrix
    raise ValueError(f"snapshots[{i}] must be a LossKernel or a (num_draws, matrix) pair, "
                     f"got {type(item).__name__}")


def cka_convergence(snapshots: Sequence[Any], final: Any, *, use: str = "covariance"
                    ) -> List[Tuple[int, float]]:
    """CKA between the kernel after t draws and the final kernel (paper, Fig. 6A).

    Args:
        snapshots: kernels part-way through sampling, each a :class:`LossKernel` (its
            ``num_draws`` is t) or a ``(num_draws, matrix)`` pair.
        final: the kernel from all draws (LossKernel or matrix).
        use: ``"covariance"`` (default) or ``"correlation"``.
    Returns:
        [(num_draws, CKA with ``final``)], sorted by num_draws.
    """
    if isinstance(snapshots, (LossKernel, np.ndarray)) or not len(snapshots):
        raise ValueError("snapshots must be a non-empty list of LossKernels or (num_draws, matrix) pairs")
    reference = _centred(final, use, "final")
    curve = []
    for i, item in enumerate(snapshots):
        draws, kernel = _snapshot(item, i)
        curve.append((draws, _alignment(reference, _centred(kernel, use, f"snapshots[{i}]"),
                                        f"snapshots[{i}]")))
    return sorted(curve, key=lambda point: point[0])


def compare_kernels(kernels: Mapping[Any, Any], *, use: str = "covariance") -> pd.DataFrame:
    """Pairwise CKA between named kernels, e.g. one per localization γ (paper, Fig. 6B).

    Args:
        kernels: {label: LossKernel or [n, n] matrix}, all on the same n samples.
        use: ``"covariance"`` (default) or ``"correlation"``.
    Returns:
        A symmetric DataFrame [m, m] indexed by the labels (in the given order), 1 on the diagonal.
    """
    pd = _pandas("compare_kernels")
    if not isinstance(kernels, Mapping) or not kernels:
        raise ValueError("kernels must be a non-empty dict {label: LossKernel or matrix}")
    names = list(kernels)
    centred = [_centred(kernels[name], use, f"kernels[{name!r}]") for name in names]
    table = np.eye(len(names))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            table[i, j] = table[j, i] = _alignment(centred[i], centred[j], f"kernels[{names[j]!r}]")
    return pd.DataFrame(table, index=pd.Index(names, name="kernel"), columns=pd.Index(names, name="kernel"))
