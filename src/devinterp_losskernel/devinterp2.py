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
"""

from __future__ import annotations

import numbers
import warnings
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .callback import LossKernelCallback
from .validation import check_selection
from .float32_mean import StreamingFloat32Mean
from .summary import slt_summary
from .progress import devinterp_bars

__all__ = ["llc", "as_devinterp2_dataset", "devinterp2_evaluate", "check_devinterp2_dataset"]


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


def _per_sequence_loss(per_token):
    """loss_fn(model, {"input_ids": …}) -> [B]: the mean over token positions of devinterp's
    per-token loss ``(model, input_ids) -> [B, T−1]`` (devinterp's "sequence" method)."""

    def loss_fn(model, batch):
        return per_token(model, batch["input_ids"]).float().mean(dim=-1)

    return loss_fn


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise (TypeError if not isinstance(value, numbers.Number) or isinstance(value, bool) else ValueError)(
            f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_llc_arguments(model, observables, observable, param_masks, callback_kwargs, device, batch_size,
                         batches_per_draw) -> None:
    """llc()'s arguments of the wrong type or naming what is not there, refused by name before
    any forward pass (devinterp would fail later with a bare StopIteration, KeyError or a
    multiplication of a sequence by a float)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a language model), got {type(model).__name__}")
    _positive_int(batch_size, "batch_size")
    _positive_int(batches_per_draw, "batches_per_draw")
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
            _positive_int(spec[1], f"observables[{key!r}][1] (batches_per_draw)")
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


def _check_llc_sizes(dataset, obs_dataset, name: str, batch_size: int, per_draw: int, callback_kwargs) -> None:
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
):
    """``devinterp.slt.llc.llc`` with the loss kernel of the same run.

    Every argument up to ``output_path`` is devinterp 2's (same defaults); see
    ``devinterp.slt.sampling.sample``. ``save_metrics=True`` and ``output_path`` are refused
    (nothing is written to zarr: for a stored run use devinterp's ``sample(output_path=…)``
    and :meth:`LossKernel.from_samples <devinterp_losskernel.LossKernel.from_samples>`).

    Args (ours):
        observable: the name of the observable that is the kernel's probe (default: the first).
        callback_kwargs: extra :class:`~devinterp_losskernel.LossKernelCallback` arguments
            (``dtype``, ``block_size``, ``rows``, ``probe_train_mask``, …).
        return_kernel: also return the :class:`~devinterp_losskernel.LossKernel`.

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
    """
    import xarray as xr
    from devinterp.slt.config import SAMPLING_METHODS, SamplerConfig
    from devinterp.slt.lm_loss import compute_per_token_loss, make_evaluate_fn
    from devinterp.slt.observables import Observable
    from devinterp.slt.sampler import calculate_num_steps, sample_single_chain

    if output_path is not None:
        raise ValueError("output_path is not supported by devinterp_losskernel.llc (it writes no zarr store): "
                         "run devinterp.slt.sampling.sample(..., output_path=…) and then "
                         "LossKernel.from_samples(samples, observable=…) for the kernel of a stored run")
    if save_metrics:
        raise ValueError("save_metrics=True is not supported by devinterp_losskernel.llc; use "
                         "devinterp.slt.sampling.sample(..., save_metrics=True)")
    _check_llc_arguments(model, observables, observable, param_masks, callback_kwargs, device, batch_size,
                         batches_per_draw)
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
    _check_llc_sizes(dataset, probe_spec[0] if isinstance(probe_spec, tuple) else probe_spec, name, batch_size,
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
        init_noise=init_noise, save_metrics=False,
    )
    method = SAMPLING_METHODS.get(config.sampling_method)
    if method is None:
        raise ValueError(f"Unknown sampling method {config.sampling_method}")
    method_kwargs = dict(nbeta=n_beta, lr=lr, localization=config.localization, noise_level=config.noise_level,
                         weight_decay=config.llc_weight_decay, bounding_box_size=config.bounding_box_size,
                         save_metrics=False, **config.sampling_method_kwargs)

    spec = observables[name]
    obs_dataset, per_draw = spec if isinstance(spec, tuple) else (spec, batches_per_draw)
    obs = Observable(dataset=obs_dataset, task_name=name, batches_per_draw=per_draw, batch_size=batch_size,
                     context_length=context_length, device=torch.device(device), seed=obs_seed, loss_fn=loss_fn)
    per_token = loss_fn if loss_fn is not None else compute_per_token_loss
    used_metadata, used_attrs = _probe_use(observables, name, len(obs_dataset), obs.n_samples, batch_size, per_draw,
                                           obs_seed)

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

    dataloader_seed = init_seed if config.match_sampling_input_ids_across_chains else None
    with devinterp_bars():  # devinterp's own per-chain bars, one line a minute when written to a log
        for chain in range(num_chains):
            sample_single_chain(
                ref_model=model, dataset=dataset, evaluate=make_evaluate_fn(loss_fn), param_masks=param_masks,
                num_draws=num_draws, num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws,
                gradient_accumulation_steps=config.gradient_accumulation_steps, sampling_method=method,
                sampling_method_kwargs=method_kwargs, chain=chain, seed=init_seed + chain,
                dataloader_seed=dataloader_seed if dataloader_seed is not None else init_seed + chain,
                device=device, callbacks=[callback], micro_callback=on_micro, batch_size=batch_size,
                init_noise=init_noise, shuffle=config.shuffle, epoch_mode=config.epoch_mode,
            )
    callback.finalize()
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
                         "init_loss": init_loss_mean})
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
    from torch.utils.data import DataLoader
    from devinterp.slt.sampler import _make_feed, is_transformer_lens_model, set_seed

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
