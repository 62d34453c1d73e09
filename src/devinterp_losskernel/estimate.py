"""One call: run devinterp's SGLD with the loss-kernel callback and return the kernel.

The LLC of the same run is carried in ``kernel.metadata`` (``llc/mean``, ``llc/std``,
``llc/per_chain``), so the kernel, its trace and the LLC all come from the same draws.

``mode="minibatch"`` (no probe: ``estimate_loss_kernel(model, train_loader, None,
mode="minibatch", ...)``) keeps no probe at all: ν and the per-sample loss variances of the whole
training set come from the losses of the SGLD minibatches themselves (every post-burn-in step),
beside devinterp's LLC of the same chains, at no extra forward pass. Its minibatches are drawn
uniformly with replacement from the loader's dataset (its own generator per chain), not in the
loader's epoch order: see :func:`~devinterp_losskernel.minibatch.loader_with_replacement`.
The probe modes take the same per-sample moments beside the probe kernel in the same run with
``train_variance=True`` (the caller's loader's own minibatches, so the chains and the probe
kernel are those of the run without it; :func:`train_kernel` returns the training set's kernel).

devinterp 1.x: each chain through its ``sample``. devinterp 2.x: each chain through its
``sample_single_chain`` (its loop, seeding, NaN handling and draw schedule: draws after steps
b, b+k, b+2k, …), for any data: the batches come from the caller's own DataLoader (its
collate_fn, sampler, workers), handed to devinterp's loop behind a one-item ``{"input_ids"}``
dataset, so that images, (x, y) tuples and dict batches are all fed as the caller built them.
Chains run one at a time, each seeded from ``seed`` alone, so a run can be checkpointed
after every chain (``checkpoint_dir=``) and resumed after being killed with the same result.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .callback import LossKernelCallback, devinterp_version
from .kernel import LossKernel
from .presets import SGLDSettings
from .probe import LossFn, _model_device, check_loss_fn, default_loss_fn, fingerprint_batches, move_to_device
from .progress import devinterp_bars, progress_bar
from .provenance import argument_differences, checksum, load_verified, mismatch_error, save_verified
from .rng import leaves_rng_untouched
from .summary import slt_summary, snapshot_convergence
from .validation import check_loss_scale, check_output_path, check_train_mode_noise, check_train_variance

__all__ = ["estimate_loss_kernel", "devinterp_major", "chain_seeds", "train_kernel"]

CHECKPOINT_NAME = "loss_kernel_checkpoint.pt"
MODES = ("full", "diagonal", "combined", "minibatch")


def devinterp_major() -> int:
    """The installed devinterp's major version (1 or 2)."""
    version = devinterp_version()
    if version is None:
        raise ImportError("devinterp is not installed: pip install 'devinterp>=1.3,<3'")
    return int(version.split(".")[0])


