"""Snapshots (snapshots.py): K̂_t[S, S] taken at the scheduled draw counts equals the
covariance of the first t draws on S; S is fixed by the seed; state round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator
from devinterp_losskernel.options import SnapshotSchedule
from devinterp_losskernel.snapshots import Snapshots

N = 12


def draws(count=20, seed=0):
    return torch.randn(count, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(snapshots, losses, rows=None):
    acc = KernelAccumulator(N, block_size=4, rows=rows)
    for row in losses:
        acc.update(row[None])
        snapshots.maybe_take(acc)
    return acc


def test_snapshots_are_the_covariance_of_the_first_t_draws():
    losses = draws()
    snaps = Snapshots(SnapshotSchedule(every=6, rows=5, seed=3), N, None)
    run(snaps, losses)
    idx = snaps.indices.numpy()
    assert len(idx) == 5 and np.all(np.diff(idx) > 0)
    assert [t for t, _ in snaps.taken] == [6, 12, 18]
    for t, block in snaps.taken:
        assert block.device.type == "cpu"
        np.testing.assert_allclose(block.numpy(), np.cov(losses[:t, idx].numpy(), rowvar=False), rtol=1e-12)


def test_explicit_draw_counts_and_all_samples():
    snaps = Snapshots(SnapshotSchedule(every=[2, 7, 50]), N, None)
    run(snaps, draws())
    assert [t for t, _ in snaps.taken] == [2, 7] and torch.equal(snaps.indices, torch.arange(N))
    assert snaps.taken[0][1].shape == (N, N)


def test_the_seed_fixes_the_subset_and_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = Snapshots(SnapshotSchedule(every=2, rows=4, seed=7), N, None).indices
    b = Snapshots(SnapshotSchedule(every=5, rows=4, seed=7), N, None).indices
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a, Snapshots(SnapshotSchedule(every=2, rows=4, seed=8), N, None).indices)


def test_in_rectangular_mode_the_subset_comes_from_the_rows():
    rows = torch.tensor([9, 1, 4, 6])
    snaps = Snapshots(SnapshotSchedule(every=5, rows=3, seed=0), N, rows)
    assert set(snaps.indices.tolist()) <= {1, 4, 6, 9} and len(snaps.indices) == 3
    losses = draws()
    run(snaps, losses, rows=rows)
    idx = snaps.indices.numpy()
    t, block = snaps.taken[-1]
    np.testing.assert_allclose(block.numpy(), np.cov(losses[:t, idx].numpy(), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="snapshot_rows must be among rows="):
        Snapshots(SnapshotSchedule(every=5, rows=[0, 1]), N, rows)


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match=r"snapshot_rows must be sample indices in \[0, 12\)"):
        Snapshots(SnapshotSchedule(every=5, rows=[3, 12]), N, None)


def test_without_a_schedule_nothing_is_taken():
    snaps = Snapshots(SnapshotSchedule(), N, None)
    assert not snaps.enabled and snaps.indices is None
    run(snaps, draws(6))
    assert snaps.taken == []


def test_state_round_trips_as_copies_and_reset_empties():
    snaps = Snapshots(SnapshotSchedule(every=4), N, None)
    run(snaps, draws(9))
    saved = snaps.state_dict()
    saved[0][1].zero_()
    assert float(snaps.taken[0][1].abs().sum()) > 0          # a copy
    other = Snapshots(SnapshotSchedule(every=4), N, None)
    other.load_state_dict(snaps.state_dict())
    assert [t for t, _ in other.taken] == [4, 8]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(other.taken, snaps.taken))
    snaps.reset()
    assert snaps.taken == []
