"""devinterp's float32 mean, streamed: the same bits without keeping the array.

devinterp 2's ``compute_llc`` takes ``llc_scalar`` from ``float(ds.sampling_loss_micro.mean())``:
xarray's NaN-skipping mean of a float32 array [chain, step, batch, token], which numpy computes as
a float32 *pairwise* sum of the flattened array (NaN read as 0) divided by the count of
non-NaN values. A float64 sum differs from it in the last digits (~1e-6 relative), so a twin
that promises devinterp's numbers bit for bit must add the same float32 numbers in the same
tree. :class:`StreamingFloat32Mean` does that from the values as they arrive, in O(log N)
memory: the shape of numpy's tree depends only on N, so each leaf block (≤ 128 values) is
summed as soon as it is complete and merged into its parent as soon as its sibling is.

numpy's pairwise sum of n float32 values (``numpy/_core/src/umath/loops_utils.h.src``):
n < 8: left to right; n ≤ 128: eight running sums over strides of 8, combined as
((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), then the n mod 8 rest left to right; else
the first ⌊n/2⌋ rounded down to a multiple of 8, and the rest, summed apart and added.
``tests/test_float32_mean.py`` checks it against numpy and xarray on arrays of many sizes.
"""

from __future__ import annotations

from typing import Generator

import numpy as np

__all__ = ["StreamingFloat32Mean", "pairwise_sum_float32"]

_BLOCK = 128
_f32 = np.float32


def _leaf_sum(values: np.ndarray) -> np.float32:
    """numpy's float32 sum of one leaf block (n ≤ 128), bit for bit."""
    n = len(values)
    if n < 8:
        total = _f32(0.0)
        for v in values:
            total = _f32(total + v)
        return total
    whole = n - n % 8
    r = values[:8].copy()
    for start in range(8, whole, 8):
        r += values[start:start + 8]  # float32 in place: the eight running sums
    total = _f32(_f32(_f32(r[0] + r[1]) + _f32(r[2] + r[3])) + _f32(_f32(r[4] + r[5]) + _f32(r[6] + r[7])))
    for v in values[whole:]:
        total = _f32(total + v)
    return total


def _tree(n: int) -> Generator[int, np.float32, np.float32]:
    """numpy's pairwise tree over n values: yields each leaf's length, receives its sum."""
    if n <= _BLOCK:
        return (yield n)
    half = n // 2
    half -= half % 8
    left = yield from _tree(half)
    right = yield from _tree(n - half)
    return _f32(left + right)


def pairwise_sum_float32(values: np.ndarray) -> np.float32:
    """numpy's ``np.sum`` of a flat float32 array, computed through the streaming tree."""
    stream = StreamingFloat32Mean(len(values))
    stream.add(values)
    return stream.sum()


class StreamingFloat32Mean:
    """The NaN-skipping float32 mean of ``total`` values fed in order, as xarray/numpy compute
    it on the whole array.

    Args:
        total: N, the number of values that will be fed (NaN included).
    """

    def __init__(self, total: int):
        self.total = int(total)
        self.fed = 0
        self.count = 0  # non-NaN values
        self._tree = _tree(self.total) if self.total > 0 else None
        self._need = next(self._tree) if self._tree is not None else 0
        self._pending = np.zeros(0, dtype=np.float32)
        self._sum = _f32(0.0) if self.total == 0 else None

    def add(self, values) -> None:
        """Feed the next values (any shape: flattened in C order), float32."""
        values = np.asarray(values, dtype=np.float32).ravel()
        if self.fed + len(values) > self.total:
            raise ValueError(f"StreamingFloat32Mean was made for {self.total} values, got {self.fed + len(values)}")
        self.fed += len(values)
        nan = np.isnan(values)
        self.count += int(len(values) - nan.sum())
        values = np.where(nan, _f32(0.0), values).astype(np.float32, copy=False)
        pending = np.concatenate([self._pending, values]) if len(self._pending) else values
        start = 0
        while self._sum is None and len(pending) - start >= self._need:
            leaf = _leaf_sum(pending[start:start + self._need])
            start += self._need
            try:
                self._need = self._tree.send(leaf)
            except StopIteration as done:
                self._sum = _f32(done.value)
        self._pending = pending[start:].copy()

    def add_missing(self, number: int) -> None:
        """Feed ``number`` NaN values (what devinterp's store holds for steps never written)."""
        self.add(np.full(int(number), np.nan, dtype=np.float32))

    def sum(self) -> np.float32:
        if self._sum is None:
            raise ValueError(f"StreamingFloat32Mean has {self.fed} of its {self.total} values")
        return self._sum

    def mean(self) -> float:
        """``float(xarray.DataArray(values).mean())`` of all ``total`` values; NaN if all are NaN."""
        total = self.sum()
        return float(_f32(np.float64(total) / self.count)) if self.count else float("nan")  # as np.nanmean divides
