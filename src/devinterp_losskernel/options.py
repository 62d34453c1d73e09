"""The callback's arguments in four named groups, each validated when it is made.

:class:`ProbeOptions` (how the probe is evaluated), :class:`KernelStorage` (where and how the
kernel is accumulated), :class:`DivergenceGuard` (when a chain counts as diverged) and
:class:`SnapshotSchedule` (copies of K̂ during the run). ``LossKernelCallback`` also takes
their fields by the flat names users already call (``batch_size=``, ``dtype=``, …).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch

__all__ = ["DivergenceGuard", "KernelStorage", "ProbeOptions", "SnapshotSchedule", "groups_from"]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# -- the callback's arguments, in four named groups -------------------------------------------
@dataclass(frozen=True)
class ProbeOptions:
    """How the probe is evaluated: ``batch_size`` (when the probe is not a DataLoader),
    ``autocast_dtype`` (e.g. torch.bfloat16 on GPU), ``channels_last`` (convolutional models),
    ``cache_on_device`` (True, False or "auto": keep the probe batches on the model's device)."""

    batch_size: int = 512
    autocast_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    cache_on_device: Union[bool, str] = "auto"

    def __post_init__(self):
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.autocast_dtype is not None and not isinstance(self.autocast_dtype, torch.dtype):
            raise ValueError(f"autocast_dtype must be a torch.dtype or None, got {self.autocast_dtype!r}")


@dataclass(frozen=True)
class KernelStorage:
    """Where and how the kernel is accumulated: ``device`` (default: the model's), ``dtype``
    (float64 default), ``block_size`` (draws per fold), ``rows`` (probe indices of a
    rectangular [len(rows), n] kernel, memory |rows|·n), ``mode``: ``"full"`` (default),
    ``"diagonal"`` (only each sample's mean and variance, O(n): memorization scores and ν for
    a whole training set) or ``"combined"`` (the full kernel on ``rows``, the variance of
    every sample)."""

    device: Union[str, torch.device, None] = None
    dtype: torch.dtype = torch.float64
    block_size: int = 256
    rows: Optional[Sequence[int]] = None
    mode: str = "full"

    def __post_init__(self):
        if self.mode not in ("full", "diagonal", "combined"):
            raise ValueError(f"mode must be 'full', 'diagonal' or 'combined', got {self.mode!r}")
        if self.mode == "combined" and self.rows is None:
            raise ValueError("mode='combined' needs rows=<the probe samples of the full kernel>")
        if self.mode == "diagonal" and self.rows is not None:
            raise ValueError("mode='diagonal' keeps no covariances, so rows= has no meaning there; "
                             "use mode='combined' for a full kernel on those rows beside all variances")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype!r}")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', "
                                 f"got {self.device!r}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device must be available: got device={str(self.device)!r}, but "
                                 "torch.cuda.is_available() is False here; use device='cpu' or None")


@dataclass(frozen=True)
class DivergenceGuard:
    """When a chain counts as diverged, and what is held back against it.

    tolerance: a draw whose mean probe loss exceeds the reference (the mean loss at w*, else
        the chain's first draw) by more than ``tolerance × (1 + |reference|)`` means the chain
        has diverged, as does a draw with a NaN/Inf probe loss. ``None``: only non-finite
        losses do.
    window: each chain's last ``window`` draws are held back ([window, n] memory) and folded
        in only when newer draws arrive or the chain ends. When a chain diverges, the held
        draws (the blow-up before the NaN, whose huge finite losses would otherwise dominate
        K̂), the diverging draw and all its later draws are left out and counted in
        ``rejected_per_chain``. 0 holds nothing back.
    drift_tolerance: warn (once per chain) when a draw's mean probe loss exceeds the mean loss
        at w* by more than ``drift_tolerance × (1 + |mean loss at w*|)``.
    """

    tolerance: Optional[float] = 100.0
    window: int = 16
    drift_tolerance: float = 1.0

    def __post_init__(self):
        if self.tolerance is not None and not (isinstance(self.tolerance, numbers.Real) and not isinstance(
                self.tolerance, bool) and math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(f"divergence_tolerance must be a positive number or None, got {self.tolerance!r}")
        if not _is_int(self.window) or self.window < 0:
            raise ValueError(f"divergence_window must be a non-negative int, got {self.window!r}")
        if not (isinstance(self.drift_tolerance, numbers.Real) and self.drift_tolerance > 0):
            raise ValueError(f"drift_tolerance must be a positive number, got {self.drift_tolerance!r}")


@dataclass(frozen=True)
class SnapshotSchedule:
    """Copies of K̂ part-way through the run, for CKA convergence (paper, Fig. 6A).

    every: an int t (after every t accepted draws) or a sequence of draw counts; None: none.
        Draws are counted over all chains, in the order the sampler delivers them.
    rows: which samples the snapshots keep — None (all n: each snapshot is n² numbers on the
        CPU), an int m (a fixed random subset of m samples, drawn with ``seed``), or a
        sequence of indices. In rectangular mode (``rows=`` of the storage) the subset is
        drawn from those rows.
    """

    every: Union[int, Sequence[int], None] = None
    rows: Union[int, Sequence[int], None] = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "every", _snapshot_schedule(self.every))
        object.__setattr__(self, "rows", _check_snapshot_rows(self.rows))


