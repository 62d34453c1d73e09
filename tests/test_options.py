"""The callback's option groups (options.py): each checks its values; flat keyword arguments
fill the groups, and a group given both ways is refused."""

from __future__ import annotations

import pytest
import torch

from devinterp_losskernel import DivergenceGuard, KernelStorage, ProbeOptions, SnapshotSchedule
from devinterp_losskernel.options import groups_from


@pytest.mark.parametrize("make, match", [
    (lambda: ProbeOptions(batch_size=0), "batch_size must be a positive int"),
    (lambda: ProbeOptions(autocast_dtype="bf16"), "autocast_dtype must be a torch.dtype"),
    (lambda: KernelStorage(mode="sparse"), "mode"),
    (lambda: DivergenceGuard(tolerance=-1.0), "divergence_tolerance must be a positive number or None"),
    (lambda: DivergenceGuard(window=-1), "divergence_window must be a non-negative int"),
    (lambda: DivergenceGuard(drift_tolerance=0), "drift_tolerance must be a positive number"),
    (lambda: SnapshotSchedule(every=0), "snapshot_every must be a positive int"),
    (lambda: SnapshotSchedule(every=[1, 5]), "draw counts must be at least 2"),
])
def test_bad_values_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_defaults():
    assert ProbeOptions().batch_size == 512 and KernelStorage().dtype == torch.float64
    assert DivergenceGuard() == DivergenceGuard(tolerance=100.0, window=16, drift_tolerance=1.0)
    assert SnapshotSchedule().every is None
    assert SnapshotSchedule(every=5).every == (5, None)
    assert SnapshotSchedule(every=[4, 2]).every == (None, frozenset({2, 4}))


def test_flat_arguments_fill_the_groups():
    groups = groups_from({}, {"batch_size": 7, "divergence_window": 3, "snapshot_every": 4, "mode": "diagonal"})
    assert groups["probe_options"] == ProbeOptions(batch_size=7)
    assert groups["divergence"] == DivergenceGuard(window=3)
    assert groups["snapshot_schedule"].every == (4, None)
    assert groups["storage"].mode == "diagonal"
    given = DivergenceGuard(tolerance=None)
    assert groups_from({"divergence": given}, {})["divergence"] is given


def test_a_group_given_both_ways_or_an_unknown_name_is_refused():
    with pytest.raises(TypeError, match=r"pass either divergence=DivergenceGuard\(...\) or its flat arguments "
                                        r"\['divergence_window'\], not both"):
        groups_from({"divergence": DivergenceGuard()}, {"divergence_window": 2})
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['batchsize'\]"):
        groups_from({}, {"batchsize": 3})
    with pytest.raises(TypeError, match="storage must be a KernelStorage, got dict"):
        groups_from({"storage": {"mode": "full"}}, {})
