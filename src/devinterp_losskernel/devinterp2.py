"""devinterp 2.x's ``llc()`` with the loss kernel of the same draws.

:func:`llc` has the name, signature and defaults of ``devinterp.slt.llc.llc`` (and so of
``devinterp.slt.sampling.sample``), so a devinterp 2 user switches one import::

    from devinterp_losskernel import llc          # was: from devinterp.slt.llc import llc
    ds = llc(model, dataset, {"probe": probe_ds}, lr=1e-4, n_beta=30.0, num_chains=4, num_draws=200)
    ds.llc_mean, ds.covariance, ds.correlation, ds.variance, ds.singular_fluctuation

It runs devinterp's own ``sample_single_chain`` per chain, seeded as ``sample()`` seeds it,
with the loss-kernel callback beside it, and computes devinterp's numbers exactly as
``compute_llc`` does: ``loss_trace`` is the mean of the SGLD minibatch per-token losses at
every step (burn-in included), ``init_loss`` the mean per-token loss of
``num_init_loss_batches`` batches per chain (seeded as ``sample()`` seeds them), ``llc_per_chain``
= n_beta · (mean over steps − init_loss), ``llc_mean`` / ``llc_std`` (population std, as
xarray's ``std()``) over chains. The probe is one observable (``observable=`` names it;
default: the first), built by devinterp's ``Observable`` (the same sequences in the same
order as ``sample()`` stores); the kernel is over its per-sequence losses (mean over the
token positions), i.e. ``compute_bif(samples, correlation_method="sequence",
compute_covariance=True)`` of a ``sample()`` run with the same arguments.

Two differences from ``sample()`` by design: only the probe observable is evaluated (the
others do not enter the LLC), and the probe is evaluated in eval mode (devinterp evaluates
its observables in the chain's train mode). For models without dropout or batch statistics
(TransformerLens / Pythia-style LMs) the draws are identical; with active dropout devinterp's
observable passes consume random numbers, so its chains, and its LLC, differ from ours.

Beside them, by default and whatever the probe, ν and the per-sequence loss variances of the
whole training ``dataset`` (``train_*`` variables; issue 19) from the SGLD minibatches' own
losses — no extra forward pass: devinterp's sampler is given a view of ``dataset`` whose items
carry their index, and :class:`MinibatchVariance2` (which a user's own ``sample_single_chain``
loop can use too) pairs each micro-batch's losses with those indices.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .callback import LossKernelCallback
from .float32_mean import StreamingFloat32Mean
from .minibatch import MINIBATCH_METHOD, MinibatchMoments
from .progress import devinterp_bars
from .summary import slt_summary
from .validation import (
    check_devinterp2_dataset,
    check_lm_sampling_arguments,
    check_lm_sampling_sizes,
    check_loss_scale,
    positive_int,
    train_mode_noise,
)

__all__ = ["llc", "as_devinterp2_dataset", "devinterp2_evaluate", "check_devinterp2_dataset", "MinibatchVariance2"]


class _MappingDataset(torch.utils.data.Dataset):
    """A dataset of ``(input, target)`` items seen as ``{"input_ids": input, "labels": target}``."""

    def __init__(self, dataset, input_key: str, target_key: str):
        self.dataset, self.input_key, self.target_key = dataset, input_key, target_key

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if isinstance(item, Mapping):
            return item
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"as_devinterp2_dataset: item {index} is a {type(item).__name__}"
                            f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}; "
                            "expected an (input, target) pair or a mapping")
        return {self.input_key: item[0], self.target_key: torch.as_tensor(item[1])}


def as_devinterp2_dataset(dataset, *, input_key: str = "input_ids", target_key: str = "labels"):
    """``dataset`` of ``(input, target)`` items (a ``TensorDataset``, a torchvision dataset, …)
    as devinterp 2.x's sampler wants it: items ``{"input_ids": input, "labels": target}``.

    devinterp 2's ``sample_single_chain`` batches every dataset with its own DataLoader and
    reads ``batch["input_ids"]`` (the only key it moves to the device), so an image
    classifier's ``TensorDataset`` fails inside devinterp with ``list indices must be integers
    or slices, not str``. Pair it with :func:`devinterp2_evaluate`, which moves the labels
    too. Mapping items pass through unchanged.
    """
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a map-style dataset (len() and [i]), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    wrapped = _MappingDataset(dataset, input_key, target_key)
    wrapped[0]  # the first item's structure is checked now, not inside devinterp's loop
    return wrapped


def devinterp2_evaluate(loss_fn=None):
    """devinterp 2.x's ``evaluate(model, batch) -> (loss, {})`` from a per-sample
    ``loss_fn(model, batch) -> [B]`` (default: :func:`~devinterp_losskernel.probe.default_loss_fn`,
    cross-entropy on ``batch["labels"]`` for a classifier, the LM loss for token ids). Every
    tensor of the batch is moved to the device of ``batch["input_ids"]`` (devinterp moves only
    that one). The loss returned is the per-sample vector: devinterp averages it."""
    from .probe import check_loss_fn, default_loss_fn, move_to_device

    check_loss_fn(loss_fn)
    per_sample = loss_fn or default_loss_fn

    def evaluate(model, batch):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("devinterp2_evaluate: devinterp 2 batches are mappings with 'input_ids'; wrap the "
                            "dataset with as_devinterp2_dataset(dataset)")
        batch = move_to_device(batch, batch["input_ids"].device)
        return per_sample(model, batch), {}

    return evaluate


def _per_sequence_loss(per_token):
    """loss_fn(model, {"input_ids": …}) -> [B]: the mean over token positions of devinterp's
    per-token loss ``(model, input_ids) -> [B, T−1]`` (devinterp's "sequence" method)."""

    def loss_fn(model, batch):
        return per_token(model, batch["input_ids"]).float().mean(dim=-1)

    return loss_fn


def _check_llc_arguments(model, observables, observable, param_masks, callback_kwargs, device, batch_size,
                         batches_per_draw) -> None:
    """llc()'s arguments refused by name before any forward pass: those of every sample() twin
    (:func:`~devinterp_losskernel.validation.check_lm_sampling_arguments`), and
    ``callback_kwargs``, which only llc() takes."""
    check_lm_sampling_arguments(model, observables, observable, param_masks, device, batch_size, batches_per_draw)
    if callback_kwargs is not None:
        if not isinstance(callback_kwargs, Mapping):
            raise TypeError(f"callback_kwargs must be a dict of LossKernelCallback arguments, got "
                            f"{type(callback_kwargs).__name__}")
        ours = sorted({"probe", "loss_fn", "reference_model"} & set(callback_kwargs))
        if ours:
            raise ValueError(f"callback_kwargs must not set {ours}: llc() sets them (the probe is the observable, "
                             "the loss devinterp's per-token loss)")
        import inspect

        from .options import _FLAT_ARGUMENTS

        accepted = {p.name for p in inspect.signature(LossKernelCallback.__init__).parameters.values()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} | set(_FLAT_ARGUMENTS)
        unknown = sorted(set(callback_kwargs) - accepted)
        if unknown:
            raise TypeError(f"callback_kwargs has arguments LossKernelCallback does not take: {unknown}; it takes "
                            f"{sorted(accepted - {'self', 'probe', 'loss_fn', 'reference_model'})}")


def _probe_use(observables, name: str, given: int, used: int, batch_size: int, per_draw: int, obs_seed: int):
    """What of the asked-for observables the kernel leaves out, said in a warning and returned
    as (kernel metadata, dataset attributes): devinterp's Observable keeps batch_size ×
    batches_per_draw sequences of the probe (a fixed random subset, seeded by obs_seed), and
    llc() evaluates the probe observable only."""
    dropped, lines = {}, []
    if used < given:
        why = (f"devinterp's Observable evaluates batch_size × batches_per_draw = {batch_size} × {per_draw} = {used} "
               f"of the {given} sequences of observables[{name!r}] (a fixed random subset, obs_seed={obs_seed}); "
               f"pass observables={{{name!r}: (dataset, {max(1, given // batch_size)})}} to use "
               f"{batch_size * max(1, given // batch_size)}")
        dropped["probe_samples"] = {"count": given - used, "why": why}
        lines.append(f"the kernel is {used} × {used}, over {used} of the {given} probe sequences: {why}")
    others = [key for key in observables if key != name]
    if others:
        why = f"llc() evaluates only the probe observable {name!r} (the others do not enter the LLC)"
        dropped["observables"] = {"names": others, "why": why}
        lines.append(f"observables {others} are not evaluated: {why}")
    if lines:
        warnings.warn("devinterp_losskernel.llc: " + "; ".join(lines) + " (recorded in metadata['dropped'] and "
                      "the dataset's attrs)", UserWarning, stacklevel=3)
    metadata = {"probe_samples_used": used, "probe_samples_given": given, "dropped": dropped}
    attrs = {"probe_samples_used": used, "probe_samples_given": given,
             "dropped": "; ".join(lines) if lines else "nothing"}
    return metadata, attrs


# -- the minibatch mode under devinterp 2 (issue 19): ν of the whole training set from the SGLD
# minibatches' own losses, no extra forward pass -------------------------------------------------

INDEX_KEY = "devinterp_losskernel_index"  # the key under which each item carries its index
NU_MEANING = ("ν = β/2 · Σ_i Var_w[ℓ(x_i; w)] over the N training sequences, β = n_beta / N (= n_beta/2 · the mean "
              "variance of the sequences seen at least twice); ℓ(x_i; w) is sequence i's loss, the mean over its "
              "token positions of devinterp's per-token loss, evaluated at the post-burn-in SGLD steps whose "
              "minibatch held it. It is Watanabe's singular fluctuation when ℓ is a negative log-likelihood (the "
              "per-token cross-entropy of devinterp's default loss); for ℓ = s · NLL + const (an MSE loss with "
              "Gaussian noise of variance σ²: s = 2σ²) pass loss_scale=s: ν is divided by it (attrs['loss_scale'])")


def _with_index(item, index):
    if not isinstance(item, Mapping):
        raise TypeError(f"dataset[{index}] is a {type(item).__name__}: devinterp 2's sampler needs mapping items "
                        "({'input_ids': …}); wrap it with as_devinterp2_dataset(dataset)")
    if INDEX_KEY in item:
        raise ValueError(f"dataset[{index}] already has the key {INDEX_KEY!r}: pass the training dataset itself, "
                         "not recorder.dataset, to MinibatchVariance2")
    return {**item, INDEX_KEY: int(index)}


def _without_index(batch):
    return {key: value for key, value in batch.items() if key != INDEX_KEY}


class _IndexedDataset(torch.utils.data.Dataset):
    """``dataset`` as devinterp 2's sampler is given it: item i is ``dataset[i]`` with one more
    key, ``INDEX_KEY: i``. The same length and the same items otherwise, so devinterp's loader
    draws the same order from the same generator; its default collate stacks the indices into
    a LongTensor [B] beside ``input_ids``, and the recorder's evaluate takes them out again."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return _with_index(self.dataset[index], index)

    def __getitems__(self, indices):  # what the DataLoader's fetcher asks for (HF datasets batch it)
        inner = getattr(self.dataset, "__getitems__", None)
        items = inner(list(indices)) if inner else [self.dataset[i] for i in indices]
        return [_with_index(item, i) for item, i in zip(items, indices)]


class MinibatchVariance2(MinibatchMoments):
    """ν and per-sequence loss variances of the whole training set inside a user's own devinterp
    2.x ``sample_single_chain`` loop, from the losses the sampler already computes (issue 19).

    devinterp 2's ``micro_callback`` receives every micro-batch's unreduced loss at every step
    (burn-in included) but not which training samples the batch holds. The recorder gives the
    sampler a view of the training data whose items carry their index (``recorder.dataset``) and
    an ``evaluate`` that takes the indices out of the batch before calling yours (so your
    evaluate, and everything devinterp computes, is unchanged bit for bit) and keeps them for
    the ``micro_callback`` that follows it, which pairs them with the losses. Every micro-batch
    of every step ``>= num_burnin_steps`` is folded in (whatever ``num_steps_bw_draws`` and
    ``gradient_accumulation_steps``) into per-sample float64 moments, one set per chain
    (:class:`~devinterp_losskernel.sample_moments.SampleMoments`, merged by Chan's update).
    Samples are identified by their index in ``dataset``, never by their tokens.

    The one line you add, and three arguments of your call::

        recorder = MinibatchVariance2(train, num_burnin_steps=B, nbeta=n_beta)  # evaluate=: yours; default LM loss
        for chain in range(C):
            sample_single_chain(model, recorder.dataset, recorder.evaluate, param_masks, num_burnin_steps=B,
                                micro_callback=recorder, chain=chain, ...)
        recorder.finalize()
        recorder.singular_fluctuation(), recorder.variance(), recorder.visits()   # or recorder.kernel

    Sequence i's loss is the mean of its row of the loss (devinterp's per-token loss [B, T−1]:
    the mean over token positions; a per-sample loss [B] is taken as is). ν = β/2 · Σ_i
    Var_w[ℓ(x_i)] / loss_scale, β = nbeta/N, with the N − N_seen samples seen fewer than twice
    filled by the mean of the others; it is Watanabe's singular fluctuation when ℓ / loss_scale
    is a negative log-likelihood. Its standard error is a jackknife over chains.

    devinterp evaluates the minibatches in train mode: a model with active dropout or BatchNorm
    is refused at the first evaluate (its minibatch losses are not draws of ℓ(x; w)). A chain
    with a non-finite loss, or (with ``num_draws``) one devinterp stopped early, is left out.
    Minibatch order: devinterp's loader (shuffle without replacement; its default
    ``epoch_mode="cycle"`` replays the first epoch's order), so each sample is visited at a
    fixed period of about N / batch_size steps.

    Args:
        dataset: the training dataset given to ``sample_single_chain`` (mapping items).
        evaluate: your devinterp ``evaluate(model, batch) -> (unreduced loss [B, …], extras)``;
            default: devinterp's ``make_evaluate_fn()`` (per-token cross-entropy).
        num_burnin_steps: the sampler's; steps before it are not folded.
        nbeta: the sampler's n_beta, for ν (the variances do not need it).
        num_draws, num_steps_bw_draws: the sampler's, to tell a chain devinterp stopped early
            (left out at :meth:`finalize`); optional.
        loss_scale: s with ℓ = s · NLL + const; ν is divided by it (1 for a negative
            log-likelihood; 2σ² for an MSE loss with Gaussian noise of variance σ²).
        allow_train_mode_noise: record even for a model with active dropout or BatchNorm
            (refused at the first evaluate otherwise, with the reason); recorded in the results.
    """

    def __init__(self, dataset, evaluate=None, *, num_burnin_steps: int = 0, nbeta: Optional[float] = None,
                 num_draws: Optional[int] = None, num_steps_bw_draws: int = 1, loss_scale: float = 1.0,
                 allow_train_mode_noise: bool = False):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be the map-style training dataset (len() and [i]), got "
                            f"{type(dataset).__name__}")
        if isinstance(dataset, _IndexedDataset):
            raise ValueError("pass the training dataset itself, not another recorder's .dataset")
        if len(dataset) < 2:
            raise ValueError(f"the training dataset must hold at least 2 samples, got {len(dataset)}")
        if evaluate is not None and not callable(evaluate):
            raise TypeError(f"evaluate must be devinterp's evaluate(model, batch) -> (loss, extras), got {evaluate!r}")
        if isinstance(num_burnin_steps, bool) or not isinstance(num_burnin_steps, numbers.Integral) \
                or num_burnin_steps < 0:
            raise ValueError(f"num_burnin_steps must be an int >= 0, got {num_burnin_steps!r}")
        if num_draws is not None:
            positive_int(num_draws, "num_draws")
        positive_int(num_steps_bw_draws, "num_steps_bw_draws")
        if nbeta is not None and (isinstance(nbeta, bool) or not isinstance(nbeta, numbers.Real)
                                  or not np.isfinite(nbeta) or nbeta <= 0):
            raise ValueError(f"nbeta must be a positive number, got {nbeta!r}")
        check_loss_scale(loss_scale)
        if not isinstance(allow_train_mode_noise, bool):
            raise TypeError(f"allow_train_mode_noise must be True or False, got {allow_train_mode_noise!r}")
        if evaluate is None:
            from devinterp.slt.lm_loss import make_evaluate_fn

            evaluate = make_evaluate_fn()
        self._start_moments(len(dataset), loss_scale, None if nbeta is None else float(nbeta),
                            allow_train_mode_noise=allow_train_mode_noise)
        self.dataset = _IndexedDataset(dataset)
        self.num_burnin_steps = int(num_burnin_steps)
        self.num_draws = None if num_draws is None else int(num_draws)
        self.num_steps_bw_draws = int(num_steps_bw_draws)
        self.failed_chains: Dict[int, str] = {}  # chain -> why it is left out
        self.disabled: Optional[str] = None  # set by disable(): evaluate passes through, nothing is recorded
        self._inner = evaluate
        self._last_step: Dict[int, int] = {}
        self._stash: Optional[torch.Tensor] = None

    # -- inside devinterp's loop ----------------------------------------------------------------
    @property
    def evaluate(self):
        """devinterp's ``evaluate(model, batch)``: yours, on the batch without the indices."""
        return self._evaluate

    def _evaluate(self, model, batch):
        if self.disabled is not None:
            return self._inner(model, _without_index(batch) if isinstance(batch, Mapping) else batch)
        if not isinstance(batch, Mapping) or INDEX_KEY not in batch:
            raise ValueError("MinibatchVariance2.evaluate got a batch without sample indices: pass "
                             "dataset=recorder.dataset to sample_single_chain (the training data, each item carrying "
                             "its index)")
        if self._stash is not None:
            raise RuntimeError("MinibatchVariance2: evaluate ran twice without the micro_callback in between: pass "
                               "micro_callback=recorder to sample_single_chain")
        self._check_model(model)
        out = self._inner(model, _without_index(batch))
        self._stash = batch[INDEX_KEY]  # only once evaluate has returned: a failed one leaves nothing
        return out

    def __call__(self, *, loss, chain: int = 0, step: int = 0, micro_step: int = 0, input_ids=None,
                 **_ignored) -> None:
        """devinterp's ``micro_callback``: pairs this micro-batch's losses with the indices the
        evaluate kept, and keeps them if ``step >= num_burnin_steps``. Tensor bookkeeping only:
        draws on no random generator."""
        indices, self._stash = self._stash, None
        if self.disabled is not None:
            return
        if indices is None:
            raise RuntimeError("MinibatchVariance2 got a micro-batch's losses but no indices: pass "
                               "evaluate=recorder.evaluate and dataset=recorder.dataset to sample_single_chain")
        chain, step = int(chain), int(step)
        if step < self.num_burnin_steps or chain in self.failed_chains:
            return
        if not isinstance(loss, torch.Tensor) or loss.dim() == 0 or loss.shape[0] != len(indices):
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"MinibatchVariance2 needs evaluate's unreduced loss, one row per sample ([B, T−1] "
                             f"per-token, as devinterp's make_evaluate_fn gives, or [B]); got {got} for a batch of "
                             f"{len(indices)}")
        values = loss.detach().to("cpu").to(torch.float64).reshape(len(indices), -1).mean(dim=1)
        if not bool(torch.isfinite(values).all()):
            self.drop_chain(chain, f"a non-finite minibatch loss at step {step}")
            return
        if int(micro_step) == 0:
            self.steps_per_chain[chain] = self.steps_per_chain.get(chain, 0) + 1
        self._last_step[chain] = step
        self._add(chain, indices.to("cpu", torch.long), values)

    def drop_chain(self, chain: int, reason: str, *, warn: bool = True) -> None:
        """Leave chain ``chain`` out of every result (its losses are dropped)."""
        chain = int(chain)
        if chain in self.failed_chains:
            return
        self.failed_chains[chain] = reason
        for held in (self.chains, self._buffer, self._buffered, self.steps_per_chain, self._last_step):
            held.pop(chain, None)
        if warn:
            warnings.warn(f"MinibatchVariance2: chain {chain} is left out of the training-set variances and ν: "
                          f"{reason}", RuntimeWarning, stacklevel=3)

    def disable(self, reason: str) -> None:
        """Record nothing more (evaluate passes batches through); results say ``reason``."""
        self.disabled = str(reason)
        self._stash = None

    def finalize(self) -> None:
        """At the end of the run: fold what is buffered; with ``num_draws``, leave out the
        chains devinterp stopped before their last step."""
        for chain in list(self._buffer):
            self._fold(chain)
        if self.num_draws is not None:
            last = self.num_burnin_steps + self.num_draws * self.num_steps_bw_draws - 1
            for chain, step in list(self._last_step.items()):
                if step < last:
                    self.drop_chain(chain, f"devinterp stopped it after step {step} of {last} (0-based)")

    # -- results (MinibatchMoments: moments, variance, visits, ν, its SE, get_results, kernel) ------
    _missing_nbeta = "MinibatchVariance2(…, nbeta=) was not given: ν needs the sampler's n_beta"

    @property
    def _no_losses(self) -> str:
        return "no post-burn-in losses were recorded" + (
            f" (left out: {self.failed_chains})" if self.failed_chains else
            ": pass dataset=recorder.dataset, evaluate=recorder.evaluate and micro_callback=recorder")

    def _kernel_metadata(self) -> Dict[str, Any]:
        return {"failed_chains": dict(self.failed_chains)}

    def to_xarray_variables(self, *, minibatch_order: str = "") -> Dict[str, Any]:
        """The ``llc()`` twin's ``train_*`` variables (see :func:`llc`)."""
        import xarray as xr

        moments = self.moments()
        count = moments.count.numpy()
        unseen = int((count < 2).sum())
        coords = {"train_sample": np.arange(self.num_train)}
        nu_attrs = {"method": MINIBATCH_METHOD, "meaning": NU_MEANING, "samples_seen_fewer_than_twice": unseen,
                    "chains": [int(c) for c in sorted(self.chains)],
                    "left_out_chains": "; ".join(f"{c}: {why}" for c, why in sorted(self.failed_chains.items()))
                    or "none", "minibatch_order": minibatch_order, "loss_scale": self.loss_scale,
                    **self._noise_record()}
        if self.nbeta is not None:
            nu, se = self.singular_fluctuation(moments), self.singular_fluctuation_se()
        else:
            nu, se = float("nan"), float("nan")
        if not self.chains:
            nu_attrs["why_nan"] = "no chain's losses were kept (left out: " + nu_attrs["left_out_chains"] + ")"
        elif unseen == self.num_train:
            nu_attrs["why_nan"] = "no training sequence was seen twice after burn-in: run more steps"
        return {
            "train_mean": xr.DataArray(moments.loss_mean().numpy(), dims="train_sample", coords=coords, attrs={
                "meaning": "each training sequence's mean loss over its post-burn-in minibatch visits (NaN unseen)",
                "method": MINIBATCH_METHOD}),
            "train_variance": xr.DataArray(moments.variance().numpy(), dims="train_sample", coords=coords, attrs={
                "meaning": "Var_w of each training sequence's loss (mean over token positions) over the post-burn-in "
                           "SGLD steps whose minibatch held it; NaN where seen fewer than twice",
                "method": MINIBATCH_METHOD, "samples_seen_fewer_than_twice": unseen}),
            "train_visits": xr.DataArray(count, dims="train_sample", coords=coords, attrs={
                "meaning": "how many post-burn-in minibatch losses each training sequence's moments hold"}),
            "train_singular_fluctuation": xr.DataArray(nu, attrs=nu_attrs),
            "train_singular_fluctuation_se": xr.DataArray(se, attrs={
                "meaning": "standard error of train_singular_fluctuation: a jackknife over chains (NaN with one)",
                "method": MINIBATCH_METHOD}),
        }