def _snapshot_schedule(snapshot_every):
    """(every, None) for an int, (None, {counts}) for a sequence, None for no snapshots."""
    if snapshot_every is None or (isinstance(snapshot_every, tuple) and len(snapshot_every) == 2
                                  and (snapshot_every[1] is None or isinstance(snapshot_every[1], frozenset))):
        return snapshot_every
    if _is_int(snapshot_every):
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be a positive int or a sequence of draw counts, "
                             f"got {snapshot_every!r}")
        return int(snapshot_every), None
    try:
        counts = [int(c) for c in snapshot_every]
    except (TypeError, ValueError):
        raise ValueError(f"snapshot_every must be a positive int or a sequence of draw counts, "
                         f"got {snapshot_every!r}") from None
    if not counts or min(counts) < 2:
        raise ValueError(f"snapshot_every's draw counts must be at least 2 (a covariance needs 2 draws), "
                         f"got {counts!r}")
    return None, frozenset(counts)


def _check_snapshot_rows(snapshot_rows):
    if snapshot_rows is None or isinstance(snapshot_rows, torch.Tensor) and snapshot_rows.dtype == torch.long:
        if isinstance(snapshot_rows, torch.Tensor) and snapshot_rows.numel() < 2:
            raise ValueError("snapshot_rows must name at least 2 sample indices")
        return snapshot_rows
    if _is_int(snapshot_rows):
        if snapshot_rows < 2:
            raise ValueError(f"snapshot_rows must be at least 2 samples (CKA needs a matrix), got {snapshot_rows!r}")
        return int(snapshot_rows)
    indices = torch.as_tensor(snapshot_rows, dtype=torch.long).flatten()
    if indices.numel() < 2:
        raise ValueError("snapshot_rows must name at least 2 sample indices")
    return indices


# flat keyword → (group, field): the flat names users already call keep working
_FLAT_ARGUMENTS = {
    "batch_size": ("probe_options", "batch_size"),
    "autocast_dtype": ("probe_options", "autocast_dtype"),
    "channels_last": ("probe_options", "channels_last"),
    "cache_probe_on_device": ("probe_options", "cache_on_device"),
    "device": ("storage", "device"),
    "dtype": ("storage", "dtype"),
    "block_size": ("storage", "block_size"),
    "rows": ("storage", "rows"),
    "mode": ("storage", "mode"),
    "divergence_tolerance": ("divergence", "tolerance"),
    "divergence_window": ("divergence", "window"),
    "drift_tolerance": ("divergence", "drift_tolerance"),
    "snapshot_every": ("snapshot_schedule", "every"),
    "snapshot_rows": ("snapshot_schedule", "rows"),
    "snapshot_seed": ("snapshot_schedule", "seed"),
}
_GROUPS = {"probe_options": ProbeOptions, "storage": KernelStorage, "divergence": DivergenceGuard,
           "snapshot_schedule": SnapshotSchedule}


def groups_from(groups: Dict[str, Any], flat: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(flat) - set(_FLAT_ARGUMENTS))
    if unknown:
        raise TypeError(f"LossKernelCallback got unexpected keyword arguments {unknown}; the groups are "
                        f"{sorted(_GROUPS)} and the flat names {sorted(_FLAT_ARGUMENTS)}")
    out = {}
    for name, cls in _GROUPS.items():
        given = groups.get(name)
        changes = {f: flat[k] for k, (g, f) in _FLAT_ARGUMENTS.items() if g == name and k in flat}
        if given is not None and not isinstance(given, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(given).__name__}")
        if given is not None and changes:
            both = sorted(k for k, (g, _) in _FLAT_ARGUMENTS.items() if g == name and k in flat)
            raise TypeError(f"pass either {name}={cls.__name__}(...) or its flat arguments {both}, not both")
        out[name] = given if given is not None else cls(**changes)
    return out


