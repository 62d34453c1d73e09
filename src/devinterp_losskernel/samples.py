"""The loss kernel of a finished run: from devinterp 2's stored samples, or from any trace.

- :func:`kernel_from_samples`, the work behind :meth:`LossKernel.from_samples
  <devinterp_losskernel.LossKernel.from_samples>`: a devinterp 2.x ``sample()`` / ``llc()`` /
  ``bif()`` run with ``output_path=`` stores every draw's per-token losses of each observable
  in a zarr array ``loss_<obs>`` [chain, draw, sequence, token_pos]. This reads it one chunk
  of draws at a time (the store's own chunking, ``min(50, num_draws)`` draws) and folds each
  chunk into a :class:`~devinterp_losskernel.KernelAccumulator`, so memory is the n×n
  co-moment plus one chunk, whatever the number of draws (``compute_bif`` loads every draw).
- :func:`~devinterp_losskernel.devinterp2_bif.bif_moments_from_samples` (and
  ``kernel_from_samples(…, correlation_method=…)``,
  :func:`devinterp_losskernel.devinterp2_bif.compute_bif`): devinterp's ``compute_bif`` options — the
  token-level kernel over (sequence, position) rows, several observables (``loss_keys``),
  ``batch_index_range_1`` × ``_2``, chains stacked or averaged per draw index — folded chunk
  by chunk into :class:`~devinterp_losskernel.devinterp2_bif.BifMoments`.
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

import numbers
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from .accumulator import KernelAccumulator
from .devinterp2_store import StoreReader, obs_id, open_samples
from .diagnostics import HealthRecorder, report_summary, with_trace
from .kernel import LossKernel, as_labels
from .provenance import FileIntegrityError, checksum
from .validation import check_selection

__all__ = ["kernel_from_samples", "loss_kernel", "record_from_store"]

REDUCTIONS = ("mean", "sum")


def _as_block(block, name: str = "losses") -> torch.Tensor:
    if isinstance(block, np.ndarray):
        if block.dtype.kind not in "fiu":
            raise ValueError(f"{name} must hold real numbers (a float array), got dtype {block.dtype}")
        block = torch.from_numpy(block)
    elif not isinstance(block, torch.Tensor):
        try:
            block = torch.as_tensor(np.asarray(block, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be an array of real numbers, got {type(block).__name__} "
                             f"({str(error).splitlines()[0]})") from None
    if not (block.is_floating_point() or block.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a float array, got dtype {block.dtype}")
    return block


def _as_chains(losses) -> list:
    """A list/tuple of per-chain [draws_c, n] traces (numpy, torch or nested lists), which may
    differ in their number of draws but not in n; ragged rows are refused by name."""
    if not len(losses):
        raise ValueError("losses is empty: a kernel needs at least 2 draws of n ≥ 1 samples")
    if all(isinstance(c, (numbers.Number, np.generic)) for c in losses):
        raise ValueError(f"losses must be [draws, n] or [chains, draws, n], got a flat sequence of "
                         f"{len(losses)} numbers (one draw? pass [[...], [...]] with at least 2 draws)")
    try:
        if any(isinstance(c, torch.Tensor) for c in losses):
            whole = torch.stack([torch.as_tensor(c) for c in losses])
        else:
            whole = np.asarray(losses, dtype=np.float64)
    except (ValueError, RuntimeError, TypeError):
        whole = None  # ragged: chains of different lengths, or rows of different lengths
    if whole is not None:
        return [_as_block(whole)]
    chains = [_as_block(c, f"losses[{i}]") for i, c in enumerate(losses)]
    if any(c.dim() != 2 for c in chains):
        lengths = [len(c) if hasattr(c, "__len__") else None for c in losses]
        raise ValueError(f"losses rows must all hold the same n samples: got rows of lengths {lengths[:10]}"
                         f"{' …' if len(lengths) > 10 else ''} (for chains of different lengths pass a list of "
                         "[draws_c, n] arrays)")
    widths = [int(c.shape[1]) for c in chains]
    if len(set(widths)) > 1:
        i = next(i for i, w in enumerate(widths) if w != widths[0])
        raise ValueError(f"losses: every chain must hold the same n probe samples per draw, but losses[{i}] has "
                         f"n={widths[i]} and losses[0] has n={widths[0]} (chain shapes: "
                         f"{[tuple(c.shape) for c in chains][:10]})")
    return chains


def _check_kernel_fields(n: int, init_loss, sample_ids, labels) -> None:
    """The LossKernel fields of loss_kernel(), checked as soon as n is known (before folding draws)."""
    if init_loss is not None:
        shape = tuple(torch.as_tensor(np.asarray(init_loss) if not isinstance(init_loss, torch.Tensor)
                                      else init_loss).shape)
        if shape != (n,):
            raise ValueError(f"init_loss must have shape ({n},) (one loss at w* per probe sample), got {shape}")
    if sample_ids is not None and len(sample_ids) != n:
        raise ValueError(f"sample_ids must have length n={n} (one per probe sample), got {len(sample_ids)}")
    if labels is not None:
        as_labels(labels, n)


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
            or a list of per-chain ``[draws_c, n]`` traces (chains may differ in length;
            ``draws_per_chain`` is recorded), or an iterable of ``[b, n]`` blocks (read
            one at a time: memory is n² whatever the number of draws). numpy or torch, any
            float dtype. Every value must be finite.
        dtype, device, block_size, rows, mode: the accumulator's (see
            :class:`~devinterp_losskernel.KernelAccumulator`); ``rows`` must name distinct
            samples.
        init_loss, sample_ids, labels, metadata: passed to the :class:`LossKernel`; their
            lengths are checked against n before any draw is folded in.

    >>> import numpy as np
    >>> losses = np.random.default_rng(0).normal(size=(50, 4))      # [draws, n]
    >>> k = loss_kernel(losses)
    >>> np.allclose(k.covariance.numpy(), np.cov(losses, rowvar=False))
    True
    >>> loss_kernel(losses.reshape(2, 25, 4)).draws_per_chain        # [chains, draws, n]
    {0: 25, 1: 25}
    """
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    if isinstance(losses, (str, bytes, dict, numbers.Number)) or losses is None:
        raise TypeError("losses must be a [draws, n] or [chains, draws, n] array (numpy or torch), a list of "
                        f"per-chain [draws, n] arrays, or an iterable of [b, n] blocks, got {type(losses).__name__}")
    if not isinstance(losses, (np.ndarray, torch.Tensor, list, tuple)) and hasattr(losses, "__array__"):
        losses = np.asarray(losses)  # a pandas DataFrame, an xarray DataArray, …
    if isinstance(losses, (np.ndarray, torch.Tensor, list, tuple)):
        if isinstance(losses, (list, tuple)):
            parts = _as_chains(losses)
            array = parts[0] if len(parts) == 1 else None
        else:
            array = _as_block(losses)
        if array is None:
            chains = parts
        elif array.dim() == 3:
            chains = [array[c] for c in range(array.shape[0])]
        elif array.dim() == 2:
            chains = [array]
        else:
            raise ValueError(f"losses must be [draws, n] or [chains, draws, n], got shape {tuple(array.shape)}")
        blocks = ((c, b) for c, b in enumerate(chains))
        num_samples = chains[0].shape[-1]
        lengths = {int(c.shape[0]) for c in chains}
    else:
        try:
            iterator = iter(losses)
        except TypeError:
            raise TypeError("losses must be a [draws, n] or [chains, draws, n] array, a list of per-chain arrays, "
                            f"or an iterable of [b, n] blocks, got {type(losses).__name__}") from None
        try:
            first = _as_block(next(iterator), "losses block 0")
        except StopIteration:
            raise ValueError("losses is empty: a kernel needs at least 2 draws") from None
        first = first[None] if first.dim() == 1 else first
        if first.dim() != 2:
            raise ValueError(f"each block of losses must be [b, n], got shape {tuple(first.shape)}")
        num_samples = first.shape[1]

        def chained():
            yield 0, first
            for i, block in enumerate(iterator, start=1):
                block = _as_block(block, f"losses block {i}")
                yield 0, block[None] if block.dim() == 1 else block

        blocks = chained()
        lengths = set()  # streamed blocks: the draws per chain are known only at the end
    if num_samples < 1:
        raise ValueError("losses must hold at least one probe sample per draw (n ≥ 1), got n=0")
    _check_kernel_fields(int(num_samples), init_loss, sample_ids, labels)
    if rows is not None:
        rows = check_selection(rows, int(num_samples), "rows", what="sample")
    accumulator = KernelAccumulator(int(num_samples), device=device, dtype=dtype, block_size=block_size,
                                    rows=rows, mode=mode)
    # the run's health record (kernel.diagnostics()), fed from the same blocks: split-half moments
    # and each chain's trace of the mean loss (time halves known when every chain has T draws)
    health = HealthRecorder(int(num_samples), expected_draws=lengths.pop() if len(lengths) == 1 else None)
    trace: Dict[int, list] = {}
    draws_per_chain: Dict[int, int] = {}
    for chain, block in blocks:
        if block.dim() != 2 or block.shape[1] != num_samples:
            raise ValueError(f"every block of losses must be [b, {num_samples}], got shape {tuple(block.shape)}")
        if not bool(torch.isfinite(block).all()):
            bad = int((~torch.isfinite(block)).any(dim=1).sum())
            raise ValueError(f"losses hold NaN or Inf in {bad} draws (chain {chain}); drop those draws first")
        accumulator.update(block, check_finite=False)
        health.update(chain, draws_per_chain.get(chain, 0), block)
        trace.setdefault(chain, []).extend(block.double().mean(dim=1).tolist())
        draws_per_chain[chain] = draws_per_chain.get(chain, 0) + int(block.shape[0])
    kernel = accumulator.compute(init_loss=init_loss, draws_per_chain=draws_per_chain, sample_ids=sample_ids,
                                 labels=labels, metadata=dict(metadata or {}, source="loss_kernel"))
    kernel.health_record = with_trace(health.record(), trace)
    kernel.metadata["diagnostics"] = report_summary(kernel)
    return kernel


