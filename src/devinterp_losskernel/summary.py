"""The SLT numbers of a run, derived beside the loss-kernel callback (not inside it).

As devinterp derives loss statistics in a second callback (``OnlineLossStatistics(base)``),
:class:`SLTSummary` reads a :class:`~devinterp_losskernel.LossKernelCallback`'s kernel and
settings and reports, beside devinterp's ``llc/mean``:

- ``probe_llc``: the paired LLC of the probe, nβ(E_w[L̄_probe(w)] − L̄_probe(w*));
- ``singular_fluctuation`` ν = βV/2 and ``empirical_variance`` V, β = nβ/n (the probe's
  training samples; extrapolated to the training set when the probe is a part of it);
- ``cka_convergence``: [(t, CKA(K̂_t[S, S], K̂[S, S]))] when the callback took snapshots.

The one-call runners (:func:`~devinterp_losskernel.estimate_loss_kernel`, the ``llc()`` twin)
put the same numbers in the kernel's metadata.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .callback import RESULT_PREFIX, LossKernelCallback
from .kernel import LossKernel

__all__ = ["SLTSummary", "slt_summary", "snapshot_convergence"]


def slt_summary(callback: LossKernelCallback, kernel: Optional[LossKernel] = None) -> Dict[str, Any]:
    """The SLT numbers of the callback's run that sit beside devinterp's LLC, where known:
    ``probe_llc`` (needs ℓ(x; w*)), ``singular_fluctuation``, ``empirical_variance`` and
    ``singular_fluctuation_method`` (needs num_train and training samples in the probe)."""
    from .analysis.fluctuation import probe_llc, singular_fluctuation  # here: the top level stays light

    kernel = kernel if kernel is not None else callback.kernel
    nbeta = callback.hyperparameters.get("nbeta")
    summary: Dict[str, Any] = {}
    if nbeta is None:
        return summary
    if kernel.init_loss is not None:
        summary["probe_llc"] = probe_llc(kernel, nbeta=nbeta)
    mask = callback.probe_train_mask
    has_training_samples = mask is None or (mask is not False and bool(torch.as_tensor(mask).any()))
    if callback.num_train is not None and has_training_samples:
        fluctuation = singular_fluctuation(kernel, nbeta=nbeta, num_train=callback.num_train, train_mask=mask)
        summary["singular_fluctuation"] = fluctuation.nu
        summary["empirical_variance"] = fluctuation.V
        summary["singular_fluctuation_method"] = fluctuation.method  # "exact" or "extrapolated"
    return summary


def snapshot_convergence(callback: LossKernelCallback, use: str = "covariance") -> List[Tuple[int, float]]:
    """[(t, CKA(K̂_t, K̂))] over the callback's snapshots, on the snapshot samples S (paper,
    Fig. 6A); ``use="correlation"`` compares R̂. Plot with
    :func:`~devinterp_losskernel.plotting.plot_cka_convergence`."""
    from .analysis.cka import cka_convergence

    callback.end_chain()
    if not callback.snapshots:
        raise ValueError("no snapshots: pass snapshot_every= to LossKernelCallback "
                         "(and sample at least that many draws)")
    final = callback.accumulator.covariance_block(callback.snapshot_indices).cpu()
    return cka_convergence(callback.snapshots, final, use=use)


class SLTSummary:
    """A derived devinterp 1.x callback: ``callbacks=[cb, SLTSummary(cb)]`` adds
    ``loss_kernel/probe_llc``, ``loss_kernel/singular_fluctuation``,
    ``loss_kernel/empirical_variance`` (and ``loss_kernel/cka_convergence`` with snapshots)
    to ``estimate_learning_coeff_with_summary``'s results. It takes no draws itself."""

    def __init__(self, base: LossKernelCallback):
        if not isinstance(base, LossKernelCallback):
            raise TypeError(f"base must be the LossKernelCallback of the run, got {type(base).__name__}")
        self.base = base

    def __call__(self, **_ignored) -> None:
        """Draws go to the base callback; nothing to do here."""

    def get_results(self) -> Dict[str, Any]:
        try:
            results = slt_summary(self.base)
            if self.base.snapshots:
                results["cka_convergence"] = snapshot_convergence(self.base)
        except ValueError:  # the base callback reports why there is no kernel (loss_kernel/error)
            return {}
        return {RESULT_PREFIX + key: value for key, value in results.items()}
