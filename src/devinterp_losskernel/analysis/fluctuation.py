"""The singular fluctuation ν and the LLC from a loss kernel (paper, Appendix A.1.3).

Temperature. devinterp's SGLD targets the tempered local posterior

    p(w | D_n) ∝ exp(−nβ · L̄_n(w)) · N(w | w*, 1/γ),     L̄_n(w) = 1/n Σ_i ℓ(x_i; w),

with ``nbeta`` = nβ multiplying the *mean* training loss. In the paper's (Watanabe's) form
exp(−β Σ_i ℓ(x_i; w)) this is the per-sample inverse temperature

    β = nβ / n      (n = ``num_train``, the size of the training set the sampler saw).

Empirical variance. With ℓ(x; w) = −log p(x | w), the paper's Appendix A.1.3 gives

    V = Σ_{i=1}^n Var_w[ℓ(x_i; w)] = Σ_i K(x_i, x_i),      2ν(β)/β = lim_{n→∞} E_D[V],

so ν̂ = β V̂ / 2. For a regular model with d parameters, ν = d/2 at β = 1 (e.g. linear
regression with Gaussian noise, ℓ = ½(y − f(x))²; see ``tests/test_analysis_fluctuation.py``).

Meaning. ν̂ is Watanabe's singular fluctuation when ℓ is a negative log-likelihood (the
cross-entropy of a classifier or a language model). With another loss it is the same functional
of that loss, scaled: if ℓ = s · NLL + const — devinterp's MSE with Gaussian noise of variance σ²
has s = 2σ², since NLL = (y − f)²/(2σ²) + const — the sampler's posterior exp(−nβ L̄_n) is
exp(−(nβ s) · mean NLL), so Watanabe's ν = (β s)/2 · Σ Var[ℓ/s] = β/2 · Σ Var[ℓ] / s: the
reported ν is divided by ``loss_scale`` = s once (2σ² for that MSE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..kernel import LossKernel
from ..sample_moments import NU_MEANING
from ..validation import as_mask, as_vector, check_kernel, check_loss_scale, checked_kernel

__all__ = ["NU_MEANING", "SingularFluctuation", "probe_llc", "singular_fluctuation"]


@dataclass(frozen=True)
class SingularFluctuation:
    """ν̂ and how it was obtained (see :func:`singular_fluctuation`).

    Attributes:
        nu: ν̂ = β V̂ / 2, the singular fluctuation.
        V: V̂ = Σ_{i ∈ train} Var_w[ℓ(x_i; w)], the empirical variance over the whole training
            set (extrapolated as n · mean when the probe holds only part of it).
        beta: β = nβ / n, the per-sample inverse temperature.
        nbeta: nβ, devinterp's inverse temperature (multiplies the mean loss).
        num_train: n, the size of the training set.
        num_probe_train: how many probe samples are training samples (the terms summed).
        stderr: standard error of ν̂ from sampling the probe's training samples out of the
            training set: β/2 · n · sd(Var_i)/√m · √(1 − m/n) with m = num_probe_train
            (0 when the probe is the whole training set). It does *not* include the Monte
            Carlo error of the SGLD draws; compare kernels from independent chains for that.
        method: ``"exact"`` when every training sample is in the probe (V̂ is the sum over all
            n, nothing extrapolated: a whole-training-set probe, e.g. with ``mode="diagonal"``),
            else ``"extrapolated"`` (V̂ = n · mean over the probe's training samples).
        loss_scale: s, ℓ = s · NLL + const (1 for a negative log-likelihood, 2σ² for an MSE
            loss with Gaussian noise of variance σ²); ``nu`` is divided by it, ``V`` is not.
        unseen: training samples of a minibatch-mode kernel without a variance (seen fewer
            than twice): left out of the terms summed and extrapolated over, like samples
            outside the probe.
        meaning: what ``nu`` is, in words.
    """

    nu: float
    V: float
    beta: float
    nbeta: float
    num_train: int
    num_probe_train: int
    stderr: float
    method: str = "extrapolated"
    loss_scale: float = 1.0
    unseen: int = 0

    @property
    def meaning(self) -> str:
        return NU_MEANING if self.loss_scale == 1.0 else (
            f"{NU_MEANING} Here ν = β/2 · Σ Var[ℓ] / {self.loss_scale:g} (loss_scale).")

    @property
    def V_stderr(self) -> float:
        """Standard error of V̂ (same caveat as ``stderr``)."""
        return 2.0 * self.stderr * self.loss_scale / self.beta


def _from_metadata(kernel: Any, value, name: str, section: str, key: str):
    """An argument left as None is read from the kernel's metadata, where it is recorded."""
    if value is not None:
        return value
    kernel = getattr(kernel, "source", kernel)  # a CheckedKernel's LossKernel
    if isinstance(kernel, LossKernel):
        found = (kernel.metadata.get(section) or {}).get(key)
        if found is None:  # a minibatch recorder's kernel keeps num_train and loss_scale at the top
            found = kernel.metadata.get(key)
        if found is not None:
            return found
    raise ValueError(
        f"{name} must be given (it is not recorded in kernel.metadata[{section!r}][{key!r}])"
    )


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def singular_fluctuation(
    kernel: Any,
    *,
    nbeta: Optional[float] = None,
    num_train: Optional[int] = None,
    train_mask: Any = None,
    loss_scale: Optional[float] = None,
) -> SingularFluctuation:
    """Estimate the singular fluctuation ν from the per-sample loss variances K̂(x, x).

        β = nβ / n,   V̂ = n · mean_{i ∈ probe ∩ train} K̂(x_i, x_i),   ν̂ = β V̂ / 2

    When the probe is the whole training set, V̂ = Σ_i K̂(x_i, x_i) = tr K̂ exactly (paper,
    Appendix A.1.3). ν̂ is Watanabe's singular fluctuation when the losses are negative
    log-likelihoods (up to an additive constant); for ℓ = s · NLL (an MSE loss with Gaussian noise
    of variance σ²: s = 2σ²) pass ``loss_scale=s``, and ν̂ = β V̂ / (2s).

    A minibatch-mode kernel's samples seen fewer than twice have no variance (NaN): they are
    left out of the terms and extrapolated over, exactly as samples outside the probe are
    (``unseen`` counts them, ``method`` is then ``"extrapolated"``).

    Args:
        kernel: a :class:`LossKernel` (square or rectangular: only the variances [n_probe]
            are used) or a square covariance matrix [n_probe, n_probe].
        nbeta: devinterp's nβ. Default: ``kernel.metadata["sampler"]["nbeta"]``.
        num_train: n, the number of training samples the SGLD loss averages over.
            Default: ``kernel.metadata["settings"]["num_train"]`` (set by
            :func:`~devinterp_losskernel.estimate_loss_kernel`).
        train_mask: bool [n_probe], True for probe samples that belong to the training set.
            Default: all of them.
        loss_scale: s with ℓ = s · NLL + const; ν̂ is divided by it. Default:
            ``kernel.metadata["loss_scale"]`` when recorded, else 1 (ℓ is a negative
            log-likelihood).

    Returns:
        A :class:`SingularFluctuation` (``nu``, ``V``, ``beta``, ``stderr``, …).

    Example (four training samples, all in the probe, so V̂ = tr K̂ = 1 + 4 + 4 + 0):

    >>> import torch
    >>> from devinterp_losskernel import loss_kernel
    >>> kernel = loss_kernel(torch.tensor([[1.0, 2.0, 6.0, 5.0], [2.0, 4.0, 4.0, 5.0], [3.0, 6.0, 2.0, 5.0]]))
    >>> f = singular_fluctuation(kernel, nbeta=10.0, num_train=4)
    >>> f.V, f.beta, f.nu, f.method                     # β = nβ/n = 2.5, ν = βV/2
    (9.0, 2.5, 11.25, 'exact')
    """
    checked = checked_kernel(kernel, square=False)
    variance = checked.variance
    n_probe = variance.shape[0]
    try:
        loss_scale = _from_metadata(kernel, loss_scale, "loss_scale", "settings", "loss_scale")
    except ValueError:
        loss_scale = 1.0  # not recorded: ℓ is taken to be a negative log-likelihood
    loss_scale = check_loss_scale(loss_scale)
    nbeta = _positive(_from_metadata(kernel, nbeta, "nbeta", "sampler", "nbeta"), "nbeta")
    num_train = _from_metadata(kernel, num_train, "num_train", "settings", "num_train")
    if isinstance(num_train, bool) or not isinstance(num_train, (int, np.integer)) or num_train < 1:
        raise ValueError(f"num_train must be a positive int (training-set size), got {num_train!r}")
    num_train = int(num_train)
    mask = np.ones(n_probe, dtype=bool) if train_mask is None else as_mask(train_mask, n_probe, "train_mask")
    m = int(mask.sum())
    if m == 0:
        raise ValueError("train_mask must mark at least one probe sample as a training sample, got none")
    if m > num_train:
        raise ValueError(
            f"num_train must be at least the number of training samples in the probe ({m}), "
            f"got {num_train}"
        )
    unseen = 0
    if checked.unseen is not None:  # the one rule (validation._kernel_variances): left out, extrapolated over
        unseen = int((mask & checked.unseen).sum())
        mask = mask & ~checked.unseen
        m = int(mask.sum())
        if m == 0:
            raise ValueError("kernel has no training sample seen twice or more (a minibatch-mode kernel's other "
                             "samples have no variance): run more steps")
    train_var = variance[mask]
    beta = nbeta / num_train
    exact = m == num_train
    V = float(train_var.sum()) if exact else num_train * float(train_var.mean())
    spread = float(train_var.std(ddof=1)) if m > 1 else 0.0
    V_stderr = num_train * spread / math.sqrt(m) * math.sqrt(max(0.0, 1.0 - m / num_train))
    return SingularFluctuation(
        nu=beta * V / 2.0 / loss_scale, V=V, beta=beta, nbeta=nbeta, num_train=num_train,
        num_probe_train=m, stderr=beta * V_stderr / 2.0 / loss_scale, method="exact" if exact else "extrapolated",
        loss_scale=loss_scale, unseen=unseen,
    )


def probe_llc(kernel: LossKernel, *, nbeta: Optional[float] = None) -> float:
    """The local learning coefficient measured on the probe, from the same draws as K̂.

        λ̂_probe = nβ · ( mean_i μ̂(x_i) − mean_i ℓ(x_i; w*) )

    with μ̂(x) the mean loss over draws (``kernel.mean``) and ℓ(x; w*) the loss at the
    trained weights (``kernel.init_loss``). When the probe is the training set this is
    devinterp's LLC estimator nβ (E_w[L̄_n(w)] − L̄_n(w*)) with full-batch losses.

    Args:
        kernel: a :class:`LossKernel` with ``init_loss`` (set by ``estimate_loss_kernel`` and
            by :class:`~devinterp_losskernel.LossKernelCallback`).
        nbeta: nβ. Default: ``kernel.metadata["sampler"]["nbeta"]``.
    """
    if not isinstance(kernel, LossKernel):
        raise ValueError(f"kernel must be a LossKernel (it needs mean and init_loss), got {type(kernel).__name__}")
    check_kernel(kernel, square=False)
    if kernel.init_loss is None:
        raise ValueError(
            "kernel.init_loss must hold the probe losses at w* for the LLC, got None "
            "(give the callback a reference model or use estimate_loss_kernel)"
        )
    nbeta = _positive(_from_metadata(kernel, nbeta, "nbeta", "sampler", "nbeta"), "nbeta")
    mean = as_vector(kernel.mean, "kernel.mean")
    init = as_vector(kernel.init_loss, "kernel.init_loss", mean.shape[0])
    return nbeta * float(mean.mean() - init.mean())
