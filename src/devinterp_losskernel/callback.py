"""The devinterp callback: at every SGLD draw, fold the probe's loss vector into a kernel.

One class serves both devinterp majors:

- devinterp 1.x calls ``callback(**locals())`` at every draw (``model``, ``chain``, ``draw``,
  ``ref_model``, ``optimizer``, ``num_draws``, …), then ``finalize()``, and merges
  ``get_results()`` into the dict that ``estimate_learning_coeff_with_summary`` returns.
- devinterp 2.x's ``sample_single_chain(callbacks=[…])`` calls
  ``callback(loss=, draw=, chain=, model=, optimizer=)``.

Both hand over the chain's model in train mode; the probe pass switches to eval mode and
back (see :mod:`devinterp_losskernel.probe`).

What the callback refuses to do silently (each is either a clear error before sampling can be
wasted, or a warning and a record in the kernel):

- **Bad arguments** — the probe is passed over twice in the constructor (n, its fingerprint,
  and whether it yields the same samples in the same order); labels, sample ids, rows, the
  training mask and snapshot rows are checked against n there; ``loss_fn`` is checked on the
  first probe pass (at w* when ``reference_model`` is given: in the constructor).
- **Mixing runs** — a callback that sees a *new run* (draws after ``finalize()`` — devinterp
  1.x calls it at the end of every run —, another ``ref_model`` or other SGLD settings)
  starts a fresh kernel for it and warns; the previous kernel is replaced (save it, or use
  one callback per run, to keep both). A chain that starts again at an earlier draw is
  ambiguous (a rerun, or chains all numbered 0) and is refused with what to do
  (``chain=i``, ``finalize()`` or ``reset()``). A callback registered twice in one run
  (``callbacks=[cb, cb]``) is refused at its first draw.
- **Failed chains** — a chain that diverges (NaN/Inf or exploding probe losses) or that the
  sampler aborts (it delivered fewer than ``num_draws`` draws when the next chain starts or at
  ``finalize()``) is cut off: its held-back draws are dropped, and the chain is recorded in
  ``diverged_chains`` / ``chain_failures`` and the kernel's metadata.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .accumulator import KernelAccumulator, validate_rows
from .chains import ChainGuard, ChainRecord
from .diagnostics import HealthRecorder, report_summary, with_trace
from .kernel import LossKernel, as_labels
from .options import DivergenceGuard, KernelStorage, ProbeOptions, SnapshotSchedule, _is_int, groups_from
from .probe import LossFn, ProbeSet, _model_device, check_loss_fn, default_loss_kind, evaluate_probe_losses
from .progress import progress_bar
from .provenance import argument_differences, checksum, devinterp_version, mismatch_error
from .rng import leaves_rng_untouched
from .snapshots import Snapshots
from .state import DeclaredState, state

__all__ = ["DivergenceGuard", "KernelStorage", "LossKernelCallback", "ProbeOptions", "SnapshotSchedule",
           "devinterp_version"]

RESULT_PREFIX = "loss_kernel/"
_HYPERPARAMETER_KEYS = ("lr", "nbeta", "localization", "noise_level", "weight_decay", "temperature")


# -- what one run holds besides its chains: declared once, reset as a whole ------------------
def _save_accumulator(accumulator):
    return None if accumulator is None else accumulator.state_dict()


def _save_health(recorder):
    return None if recorder is None else recorder.state_dict()


def _load_health(saved):
    return None if saved is None else HealthRecorder.from_state_dict(saved)


@dataclass
class _Run(DeclaredState):
    accumulator: Optional[KernelAccumulator] = state(None, save=_save_accumulator, load=lambda saved: None)
    init_loss: Optional[torch.Tensor] = state(None)  # ℓ(x; w*), [n] float64 on the CPU
    hyperparameters: Dict[str, Any] = state(factory=dict, load=dict)  # the sampler's settings
    health: Optional[HealthRecorder] = state(None, save=_save_health, load=_load_health)  # split-half moments
    last_call: Optional[Tuple[int, Optional[int]]] = state(None, saved=False)
    last_model: Any = state(None, saved=False)  # weakref to the model of the last call
    ref_model: Any = state(None, saved=False)  # weakref to devinterp's ref_model of this run
    finalized: bool = state(False, saved=False)
    warned_no_draw: bool = state(False, saved=False)


def _prior_hyperparameters(prior) -> Dict[str, float]:
    """localization γ and weight_decay λ of devinterp 2's ``SGMCMC`` (``SGMCMC.sgld`` puts them
    in Gaussian priors, centred at the initial weights and at 0), named as ``SGLD`` names them."""
    if prior is None or not hasattr(prior, "localization") and not hasattr(prior, "priors"):
        return {}
    found = {"localization": 0.0, "weight_decay": 0.0}
    for part in getattr(prior, "priors", [prior]):
        strength = getattr(part, "localization", None)
        if isinstance(strength, (int, float)) and not isinstance(strength, bool):
            key = "weight_decay" if getattr(part, "center", "initial") is None else "localization"
            found[key] += float(strength)
    return found


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


class LossKernelCallback:
    """Accumulate the loss kernel K(x, x') = Cov_w[ℓ(x; w), ℓ(x'; w)] over SGLD draws.

    Args:
        probe: the n probe samples — a DataLoader (no shuffling), Dataset, tensor, numpy
            array, tuple of tensors/arrays (e.g. ``(inputs, labels)``) or dict of tensors;
            see :class:`~devinterp_losskernel.probe.ProbeSet`.
        loss_fn: ``loss_fn(model, batch) -> Tensor[batch_size]`` of float losses. Default:
            cross-entropy for ``(inputs, targets)``, mean next-token cross-entropy for
            ``{"input_ids": …}``.
        reference_model: the model at w*, for the probe losses ℓ(x; w*) (``init_loss``);
            evaluated here, so a bad ``loss_fn`` fails before any sampling. With devinterp 1.x
            the sampler's ``ref_model`` is used if this is not given.
        sample_ids, labels: [n] identifiers and integer labels of the probe samples (lists,
            numpy arrays or tensors; whole-number floats are taken as integers).
        num_train: n, the training-set size the SGLD loss averages over (for the singular
            fluctuation); taken from devinterp 1.x's ``loader`` when not given.
        probe_train_mask: bool [n_probe], which probe samples are training samples (default:
            all); the singular fluctuation uses only those. Pass all-False (or ``False``) for a
            probe of held-out data to leave the singular fluctuation out.
        num_draws: T, the draws each chain should deliver; a chain that delivers fewer (the
            sampler aborted it) is recorded as failed and its held draws left out. Taken from
            devinterp 1.x's sampler; pass it in a devinterp 2.x loop.
        total_draws: if given, a tqdm bar over all draws of all chains is shown.
        probe_options: :class:`ProbeOptions` (batch_size, autocast_dtype, channels_last,
            cache_on_device).
        storage: :class:`KernelStorage` (device, dtype, block_size, rows).
        divergence: :class:`DivergenceGuard` (tolerance, window, drift_tolerance).
        snapshot_schedule: :class:`SnapshotSchedule` (every, rows, seed).
        **flat: the groups' fields by their flat names, as before: ``batch_size``,
            ``autocast_dtype``, ``channels_last``, ``cache_probe_on_device``, ``device``,
            ``dtype``, ``block_size``, ``rows``, ``divergence_tolerance``,
            ``divergence_window``, ``drift_tolerance``, ``snapshot_every``, ``snapshot_rows``,
            ``snapshot_seed``.

    After sampling: ``callback.kernel`` is the :class:`LossKernel` (computed on access; it
    folds in the draws still held back of chains that are complete, as :meth:`finalize` does
    — call that before using ``callback.accumulator`` directly, e.g. before an all-reduce
    across ranks); ``callback.get_results()`` gives devinterp-1.x style ``loss_kernel/*``
    entries; ``callback.snapshots`` is [(num_draws, K̂_t[S, S])] and
    ``callback.cka_convergence()`` the curve CKA(K̂_t[S, S], K̂[S, S]) against t,
    S = ``callback.snapshot_indices``. Every kernel carries its run's health record (the trace of
    the mean probe loss of each kept draw and split-half moments, a few n-vectors:
    :mod:`~devinterp_losskernel.diagnostics`), ``kernel.diagnostics()`` judges it and
    ``kernel.metadata["diagnostics"]`` holds the report's summary. ``state_dict()`` /
    ``load_state_dict()`` save and restore everything the callback holds (checked against its
    arguments).
    """

    @leaves_rng_untouched
    def __init__(
        self,
        probe,
        loss_fn: Optional[LossFn] = None,
        *,
        reference_model: Optional[nn.Module] = None,
        sample_ids: Optional[Sequence] = None,
        labels: Optional[Sequence] = None,
        num_train: Optional[int] = None,
        probe_train_mask=None,
        num_draws: Optional[int] = None,
        total_draws: Optional[int] = None,
        probe_options: Optional[ProbeOptions] = None,
        storage: Optional[KernelStorage] = None,
        divergence: Optional[DivergenceGuard] = None,
        snapshot_schedule: Optional[SnapshotSchedule] = None,
        **flat,
    ):
        check_loss_fn(loss_fn)
        groups = groups_from(dict(probe_options=probe_options, storage=storage, divergence=divergence,
                                   snapshot_schedule=snapshot_schedule), flat)
        self.probe_options: ProbeOptions = groups["probe_options"]
        self.storage: KernelStorage = groups["storage"]
        self.divergence: DivergenceGuard = groups["divergence"]
        self.snapshot_schedule: SnapshotSchedule = groups["snapshot_schedule"]
        for name, value in (("num_train", num_train), ("num_draws", num_draws), ("total_draws", total_draws)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if reference_model is not None and not isinstance(reference_model, nn.Module):
            raise TypeError(f"reference_model must be a torch.nn.Module (the model at w*), got "
                            f"{type(reference_model).__name__}")

        self.probe = ProbeSet(probe, batch_size=self.probe_options.batch_size,
                              cache_on_device=self.probe_options.cache_on_device)
        n, self.probe_fingerprint = self.probe.check_stable()  # two passes: n, order, fingerprint
        # the default loss can take this probe's batches (no model needed); its kind names the
        # health report's chance level
        self._loss_kind = "custom" if loss_fn is not None else default_loss_kind(next(iter(self.probe.loader)))
        self._num_samples = n
        self.loss_fn = loss_fn
        self.labels = None if labels is None else as_labels(labels, n, "labels")
        if sample_ids is not None and len(sample_ids) != n:
            raise ValueError(f"sample_ids must have one entry per probe sample: length {n}, got {len(sample_ids)}")
        self.sample_ids = sample_ids
        self.rows = None if self.storage.rows is None else validate_rows(self.storage.rows, n)
        self.probe_train_mask = self._check_train_mask(probe_train_mask, n)
        self.num_train = num_train
        in_training_set = 0 if self.probe_train_mask is False else \
            n if self.probe_train_mask is None else int(self.probe_train_mask.sum())
        if num_train is not None and in_training_set > num_train:  # ν's sum would fail after sampling
            raise ValueError(
                f"num_train={num_train} (the training set size) is smaller than the {in_training_set} probe "
                "samples taken as training samples: probe_train_mask=None means the whole probe is training "
                "data. For a held-out probe pass probe_train_mask=False; for a mixed one a bool mask [n]")
        self.num_draws = num_draws
        self.total_draws = total_draws
        self.reference_model = reference_model
        self.extra_metadata: Dict[str, Any] = {}
        self._pbar = None
        if self.storage.mode == "diagonal" and self.snapshot_schedule.every is not None:
            raise ValueError("snapshot_every needs covariances, but mode='diagonal' keeps none; "
                             "use mode='full' or mode='combined' with rows=")
        self._snapshots = Snapshots(self.snapshot_schedule, n, self.rows)
        self._start_run()
        if reference_model is not None:
            self.set_reference(reference_model)  # ℓ(x; w*) now: a bad loss_fn fails before sampling


    # -- the run's state ----------------------------------------------------------------------
    def _start_run(self) -> None:
        """A fresh run: its state, its chains, no snapshots (the snapshot samples S stay)."""
        self._run = _Run()
        self._guard = ChainGuard(self.divergence, fold=self._fold, reference_loss=self._mean_loss_at_w_star,
                                 expected_draws=self.num_draws, observe=self._observe_draw)
        self._snapshots.reset()

    accumulator = property(lambda self: self._run.accumulator)
    init_loss = property(lambda self: self._run.init_loss)
    hyperparameters = property(lambda self: self._run.hyperparameters)
    chains = property(lambda self: self._guard.record, doc="The per-chain record (:class:`ChainRecord`).")
    draws_per_chain = property(lambda self: self._guard.record.draws_per_chain)
    diverged_chains = property(lambda self: self._guard.record.diverged_chains)
    snapshots = property(lambda self: self._snapshots.taken, doc="[(draws t, K̂_t[S, S])] taken so far.")
    snapshot_indices = property(lambda self: self._snapshots.indices, doc="S, the snapshot samples.")

    @staticmethod
    def _check_train_mask(mask, n: int):
        if mask is None or mask is False:
            return mask
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"probe_train_mask must be a bool sequence of length {n}, False or None") from None
        if mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(f"probe_train_mask must be a bool tensor of shape ({n},) (one entry per probe "
                             f"sample), got dtype {mask.dtype} and shape {tuple(mask.shape)}")
        return mask

    # -- devinterp entry points -------------------------------------------------------------
    @leaves_rng_untouched
    def __call__(self, *, model: nn.Module, chain: int = 0, draw: Optional[int] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 ref_model: Optional[nn.Module] = None, loader=None, num_draws: Optional[int] = None,
                 **_ignored) -> None:
        """Evaluate the probe at the chain's current weights and fold the losses in."""
        chain = int(chain) if chain is not None else 0
        draw = int(draw) if draw is not None else None
        hyperparameters = self._read_hyperparameters(optimizer)
        self._check_same_run(model, chain, draw, ref_model, hyperparameters)
        run = self._run
        run.last_call, run.last_model = (chain, draw), _weak(model)
        if ref_model is not None and run.ref_model is None:
            run.ref_model = _weak(ref_model)
        if hyperparameters and not run.hyperparameters:
            run.hyperparameters = hyperparameters
        if _is_int(num_draws):
            if self.num_draws is not None and int(num_draws) != self.num_draws:
                raise ValueError(
                    f"num_draws must match the sampler's: LossKernelCallback(num_draws={self.num_draws}), but "
                    f"the sampler takes num_draws={int(num_draws)} draws per chain (leave it out under "
                    "devinterp 1.x: the sampler passes its own)")
            self._guard.record.expected_draws = int(num_draws)
        if draw is None and not run.warned_no_draw:
            run.warned_no_draw = True
            warnings.warn(
                "LossKernelCallback called without draw=: it cannot tell a new run from more draws of "
                "this one. Pass draw= (and chain=) from your loop, or call finalize() at the end of each run.",
                RuntimeWarning, stacklevel=2)
        if self.num_train is None and loader is not None and hasattr(loader, "dataset"):
            self.num_train = len(loader.dataset)  # devinterp 1.x passes its training loader
        if run.init_loss is None and self.reference_model is None and ref_model is not None:
            self.set_reference(ref_model)  # devinterp 1.x hands over the model at w*
        if run.accumulator is None:
            self.allocate(model)
        elif run.hyperparameters and run.accumulator.identity.sampler is None:
            run.accumulator.identity = run.accumulator.identity.with_known(sampler=run.hyperparameters)
        if self._guard.cut_off(chain):
            losses, mean_loss = None, float("nan")
        else:
            losses = self.probe_losses(model)
            mean_loss = float(losses.double().mean())  # one host sync per draw: finite iff every loss is
        self._guard.deliver(chain, draw, losses, mean_loss, stacklevel=4)
        if self._pbar is not None:
            self._pbar.update(1)
            self._pbar.set_postfix(chain=chain, probe_loss=f"{mean_loss:.4g}", refresh=False)

    @staticmethod
    def _read_hyperparameters(optimizer) -> Dict[str, Any]:
        if optimizer is None or not getattr(optimizer, "param_groups", None):
            return {}
        group = optimizer.param_groups[0]
        found = {k: group[k] for k in _HYPERPARAMETER_KEYS
                 if k in group and isinstance(group[k], (int, float)) and not isinstance(group[k], bool)}
        found.update(_prior_hyperparameters(group.get("prior")))  # devinterp 2's SGMCMC keeps γ, λ in its prior
        return found

    def _check_same_run(self, model, chain, draw, ref_model, hyperparameters) -> None:
        """Refuse a double registration; start a fresh kernel when a new run begins."""
        run, chains = self._run, self._guard.record
        if run.accumulator is None and not chains.delivered:
            return
        same_model = run.last_model is not None and run.last_model() is model
        if draw is not None and run.last_call == (chain, draw) and same_model:
            raise ValueError(
                f"LossKernelCallback received chain {chain}, draw {draw} twice in a row from the same "
                "model: it is registered twice in callbacks (e.g. callbacks=[cb, cb]), which would fold "
                "every draw twice. Pass it once.")
        reason = None
        if run.finalized:
            reason = "draws arrived after finalize() (the sampler finished the previous run)"
        elif ref_model is not None and run.ref_model is not None and run.ref_model() is not ref_model:
            reason = "the sampler's ref_model (w*) is another model than the previous run's"
        elif hyperparameters and run.hyperparameters and hyperparameters != run.hyperparameters:
            reason = f"the SGLD settings changed from {run.hyperparameters} to {hyperparameters}"
        elif draw is not None and chain in chains.last_draw and draw <= chains.last_draw[chain]:
            # ambiguous: a rerun of the sampling, or several chains all numbered `chain`
            raise ValueError(
                f"LossKernelCallback: chain {chain} started again at draw {draw} (it was at draw "
                f"{chains.last_draw[chain]}). If this is another chain of the same run, number the chains "
                "(sample_single_chain(..., chain=i)); if it is a new run, call callback.finalize() at the "
                "end of each run (a new run then starts a fresh kernel) or callback.reset() before it.")
        if reason is None:
            return
        previous = run.accumulator.count if run.accumulator is not None else 0
        warnings.warn(
            f"LossKernelCallback: a new run started ({reason}). The callback starts a fresh kernel for "
            f"it; the previous run's kernel ({previous} draws) is replaced, not mixed in. To keep both, "
            "save callback.kernel after each run or use one callback per run.",
            RuntimeWarning, stacklevel=4)
        self._start_run()

    def reset(self) -> None:
        """Forget the current run (its draws, losses at w*, settings) and start a fresh kernel."""
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._start_run()
        if self.reference_model is not None:
            self.set_reference(self.reference_model)  # w* may have changed since

    def end_chain(self, chain: Optional[int] = None) -> None:
        """The chain ended without diverging: fold in its held-back draws (all chains' when
        ``chain`` is None). Called for you when another chain's draws arrive, by
        :meth:`finalize` and by reading :attr:`kernel`."""
        self._guard.end_chain(chain)

    def mark_diverged(self, chain: int, reason: str = "diverged", *, stacklevel: int = 2) -> None:
        """Leave chain ``chain`` out from here on (see :meth:`ChainGuard.mark_diverged`).
        :func:`~devinterp_losskernel.estimate_loss_kernel` calls this when devinterp stops a
        chain on a NaN minibatch loss; in your own loop over devinterp's samplers, call it when
        you catch that error and go on with the next chain (or pass ``num_draws=`` so that a
        short chain is caught for you)."""
        self._guard.mark_diverged(chain, reason, stacklevel=stacklevel + 1)

    @leaves_rng_untouched
    def finalize(self, *args, **kwargs) -> None:
        """Fold in held-back and buffered draws (devinterp 1.x calls this once after all
        chains); a chain with fewer than ``num_draws`` draws is recorded as failed. Draws that
        arrive after this belong to a new run."""
        self._guard.finish(stacklevel=4)
        if self._run.accumulator is not None:
            self._run.accumulator.flush()
            self._run.finalized = True
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    @leaves_rng_untouched
    def get_results(self) -> Dict[str, Any]:
        """devinterp 1.x dialect: numpy arrays and numbers under ``loss_kernel/`` (the SLT numbers
        beside them come from :class:`~devinterp_losskernel.summary.SLTSummary`). If the kernel
        cannot be computed, ``loss_kernel/error`` says why (and a warning repeats it), so that
        devinterp's own results (the LLC) in the same dict are never lost to it."""
        try:
            kernel = self.kernel.cpu()
            results = {} if kernel.is_diagonal else {
                "covariance": kernel.covariance.numpy(),
                "correlation": kernel.correlation.numpy(),
            }
            results.update({
                "mean": kernel.mean.numpy(),
                "variance": kernel.variance.numpy(),
                "num_draws": kernel.num_draws,
                "trace": kernel.trace,
                "draws_per_chain": dict(kernel.draws_per_chain),
                "rejected_per_chain": dict(kernel.rejected_per_chain),
                "diagnostics": kernel.metadata.get("diagnostics"),  # the health report's summary
            })
            if kernel.init_loss is not None:
                results["init_loss"] = kernel.init_loss.numpy()
        except Exception as error:  # report beside devinterp's results instead of losing them
            message = f"{type(error).__name__}: {error}"
            warnings.warn(f"LossKernelCallback: no loss kernel for this run: {message}", RuntimeWarning,
                          stacklevel=2)
            return {RESULT_PREFIX + "error": message}
        return {RESULT_PREFIX + key: value for key, value in results.items()}

    @property
    def kernel(self) -> LossKernel:
        """The loss kernel of all draws so far (works whether or not finalize() was called).
        Held-back draws of a chain that has not yet delivered its ``num_draws`` stay held
        (out of this kernel; listed in ``metadata["incomplete_chains"]``) until it does."""
        run, chains = self._run, self._guard.record
        if run.accumulator is None:
            raise ValueError("no draws yet: the callback has not been called by a sampler")
        incomplete = self._guard.release_complete()
        if run.accumulator.count < 2 and chains.rejected_per_chain:
            reasons = "; ".join(f"chain {c}: {r}" for c, r in chains.chain_failures.items())
            raise ValueError(
                f"only {run.accumulator.count} draws were kept: chains {chains.diverged_chains} "
                f"diverged (rejected draws per chain: {dict(chains.rejected_per_chain)}), and a "
                f"covariance needs at least 2 ({reasons}). Lower lr or raise localization; if every "
                "chain failed at its first draw, check the probe inputs and loss_fn for NaN/Inf."
            )
        metadata = {
            "devinterp_version": devinterp_version(),
            "probe_loss": self._probe_loss_kind(),
            "sampler": dict(run.hyperparameters),
            "num_chains": len(chains.draws_per_chain),
            "settings": {"num_train": self.num_train},
            "arguments": self.arguments(),
            "diverged_chains": list(chains.diverged_chains),
            "chain_failures": dict(chains.chain_failures),
            **({"incomplete_chains": incomplete} if incomplete else {}),
            **self.extra_metadata,
        }
        kernel = run.accumulator.compute(
            init_loss=run.init_loss,
            draws_per_chain=dict(chains.draws_per_chain),
            rejected_per_chain=dict(chains.rejected_per_chain),
            sample_ids=self.sample_ids,
            labels=self.labels,
            metadata=metadata,
            health_record=self._health_record(),
        )
        kernel.metadata["diagnostics"] = report_summary(kernel)  # kernel.diagnostics() has the full report
        return kernel

    def _health_record(self) -> Optional[Dict[str, Any]]:
        """The run's health record (trace and split-half moments), or None when it does not
        cover exactly the draws of the kernel (a run resumed from a checkpoint without one)."""
        run, guard = self._run, self._guard
        if run.health is None:
            return None
        trace = guard.kept_trace()
        recorded = sum(int(g["count"]) for g in run.health.groups)
        if recorded != run.accumulator.count or any(
                len(trace.get(c, [])) != k for c, k in guard.record.draws_per_chain.items()):
            return None
        return with_trace(run.health.record(), trace)

    def _probe_loss_kind(self) -> str:
        """``"cross_entropy"`` (the default loss of a classification probe), ``"language_model"``
        or ``"custom"`` (a loss_fn of the user's): the health report's chance level needs it."""
        kind = self._loss_kind
        return "cross_entropy" if kind == "classification" else kind

    # -- the work ---------------------------------------------------------------------------
    @leaves_rng_untouched
    def probe_losses(self, model: nn.Module) -> torch.Tensor:
        """ℓ(x_i; w) for the model's current weights w, [n]."""
        return evaluate_probe_losses(
            model, self.probe, self.loss_fn,
            device=_model_device(model),
            autocast_dtype=self.probe_options.autocast_dtype,
            expected_num_samples=self._num_samples,
            channels_last=self.probe_options.channels_last,
        )

    def arguments(self) -> Dict[str, Any]:
        """What this callback's kernel depends on, for checkpoints and kernel metadata: n, the
        probe fingerprint, rows, dtype, labels, sample ids, the training mask, num_train and
        the divergence guard (checksums stand for the long ones)."""
        mask = self.probe_train_mask
        return {
            "num_samples": self._num_samples,
            "probe": self.probe_fingerprint,
            "rows": None if self.rows is None else self.rows.tolist(),
            "dtype": str(self.storage.dtype).removeprefix("torch."),
            "mode": self.storage.mode,
            "labels": None if self.labels is None else checksum(self.labels)[:16],
            "sample_ids": None if self.sample_ids is None else checksum(
                self.sample_ids if isinstance(self.sample_ids, torch.Tensor)
                else [str(s) for s in self.sample_ids])[:16],
            "probe_train_mask": mask if mask is None or mask is False else checksum(mask)[:16],
            "num_train": self.num_train,
            "divergence": asdict(self.divergence),
        }

    @leaves_rng_untouched
    def allocate(self, model: nn.Module, sampler: Optional[Dict[str, Any]] = None) -> KernelAccumulator:
        """Create the accumulator for this probe on the model's device (or ``device``), with
        its identity (n, rows, dtype, probe fingerprint, SGLD settings).

        Called by the first draw; call it yourself to restore a saved accumulator state first.
        """
        run = self._run
        if self.reference_model is not None and run.init_loss is None:
            self.set_reference(self.reference_model)
        if sampler:
            run.hyperparameters = dict(sampler)
        device = self.storage.device if self.storage.device is not None else _model_device(model)
        run.accumulator = KernelAccumulator(
            self._num_samples, device=device, dtype=self.storage.dtype,
            block_size=self.storage.block_size, rows=self.rows, mode=self.storage.mode,
            probe=self.probe_fingerprint, sampler=run.hyperparameters or None,
        )
        if self.total_draws is not None:
            self._pbar = progress_bar(self.total_draws, "loss kernel draws")  # quiet in a log file
        return run.accumulator

    @leaves_rng_untouched
    def set_reference(self, reference_model: nn.Module) -> torch.Tensor:
        """Record the probe losses at w* (``init_loss``) from the model at w*."""
        losses = self.probe_losses(reference_model)
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            where = torch.nonzero(bad).flatten()[:5].tolist()
            raise ValueError(
                f"the probe losses at w* (reference_model) are not finite for {int(bad.sum())} samples "
                f"(e.g. indices {where}): before any sampling, so the probe inputs (NaN/Inf values?) or "
                "loss_fn are at fault, not SGLD")
        self._run.init_loss = losses.detach().to("cpu", torch.float64)
        return self._run.init_loss

    def _fold(self, losses: torch.Tensor) -> None:
        self._run.accumulator.update(losses, check_finite=False)
        self._snapshots.maybe_take(self._run.accumulator)

    def _observe_draw(self, chain: int, position: int, losses: torch.Tensor) -> None:
        """A folded draw into the health record's split-half moments (on the draws' device)."""
        run = self._run
        if run.health is None:
            run.health = HealthRecorder(self._num_samples, expected_draws=self._guard.record.expected_draws)
        run.health.update(chain, position, losses)

    def _mean_loss_at_w_star(self) -> Optional[float]:
        return None if self._run.init_loss is None else float(self._run.init_loss.mean())

    # -- state, for checkpoints ---------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything the callback holds about its run, as copies — derived from the declared
        state of the run (:class:`_Run`) and of its chains (:class:`ChainRecord`), plus the
        snapshots — and :meth:`arguments`, which :meth:`load_state_dict` checks."""
        return {"arguments": self.arguments(), **self._run.state_dict(), **self._guard.record.state_dict(),
                "snapshots": self._snapshots.state_dict(), "num_train": self.num_train}

    def load_state_dict(self, state: Dict[str, Any], model: Optional[nn.Module] = None) -> None:
        """Restore a :meth:`state_dict`. Its ``arguments`` must equal this callback's (the same
        probe, labels, rows, dtype, …): :class:`~devinterp_losskernel.provenance.IdentityMismatchError`
        lists every one that differs, saved and current value side by side."""
        diffs = [d for d in argument_differences(state["arguments"], self.arguments())
                 if not (d[0] == "num_train" and d[1] is None)]  # an unknown num_train is taken from the state
        if diffs:
            raise mismatch_error("load_state_dict: the state was made with other arguments", diffs,
                                 mine="saved", theirs="now")
        self._start_run()
        self._run = _Run.from_state_dict(state)
        self._guard.record = ChainRecord.from_state_dict(state)
        self._snapshots.load_state_dict(state.get("snapshots", []))
        if state["accumulator"] is not None:
            if model is None and self.storage.device is None:
                device = state["accumulator"]["m2"].device
            else:
                device = self.storage.device if self.storage.device is not None else _model_device(model)
            self._run.accumulator = KernelAccumulator(
                self._num_samples, device=device, dtype=self.storage.dtype, block_size=self.storage.block_size,
                rows=self.rows, mode=self.storage.mode, probe=self.probe_fingerprint,
                sampler=self._run.hyperparameters or None)
            self._run.accumulator.load_state_dict(state["accumulator"])
            held = self._guard.record.held
            for chain in held:
                held[chain] = [row.to(self._run.accumulator.device) for row in held[chain]]
        if self.num_train is None:
            self.num_train = state.get("num_train")

    # -- guard against devinterp 1.x multiprocessing ----------------------------------------
    def __getstate__(self):
        raise TypeError(
            "LossKernelCallback cannot be sent to worker processes: with devinterp's cores > 1 "
            "each worker would fold its draws into its own copy, which is lost when the worker "
            "exits, leaving a kernel of no draws. Use cores=1 (the probe forward passes already "
            "use all threads), or run chains in separate processes/GPUs with torch.distributed "
            "and merge the KernelAccumulators with KernelAccumulator.all_reduce()."
        )

    def __repr__(self) -> str:
        state = repr(self.accumulator) if self.accumulator is not None else "not started"
        return f"LossKernelCallback({state})"
