"""The devinterp callback: at every SGLD draw, fold the probe's loss vector into a kernel.

One class serves both devinterp majors:

- devinterp 1.x calls ``callback(**locals())`` at every draw (``model``, ``chain``, ``draw``,
  ``ref_model``, ``optimizer``, …), then ``finalize()``, and merges ``get_results()`` into
  the dict that ``estimate_learning_coeff_with_summary`` returns.
- devinterp 2.x's ``sample_single_chain(callbacks=[…])`` calls
  ``callback(loss=, draw=, chain=, model=, optimizer=)``.

Both hand over the chain's model in train mode; the probe pass switches to eval mode and
back (see :mod:`devinterp_losskernel.probe`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .accumulator import KernelAccumulator
from .kernel import LossKernel
from .probe import LossFn, ProbeSet, _model_device, evaluate_probe_losses

__all__ = ["LossKernelCallback", "devinterp_version"]

RESULT_PREFIX = "loss_kernel/"
_HYPERPARAMETER_KEYS = ("lr", "nbeta", "localization", "noise_level", "weight_decay", "temperature")


def devinterp_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("devinterp")
    except Exception:  # not installed
        return None


def _snapshot_schedule(snapshot_every) -> Optional[Tuple[Optional[int], Optional[frozenset]]]:
    """(every, None) for an int, (None, {counts}) for a sequence, None for no snapshots."""
    if snapshot_every is None:
        return None
    if isinstance(snapshot_every, numbers.Integral) and not isinstance(snapshot_every, bool):
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be a positive int or a sequence of draw counts, got {snapshot_every!r}")
        return int(snapshot_every), None
    try:
        counts = [int(c) for c in snapshot_every]
    except (TypeError, ValueError):
        raise ValueError(f"snapshot_every must be a positive int or a sequence of draw counts, got {snapshot_every!r}") from None
    if not counts or min(counts) < 2:
        raise ValueError(f"snapshot_every's draw counts must be at least 2 (a covariance needs 2 draws), got {counts!r}")
    return None, frozenset(counts)


def _check_snapshot_rows(snapshot_rows):
    if snapshot_rows is None:
        return None
    if isinstance(snapshot_rows, numbers.Integral) and not isinstance(snapshot_rows, bool):
        if snapshot_rows < 2:
            raise ValueError(f"snapshot_rows must be at least 2 samples (CKA needs a matrix), got {snapshot_rows!r}")
        return int(snapshot_rows)
    indices = torch.as_tensor(snapshot_rows, dtype=torch.long).flatten()
    if indices.numel() < 2:
        raise ValueError("snapshot_rows must name at least 2 sample indices")
    return indices


class LossKernelCallback:
    """Accumulate the loss kernel K(x, x') = Cov_w[ℓ(x; w), ℓ(x'; w)] over SGLD draws.

    Args:
        probe: the n probe samples — a DataLoader (no shuffling), Dataset, tensor, tuple of
            tensors or dict of tensors; see :class:`~devinterp_losskernel.probe.ProbeSet`.
        loss_fn: ``loss_fn(model, batch) -> Tensor[batch_size]``. Default: cross-entropy for
            ``(inputs, targets)``, mean next-token cross-entropy for ``{"input_ids": …}``.
        device: where the accumulator lives; default: the model's device at the first draw.
        dtype: accumulator dtype (float64 default).
        batch_size: probe batch size when ``probe`` is not a DataLoader.
        reference_model: the model at w*, for the probe losses ℓ(x; w*) (``init_loss``).
            With devinterp 1.x this is taken from the sampler's ``ref_model`` if not given.
        sample_ids, labels: [n] identifiers and labels of the probe samples, kept with the kernel.
        block_size: draws buffered per fold (one [n, B]×[B, n] product per block).
        rows: probe indices for a rectangular [len(rows), n] kernel (memory |rows|·n).
        autocast_dtype: run probe forwards under autocast in this dtype (e.g. bfloat16 on GPU).
        channels_last: run probe forwards of a convolutional model in channels-last layout
            (see :func:`~devinterp_losskernel.probe.evaluate_probe_losses`).
        drift_tolerance: warn (once per chain) when a draw's mean probe loss exceeds the mean
            loss at w* by more than ``drift_tolerance × (1 + |mean loss at w*|)``.
        divergence_tolerance: a draw whose mean probe loss exceeds the reference (the mean
            loss at w*, else the chain's first draw) by more than ``divergence_tolerance ×
            (1 + |reference|)`` means the chain has diverged, as does a draw with a NaN/Inf
            probe loss. ``None``: only non-finite losses do.
        divergence_window: each chain's last ``divergence_window`` draws are held back
            ([window, n] memory) and folded in only when newer draws arrive or the chain ends.
            When a chain diverges, the held draws (the blow-up before the NaN, whose huge
            finite losses would otherwise dominate K̂), the diverging draw and all its later
            draws are left out and counted in ``rejected_per_chain``. 0 holds nothing back.
        total_draws: if given, a tqdm bar over all draws of all chains is shown.
        num_train: n, the training-set size the SGLD loss averages over (for the singular
            fluctuation); taken from devinterp 1.x's ``loader`` when not given.
        probe_train_mask: bool [n_probe], which probe samples are training samples (default:
            all); the singular fluctuation uses only those. Pass all-False (or ``False``) for a
            probe of held-out data to leave the singular fluctuation out.
        snapshot_every: keep copies of K̂ part-way through the run, for CKA convergence
            (paper, Fig. 6A): an int t (after every t accepted draws) or a sequence of draw
            counts. Draws are counted over all chains, in the order the sampler delivers them.
        snapshot_rows: which samples the snapshots keep — ``None`` (all n: each snapshot is
            n² numbers on the CPU), an int m (a fixed random subset of m samples, drawn with
            ``snapshot_seed``; memory m² per snapshot), or a sequence of indices. In
            rectangular mode (``rows=``) the subset is drawn from ``rows``.

    After sampling: ``callback.kernel`` is the :class:`LossKernel` (computed on access; it
    folds in the draws still held back, as :meth:`finalize` does — call that before using
    ``callback.accumulator`` directly, e.g. before an all-reduce across ranks);
    ``callback.get_results()`` gives devinterp-1.x style ``loss_kernel/*`` entries;
    ``callback.snapshots`` is [(num_draws, K̂_t[S, S])] and ``callback.cka_convergence()``
    the curve CKA(K̂_t[S, S], K̂[S, S]) against t, S = ``callback.snapshot_indices``.
    """

    def __init__(
        self,
        probe,
        loss_fn: Optional[LossFn] = None,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float64,
        batch_size: int = 512,
        reference_model: Optional[nn.Module] = None,
        sample_ids: Optional[Sequence] = None,
        labels: Optional[Sequence] = None,
        block_size: int = 256,
        rows: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        drift_tolerance: float = 1.0,
        divergence_tolerance: Optional[float] = 100.0,
        divergence_window: int = 16,
        total_draws: Optional[int] = None,
        cache_probe_on_device: Union[bool, str] = "auto",
        num_train: Optional[int] = None,
        probe_train_mask=None,
        snapshot_every: Union[int, Sequence[int], None] = None,
        snapshot_rows: Union[int, Sequence[int], None] = None,
        snapshot_seed: int = 0,
        channels_last: bool = False,
    ):
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (model, batch) -> Tensor[batch_size], got {loss_fn!r}")
        self.probe = ProbeSet(probe, batch_size=batch_size, cache_on_device=cache_probe_on_device)
        self.loss_fn = loss_fn
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.block_size = block_size
        self.rows = rows
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.drift_tolerance = drift_tolerance
        if divergence_tolerance is not None and not (isinstance(divergence_tolerance, numbers.Real)
                                                     and divergence_tolerance > 0):
            raise ValueError(f"divergence_tolerance must be a positive number or None, got {divergence_tolerance!r}")
        if isinstance(divergence_window, bool) or not isinstance(divergence_window, numbers.Integral) \
                or divergence_window < 0:
            raise ValueError(f"divergence_window must be a non-negative int, got {divergence_window!r}")
        self.divergence_tolerance = divergence_tolerance
        self.divergence_window = int(divergence_window)
        self.reference_model = reference_model
        self.sample_ids = sample_ids
        self.labels = labels
        self.total_draws = total_draws
        self.num_train = num_train
        self.probe_train_mask = probe_train_mask
        self.accumulator: Optional[KernelAccumulator] = None
        self.init_loss: Optional[torch.Tensor] = None
        self.hyperparameters: Dict[str, Any] = {}
        self.extra_metadata: Dict[str, Any] = {}
        self.draws_per_chain: Dict[int, int] = {}
        self.rejected_per_chain: Dict[int, int] = {}
        self._drift_warned: set = set()
        self.diverged_chains: List[int] = []
        self._held: Dict[int, List[torch.Tensor]] = {}  # chain → its latest draws, not yet folded
        self._num_samples: Optional[int] = None
        self._first_mean_per_chain: Dict[int, float] = {}
        self._pbar = None
        self._snapshot_schedule = _snapshot_schedule(snapshot_every)
        self._snapshot_rows_arg = _check_snapshot_rows(snapshot_rows)
        self.snapshot_seed = snapshot_seed
        self.snapshot_indices: Optional[torch.Tensor] = None
        self.snapshots: List[Tuple[int, torch.Tensor]] = []

    # -- devinterp entry points -------------------------------------------------------------
    def __call__(self, *, model: nn.Module, chain: int = 0, draw: Optional[int] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 ref_model: Optional[nn.Module] = None, loader=None, **_ignored) -> None:
        """Evaluate the probe at the chain's current weights and fold the losses in."""
        if self.num_train is None and loader is not None and hasattr(loader, "dataset"):
            self.num_train = len(loader.dataset)  # devinterp 1.x passes its training loader
        if self.init_loss is None and self.reference_model is None and ref_model is not None:
            self.set_reference(ref_model)  # devinterp 1.x hands over the model at w*
        if self.accumulator is None:
            self.allocate(model)
        if optimizer is not None and not self.hyperparameters:
            group = optimizer.param_groups[0]
            self.hyperparameters = {
                k: group[k] for k in _HYPERPARAMETER_KEYS
                if k in group and isinstance(group[k], (int, float))
            }
        chain = int(chain) if chain is not None else 0
        self._commit_other_chains(chain)
        if chain in self.diverged_chains:
            self._count_rejected(chain)
            mean_loss = float("nan")
        else:
            losses = self.probe_losses(model)
            # One host sync per draw: the float64 mean is finite iff every loss is.
            mean_loss = float(losses.double().mean())
            reason = self._divergence(chain, losses, mean_loss)
            if reason is not None:
                self._count_rejected(chain)
                self.mark_diverged(chain, f"draw {draw} {reason}", stacklevel=4)
            else:
                self._check_drift(chain, mean_loss)
                held = self._held.setdefault(chain, [])
                held.append(losses.detach())
                while len(held) > self.divergence_window:
                    self._fold(chain, held.pop(0))
        if self._pbar is not None:
            self._pbar.update(1)
            self._pbar.set_postfix(chain=chain, probe_loss=f"{mean_loss:.4g}", refresh=False)

    def end_chain(self, chain: Optional[int] = None) -> None:
        """The chain ended without diverging: fold in its held-back draws (all chains' when
        ``chain`` is None). Called for you when another chain's draws arrive, by
        :meth:`finalize` and by reading :attr:`kernel`."""
        for c in ([chain] if chain is not None else list(self._held)):
            for losses in self._held.pop(c, []):
                self._fold(c, losses)

    def mark_diverged(self, chain: int, reason: str = "diverged", *, stacklevel: int = 2) -> None:
        """Leave chain ``chain`` out from here on: its held-back draws are dropped and its
        later draws rejected (all counted in ``rejected_per_chain``); warns once.
        :func:`~devinterp_losskernel.estimate_loss_kernel` calls this when devinterp stops a
        chain on a NaN minibatch loss; in your own loop over devinterp's samplers, call it when
        you catch that error and go on with the next chain (else the next chain's first draw
        folds in the held draws of the failed one)."""
        dropped = len(self._held.pop(chain, []))
        if dropped:
            self._count_rejected(chain, dropped)
        if chain in self.diverged_chains:
            return
        self.diverged_chains.append(chain)
        warnings.warn(
            f"chain {chain}: {reason}; the chain has diverged. The {dropped} draws held back "
            f"before it (divergence_window={self.divergence_window}) and all later draws of the "
            f"chain are left out of the kernel; its {self.draws_per_chain.get(chain, 0)} earlier "
            "draws are kept. Lower lr or raise localization. Kept/rejected draws per chain are in "
            "kernel.draws_per_chain / kernel.rejected_per_chain.",
            RuntimeWarning, stacklevel=stacklevel,
        )

    def finalize(self, *args, **kwargs) -> None:
        """Fold in held-back and buffered draws (devinterp 1.x calls this once after all
        chains)."""
        self.end_chain()
        if self.accumulator is not None:
            self.accumulator.flush()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def get_results(self) -> Dict[str, Any]:
        """devinterp 1.x dialect: numpy arrays and numbers under ``loss_kernel/``."""
        kernel = self.kernel.cpu()
        results = {
            "covariance": kernel.covariance.numpy(),
            "correlation": kernel.correlation.numpy(),
            "mean": kernel.mean.numpy(),
            "variance": kernel.variance.numpy(),
            "num_draws": kernel.num_draws,
            "trace": kernel.trace,
            "draws_per_chain": dict(kernel.draws_per_chain),
            "rejected_per_chain": dict(kernel.rejected_per_chain),
        }
        if kernel.init_loss is not None:
            results["init_loss"] = kernel.init_loss.numpy()
        results.update(self.slt_summary(kernel))
        if self.snapshots:
            results["cka_convergence"] = self.cka_convergence()
        return {RESULT_PREFIX + key: value for key, value in results.items()}

    def slt_summary(self, kernel: Optional[LossKernel] = None) -> Dict[str, float]:
        """The SLT numbers of this run that sit beside devinterp's LLC: the paired probe LLC
        nβ(E_w[L̄_probe] − L̄_probe(w*)) and the singular fluctuation ν = βV/2, where known."""
        from .analysis import probe_llc, singular_fluctuation

        kernel = kernel if kernel is not None else self.kernel
        nbeta = self.hyperparameters.get("nbeta")
        summary: Dict[str, float] = {}
        if nbeta is None:
            return summary
        if kernel.init_loss is not None:
            summary["probe_llc"] = probe_llc(kernel, nbeta=nbeta)
        mask = self.probe_train_mask
        if self.num_train is not None and mask is not False and (mask is None or bool(torch.as_tensor(mask).any())):
            fluctuation = singular_fluctuation(kernel, nbeta=nbeta, num_train=self.num_train, train_mask=mask)
            summary["singular_fluctuation"] = fluctuation.nu
            summary["empirical_variance"] = fluctuation.V
        return summary

    @property
    def kernel(self) -> LossKernel:
        """The loss kernel of all draws so far (works whether or not finalize() was called)."""
        if self.accumulator is None:
            raise ValueError("no draws yet: the callback has not been called by a sampler")
        self.end_chain()
        if self.accumulator.count < 2 and self.rejected_per_chain:
            raise ValueError(
                f"only {self.accumulator.count} draws were kept: chains {self.diverged_chains} "
                f"diverged (rejected draws per chain: {dict(self.rejected_per_chain)}), and a "
                "covariance needs at least 2. Lower lr or raise localization."
            )
        metadata = {
            "devinterp_version": devinterp_version(),
            "sampler": dict(self.hyperparameters),
            "num_chains": len(self.draws_per_chain),
            "settings": {"num_train": self.num_train},
            **self.extra_metadata,
        }
        return self.accumulator.compute(
            init_loss=self.init_loss,
            draws_per_chain=dict(self.draws_per_chain),
            rejected_per_chain=dict(self.rejected_per_chain),
            sample_ids=self.sample_ids,
            labels=self.labels,
            metadata=metadata,
        )

    def cka_convergence(self, use: str = "covariance") -> List[Tuple[int, float]]:
        """[(t, CKA(K̂_t, K̂))] over the snapshots, on the snapshot samples (paper, Fig. 6A);
        ``use="correlation"`` compares R̂ instead. Plot with
        :func:`~devinterp_losskernel.plotting.plot_cka_convergence`."""
        from .analysis import cka_convergence

        self.end_chain()
        if not self.snapshots:
            raise ValueError("no snapshots: pass snapshot_every= to LossKernelCallback "
                             "(and sample at least that many draws)")
        final = self.accumulator.covariance_block(self.snapshot_indices).cpu()
        return cka_convergence(self.snapshots, final, use=use)

    def _maybe_snapshot(self) -> None:
        if self._snapshot_schedule is None:
            return
        count = self.accumulator.count
        every, at = self._snapshot_schedule
        if count >= 2 and ((every is not None and count % every == 0) or (at is not None and count in at)):
            block = self.accumulator.covariance_block(self.snapshot_indices)
            self.snapshots.append((int(count), block.to("cpu", copy=True)))

    def _choose_snapshot_indices(self) -> Optional[torch.Tensor]:
        """The fixed sample subset S the snapshots keep (sorted indices), or None."""
        if self._snapshot_schedule is None:
            return None
        choice = self._snapshot_rows_arg
        pool = (torch.arange(self._num_samples) if self.rows is None
                else torch.as_tensor(self.rows, dtype=torch.long).flatten().unique())
        if choice is None:
            return pool
        if isinstance(choice, int):
            if choice >= len(pool):
                return pool
            generator = torch.Generator().manual_seed(int(self.snapshot_seed))
            return pool[torch.randperm(len(pool), generator=generator)[:choice]].sort().values
        indices = torch.as_tensor(choice, dtype=torch.long).flatten()
        if indices.min() < 0 or indices.max() >= self._num_samples:
            raise ValueError(f"snapshot_rows must be sample indices in [0, {self._num_samples}), got "
                             f"values in [{int(indices.min())}, {int(indices.max())}]")
        if self.rows is not None and not bool(torch.isin(indices, pool).all()):
            raise ValueError("snapshot_rows must be among rows= in rectangular mode")
        return indices

    # -- the work ---------------------------------------------------------------------------
    def probe_losses(self, model: nn.Module) -> torch.Tensor:
        """ℓ(x_i; w) for the model's current weights w, [n]."""
        return evaluate_probe_losses(
            model, self.probe, self.loss_fn,
            device=_model_device(model),
            autocast_dtype=self.autocast_dtype,
            expected_num_samples=self._num_samples,
            channels_last=self.channels_last,
        )

    def allocate(self, model: nn.Module) -> KernelAccumulator:
        """Create the accumulator for this probe on the model's device (or ``device``).

        Called by the first draw; call it yourself to restore a saved accumulator state first.
        """
        if self.reference_model is not None and self.init_loss is None:
            self.set_reference(self.reference_model)
        if self._num_samples is None:
            self._num_samples = int(self.probe_losses(model).shape[0])
        device = self.device if self.device is not None else _model_device(model)
        self.accumulator = KernelAccumulator(
            self._num_samples, device=device, dtype=self.dtype,
            block_size=self.block_size, rows=self.rows,
        )
        self.snapshot_indices = self._choose_snapshot_indices()
        if self.total_draws is not None:
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=self.total_draws, desc="loss kernel draws", unit="draw")
        return self.accumulator

    def set_reference(self, reference_model: nn.Module) -> torch.Tensor:
        """Record the probe losses at w* (``init_loss``) from the model at w*."""
        losses = self.probe_losses(reference_model)
        self._num_samples = int(losses.shape[0])
        self.init_loss = losses.detach().to("cpu", torch.float64)
        return self.init_loss

    def _fold(self, chain: int, losses: torch.Tensor) -> None:
        self.accumulator.update(losses, check_finite=False)
        self.draws_per_chain[chain] = self.draws_per_chain.get(chain, 0) + 1
        self._maybe_snapshot()

    def _count_rejected(self, chain: int, draws: int = 1) -> None:
        self.rejected_per_chain[chain] = self.rejected_per_chain.get(chain, 0) + draws

    def _commit_other_chains(self, chain: int) -> None:
        """Chains run one after another: a draw of a new chain ends the earlier ones."""
        for other in [c for c in self._held if c != chain]:
            self.end_chain(other)

    def _reference(self, chain: int, current: float) -> Tuple[float, str]:
        """The mean probe loss a chain is compared with: at w* if known, else its first draw."""
        if self.init_loss is not None:
            return float(self.init_loss.mean()), "the probe loss at w*"
        return self._first_mean_per_chain.setdefault(chain, current), "the chain's first draw"

    def _divergence(self, chain: int, losses: torch.Tensor, mean_loss: float) -> Optional[str]:
        """Why this draw shows the chain has diverged, or None."""
        if not math.isfinite(mean_loss):
            return f"has {int((~torch.isfinite(losses)).sum())} non-finite probe losses (NaN/Inf)"
        if self.divergence_tolerance is None:
            return None
        reference, source = self._reference(chain, mean_loss)
        if mean_loss - reference > self.divergence_tolerance * (1.0 + abs(reference)):
            return (f"has mean probe loss {mean_loss:.4g}, more than divergence_tolerance="
                    f"{self.divergence_tolerance:g} × (1 + |{reference:.4g}|) above {source}")
        return None

    def _check_drift(self, chain: int, current: float) -> None:
        if chain in self._drift_warned:
            return
        reference, source = self._reference(chain, current)
        if current - reference > self.drift_tolerance * (1.0 + abs(reference)):
            self._drift_warned.add(chain)
            warnings.warn(
                f"chain {chain}: mean probe loss {current:.4g} has drifted far above {source} "
                f"({reference:.4g}); the chain may have left the basin of w*. Consider a smaller "
                "lr, larger localization or larger nbeta.",
                RuntimeWarning, stacklevel=3,
            )

    # -- guard against devinterp 1.x multiprocessing ----------------------------------------
    def __getstate__(self):
        raise TypeError(
            "LossKernelCallback cannot be sent to worker processes: with devinterp's cores > 1 "
            "each worker would fold its draws into its own copy, which is lost when the worker "
            "exits, leaving a kernel of no draws. Use cores=1 (the probe forward passes already "
            "use all threads), or run chains in separate processes/GPUs with torch.distributed "
            "and merge the KernelAccumulators with KernelAccumulator.merge()."
        )

    def __repr__(self) -> str:
        state = repr(self.accumulator) if self.accumulator is not None else "not started"
        return f"LossKernelCallback({state})"
