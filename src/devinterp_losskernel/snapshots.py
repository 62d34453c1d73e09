"""Snapshots: copies of K̂ on a fixed subset S of samples part-way through the run.

CKA(K̂_t[S, S], K̂[S, S]) against the number of draws t shows how fast the kernel settles
(paper, Fig. 6A); :func:`devinterp_losskernel.summary.snapshot_convergence` computes the curve.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from .accumulator import KernelAccumulator
from .options import SnapshotSchedule

__all__ = ["Snapshots"]


class Snapshots:
    """Take K̂_t[S, S] at the draw counts of a :class:`SnapshotSchedule`.

    Args:
        schedule: when, and on which samples.
        num_samples: n, the probe size.
        rows: the rows of a rectangular kernel (S is drawn from them), or None.
    """

    def __init__(self, schedule: SnapshotSchedule, num_samples: int, rows: Optional[torch.Tensor]):
        self.schedule = schedule
        self.indices = self._choose_indices(num_samples, rows)  # S, sorted; None without snapshots
        self.taken: List[Tuple[int, torch.Tensor]] = []

    @property
    def enabled(self) -> bool:
        return self.schedule.every is not None

    def _choose_indices(self, num_samples: int, rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.schedule.every is None:
            return None
        choice = self.schedule.rows
        pool = torch.arange(num_samples) if rows is None else rows.unique()
        if choice is None:
            return pool
        if isinstance(choice, int):
            if choice >= len(pool):
                return pool
            generator = torch.Generator().manual_seed(int(self.schedule.seed))  # ours, not the global one
            return pool[torch.randperm(len(pool), generator=generator)[:choice]].sort().values
        indices = torch.as_tensor(choice, dtype=torch.long).flatten()
        if indices.min() < 0 or indices.max() >= num_samples:
            raise ValueError(f"snapshot_rows must be sample indices in [0, {num_samples}), got "
                             f"values in [{int(indices.min())}, {int(indices.max())}]")
        if rows is not None and not bool(torch.isin(indices, pool).all()):
            raise ValueError("snapshot_rows must be among rows= in rectangular mode")
        return indices

    def maybe_take(self, accumulator: KernelAccumulator) -> None:
        """Copy K̂[S, S] to the CPU if the accumulator's draw count is on the schedule."""
        if self.schedule.every is None:
            return
        count = accumulator.count
        every, at = self.schedule.every
        if count >= 2 and ((every is not None and count % every == 0) or (at is not None and count in at)):
            self.taken.append((int(count), accumulator.covariance_block(self.indices).to("cpu", copy=True)))

    def reset(self) -> None:
        self.taken = []

    def state_dict(self) -> List[Tuple[int, torch.Tensor]]:
        return [(int(t), block.clone()) for t, block in self.taken]

    def load_state_dict(self, saved: List[Tuple[int, Any]]) -> None:
        self.taken = [(int(t), block) for t, block in saved]