def chain_seeds(seed: int, num_chains: int) -> List[int]:
    """Per-chain seeds derived from one seed, as devinterp 1.x derives them."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(num_chains)]


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be available: got device={str(device)!r}, but torch.cuda.is_available() "
                         "is False here; use device='cpu' (or None: the model's device)")
    return device


@leaves_rng_untouched
def estimate_loss_kernel(
    model: nn.Module,
    loader: DataLoader,
    probe,
    sgld: Optional[SGLDSettings] = None,
    *,
    loss_fn: Optional[LossFn] = None,
    evaluate: Optional[Callable] = None,
    device: Union[str, torch.device, None] = None,
    probe_batch_size: int = 512,
    sample_ids: Optional[Sequence] = None,
    labels: Optional[Sequence] = None,
    dtype: torch.dtype = torch.float64,
    verbose: bool = True,
    checkpoint_dir: Union[str, Path, None] = None,
    probe_train_mask=None,
    callback_kwargs: Optional[Dict[str, Any]] = None,
    mode: str = "full",
    sampling_method=None,
    loss_scale: float = 1.0,
    allow_train_mode_noise: bool = False,
    train_variance: bool = False,
    **sgld_settings,
) -> LossKernel:
    """Sample C chains of SGLD around w* (``model``'s weights) and return the loss kernel.

    Args:
        model: the trained network at w*. It is not modified (the run works on a copy).
        loader: training data for the SGLD gradient (its batch size is the paper's m).
        probe: the n probe samples (DataLoader without shuffling, Dataset, tensors, dict);
            None for ``mode="minibatch"``.
        sgld: the :class:`~devinterp_losskernel.presets.SGLDSettings` of the run — C
            (``num_chains``), T (``num_draws`` per chain), b (``num_burnin_steps``), ε (``lr``),
            nβ (``nbeta``), γ (``localization``), ``num_steps_bw_draws`` and ``seed`` — e.g.
            ``preset("inception_imagenet").scaled(num_draws=100)``. Or pass those settings by
            name instead (``num_chains=4, num_draws=200, …``): they go into the same record,
            which validates them and is saved with the kernel.
        loss_fn: per-sample loss ``(model, batch) -> Tensor[batch_size]`` for the probe; by
            default cross-entropy / per-sequence LM loss.
        evaluate: devinterp ``evaluate(model, batch)`` for the SGLD minibatch loss; by default
            the mean of ``loss_fn`` over the batch.
        device: where to sample; default: the model's device.
        verbose: one progress bar over all draws of all chains (probe modes: the mean probe loss;
            ``mode="minibatch"``: the mean visits per training sample so far and ν after each
            finished chain). Written to a log, at most a line a minute (see
            :mod:`~devinterp_losskernel.progress`); ``LOSSKERNEL_PROGRESS=0`` hides it.
        The settings' ``seed`` seeds the chains (chain c gets ``chain_seeds(seed, C)[c]``);
            without one a seed is drawn at random and recorded in ``kernel.metadata["settings"]["seed"]``.
        checkpoint_dir: if given, the accumulator and progress are saved there after every
            chain; calling again with the same arguments resumes from the last finished chain.
        probe_train_mask: bool [n], which probe samples belong to ``loader``'s training set
            (default: all); the singular fluctuation uses those. ``False``: none (held-out probe).
        mode: ``"full"`` (the n×n kernel), ``"diagonal"`` (only each sample's mean and
            variance: O(n) memory, so the probe can be the whole training set — memorization
            scores and an exact, unextrapolated ν) or ``"combined"`` (with
            ``callback_kwargs=dict(rows=...)``: the full kernel on those rows, the variance of
            every sample, from one probe pass per draw). ``"minibatch"`` (``probe=None``): no
            probe and no extra forward pass — the mean and variance of every training sample's
            loss over the post-burn-in SGLD steps whose minibatch held it, from the sampler's own
            per-sample losses (``loss_fn``; the SGLD loss is their mean), a LossKernel of mode
            "minibatch" with ``visits`` [N] and, in ``metadata``, ν (``singular_fluctuation``,
            its jackknife ``singular_fluctuation_se`` over chains, ``unseen``: samples seen fewer
            than twice, whose variance is NaN) beside devinterp's LLC. Its minibatches are drawn
            with replacement (``loader``'s batch size, collate and workers; its sampler is not
            used): epoch-wise shuffling biased ν up in the repository's study. Not with
            ``evaluate``, ``checkpoint_dir``, ``callback_kwargs`` or ``probe_train_mask``.
        callback_kwargs: extra :class:`LossKernelCallback` arguments (``block_size``, ``rows``,
            ``autocast_dtype``, ``snapshot_every``, ``snapshot_rows``, …).
        sampling_method: devinterp's sampler: ``devinterp.optim.SGLD`` or (devinterp 2.x)
            ``devinterp.optim.SGMCMC.sgld``, called with ``lr``, ``nbeta``, ``localization``.
            Default: devinterp 1.x's ``SGLD``; devinterp 2.x's ``SGMCMC.sgld`` (its
            replacement for the deprecated ``SGLD``; the same steps to the last bit). Its name
            is recorded in ``metadata["settings"]["sampling_method"]``.
        loss_scale: s with ℓ = s · NLL + const: ν is divided by it (1 for a negative
            log-likelihood such as the default cross-entropy; 2σ² for an MSE loss with Gaussian
            noise of variance σ²), so that it is Watanabe's singular fluctuation. Recorded in
            ``metadata["loss_scale"]``.
        allow_train_mode_noise: ``mode="minibatch"`` or ``train_variance=True`` only. devinterp
            evaluates minibatches in train mode; a model with active dropout or BatchNorm is
            refused before sampling (its minibatch losses are not draws of ℓ(x; w)) unless this
            is True, which ``metadata`` records with what was found.
        train_variance: probe modes only (full, diagonal, combined). True: beside the probe
            kernel, the same run folds the SGLD minibatches' own per-sample losses (``loss_fn``;
            every post-burn-in step, no extra forward pass) into per-sample moments of the whole
            training set (``loader.dataset``), as ``mode="minibatch"`` does. The chains are the
            ones of the run without it, bit for bit (the probe kernel and devinterp's LLC are
            unchanged): the minibatches are the caller's ``loader``'s own (its sampler and
            generator; each batch only paired with its samples' indices), not the minibatch
            mode's draws with replacement — so an epoch-wise shuffling loader gets the minibatch
            mode's warning (ν biased up; build the loader with ``RandomSampler(dataset,
            replacement=True)`` for ν). ``metadata`` gains ``train_singular_fluctuation`` (ν of
            the training set), ``train_singular_fluctuation_se``, ``train_unseen`` and
            ``train_kernel``: the minibatch-mode kernel's fields, stored with the kernel (it
            survives ``save``/``load`` and ``to_xarray``/``from_xarray``);
            :func:`train_kernel` rebuilds it as a LossKernel of mode "minibatch". A chain the
            probe kernel leaves out (diverged) is left out of it whole. Not with ``evaluate``
            (the SGLD loss must be the mean of ``loss_fn``) or ``checkpoint_dir``.

    Returns:
        The :class:`LossKernel`, with ``init_loss`` = ℓ(x; w*) and ``metadata`` holding the
        SGLD settings and, from the same draws: ``llc/per_chain`` = nβ (E_t[L_m(w_{c,t})]
        − L_m(w*)) with L_m devinterp's minibatch loss, ``llc/mean`` and ``llc/std`` over
        chains; ``probe_llc`` (the paired LLC from the probe losses); ``singular_fluctuation``
        ν = βV/2 and ``empirical_variance`` V (β = nβ/n; see
        :func:`~devinterp_losskernel.analysis.singular_fluctuation`). With
        ``callback_kwargs=dict(snapshot_every=t)``: ``cka_convergence`` = [(draws, CKA(K̂_t,
        K̂))] on the samples ``snapshot_indices`` (paper, Fig. 6A).

    A chain that diverges (devinterp raises on a NaN minibatch loss, a probe loss turns
    non-finite, or the mean probe loss rises far above the loss at w*: the callback's
    ``divergence_tolerance``) is cut off: its last ``divergence_window`` draws before the
    divergence (the blow-up) and all later ones are left out of the kernel, its earlier draws
    are kept, its LLC is left out of ``llc/mean``. It is reported by a warning and in
    ``kernel.rejected_per_chain`` / ``metadata["diverged_chains"]``. Both settings can be
    changed through ``callback_kwargs``.
    """
    # every argument is checked before anything is sampled
    loss_scale = check_loss_scale(loss_scale)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    train_variance = check_train_variance(train_variance, mode, evaluate=evaluate, checkpoint_dir=checkpoint_dir,
                                          loader=loader if isinstance(loader, DataLoader) else None)
    if mode == "minibatch":
        return _estimate_minibatch(model, loader, probe, sgld, sgld_settings, loss_fn=loss_fn, evaluate=evaluate,
                                   device=device, sample_ids=sample_ids, labels=labels, dtype=dtype,
                                   checkpoint_dir=checkpoint_dir, probe_train_mask=probe_train_mask,
                                   callback_kwargs=callback_kwargs, sampling_method=sampling_method,
                                   loss_scale=loss_scale, allow_train_mode_noise=allow_train_mode_noise,
                                   verbose=verbose)
    if probe is None:
        raise ValueError(f"probe must be given for mode={mode!r} (the samples whose losses are evaluated at every "
                         "draw); for ν and per-sample variances of the training set from the SGLD minibatches "
                         "themselves, with no probe, use mode='minibatch'")
    if allow_train_mode_noise is not False and not train_variance:
        raise ValueError("allow_train_mode_noise is for mode='minibatch' only (or train_variance=True): the probe "
                         "modes evaluate the probe in eval mode")
    sgld = _sgld_record(sgld, sgld_settings, loader)
    num_chains, num_draws = sgld.num_chains, sgld.num_draws
    if not isinstance(loader, DataLoader):
        raise TypeError(f"loader must be a torch DataLoader, got {type(loader).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_loss_fn(loss_fn)
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate must be callable (model, batch) -> loss, got {evaluate!r}")
    if sampling_method is not None and not callable(sampling_method):
        raise TypeError(f"sampling_method must be devinterp's SGLD or SGMCMC.sgld (a callable), "
                        f"got {sampling_method!r}")
    noise = check_train_mode_noise(model, allow_train_mode_noise, where="estimate_loss_kernel(train_variance=True)") \
        if train_variance else []
    major = devinterp_major()
    sampling_method = _default_sampling_method(major) if sampling_method is None else sampling_method
    device = _check_device(device) if device is not None else _model_device(model)
    # Work on a copy: devinterp evaluates the model in train mode, which would update the
    # caller's BatchNorm running statistics.
    model = copy.deepcopy(model).to(device)
    per_sample = loss_fn or default_loss_fn
    if evaluate is None:
        def evaluate(model, batch):
            return per_sample(model, batch).mean()

    taken = sorted(set(callback_kwargs or {}) & _SET_HERE)
    if taken:
        raise ValueError(f"callback_kwargs must not hold {taken}: estimate_loss_kernel sets them itself "
                         "(pass them as its own arguments)")
    callback = LossKernelCallback(
        probe, loss_fn, dtype=dtype, batch_size=probe_batch_size,
        sample_ids=sample_ids, labels=labels, num_train=len(loader.dataset),
        probe_train_mask=probe_train_mask,
        total_draws=num_chains * num_draws if verbose else None,
        **{"mode": mode, **(callback_kwargs or {})},
    )  # passes over the probe twice and checks labels, rows, … against it
    callback.set_reference(model)  # ℓ(x; w*): loss_fn checked before the sampler touches anything
    checkpoint = _Checkpoint(checkpoint_dir, sgld, callback, devinterp_major=major) if checkpoint_dir else None
    if sgld.seed is None:  # seed=None resumes with the checkpoint's seed, else draws one
        saved = checkpoint.saved_seed() if checkpoint is not None else None
        sgld = replace(sgld, seed=int(np.random.SeedSequence().entropy % 2**32) if saved is None else saved)
    if checkpoint is not None:
        checkpoint.sgld = sgld  # the seed actually used is what the checkpoint records
    settings = dict(sgld.to_dict(), num_train=len(loader.dataset), sampling_method=_method_name(sampling_method),
                    sampling_method_callable=sampling_method)  # the callable is popped before it is reported
    init_loss = _minibatch_init_loss(model, loader, evaluate, settings, device)
    if checkpoint is not None:  # what else the run depends on: w*, loss_fn, evaluate, the data
        checkpoint.run_identity = {  # keys say what differs in plain words when a resume is refused
            "model weights at w*": checksum({k: v for k, v in model.state_dict().items()})[:16],
            "probe losses at w* (model, probe, loss_fn)": checksum(callback.init_loss)[:16],
            "minibatch loss at w* (model, training data, evaluate)": init_loss,
            "training data": _data_fingerprint(loader),
        }
    train = None
    if train_variance:  # the training set's minibatch moments, from the same chains (issue 19)
        from .minibatch import indexed_loader, sampler_kind, warn_shuffling

        recorder, train_evaluate = _minibatch_recorder(major, len(loader.dataset), per_sample, sgld, loss_scale,
                                                       allow_train_mode_noise, noise)
        recorder.sampler_kind, with_replacement = sampler_kind(loader)
        if not with_replacement:  # said once, before sampling, in both majors
            warn_shuffling("estimate_loss_kernel(train_variance=True)", recorder.sampler_kind)
        train = _TrainVariance(recorder, indexed_loader(loader), train_evaluate)
    callback.allocate(model)  # before any checkpoint is restored into it
    progress = checkpoint.load(model) if checkpoint else _Progress()
    if checkpoint is None or not checkpoint.finished(progress, num_chains):
        with _quiet_devinterp(), devinterp_bars(show=False):  # our one bar (verbose) covers all chains, as under 1.x
            _run_chains(model, loader, callback, evaluate, settings, device, init_loss, progress, checkpoint, major,
                        train=train)
    settings.pop("sampling_method_callable")
    callback.finalize()
    callback.extra_metadata["loss_scale"] = loss_scale  # singular_fluctuation (in slt_summary) reads it here
    callback.extra_metadata.update({"settings": settings, "sgld": sgld.to_dict(),
                                    "diverged_chains": progress.diverged,
                                    "llc/init_loss": init_loss, **_llc_summary(progress, num_chains)})
    kernel = callback.kernel
    kernel.metadata.update(slt_summary(callback, kernel))  # probe_llc, singular_fluctuation, …
    if callback.snapshots:
        kernel.metadata["cka_convergence"] = snapshot_convergence(callback)
        kernel.metadata["snapshot_indices"] = callback.snapshot_indices.tolist()
    if train is not None:
        kernel.metadata.update(_train_metadata(train.recorder, settings, sgld, progress, init_loss, loader))
    return kernel


class _TrainVariance:
    """``train_variance=True``: the recorder, the caller's loader with each batch's indices, and
    the evaluate that records (the mean of ``loss_fn``, as the run without it)."""

    def __init__(self, recorder, loader: DataLoader, evaluate: Callable):
        self.recorder, self.loader, self.evaluate = recorder, loader, evaluate


def _minibatch_recorder(major: int, num_train: int, per_sample: LossFn, sgld: SGLDSettings, loss_scale: float,
                        allow_train_mode_noise: bool, noise: List[str]):
    """The minibatch moments' recorder for this devinterp major, and the SGLD evaluate that feeds
    it: ``(indices, batch) -> mean of per_sample(batch)`` (devinterp 1: ``MinibatchVariance``,
    also the draw callback; devinterp 2: ``StepRecorder``, fed by devinterp's micro_callback)."""
    from .minibatch import MinibatchVariance, StepRecorder

    if major == 1:
        recorder = MinibatchVariance(num_train, per_sample, loss_scale=loss_scale,
                                     allow_train_mode_noise=allow_train_mode_noise)
        evaluate = recorder.evaluate
    else:
        recorder = StepRecorder(num_train, num_burnin_steps=sgld.num_burnin_steps, nbeta=sgld.nbeta,
                                loss_scale=loss_scale, allow_train_mode_noise=allow_train_mode_noise)

        def evaluate(model, batch):
            indices, inner = batch
            recorder._check_model(model)
            losses = per_sample(model, inner)
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (len(indices),):
                got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(f"loss_fn must return per-sample losses [{len(indices)}], got {got}")
            recorder.keep(indices, losses)
            return losses.mean()
    recorder.nbeta = float(sgld.nbeta)
    recorder.hyperparameters = {"lr": float(sgld.lr), "nbeta": float(sgld.nbeta),
                                "localization": float(sgld.localization)}
    recorder.train_mode_noise = list(noise)
    return recorder, evaluate


_KERNEL_FIELDS = ("mean", "variance", "visits", "num_draws", "draws_per_chain", "metadata")


def _train_metadata(recorder, settings, sgld, progress, init_loss, loader) -> Dict[str, Any]:
    """What ``train_variance=True`` adds to the probe kernel's metadata."""
    if not recorder.steps_per_chain:  # every chain was left out: the probe kernel said why
        return {"train_singular_fluctuation": float("nan"), "train_singular_fluctuation_se": float("nan"),
                "train_unseen": recorder.num_train, "train_kernel": None}
    kernel = recorder.kernel
    kernel.metadata.update({
        "settings": {**{k: v for k, v in settings.items() if k != "sampling_method_callable"},
                     "minibatch_sampler": f"the caller's loader ({recorder.sampler_kind}), batches of "
                                          f"{loader.batch_size}: the probe kernel's chains"},
        "sgld": sgld.to_dict(), "diverged_chains": list(progress.diverged), "llc/init_loss": init_loss,
        **_llc_summary(progress, sgld.num_chains)})
    return {"train_singular_fluctuation": kernel.metadata["singular_fluctuation"],
            "train_singular_fluctuation_se": kernel.metadata["singular_fluctuation_se"],
            "train_unseen": kernel.metadata["unseen"], "train_minibatch_sampler": recorder.sampler_kind,
            "train_kernel": {name: getattr(kernel, name) for name in _KERNEL_FIELDS}}


def train_kernel(kernel: LossKernel) -> LossKernel:
    """The training set's minibatch-mode LossKernel of a probe kernel made with
    ``estimate_loss_kernel(..., train_variance=True)`` (also after ``save``/``load`` or
    ``to_xarray``/``from_xarray``): per-sample ``mean``, ``variance`` (NaN where seen fewer than
    twice) and ``visits`` of every sample of the training loader's dataset, ν in its metadata."""
    if not isinstance(kernel, LossKernel):
        raise TypeError(f"kernel must be a LossKernel, got {type(kernel).__name__}")
    fields_ = kernel.metadata.get("train_kernel", "absent")
    if fields_ == "absent":
        raise ValueError("kernel has no training-set minibatch variances: make it with "
                         "estimate_loss_kernel(..., train_variance=True)")
    if fields_ is None:
        raise ValueError("kernel's run kept no training-set minibatch losses: every chain was left out "
                         f"(diverged chains {kernel.metadata.get('diverged_chains')})")
    values = dict(fields_)
    values["draws_per_chain"] = {int(c): int(v) for c, v in values["draws_per_chain"].items()}
    return LossKernel(covariance=None, **values)


_NOT_IN_MINIBATCH_MODE = {
    "evaluate": "the SGLD loss is the mean of loss_fn's per-sample losses, which are the ones recorded (pass loss_fn)",
    "checkpoint_dir": "a minibatch-mode run is not checkpointed (its state is O(N): rerun it)",
    "callback_kwargs": "there is no probe callback",
    "probe_train_mask": "there is no probe: every training sample of the loader's dataset is recorded",
}


def _estimate_minibatch(model, loader, probe, sgld, sgld_settings, *, loss_fn, evaluate, device, sample_ids, labels,
                        dtype, checkpoint_dir, probe_train_mask, callback_kwargs, sampling_method, loss_scale,
                        allow_train_mode_noise, verbose) -> LossKernel:
    """``estimate_loss_kernel(model, loader, None, mode="minibatch", ...)``: ν and the per-sample loss
    variances of the whole training set from the SGLD minibatches' own losses, beside devinterp's
    LLC. Every argument is checked before sampling."""
    from .kernel import as_labels
    from .minibatch import loader_with_replacement

    where = "estimate_loss_kernel(mode='minibatch')"
    if probe is not None:
        raise ValueError(f"probe must be None for mode='minibatch' (the training set's own minibatch losses are "
                         f"recorded, no probe is evaluated), got a {type(probe).__name__}; for a probe use "
                         "mode='diagonal' (exact per-sample values, a held-out probe) or mode='full' (the kernel)")
    given = {"evaluate": evaluate, "checkpoint_dir": checkpoint_dir, "callback_kwargs": callback_kwargs,
             "probe_train_mask": probe_train_mask}
    for name, value in given.items():
        if value is not None:
            raise ValueError(f"{name} is not used with mode='minibatch': {_NOT_IN_MINIBATCH_MODE[name]}")
    if dtype != torch.float64:
        raise ValueError(f"dtype must be torch.float64 with mode='minibatch' (its per-sample moments are float64), "
                         f"got {dtype}")
    if not isinstance(loader, DataLoader):
        raise TypeError(f"loader must be a torch DataLoader, got {type(loader).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"loader.dataset must be a map-style dataset (len() and [i]) with mode='minibatch': each "
                        f"sample is recorded under its index; got {type(dataset).__name__}")
    num_train = len(dataset)
    if num_train < 2:
        raise ValueError(f"loader.dataset must hold at least 2 samples, got {num_train}")
    if loader.batch_size is None:
        raise ValueError("loader must have a batch_size with mode='minibatch' (it draws its own minibatches of that "
                         "size, with replacement); a loader built with batch_sampler= has none")
    sgld = _sgld_record(sgld, sgld_settings, loader)
    check_loss_fn(loss_fn)
    if sampling_method is not None and not callable(sampling_method):
        raise TypeError(f"sampling_method must be devinterp's SGLD or SGMCMC.sgld (a callable), "
                        f"got {sampling_method!r}")
    noise = check_train_mode_noise(model, allow_train_mode_noise, where=where)
    labels = None if labels is None else as_labels(labels, num_train, "labels")
    if sample_ids is not None and len(sample_ids) != num_train:
        raise ValueError(f"sample_ids must have one entry per training sample: length {num_train}, "
                         f"got {len(sample_ids)}")
    major = devinterp_major()
    sampling_method = _default_sampling_method(major) if sampling_method is None else sampling_method
    device = _check_device(device) if device is not None else _model_device(model)
    model = copy.deepcopy(model).to(device)  # devinterp's train-mode passes leave the caller's model alone
    per_sample = loss_fn or default_loss_fn
    if sgld.seed is None:
        sgld = replace(sgld, seed=int(np.random.SeedSequence().entropy % 2**32))
    settings = dict(sgld.to_dict(), num_train=num_train, sampling_method=_method_name(sampling_method),
                    sampling_method_callable=sampling_method)

    def mean_loss(model, batch):
        losses = per_sample(model, batch)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return the per-sample losses [batch_size] with mode='minibatch', got {got}")
        return losses.mean()

    init_loss = _minibatch_init_loss(model, loader, mean_loss, settings, device)  # checks loss_fn before sampling
    recorder, evaluate = _minibatch_recorder(major, num_train, per_sample, sgld, loss_scale, allow_train_mode_noise,
                                             noise)

    progress = _Progress()
    loader_seeds = [int(v) for v in np.random.SeedSequence([int(settings["seed"]), 19]).generate_state(
        sgld.num_chains)]  # the minibatch order's own generators, apart from devinterp's seeds
    bar = _MinibatchBar(recorder, sgld.num_chains * sgld.num_draws) if verbose else None
    with _quiet_devinterp(), devinterp_bars(show=False), (bar or contextlib.nullcontext()):
        for chain, seed in enumerate(chain_seeds(settings["seed"], sgld.num_chains)):
            chain_loader = loader_with_replacement(loader, loader_seeds[chain])
            tick = bar.ticker(chain) if bar is not None else _ignore
            try:
                if major == 1:
                    mean = _run_chain_devinterp1(model, chain_loader, _ChainLabel(recorder, chain), evaluate,
                                                 settings, device, seed, init_loss, extra_callbacks=[tick])
                else:
                    mean = _run_chain_devinterp2(model, chain_loader, _ChainLabel(tick, chain), evaluate, settings,
                                                 device, seed, init_loss, micro_callback=_ChainLabel(recorder, chain))
            except RuntimeError as error:
                if "NaN" not in str(error):
                    raise
                recorder._forget_chain(chain)
                message = re.sub(r"\b([Cc]hain) 0\b", rf"\g<1> {chain}", str(error))
                warnings.warn(f"{where}: chain {chain} is left out (devinterp stopped it: {message})",
                              RuntimeWarning, stacklevel=3)
                progress.llc_per_chain[chain], progress.diverged = None, progress.diverged + [chain]
            else:
                progress.llc_per_chain[chain] = settings["nbeta"] * (mean - init_loss)
            if bar is not None:
                bar.end_chain(chain)
            warnings.filterwarnings("ignore", module=r"devinterp(\.|$)")  # said once is enough
    settings.pop("sampling_method_callable")
    if not recorder.steps_per_chain:
        raise RuntimeError(f"{where}: every chain diverged ({progress.diverged}); no minibatch losses were kept. "
                           "Lower lr or raise localization")
    kernel = recorder.kernel
    settings["minibatch_sampler"] = ("the package's own: uniform with replacement from loader.dataset, batches of "
                                     f"{loader.batch_size}, one generator per chain")
    kernel.metadata.update({"settings": settings, "sgld": sgld.to_dict(), "diverged_chains": progress.diverged,
                            "llc/init_loss": init_loss, **_llc_summary(progress, sgld.num_chains)})
    return replace(kernel, labels=labels, sample_ids=sample_ids)


def _ignore(**_kwargs) -> None:
    """A callback that does nothing (the chain label records the minibatch losses)."""


class _MinibatchBar:
    """The minibatch mode's progress bar (``verbose``): one bar over every draw of every chain, as
    the probe modes show (:func:`~devinterp_losskernel.progress.progress_bar`), with the chain,
    the mean visits per training sample so far and ν after each finished chain. Reads counters
    only: folds nothing mid-chain (ν after a chain folds that chain's buffer, as the end of the
    run would: the same numbers whether the bar is shown or not)."""

    def __init__(self, recorder, total: int):
        self.recorder, self.total, self.nu = recorder, total, None
        self.bar = None

    def __enter__(self):
        self.bar = progress_bar(self.total, "minibatch variance draws")  # quiet in a log file
        return self

    def __exit__(self, *exc):
        self.bar.close()
        return False

    def ticker(self, chain: int) -> Callable:
        def tick(**_kwargs):
            self.bar.update(1)
            postfix = {"chain": chain, "visits": f"{self.recorder.recorded / self.recorder.num_train:.3g}"}
            if self.nu is not None:
                postfix["nu"] = f"{self.nu:.4g}"
            self.bar.set_postfix(postfix, refresh=False)
        return tick

    def end_chain(self, chain: int) -> None:
        if chain in self.recorder.chains or chain in self.recorder._buffer:
            self.nu = self.recorder.singular_fluctuation()
            self.bar.set_postfix({"chain": chain, "visits": f"{self.recorder.recorded / self.recorder.num_train:.3g}",
                                  "nu": f"{self.nu:.4g}"})


def _sgld_record(sgld: Optional[SGLDSettings], by_name: Dict[str, Any], loader) -> SGLDSettings:
    """The run's one SGLD record: ``sgld`` as given, or built from the settings passed by name."""
    if sgld is not None and not isinstance(sgld, SGLDSettings):
        raise TypeError(f"sgld must be an SGLDSettings (e.g. preset('inception_imagenet')), got {type(sgld).__name__}")
    if sgld is not None and by_name:
        raise TypeError(f"pass the SGLD settings either as sgld=SGLDSettings(...) or by name, not both "
                        f"(got sgld= and {sorted(by_name)})")
    batch_size = getattr(loader, "batch_size", None)
    if sgld is not None:
        if sgld.localization is None:
            raise ValueError(f"sgld.localization must be set: this preset varies it ({sgld.source}); "
                             "use sgld.scaled(localization=...)")
        return sgld.scaled(batch_size=batch_size)
    names = {f.name for f in fields(SGLDSettings)} - {"batch_size", "source"}
    unknown = sorted(set(by_name) - names)
    if unknown:
        raise TypeError(f"estimate_loss_kernel got unexpected keyword arguments {unknown}; the SGLD settings "
                        f"it takes by name are {sorted(names)}")
    missing = sorted({"num_chains", "num_draws", "num_burnin_steps", "lr", "nbeta", "localization"} - set(by_name))
    if missing:
        raise TypeError(f"estimate_loss_kernel needs the SGLD settings {missing} "
                        "(by name, or as sgld=SGLDSettings(...))")
    return SGLDSettings(batch_size=batch_size, **by_name)


@contextlib.contextmanager
def _quiet_devinterp():
    """Drop devinterp's warnings about things this function sets consistently (its own nbeta,
    seeds, SGLD). The rest it repeats on every call, i.e. per chain: _run_chains silences
    them after the first chain."""
    with warnings.catch_warnings():
        for message in (r"SGLD has been deprecated", r"You are using seeded runs",
                        r"If you're setting a nbeta or temperature", r"Using passed in nbeta"):
            warnings.filterwarnings("ignore", message=message)
        yield


def _run_chains(model, loader, callback, evaluate, settings, device, init_loss, progress, checkpoint, major,
                train: Optional[_TrainVariance] = None):
    """Run the chains not yet in ``progress``, one at a time, checkpointing after each. With
    ``train``: its loader (the same batches, with their indices) and evaluate (the same loss,
    recorded), its recorder beside the callback."""
    run_chain = _run_chain_devinterp1 if major == 1 else _run_chain_devinterp2
    seeds = chain_seeds(settings["seed"], settings["num_chains"])
    if train is not None:
        loader, evaluate = train.loader, train.evaluate
    for chain in range(settings["num_chains"]):
        if chain in progress.llc_per_chain:
            continue
        extra = {}
        if train is not None:
            extra = {"extra_callbacks": [_ChainLabel(train.recorder, chain)]} if major == 1 else \
                {"micro_callback": _ChainLabel(train.recorder, chain)}
        try:
            mean_loss = run_chain(model, loader, _ChainLabel(callback, chain), evaluate, settings,
                                  device, seeds[chain], init_loss, **extra)
        except RuntimeError as error:
            if "NaN" not in str(error):
                raise
            # devinterp numbers the chains of each single-chain call from 0: name ours
            message = re.sub(r"\b([Cc]hain) 0\b", rf"\g<1> {chain}", str(error))
            callback.mark_diverged(chain, f"devinterp stopped it: {message}", stacklevel=4)
        if chain in callback.diverged_chains:
            progress.llc_per_chain[chain] = None  # the minibatch losses blew up with the probe's
            progress.diverged.append(chain)
            if train is not None:  # the training set's moments keep the probe kernel's chains
                train.recorder._forget_chain(chain)
        else:
            callback.end_chain(chain)
            progress.llc_per_chain[chain] = settings["nbeta"] * (mean_loss - init_loss)
        if checkpoint:
            checkpoint.save(progress)
        warnings.filterwarnings("ignore", module=r"devinterp(\.|$)")  # said once is enough


class _ChainLabel:
    """Forwards devinterp's callback calls with the global chain index (devinterp numbers
    the chains of each single-chain call from 0)."""

    def __init__(self, callback: LossKernelCallback, chain: int):
        self.callback, self.chain = callback, chain
        self.minibatch_losses: List[float] = []

    def __call__(self, **kwargs):
        loss = kwargs.get("loss")
        if isinstance(loss, torch.Tensor):
            self.minibatch_losses.append(float(loss.detach().float().mean()))
        kwargs["chain"] = self.chain
        self.callback(**kwargs)


class _Progress:
    def __init__(self, llc_per_chain=None, diverged=None):
        self.llc_per_chain: Dict[int, Optional[float]] = dict(llc_per_chain or {})
        self.diverged: List[int] = list(diverged or [])


CHECKPOINT_FORMAT = "devinterp_losskernel.Checkpoint"
# 2: arguments, the callback state and progress, with a checksum. Format 1 (before 0.1.0) cannot be resumed.
CHECKPOINT_FORMAT_VERSION = 2
# Which SGLD steps are draws, per devinterp major (b burn-in steps, k = num_steps_bw_draws, steps
# counted from 1). A checkpoint records it: one written when 2.x runs drew on 1.x's schedule (before
# they went through devinterp 2's own loop) has none and is refused instead of mixing the schedules.
DRAW_SCHEDULES = {1: "devinterp 1.x sampler: a draw after SGLD steps b+k, b+2k, ...",
                  2: "devinterp 2.x sample_single_chain: a draw after SGLD steps b+1, b+1+k, b+1+2k, ..."}


class _Checkpoint:
    """Everything needed to finish or re-report a run, in ``<dir>/loss_kernel_checkpoint.pt``:
    the run's arguments (SGLD settings with the seed actually used, the callback's probe
    fingerprint, labels, rows, dtype, …), the callback's whole state and the per-chain LLC
    progress; written atomically with a checksum after each chain. A resume with other
    arguments is refused with every difference listed; a damaged file is refused by name."""

    def __init__(self, directory, sgld: SGLDSettings, callback: LossKernelCallback, *, devinterp_major: int):
        self.path = Path(directory) / CHECKPOINT_NAME
        self.callback = callback
        self.sgld = sgld
        self.devinterp_major = devinterp_major
        # a folder we cannot make (a file there, or a file where a parent folder should be) fails now,
        # naming checkpoint_dir, not after a chain
        check_output_path(directory, "checkpoint_dir", expect="folder", make_parents=True).mkdir(exist_ok=True)
        self.run_identity: Dict[str, Any] = {}
        self._saved = load_verified(self.path, kind=CHECKPOINT_FORMAT, versions=(CHECKPOINT_FORMAT_VERSION,
                                    CHECKPOINT_FORMAT_VERSION)) if self.path.exists() else None

    def arguments(self) -> Dict[str, Any]:
        return {"sgld": {k: v for k, v in self.sgld.to_dict().items() if k != "source"},
                "callback": self.callback.arguments(), "devinterp_major": self.devinterp_major,
                "draw_schedule": DRAW_SCHEDULES[self.devinterp_major],
                "run": dict(self.run_identity)}

    def saved_seed(self) -> Optional[int]:
        """The seed of the run in the checkpoint, or None (no checkpoint yet)."""
        return None if self._saved is None else self._saved["arguments"]["sgld"]["seed"]

    def load(self, model) -> _Progress:
        if self._saved is None:
            return _Progress()
        diffs = argument_differences(self._saved["arguments"], self.arguments())
        if diffs:
            raise mismatch_error(
                f"checkpoint_dir holds a run with other settings ({self.path})", diffs, mine="checkpoint",
                theirs="now", advice="Resume with the same arguments (seed included), pass another "
                f"checkpoint_dir, or delete {self.path} to start over.")
        self.callback.load_state_dict(self._saved["callback"], model)
        progress = self._saved["progress"]
        return _Progress(progress["llc_per_chain"], progress["diverged"])

    @staticmethod
    def finished(progress: _Progress, num_chains: int) -> bool:
        return all(c in progress.llc_per_chain for c in range(num_chains))

    def save(self, progress: _Progress) -> None:
        save_verified({
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "arguments": self.arguments(),
            "callback": self.callback.state_dict(),
            "progress": {"llc_per_chain": dict(progress.llc_per_chain), "diverged": list(progress.diverged)},
        }, self.path)


def _llc_summary(progress: _Progress, num_chains: int) -> Dict[str, Any]:
    per_chain = [progress.llc_per_chain.get(c) for c in range(num_chains)]
    finite = np.array([v for v in per_chain if v is not None], dtype=float)
    return {
        "llc/mean": float(finite.mean()) if finite.size else None,
        # over chains, unbiased, as devinterp's LLCEstimator reports it
        "llc/std": float(finite.std(ddof=1)) if finite.size > 1 else None,
        "llc/per_chain": per_chain,
    }


def _loss_of(result) -> torch.Tensor:
    """The loss in whatever an ``evaluate`` returns: a tensor, (loss, …), {"loss": …}, .loss."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)):
        return result[0]
    if isinstance(result, Mapping):
        return result["loss"]
    if hasattr(result, "loss"):
        return result.loss
    raise TypeError(f"evaluate must return a loss tensor, (loss, ...), or {{'loss': ...}}, got {type(result).__name__}")


_SET_HERE = {"loss_fn", "dtype", "batch_size", "sample_ids", "labels", "num_train", "probe_train_mask",
             "total_draws", "num_draws"}


def _data_fingerprint(loader: DataLoader, samples: int = 256) -> Optional[str]:
    """A cheap fingerprint of the training data: its size and up to ``samples`` evenly spaced
    items, collated as the loader does (None where the dataset cannot be indexed)."""
    dataset = loader.dataset
    try:
        n = len(dataset)
        picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(samples, n))})
        batch = (loader.collate_fn or torch.utils.data.default_collate)([dataset[i] for i in picks])
        return f"{n}:" + fingerprint_batches([batch])[1][:16]
    except Exception:  # an iterable dataset, a collate_fn that needs more: size only
        return None


def _minibatch_init_loss(model, loader, evaluate, s, device) -> float:
    """L_m(w*): the SGLD minibatch loss at w*, averaged over ``num_chains`` batches, as
    devinterp does, but reproducible (seeded batch order) and on a copy of the model, so
    that train-mode BatchNorm statistics of the model the chains start from are untouched."""
    work = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(s["seed"]))
        losses = []
        for _, batch in zip(range(s["num_chains"]), loader):
            loss = _loss_of(evaluate(work, move_to_device(batch, device)))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"evaluate must return the minibatch loss as a scalar (the mean over the "
                                 f"batch), got {got}; SGLD differentiates it")
            losses.append(float(loss))
    if not np.all(np.isfinite(losses)):
        raise ValueError(f"evaluate gives a non-finite minibatch loss at w* (the trained model) before any "
                         f"sampling: {losses}; check the training data and evaluate")
    return float(np.mean(losses))


def _run_chain_devinterp1(model, loader, callback, evaluate, s, device, seed, init_loss, extra_callbacks=()) -> float:
    """One chain through devinterp 1.x's sampler, with devinterp's own LLCEstimator beside
    our callback; returns the chain's mean minibatch loss over draws (devinterp's numbers)."""
    from devinterp.slt.llc import LLCEstimator
    from devinterp.slt.sampler import sample

    llc = LLCEstimator(1, s["num_draws"], init_loss=torch.tensor(init_loss), nbeta=s["nbeta"])
    with warnings.catch_warnings():
        # one chain per call: devinterp's std over chains is undefined; we report our own
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom")
        sample(
            model, loader, callbacks=[llc, callback, *extra_callbacks], evaluate=evaluate,
            optimizer_kwargs=dict(lr=s["lr"], nbeta=s["nbeta"], localization=s["localization"]),
            num_draws=s["num_draws"], num_chains=1, num_burnin_steps=s["num_burnin_steps"],
            num_steps_bw_draws=s["num_steps_bw_draws"], seed=[seed], device=device,
            verbose=False, cores=1, init_loss=init_loss if init_loss else 1e-30,
            sampling_method=s["sampling_method_callable"],
        )
    return float(llc.losses.double().mean())


def _mean_minibatch_loss(callback: _ChainLabel) -> float:
    losses = np.asarray(callback.minibatch_losses, dtype=float)
    if losses.size == 0 or not np.all(np.isfinite(losses)):
        raise RuntimeError(f"NaN detected in the SGLD minibatch loss of chain {callback.chain}")
    return float(losses.mean())


def _default_sampling_method(major: int):
    """devinterp's SGLD: ``SGLD`` under 1.x, ``SGMCMC.sgld`` (SGLD's replacement) under 2.x."""
    if major == 1:
        from devinterp.optim.sgld import SGLD

        return SGLD
    from devinterp.optim import SGMCMC

    return SGMCMC.sgld


def _method_name(method) -> str:
    return getattr(method, "__qualname__", None) or getattr(method, "__name__", None) or repr(method)


class _OneTick(torch.utils.data.Dataset):
    """What devinterp 2.x's ``sample_single_chain`` iterates: one ``{"input_ids"}`` item, so
    its loop runs unchanged while the real batches come from the caller's loader
    (:class:`_LoaderFeed`)."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return {"input_ids": torch.zeros(1, dtype=torch.long)}