def _train_variables_not_computed(why: str) -> Dict[str, Any]:
    import xarray as xr

    attrs = {"method": MINIBATCH_METHOD, "meaning": NU_MEANING, "why_nan": why}
    return {"train_singular_fluctuation": xr.DataArray(float("nan"), attrs=attrs),
            "train_singular_fluctuation_se": xr.DataArray(float("nan"), attrs={"why_nan": why})}


def llc(
    model: torch.nn.Module,
    dataset,
    observables: Dict[str, Any],
    *,
    lr: float,
    n_beta: float,
    param_masks: Optional[Dict[str, Optional[torch.Tensor]]] = None,
    loss_fn=None,
    num_chains: int = 4,
    num_draws: int = 200,
    batch_size: int = 32,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    num_init_loss_batches: int = 32,
    init_seed: int = 100,
    batches_per_draw: int = 3,
    obs_seed: int = 1337,
    gradient_accumulation_steps: int = 1,
    localization: float = 0.0,
    noise_level: float = 1.0,
    llc_weight_decay: float = 0.0,
    bounding_box_size: Optional[float] = None,
    sampling_method: str = "sgmcmc_sgld",
    sampling_method_kwargs: Optional[Dict[str, Any]] = None,
    rmsprop_eps: Optional[float] = None,
    rmsprop_alpha: Optional[float] = None,
    shuffle: bool = True,
    match_sampling_input_ids_across_chains: bool = True,
    init_noise: Optional[float] = None,
    device: Optional[str] = None,
    save_metrics: bool = False,
    output_path: Union[str, Path, None] = None,
    observable: Optional[str] = None,
    callback_kwargs: Optional[Dict[str, Any]] = None,
    return_kernel: bool = False,
    minibatch_variance: bool = True,
    loss_scale: float = 1.0,
    allow_train_mode_noise: bool = False,
):
    """``devinterp.slt.llc.llc`` with the loss kernel of the same run.

    Every argument up to ``output_path`` is devinterp 2's (same defaults); see
    ``devinterp.slt.sampling.sample``. Nothing is written by default. With ``output_path``
    the run also writes devinterp's ``sample()`` store there, as devinterp's ``llc(...,
    output_path=)`` writes it (every observable evaluated at every draw by devinterp's
    ``Observable`` in the chain's train mode, the minibatch losses and token ids, the init
    loss; with ``save_metrics=True`` the per-step SGLD diagnostics ``metrics_*``; see
    :mod:`devinterp_losskernel.devinterp2_store`); the path must not exist yet (devinterp
    would reuse a finished store there; read one with devinterp's ``compute_llc`` and
    :meth:`LossKernel.from_samples <devinterp_losskernel.LossKernel.from_samples>`).
    ``save_metrics`` is passed to devinterp's sampling method as ``sample()`` passes it.

    Args (ours):
        observable: the name of the observable that is the kernel's probe (default: the first).
        callback_kwargs: extra :class:`~devinterp_losskernel.LossKernelCallback` arguments
            (``dtype``, ``block_size``, ``rows``, ``probe_train_mask``, …).
        return_kernel: also return the :class:`~devinterp_losskernel.LossKernel`.
        minibatch_variance: compute ν and the per-sequence loss variances of the whole training
            ``dataset`` from the SGLD minibatches' own losses (default; no extra forward pass);
            ``False`` turns it off.
        loss_scale: s with ℓ = s · NLL + const; ``train_singular_fluctuation`` is divided by it
            (1: devinterp's cross-entropy is a negative log-likelihood; 2σ² for an MSE ``loss_fn``
            with Gaussian noise of variance σ²). Recorded in its attrs.
        allow_train_mode_noise: compute the training set's ν even for a model with active dropout
            or BatchNorm (by default it is NaN there, with the reason; the LLC and kernel are
            computed either way); the attrs record the opt-in and what was found.

    Returns:
        An ``xarray.Dataset`` with devinterp's ``llc_mean``, ``llc_std``, ``llc_per_chain``
        (chain), ``llc_scalar``, ``loss_trace`` (chain, step) and ``init_loss``, computed as
        ``compute_llc`` computes them, and the kernel's variables as
        :meth:`LossKernel.to_xarray` names them: ``variance``, ``probe_mean``,
        ``probe_init_loss`` (the probe's losses at w*) and ``probe_input_ids`` (…, token) on
        dim ``sample`` (the probe's sequences); ``covariance`` and ``correlation`` on
        (sample, sample_other), or (query, sample_other) with ``rows=``;
        ``draws_per_chain`` (chain), ``probe_llc``, ``singular_fluctuation``,
        ``empirical_variance`` and ``num_draws``. With ``return_kernel=True``:
        ``(dataset, kernel)``.

        And, whatever the probe observable (unless ``minibatch_variance=False``), the whole
        training ``dataset``'s: ``train_variance``, ``train_mean`` and ``train_visits`` on dim
        ``train_sample`` (sequence i of ``dataset``) and ``train_singular_fluctuation`` with
        ``train_singular_fluctuation_se`` (a jackknife over chains). These come from the losses
        devinterp's sampler already computes — every micro-batch of every post-burn-in step
        (``step >= num_burnin_steps``), a sequence's loss being the mean over its token
        positions — folded per sequence under its index in ``dataset`` (the sampler is given
        a view of ``dataset`` whose items carry their index; devinterp draws the same batches
        and computes the same numbers). A sequence seen fewer than twice has a NaN variance
        (their number is in the attrs). ν = n_beta/2 · the mean variance of the seen sequences
        (β/2 · Σ_i over all N, β = n_beta/N), Watanabe's singular fluctuation when ℓ is a
        negative log-likelihood (devinterp's per-token cross-entropy is). devinterp evaluates
        minibatches in train mode: for a model with active dropout (modules, or functional
        dropout such as ``nn.MultiheadAttention(dropout=)``) or BatchNorm (GPT-2 configs often
        have dropout 0.1) these are not computed — ``train_singular_fluctuation`` is NaN with
        ``why_nan``, and a warning says so; the LLC and the kernel are computed as usual (an
        error after sampling would lose the LLC run). ``allow_train_mode_noise=True`` computes
        them anyway; the attrs record the opt-in and what was found. ``loss_scale`` divides ν.

        Two ν's: ``singular_fluctuation`` is the probe kernel's (exact per-draw probe passes,
        over the probe's sequences; only when the probe observable is the training dataset or
        ``probe_train_mask`` says which are training data); ``train_singular_fluctuation`` is
        the minibatch estimate over the whole training set (method in its attrs).
    """
    import xarray as xr
    from devinterp.slt.config import SAMPLING_METHODS, SamplerConfig
    from devinterp.slt.lm_loss import compute_per_token_loss, make_evaluate_fn
    from devinterp.slt.observables import Observable
    from devinterp.slt.sampler import calculate_num_steps, sample_single_chain

    from .devinterp2_store import SampleStore, check_new_store_path

    if not isinstance(save_metrics, bool):
        raise TypeError(f"save_metrics must be True or False, got {save_metrics!r}")
    store_path = None if output_path is None else check_new_store_path(output_path)  # before any sampling
    _check_llc_arguments(model, observables, observable, param_masks, callback_kwargs, device, batch_size,
                         batches_per_draw)
    if not isinstance(minibatch_variance, bool):
        raise TypeError(f"minibatch_variance must be True or False, got {minibatch_variance!r}")
    check_loss_scale(loss_scale)
    if not isinstance(allow_train_mode_noise, bool):
        raise TypeError(f"allow_train_mode_noise must be True or False, got {allow_train_mode_noise!r}")
    if not isinstance(observables, dict) or not observables:
        raise ValueError("observables must be a non-empty dict {name: dataset or (dataset, batches_per_draw)}: "
                         "the kernel's probe is one of them")
    name = next(iter(observables)) if observable is None else observable
    if name not in observables:
        raise KeyError(f"observable={observable!r} is not among the observables {sorted(observables)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if param_masks is None:
        param_masks = {n: None for n, _ in model.named_parameters()}
    check_devinterp2_dataset(dataset, "dataset", tokens=loss_fn is None)  # before any sampling
    probe_spec = observables[name]
    check_devinterp2_dataset(probe_spec[0] if isinstance(probe_spec, tuple) else probe_spec,
                             f"observables[{name!r}]", tokens=loss_fn is None)
    context_length = len(dataset[0]["input_ids"]) - 1
    if context_length < 1:
        raise ValueError(f"Sequences must have length >= 2 for next-token loss (got {context_length + 1}).")
    check_lm_sampling_sizes(dataset, probe_spec[0] if isinstance(probe_spec, tuple) else probe_spec, name, batch_size,
                     probe_spec[1] if isinstance(probe_spec, tuple) else batches_per_draw, callback_kwargs)

    sampling_method_kwargs = dict(sampling_method_kwargs or {})
    for key, value in (("eps", rmsprop_eps), ("alpha", rmsprop_alpha)):
        if value is None:
            continue
        if sampling_method != "rmsprop_sgld":
            raise ValueError(f"rmsprop_{key} can only be set when sampling_method='rmsprop_sgld', "
                             f"got sampling_method={sampling_method!r}")
        if key in sampling_method_kwargs:
            raise ValueError(f"rmsprop_{key} is set both as a top-level argument and in "
                             f"sampling_method_kwargs[{key!r}]; specify only one.")
        sampling_method_kwargs[key] = value
    config = SamplerConfig(  # devinterp's own validation of every sampler argument
        lr=lr, n_beta=n_beta, num_chains=num_chains, num_draws=num_draws, batch_size=batch_size,
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
        num_init_loss_batches=num_init_loss_batches, init_seed=init_seed,
        gradient_accumulation_steps=gradient_accumulation_steps, localization=localization,
        noise_level=noise_level, llc_weight_decay=llc_weight_decay, bounding_box_size=bounding_box_size,
        sampling_method=sampling_method, sampling_method_kwargs=sampling_method_kwargs, shuffle=shuffle,
        match_sampling_input_ids_across_chains=match_sampling_input_ids_across_chains,
        init_noise=init_noise, save_metrics=save_metrics,
    )
    method = SAMPLING_METHODS.get(config.sampling_method)
    if method is None:
        raise ValueError(f"Unknown sampling method {config.sampling_method}")
    method_kwargs = dict(nbeta=n_beta, lr=lr, localization=config.localization, noise_level=config.noise_level,
                         weight_decay=config.llc_weight_decay, bounding_box_size=config.bounding_box_size,
                         save_metrics=save_metrics, **config.sampling_method_kwargs)

    spec = observables[name]
    obs_dataset, per_draw = spec if isinstance(spec, tuple) else (spec, batches_per_draw)
    obs = Observable(dataset=obs_dataset, task_name=name, batches_per_draw=per_draw, batch_size=batch_size,
                     context_length=context_length, device=torch.device(device), seed=obs_seed, loss_fn=loss_fn)
    per_token = loss_fn if loss_fn is not None else compute_per_token_loss
    used_metadata, used_attrs = _probe_use(observables if store_path is None else {name: spec}, name,
                                           len(obs_dataset), obs.n_samples, batch_size, per_draw, obs_seed)

    init_loss = _init_loss(config, model, dataset, device, per_token)  # [chain, token_pos] float32

    # The probe's sequences count as training samples (for ν) only when the observable is the
    # training dataset itself; a held-out observable gets no singular fluctuation unless
    # callback_kwargs=dict(probe_train_mask=…) says which of its sequences are training data.
    options = dict(batch_size=batch_size, num_train=len(dataset), num_draws=num_draws,
                   probe_train_mask=None if obs_dataset is dataset else False)
    options.update(callback_kwargs or {})
    was_training = model.training
    callback = LossKernelCallback({"input_ids": obs.input_ids}, _per_sequence_loss(per_token),
                                  reference_model=model, **options)  # ℓ(x; w*) at the model's weights
    model.train(was_training)

    # ν of the whole training set from the SGLD minibatches (issue 19): the sampler gets a view of
    # `dataset` whose items carry their index, the evaluate takes it out again, on_micro folds
    recorder, minibatch_why = None, None
    if minibatch_variance:
        # the LLC is not broken for it: a noisy model without the opt-in gets a NaN ν with the reason, not an error
        noisy = train_mode_noise(model)
        if noisy and not allow_train_mode_noise:
            minibatch_why = (
                "not computed: devinterp evaluates the SGLD minibatches in train mode, where "
                f"{', '.join(noisy[:3])}{' …' if len(noisy) > 3 else ''} make a sequence's loss noisy (or depend on "
                "its batch-mates), so the minibatch losses are not draws of ℓ(x; w). Set the dropout probabilities to "
                "0 (GPT-2: resid_pdrop, embd_pdrop, attn_pdrop) for ν of the training set, pass "
                "allow_train_mode_noise=True to compute it anyway (recorded in the attrs), or "
                "minibatch_variance=False")
            warnings.warn(f"devinterp_losskernel.llc: train_singular_fluctuation is NaN: {minibatch_why}", UserWarning,
                          stacklevel=2)
        else:
            recorder = MinibatchVariance2(dataset, make_evaluate_fn(loss_fn), num_burnin_steps=num_burnin_steps,
                                          nbeta=n_beta, num_draws=num_draws, num_steps_bw_draws=num_steps_bw_draws,
                                          loss_scale=loss_scale, allow_train_mode_noise=allow_train_mode_noise)
            recorder.hyperparameters.update(lr=float(lr), localization=float(config.localization))
    minibatch_order = (f"devinterp's loader: shuffle={config.shuffle}, epoch_mode={config.epoch_mode!r}"
                       + (" (the first epoch's order replayed)" if config.epoch_mode == "cycle" else "")
                       + ", without replacement" + ("; the same batches in every chain"
                                                    if config.match_sampling_input_ids_across_chains else ""))

    num_steps = calculate_num_steps(num_draws=num_draws, num_steps_bw_draws=num_steps_bw_draws,
                                    num_burnin_steps=num_burnin_steps)
    step_means = np.full((num_chains, num_steps), np.nan, dtype=np.float32)  # devinterp's loss_trace
    micro: Dict[Tuple[int, int], list] = {}
    # devinterp's llc_scalar is the float32 mean of its whole sampling_loss_micro store
    # [chain, step, grad_accum·B, T] (NaN where a failed chain wrote nothing): the same bits, streamed
    row_size = gradient_accumulation_steps * batch_size * context_length
    micro_mean = StreamingFloat32Mean(num_chains * num_steps * row_size)
    next_row = [0]  # the next (chain, step) position in the store's order, as chain · num_steps + step

    def on_micro(loss, input_ids, chain, step, micro_step):
        # devinterp writes the micro-batches of a step as one float32 row [grad_accum·B, T]
        micro.setdefault((chain, step), []).append(loss.detach().to("cpu", torch.float32))
        if micro_step == gradient_accumulation_steps - 1:
            row = torch.cat(micro.pop((chain, step))).numpy()
            step_means[chain, step] = np.nanmean(row)
            position = chain * num_steps + step
            micro_mean.add_missing((position - next_row[0]) * row_size)  # steps a failed chain never wrote
            micro_mean.add(row)
            next_row[0] = position + 1
        if recorder is not None and recorder.disabled is None:
            try:
                recorder(loss=loss, chain=chain, step=step, micro_step=micro_step)
            except Exception as error:  # the LLC run goes on; the training-set ν says why it is missing
                recorder.disable(f"not computed: {type(error).__name__}: {error}")
                warnings.warn(f"devinterp_losskernel.llc: train_singular_fluctuation is NaN: {recorder.disabled}",
                              RuntimeWarning, stacklevel=2)

    dataloader_seed = init_seed if config.match_sampling_input_ids_across_chains else None
    draw_callbacks, micro_callback, step_callback = [callback], on_micro, None
    store = None
    if store_path is not None:  # devinterp's store of this run, written as sample() writes it
        from .rng import global_rng_untouched

        with global_rng_untouched():  # an Observable's DataLoader draws a base seed from torch's generator
            store_obs = [obs if key == name else Observable(
                dataset=value[0] if isinstance(value, tuple) else value, task_name=key,
                batches_per_draw=value[1] if isinstance(value, tuple) else batches_per_draw, batch_size=batch_size,
                context_length=context_length, device=torch.device(device), seed=obs_seed, loss_fn=loss_fn)
                for key, value in observables.items()]
        store = SampleStore(store_path, config, context_length, store_obs, model, param_masks, device)

        def store_draw(*, loss, draw, chain, model, **_):  # first, as sample()'s on_draw: the same RNG use
            store.on_draw(loss, draw, chain, {o.obs_id: o.compute_loss(model) for o in store_obs})

        def micro_callback(**kwargs):
            store.on_micro(**kwargs)
            on_micro(**kwargs)

        draw_callbacks = [store_draw, callback]
        step_callback = store.on_step if save_metrics else None
    with devinterp_bars(), (store if store is not None else contextlib.nullcontext()):
        if store is not None:
            store.write_init_loss(init_loss)
        for chain in range(num_chains):
            sample_single_chain(
                ref_model=model, dataset=dataset if recorder is None else recorder.dataset,
                evaluate=make_evaluate_fn(loss_fn) if recorder is None else recorder.evaluate, param_masks=param_masks,
                num_draws=num_draws, num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
                gradient_accumulation_steps=config.gradient_accumulation_steps, sampling_method=method,
                sampling_method_kwargs=method_kwargs, chain=chain, seed=init_seed + chain,
                dataloader_seed=dataloader_seed if dataloader_seed is not None else init_seed + chain,
                device=device, callbacks=draw_callbacks, micro_callback=micro_callback,
                step_callback=step_callback, batch_size=batch_size,
                init_noise=init_noise, shuffle=config.shuffle, epoch_mode=config.epoch_mode,
            )
    callback.finalize()
    if recorder is None:
        train_data = _train_variables_not_computed(minibatch_why) if minibatch_variance else {}
    elif recorder.disabled is not None:
        train_data = _train_variables_not_computed(recorder.disabled)
    else:
        recorder.finalize()  # leaves out chains devinterp stopped early
        for chain in callback.diverged_chains:  # and those the kernel left out: ν of the kernel's chains
            recorder.drop_chain(chain, "the loss kernel left it out (diverged)", warn=False)
        train_data = recorder.to_xarray_variables(minibatch_order=minibatch_order)
    try:
        kernel = callback.kernel
    except ValueError as error:  # no kernel from these draws (every chain diverged): the LLC is not lost
        kernel, kernel_error = None, str(error)
        warnings.warn(f"devinterp_losskernel.llc: no loss kernel for this run, devinterp's LLC is returned "
                      f"alone (attrs['loss_kernel_error']): {kernel_error}", RuntimeWarning, stacklevel=2)
    else:
        kernel_error = None
        kernel.metadata.update(slt_summary(callback, kernel))

    # devinterp's compute_llc, on the same float32 numbers
    init_loss_mean = float(init_loss.mean())
    loss_trace = xr.DataArray(step_means, dims=("chain", "step"),
                              coords={"chain": np.arange(num_chains), "step": np.arange(num_steps)})
    llc_per_chain = n_beta * (loss_trace.mean(dim="step") - init_loss_mean)
    micro_mean.add_missing(micro_mean.total - micro_mean.fed)
    llc_scalar = n_beta * (micro_mean.mean() - init_loss_mean)
    if kernel is None:
        ds = xr.Dataset({"llc_mean": llc_per_chain.mean(), "llc_std": llc_per_chain.std(),
                         "llc_per_chain": llc_per_chain, "llc_scalar": llc_scalar, "loss_trace": loss_trace,
                         "init_loss": init_loss_mean, **train_data})
        ds.attrs.update({"observable": name, "n_beta": float(n_beta), "loss_kernel_error": kernel_error,
                         "diverged_chains": [int(c) for c in callback.diverged_chains]})
        ds.attrs.update(used_attrs)
        return (ds, None) if return_kernel else ds
    kernel.metadata.update({"llc/mean": float(llc_per_chain.mean()), "llc/std": float(llc_per_chain.std()),
                            "llc/per_chain": [float(v) for v in llc_per_chain.values],
                            "llc/init_loss": init_loss_mean, "observable": name,
                            "sampler_config": config.model_dump()})
    kernel.metadata.update(used_metadata)
    k = kernel.cpu()
    per_sample = k.to_xarray()  # the kernel's own dialect: per-sample variables on dim "sample"
    per_sample = per_sample.drop_vars([v for v in ("draws_per_chain", "chain") if v in per_sample.variables])
    per_sample = per_sample.rename({name_: f"probe_{name_}" for name_ in ("mean", "init_loss")
                                    if name_ in per_sample})  # devinterp's init_loss is the LLC's
    data = {
        "llc_mean": llc_per_chain.mean(),
        "llc_std": llc_per_chain.std(),
        "llc_per_chain": llc_per_chain,
        "llc_scalar": llc_scalar,
        "loss_trace": loss_trace,
        "init_loss": init_loss_mean,
        "probe_input_ids": (("sample", "token"), obs.input_ids.cpu().numpy()),
        "draws_per_chain": (("chain",), np.array([k.draws_per_chain.get(c, 0) for c in range(num_chains)])),
        "num_draws": k.num_draws,
        **train_data,
    }
    for key in ("probe_llc", "singular_fluctuation", "empirical_variance"):  # NaN where not known
        data[key] = float(kernel.metadata.get(key, np.nan))
    ds = xr.merge([per_sample, xr.Dataset(data)], combine_attrs="override")
    if "singular_fluctuation" not in kernel.metadata:
        ds.singular_fluctuation.attrs["why_nan"] = (
            "the probe observable is not the training dataset, so none of its sequences is taken as a training "
            "sample; pass callback_kwargs=dict(probe_train_mask=<bool [n]>) to say which are")
    else:
        ds.singular_fluctuation.attrs["method"] = str(kernel.metadata.get("singular_fluctuation_method", ""))
    ds.attrs.update({"observable": name, "n_beta": float(n_beta),
                     "diverged_chains": [int(c) for c in kernel.metadata.get("diverged_chains", [])]})
    ds.attrs.update(used_attrs)
    return (ds, kernel) if return_kernel else ds


def _init_loss(config, model, dataset, device, per_token) -> np.ndarray:
    """devinterp 2's init loss, as ``sample()`` computes it (``_write_init_loss``): per chain,
    the float32 mean per-token loss over ``num_init_loss_batches`` × grad-accumulation batches
    of a loader seeded as the chain's, the model in train mode. Returns [chain, token_pos]."""
    from devinterp.slt.sampler import _make_feed, is_transformer_lens_model, set_seed
    from torch.utils.data import DataLoader

    num_batches = config.gradient_accumulation_steps * config.num_init_loss_batches
    orig_device = next(model.parameters()).device
    was_training = model.training
    move = (lambda m, d: m.to(d, print_details=False)) if is_transformer_lens_model(model) else (lambda m, d: m.to(d))
    on_device = move(model, device)
    on_device.train()
    torch.manual_seed(config.init_seed)
    params = dict(on_device.named_parameters())
    saved = {n: p.data.clone() for n, p in params.items()} if config.init_noise else {}
    rows = []
    try:
        for chain in range(config.num_chains):
            set_seed(config.init_seed + chain, device=device)
            rng = torch.Generator(device="cpu")
            rng.manual_seed(config.init_seed if config.match_sampling_input_ids_across_chains
                            else config.init_seed + chain)
            loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=config.shuffle, generator=rng,
                                drop_last=True)
            if config.init_noise:
                for p in params.values():
                    p.data.add_(torch.randn_like(p.data) * config.init_noise)
            feed = _make_feed(loader, config.epoch_mode, num_batches)
            accumulated = 0.0
            with torch.no_grad():
                for _ in range(num_batches):
                    input_ids = next(feed)["input_ids"].to(device)
                    accumulated += per_token(on_device, input_ids).detach().float() / num_batches
            rows.append(accumulated.mean(dim=0).cpu().numpy().astype(np.float32))
            if config.init_noise:
                for n, p in params.items():
                    p.data.copy_(saved[n])
    finally:
        move(model, orig_device)
        model.train(was_training)
    return np.stack(rows)
