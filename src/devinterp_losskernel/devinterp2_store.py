"""devinterp 2's ``sample()``: its arguments, its chains, and its zarr store — written beside our
streaming moments when a user asks for it, and read back chunk by chunk (``open_samples``,
``StoreReader``) for a stored run's kernel, BIF and health record.

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

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .extras import require
from .provenance import FileIntegrityError

__all__ = ["SampleStore", "check_new_store_path", "sampler_config", "CollectInitLoss", "run_sample_chains",
           "make_observables", "open_samples", "obs_id", "StoreReader"]

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


def make_observables(observables, config, context_length: int, device, obs_seed, batches_per_draw, loss_fn) -> list:
    """devinterp's ``Observable`` for each ``{name: dataset or (dataset, batches_per_draw)}``, built as
    ``sample()`` builds them (its batch size, context length, device and ``obs_seed``)."""
    from devinterp.slt.observables import Observable

    made = []
    for key, spec in observables.items():
        obs_dataset, per_draw = spec if isinstance(spec, tuple) else (spec, batches_per_draw)
        made.append(Observable(dataset=obs_dataset, task_name=key, batches_per_draw=per_draw,
                               batch_size=config.batch_size, context_length=context_length,
                               device=torch.device(device), seed=obs_seed, loss_fn=loss_fn))
    return made


def run_sample_chains(model, dataset, loss_fn, param_masks, config, *, lr, n_beta, device, on_draw,
                      store: Optional["SampleStore"] = None, init_loss: Optional[torch.Tensor] = None) -> None:
    """``config.num_chains`` chains of devinterp's own ``sample_single_chain``, seeded, batched and
    configured exactly as ``sample()`` runs them (its sampling method and kwargs, chain seeds
    ``init_seed + c``, the shared data order when ``match_sampling_input_ids_across_chains``),
    calling ``on_draw(loss=, draw=, chain=, model=, …)`` at every draw. With a ``store``, the
    store is entered, ``init_loss`` [chains, token_pos] written first, and every draw, step
    (``save_metrics``) and micro-batch pushed to it as ``sample()`` would."""
    from contextlib import nullcontext

    from devinterp.slt.config import SAMPLING_METHODS
    from devinterp.slt.lm_loss import make_evaluate_fn
    from devinterp.slt.sampler import sample_single_chain

    from .progress import devinterp_bars

    method = SAMPLING_METHODS[config.sampling_method]
    method_kwargs = dict(nbeta=n_beta, lr=lr, localization=config.localization, noise_level=config.noise_level,
                         weight_decay=config.llc_weight_decay, bounding_box_size=config.bounding_box_size,
                         save_metrics=config.save_metrics, **config.sampling_method_kwargs)
    shared_order = config.init_seed if config.match_sampling_input_ids_across_chains else None
    with devinterp_bars(), (store if store is not None else nullcontext()):
        if store is not None:
            store.write_init_loss(init_loss)
        for chain in range(config.num_chains):
            sample_single_chain(
                ref_model=model, dataset=dataset, evaluate=make_evaluate_fn(loss_fn), param_masks=param_masks,
                num_draws=config.num_draws, num_burnin_steps=config.num_burnin_steps,
                num_steps_bw_draws=config.num_steps_bw_draws,
                gradient_accumulation_steps=config.gradient_accumulation_steps, sampling_method=method,
                sampling_method_kwargs=method_kwargs, chain=chain, seed=config.init_seed + chain,
                dataloader_seed=shared_order if shared_order is not None else config.init_seed + chain,
                device=device, callbacks=[on_draw],
                step_callback=store.on_step if store is not None and config.save_metrics else None,
                micro_callback=store.on_micro if store is not None else None,
                batch_size=config.batch_size, init_noise=config.init_noise, shuffle=config.shuffle,
                epoch_mode=config.epoch_mode,
            )


# -- reading a stored run: the arrays of sample()'s store, chunk by chunk ------------------------
def open_samples(samples) -> Tuple[Any, Optional[str]]:
    """(the xarray Dataset holding the run's arrays, opened lazily; the path of its zarr store
    or None) from a DataTree from ``sample()``, a Dataset, or the path of the zarr store. A path
    that is missing, a file, not a zarr store, or a store that cannot be opened is refused by
    name. Needs the ``[xarray]`` extra (xarray, zarr; devinterp 2.x brings both)."""
    xr = require("xarray", "xarray", "LossKernel.from_samples")

    if isinstance(samples, (str, os.PathLike)) and not isinstance(samples, bytes):
        path = Path(samples).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"samples: the zarr store {str(path)!r} does not exist")
        if not path.is_dir():
            raise ValueError(f"samples must be a zarr store (a folder written by devinterp's sample(output_path=…)), "
                             f"got {str(path)!r}, which is a file" + (" (a kernel file? use LossKernel.load)"
                                                                      if path.suffix == ".pt" else ""))
        if not any((path / marker).exists() for marker in ("zarr.json", ".zgroup", ".zattrs")):
            raise ValueError(f"samples must be a zarr store (a folder written by devinterp's sample(output_path=…)), "
                             f"got {str(path)!r}, which has no zarr.json: not a zarr store (or its top-level "
                             "metadata was deleted)")
        require("zarr", "xarray", "LossKernel.from_samples on a zarr store")
        try:
            return xr.open_datatree(str(path), engine="zarr", consolidated=False).dataset, str(path)
        except Exception as error:  # zarr.json damaged, an array's metadata missing, …
            raise FileIntegrityError(f"samples: the zarr store {str(path)!r} is damaged and cannot be opened "
                                     f"({type(error).__name__}: {error})") from None
    if isinstance(samples, xr.DataTree):
        return samples.dataset, samples.encoding.get("source") or samples.dataset.encoding.get("source")
    if isinstance(samples, xr.Dataset):
        return samples, samples.encoding.get("source")
    raise TypeError("samples must be devinterp 2's sample() output (an xarray DataTree), an xarray Dataset "
                    f"or the path of its zarr store, got {type(samples).__name__}")


def obs_id(name: str) -> str:
    try:
        from devinterp.slt.observables import to_obs_id
    except ImportError:  # the same rule, for stores read without devinterp installed
        def to_obs_id(task_name: str) -> str:
            result = "".join(c if c.isalnum() or c == "_" else "_" for c in task_name)
            return ("_" + result if result and result[0].isdigit() else result) or "_"
    return to_obs_id(name)


def _draw_chunk(var, default: int = 50) -> int:
    chunks = var.encoding.get("chunks") or var.encoding.get("preferred_chunks")
    if isinstance(chunks, dict):
        return int(chunks.get("draw", default))
    if chunks:
        return int(chunks[list(var.dims).index("draw")])
    return default


class StoreReader:
    """Reads ``var[chain, start:stop]`` of a run's store and tells unwritten draws (a chain
    devinterp aborted, or a run that was interrupted) from a damaged store (a chunk file
    deleted or truncated), naming the store, the array and the chunk file."""

    def __init__(self, ds, var, name: str, source: Optional[str]):
        self.ds, self.var, self.name, self.source = ds, var, name, source
        self.chunk = _draw_chunk(var)
        self.witness = ds["sampling_loss"] if "sampling_loss" in ds.data_vars and \
            tuple(ds["sampling_loss"].dims[:2]) == ("chain", "draw") else None
        self.where = f"the store {source!r}" if source else "the samples"

    def chunk_file(self, array: str, chain: int, draw: int) -> Optional[Path]:
        """The chunk file holding (chain, draw) of ``array``, for a zarr v3 store on disk."""
        chunks = self.ds[array].encoding.get("chunks")
        if not self.source or not chunks or not (Path(self.source) / array / "zarr.json").exists():
            return None  # not a zarr v3 store on disk: no chunk file to name
        index = [chain // chunks[0], draw // chunks[1]] + [0] * (len(chunks) - 2)
        return Path(self.source, array, "c", *map(str, index))

    def _read(self, array, chain: int, start: int, stop: int) -> np.ndarray:
        try:
            return np.asarray(self.ds[array][chain, start:stop].values)
        except Exception as error:  # a truncated or overwritten chunk: zstd, codec, shape errors
            chunk = self.chunk_file(array, chain, start)
            raise FileIntegrityError(
                f"{self.where} is damaged: array {array!r}, chain {chain}, draws {start}–{stop - 1} cannot be "
                f"read{f' (chunk file {str(chunk)!r})' if chunk else ''}: {type(error).__name__}: {error}. "
                "Use another copy of the run, or leave the chain out with chains=[…]") from None

    def read(self, chain: int, start: int, stop: int, reduction: str) -> torch.Tensor:
        block = torch.from_numpy(self._read(self.name, chain, start, stop)).to(torch.float64)  # [b, n, T]
        return block.mean(dim=-1) if reduction == "mean" else block.sum(dim=-1)

    def written(self, chain: int, draws: Sequence[int]) -> Optional[np.ndarray]:
        """Per draw, whether devinterp wrote it: its sampling_loss has a value (devinterp writes
        a draw's sampling_loss and observable losses together). None without sampling_loss."""
        if self.witness is None:
            return None
        lo, hi = min(draws), max(draws) + 1
        values = self._read("sampling_loss", chain, lo, hi).reshape(hi - lo, -1)
        finite = np.isfinite(values).any(axis=1)
        return np.array([finite[d - lo] for d in draws])

    def bad_written(self, chain: int, draws: Sequence[int], values: torch.Tensor, observable: str) -> ValueError:
        """The error for draws devinterp wrote whose observable losses are not finite: a lost chunk
        (the file is missing; a lost chunk reads as NaN) or an overflowed loss (±Inf, or NaN in a
        chunk that is there)."""
        draw, count = draws[0], len(draws)
        more = f" (and {count - 1} more)" if count > 1 else ""
        chunk = self.chunk_file(self.name, chain, draw)
        if chunk is not None and not chunk.exists():
            return FileIntegrityError(
                f"{self.where} is damaged: array {self.name!r} has no values for chain {chain}, draw {draw}{more}, "
                f"though devinterp wrote {'that draw' if count == 1 else 'those draws'} (sampling_loss has values "
                f"there): its chunk file {str(chunk)!r} is missing. Use another copy of the run, or leave the chain "
                "out with chains=[…]")
        if chunk is None and not bool(torch.isinf(values).any()):
            return FileIntegrityError(
                f"chain {chain}, draw {draw}{more}: {observable!r} losses are NaN in draws devinterp wrote "
                f"(sampling_loss has values there): {self.where} lost a chunk of {self.name!r} (it reads as NaN), "
                "or the observable's loss overflowed. Pass the store's path to name the chunk file, or leave the "
                "chain out with chains=[…]")
        return ValueError(
            f"chain {chain}, draw {draw}{more}: non-finite {observable!r} losses in draws devinterp wrote (the "
            "observable's loss overflowed); leave the chain out with chains=[…]")