class _LoaderFeed:
    """The caller's DataLoader as an endless feed, reshuffled each pass (its sampler draws
    from the global RNG, which devinterp seeds per chain), each batch moved to ``device``."""

    def __init__(self, loader: DataLoader, device):
        self.loader, self.device, self._it = loader, device, None

    def next(self):
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return move_to_device(next(self._it), self.device)
            except StopIteration:
                self._it = None
        raise ValueError("the training loader yields no batches")


def _run_chain_devinterp2(model, loader, callback, evaluate, s, device, seed, init_loss, micro_callback=None) -> float:
    """One chain through devinterp 2.x's ``sample_single_chain``, for any data: devinterp's
    loop, seeding, sampler and draw schedule; the batches from the caller's ``loader`` (its
    collate_fn and sampler kept); returns the chain's mean minibatch loss over draws."""
    from devinterp.slt.sampler import sample_single_chain

    feed = _LoaderFeed(loader, device)
    inner_callback = callback
    model, unwrap = _not_transformer_lens(model)
    if unwrap is not None:  # devinterp sees the wrapper; evaluate and the callbacks see the user's model
        def callback(**kwargs):
            inner_callback(**{**kwargs, "model": unwrap(kwargs["model"])})

    def evaluate2(model, _tick):
        return _loss_of(evaluate(model if unwrap is None else unwrap(model), feed.next())), {}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample_single_chain(
            model, _OneTick(), evaluate2,
            param_masks={name: None for name, _ in model.named_parameters()},
            num_draws=s["num_draws"], num_burnin_steps=s["num_burnin_steps"],
            num_steps_bw_draws=s["num_steps_bw_draws"], sampling_method=s["sampling_method_callable"],
            sampling_method_kwargs=dict(lr=s["lr"], nbeta=s["nbeta"], localization=s["localization"]),
            chain=0, seed=seed, dataloader_seed=seed + 1, device=str(device),
            callbacks=[callback], batch_size=1, shuffle=False, micro_callback=micro_callback,
        )
    for w in caught:  # devinterp 2.x turns a NaN chain into a warning; re-raise it as ours
        if "Chain failed" in str(w.message):
            raise RuntimeError(f"NaN/Inf: {w.message}")
        if not issubclass(w.category, DeprecationWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return _mean_minibatch_loss(inner_callback)


class _Plain(nn.Module):
    """The user's model under a module without a ``cfg``: devinterp 2.x takes any model whose
    ``model.cfg.n_heads`` exists for a TransformerLens one and calls
    ``model.to(device, print_details=False)``, which a plain ``nn.Module`` refuses. Its only
    state is the user's model (parameters named ``model.…``); it changes nothing of it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _not_transformer_lens(model: nn.Module):
    """(model, None), or (:class:`_Plain` (model), unwrap) when devinterp 2.x would take
    ``model`` for a TransformerLens model (its ``is_transformer_lens_model``: ``model.cfg.n_heads``
    exists) but its ``to`` takes no ``print_details``."""
    import inspect

    if not (hasattr(model, "cfg") and hasattr(model.cfg, "n_heads")):
        return model, None
    try:
        if "print_details" in inspect.signature(model.to).parameters:
            return model, None
    except (TypeError, ValueError):  # no signature to read: a TransformerLens-like to(); leave it
        return model, None
    return _Plain(model), lambda wrapped: wrapped.model
