"""devinterp 2's ``susceptibilities()``, streamed: per-token χ without storing a draw.

A devinterp 2 user switches one import::

    from devinterp_losskernel import susceptibilities   # was: from devinterp.slt.susceptibilities import …
    tree = susceptibilities(model, dataset, {"pile": pile, "code": code}, {"full": None, "l0h1": masks},
                            sampling_task="pile", lr=1e-4, n_beta=30.0, num_chains=4, num_draws=200)
    tree["/susceptibilities"].sus, tree["/context"].input_ids           # devinterp's DataTree

The estimator is devinterp's (Baker et al. 2025, App. C.4, as ``compute_susceptibilities``
computes it). For a weight restriction (WR) other than ``"full"``, with

* a_d — the draw's mean sampling-task loss: the sampling-task observable's per-token losses
  [n_s, T] at draw d (of every chain), averaged over sequences and positions;
* b_d[i, t] — the probe observable's per-token loss of sequence i at target position t;
* c — the mean ``init_loss`` of the ``"full"`` run (over chains and positions);
* φ_d = a_d − c,

devinterp's χ[i, t] = E[φ·a] − E[φ·b[i, t]] − E[φ] · (ā_full − b̄_full[i, t]), every E a
population mean over the WR run's C·D draws, ā_full and b̄_full the same means over the
``"full"`` run. Written with the WR run's centred moments (N = C·D draws, ā, b̄ its means,
M2 = Σ_d (a_d − ā)², C_ab = Σ_d (a_d − ā)(b_d − b̄)):

    χ[i, t] = (M2 − C_ab[i, t]) / N + (ā − c) · (ā − b̄[i, t] − ā_full + b̄_full[i, t])
            = −Cov(a, b[i, t] − a) + E[φ] · (mean shift of (a − b) from the full run),

the first term the (population) covariance of the sampling-task loss with the per-token
observable loss, the second zero when the WR run's means match the full run's.

What is kept instead of the draws: per run (WR), float64 running moments — N, ā, M2 and,
for every observable, b̄ and C_ab [n_obs, T] — folded one draw at a time (or a block of
draws) with Chan's pairwise update (:class:`SusceptibilityMoments`): 16 · Σ_obs n_obs · T bytes
per WR, whatever the number of draws. devinterp's ``sample()`` stores 4 · C · D · (B + Σ n_obs)
· T bytes of float32 losses per WR (plus every SGLD step's minibatch losses and token ids)
and ``compute_susceptibilities`` loads them back.

Agreement: the same draws (devinterp's sampler, seeded as ``sample()`` seeds it, the
observables evaluated by devinterp's ``Observable`` at every draw in the chain's train mode)
give devinterp's numbers to float32 rounding; ours are computed in float64 (devinterp
computes in float32), and ``sus`` is float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .devinterp2_store import CollectInitLoss, make_observables, run_sample_chains, sampler_config

__all__ = ["susceptibilities", "compute_susceptibilities", "SusceptibilityMoments", "moments_from_samples"]



class SusceptibilityMoments:
    """Float64 running moments of one weight restriction's run, all ``compute_susceptibilities``
    needs of it: folded draw by draw, no draw kept.

    State (on the losses' device, float64): ``count`` N (draws folded), ``mean_a`` ā and
    ``m2_a`` M2 of a_d (the draw's mean sampling-task loss), and per observable id
    ``mean[obs]`` b̄ [n_obs, T] and ``comoment[obs]`` C_ab = Σ_d (a_d − ā)(b_d − b̄)
    [n_obs, T]; ``init_loss`` [chain, T] (needed of the ``"full"`` run only) and
    ``input_ids[obs]`` [n_obs, T + 1] (the observables' fixed sequences, for ``/context``).

    Args:
        sampling_id: devinterp's obs id (``to_obs_id(sampling_task)``) of the sampling task.
        input_ids: {obs id: the observable's token ids [n_obs, T + 1]}; must hold
            ``sampling_id``.
        init_loss: [chain, T] float32 initial losses, as ``sample()`` stores them (or None).
        expected_draws: {chain: number of draws} a complete run has; a chain with fewer
            (devinterp stopped it: a non-finite loss) makes every result of this run NaN, as
            devinterp's store holds NaN for the draws never written.
    """

    def __init__(self, sampling_id: str, input_ids: Mapping, *, init_loss=None,
                 expected_draws: Optional[Mapping] = None):
        if sampling_id not in input_ids:
            raise KeyError(f"the sampling task {sampling_id!r} is not among the observables {sorted(input_ids)}")
        self.sampling_id = str(sampling_id)
        self.input_ids = {str(k): torch.as_tensor(v).detach().cpu() for k, v in input_ids.items()}
        self.init_loss = None if init_loss is None else torch.as_tensor(init_loss).detach().cpu()
        self.expected_draws = None if expected_draws is None else {int(c): int(d) for c, d in expected_draws.items()}
        self.draws_per_chain: Dict[int, int] = {}
        self.count = 0
        self.mean_a: Optional[torch.Tensor] = None
        self.m2_a: Optional[torch.Tensor] = None
        self.mean: Dict[str, torch.Tensor] = {}
        self.comoment: Dict[str, torch.Tensor] = {}

    @property
    def observable_ids(self) -> List[str]:
        return list(self.input_ids)

    def update(self, losses: Mapping, chain: int = 0) -> None:
        """Fold one draw: ``losses[obs]`` is the observable's per-token loss [n_obs, T], or a
        block of D draws [D, n_obs, T]; every observable of ``input_ids`` must be given."""
        missing = sorted(set(self.input_ids) - set(losses))
        if missing:
            raise KeyError(f"SusceptibilityMoments.update: no losses for the observables {missing}")
        b = {obs: torch.as_tensor(losses[obs]).detach() for obs in self.input_ids}
        b = {obs: (value.cpu() if value.device.type == "mps" else value).to(torch.float64)  # MPS has no float64
             for obs, value in b.items()}
        if b[self.sampling_id].dim() == 2:
            b = {obs: value.unsqueeze(0) for obs, value in b.items()}
        draws = b[self.sampling_id].shape[0]
        for obs, value in b.items():
            n_obs, width = self.input_ids[obs].shape
            if value.dim() != 3 or value.shape[0] != draws or value.shape[1] != n_obs or value.shape[2] != width - 1:
                raise ValueError(f"SusceptibilityMoments.update: losses[{obs!r}] has shape {tuple(value.shape)}, "
                                 f"expected [{n_obs}, {width - 1}] or [{draws}, {n_obs}, {width - 1}]")
        a = b[self.sampling_id].mean(dim=(1, 2))  # [D]
        block_mean_a = a.mean()
        centred_a = a - block_mean_a
        block_m2 = (centred_a * centred_a).sum()
        block_mean = {obs: value.mean(dim=0) for obs, value in b.items()}
        block_comoment = {obs: torch.tensordot(centred_a, value - block_mean[obs], dims=1) for obs, value in b.items()}
        self.draws_per_chain[int(chain)] = self.draws_per_chain.get(int(chain), 0) + draws
        if self.count == 0:
            self.count, self.mean_a, self.m2_a = draws, block_mean_a, block_m2
            self.mean, self.comoment = block_mean, block_comoment
            return
        # Chan et al.'s pairwise merge of (N, ā, b̄, M2, C_ab) with the block's
        total = self.count + draws
        weight = self.count * draws / total
        delta_a = block_mean_a - self.mean_a
        self.m2_a = self.m2_a + block_m2 + delta_a * delta_a * weight
        for obs in b:
            delta_b = block_mean[obs] - self.mean[obs]
            self.comoment[obs] = self.comoment[obs] + block_comoment[obs] + delta_a * delta_b * weight
            self.mean[obs] = self.mean[obs] + delta_b * (draws / total)
        self.mean_a = self.mean_a + delta_a * (draws / total)
        self.count = total

    def incomplete(self) -> Dict[int, str]:
        """{chain: why} for the chains with fewer draws than ``expected_draws`` (or none)."""
        if self.expected_draws is None:
            return {}
        return {chain: f"{self.draws_per_chain.get(chain, 0)} of {want} draws"
                for chain, want in self.expected_draws.items() if self.draws_per_chain.get(chain, 0) < want}

    def _checked(self, obs_ids: List[str], name: str) -> None:
        missing = [obs for obs in obs_ids if obs not in self.input_ids]
        if missing:
            raise KeyError(f"wr_map[{name!r}] has no observable {missing}; it has {self.observable_ids}")
        if self.count == 0:
            raise ValueError(f"wr_map[{name!r}] has no draws folded in")

    def _nan_if_incomplete(self, value: torch.Tensor) -> torch.Tensor:
        return torch.full_like(value, float("nan")) if self.incomplete() else value

    def sampling_mean(self) -> torch.Tensor:
        """ā, the mean sampling-task loss over draws, sequences and positions (NaN if incomplete)."""
        return self._nan_if_incomplete(self.mean_a)

    def observable_mean(self, obs: str) -> torch.Tensor:
        """b̄ [n_obs, T], the per-token mean over draws (NaN if incomplete)."""
        return self._nan_if_incomplete(self.mean[obs])

    def susceptibility(self, obs: str, *, init_loss_mean: float, full: "SusceptibilityMoments") -> torch.Tensor:
        """χ [n_obs, T] of this run's observable ``obs`` (formula in the module docstring),
        against the ``full`` run's means and its mean init loss c = ``init_loss_mean``."""
        n = self.count
        shift = self.mean_a - init_loss_mean  # E[φ]
        full_delta = full.sampling_mean() - full.observable_mean(obs)
        chi = (self.m2_a - self.comoment[obs]) / n + shift * (self.mean_a - self.mean[obs] - full_delta)
        return self._nan_if_incomplete(chi)


def moments_from_samples(samples, sampling_task: str, *, chunk_draws: int = 50) -> SusceptibilityMoments:
    """The :class:`SusceptibilityMoments` of a stored ``sample()`` run (a DataTree, e.g.
    ``xarray.open_datatree(path, engine="zarr")``), read ``chunk_draws`` draws of one chain at a
    time: memory C_chunk · Σ n_obs · T · 4 bytes for the chunk, not the whole store."""
    from devinterp.slt.observables import to_obs_id

    if isinstance(chunk_draws, bool) or not isinstance(chunk_draws, int) or chunk_draws < 1:
        raise ValueError(f"chunk_draws must be a positive int, got {chunk_draws!r}")
    ds = samples.dataset if hasattr(samples, "dataset") else samples
    sampling_id = to_obs_id(sampling_task)
    obs_ids = [str(v)[len("loss_"):] for v in ds.data_vars if str(v).startswith("loss_") and str(v) != "sampling_loss"]
    if sampling_id not in obs_ids:
        raise KeyError(f"the stored run has no loss_{sampling_id} (sampling_task={sampling_task!r}); its observables "
                       f"are {obs_ids}")
    for obs in obs_ids:
        expected = ("chain", "draw", f"batch_{obs}", "token_pos")
        if ds[f"loss_{obs}"].dims != expected:
            raise ValueError(f"loss_{obs} has dims {ds[f'loss_{obs}'].dims}, expected {expected}")
    ids = {}
    for obs in obs_ids:
        value = np.asarray(ds[f"input_ids_{obs}"].values)
        while value.ndim > 2:
            value = value[0]
        ids[obs] = torch.from_numpy(value)
    moments = SusceptibilityMoments(sampling_id, ids, init_loss=np.asarray(ds["init_loss"].values))
    num_chains, num_draws = ds[f"loss_{sampling_id}"].shape[:2]
    for chain in range(num_chains):
        for start in range(0, num_draws, chunk_draws):
            window = dict(chain=chain, draw=slice(start, min(start + chunk_draws, num_draws)))
            moments.update({obs: torch.from_numpy(np.asarray(ds[f"loss_{obs}"].isel(window).values))
                            for obs in obs_ids}, chain=chain)
    return moments


def compute_susceptibilities(
    wr_map: Dict[str, Any],
    sampling_task: str,
    observable_names: Optional[List[str]] = None,
    include_sampling_task: bool = False,
    *,
    chunk_draws: int = 50,
):
    """devinterp's ``compute_susceptibilities``, from running moments.

    Args:
        wr_map: {weight restriction name: its run}, with a ``"full"`` key; a run is either
            :class:`SusceptibilityMoments` (what :func:`susceptibilities` folds during
            sampling) or devinterp's ``sample()`` DataTree (read ``chunk_draws`` draws at a
            time by :func:`moments_from_samples`, never whole).
        sampling_task, observable_names, include_sampling_task: devinterp's (the observables
            are those of the ``"full"`` run, minus the sampling task unless included).
        chunk_draws: draws per read of a stored run.

    Returns:
        devinterp's DataTree: ``/susceptibilities`` with ``sus`` [sus_flat, wr] (one row per
        (observable, sequence, target position), coords ``dataset_id``, ``batch``,
        ``target_position`` 1..T; one column per WR other than ``"full"``, in ``wr_map``'s
        order; attrs ``dataset_id_to_name`` = the sorted obs ids) and ``/context`` with
        ``input_ids`` [ctx_flat] (coords ``dataset_id``, ``batch``, ``position`` 0..T).
    """
    import xarray as xr
    from devinterp.slt.observables import to_obs_id
    from devinterp.slt.susceptibilities import _build_output

    if not isinstance(wr_map, Mapping) or "full" not in wr_map:
        raise ValueError("wr_map must be a dict {weight restriction: run} with a 'full' key (the unrestricted run)")
    if len(wr_map) < 2:
        raise ValueError("wr_map must hold at least one weight restriction besides 'full': susceptibilities are "
                         "reported for the restricted runs, against the full one")
    if not isinstance(include_sampling_task, bool):
        raise TypeError(f"include_sampling_task must be True or False, got {include_sampling_task!r}")
    moments: Dict[str, SusceptibilityMoments] = {}
    for name, run in wr_map.items():
        if isinstance(run, SusceptibilityMoments):
            moments[name] = run
        elif isinstance(run, (xr.DataTree, xr.Dataset)):
            moments[name] = moments_from_samples(run, sampling_task, chunk_draws=chunk_draws)
        else:
            raise TypeError(f"wr_map[{name!r}] must be SusceptibilityMoments or a sample() DataTree, got "
                            f"{type(run).__name__}")
    full = moments["full"]
    sampling_id = to_obs_id(sampling_task)
    if full.sampling_id != sampling_id:
        raise ValueError(f"sampling_task={sampling_task!r} (obs id {sampling_id!r}), but the runs were folded with "
                         f"the sampling task {full.sampling_id!r}")
    if observable_names is None:
        obs_ids = [obs for obs in full.observable_ids if include_sampling_task or obs != sampling_id]
    else:
        obs_ids = [to_obs_id(n) for n in observable_names]
    if not obs_ids:
        raise ValueError(f"No probe observables to compute susceptibilities for. Available: {full.observable_ids!r}; "
                         f"sampling_task={sampling_id!r}; include_sampling_task={include_sampling_task}. Add a probe "
                         "observable distinct from the sampling task, or pass include_sampling_task=True.")
    if full.init_loss is None:
        raise ValueError("wr_map['full'] has no init_loss: the full run's initial loss is the reference c of φ")
    for name, run in moments.items():
        run._checked([sampling_id, *obs_ids], name)
        lost = run.incomplete()
        if lost:
            warnings.warn(f"compute_susceptibilities: the {name!r} run is incomplete ({lost}: devinterp stopped those "
                          "chains); as in devinterp, whose store holds NaN for the draws never written, its results"
                          + (" and every other WR's" if name == "full" else "") + " are NaN", RuntimeWarning,
                          stacklevel=2)
    init_loss_mean = float(full.init_loss.to(torch.float64).mean())
    results = []
    for name, run in moments.items():
        if name == "full":
            continue
        for obs in obs_ids:
            chi = run.susceptibility(obs, init_loss_mean=init_loss_mean, full=full).cpu().numpy()
            sus = xr.DataArray(chi, dims=["batch", "target_position"],
                               coords={"target_position": np.arange(1, chi.shape[1] + 1)})
            ids = run.input_ids[obs].numpy()
            ids_da = xr.DataArray(ids, dims=["batch", "position"], coords={"position": np.arange(ids.shape[1])})
            results.append((name, obs, sus, ids_da))
    return _build_output(results)


def _check_sizes(dataset, observables, batch_size: int, batches_per_draw) -> None:
    """What devinterp would fail on deep inside (an assert, an empty loader), said by name."""
    import numbers

    def positive(value, name):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")

    positive(batches_per_draw, "batches_per_draw")
    if len(dataset) < batch_size:
        raise ValueError(f"dataset holds {len(dataset)} sequences, fewer than batch_size={batch_size}: devinterp's "
                         "sampler draws whole batches (drop_last)")
    for key, spec in observables.items():
        if isinstance(spec, tuple):
            if len(spec) != 2:
                raise ValueError(f"observables[{key!r}] must be a dataset or a (dataset, batches_per_draw) pair, got "
                                 f"a tuple of length {len(spec)}")
            positive(spec[1], f"observables[{key!r}][1] (batches_per_draw)")
        obs_dataset, per_draw = spec if isinstance(spec, tuple) else (spec, batches_per_draw)
        if len(obs_dataset) < batch_size * per_draw:
            fits = max(1, len(obs_dataset) // batch_size)
            raise ValueError(f"observables[{key!r}] holds {len(obs_dataset)} sequences; devinterp evaluates "
                             f"batch_size × batches_per_draw = {batch_size} × {per_draw} = {batch_size * per_draw} of "
                             f"them: pass observables={{{key!r}: (dataset, {fits})}} or a smaller batch_size")


def _store_paths(output_path, names) -> Dict[str, Path]:
    """devinterp's per-WR store paths: ``<stem>_<wr><suffix>`` beside ``output_path``."""
    from .devinterp2_store import check_new_store_path

    base = Path(str(output_path))
    paths = {name: base.parent / f"{base.stem}_{name}{base.suffix}" for name in names}
    for name, path in paths.items():
        check_new_store_path(path, f"output_path (for weight restriction {name!r}: {str(path)!r})")
    return paths


def susceptibilities(
    model: torch.nn.Module,
    dataset,
    observables: Dict[str, Any],
    weight_restrictions: Dict[str, Optional[Dict[str, Optional[torch.Tensor]]]],
    *,
    sampling_task: str,
    lr: float,
    n_beta: float,
    loss_fn=None,
    include_sampling_task: bool = False,
    **kwargs,
):
    """``devinterp.slt.susceptibilities.susceptibilities``, from running moments: one SGLD run
    per weight restriction, devinterp's own sampler seeded as ``sample()`` seeds it, every
    observable's per-token losses folded into float64 moments at every draw and dropped.

    Args:
        model: the language model (``(model, input_ids) -> logits``; HF, TransformerLens or
            plain).
        dataset: the SGLD dataset, items ``{"input_ids": [T + 1]}``.
        observables: {name: dataset or (dataset, batches_per_draw)}; each evaluated on its
            fixed batch_size · batches_per_draw sequences at every draw, as devinterp does.
        weight_restrictions: {name: param masks or None}, with ``"full"`` (None: every
            parameter) and at least one other (e.g. from devinterp's ``create_param_masks``).
        sampling_task: the observable that is the sampling task (its loss is a_d).
        lr, n_beta, loss_fn, include_sampling_task: devinterp's.
        **kwargs: every other argument of devinterp's ``sample()`` (num_chains, num_draws,
            batch_size, …, device, save_metrics, output_path). Without ``output_path``
            nothing is written; with it, each WR's run also writes devinterp's store at
            ``<stem>_<wr><suffix>`` (the paths must not exist yet).

    Returns:
        devinterp's DataTree (see :func:`compute_susceptibilities`): ``/susceptibilities``
        ``sus`` [Σ_obs n_obs · T, number of WRs − 1] and ``/context`` ``input_ids``.

    Memory: 16 · Σ_obs n_obs · T bytes of float64 moments per WR, not growing with the draws.
    """
    from devinterp.slt.observables import to_obs_id
    from devinterp.slt.sampling import _write_init_loss

    from .devinterp2_store import SampleStore
    from .validation import check_devinterp2_dataset, check_weight_restrictions

    # -- every argument checked before any forward pass -----------------------------------
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a language model), got {type(model).__name__}")
    masks_by_wr = check_weight_restrictions(weight_restrictions, model)
    if not isinstance(observables, Mapping) or not observables:
        raise ValueError("observables must be a non-empty dict {name: dataset or (dataset, batches_per_draw)}")
    if not isinstance(sampling_task, str) or sampling_task not in observables:
        raise ValueError(f"sampling_task {sampling_task!r} not found in observables. Available: {list(observables)}")
    if not isinstance(include_sampling_task, bool):
        raise TypeError(f"include_sampling_task must be True or False, got {include_sampling_task!r}")
    if not include_sampling_task and len(observables) < 2:
        raise ValueError("Need at least one observable besides sampling_task (or set include_sampling_task=True).")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a per-token loss (model, input_ids) -> [B, T], got {loss_fn!r}")
    ids_seen = {}
    for key in observables:
        obs_id = to_obs_id(str(key))
        if obs_id in ids_seen:
            raise ValueError(f"observables {ids_seen[obs_id]!r} and {key!r} have the same devinterp id {obs_id!r}")
        ids_seen[obs_id] = key
    config, rest = sampler_config(kwargs, lr, n_beta, caller="susceptibilities",
                                  set_by_caller=": param_masks come from weight_restrictions")
    _check_sizes(dataset, observables, config.batch_size, rest["batches_per_draw"])
    check_devinterp2_dataset(dataset, "dataset", tokens=loss_fn is None)
    for key, spec in observables.items():
        check_devinterp2_dataset(spec[0] if isinstance(spec, tuple) else spec, f"observables[{key!r}]",
                                 tokens=loss_fn is None)
    context_length = len(dataset[0]["input_ids"]) - 1
    if context_length < 1:
        raise ValueError(f"Sequences must have length >= 2 for next-token loss (got {context_length + 1}).")
    paths = _store_paths(rest["output_path"], masks_by_wr) if rest["output_path"] is not None else {}
    device = rest["device"] or ("cuda" if torch.cuda.is_available() else "cpu")

    obs_list = make_observables(observables, config, context_length, device, rest["obs_seed"],
                                rest["batches_per_draw"], loss_fn)
    sampling_id = to_obs_id(sampling_task)
    input_ids = {obs.obs_id: obs.input_ids for obs in obs_list}

    # -- one run per weight restriction ---------------------------------------------------
    wr_map: Dict[str, SusceptibilityMoments] = {}
    for wr_name, masks in masks_by_wr.items():
        init_loss = None
        if wr_name == "full" or paths:  # only the full run's init loss enters χ; a store holds every run's
            collect = CollectInitLoss(config.num_chains)
            _write_init_loss(collect, config, model, masks, dataset, device, loss_fn)  # devinterp's own code
            init_loss = torch.stack(collect.rows)
        moments = SusceptibilityMoments(sampling_id, input_ids, init_loss=init_loss,
                                        expected_draws={c: config.num_draws for c in range(config.num_chains)})
        store = SampleStore(paths[wr_name], config, context_length, obs_list, model, masks, device) \
            if paths else None

        def on_draw(*, loss, draw, chain, model, moments=moments, store=store, **_):
            losses = {obs.obs_id: obs.compute_loss(model) for obs in obs_list}  # as sample()'s on_draw
            if store is not None:
                store.on_draw(loss, draw, chain, losses)
            moments.update(losses, chain=chain)

        run_sample_chains(model, dataset, loss_fn, masks, config, lr=lr, n_beta=n_beta, device=device,
                          on_draw=on_draw, store=store, init_loss=init_loss)
        wr_map[wr_name] = moments
    return compute_susceptibilities(wr_map, sampling_task, include_sampling_task=include_sampling_task)
