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

The same update, in its k-way form (:func:`merge_moments`), merges whole accumulators (other
chains, processes, GPUs), so the result does not depend on how draws were split. The state
(:class:`Moments`) is declared once here; what identifies it (n, rows, dtype, probe, sampler,
run id: :class:`~devinterp_losskernel.provenance.KernelIdentity`) travels with it through
``state_dict``/``load_state_dict``, ``clone``/``to``, merges and all-reduces, and states of
different identities are never mixed. Because nothing of the form Σ ℓℓᵀ − N μμᵀ is
formed, losses with a huge mean and a tiny variance lose no digits to cancellation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, Optional, Sequence, Tuple, Union

import torch

from . import distributed as _collectives
from .kernel import LossKernel
from .provenance import KernelIdentity, check_format_version, new_run_id

__all__ = ["KernelAccumulator", "KernelMemoryError", "Moments", "estimate_kernel_memory",
           "merge_moments", "validate_rows"]

DeviceLike = Union[str, torch.device, None]
STATE_FORMAT = "devinterp_losskernel.KernelAccumulator"
STATE_VERSION = 2


class KernelMemoryError(MemoryError):
    """The n×n co-moment would not fit on the requested device."""


# -- the state, declared once ----------------------------------------------------------------
@dataclass
class Moments:
    """Sufficient statistics of a set of draws — the whole state of an accumulator.

    count N; shift s [n] (float64): a fixed reference the draws are stored relative to (the
    first draw), so that a float32 state keeps its digits when the losses' mean dwarfs their
    spread; mean μ − s [n] (state dtype); co-moment M2 = Σ (ℓ − μ)(ℓ − μ)ᵀ over the kept rows
    and columns ([n, n] full, [q, n] rectangular, [q, q] combined; None in diagonal mode); and
    its diagonal Σ (ℓ − μ)² [n] for every sample (kept apart so variances stay exact whatever
    part of M2 is kept).
    """

    count: int
    shift: torch.Tensor
    mean: torch.Tensor
    m2: Optional[torch.Tensor]
    m2_diag: torch.Tensor

    TENSORS = ("shift", "mean", "m2", "m2_diag")

    @classmethod
    def zeros(cls, num_samples: int, m2_shape: Optional[Tuple[int, int]], device, dtype) -> "Moments":
        z = lambda *shape, dt=dtype: torch.zeros(*shape, device=device, dtype=dt)  # noqa: E731
        return cls(0, z(num_samples, dt=torch.float64), z(num_samples),
                   None if m2_shape is None else z(*m2_shape), z(num_samples))

    def copy(self, device=None) -> "Moments":
        """A deep copy (never an alias), optionally on another device."""
        move = lambda t: None if t is None else t.to(device=device or t.device, copy=True)  # noqa: E731
        return Moments(self.count, *(move(getattr(self, name)) for name in self.TENSORS))

    def absolute_mean(self) -> torch.Tensor:
        """μ in float64, [n]."""
        return self.shift + self.mean.double()


def _add_outer(m2: Optional[torch.Tensor], delta: torch.Tensor, alpha, rows, cols) -> None:
    """M2 += alpha · δ[rows] δ[cols]ᵀ (rows/cols None: all samples; M2 None: nothing kept)."""
    if m2 is not None:
        m2.addr_(delta if rows is None else delta[rows], delta if cols is None else delta[cols], alpha=alpha)


