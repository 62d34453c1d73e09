"""devinterp 2's ``bif()`` and ``compute_bif()``, from streaming moments: no draw is stored.

A devinterp 2 user switches one import::

    from devinterp_losskernel import bif          # was: from devinterp.slt.bif import bif
    ds = bif(model, dataset, {"pile": pile, "code": code}, lr=1e-4, n_beta=30.0, num_chains=4, num_draws=200)
    ds.influences      # [batch_1, batch_2, target_position, target_position_T]: devinterp's, to float32 rounding
    ds.input_ids       # [batch, position]

What devinterp computes (``devinterp/slt/bif.py``, ``covariance.py``), for the observables'
per-token losses ℓ_{c,d}[b, t] (chain c, draw d, sequence b of the observables concatenated
in ``loss_keys`` order, target position t = 1…T):

* ``correlation_method="token"``: influences[b, b', t, t'] = Cov(ℓ[b, t], ℓ[b', t']) over the
  draws (1/(N−1)), divided by σ[b, t] σ[b', t'] unless ``compute_covariance`` (NaN where a
  variance is 0, no clipping). That is the (n·T) × (n·T) token-level kernel, or its
  rows × columns block for ``batch_index_range_1`` × ``batch_index_range_2``, reshaped.
  ``average_tokenwise_bif=True`` averages each T × T block: for covariances that is the
  covariance of the sequence means (bilinearity), so only an n₁ × n₂ co-moment is kept; for
  correlations every token pair's σ is needed, so the token-level co-moment is kept and
  averaged at the end.
* ``correlation_method="sequence"``: the same over the sequence means ℓ̄[b] = mean_t ℓ[b, t]
  (``torch.corrcoef``: clipped to [−1, 1]).
* ``reduce_chain_dimension_method="stack"``: the N = C·D draws of all chains pooled.
  ``"mean"``: devinterp first averages the losses over chains at each draw index,
  m_d = mean_c ℓ_{c,d}, and takes the covariance over the D draw indices. That needs the draws
  of every chain at the same index; chains run one after the other, so the cheapest exact way
  is a float64 running sum S_d = Σ_c ℓ_{c,d} (and a count per draw index) over the kept
  features, folded into the moments once the last chain ends: 8 · D · F bytes more (F the
  number of features: n_U · T, or n_U for sequence means), growing with the draws but not
  with the chains — devinterp's store holds 4 · C · D · n · T bytes (every observable, every
  chain) and loads it all back.

What is kept (:class:`BifMoments`): the float64 mean and co-moment of the features of the
sequences in batch_index_range_1 ∪ batch_index_range_2 (n_U of them), streamed through
:class:`~devinterp_losskernel.KernelAccumulator` (Chan's pairwise update of centred blocks):
co-moment 8 · (n₁·F') × (n_U·F') bytes (F' = T for the token-level kernel, 1 otherwise), plus a
block buffer; :func:`estimate_bif_memory` says it before anything is allocated, and a state
that cannot fit is refused with :class:`~devinterp_losskernel.KernelMemoryError`. Reading the
results needs one more covariance of that size (``compute()``) and a float32 output
n₁ · n₂ · T² (devinterp's own output size).
"""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .accumulator import KernelAccumulator, KernelMemoryError, _available_bytes, estimate_kernel_memory
from .devinterp2_store import (
    CollectInitLoss,
    StoreReader,
    make_observables,
    obs_id,
    open_samples,
    run_sample_chains,
    sampler_config,
)
from .kernel import LossKernel
from .validation import (
    check_batch_index_range,
    check_bif_options,
    check_devinterp2_dataset,
    check_lm_sampling_arguments,
    check_lm_sampling_sizes,
)

logger = logging.getLogger(__name__)

__all__ = ["bif", "compute_bif", "BifMoments", "bif_moments_from_samples", "estimate_bif_memory",
           "influences_from_kernel"]



# -- options -------------------------------------------------------------------------------------
def resolve_loss_keys(available: Sequence[str], loss_keys, name: str = "loss_keys") -> List[str]:
    """devinterp's ``_resolve_loss_keys``: ``"all"`` → every observable id, sorted; else the
    given ids (or observable names, mapped by devinterp's ``to_obs_id``) in the given order."""

    available = [str(a) for a in available]
    if isinstance(loss_keys, str):
        if loss_keys != "all":
            raise ValueError(f"{name} must be 'all' or a list of observable names, got the str {loss_keys!r}")
        return sorted(available)
    if not isinstance(loss_keys, (list, tuple)) or not loss_keys:
        raise TypeError(f"{name} must be 'all' or a non-empty list of observable names, got {loss_keys!r}")
    keys = []
    for key in loss_keys:
        if not isinstance(key, str):
            raise TypeError(f"{name} must hold observable names (str), got {key!r}")
        keys.append(key if key in available else obs_id(key))
    missing = [k for k, given in zip(keys, loss_keys) if k not in available]
    if missing:
        raise KeyError(f"{name}: observable(s) {missing} not found. Available: {available}")
    return keys


