"""The loss kernel of a finished run: from devinterp 2's stored samples, or from any trace.

- :func:`kernel_from_samples` (also :meth:`LossKernel.from_samples
  <devinterp_losskernel.LossKernel.from_samples>`): a devinterp 2.x ``sample()`` / ``llc()`` /
  ``bif()`` run with ``output_path=`` stores every draw's per-token losses of each observable
  in a zarr array ``loss_<obs>`` [chain, draw, sequence, token_pos]. This reads it one chunk
  of draws at a time (the store's own chunking, ``min(50, num_draws)`` draws) and folds each
  chunk into a :class:`~devinterp_losskernel.KernelAccumulator`, so memory is the n×n
  co-moment plus one chunk, whatever the number of draws (``compute_bif`` loads every draw).
- :func:`loss_kernel`: the same for a trace you hold, ``losses[draws, n]`` (or
  ``[chains, draws, n]``, or an iterable of ``[b, n]`` blocks).

Per-sequence losses: ``reduction="mean"`` (default) averages the per-token losses over the
token positions — devinterp's ``correlation_method="sequence"`` and our
:func:`~devinterp_losskernel.probe.lm_sequence_loss`. Because a covariance is bilinear this is
also the token-wise covariance averaged over token pairs: ``compute_bif(...,
correlation_method="token", average_tokenwise_bif=True, compute_covariance=True)``.
``reduction="sum"`` takes each sequence's total loss (its negative log-likelihood; the
kernel is the "mean" one times T², the number of predicted positions squared).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .accumulator import KernelAccumulator
from .kernel import LossKernel
from .provenance import checksum

__all__ = ["kernel_from_samples", "loss_kernel"]

REDUCTIONS = ("mean", "sum")


def _as_block(block) -> torch.Tensor:
    if isinstance(block, np.ndarray):
        block = torch.from_numpy(block)
    elif not isinstance(block, torch.Tensor):
        block = torch.as_tensor(np.asarray(block, dtype=np.float64))
    if not (block.is_floating_point() or block.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"losses must be a float array, got dtype {block.dtype}")
    return block


def loss_kernel(
    losses,
    *,
    dtype: torch.dtype = torch.float64,
    device=None,
    block_size: int = 256,
    rows: Optional[Sequence[int]] = None,
    mode: str = "full",
    init_loss=None,
    sample_ids=None,
    labels=None,
    metadata: Optional[Dict[str, Any]] = None,
) -> LossKernel:
    """The loss kernel of a trace: K = Cov over draws of ``losses[draws, n]``, exact (float64,
    streamed through :class:`~devinterp_losskernel.KernelAccumulator`: the result equals
    ``numpy.cov(losses, rowvar=False)``).

    Args:
        losses: ``[draws, n]`` (one chain, or chains concatenated), ``[chains, draws, n]``
            (``draws_per_chain`` is recorded), or an iterable of ``[b, n]`` blocks (read
            one at a time: memory is n² whatever the number of draws). numpy or torch, any
            float dtype. Every value must be finite.
        dtype, device, block_size, rows, mode: the accumulator's (see
            :class:`~devinterp_losskernel.KernelAccumulator`).
        init_loss, sample_ids, labels, metadata: passed to the :class:`LossKernel`.
    """
    if isinstance(losses, (np.ndarray, torch.Tensor, list, tuple)):
        array = _as_block(losses)
        if array.dim() == 3:
            chains = [array[c] for c in range(array.shape[0])]
        elif array.dim() == 2:
            chains = [array]
        else:
            raise ValueError(f"losses must be [draws, n] or [chains, draws, n], got shape {tuple(array.shape)}")
        blocks = ((c, b) for c, b in enumerate(chains))
        num_samples = array.shape[-1]
    else:
        iterator = iter(losses)
        try:
            first = _as_block(next(iterator))
        except StopIteration:
            raise ValueError("losses is empty: a kernel needs at least 2 draws") from None
        first = first[None] if first.dim() == 1 else first
        if first.dim() != 2:
            raise ValueError(f"each block of losses must be [b, n], got shape {tuple(first.shape)}")
        num_samples = first.shape[1]

        def chained():
            yield 0, first
            for block in iterator:
                block = _as_block(block)
                yield 0, block[None] if block.dim() == 1 else block

        blocks = chained()
    accumulator = KernelAccumulator(int(num_samples), device=device, dtype=dtype, block_size=block_size,
                                    rows=rows, mode=mode)
    draws_per_chain: Dict[int, int] = {}
    for chain, block in blocks:
        if block.dim() != 2 or block.shape[1] != num_samples:
            raise ValueError(f"every block of losses must be [b, {num_samples}], got shape {tuple(block.shape)}")
        if not bool(torch.isfinite(block).all()):
            bad = int((~torch.isfinite(block)).any(dim=1).sum())
            raise ValueError(f"losses hold NaN or Inf in {bad} draws (chain {chain}); drop those draws first")
        accumulator.update(block, check_finite=False)
        draws_per_chain[chain] = draws_per_chain.get(chain, 0) + int(block.shape[0])
    return accumulator.compute(init_loss=init_loss, draws_per_chain=draws_per_chain, sample_ids=sample_ids,
                               labels=labels, metadata=dict(metadata or {}, source="loss_kernel"))


def _open(samples):
    """The xarray Dataset holding the run's arrays, opened lazily (a DataTree from
    ``sample()``, a Dataset, or the path of the zarr store)."""
    import xarray as xr

    if isinstance(samples, (str, Path)):
        return xr.open_datatree(str(samples), engine="zarr", consolidated=False).dataset
    if isinstance(samples, xr.DataTree):
        return samples.dataset
    if isinstance(samples, xr.Dataset):
        return samples
    raise TypeError("samples must be devinterp 2's sample() output (an xarray DataTree), an xarray Dataset "
                    f"or the path of its zarr store, got {type(samples).__name__}")


def _obs_id(name: str) -> str:
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


def kernel_from_samples(
    samples,
    observable: str = "probe",
    *,
    reduction: str = "mean",
    chains: Optional[Iterable[int]] = None,
    failed_chains: str = "drop",
    draws_per_read: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
    device=None,
    block_size: int = 256,
    rows: Optional[Sequence[int]] = None,
    mode: str = "full",
) -> LossKernel:
    """The exact loss kernel of a finished devinterp 2.x run, from its stored losses.

    Args:
        samples: what ``devinterp.slt.sampling.sample()`` returned (also the samples of
            ``llc()``/``bif()`` runs with ``output_path=``), an ``xarray.Dataset`` of it, or
            the path of the zarr store.
        observable: the observable's name, as given to ``sample(observables={name: …})``.
        reduction: ``"mean"`` (per-token-averaged sequence loss, devinterp's "sequence"
            method) or ``"sum"`` (each sequence's total loss).
        chains: which chains to use (default: all).
        failed_chains: a chain devinterp aborted (a NaN minibatch loss: its later draws are
            left unwritten, NaN in the store) is ``"drop"``-ped whole (default; recorded in
            ``rejected_per_chain`` and ``metadata["chain_failures"]``, with a warning: its
            last finite draws are usually the blow-up), or only its unwritten draws are left
            out (``"keep_finite"``).
        draws_per_read: draws read per chunk (default: the store's chunk along ``draw``).
        dtype, device, block_size, rows, mode: the accumulator's (see
            :class:`~devinterp_losskernel.KernelAccumulator`).

    Returns:
        The :class:`LossKernel` over the observable's sequences in the store's order
        (``metadata``: the observable, reduction, devinterp's sampler config, the store's
        ``input_ids`` checksum as the probe fingerprint). ``init_loss`` is None: devinterp
        stores no observable losses at w*.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if failed_chains not in ("drop", "keep_finite"):
        raise ValueError(f"failed_chains must be 'drop' or 'keep_finite', got {failed_chains!r}")
    ds = _open(samples)
    obs = _obs_id(observable)
    name = f"loss_{obs}"
    if name not in ds.data_vars:
        available = sorted(str(v)[5:] for v in ds.data_vars if str(v).startswith("loss_") and str(v) != "loss_")
        available = [a for a in available if a != "sampling" and not a.startswith("sampling")]
        raise KeyError(f"observable {observable!r} (array {name!r}) is not in these samples; observables: {available}")
    var = ds[name]
    expected = ("chain", "draw", f"batch_{obs}", "token_pos")
    if tuple(var.dims) != expected:
        raise ValueError(f"{name} must have dims {expected} (devinterp 2's sample() layout), got {tuple(var.dims)}")
    num_chains, num_draws, n, _ = (int(s) for s in var.shape)
    chain_list = list(range(num_chains)) if chains is None else [int(c) for c in chains]
    if any(c < 0 or c >= num_chains for c in chain_list):
        raise ValueError(f"chains must be in [0, {num_chains}), got {chain_list}")
    step = int(draws_per_read or _draw_chunk(var))

    def read(chain: int, start: int, stop: int) -> torch.Tensor:
        block = torch.from_numpy(np.asarray(var[chain, start:stop].values))  # [b, n, T] float32
        block = block.to(torch.float64)
        return block.mean(dim=-1) if reduction == "mean" else block.sum(dim=-1)

    config = _sampler_config(ds)
    sampler = {k: config.get(src) for k, src in (("lr", "lr"), ("nbeta", "n_beta"), ("localization", "localization"),
                                               ("noise_level", "noise_level"), ("weight_decay", "llc_weight_decay"))
               if config.get(src) is not None}
    fingerprint = None
    if f"input_ids_{obs}" in ds.data_vars:
        fingerprint = "input_ids:" + checksum(torch.from_numpy(np.asarray(ds[f"input_ids_{obs}"].values)))[:32]
    accumulator = KernelAccumulator(n, device=device, dtype=dtype, block_size=block_size, rows=rows, mode=mode,
                                    probe=fingerprint, sampler=sampler or None)
    draws_per_chain: Dict[int, int] = {}
    rejected: Dict[int, int] = {}
    failures: Dict[int, str] = {}
    for chain in chain_list:
        last = read(chain, num_draws - 1, num_draws)
        complete = bool(torch.isfinite(last).all())
        if not complete and failed_chains == "drop":
            rejected[chain] = num_draws
            failures[chain] = "devinterp aborted it (unwritten draws are NaN in the store); dropped whole"
            continue
        for start in range(0, num_draws, step):
            block = read(chain, start, min(num_draws, start + step))
            finite = torch.isfinite(block).all(dim=1)
            if not bool(finite.all()):
                if complete:
                    draw = start + int((~finite).nonzero()[0])
                    raise ValueError(
                        f"chain {chain}, draw {draw}: non-finite {observable!r} losses in a chain devinterp "
                        "completed (the observable's loss overflowed); leave the chain out with chains=[…]")
                rejected[chain] = rejected.get(chain, 0) + int((~finite).sum())
                failures.setdefault(chain, "devinterp aborted it; its unwritten (NaN) draws are left out")
                block = block[finite]
            if block.shape[0]:
                accumulator.update(block, check_finite=False)
                draws_per_chain[chain] = draws_per_chain.get(chain, 0) + int(block.shape[0])
    if failures:
        warnings.warn(f"from_samples: chains {sorted(failures)} were aborted by devinterp: "
                      + "; ".join(f"chain {c}: {why}" for c, why in sorted(failures.items())), RuntimeWarning,
                      stacklevel=2)
    if accumulator.count < 2:
        raise ValueError(f"only {accumulator.count} finite draws of {observable!r} in these samples; "
                         "a covariance needs at least 2")
    try:
        from .provenance import devinterp_version

        version = devinterp_version()
    except Exception:  # pragma: no cover
        version = None
    metadata = {"source": "devinterp_losskernel.from_samples", "observable": observable, "reduction": reduction,
                "sampler": sampler, "sampler_config": config, "num_chains": len(draws_per_chain),
                "chain_failures": failures, "diverged_chains": sorted(failures), "devinterp_version": version,
                "token_positions": int(var.shape[-1])}
    return accumulator.compute(draws_per_chain=draws_per_chain, rejected_per_chain=rejected, metadata=metadata)


def _sampler_config(ds) -> Dict[str, Any]:
    meta = ds.attrs.get("metadata") or {}
    try:
        return dict(meta["config"]["sampler"])
    except (KeyError, TypeError):
        return {}


def _from_samples(cls, samples, observable: str = "probe", **kwargs) -> LossKernel:
    """The exact kernel of a finished devinterp 2.x run (``sample()``, or ``llc()`` /
    ``bif()`` with ``output_path=``) from its stored per-draw losses of ``observable``,
    read one chunk of draws at a time (memory n², whatever the number of draws). Keyword
    arguments (``reduction="mean"|"sum"``, ``chains``, ``dtype``, ``rows``, ``mode``, …):
    see :func:`devinterp_losskernel.samples.kernel_from_samples`."""
    return kernel_from_samples(samples, observable, **kwargs)


# LossKernel.from_samples is attached here, so that kernel.py never imports this module
# (which imports kernel.py): the arrows of the pipeline run one way.
LossKernel.from_samples = classmethod(_from_samples)