def merge_moments(parts: Sequence[Moments], rows: Optional[torch.Tensor] = None, *,
                  out: Optional[Moments] = None, cols: Optional[torch.Tensor] = None,
                  added: Sequence[Moments] = ()) -> Moments:
    """The k-way pairwise (Chan, Golub & LeVeque) merge of sets of draws:

        N = Σ_p N_p,  μ = Σ_p N_p μ_p / N,  M2 = Σ_p [M2_p + N_p (μ_p − μ)(μ_p − μ)ᵀ]

    with the means taken relative to the first non-empty part's shift (float64), so a huge
    common offset costs no digits. Pure: the parts are not changed and a new state is
    returned, unless ``out`` is given — then the result is written into ``out``'s tensors (which
    may be one of the parts, to merge in place without a second q×n tensor).
    ``rows`` / ``cols``: the samples of M2's rows and columns (None: all). ``added``: parts
    whose own co-moment the caller has already added into ``out`` (a freshly folded block).
    """
    if not parts:
        raise ValueError("parts must hold at least one Moments")
    template = parts[0]
    nonempty = [p for p in parts if p.count > 0]
    if out is None:
        out = Moments.zeros(template.mean.shape[0], None if template.m2 is None else tuple(template.m2.shape),
                            template.mean.device, template.mean.dtype)
    if not nonempty:
        out.count = 0
        return out
    dtype, device = out.mean.dtype, out.mean.device
    reference = nonempty[0].shift.to(device, copy=True)
    total = sum(p.count for p in nonempty)
    relative = [(p.shift.to(device) - reference) + p.mean.to(device).double() for p in nonempty]
    base = relative[0]
    mean = base + sum(p.count * (m - base) for p, m in zip(nonempty, relative)) / total
    if not any(p is out for p in parts):  # out is a fresh target: it starts from nothing
        if out.m2 is not None:
            out.m2.zero_()
        out.m2_diag.zero_()
    for part, rel in zip(nonempty, relative):
        if part is not out:
            if out.m2 is not None and not any(part is a for a in added):
                out.m2.add_(part.m2.to(device))
            out.m2_diag.add_(part.m2_diag.to(device))
        delta = (rel - mean).to(dtype)
        _add_outer(out.m2, delta, part.count, rows, cols)
        out.m2_diag.add_(delta.square(), alpha=part.count)
    out.shift = reference
    out.mean = mean.to(dtype)
    out.count = total
    return out

def validate_rows(rows, num_samples: int) -> torch.Tensor:
    """``rows`` as a [q] int64 CPU tensor of sample indices in [0, num_samples), or a
    ValueError naming ``rows`` and what was expected."""
    try:
        rows = torch.as_tensor(rows)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"rows must be a sequence of sample indices, got {type(rows).__name__}") from None
    if rows.numel() == 0:
        raise ValueError("rows must name at least one sample index, got an empty sequence")
    if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
        raise ValueError(f"rows must be integer sample indices, got dtype {rows.dtype}")
    rows = rows.to("cpu", torch.long).flatten()
    if rows.numel() == 0:
        raise ValueError("rows must name at least one sample index, got an empty sequence")
    if rows.min() < 0 or rows.max() >= num_samples:
        raise ValueError(
            f"rows must be indices in [0, {num_samples}), got values in "
            f"[{int(rows.min())}, {int(rows.max())}]"
        )
    return rows  # repeated rows are allowed: each is the same query row again, no draw counts twice


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


MODES = ("full", "diagonal", "combined")