def kernel_from_samples(
    samples,
    observable: str = "probe",
    *,
    reduction: str = "mean",
    chains: Optional[Iterable[int]] = None,
    draws: Union[None, slice, Sequence[int]] = None,
    failed_chains: str = "drop",
    draws_per_read: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
    device=None,
    block_size: int = 256,
    rows: Optional[Sequence[int]] = None,
    mode: str = "full",
    correlation_method: Optional[str] = None,
    reduce_chain_dimension_method: str = "stack",
    loss_keys: Union[None, str, Sequence[str]] = None,
    batch_index_range_1: Union[str, Sequence[int]] = "all",
    batch_index_range_2: Union[str, Sequence[int]] = "all",
    average_tokenwise_bif: bool = False,
    compute_covariance: bool = False,
) -> LossKernel:
    """The exact loss kernel of a finished devinterp 2.x run, from its stored losses.

    Args:
        samples: what ``devinterp.slt.sampling.sample()`` returned (also the samples of
            ``llc()``/``bif()`` runs with ``output_path=``), an ``xarray.Dataset`` of it, or
            the path of the zarr store.
        observable: the observable's name, as given to ``sample(observables={name: …})``.
        reduction: ``"mean"`` (per-token-averaged sequence loss, devinterp's "sequence"
            method) or ``"sum"`` (each sequence's total loss).
        chains: which chains to use (default: all): distinct indices in [0, num_chains).
        draws: which draws of each chain to use (default: all): distinct indices in
            [0, num_draws), or a slice such as ``slice(20, None)`` to leave out the first 20.
        failed_chains: a chain devinterp aborted (a NaN minibatch loss: its later draws are
            left unwritten, NaN in the store) is ``"drop"``-ped whole (default; recorded in
            ``rejected_per_chain`` and ``metadata["chain_failures"]``, with a warning: its
            last finite draws are usually the blow-up), or only its unwritten draws are left
            out (``"keep_finite"``). The same holds for the chains of a run that was
            interrupted (a store without devinterp's ``completed`` flag).
        draws_per_read: draws read per chunk (default: the store's chunk along ``draw``).
        dtype, device, block_size, rows, mode: the accumulator's (see
            :class:`~devinterp_losskernel.KernelAccumulator`); ``rows`` must name distinct
            sequences.
        correlation_method, reduce_chain_dimension_method, loss_keys, batch_index_range_1,
        batch_index_range_2, average_tokenwise_bif, compute_covariance: devinterp's
            ``compute_bif`` options. With ``correlation_method`` ("token" or "sequence") the
            kernel is the one ``compute_bif`` reads its influences from, folded chunk by
            chunk (:func:`~devinterp_losskernel.devinterp2_bif.bif_moments_from_samples`): over the
            (sequence, position) rows of
            the observables ``loss_keys`` (default: ``[observable]``) concatenated
            (``token_positions`` [n·T, 2], ``input_ids``) for "token", over their sequence
            means for "sequence"; rows ``batch_index_range_1``, columns every sequence of
            ``batch_index_range_1`` ∪ ``_2``; chains pooled ("stack") or averaged per draw
            index first ("mean"). :func:`~devinterp_losskernel.devinterp2_bif.influences_from_kernel`
            turns it into ``compute_bif``'s Dataset. ``reduction``, ``chains``, ``draws``,
            ``rows``, ``mode`` and ``failed_chains`` are not taken with these.

    Returns:
        The :class:`LossKernel` over the observable's sequences in the store's order
        (``metadata``: the observable, reduction, chains and draws used, devinterp's sampler
        config, the store's ``input_ids`` checksum as the probe fingerprint). ``init_loss`` is
        None: devinterp stores no observable losses at w*.

    Raises:
        FileIntegrityError: the store is damaged — a chunk that devinterp wrote is missing or
            cannot be decoded (named with its array, chain, draws and chunk file) — as opposed
            to draws devinterp never wrote, which are handled by ``failed_chains``.
    """
    if not isinstance(observable, str) or not observable:
        raise TypeError(f"observable must be the observable's name (a non-empty str, as given to "
                        f"sample(observables={{name: …}})), got {observable!r}")
    bif_given = {name: value for name, value, default in (
        ("reduce_chain_dimension_method", reduce_chain_dimension_method, "stack"), ("loss_keys", loss_keys, None),
        ("batch_index_range_1", batch_index_range_1, "all"), ("batch_index_range_2", batch_index_range_2, "all"),
        ("average_tokenwise_bif", average_tokenwise_bif, False), ("compute_covariance", compute_covariance, False))
        if not (value is default or (isinstance(value, str) and value == default))}
    if correlation_method is not None:
        clash = [name for name, value, default in (("reduction", reduction, "mean"), ("chains", chains, None),
                                                   ("draws", draws, None), ("rows", rows, None), ("mode", mode, "full"),
                                                   ("failed_chains", failed_chains, "drop"))
                 if not (value is default or (isinstance(value, str) and value == default))]
        if clash:
            raise ValueError(f"kernel_from_samples: {clash} cannot be combined with correlation_method= (devinterp's "
                             "compute_bif options): use batch_index_range_1 for the rows, loss_keys for the "
                             "observables")
        from .devinterp2_bif import bif_moments_from_samples  # here: devinterp2_bif.py sits above this module

        moments = bif_moments_from_samples(
            samples, correlation_method=correlation_method,
            reduce_chain_dimension_method=reduce_chain_dimension_method,
            loss_keys=[observable] if loss_keys is None else loss_keys, batch_index_range_1=batch_index_range_1,
            batch_index_range_2=batch_index_range_2, average_tokenwise_bif=average_tokenwise_bif,
            compute_covariance=compute_covariance, device=device, dtype=dtype, draws_per_read=draws_per_read)
        return moments.compute(metadata={"source": "devinterp_losskernel.from_samples",
                                         "sampler_config": _sampler_config(open_samples(samples)[0])})
    if bif_given:
        raise ValueError(f"kernel_from_samples: {sorted(bif_given)} are devinterp's compute_bif options and need "
                         "correlation_method='token' or 'sequence'")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if failed_chains not in ("drop", "keep_finite"):
        raise ValueError(f"failed_chains must be 'drop' or 'keep_finite', got {failed_chains!r}")
    if draws_per_read is not None and (isinstance(draws_per_read, bool) or draws_per_read < 1
                                       or not isinstance(draws_per_read, numbers.Integral)):
        raise ValueError(f"draws_per_read must be a positive int (draws read per chunk) or None, "
                         f"got {draws_per_read!r}")
    ds, source = open_samples(samples)
    obs = obs_id(observable)
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
    if not (num_chains and num_draws and n):
        raise ValueError(f"{name} of these samples is empty: {num_chains} chains × {num_draws} draws × {n} sequences "
                         "(a kernel needs at least 2 draws of at least one sequence)")
    chain_list = list(range(num_chains)) if chains is None else check_selection(chains, num_chains, "chains",
                                                                                 what="chain")
    keep = np.ones(num_draws, dtype=bool)
    if draws is not None:
        keep[:] = False
        keep[check_selection(draws, num_draws, "draws", what="draw", allow_slice=True)] = True
    if rows is not None:
        rows = check_selection(rows, n, "rows", what="sequence")
    reader = StoreReader(ds, var, name, source)
    step = int(draws_per_read or reader.chunk)
    interrupted = source is not None and ds.attrs.get("completed") != 1

    config = _sampler_config(ds)
    sampler = {k: config.get(src) for k, src in (("lr", "lr"), ("nbeta", "n_beta"), ("localization", "localization"),
                                               ("noise_level", "noise_level"), ("weight_decay", "llc_weight_decay"))
               if config.get(src) is not None}
    fingerprint = None
    if f"input_ids_{obs}" in ds.data_vars:
        fingerprint = "input_ids:" + checksum(torch.from_numpy(np.asarray(ds[f"input_ids_{obs}"].values)))[:32]
    accumulator = KernelAccumulator(n, device=device, dtype=dtype, block_size=block_size, rows=rows, mode=mode,
                                    probe=fingerprint, sampler=sampler or None)
    stopped = ("the run was interrupted before this chain finished (the store has no 'completed' flag)"
               if interrupted else "devinterp aborted it")
    draws_per_chain: Dict[int, int] = {}
    rejected: Dict[int, int] = {}
    failures: Dict[int, str] = {}
    for chain in chain_list:
        last = reader.read(chain, num_draws - 1, num_draws, reduction)
        complete = bool(torch.isfinite(last).all())
        if not complete:
            written = reader.written(chain, [num_draws - 1])
            if written is not None and written[0]:  # devinterp wrote the last draw: not an aborted chain
                raise reader.bad_written(chain, [num_draws - 1], last, observable)
        if not complete and failed_chains == "drop":
            rejected[chain] = int(keep.sum())
            failures[chain] = f"{stopped} (its unwritten draws are NaN in the store); dropped whole"
            continue
        first_unwritten = None  # devinterp writes a chain's draws in order: unwritten ones are a suffix
        for start in range(0, num_draws, step):
            stop = min(num_draws, start + step)
            block = reader.read(chain, start, stop, reduction)
            finite = torch.isfinite(block).all(dim=1).numpy()
            if first_unwritten is not None and finite.any():
                raise FileIntegrityError(
                    f"{reader.where} is damaged: chain {chain} of array {name!r} has no values at draw "
                    f"{first_unwritten} but has them at draw {start + int(np.flatnonzero(finite)[0])}: devinterp "
                    "writes a chain's draws in order, so a chunk was lost. Use another copy of the run, or leave "
                    "the chain out with chains=[…]")
            if not finite.all():
                bad = [start + int(i) for i in np.flatnonzero(~finite)]
                written = reader.written(chain, bad)
                hit = bad if (complete and written is None) else [d for d, w in zip(bad, written if written is not
                                                                                      None else []) if w]
                if hit:
                    raise reader.bad_written(chain, hit, block[torch.from_numpy(~finite)], observable)
                if finite[bad[0] - start:].any():
                    raise FileIntegrityError(
                        f"{reader.where} is damaged: chain {chain} of array {name!r} has no values at draw {bad[0]} "
                        f"but has them at a later draw: devinterp writes a chain's draws in order, so a chunk was "
                        "lost. Use another copy of the run, or leave the chain out with chains=[…]")
                first_unwritten = bad[0]
            selected = finite & keep[start:stop]
            skipped = int((~finite & keep[start:stop]).sum())
            if skipped:
                rejected[chain] = rejected.get(chain, 0) + skipped
                failures.setdefault(chain, f"{stopped}; its unwritten (NaN) draws are left out")
            if selected.any():
                accumulator.update(block[torch.from_numpy(selected)], check_finite=False)
                draws_per_chain[chain] = draws_per_chain.get(chain, 0) + int(selected.sum())
    if failures:
        what = "were interrupted" if interrupted else "were aborted by devinterp"
        warnings.warn(f"from_samples: chains {sorted(failures)} {what}: "
                      + "; ".join(f"chain {c}: {why}" for c, why in sorted(failures.items())), RuntimeWarning,
                      stacklevel=2)
    if accumulator.count < 2:
        raise ValueError(f"only {accumulator.count} finite draws of {observable!r} in these samples"
                         f"{' (of the chains and draws selected)' if chains is not None or draws is not None else ''}"
                         f"{f'; dropped chains: {failures}' if failures else ''}; a covariance needs at least 2")
    try:
        from .provenance import devinterp_version

        version = devinterp_version()
    except Exception:  # pragma: no cover
        version = None
    metadata = {"source": "devinterp_losskernel.from_samples", "observable": observable, "reduction": reduction,
                "sampler": sampler, "sampler_config": config, "num_chains": len(draws_per_chain),
                "chains": chain_list, "draws": None if draws is None else np.flatnonzero(keep).tolist(),
                "store": source, "chain_failures": failures, "diverged_chains": sorted(failures),
                "devinterp_version": version, "token_positions": int(var.shape[-1])}
    return accumulator.compute(draws_per_chain=draws_per_chain, rejected_per_chain=rejected, metadata=metadata)


