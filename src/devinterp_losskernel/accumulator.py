"""Streaming, exact accumulation of the loss kernel's mean and co-moment.

Every SGLD draw w_{c,t} gives a loss vector ℓ_t = (ℓ(x_1; w_{c,t}), …, ℓ(x_n; w_{c,t})).
The paper's estimator (Appendix B) is

    μ̂(x)     = 1/N Σ_t ℓ(x; w_t)
    K̂(x, x') = 1/(N−1) Σ_t (ℓ(x; w_t) − μ̂(x)) (ℓ(x'; w_t) − μ̂(x'))      N = C·T

We never store the N loss vectors. The state is (N, μ, M2) with M2 = Σ_t (ℓ_t − μ)(ℓ_t − μ)ᵀ.
Draws are buffered B at a time; a full block is centred on *its own* mean and folded in
with one matrix product, then merged into the running state with the pairwise update of
Chan, Golub & LeVeque (1979):

    δ = μ_b − μ_a,   N = N_a + N_b
    μ  = μ_a + δ · N_b / N
    M2 = M2_a + M2_b + δ δᵀ · N_a N_b / N

The same update merges whole accumulators (other chains, processes, GPUs), so the result
does not depend on how draws were split. Because nothing of the form Σ ℓℓᵀ − N μμᵀ is
formed, losses with a huge mean and a tiny variance lose no digits to cancellation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .kernel import LossKernel

__all__ = ["KernelAccumulator", "KernelMemoryError", "estimate_kernel_memory", "merge_moments"]

DeviceLike = Union[str, torch.device, None]


class KernelMemoryError(MemoryError):
    """The n×n co-moment would not fit on the requested device."""


@dataclass
class Moments:
    """Sufficient statistics of a set of draws: count N, mean μ [n], co-moment M2 [q, n], and
    its diagonal part Σ (ℓ − μ)² [n] (kept apart so variances stay exact for rectangular M2)."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    m2_diag: torch.Tensor


def _fold(a: Moments, count_b: int, mean_b: torch.Tensor, add_m2_b, m2_diag_b: torch.Tensor,
          rows: Optional[torch.Tensor]) -> Moments:
    """The pairwise update of ``a`` with a set b of draws; ``add_m2_b(m2)`` adds b's own
    co-moment into ``m2`` in place (so no separate q×n tensor for b need exist)."""
    if count_b == 0:
        return a
    total = a.count + count_b
    delta = mean_b - a.mean
    weight = a.count * count_b / total
    add_m2_b(a.m2)
    a.m2.addr_(delta if rows is None else delta[rows], delta, alpha=weight)
    a.m2_diag.add_(m2_diag_b)
    a.m2_diag.add_(delta.square(), alpha=weight)
    a.mean.add_(delta, alpha=count_b / total)
    a.count = total
    return a


def merge_moments(a: Moments, b: Moments, rows: Optional[torch.Tensor] = None) -> Moments:
    """Pairwise (Chan et al.) merge of two sets of moments; updates and returns ``a``.

    ``a.mean``/``b.mean``: [n]; ``a.m2``/``b.m2``: [q, n] where q = n, or q = len(rows) for a
    rectangular co-moment whose rows are the samples ``rows``. ``b`` is left unchanged.
    """
    return _fold(a, b.count, b.mean, lambda m2: m2.add_(b.m2), b.m2_diag, rows)


