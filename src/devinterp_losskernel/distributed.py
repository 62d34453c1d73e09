"""Exact merge of :class:`KernelAccumulator` states across ``torch.distributed`` ranks.

Each rank (process, GPU, node) runs its share of the SGLD chains and folds their draws into
its own accumulator. :func:`all_reduce_accumulator` then turns every rank's state into the
state of *all* draws, as if one accumulator had seen them, with two small all-reduces of
counts and means and one all-reduce of the co-moment:

1. flush the buffer; gather every rank's count N_r and mean μ_r (an all-reduce of a
   zero-padded [world, n + 1] table, so it works on every backend: gloo on CPU or GPU,
   NCCL, MPI);
2. every rank computes the same global mean  μ = Σ_r N_r μ_r / N,  N = Σ_r N_r
   (as μ_0 + Σ_r N_r (μ_r − μ_0) / N, so a huge common offset costs no digits);
3. every rank corrects its own co-moment *in place* to the global mean,

       M2_r ← M2_r + N_r (μ_r − μ)(μ_r − μ)ᵀ        (rows (μ_r − μ)[rows] when rectangular)
       m2_diag_r ← m2_diag_r + N_r (μ_r − μ)²

   which is exactly Σ_{t ∈ r} (ℓ_t − μ)(ℓ_t − μ)ᵀ;
4. one all-reduce (SUM) of the corrected co-moments gives M2 = Σ_t (ℓ_t − μ)(ℓ_t − μ)ᵀ
   (plus one of the [n] diagonal vector).

This is the k-way form of the pairwise update of Chan, Golub & LeVeque used by
:func:`~devinterp_losskernel.accumulator.merge_moments`; nothing of the form Σℓℓᵀ − Nμμᵀ is
formed, so it stays exact when losses have a huge mean and a tiny variance. The n×n
co-moment is reduced in place: no second n×n buffer is allocated.

Launch example — ``torchrun --nproc_per_node=4 run_kernel.py`` with ``run_kernel.py``::

    import os, torch, torch.distributed as dist
    from devinterp.slt.sampler import sample                     # devinterp 1.x
    from devinterp_losskernel import LossKernelCallback
    from devinterp_losskernel.distributed import all_reduce_accumulator, shard_chains
    from devinterp_losskernel.estimate import chain_seeds

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    model, loader, probe = build_model_loader_and_probe()       # identical on every rank
    model = model.to(device)
    num_chains, seeds = 15, chain_seeds(0, 15)                  # global chain c has seeds[c]
    mine = shard_chains(num_chains, rank, world)                # e.g. rank 0 → [0, 1, 2, 3]

    cb = LossKernelCallback(probe)
    cb.allocate(model)               # every rank needs an accumulator, even with no chains
    if mine:
        sample(model, loader, callbacks=[cb], evaluate=evaluate,
               optimizer_kwargs=dict(lr=5e-5, nbeta=20.0, localization=4000.0),
               num_chains=len(mine), seed=[seeds[c] for c in mine],
               num_draws=500, num_burnin_steps=100, device=device, cores=1, verbose=False)
    cb.finalize()                    # fold the draws still held back (divergence_window)
    all_reduce_accumulator(cb.accumulator)                      # every rank: all 15 chains
    if rank == 0:
        cb.accumulator.compute().save("kernel.pt")
    dist.destroy_process_group()

Only the accumulator is merged; per-chain bookkeeping of the callback
(``draws_per_chain``, …) stays per rank.
"""

from __future__ import annotations

import hashlib
from typing import List, Optional

import torch

from .accumulator import KernelAccumulator

__all__ = ["all_reduce_accumulator", "shard_chains"]

_DTYPE_CODES = {torch.float32: 32, torch.float64: 64}


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group(...) "
            "first (e.g. launch with torchrun), or use KernelAccumulator.merge() in one process"
        )
    return dist


