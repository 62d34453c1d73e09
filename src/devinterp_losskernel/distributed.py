"""The torch.distributed collectives behind :meth:`KernelAccumulator.all_reduce`.

This module holds only collectives (gathering small objects and tables, summing tensors in
place, checking that the backend reaches a device) and the chain sharding; the merge itself
— what is gathered and how the co-moments are corrected — belongs to the accumulator, which
owns its state. Nothing here imports the accumulator, so the two never import each other.

Exact merge of :class:`~devinterp_losskernel.accumulator.KernelAccumulator` states across ranks:

Each rank (process, GPU, node) runs its share of the SGLD chains and folds their draws into
its own accumulator. :func:`all_reduce_accumulator` then turns every rank's state into the
state of *all* draws, as if one accumulator had seen them, with two small all-reduces of
counts and means and one all-reduce of the co-moment:

0. gather every rank's identity, draw sources and count, and refuse a mismatch on every
   rank (other n, rows, dtype, probe or sampler; the same draws on two ranks);
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
    cb.accumulator.all_reduce()                                 # every rank: all 15 chains
    if rank == 0:
        cb.accumulator.compute().save("kernel.pt")
    dist.destroy_process_group()

Only the accumulator is merged; per-chain bookkeeping of the callback
(``draws_per_chain``, …) stays per rank.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

__all__ = ["all_gather_objects", "all_reduce_accumulator", "all_reduce_sum_", "check_backend_reaches",
           "gather_rows", "rank_and_world", "shard_chains"]


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


def rank_and_world(group=None) -> Tuple[int, int]:
    """(this rank, number of ranks) in ``group``."""
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def check_backend_reaches(device: torch.device, group=None) -> None:
    """Refuse a state the backend cannot reduce (NCCL reduces CUDA tensors only)."""
    dist = _dist()
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"the NCCL backend reduces CUDA tensors only, but the accumulator lives on "
            f"{device}; create it on the rank's GPU (LossKernelCallback does so by default) "
            "or use a gloo process group for CPU accumulators"
        )


def all_gather_objects(obj: Any, group=None) -> List[Any]:
    """Every rank's ``obj`` (small, picklable), in rank order."""
    dist = _dist()
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_rows(values: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' ``values`` [k] as a [world, k] table, via one all-reduce of a zero-padded
    table (exact: every entry is a sum of one value and zeros). Unlike all_gather this works
    on every backend, including gloo with CUDA tensors."""
    dist = _dist()
    rank, world = rank_and_world(group)
    table = torch.zeros(world, values.numel(), dtype=values.dtype, device=values.device)
    table[rank] = values
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    return table


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place."""
    dist = _dist()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_accumulator(acc, group=None):
    """Merge the accumulators of all ranks of ``group`` exactly: ``acc.all_reduce(group)``
    (see :meth:`~devinterp_losskernel.accumulator.KernelAccumulator.all_reduce`). Returns ``acc``."""
    if not callable(getattr(acc, "all_reduce", None)) or not hasattr(acc, "state_dict"):
        raise TypeError(f"acc must be a KernelAccumulator, got {type(acc).__name__}")
    return acc.all_reduce(group)

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
