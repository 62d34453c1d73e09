"""devinterp 2's ``sample()`` store, written beside our streaming moments when a user asks for it.

The twins (:func:`~devinterp_losskernel.llc`, :func:`~devinterp_losskernel.susceptibilities`)
write nothing by default. With ``output_path=`` they write the zarr store devinterp's
``sample(..., output_path=)`` writes, from the same run: the same schema (devinterp's own
``_build_sampling_schema``), the same writer (``ZarrWriter``, chain buffers of
``min(50, num_draws)`` draws), the same rows —

=============================  ==========================================  ===========================
variable                       dims                                        pushed by
=============================  ==========================================  ===========================
``init_loss``                  (chain, token_pos)                          :meth:`write_init_loss`
``sampling_loss``              (chain, draw, batch, token_pos)             :meth:`on_draw`
``loss_<obs>``                 (chain, draw, batch_<obs>, token_pos)       :meth:`on_draw`
``input_ids_<obs>``            (batch_<obs>, token)                        on entering
``sampling_loss_micro``        (chain, step, batch_sampling, token_pos)    :meth:`on_micro`
``sampling_input_ids_micro``   (chain, step, batch_sampling, token)        :meth:`on_micro`
``metrics_<field>``            (chain, step)   (``save_metrics=True``)     :meth:`on_step`
=============================  ==========================================  ===========================

and the group attribute ``completed = 1`` once every chain has run. Its size is
``4 · chains · (draws · (B + Σ n_obs) + steps · B·grad_accum) · T`` bytes of float32 losses
plus the int64 token ids: it grows with the draws, which is what the streaming moments avoid.

devinterp's ``sample()`` reuses an existing store whose settings match; the twins refuse an
existing ``output_path`` instead (they compute from the run, not from a store), and say how to
read the stored run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ["SampleStore", "check_new_store_path", "sampler_config", "CollectInitLoss"]

# sample()'s arguments the twins pass to devinterp's sampler themselves, not through SamplerConfig
NOT_CONFIG = ("batches_per_draw", "obs_seed", "device", "output_path", "rmsprop_eps", "rmsprop_alpha")
# sample()'s arguments a twin takes in its own signature (bif, susceptibilities): not in **kwargs
SET_HERE = ("model", "dataset", "observables", "lr", "n_beta", "param_masks", "loss_fn")


def sampler_config(kwargs: Dict[str, Any], lr, n_beta, *, caller: str, also_takes: str = "",
                   set_by_caller: str = ""):
    """devinterp's ``SamplerConfig`` from ``sample()``'s keyword arguments (its defaults where not
    given, its own validation), and the rest (``NOT_CONFIG``: batches_per_draw, obs_seed, device,
    output_path, rmsprop_eps/alpha). An argument ``sample()`` does not take here is refused with
    ``caller``'s name, what it takes, and ``also_takes`` (the twin's own arguments) or
    ``set_by_caller`` (why the twin sets one of ``SET_HERE`` itself)."""
    import inspect

    from devinterp.slt.config import SamplerConfig
    from devinterp.slt.sampling import sample

    parameters = inspect.signature(sample).parameters
    accepted = [name for name in parameters if name not in SET_HERE]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        clash = sorted(set(unknown) & set(SET_HERE))
        raise TypeError(f"{caller}() got arguments devinterp's sample() does not take: {unknown}"
                        + (f" ({clash} are set by {caller} itself{set_by_caller})" if clash else "")
                        + f"; it takes {accepted}" + (f" (and {caller}'s own {also_takes})" if also_takes else ""))
    values = {name: p.default for name, p in parameters.items() if name not in SET_HERE}
    values.update(kwargs)
    method_kwargs = dict(values["sampling_method_kwargs"] or {})
    for key in ("eps", "alpha"):
        value = values[f"rmsprop_{key}"]
        if value is None:
            continue
        if values["sampling_method"] != "rmsprop_sgld":
            raise ValueError(f"rmsprop_{key} can only be set when sampling_method='rmsprop_sgld', "
                             f"got sampling_method={values['sampling_method']!r}")
        if key in method_kwargs:
            raise ValueError(f"rmsprop_{key} is set both as a top-level argument and in "
                             f"sampling_method_kwargs[{key!r}]; specify only one.")
        method_kwargs[key] = value
    fields = {name: value for name, value in values.items() if name not in NOT_CONFIG}
    fields["sampling_method_kwargs"] = method_kwargs
    config = SamplerConfig(lr=lr, n_beta=n_beta, **fields)
    return config, {name: values[name] for name in NOT_CONFIG}


class CollectInitLoss:
    """Stands in for devinterp's ZarrWriter in its own ``_write_init_loss``: keeps the rows
    (``rows[chain]``: float32 [token_pos] on the CPU)."""

    def __init__(self, num_chains: int):
        self.rows: List[Optional[torch.Tensor]] = [None] * num_chains

    def write(self, path, data, /, *, chain):
        self.rows[chain] = torch.as_tensor(data).detach().to("cpu", torch.float32).clone()


def check_new_store_path(output_path, name: str = "output_path") -> Path:
    """``output_path`` as a ``Path`` that does not exist yet (its parent must), refused by name
    before any sampling."""
    if not isinstance(output_path, (str, Path)):
        raise TypeError(f"{name} must be a str or pathlib.Path (the zarr store to write), got "
                        f"{type(output_path).__name__}")
    path = Path(output_path)
    if path.exists():
        raise FileExistsError(
            f"{name}={str(path)!r} exists. devinterp's sample() would reuse a finished store there; this twin "
            "computes from its own run and does not overwrite: delete it (rm -rf) or pass another path. To read a "
            "stored run use xarray.open_datatree(path, engine='zarr') with devinterp's compute_* functions, or "
            "devinterp_losskernel.compute_susceptibilities / LossKernel.from_samples")
    if not path.parent.exists():
        raise FileNotFoundError(f"{name}={str(path)!r}: its folder {str(path.parent)!r} does not exist")
    return path


class SampleStore:
    """devinterp 2's ``sample()`` zarr store for one run, written as ``sample()`` writes it.

    Use as a context manager around the chains; the sampler's callbacks call
    :meth:`on_draw` (with the observables' per-token losses, each [n_obs, T] float32),
    :meth:`on_micro` and :meth:`on_step`, exactly where ``sample()``'s own do.

    Args:
        output_path: the store to create (must not exist; see :func:`check_new_store_path`).
        config: devinterp's ``SamplerConfig`` of the run (its ``save_metrics`` decides the
            ``metrics_*`` arrays).
        context_length: T, the number of predicted positions (sequence length − 1).
        observables: devinterp ``Observable`` objects, in the order of the user's dict.
        model, param_masks: for ``metrics_numel`` (the number of sampled weights) when
            ``save_metrics``.
        device: the run's device (the writer's buffers live there, as in ``sample()``).
    """

    def __init__(self, output_path, config, context_length: int, observables: List, model: torch.nn.Module,
                 param_masks: Dict[str, Optional[torch.Tensor]], device):
        from devinterp.slt.sampling import _build_sampling_schema

        self.path = Path(output_path)
        self.config = config
        self.observables = list(observables)
        self.device = torch.device(device)
        self.batch_size = int(config.batch_size)
        self.grad_accum = int(config.gradient_accumulation_steps)
        self.context_length = int(context_length)
        numel = None
        if config.save_metrics:
            params = dict(model.named_parameters())
            numel = sum(int(mask.count_nonzero()) if mask is not None else params[name].numel()
                        for name, mask in param_masks.items())
        self.chain_buffer_size = min(50, int(config.num_draws))
        self.schema = _build_sampling_schema(config=config, context_length=context_length,
                                             chain_buffer_size=self.chain_buffer_size, observables=self.observables,
                                             numel=numel)
        self.writer = None
        self._context = None
        self._micro_loss: Optional[torch.Tensor] = None
        self._micro_ids: Optional[torch.Tensor] = None

    def __enter__(self) -> "SampleStore":
        from devinterp.slt.sampling import ZARR_MAX_WRITE_THREADS
        from devinterp.slt.writing import ZarrWriter
        from zarr.storage import LocalStore

        _, arrays = self.schema.create_hierarchy(LocalStore(self.path))
        self._context = ZarrWriter.open(arrays, self.chain_buffer_size, self.device, ZARR_MAX_WRITE_THREADS)
        self.writer = self._context.__enter__()
        for obs in self.observables:
            self.writer.write(f"input_ids_{obs.obs_id}", obs.input_ids)
        return self

    def __exit__(self, kind, error, traceback):
        context, self._context = self._context, None
        context.__exit__(kind, error, traceback)  # flushes every buffer and waits for the writes
        if kind is None:
            import zarr

            zarr.open_group(str(self.path)).attrs["completed"] = 1
        return False

    def write_init_loss(self, init_loss) -> None:
        """``init_loss`` [chain, T] float32, one row per chain (``sample()``'s ``_write_init_loss``)."""
        for chain, row in enumerate(torch.as_tensor(init_loss)):
            self.writer.write("init_loss", row, chain=chain)

    def on_draw(self, loss: torch.Tensor, draw: int, chain: int, observable_losses: Dict[str, torch.Tensor]) -> None:
        """One draw: the step's sampling loss [B, T] and each observable's loss [n_obs, T]
        (keyed by ``obs_id``), pushed in ``sample()``'s order."""
        self.writer.push("sampling_loss", loss, chain=chain, draw=draw)
        for obs in self.observables:
            self.writer.push(f"loss_{obs.obs_id}", observable_losses[obs.obs_id], chain=chain, draw=draw)
        self.writer.flush_full_buffers()

    def on_micro(self, loss: torch.Tensor, input_ids: torch.Tensor, chain: int, step: int, micro_step: int) -> None:
        """devinterp's ``micro_callback``: a step's micro-batches as one row
        [grad_accum · B, T] (and their token ids)."""
        total = self.grad_accum * self.batch_size
        if micro_step == 0:
            self._micro_loss = torch.empty(total, self.context_length, dtype=loss.dtype)
            self._micro_ids = torch.empty(total, self.context_length + 1, dtype=input_ids.dtype)
        rows = slice(micro_step * self.batch_size, (micro_step + 1) * self.batch_size)
        self._micro_loss[rows] = loss.cpu()
        self._micro_ids[rows] = input_ids
        if micro_step == self.grad_accum - 1:
            self.writer.push("sampling_loss_micro", self._micro_loss, chain=chain, step=step)
            self.writer.push("sampling_input_ids_micro", self._micro_ids, chain=chain, step=step)
            self.writer.flush_full_buffers()

    def on_step(self, chain: int, step: int, optimizer) -> None:
        """devinterp's ``step_callback`` (only with ``save_metrics=True``): the optimizer's
        per-step diagnostics."""
        from devinterp.optim.metrics import Metrics

        metrics = optimizer.get_metrics()
        for field in Metrics.NORM_FIELDS + Metrics.DOT_FIELDS:
            self.writer.push(f"metrics_{field}", getattr(metrics, field).squeeze(), chain=chain, step=step)
        self.writer.flush_full_buffers()