def _rows_fingerprint(rows: Optional[torch.Tensor]) -> int:
    """A 62-bit fingerprint of the row indices (0 for a square accumulator)."""
    if rows is None:
        return 0
    digest = hashlib.sha256(rows.detach().cpu().to(torch.int64).numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 2 or 1


def _gather_rows(values: torch.Tensor, rank: int, world: int, group) -> torch.Tensor:
    """All ranks' ``values`` [k] as a [world, k] table, via one all-reduce of a zero-padded
    table (exact: every entry is a sum of one value and zeros). Unlike all_gather this works
    on every backend, including gloo with CUDA tensors."""
    dist = _dist()
    table = torch.zeros(world, values.numel(), dtype=values.dtype, device=values.device)
    table[rank] = values
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    return table


def all_reduce_accumulator(acc: KernelAccumulator, group=None) -> KernelAccumulator:
    """Merge the accumulators of all ranks of ``group`` exactly; every rank ends up with the
    state of all draws of all ranks (same count, mean and co-moment on every rank).

    Collective: every rank of ``group`` must call it, each with an accumulator of the same
    ``num_samples``, ``dtype`` and ``rows`` (checked on all ranks before any large transfer,
    so a mismatch raises ``ValueError`` everywhere instead of hanging). A rank with no draws
    takes part with count 0. The accumulator must live where the backend can reach it:
    a CUDA device for NCCL; CPU (or CUDA) for gloo.

    The co-moment is corrected and reduced in place, so if the collective itself fails
    (a rank dies) this rank's accumulator is left in an undefined state.

    Args:
        acc: this rank's accumulator; its buffer is flushed first.
        group: the process group (default: the world).

    Returns:
        ``acc``, now holding the merged state.
    """
    if not isinstance(acc, KernelAccumulator):
        raise TypeError(f"acc must be a KernelAccumulator, got {type(acc).__name__}")
    dist = _dist()
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl" and acc.device.type != "cuda":
        raise ValueError(
            f"the NCCL backend reduces CUDA tensors only, but the accumulator lives on "
            f"{acc.device}; create it on the rank's GPU (LossKernelCallback does so by default) "
            "or use a gloo process group for CPU accumulators"
        )
    acc.flush()
    moments = acc._moments
    device = acc.device

    # 1. Agree on the shape of the state before moving anything large.
    num_rows = moments.m2.shape[0]
    header = torch.tensor(
        [acc.num_samples, num_rows, _DTYPE_CODES[acc.dtype], _rows_fingerprint(acc.rows)],
        dtype=torch.int64, device=device,
    )
    headers = _gather_rows(header, rank, world, group).cpu()
    if not bool((headers == headers[0]).all()):
        described = ", ".join(
            f"rank {r}: num_samples={int(h[0])}, rows={int(h[1])}, float{int(h[2])}"
            + ("" if int(h[3]) == 0 else f", rows fingerprint={int(h[3]):x}")
            for r, h in enumerate(headers)
        )
        raise ValueError(
            "all ranks must merge accumulators with the same num_samples, dtype and rows; "
            f"got {described}"
        )

    # 2. Counts and means of every rank, in float64 (counts are exact below 2**53).
    mine = torch.empty(acc.num_samples + 1, dtype=torch.float64, device=device)
    mine[0] = moments.count
    mine[1:] = moments.mean
    table = _gather_rows(mine, rank, world, group)
    counts, means = table[:, 0], table[:, 1:]
    total = int(round(float(counts.sum())))
    if total == 0:
        return acc  # no draws anywhere: every rank already holds the (empty) merged state
    # Global mean around a reference rank's mean, so a large common offset loses no digits.
    # Every rank computes it from the same table, so every rank gets the same values.
    reference = means[int(torch.nonzero(counts > 0)[0, 0])]
    global_mean = reference + (counts[:, None] * (means - reference)).sum(dim=0) / total

    # 3. This rank's co-moment about the global mean.
    if moments.count > 0:
        delta = (means[rank] - global_mean).to(acc.dtype)
        rows_delta = delta if acc.rows is None else delta[acc.rows]
        moments.m2.addr_(rows_delta, delta, alpha=moments.count)
        moments.m2_diag.add_(delta.square(), alpha=moments.count)

    # 4. Sum the corrected co-moments: one all-reduce of M2, in place, and one of the diagonal.
    dist.all_reduce(moments.m2, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(moments.m2_diag, op=dist.ReduceOp.SUM, group=group)
    moments.mean.copy_(global_mean.to(acc.dtype))
    moments.count = total
    return acc


def shard_chains(num_chains: int, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> List[int]:
    """The global chain indices this rank runs: contiguous, balanced blocks (the first
    ``num_chains % world_size`` ranks get one chain more).

    ``rank``/``world_size`` default to torch.distributed's when it is initialized, else 0/1.
    Seed chain c with ``chain_seeds(seed, num_chains)[c]`` so the set of chains, and hence
    the merged kernel, does not depend on the number of ranks.

    >>> [shard_chains(15, r, 4) for r in range(4)]
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14]]
    >>> shard_chains(2, 3, 4)   # more ranks than chains: some ranks run none
    []
    """
    if rank is None or world_size is None:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        if world_size is None:
            world_size = dist.get_world_size() if initialized else 1
    for name, value, low in (("num_chains", num_chains, 0), ("world_size", world_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(num_chains, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))