def estimate_kernel_memory(
    num_samples: int, *, num_rows: Optional[int] = None, dtype: torch.dtype = torch.float64,
    block_size: int = 256, mode: str = "full",
) -> int:
    """Bytes the accumulator allocates: co-moment [q, n] (``mode="full"``; q = n unless
    ``num_rows`` is given), [q, q] (``"combined"``) or none (``"diagonal"``), plus the
    mean, diagonal and shift [n], a [block_size, n] buffer and the centred-block workspace
    (``"diagonal"``: one [n] row, each draw folded as it comes).
    Folding a block adds nothing q×n; ``compute()`` returns a new q×n covariance and
    ``LossKernel.correlation`` one more q×n, so budget 2–3× this to also read the results.

    >>> estimate_kernel_memory(10_000) / 1e9   # the n×n co-moment dominates: 8 n² bytes
    0.8412
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = num_samples if num_rows is None else num_rows
    comoment = {"full": rows * num_samples, "combined": rows * rows, "diagonal": 0}[mode]
    block = _block_rows(block_size, mode)
    return itemsize * (comoment + 2 * num_samples + 2 * block * num_samples) + 8 * num_samples


def _block_rows(block_size: int, mode: str) -> int:
    """Draws buffered before a fold. A block of B draws pays for its matrix product with one q×n
    product instead of B; the diagonal mode has none to save (its fold is O(n) per draw either
    way), so it buffers nothing and folds every draw as it comes (Welford, in place): no [B, n]
    buffer and no [B, n] centred block and square (a block of 256 float64 draws held ~6 KB a
    sample at its peak, for 24 B of state; benchmarks/RESULTS.md, "Diagonal mode's working memory")."""
    return 0 if mode == "diagonal" else block_size


class KernelAccumulator:
    """Streaming per-sample mean and co-moment of probe losses; ``compute()`` gives K and R.

    Args:
        num_samples: n, the number of probe samples (length of each loss vector).
        device: where the state lives (the model's device, normally). Default: CPU.
        dtype: storage and arithmetic dtype of the state. float64 by default; float32 halves
            memory. Draws are stored relative to the first draw (a float64 shift), so float32
            stays accurate when the losses' mean dwarfs their spread (mean 1e4, variance 1e-6).
        block_size: B, draws buffered before one [n, B] × [B, n] product folds them in.
            The default 256 keeps that product efficient (n = 4,000, 16,000 draws on a
            2-core CPU: 9.8 s at B = 64, 7.9 s at 256, 7.6 s at 1,024, against 5.7 s for
            numpy.cov of all stored draws; see benchmarks/RESULTS.md); the buffer costs B·n,
            small beside n².
        rows: optional sample indices; if given the co-moment is rectangular [len(rows), n]
            (query rows × all probe columns, the BIF shape) and costs |rows|·n memory.
            Variances of all n samples are still kept exactly.
        mode: ``"full"`` (the co-moment above), ``"diagonal"`` (no co-moment: only the mean
            and variance of every sample, O(n) memory — memorization scores and ν for a whole
            training set) or ``"combined"`` (the square kernel on the samples ``rows`` and the
            variance of every sample: |rows|² + O(n) memory, one probe pass over the union).
        check_memory: refuse with :class:`KernelMemoryError` when the state cannot fit.
        probe, sampler, run_id: the rest of the accumulator's :class:`KernelIdentity` (the
            probe's fingerprint, the SGLD arguments as a dict, a run id); the callback fills
            them in. Accumulators whose identities disagree are never merged or loaded into
            each other.

    Every accumulator also knows the *sources* of its draws (one random id per accumulator
    that received draws, the union after merges): a merge whose draws are already in —
    ``acc.merge(acc)``, the same accumulator merged twice, an all-reduce run twice — is
    refused instead of double-counting.

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
        probe: Optional[str] = None,
        sampler: Optional[dict] = None,
        run_id: Optional[str] = None,
        mode: str = "full",
    ):
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.num_samples = num_samples
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device must be available: got device={str(self.device)!r}, but "
                             "torch.cuda.is_available() is False here; use device='cpu'")
        self.dtype = dtype
        self.block_size = block_size
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "combined" and rows is None:
            raise ValueError("mode='combined' needs rows=<the samples of the full kernel>")
        if mode == "diagonal" and rows is not None:
            raise ValueError("mode='diagonal' keeps no co-moment, so rows= has no meaning there; "
                             "use mode='combined' for a full kernel on some samples beside all variances")
        self.mode = mode
        self.rows = None if rows is None else validate_rows(rows, num_samples).to(self.device)
        self._cols = self.rows if mode == "combined" else None
        num_rows = num_samples if self.rows is None else len(self.rows)
        m2_shape = {"full": (num_rows, num_samples), "combined": (num_rows, num_rows), "diagonal": None}[mode]
        if check_memory:
            self._check_memory(num_rows)
        self.identity = KernelIdentity(
            num_samples, rows=None if self.rows is None else self.rows.tolist(),
            dtype=str(dtype).removeprefix("torch."), probe=probe, sampler=sampler,
            run_id=run_id or new_run_id(), mode=mode)
        self._own_source = new_run_id()
        self.sources: FrozenSet[str] = frozenset()
        self._moments = Moments.zeros(num_samples, m2_shape, self.device, dtype)
        self._buffer = torch.empty(_block_rows(block_size, mode), num_samples, device=self.device, dtype=dtype)
        self._buffered = 0

    # -- validation -------------------------------------------------------------------------
    def _check_memory(self, num_rows: int) -> None:
        need = estimate_kernel_memory(
            self.num_samples, num_rows=num_rows, dtype=self.dtype, block_size=self.block_size, mode=self.mode
        )
        have = _available_bytes(self.device)
        if have is not None and need > have:
            shape = f"{num_rows}×{num_rows if self.mode == 'combined' else self.num_samples}"
            raise KernelMemoryError(
                f"KernelAccumulator(num_samples={self.num_samples}) needs {need / 2**30:.2f} GiB "
                f"on {self.device} for its {shape} co-moment in {self.dtype}, but only "
                f"{have / 2**30:.2f} GiB is available. Use a smaller probe set, "
                f"dtype=torch.float32, rows=<query indices> for a rectangular kernel, or "
                f"mode='diagonal' for the variances alone."
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
        return block.detach().to(device=self.device)  # never an autograd graph in the state

    # -- the verbs --------------------------------------------------------------------------
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
        if block.shape[0] == 0:
            return
        if check_finite and not bool(torch.isfinite(block).all()):
            raise ValueError(
                "losses contain NaN or Inf; drop those draws before update() "
                "(LossKernelCallback does this and reports the chain)"
            )
        if self.count == 0:  # the first draw becomes the shift the state is stored against
            self._moments.shift = block[0].to(torch.float64, copy=True)
        self.sources = self.sources | {self._own_source}
        shifted = (block.to(torch.float64) - self._moments.shift).to(self.dtype)
        if len(self._buffer) == 0:  # the diagonal mode: each draw folded as it comes
            for row in shifted:
                self._fold_draw(row)
            return
        start = 0
        while start < shifted.shape[0]:
            take = min(len(self._buffer) - self._buffered, shifted.shape[0] - start)
            self._buffer[self._buffered : self._buffered + take] = shifted[start : start + take]
            self._buffered += take
            start += take
            if self._buffered == len(self._buffer):
                self.flush()

    def _fold_draw(self, row: torch.Tensor) -> None:
        """Welford's update of (N, μ, diag M2) by one draw ``row`` [n] (shifted), in place: two
        [n] temporaries, no buffer."""
        m = self._moments
        m.count += 1
        delta = row - m.mean
        m.mean.add_(delta, alpha=1.0 / m.count)
        m.m2_diag.addcmul_(delta, row.sub_(m.mean))

    def flush(self) -> None:
        """Fold the buffered draws into (N, μ, M2) with one matrix product."""
        if self._buffered == 0:
            return
        block = self._buffer[: self._buffered]
        block_mean = block.mean(dim=0)
        centred = block - block_mean
        # the block's own co-moment straight into M2 (no second q×n tensor), then the merge
        if self._moments.m2 is not None:
            lhs = centred if self.rows is None else centred[:, self.rows]
            rhs = centred if self._cols is None else centred[:, self._cols]
            self._moments.m2.addmm_(lhs.T, rhs)
        part = Moments(self._buffered, self._moments.shift, block_mean, None, centred.square().sum(dim=0))
        merge_moments([self._moments, part], self.rows, out=self._moments, cols=self._cols, added=[part])
        self._buffered = 0

    def _check_mergeable(self, other: "KernelAccumulator", what: str) -> None:
        if not isinstance(other, KernelAccumulator):
            raise TypeError(f"other must be a KernelAccumulator, got {type(other).__name__}")
        if other is self:
            raise ValueError(f"{what}: an accumulator cannot be merged with itself (it would count "
                             "every draw twice); merge a clone() only if you mean to")
        self.identity.check_matches(other.identity, what=what, mine="this", theirs="other")
        overlap = self.sources & other.sources
        if overlap and other.count > 0:
            raise ValueError(
                f"{what}: other's draws are already in this accumulator (shared sources "
                f"{sorted(overlap)}); merging would count them twice. Merge each accumulator once.")

    def merge(self, other: "KernelAccumulator") -> "KernelAccumulator":
        """Fold another accumulator's draws into this one (exact; ``other`` is unchanged
        except that its buffer is flushed). Returns ``self``. Refused for itself, for an
        accumulator whose draws are already in, and for one of another identity."""
        self._check_mergeable(other, "merge")
        self.flush()
        other.flush()
        merge_moments([self._moments, other._moments.copy(self.device)], self.rows, out=self._moments,
                      cols=self._cols)
        self.identity = self.identity.combined(other.identity)
        self.sources = self.sources | other.sources
        return self

    @classmethod
    def merged(cls, accumulators: Iterable["KernelAccumulator"]) -> "KernelAccumulator":
        """A new accumulator holding the draws of all ``accumulators`` (none is changed except
        for flushing); the k-way form of :meth:`merge`."""
        accs = list(accumulators)
        if not accs:
            raise ValueError("accumulators must hold at least one KernelAccumulator")
        out = accs[0].clone()
        for acc in accs[1:]:
            out.merge(acc)
        return out

    def clone(self) -> "KernelAccumulator":
        """An independent copy: the same identity and the sources of the draws it holds
        (merging it back is refused); draws it receives later count as new ones."""
        return self.to(self.device, copy=True)

    def to(self, device: DeviceLike, *, copy: bool = False) -> "KernelAccumulator":
        """This accumulator on ``device`` (a new object when the device differs or ``copy``)."""
        device = torch.device(device) if device is not None else self.device
        if device == self.device and not copy:
            return self
        self.flush()
        new = object.__new__(KernelAccumulator)
        new.__dict__.update(self.__dict__)
        new.device = device
        new.rows = None if self.rows is None else self.rows.to(device, copy=True)
        new._cols = new.rows if self.mode == "combined" else None
        new._moments = self._moments.copy(device)
        new._buffer = torch.empty_like(self._buffer, device=device)
        new._buffered = 0
        new._own_source = new_run_id()  # its own later draws are new draws; the ones it holds are not
        return new

    def compute(self, **kernel_fields) -> LossKernel:
        """The unbiased kernel K = M2 / (N − 1) as a :class:`LossKernel`.

        Extra keyword arguments (``init_loss``, ``metadata``, …) are passed to LossKernel;
        the accumulator's identity is added to the metadata under ``"identity"``.
        """
        self.flush()
        n_draws = self._moments.count
        if n_draws < 2:
            raise ValueError(
                f"compute() needs at least 2 draws for an unbiased covariance (1/(N-1)), "
                f"got num_draws={n_draws}"
            )
        metadata = dict(kernel_fields.pop("metadata", None) or {})
        metadata.setdefault("identity", self.identity.to_dict())
        m2 = self._moments.m2
        return LossKernel(
            covariance=None if m2 is None else m2 / (n_draws - 1),
            mean=self._moments.absolute_mean().to(self.dtype),
            variance=self._moments.m2_diag / (n_draws - 1),
            num_draws=n_draws,
            rows=None if self.rows is None else self.rows.clone(),
            columns=None if self._cols is None else self._cols.clone(),
            metadata=metadata,
            **kernel_fields,
        )

    def covariance_block(self, indices) -> torch.Tensor:
        """K̂ restricted to ``indices`` × ``indices`` ([m, m], on the accumulator's device),
        from the draws so far (the buffer is flushed first). In rectangular mode the indices
        must be among ``rows``. Used for kernel snapshots during a run (CKA convergence)."""
        self.flush()
        if self._moments.m2 is None:
            raise ValueError("a diagonal-mode accumulator keeps no covariances (mode='diagonal')")
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
        col_pos = idx if self._cols is None else row_pos
        return self._moments.m2[row_pos][:, col_pos] / (self._moments.count - 1)

    def all_reduce(self, group=None) -> "KernelAccumulator":
        """Merge this accumulator exactly with those of all torch.distributed ranks of
        ``group``; every rank ends with the state of all draws of all ranks.

        Collective: every rank must call it. First every rank's identity, sources and count
        are gathered (small objects) and checked on every rank — the same n, rows, dtype,
        probe and sampler, and no draws on two ranks from the same source (an all-reduce run
        twice) — so a mismatch raises ``ValueError`` on all ranks instead of hanging or
        double-counting. Then counts and means are gathered (a [world, n + 1] table), each
        rank corrects its co-moment to the global mean in place,
        M2_r ← M2_r + N_r (μ_r − μ)(μ_r − μ)ᵀ, and one all-reduce (SUM) of M2 and one of its
        diagonal finish the k-way Chan merge (see :func:`merge_moments`). No second q×n
        buffer is allocated; if the collective itself fails (a rank dies) this rank's state
        is undefined. A rank with no draws takes part with count 0.
        """
        _collectives.check_backend_reaches(self.device, group)
        self.flush()
        infos = _collectives.all_gather_objects(
            {"identity": self.identity, "sources": sorted(self.sources), "count": self._moments.count}, group)
        problems = []
        for rank, info in enumerate(infos):
            diffs = infos[0]["identity"].differences(info["identity"])
            if diffs:
                problems.append(f"rank {rank}: " + ", ".join(
                    f"{name}={theirs!r} (rank 0: {mine!r})" for name, mine, theirs in diffs))
        seen: Dict[str, int] = {}
        for rank, info in enumerate(infos):
            if info["count"] == 0:
                continue
            for source in info["sources"]:
                if source in seen:
                    problems.append(f"ranks {seen[source]} and {rank} hold the same draws (source "
                                    f"{source}): was all_reduce called twice?")
                seen.setdefault(source, rank)
        if problems:
            raise ValueError("all ranks must merge accumulators of one kernel (the same num_samples, "
                             "rows, dtype, probe and sampler) and distinct draws; got " + "; ".join(problems))

        rank, world = _collectives.rank_and_world(group)
        moments = self._moments
        mine = torch.empty(self.num_samples + 1, dtype=torch.float64, device=self.device)
        mine[0] = moments.count
        mine[1:] = moments.absolute_mean() if moments.count else 0.0
        table = _collectives.gather_rows(mine, group)
        counts, means = table[:, 0], table[:, 1:]
        total = int(round(float(counts.sum())))
        if total > 0:
            # around a reference rank's mean, so a large common offset loses no digits;
            # every rank computes it from the same table and gets the same values
            reference = means[int(torch.nonzero(counts > 0)[0, 0])]
            global_mean = reference + (counts[:, None] * (means - reference)).sum(dim=0) / total
            if moments.count > 0:
                delta = (means[rank] - global_mean).to(self.dtype)
                _add_outer(moments.m2, delta, moments.count, self.rows, self._cols)
                moments.m2_diag.add_(delta.square(), alpha=moments.count)
            if moments.m2 is not None:
                _collectives.all_reduce_sum_(moments.m2, group)
            _collectives.all_reduce_sum_(moments.m2_diag, group)
            moments.shift = global_mean
            moments.mean = torch.zeros_like(moments.mean)
            moments.count = total
        identity = self.identity
        for info in infos:
            identity = identity.combined(info["identity"])
        self.identity = identity
        self.sources = frozenset(s for info in infos if info["count"] for s in info["sources"]) | \
            (self.sources if moments.count == 0 else frozenset())
        return self

    # -- state, for checkpoints and distributed merges --------------------------------------
    def state_dict(self) -> dict:
        """A copy of the whole state (buffer flushed first): never aliases the live tensors,
        so a saved snapshot does not change as more draws arrive. ``mean`` is μ in float64;
        ``identity`` and ``sources`` say which kernel and which draws it holds."""
        self.flush()
        m = self._moments
        return {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "identity": self.identity.to_dict(),
            "sources": sorted(self.sources),
            "num_samples": self.num_samples,
            "count": m.count,
            "shift": m.shift.detach().clone(),
            "mean": m.absolute_mean(),
            "m2": None if m.m2 is None else m.m2.detach().clone(),
            "m2_diag": m.m2_diag.detach().clone(),
            "rows": None if self.rows is None else self.rows.detach().clone(),
            "dtype": self.identity.dtype,
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace this accumulator's state by ``state`` (from :meth:`state_dict`).

        Every identity field is checked first — n, rows, dtype, and the probe fingerprint and
        sampler where both sides know them — and :class:`IdentityMismatchError` names each one
        that differs with both values. The run id and sources are taken from ``state``."""
        if not isinstance(state, dict) or "m2" not in state or "count" not in state:
            raise ValueError("state must be a dict from KernelAccumulator.state_dict()")
        check_format_version(state, "the accumulator state", kind="KernelAccumulator state", current=STATE_VERSION)
        if "identity" in state:
            saved = KernelIdentity.from_dict(state["identity"])
        else:  # a version-1 state: no identity or shift was kept
            rows = state.get("rows")
            saved = KernelIdentity(int(state["num_samples"]), rows=None if rows is None else
                                   torch.as_tensor(rows).tolist(), dtype=state["dtype"], run_id=self.identity.run_id)
        saved.check_matches(self.identity, what="load_state_dict", mine="state", theirs="accumulator",
                            advice="Load it into an accumulator built with the state's arguments.")
        expected = None if self._moments.m2 is None else tuple(self._moments.m2.shape)
        got = None if state["m2"] is None else tuple(state["m2"].shape)
        if got != expected:
            raise ValueError(f"state['m2'] must have shape {expected}, got {got}")
        mean = state["mean"].to(self.device, torch.float64)
        shift = state["shift"].to(self.device, torch.float64) if "shift" in state else torch.zeros_like(mean)
        self._buffered = 0
        self._moments = Moments(
            int(state["count"]), shift.clone(), (mean - shift).to(self.dtype),
            None if state["m2"] is None else state["m2"].to(self.device, self.dtype, copy=True),
            state["m2_diag"].to(self.device, self.dtype, copy=True),
        )
        self.identity = self.identity.combined(saved).with_known(run_id=saved.run_id)
        self.sources = frozenset(state.get("sources", [])) or (
            frozenset({self._own_source}) if int(state["count"]) else frozenset())

    def __repr__(self) -> str:
        shape = "square" if self.rows is None else f"rows={len(self.rows)}"
        shape = shape if self.mode == "full" else f"mode={self.mode}" + ("" if self.rows is None else f", {shape}")
        return (
            f"KernelAccumulator(num_samples={self.num_samples}, num_draws={self.count}, "
            f"{shape}, device={self.device}, dtype={self.dtype})"
        )