def _available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` in bytes, or None where it cannot be told."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def estimate_kernel_memory(
    num_samples: int, *, num_rows: Optional[int] = None, dtype: torch.dtype = torch.float64,
    block_size: int = 256,
) -> int:
    """Bytes the accumulator allocates: co-moment [q, n], mean [n], a [block_size, n] buffer
    and the centred-block workspace, all in ``dtype``. q = n unless ``num_rows`` is given.
    Folding a block adds nothing q×n; ``compute()`` returns a new q×n covariance and
    ``LossKernel.correlation`` one more q×n, so budget 2–3× this to also read the results.

    >>> estimate_kernel_memory(10_000) / 1e9   # the n×n co-moment dominates: 8 n² bytes
    0.84104
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = num_samples if num_rows is None else num_rows
    return itemsize * (rows * num_samples + num_samples + 2 * block_size * num_samples)


class KernelAccumulator:
    """Streaming per-sample mean and co-moment of probe losses; ``compute()`` gives K and R.

    Args:
        num_samples: n, the number of probe samples (length of each loss vector).
        device: where the state lives (the model's device, normally). Default: CPU.
        dtype: storage and arithmetic dtype of the state. float64 by default; float32 halves
            memory at the cost of ~1e-7 relative rounding per fold.
        block_size: B, draws buffered before one [n, B] × [B, n] product folds them in.
            The default 256 keeps that product efficient (n = 4,000, 16,000 draws on a
            2-core CPU: 9.8 s at B = 64, 7.9 s at 256, 7.6 s at 1,024, against 5.7 s for
            numpy.cov of all stored draws; see benchmarks/RESULTS.md); the buffer costs B·n,
            small beside n².
        rows: optional sample indices; if given the co-moment is rectangular [len(rows), n]
            (query rows × all probe columns, the BIF shape) and costs |rows|·n memory.
            Variances of all n samples are still kept exactly.
        check_memory: refuse with :class:`KernelMemoryError` when the state cannot fit.

    Example:
        >>> acc = KernelAccumulator(3)
        >>> acc.update(torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [3.0, 6.0, 0.0]]))
        >>> k = acc.compute()
        >>> k.covariance.tolist()
        [[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 0.0]]
        >>> k.correlation.tolist()
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """

    def __init__(
        self,
        num_samples: int,
        *,
        device: DeviceLike = None,
        dtype: torch.dtype = torch.float64,
        block_size: int = 256,
        rows: Optional[Sequence[int] | torch.Tensor] = None,
        check_memory: bool = True,
    ):
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.num_samples = num_samples
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.block_size = block_size
        self.rows = self._validate_rows(rows)
        num_rows = num_samples if self.rows is None else len(self.rows)
        if check_memory:
            self._check_memory(num_rows)
        self._moments = Moments(
            0,
            torch.zeros(num_samples, device=self.device, dtype=dtype),
            torch.zeros(num_rows, num_samples, device=self.device, dtype=dtype),
            torch.zeros(num_samples, device=self.device, dtype=dtype),
        )
        self._buffer = torch.empty(block_size, num_samples, device=self.device, dtype=dtype)
        self._buffered = 0

    # -- validation -------------------------------------------------------------------------
    def _validate_rows(self, rows) -> Optional[torch.Tensor]:
        if rows is None:
            return None
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        if rows.numel() == 0:
            raise ValueError("rows must name at least one sample index, got an empty sequence")
        if rows.min() < 0 or rows.max() >= self.num_samples:
            raise ValueError(
                f"rows must be indices in [0, {self.num_samples}), got values in "
                f"[{int(rows.min())}, {int(rows.max())}]"
            )
        return rows.to(self.device)

    def _check_memory(self, num_rows: int) -> None:
        need = estimate_kernel_memory(
            self.num_samples, num_rows=num_rows, dtype=self.dtype, block_size=self.block_size
        )
        have = _available_bytes(self.device)
        if have is not None and need > have:
            shape = f"{num_rows}×{self.num_samples}"
            raise KernelMemoryError(
                f"KernelAccumulator(num_samples={self.num_samples}) needs {need / 2**30:.2f} GiB "
                f"on {self.device} for its {shape} co-moment in {self.dtype}, but only "
                f"{have / 2**30:.2f} GiB is available. Use a smaller probe set, "
                f"dtype=torch.float32, or rows=<query indices> for a rectangular kernel."
            )

    def _as_block(self, losses) -> torch.Tensor:
        block = torch.as_tensor(losses)
        if block.dim() == 1:
            block = block.unsqueeze(0)
        if block.dim() != 2 or block.shape[1] != self.num_samples:
            raise ValueError(
                f"losses must have shape [draws, num_samples] = [*, {self.num_samples}] "
                f"(or [{self.num_samples}] for one draw), got {tuple(block.shape)}"
            )
        if not (block.is_floating_point()):
            raise ValueError(f"losses must be floating point, got dtype {block.dtype}")
        return block.to(device=self.device, dtype=self.dtype)

    # -- the three verbs --------------------------------------------------------------------
    @property
    def count(self) -> int:
        """N, the number of draws folded in or buffered."""
        return self._moments.count + self._buffered

    def update(self, losses, *, check_finite: bool = True) -> None:
        """Fold in a block of draws.

        Args:
            losses: [draws, n] (or [n] for a single draw), any float dtype and device; all
                values must be finite (the callback drops non-finite draws before this).
            check_finite: verify that (one device sync); skip only if the caller has.
        """
        block = self._as_block(losses)
        if check_finite and not bool(torch.isfinite(block).all()):
            raise ValueError(
                "losses contain NaN or Inf; drop those draws before update() "
                "(LossKernelCallback does this and reports the chain)"
            )
        start = 0
        while start < block.shape[0]:
            take = min(self.block_size - self._buffered, block.shape[0] - start)
            self._buffer[self._buffered : self._buffered + take] = block[start : start + take]
            self._buffered += take
            start += take
            if self._buffered == self.block_size:
                self.flush()

    def flush(self) -> None:
        """Fold the buffered draws into (N, μ, M2) with one matrix product."""
        if self._buffered == 0:
            return
        block = self._buffer[: self._buffered]
        block_mean = block.mean(dim=0)
        centred = block - block_mean
        lhs = centred if self.rows is None else centred[:, self.rows]
        # M2 += centredᵀ centred in place: no second q×n tensor at any time.
        _fold(self._moments, self._buffered, block_mean, lambda m2: m2.addmm_(lhs.T, centred),
              centred.square().sum(dim=0), self.rows)
        self._buffered = 0

    def merge(self, other: "KernelAccumulator") -> "KernelAccumulator":
        """Fold another accumulator's draws into this one (exact; ``other`` is unchanged
        except that its buffer is flushed). Returns ``self``."""
        if not isinstance(other, KernelAccumulator):
            raise TypeError(f"other must be a KernelAccumulator, got {type(other).__name__}")
        if other.num_samples != self.num_samples:
            raise ValueError(
                f"other.num_samples must equal this accumulator's num_samples="
                f"{self.num_samples}, got {other.num_samples}"
            )
        if other.dtype != self.dtype:
            raise ValueError(f"other.dtype must be {self.dtype}, got {other.dtype}")
        same_rows = (self.rows is None and other.rows is None) or (
            self.rows is not None and other.rows is not None
            and torch.equal(self.rows.cpu(), other.rows.cpu())
        )
        if not same_rows:
            raise ValueError("other.rows must equal this accumulator's rows (both None or equal)")
        self.flush()
        other.flush()
        theirs = Moments(
            other._moments.count,
            other._moments.mean.to(self.device),
            other._moments.m2.to(self.device),
            other._moments.m2_diag.to(self.device),
        )
        merge_moments(self._moments, theirs, self.rows)
        return self

    def compute(self, **kernel_fields) -> LossKernel:
        """The unbiased kernel K = M2 / (N − 1) as a :class:`LossKernel`.

        Extra keyword arguments (``init_loss``, ``metadata``, …) are passed to LossKernel.
        """
        self.flush()
        n_draws = self._moments.count
        if n_draws < 2:
            raise ValueError(
                f"compute() needs at least 2 draws for an unbiased covariance (1/(N-1)), "
                f"got num_draws={n_draws}"
            )
        return LossKernel(
            covariance=self._moments.m2 / (n_draws - 1),
            mean=self._moments.mean.clone(),
            variance=self._moments.m2_diag / (n_draws - 1),
            num_draws=n_draws,
            rows=None if self.rows is None else self.rows.clone(),
            **kernel_fields,
        )

    def covariance_block(self, indices) -> torch.Tensor:
        """K̂ restricted to ``indices`` × ``indices`` ([m, m], on the accumulator's device),
        from the draws so far (the buffer is flushed first). In rectangular mode the indices
        must be among ``rows``. Used for kernel snapshots during a run (CKA convergence)."""
        self.flush()
        if self._moments.count < 2:
            raise ValueError(f"a covariance needs at least 2 draws, got num_draws={self._moments.count}")
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device).flatten()
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= self.num_samples:
            raise ValueError(f"indices must be non-empty sample indices in [0, {self.num_samples})")
        if self.rows is None:
            row_pos = idx
        else:
            position = torch.full((self.num_samples,), -1, dtype=torch.long, device=self.device)
            position[self.rows] = torch.arange(len(self.rows), device=self.device)
            row_pos = position[idx]
            if bool((row_pos < 0).any()):
                raise ValueError("indices must be among the accumulator's rows (rectangular mode)")
        return self._moments.m2[row_pos][:, idx] / (self._moments.count - 1)

    def all_reduce(self, group=None) -> "KernelAccumulator":
        """Merge this accumulator exactly with those of all torch.distributed ranks of
        ``group``; see :func:`devinterp_losskernel.distributed.all_reduce_accumulator`."""
        from .distributed import all_reduce_accumulator

        return all_reduce_accumulator(self, group)

    # -- state, for checkpoints and distributed merges --------------------------------------
    def state_dict(self) -> dict:
        """Tensors and counts that fully describe the accumulator (buffer flushed first)."""
        self.flush()
        return {
            "num_samples": self.num_samples,
            "count": self._moments.count,
            "mean": self._moments.mean,
            "m2": self._moments.m2,
            "m2_diag": self._moments.m2_diag,
            "rows": self.rows,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"state['num_samples'] must be {self.num_samples}, got {state['num_samples']}"
            )
        if state["dtype"] != str(self.dtype).removeprefix("torch."):
            raise ValueError(f"state['dtype'] must be {self.dtype}, got {state['dtype']}")
        if state["m2"].shape != self._moments.m2.shape:
            raise ValueError(
                f"state['m2'] must have shape {tuple(self._moments.m2.shape)}, "
                f"got {tuple(state['m2'].shape)}"
            )
        self._buffered = 0
        self._moments = Moments(
            int(state["count"]),
            state["mean"].to(self.device, self.dtype).clone(),
            state["m2"].to(self.device, self.dtype).clone(),
            state["m2_diag"].to(self.device, self.dtype).clone(),
        )

    def __repr__(self) -> str:
        shape = "square" if self.rows is None else f"rows={len(self.rows)}"
        return (
            f"KernelAccumulator(num_samples={self.num_samples}, num_draws={self.count}, "
            f"{shape}, device={self.device}, dtype={self.dtype})"
        )