BIF_OPTIONS = ("correlation_method", "reduce_chain_dimension_method", "loss_keys", "batch_index_range_1",
               "batch_index_range_2", "average_tokenwise_bif", "compute_covariance")


def _sampler_config(ds) -> Dict[str, Any]:
    meta = ds.attrs.get("metadata") or {}
    try:
        return dict(meta["config"]["sampler"])
    except (KeyError, TypeError):
        return {}


def record_from_store(samples, observable: str, kernel, *, reduction: str = "mean") -> Optional[Dict[str, Any]]:
    """The health record of a devinterp 2.x store that ``kernel`` was made from by
    :func:`~devinterp_losskernel.samples.kernel_from_samples` (per-sequence losses): the store is
    read a second time, one chunk of draws at a time, taking the same draws (finite, among
    ``metadata["draws"]``) of the same chains. None when the kernel is not a per-sequence kernel
    of that store or the draws read do not match the kernel's."""
    if getattr(kernel, "token_positions", None) is not None:
        return None
    ds, source = open_samples(samples)
    name = f"loss_{obs_id(observable)}"
    var = ds[name]
    if int(var.shape[2]) != kernel.num_samples:
        return None
    num_draws = int(var.shape[1])
    selected = kernel.metadata.get("draws")
    keep = np.ones(num_draws, dtype=bool)
    if selected is not None:
        keep[:] = False
        keep[np.asarray(selected, dtype=np.int64)] = True
    reader = StoreReader(ds, var, name, source)
    recorder = HealthRecorder(kernel.num_samples, expected_draws=int(keep.sum()))
    trace: Dict[int, List[float]] = {}
    for chain, kept in kernel.draws_per_chain.items():
        chain, position = int(chain), 0
        for start in range(0, num_draws, reader.chunk):
            stop = min(num_draws, start + reader.chunk)
            block = reader.read(chain, start, stop, reduction)
            use = torch.isfinite(block).all(dim=1) & torch.from_numpy(keep[start:stop])
            if bool(use.any()):
                recorder.update(chain, position, block[use])
                trace.setdefault(chain, []).extend(block[use].mean(dim=1).tolist())
                position += int(use.sum())
        if position != int(kept):
            return None
    return with_trace(recorder.record(), trace)