def estimate_bif_memory(n_1: int, n_union: int, context_length: int, *, token_level: bool = True,
                        num_draws_for_mean: Optional[int] = None, block_size: int = 256) -> int:
    """Bytes :class:`BifMoments` allocates: the float64 co-moment (n₁·F) × (n_U·F) with F = T
    (``token_level``) or 1, its mean, variances and block buffer, and with
    ``num_draws_for_mean`` (``reduce_chain_dimension_method="mean"``) the running chain sum
    D × n_U·F and its count. Reading the results takes one more co-moment-sized covariance.

    >>> round(estimate_bif_memory(96, 96, 127) / 2**30, 2)   # 96 sequences of 128 tokens: ≈ (n·T)² · 8 bytes
    1.15
    >>> estimate_bif_memory(96, 96, 127, token_level=False)  # their sequence means: n² · 8 bytes and buffers
    469248
    """
    width = context_length if token_level else 1
    columns = n_union * width
    need = estimate_kernel_memory(columns, num_rows=n_1 * width, block_size=block_size)
    if num_draws_for_mean is not None:
        need += 8 * num_draws_for_mean * (columns + 1)
    return int(need)


class BifMoments:
    """The streaming state of devinterp's ``compute_bif``: fold each draw's per-token losses of
    the observables, read devinterp's ``influences`` at the end (:meth:`dataset`) or the
    kernel (:meth:`compute`).

    Args:
        sizes: {obs id: number of sequences n_obs}, in the order of ``loss_keys`` (the
            sequences are concatenated in this order into devinterp's ``batch`` dimension).
        context_length: T, the number of predicted positions per sequence.
        correlation_method, reduce_chain_dimension_method, average_tokenwise_bif,
        compute_covariance, batch_index_range_1, batch_index_range_2: devinterp's.
        num_draws: D, draws per chain (needed for ``reduce_chain_dimension_method="mean"``).
        input_ids: {obs id: token ids [n_obs, T + 1]} for the output's ``input_ids``.
        device, dtype: where and in what the co-moment lives (float64 by default).
        block_size: draws buffered per fold (see :class:`KernelAccumulator`).
        check_memory: refuse a state that cannot fit (:class:`KernelMemoryError`), saying its size.

    Attributes:
        memory_bytes: what the state takes (:func:`estimate_bif_memory`), known before allocating.

    >>> import numpy as np
    >>> m = BifMoments({"probe": 2}, 3)                  # 2 sequences of T = 3 target positions
    >>> for d in range(5):                               # 5 draws of per-token losses [2, 3]
    ...     m.update({"probe": np.random.default_rng(d).normal(size=(2, 3))}, chain=0, draw=d)
    >>> m.dataset().influences.dims
    ('batch_1', 'batch_2', 'target_position', 'target_position_T')
    >>> m.compute().token_positions[:4].tolist()        # the kernel's rows: (sequence, position)
    [[0, 1], [0, 2], [0, 3], [1, 1]]
    """

    def __init__(self, sizes: Mapping, context_length: int, *, correlation_method: str = "token",
                 reduce_chain_dimension_method: str = "stack", average_tokenwise_bif: bool = False,
                 compute_covariance: bool = False, batch_index_range_1="all", batch_index_range_2="all",
                 num_draws: Optional[int] = None, input_ids: Optional[Mapping] = None, device=None,
                 dtype: torch.dtype = torch.float64, block_size: int = 256, check_memory: bool = True):
        check_bif_options(correlation_method, reduce_chain_dimension_method, average_tokenwise_bif,
                          compute_covariance)
        if not isinstance(sizes, Mapping) or not sizes:
            raise ValueError("sizes must be a non-empty dict {obs id: number of sequences}")
        if isinstance(context_length, bool) or not isinstance(context_length, numbers.Integral) or context_length < 1:
            raise ValueError(f"context_length must be a positive int, got {context_length!r}")
        self.keys = [str(k) for k in sizes]
        self.sizes = {str(k): int(v) for k, v in sizes.items()}
        self.context_length = T = int(context_length)
        self.total = sum(self.sizes.values())
        self.correlation_method = correlation_method
        self.reduce = reduce_chain_dimension_method
        self.average = bool(average_tokenwise_bif)
        self.covariance_only = bool(compute_covariance)
        self.range_1 = check_batch_index_range(batch_index_range_1, self.total, "batch_index_range_1")
        self.range_2 = check_batch_index_range(batch_index_range_2, self.total, "batch_index_range_2")
        self.union = np.unique(np.concatenate([self.range_1, self.range_2]))
        where = np.full(self.total, -1, dtype=np.int64)
        where[self.union] = np.arange(len(self.union))
        self._pos_1, self._pos_2 = where[self.range_1], where[self.range_2]
        # token-level moments unless every token pair is averaged into a covariance (= of the means)
        self.token_level = correlation_method == "token" and not (self.average and self.covariance_only)
        self.width = T if self.token_level else 1
        features = len(self.union) * self.width
        square = len(self.range_1) == len(self.union) and np.array_equal(self.range_1, self.union)
        rows = None if square else (self._pos_1[:, None] * self.width + np.arange(self.width)).ravel()
        if self.reduce == "mean":
            if isinstance(num_draws, bool) or not isinstance(num_draws, numbers.Integral) or num_draws < 1:
                raise ValueError("reduce_chain_dimension_method='mean' needs num_draws (draws per chain, a positive "
                                 f"int): the chains are averaged at each draw index; got {num_draws!r}")
        self.num_draws = None if num_draws is None else int(num_draws)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.memory_bytes = estimate_bif_memory(len(self.range_1), len(self.union), T, token_level=self.token_level,
                                                num_draws_for_mean=self.num_draws if self.reduce == "mean" else None,
                                                block_size=block_size)
        logger.info("BIF moments: %.3g GiB on %s (%d × %d float64 co-moment%s)", self.memory_bytes / 2**30,
                    self.device, len(self.range_1) * self.width, features,
                    f", chain-mean sum of {self.num_draws} draws" if self.reduce == "mean" else "")
        if check_memory:
            have = _available_bytes(self.device)
            if have is not None and self.memory_bytes > have:
                shape = f"({len(self.range_1)}·{self.width}) × ({len(self.union)}·{self.width})"
                raise KernelMemoryError(
                    f"the {'token' if self.token_level else 'sequence'}-level BIF moments need "
                    f"{self.memory_bytes / 2**30:.2f} GiB on {self.device} (a {shape} float64 co-moment"
                    + (f" and the chain-mean sum of {self.num_draws} draws" if self.reduce == "mean" else "")
                    + f"), but only {have / 2**30:.2f} GiB is available. Pass batch_index_range_1= (fewer query "
                    "sequences), correlation_method='sequence', fewer observables (loss_keys=), or "
                    "reduce_chain_dimension_method='stack' (no per-draw sum)")
        self.accumulator = KernelAccumulator(features, device=self.device, dtype=dtype, block_size=block_size,
                                             rows=None if rows is None else torch.from_numpy(rows),
                                             check_memory=False)
        self._union_t = torch.from_numpy(self.union).to(self.device)
        if self.reduce == "mean":
            self._sum = torch.zeros(self.num_draws, features, dtype=torch.float64, device=self.device)
            self._count = torch.zeros(self.num_draws, dtype=torch.int64, device=self.device)
        self.input_ids = None
        if input_ids is not None:
            missing = [k for k in self.keys if k not in input_ids]
            if missing:
                raise KeyError(f"input_ids has no token ids for the observables {missing}")
            self.input_ids = torch.cat([torch.as_tensor(input_ids[k]).detach().cpu().to(torch.int64)
                                        for k in self.keys])
        self.draws_per_chain: Dict[int, int] = {}
        self.nonfinite: Dict[int, str] = {}  # chain -> where non-finite losses were met
        self._folded = False

    # -- folding -----------------------------------------------------------------------------
    def _features(self, losses: Mapping) -> torch.Tensor:
        missing = [k for k in self.keys if k not in losses]
        if missing:
            raise KeyError(f"BifMoments.update: no losses for the observables {missing}")
        parts = []
        for key in self.keys:
            value = torch.as_tensor(losses[key]).detach()
            value = value.unsqueeze(0) if value.dim() == 2 else value
            if value.dim() != 3 or tuple(value.shape[1:]) != (self.sizes[key], self.context_length):
                raise ValueError(f"BifMoments.update: losses[{key!r}] has shape {tuple(value.shape)}, expected "
                                 f"[{self.sizes[key]}, {self.context_length}] or [draws, {self.sizes[key]}, "
                                 f"{self.context_length}]")
            parts.append(value.to(self.device, torch.float64))
        x = torch.cat(parts, dim=1)[:, self._union_t]  # [draws, n_U, T]
        return x.reshape(x.shape[0], -1) if self.token_level else x.mean(dim=-1)

    def update(self, losses: Mapping, chain: int = 0, draw: Optional[int] = None) -> None:
        """Fold draws of one chain: ``losses[obs]`` is the observable's per-token loss
        [n_obs, T] (one draw) or [draws, n_obs, T]; ``draw`` is the index of the first (needed
        for the chain mean)."""
        if self._folded:
            raise RuntimeError("BifMoments.update after compute(): the chain-mean draws are already folded")
        x = self._features(losses)
        chain = int(chain)
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            self.nonfinite.setdefault(chain, f"non-finite losses at {int((~finite).sum())} draw(s)")
        self.draws_per_chain[chain] = self.draws_per_chain.get(chain, 0) + int(x.shape[0])
        if self.reduce == "stack":
            if bool(finite.any()):
                self.accumulator.update(x[finite], check_finite=False)
            return
        if draw is None or isinstance(draw, bool) or not isinstance(draw, numbers.Integral) \
                or not 0 <= draw <= self.num_draws - x.shape[0]:
            raise ValueError(f"BifMoments.update: draw must be the index of the first draw, in [0, "
                             f"{self.num_draws - x.shape[0]}], for the chain mean; got {draw!r}")
        rows = slice(int(draw), int(draw) + x.shape[0])
        self._sum[rows] += torch.where(finite[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        self._count[rows] += finite.to(torch.int64)

    def _fold_chain_mean(self) -> None:
        if self.reduce != "mean" or self._folded:
            return
        self._folded = True
        if bool((self._count == 0).any()):
            return  # a draw index no chain reached: devinterp's mean is NaN there (see dataset())
        step = max(1, self.accumulator.block_size)
        for start in range(0, self.num_draws, step):
            stop = min(self.num_draws, start + step)
            self.accumulator.update(self._sum[start:stop] / self._count[start:stop, None], check_finite=False)
        del self._sum

    def _why_nan(self) -> Optional[str]:
        if self.reduce == "mean" and self._folded and self.accumulator.count == 0 and self.num_draws:
            return "a draw index that no chain reached (an aborted chain)"
        if self.nonfinite and self.reduce == "stack":
            return f"non-finite losses in chains {self.nonfinite}"
        if self.accumulator.count < 2:
            return f"{self.accumulator.count} draws (a covariance needs 2)"
        return None

    # -- results -----------------------------------------------------------------------------
    def compute(self, metadata: Optional[dict] = None) -> LossKernel:
        """The kernel of the features over batch_index_range_1 ∪ _2: a :class:`LossKernel` over
        n_U·T (sequence, position) rows for the token-level kernel (``token_positions``
        [n, 2] = (batch index, target position 1…T)), or over n_U sequence means; rectangular
        (rows = batch_index_range_1's) unless that is all of them; ``input_ids`` [total, T + 1]
        of every sequence; ``metadata["bif"]`` the options and batch_index_range_2 (its
        columns). Refused (ValueError) where devinterp's numbers are NaN."""
        self._fold_chain_mean()
        why = self._why_nan()
        if why is not None:
            raise ValueError(f"no BIF kernel from these draws: {why}; devinterp's compute_bif gives NaN here")
        union = torch.from_numpy(self.union)
        if self.token_level:
            positions = torch.stack([union.repeat_interleave(self.width),
                                     torch.arange(1, self.width + 1).repeat(len(union))], dim=1)
            sample_ids = None
        else:
            positions, sample_ids = None, union.clone()
        info = {"correlation_method": self.correlation_method, "reduce_chain_dimension_method": self.reduce,
                "average_tokenwise_bif": self.average, "compute_covariance": self.covariance_only,
                "loss_keys": list(self.keys), "sizes": dict(self.sizes), "context_length": self.context_length,
                "token_level": self.token_level, "batch_index_range_1": self.range_1.tolist(),
                "batch_index_range_2": self.range_2.tolist(), "union": self.union.tolist(),
                "memory_bytes": self.memory_bytes}
        draws = dict(self.draws_per_chain) if self.reduce == "stack" else {0: int(self.accumulator.count)}
        kernel = self.accumulator.compute(draws_per_chain=draws, sample_ids=sample_ids,
                                          metadata={**(metadata or {}), "bif": info})
        kernel.token_positions = positions
        kernel.input_ids = self.input_ids
        if self.reduce == "mean":
            kernel.metadata["chain_mean_over"] = dict(self.draws_per_chain)
        return kernel

    def dataset(self, *, batch_size: int = 32):
        """devinterp's ``compute_bif`` output: ``influences`` (float32; dims and coords as
        devinterp's) and ``input_ids`` [batch, position]. NaN (with a warning) where devinterp's
        numbers are NaN: a chain with non-finite losses (stack), a draw index no chain reached
        (mean)."""
        self._fold_chain_mean()
        why = self._why_nan()
        if why is None:
            return influences_from_kernel(self.compute(), batch_size=batch_size)
        warnings.warn(f"bif: influences are NaN, as devinterp's: {why}", RuntimeWarning, stacklevel=2)
        n1, n2, T = len(self.range_1), len(self.range_2), self.context_length
        per_token = self.correlation_method == "token" and not self.average
        values = np.full((n1, n2, T, T) if per_token else (n1, n2), np.nan, dtype=np.float32)
        return _as_dataset(values, self.range_1, self.range_2, T, per_token, self.input_ids)


def _as_dataset(values: np.ndarray, range_1, range_2, T: int, per_token: bool, input_ids):
    import xarray as xr

    dims = ["batch_1", "batch_2"]
    coords: Dict[str, Any] = {"batch_1": np.asarray(range_1, np.int64), "batch_2": np.asarray(range_2, np.int64)}
    if per_token:
        dims += ["target_position", "target_position_T"]
        coords["target_position"] = np.arange(1, T + 1)
        coords["target_position_T"] = np.arange(1, T + 1)
    ds = xr.DataArray(values, name="influences", dims=dims, coords=coords).to_dataset()
    if input_ids is not None:
        ds["input_ids"] = xr.DataArray(np.asarray(input_ids), dims=("batch", "position"))
    return ds


def influences_from_kernel(kernel: LossKernel, *, compute_covariance: Optional[bool] = None,
                           average_tokenwise_bif: Optional[bool] = None, batch_size: int = 32):
    """devinterp's ``compute_bif`` Dataset from a BIF kernel (:meth:`BifMoments.compute`,
    :func:`~devinterp_losskernel.samples.kernel_from_samples` with BIF options).

    ``influences`` [batch_1, batch_2, target_position, target_position_T] (token method) or
    [batch_1, batch_2] (sequence method, or averaged), float32: the covariance block
    K[rows, columns] (batch_index_range_1 × batch_index_range_2), or the correlation
    K / (σ σ) (NaN where a variance is 0; clipped to [−1, 1] for the sequence method, as
    ``torch.corrcoef``), token pairs averaged when ``average_tokenwise_bif``. Computed
    ``batch_size`` query sequences at a time (temporaries: batch_size · T × n₂ · T float64).
    ``compute_covariance`` / ``average_tokenwise_bif`` default to the kernel's; a kernel
    folded as sequence means (covariance averaged) cannot give token-level numbers.
    """
    info = (kernel.metadata or {}).get("bif")
    if not isinstance(info, dict):
        raise ValueError("kernel is not a BIF kernel (no metadata['bif']): make it with BifMoments.compute(), bif("
                         "…, return_kernel=True) or kernel_from_samples(…, correlation_method=…)")
    covariance = info["compute_covariance"] if compute_covariance is None else bool(compute_covariance)
    average = info["average_tokenwise_bif"] if average_tokenwise_bif is None else bool(average_tokenwise_bif)
    method, T, token_level = info["correlation_method"], int(info["context_length"]), bool(info["token_level"])
    per_token = method == "token" and not average
    if method == "token" and not token_level and not (average and covariance):
        raise ValueError("this kernel holds sequence means (it was folded for average_tokenwise_bif=True, "
                         "compute_covariance=True): token-level influences need the token-level kernel")
    range_1, range_2 = np.asarray(info["batch_index_range_1"]), np.asarray(info["batch_index_range_2"])
    union = np.asarray(info["union"])
    where = np.full(int(max(union.max(), range_1.max(), range_2.max())) + 1, -1, dtype=np.int64)
    where[union] = np.arange(len(union))
    pos_2 = where[range_2]
    width = T if token_level else 1
    cov = kernel._need_covariance("influences").detach()  # read where it lives, block by block
    device = cov.device
    sd = kernel.variance.detach().to(device, torch.float64).sqrt().reshape(len(union), width)
    # the kernel's row r: the r-th query sequence's features (all of the union when square)
    square = kernel.rows is None
    cols = torch.from_numpy((pos_2[:, None] * width + np.arange(width)).ravel()).to(device)
    n1, n2 = len(range_1), len(range_2)
    out = np.empty((n1, n2, T, T) if per_token else (n1, n2), dtype=np.float32)
    for start in range(0, n1, int(batch_size)):
        stop = min(n1, start + int(batch_size))
        seqs = where[range_1[start:stop]] if square else np.arange(start, stop)
        row_idx = torch.from_numpy((seqs[:, None] * width + np.arange(width)).ravel()).to(device)
        block = cov[row_idx][:, cols].to(torch.float64)
        block = block.reshape(stop - start, width, n2, width).permute(0, 2, 1, 3)  # [b, n2, w, w]
        if not covariance:
            sd_1 = sd[torch.from_numpy(where[range_1[start:stop]]).to(device)]  # [b, w]
            sd_2 = sd[torch.from_numpy(pos_2).to(device)]  # [n2, w]
            block = block / (sd_1[:, None, :, None] * sd_2[None, :, None, :])
            if method == "sequence":
                block = block.clamp(-1.0, 1.0)
        block = block.mean(dim=(-1, -2)) if not per_token else block
        out[start:stop] = block.cpu().numpy().astype(np.float32)
    return _as_dataset(out, range_1, range_2, T, per_token, kernel.input_ids)


# -- bif(): sampling and moments in one pass -------------------------------------------------------
def bif(
    model: torch.nn.Module,
    dataset,
    observables: Dict[str, Any],
    *,
    lr: float,
    n_beta: float,
    param_masks: Optional[Dict[str, Optional[torch.Tensor]]] = None,
    correlation_method: str = "token",
    reduce_chain_dimension_method: str = "stack",
    average_tokenwise_bif: bool = False,
    compute_covariance: bool = False,
    bif_batch_size: int = 32,
    bif_device: Union[str, torch.device, None] = None,
    loss_fn=None,
    loss_keys: Union[str, List[str]] = "all",
    batch_index_range_1: Union[str, Sequence[int]] = "all",
    batch_index_range_2: Union[str, Sequence[int]] = "all",
    return_kernel: bool = False,
    **kwargs,
):
    """``devinterp.slt.bif.bif``, from streaming moments: one SGLD run (devinterp's own
    ``sample_single_chain`` per chain, seeded as ``sample()`` seeds it), every observable's
    per-token losses evaluated at every draw as ``sample()`` evaluates them (devinterp's
    ``Observable``, the chain's train mode) and folded into float64 moments, then dropped.

    Args:
        model, dataset, observables, lr, n_beta, param_masks, correlation_method,
        reduce_chain_dimension_method, average_tokenwise_bif, compute_covariance, loss_fn:
            devinterp's (see the module docstring for what each option computes).
        bif_batch_size: query sequences per block when the influences are read out.
        bif_device: where the moments live (default, as devinterp: CUDA if available).
        loss_keys, batch_index_range_1, batch_index_range_2: ``compute_bif``'s (devinterp's
            ``bif()`` uses all observables and all sequences): which observables (names or
            devinterp ids; ``"all"``: every one, sorted by id) and which of their concatenated
            sequences are the rows and the columns. Every observable is still evaluated at
            every draw, as ``sample()`` does (with dropout its random numbers shape the chains).
        return_kernel: also return the :class:`LossKernel` (token-level: (sequence, position)
            rows; :func:`influences_from_kernel` reads it).
        **kwargs: every other argument of devinterp's ``sample()`` (num_chains, num_draws,
            batch_size, …, device, save_metrics, output_path). Without ``output_path`` nothing
            is written; with it, devinterp's store is written as well (the path must not exist).

    Returns:
        devinterp's ``xarray.Dataset``: ``influences`` (float32) [batch_1, batch_2,
        target_position, target_position_T] (token method) or [batch_1, batch_2], coords
        ``batch_1``/``batch_2`` the batch indices and ``target_position(_T)`` 1…T; and
        ``input_ids`` [batch, position]. ``attrs["memory_bytes"]``: the moments' size. With
        ``return_kernel``: ``(dataset, kernel)`` (kernel None where the influences are NaN,
        as devinterp's are: a chain devinterp stopped at a non-finite loss).

    Memory: see :func:`estimate_bif_memory` (stated, and refused if it cannot fit, before any
    sampling); it does not grow with the draws except for ``reduce_chain_dimension_method="mean"``
    (8 · num_draws · features bytes).
    """
    from devinterp.slt.observables import to_obs_id


    # -- every argument checked before any forward pass -----------------------------------
    check_bif_options(correlation_method, reduce_chain_dimension_method, average_tokenwise_bif, compute_covariance,
                      bif_batch_size)
    if not isinstance(return_kernel, bool):
        raise TypeError(f"return_kernel must be True or False, got {return_kernel!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a per-token loss (model, input_ids) -> [B, T], got {loss_fn!r}")
    config, rest = sampler_config(kwargs, lr, n_beta, caller="bif", also_takes=(
        "correlation_method, reduce_chain_dimension_method, average_tokenwise_bif, compute_covariance, "
        "bif_batch_size, bif_device, loss_keys, batch_index_range_1/_2, return_kernel"))
    check_lm_sampling_arguments(model, observables, None, param_masks, rest["device"], config.batch_size,
                         rest["batches_per_draw"])
    if bif_device is not None:
        try:
            torch.device(bif_device)
        except (RuntimeError, TypeError):
            raise ValueError(f"bif_device must be a torch device such as 'cpu' or 'cuda:0', got {bif_device!r}") \
                from None
    ids_seen: Dict[str, str] = {}
    for key in observables:
        obs_id = to_obs_id(str(key))
        if obs_id in ids_seen:
            raise ValueError(f"observables {ids_seen[obs_id]!r} and {key!r} have the same devinterp id {obs_id!r}")
        ids_seen[obs_id] = key
    check_devinterp2_dataset(dataset, "dataset", tokens=loss_fn is None)
    context_length = len(dataset[0]["input_ids"]) - 1
    if context_length < 1:
        raise ValueError(f"Sequences must have length >= 2 for next-token loss (got {context_length + 1}).")
    sizes = {}
    for key, spec in observables.items():
        obs_dataset, per_draw = spec if isinstance(spec, tuple) else (spec, rest["batches_per_draw"])
        check_devinterp2_dataset(obs_dataset, f"observables[{key!r}]", tokens=loss_fn is None)
        check_lm_sampling_sizes(dataset, obs_dataset, key, config.batch_size, per_draw, None)
        sizes[to_obs_id(key)] = config.batch_size * per_draw
    keys = resolve_loss_keys(list(sizes), loss_keys)
    path = None
    if rest["output_path"] is not None:
        from .devinterp2_store import check_new_store_path

        path = check_new_store_path(rest["output_path"])
    device = rest["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    moments_device = bif_device if bif_device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    moments = BifMoments({k: sizes[k] for k in keys}, context_length, correlation_method=correlation_method,
                         reduce_chain_dimension_method=reduce_chain_dimension_method,
                         average_tokenwise_bif=average_tokenwise_bif, compute_covariance=compute_covariance,
                         batch_index_range_1=batch_index_range_1, batch_index_range_2=batch_index_range_2,
                         num_draws=config.num_draws, device=moments_device,
                         block_size=min(256, config.num_chains * config.num_draws))

    # -- the run ----------------------------------------------------------------------------------
    if param_masks is None:
        param_masks = {name: None for name, _ in model.named_parameters()}
    obs_list = make_observables(observables, config, context_length, device, rest["obs_seed"],
                                rest["batches_per_draw"], loss_fn)
    moments.input_ids = torch.cat([next(o for o in obs_list if o.obs_id == k).input_ids.detach().cpu()
                                   for k in keys])
    store = None
    if path is not None:
        from devinterp.slt.sampling import _write_init_loss

        from .devinterp2_store import SampleStore

        collect = CollectInitLoss(config.num_chains)
        _write_init_loss(collect, config, model, param_masks, dataset, device, loss_fn)  # devinterp's own code
        store = SampleStore(path, config, context_length, obs_list, model, param_masks, device)

    def on_draw(*, loss, draw, chain, model, **_):
        losses = {obs.obs_id: obs.compute_loss(model) for obs in obs_list}  # as sample()'s on_draw
        if store is not None:
            store.on_draw(loss, draw, chain, losses)
        moments.update({k: losses[k] for k in keys}, chain=chain, draw=draw)

    run_sample_chains(model, dataset, loss_fn, param_masks, config, lr=lr, n_beta=n_beta, device=device,
                      on_draw=on_draw, store=store,
                      init_loss=torch.stack(collect.rows) if store is not None else None)
    for chain in range(config.num_chains):  # devinterp stops a chain at a non-finite loss: NaN in its store
        got = moments.draws_per_chain.get(chain, 0)
        if got < config.num_draws:
            moments.nonfinite.setdefault(chain, f"devinterp stopped it after {got} of {config.num_draws} draws")
    moments._fold_chain_mean()
    kernel = None
    if moments._why_nan() is None:  # the kernel once: influences read from it, returned with it
        kernel = moments.compute(metadata={"source": "devinterp_losskernel.bif", "sampler_config": config.model_dump()})
        ds = influences_from_kernel(kernel, batch_size=bif_batch_size)
    else:
        ds = moments.dataset(batch_size=bif_batch_size)  # NaN, as devinterp's, with a warning
    ds.attrs["memory_bytes"] = int(moments.memory_bytes)
    if path is not None:
        ds.attrs["output_path"] = str(path)
    if not return_kernel:
        return ds
    return ds, kernel


def compute_bif(samples, *, correlation_method: str = "token", reduce_chain_dimension_method: str = "stack",
                loss_keys="all", batch_index_range_1="all", batch_index_range_2="all",
                average_tokenwise_bif: bool = False, compute_covariance: bool = False, batch_size: int = 32,
                device=None, draws_per_read: Optional[int] = None):
    """``devinterp.slt.bif.compute_bif`` of a stored ``sample()`` run, read ``draws_per_read``
    draws of one chain at a time (default: the store's chunk) into :class:`BifMoments`: memory
    the moments (:func:`estimate_bif_memory`) plus one chunk, not the whole store. Same
    arguments and output as devinterp's (``device``: where the moments live, default CPU)."""

    moments = bif_moments_from_samples(
        samples, correlation_method=correlation_method, reduce_chain_dimension_method=reduce_chain_dimension_method,
        loss_keys=loss_keys, batch_index_range_1=batch_index_range_1, batch_index_range_2=batch_index_range_2,
        average_tokenwise_bif=average_tokenwise_bif, compute_covariance=compute_covariance, device=device,
        draws_per_read=draws_per_read)
    check_bif_options(correlation_method, reduce_chain_dimension_method, average_tokenwise_bif, compute_covariance,
                      batch_size, "batch_size")
    return moments.dataset(batch_size=batch_size)


def bif_moments_from_samples(
    samples,
    *,
    correlation_method: str = "token",
    reduce_chain_dimension_method: str = "stack",
    loss_keys: Union[str, Sequence[str]] = "all",
    batch_index_range_1: Union[str, Sequence[int]] = "all",
    batch_index_range_2: Union[str, Sequence[int]] = "all",
    average_tokenwise_bif: bool = False,
    compute_covariance: bool = False,
    device=None,
    dtype: torch.dtype = torch.float64,
    draws_per_read: Optional[int] = None,
    check_memory: bool = True,
):
    """The :class:`~devinterp_losskernel.devinterp2_bif.BifMoments` of a stored devinterp 2 ``sample()``
    run with ``compute_bif``'s options, folded ``draws_per_read`` draws of one chain at a time
    (default: the store's chunk along ``draw``): memory the moments
    (:func:`~devinterp_losskernel.devinterp2_bif.estimate_bif_memory`, checked before anything is read)
    plus one chunk [draws_per_read, Σ n_obs, T] float32, whatever the number of draws.

    ``loss_keys``: observable names or ids (``"all"``: every ``loss_<obs>`` of the store, sorted,
    as devinterp's ``_resolve_loss_keys``). Unwritten draws (a chain devinterp aborted: NaN in
    the store) make the influences NaN as in devinterp (``"stack"``), or are left out of that
    draw index's chain mean (``"mean"``, as xarray's NaN-skipping mean)."""
    from .validation import check_bif_options

    check_bif_options(correlation_method, reduce_chain_dimension_method, average_tokenwise_bif, compute_covariance)
    if draws_per_read is not None and (isinstance(draws_per_read, bool) or not isinstance(draws_per_read,
                                                                                          numbers.Integral)
                                       or draws_per_read < 1):
        raise ValueError(f"draws_per_read must be a positive int (draws read per chunk) or None, "
                         f"got {draws_per_read!r}")
    ds, source = open_samples(samples)
    available = [str(v)[len("loss_"):] for v in ds.data_vars if str(v).startswith("loss_")]
    if not available:
        raise KeyError("these samples hold no observable losses (no loss_<obs> array): not a sample() run with "
                       "observables")
    keys = resolve_loss_keys(available, loss_keys)
    shapes = {}
    for key in keys:
        var = ds[f"loss_{key}"]
        expected = ("chain", "draw", f"batch_{key}", "token_pos")
        if tuple(var.dims) != expected:
            raise ValueError(f"loss_{key} must have dims {expected} (devinterp 2's sample() layout), got "
                             f"{tuple(var.dims)}")
        shapes[key] = tuple(int(s) for s in var.shape)
    first = shapes[keys[0]]
    for key, shape in shapes.items():
        if (shape[0], shape[1], shape[3]) != (first[0], first[1], first[3]):
            raise ValueError(f"loss_{key} has {shape[0]} chains × {shape[1]} draws × {shape[3]} positions, but "
                             f"loss_{keys[0]} has {first[0]} × {first[1]} × {first[3]}")
    num_chains, num_draws, _, context_length = first
    if not (num_chains and num_draws):
        raise ValueError(f"the observables' losses of these samples are empty: {num_chains} chains × {num_draws} "
                         "draws")
    input_ids = {}
    for key in keys:
        if f"input_ids_{key}" in ds.data_vars:
            value = np.asarray(ds[f"input_ids_{key}"].values)
            while value.ndim > 2:
                value = value[0]
            input_ids[key] = torch.from_numpy(value)
    moments = BifMoments({k: shapes[k][2] for k in keys}, context_length, correlation_method=correlation_method,
                         reduce_chain_dimension_method=reduce_chain_dimension_method,
                         average_tokenwise_bif=average_tokenwise_bif, compute_covariance=compute_covariance,
                         batch_index_range_1=batch_index_range_1, batch_index_range_2=batch_index_range_2,
                         num_draws=num_draws, input_ids=input_ids if len(input_ids) == len(keys) else None,
                         device=device, dtype=dtype, block_size=min(256, num_chains * num_draws),
                         check_memory=check_memory)
    readers = {k: StoreReader(ds, ds[f"loss_{k}"], f"loss_{k}", source) for k in keys}
    step = int(draws_per_read or readers[keys[0]].chunk)
    for chain in range(num_chains):
        for start in range(0, num_draws, step):
            stop = min(num_draws, start + step)
            losses = {k: torch.from_numpy(reader._read(f"loss_{k}", chain, start, stop))
                      for k, reader in readers.items()}
            moments.update(losses, chain=chain, draw=start)
    return moments
